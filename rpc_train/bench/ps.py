"""`python -m rpc_train.bench.ps [--trainers 1,2,3] [--batch-size 64]`: parameter-server speed.

One table of training samples/s: single-process training in this process with a batch of
N x b for each N, then real `./launch.sh mode=parameter_server` jobs with N trainers of batch b,
sync and async. A sync job with N trainers computes exactly what the single process with
batch N x b does, so that row is its reference. Each job's rate is the mean of its logged
`throughput/samples_per_s` windows after the first (start-up) window.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from rpc_train.runtime.allocator import configure_allocator
from rpc_train.data.datasets import make_loaders
from rpc_train.training.local import LocalEngine
from rpc_train.config.compose import compose
from rpc_train.metrics.table import format_table
from rpc_train.runtime.world import usable_cores

REPO = Path(__file__).resolve().parents[2]  # the checkout, where launch.sh is
COLUMNS = ["setup", "trainers", "batch", "rate", "vs_single", "vs_one"]
HEADERS = ["setup", "trainers", "batch/step", "samples/s", "vs single-process", "vs 1 trainer"]


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rpc_train.bench.ps", description=__doc__.splitlines()[0])
    p.add_argument("--trainers", default="1,2,3", help="comma-separated trainer counts")
    p.add_argument("--servers", type=int, default=1, help="ps.servers for every job")
    p.add_argument("--batch-size", type=int, default=64, help="per-trainer batch b")
    p.add_argument("--steps", type=int, default=60, help="steps per trainer in each job")
    p.add_argument("--log-every", type=int, default=10, help="steps per throughput window")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds each job may run")
    args = p.parse_args(argv)
    args.trainers = [int(n) for n in args.trainers.split(",") if n.strip()]
    return args


def job_overrides(args: argparse.Namespace) -> List[str]:
    # Enough epochs that --steps, not the data, ends every job; validation is outside the rates.
    return ["trainer.epochs=1000", f"trainer.max_steps={args.steps}", f"trainer.log_every={args.log_every}",
            "trainer.progress=false", "trainer.save_model=false", *args.override]


def single_process_row(args: argparse.Namespace, trainers: int) -> Dict:
    """This process, every core, one batch of trainers x b per step."""
    cfg = compose([*job_overrides(args), f"trainer.batch_size={trainers * args.batch_size}"])
    torch.set_num_threads(usable_cores())
    configure_allocator(cfg.runtime)
    loader, _ = make_loaders(cfg.data, cfg.trainer.batch_size, cfg.seed)
    engine, batches = LocalEngine(cfg), list(loader)
    for x, y in batches[:3]:  # warm-up, untimed
        engine.train_step(x, y)
    seconds = []
    for step in range(args.steps):
        x, y = batches[step % len(batches)]
        started = time.perf_counter()
        engine.train_step(x, y)
        seconds.append(time.perf_counter() - started)
    rate = cfg.trainer.batch_size / statistics.median(seconds)
    return {"setup": "single-process", "trainers": "-", "batch": cfg.trainer.batch_size, "rate": rate}


def ps_row(args: argparse.Namespace, trainers: int, sync: bool) -> Dict:
    """One real launch; its mean logged throughput after the first window."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory(prefix="ps-bench-") as run_dir:
        env = {**os.environ, "RUN_DIR": run_dir, "PYTHON": sys.executable,
               "NPROC": str(1 + args.servers + trainers)}
        cmd = [str(REPO / "launch.sh"), "mode=parameter_server", f"ps.servers={args.servers}",
               f"ps.sync={str(sync).lower()}", f"trainer.batch_size={args.batch_size}", *job_overrides(args)]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
        acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        acc.Reload()
        windows = [e.value for e in acc.Scalars("throughput/samples_per_s")]
    rate = statistics.mean(windows[1:] or windows)
    return {"setup": f"parameter server, {'sync' if sync else 'async'}", "trainers": trainers,
            "batch": trainers * args.batch_size, "rate": rate}


def add_ratios(rows: List[Dict]) -> None:
    single = {r["batch"]: r["rate"] for r in rows if r["setup"] == "single-process"}
    first = {}
    for row in rows:
        row["vs_single"] = row["rate"] / single[row["batch"]]
        first.setdefault(row["setup"], row["rate"])
        row["vs_one"] = row["rate"] / first[row["setup"]] if row["trainers"] != "-" else "-"


def _cell(value) -> str:
    # Rates as whole samples/s, ratios to two decimals.
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Single-process rows first and alone: no job competes with them for the cores.
    rows = [single_process_row(args, n) for n in args.trainers]
    torch.set_num_threads(1)  # this process only waits while the jobs run
    for sync in (True, False):
        rows += [ps_row(args, n, sync) for n in args.trainers]
    add_ratios(rows)
    print(f"machine: {usable_cores()} usable cores, torch {torch.__version__}; "
          f"{args.servers} server(s), b={args.batch_size}, {args.steps} steps a job, "
          f"overrides: {args.override or '-'}")
    print(format_table(rows, COLUMNS, HEADERS, _cell))
    return 0


if __name__ == "__main__":
    sys.exit(main())
