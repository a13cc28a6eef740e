"""`python -m rpc_train.bench.hybrid [--steps 60]`: hybrid sparse/dense training speed.

One table of training samples/s, every row from the same run, on the DLRM preset
(experiment=dlrm_synthetic, embeddings by SGD so that the peer's optimizer is the same kind):
single-process training in this process at batch b and 2 x b; real `./launch.sh` hybrid jobs
with 1 and 2 servers, 1 and 2 trainers, sync and async, table and row sharding; and the
peer, the upstream `ddp_rpc` pattern on the same model and data (bench/ddp_rpc_peer.py),
with the same number of processes. A job's rate is the mean of its logged throughput windows
after the first; the peer's is computed the same way from its trainers' step times (windows of
--log-every steps, all trainers' samples over the slowest trainer's time). With `--repeats R`
every launched row runs R times, interleaved (each repeat runs the rows in turn, the order
reversed every other repeat), and each row is the median of its R rates with their min-max: on
a shared 2-core machine one job's rate swings by more than the difference between the rows,
so one run of each decides nothing. The header line names the date, the CPU and the load.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

from rpc_train.bench.launched import REPO, job_rate
from rpc_train.config.compose import compose
from rpc_train.data.clicks import load_clicks
from rpc_train.hybrid.local import LocalClickEngine
from rpc_train.metrics.table import format_table, rate_cell
from rpc_train.runtime.world import usable_cores
from torch.utils.data import DataLoader

COLUMNS = ["setup", "servers", "trainers", "batch", "rate", "spread", "vs_single", "vs_peer"]
HEADERS = ["setup", "servers", "trainers", "batch/step", "samples/s", "min-max", "vs single-process",
           "vs ddp_rpc peer"]
SAME = ["experiment=dlrm_synthetic", "hybrid.embedding_optim=sgd"]
# (label, servers, trainers, overrides)
HYBRID = [("hybrid sync, table", 1, 1, []), ("hybrid sync, table", 1, 2, []), ("hybrid async, table", 1, 2,
          ["hybrid.sync=false"]), ("hybrid sync, table", 2, 2, []), ("hybrid sync, row", 2, 2,
          ["hybrid.sharding=row"]), ("hybrid async, row", 2, 2, ["hybrid.sharding=row", "hybrid.sync=false"])]
PEER = [(1, 2), (2, 2)]  # (servers, trainers)
PEER_LABEL = "ddp_rpc peer (RemoteModule + DistributedOptimizer)"


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rpc_train.bench.hybrid", description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128, help="per-trainer batch b")
    p.add_argument("--steps", type=int, default=60, help="steps per trainer in each job")
    p.add_argument("--log-every", type=int, default=10, help="steps per throughput window")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--repeats", type=int, default=3, help="runs of every launched row; rows are medians")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds each job may run")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def overrides(args: argparse.Namespace) -> List[str]:
    # Enough epochs that --steps, not the data, ends every job.
    return [*SAME, "trainer.epochs=1000", f"trainer.max_steps={args.steps}", f"trainer.log_every={args.log_every}",
            f"trainer.batch_size={args.batch_size}", "trainer.save_model=false", *args.override]


def single_process_row(args: argparse.Namespace, trainers: int) -> Dict:
    """This process, every core, one batch of trainers x b a step."""
    cfg = compose(overrides(args))
    torch.set_num_threads(usable_cores())
    batch = trainers * args.batch_size
    train, _ = load_clicks(cfg.data, cfg.seed)
    batches = list(DataLoader(train, batch_size=batch, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(cfg.seed)))
    engine, seconds = LocalClickEngine(cfg), []
    for step in range(3 + args.steps):  # three untimed warm-up steps
        started = time.perf_counter()
        engine.train_step(*batches[step % len(batches)])
        if step >= 3:
            seconds.append(time.perf_counter() - started)
    return {"setup": "single-process", "servers": "-", "trainers": "-", "batch": batch,
            "rate": batch / statistics.median(seconds), "spread": "-"}


def peer_rate(args: argparse.Namespace, servers: int, trainers: int) -> float:
    with tempfile.TemporaryDirectory(prefix="ddp-rpc-peer-") as scratch:
        out = os.path.join(scratch, "rate.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={1 + servers + trainers}",
               "-m", "rpc_train.bench.ddp_rpc_peer", f"--servers={servers}", f"--steps={args.steps}",
               f"--log-every={args.log_every}", f"--out={out}",
               *[f"--override={o}" for o in overrides(args)[2:]]]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)["samples_per_s"]


def add_ratios(rows: List[Dict]) -> None:
    single = {r["batch"]: r["rate"] for r in rows if r["setup"] == "single-process"}
    peer = {(r["servers"], r["trainers"]): r["rate"] for r in rows if r["setup"].startswith("ddp_rpc")}
    for row in rows:
        row["vs_single"] = row["rate"] / single[row["batch"]] if row["batch"] in single else "-"
        base = peer.get((row["servers"], row["trainers"]))
        row["vs_peer"] = row["rate"] / base if base and not row["setup"].startswith("ddp_rpc") else "-"


def launched_rows(args: argparse.Namespace) -> List[Dict]:
    """Every hybrid job and peer --repeats times, interleaved; one row of medians each."""
    runs = [(label, servers, trainers, extra) for label, servers, trainers, extra in HYBRID]
    runs += [(PEER_LABEL, servers, trainers, None) for servers, trainers in PEER]
    rates: Dict[int, List[float]] = {}
    for repeat in range(args.repeats):
        # Reversed every other repeat, so a slow stretch of the machine hits every row alike.
        for i in (range(len(runs)) if repeat % 2 == 0 else reversed(range(len(runs)))):
            label, servers, trainers, extra = runs[i]
            if extra is None:
                rate = peer_rate(args, servers, trainers)
            else:
                rate = job_rate(["mode=hybrid", f"hybrid.servers={servers}", *overrides(args), *extra],
                                1 + servers + trainers, args.timeout)
            rates.setdefault(i, []).append(rate)
    return [{"setup": label, "servers": servers, "trainers": trainers, "batch": trainers * args.batch_size,
             "rate": statistics.median(rates[i]),
             "spread": f"{min(rates[i]):.0f}-{max(rates[i]):.0f}" if len(rates[i]) > 1 else "-"}
            for i, (label, servers, trainers, _) in enumerate(runs)]


def machine_line() -> str:
    """The date, the CPU model and the load average: what a figure needs next to it."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{datetime.date.today().isoformat()}, {cpu}, {usable_cores()} usable cores, load {load}"


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    before = machine_line()
    rows = [single_process_row(args, n) for n in (1, 2)]  # first and alone: no job competes for the cores
    torch.set_num_threads(1)  # this process only waits while the jobs run
    rows += launched_rows(args)
    add_ratios(rows)
    print(f"machine: {before} (at the start; at the end {machine_line().rsplit('load ', 1)[1]}), "
          f"torch {torch.__version__}; DLRM preset, SGD tables, b={args.batch_size} a trainer, {args.steps} steps "
          f"a job, median of {args.repeats} run(s) a launched row, overrides: {args.override or '-'}")
    print(format_table(rows, COLUMNS, HEADERS, rate_cell))
    return 0


if __name__ == "__main__":
    sys.exit(main())
