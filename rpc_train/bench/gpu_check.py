"""`python -m rpc_train.bench.gpu_check [--out report.txt]`: the check a session lent a GPU runs first.

Two parts, then one report (printed, and written to --out):

- the CUDA tests, `tests/multiprocess/test_cuda.py`: pipelines of both schedules against
  single-GPU training, a resumed run, serving replicas on the GPU, a hybrid trainer over NCCL,
  and two torchrun nodes whose ranks take cuda:0 by local rank and share it;
- the GPU pipeline rows: ResNet-50 at 224x224, batch 128, against one process on the GPU
  (`python -m rpc_train.bench.pipeline`, the command of docs/benchmarks.md's "On a GPU", shorter).

The report names the card, gives each test's outcome with the last lines of any failure, the
bench's table, and the time taken. The check keeps to its own budget (--budget): a part still
running when its share is spent is stopped, and the report says so, so a device call of ten
minutes always ends with a report. Exit status: 0 when every test passed and the bench ran, 1
otherwise, 2 at once where torch sees no CUDA device.
"""

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[2]  # the checkout: tests/ and launch.sh are there
TESTS = "tests/multiprocess/test_cuda.py"
BENCH = ["--model", "resnet50", "--device", "cuda", "--batch-size", "128", "--micro-batches", "1,2,4",
         "--steps", "10", "--warmup", "3", "--override", "data.shape=[3,224,224]",
         "--override", "model.small_input=false"]
BENCH_SHARE_S = 150  # of --budget, kept for the bench while the tests run (an estimate: not yet timed on a GPU)
GRACE_S = 15  # from Ctrl-C to SIGKILL: pytest's fixtures stop their jobs, torchrun its ranks
FAILURE_LINES = 20


@dataclass
class Outcome:
    name: str
    result: str  # PASS, FAIL, ERROR, SKIP
    seconds: float = 0.0
    detail: str = ""  # the end of a failure's text


@dataclass
class Part:
    returncode: Optional[int]  # None: stopped at its deadline
    seconds: float
    log: Path


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rpc_train.bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the report here; the tests' and the bench's full logs go beside "
                                 "it (NAME-pytest.log, NAME-bench.log)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (default 450)")
    p.add_argument("-k", dest="select", help="run only the tests pytest -k selects (a rerun of failures)")
    p.add_argument("--no-tests", action="store_true", help="skip the CUDA tests")
    p.add_argument("--no-bench", action="store_true", help="skip the pipeline rows")
    return p.parse_args(argv)


def card_line() -> str:
    """What the report was taken on: every GPU, driver, CUDA, torch, Python, cores, MPS."""
    import torch

    from rpc_train.runtime.devices import mps_running
    from rpc_train.runtime.world import usable_cores

    gpus = [f"{torch.cuda.get_device_name(i)} ({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
            for i in range(torch.cuda.device_count())]
    return (f"card: {', '.join(gpus)}; driver {driver_version()}; CUDA {torch.version.cuda} (torch's); "
            f"torch {torch.__version__}; Python {platform.python_version()}; {usable_cores()} cores; "
            f"MPS {'on' if mps_running() else 'off'}")


def driver_version() -> str:
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
        return found.stdout.split()[0] if found.returncode == 0 and found.stdout.split() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def revision() -> str:
    try:
        found = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"], capture_output=True,
                               text=True, timeout=10)
        return found.stdout.strip()[:72] if found.returncode == 0 else "unknown (no git history here)"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"


def child_env() -> dict:
    """The parts' environment: this checkout first on PYTHONPATH (rpc_train need not be installed),
    then what was there, made absolute, so launched ranks in any directory find the same packages."""
    paths = [str(REPO)] + [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def run_until(cmd: List[str], log: Path, deadline: float) -> Part:
    """Run `cmd` in the checkout, its output to `log`, until it ends or `deadline` (monotonic)
    passes; then Ctrl-C its process group, and SIGKILL what is left GRACE_S later."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_take_ctrl_c)
        try:
            return Part(proc.wait(timeout=max(1.0, deadline - start)), time.monotonic() - start, log)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            return Part(None, time.monotonic() - start, log)


def _take_ctrl_c() -> None:
    # A check started in the background (`cmd &`, nohup) has SIGINT ignored, and an ignored signal
    # stays ignored across exec: the part would sit out its Ctrl-C until the SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def read_outcomes(junit: Path, log_text: str) -> List[Outcome]:
    """Each test's outcome, from pytest's JUnit XML; from its -v lines where a stopped run wrote none."""
    try:
        cases = list(ET.parse(junit).getroot().iter("testcase"))
    except (OSError, ET.ParseError):
        found = re.findall(r"^\S+::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", log_text, re.MULTILINE)
        short = {"PASSED": "PASS", "FAILED": "FAIL", "ERROR": "ERROR", "SKIPPED": "SKIP"}
        return [Outcome(name, short[word]) for name, word in found]
    outcomes = []
    for case in cases:
        if case.get("name") is None:  # the entry a Ctrl-C leaves for the test it stopped
            continue
        outcome = Outcome(case.get("name", "?"), "PASS", float(case.get("time", 0) or 0))
        for tag, result in (("failure", "FAIL"), ("error", "ERROR"), ("skipped", "SKIP")):
            element = case.find(tag)
            if element is not None:
                text = (element.text or element.get("message") or "").rstrip()
                outcome.result, outcome.detail = result, "\n".join(text.splitlines()[-FAILURE_LINES:])
                break
        outcomes.append(outcome)
    return outcomes


def report_tests(part: Part, outcomes: List[Outcome]) -> List[str]:
    text = part.log.read_text(errors="replace")
    found = re.search(r"collected (\d+) items?(?: / (\d+) deselected)?", text)
    selected = int(found.group(1)) - int(found.group(2) or 0) if found else "?"
    counts = {r: sum(o.result == r for o in outcomes) for r in ("PASS", "FAIL", "ERROR", "SKIP")}
    done = ", ".join(f"{n} {r.lower()}" for r, n in counts.items() if n) or "none finished"
    lines = [f"tests ({TESTS}): {done} of {selected} selected, {part.seconds:.0f} s"]
    if part.returncode is None:
        running = re.findall(r"^\S+::(\S+) *$", text, re.MULTILINE)  # -v names a test as it starts it
        lines.append("  STOPPED at the budget" + (f" in {running[-1]}" if running else "")
                     + ": the tests not listed below did not finish")
    for o in outcomes:
        lines.append(f"  {o.result:5} {o.name}  {o.seconds:.0f} s")
        lines += [f"        | {line[:220]}" for line in o.detail.splitlines()] if o.result != "PASS" else []
    if not outcomes:
        lines += [f"        | {line[:220]}" for line in text.splitlines()[-FAILURE_LINES:]]
    return lines


def report_bench(part: Part) -> List[str]:
    text = part.log.read_text(errors="replace").splitlines()
    shown = next((i for i, line in enumerate(text) if line.startswith("machine:")), None)
    status = ("STOPPED at the budget" if part.returncode is None
              else "ok" if part.returncode == 0 else f"FAILED (exit {part.returncode})")
    head = f"bench (python -m rpc_train.bench.pipeline {' '.join(BENCH)}): {status}, {part.seconds:.0f} s"
    return [head] + [f"  {line}" for line in (text[shown:] if shown is not None else text[-FAILURE_LINES:])]


def passed(tests: Optional[List[Outcome]], tests_part: Optional[Part], bench: Optional[Part]) -> bool:
    tests_ok = tests_part is None or (tests_part.returncode == 0 and bool(tests)
                                      and all(o.result == "PASS" for o in tests))
    return tests_ok and (bench is None or bench.returncode == 0)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    if not torch.cuda.is_available():
        print("error: CUDA is not available (torch.cuda.is_available() is False): the GPU check needs a CUDA device",
              file=sys.stderr)
        return 2
    start = time.monotonic()
    end = start + args.budget
    logs = Path(args.out).parent if args.out else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    stem = Path(args.out).stem if args.out else "gpu_check"
    logs.mkdir(parents=True, exist_ok=True)
    report = [f"GPU check of rpc_train, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {revision()}",
              card_line()]
    outcomes, tests, bench = None, None, None
    if not args.no_tests:
        print(f"gpu_check: running {TESTS}", flush=True)
        junit = logs / f"{stem}-junit.xml"
        junit.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", f"--junitxml={junit}", TESTS]
        tests = run_until(cmd + (["-k", args.select] if args.select else []), logs / f"{stem}-pytest.log",
                          end - (0 if args.no_bench else BENCH_SHARE_S))
        outcomes = read_outcomes(junit, tests.log.read_text(errors="replace"))
        report += report_tests(tests, outcomes)
    if not args.no_bench:
        print("gpu_check: running the GPU pipeline rows", flush=True)
        left = end - time.monotonic()
        # The bench stops its own world a little before it is stopped from here.
        cmd = [sys.executable, "-m", "rpc_train.bench.pipeline", *BENCH, "--timeout", f"{max(10, left - 30):.0f}"]
        bench = run_until(cmd, logs / f"{stem}-bench.log", end - GRACE_S)
        report += report_bench(bench)
    ok = passed(outcomes, tests, bench)
    report.append(f"total: {time.monotonic() - start:.0f} s of a {args.budget:.0f} s budget; "
                  f"{'all passed' if ok else 'NOT all passed'}; full logs in {logs}/{stem}-*.log")
    text = "\n".join(report) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
