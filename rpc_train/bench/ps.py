"""`python -m rpc_train.bench.ps [--trainers 1,2,3] [--batch-size 64]`: parameter-server speed.

One table of training samples/s: single-process training in this process with a batch of
N x b for each N, then real `./launch.sh mode=parameter_server` jobs with N trainers of batch b,
sync and async. A sync job with N trainers computes exactly what the single process with
batch N x b does, so that row is its reference. Each job's rate is the mean of its logged
`throughput/samples_per_s` windows after the first (start-up) window. With `--repeats R` every
job runs R times, sync and async alternating (and which goes first alternating too), and each
row is the median of its R rates: on a shared 2-core machine one job's rate swings by more
than the difference between the modes, so one pair of jobs decides nothing. The last column
is async over sync for the same trainer count, from the medians.
"""

import argparse
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

from rpc_train.bench.launched import job_rate
from rpc_train.runtime.allocator import configure_allocator, restart_under_allocator
from rpc_train.data.datasets import make_loaders
from rpc_train.training.local import LocalEngine
from rpc_train.config.compose import compose
from rpc_train.metrics.table import format_table, rate_cell
from rpc_train.runtime.world import usable_cores

COLUMNS = ["setup", "trainers", "batch", "rate", "spread", "vs_single", "vs_one", "vs_sync"]
HEADERS = ["setup", "trainers", "batch/step", "samples/s", "min-max", "vs single-process", "vs 1 trainer",
           "async / sync"]


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rpc_train.bench.ps", description=__doc__.splitlines()[0])
    p.add_argument("--trainers", default="1,2,3", help="comma-separated trainer counts")
    p.add_argument("--servers", type=int, default=1, help="ps.servers for every job")
    p.add_argument("--batch-size", type=int, default=64, help="per-trainer batch b")
    p.add_argument("--steps", type=int, default=60, help="steps per trainer in each job")
    p.add_argument("--log-every", type=int, default=10, help="steps per throughput window")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--repeats", type=int, default=1, help="runs of every job; rows are medians")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds each job may run")
    args = p.parse_args(argv)
    args.trainers = [int(n) for n in args.trainers.split(",") if n.strip()]
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
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
    return {"setup": "single-process", "trainers": "-", "batch": cfg.trainer.batch_size, "rate": rate, "spread": "-"}


def ps_rate(args: argparse.Namespace, trainers: int, sync: bool) -> float:
    """One real launch's training throughput."""
    return job_rate(["mode=parameter_server", f"ps.servers={args.servers}", f"ps.sync={str(sync).lower()}",
                     f"trainer.batch_size={args.batch_size}", *job_overrides(args)],
                    1 + args.servers + trainers, args.timeout)


def ps_rows(args: argparse.Namespace) -> List[Dict]:
    """Every job --repeats times, sync and async interleaved; one row of medians per job."""
    rates: Dict[tuple, List[float]] = {}
    for repeat in range(args.repeats):
        # Alternate which mode goes first, so a slow stretch of the machine hits both alike.
        for sync in ((True, False) if repeat % 2 == 0 else (False, True)):
            for n in args.trainers:
                rates.setdefault((sync, n), []).append(ps_rate(args, n, sync))
    rows = []
    for sync in (True, False):
        for n in args.trainers:
            runs = rates[(sync, n)]
            rows.append({"setup": f"parameter server, {'sync' if sync else 'async'}", "trainers": n,
                         "batch": n * args.batch_size, "rate": statistics.median(runs),
                         "spread": f"{min(runs):.0f}-{max(runs):.0f}" if len(runs) > 1 else "-"})
    return rows


def add_ratios(rows: List[Dict]) -> None:
    single = {r["batch"]: r["rate"] for r in rows if r["setup"] == "single-process"}
    sync = {r["trainers"]: r["rate"] for r in rows if r["setup"] == "parameter server, sync"}
    first = {}
    for row in rows:
        row["vs_single"] = row["rate"] / single[row["batch"]]
        first.setdefault(row["setup"], row["rate"])
        row["vs_one"] = row["rate"] / first[row["setup"]] if row["trainers"] != "-" else "-"
        row["vs_sync"] = row["rate"] / sync[row["trainers"]] if row["setup"].endswith("async") else "-"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # runtime.allocator=jemalloc|tcmalloc: the single-process rows run under it too (the jobs
    # get it from launch.sh).
    restart_under_allocator(compose(job_overrides(args)).runtime, "rpc_train.bench.ps", argv)
    # Single-process rows first and alone: no job competes with them for the cores.
    rows = [single_process_row(args, n) for n in args.trainers]
    torch.set_num_threads(1)  # this process only waits while the jobs run
    rows += ps_rows(args)
    add_ratios(rows)
    print(f"machine: {usable_cores()} usable cores, torch {torch.__version__}; "
          f"{args.servers} server(s), b={args.batch_size}, {args.steps} steps a job, "
          f"median of {args.repeats} run(s) a row, "
          f"overrides: {args.override or '-'}")
    print(format_table(rows, COLUMNS, HEADERS, rate_cell))
    return 0


if __name__ == "__main__":
    sys.exit(main())
