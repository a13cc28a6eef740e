"""`python -m rpc_train.bench.hybrid [--steps 60]`: hybrid sparse/dense training speed.

One table of training samples/s, every row from the same run, on the DLRM preset
(experiment=dlrm_synthetic, embeddings by SGD so that the peer's optimizer is the same kind):
single-process training in this process at batch b and 2 x b; real `./launch.sh` hybrid jobs
with 1 and 2 servers, 1 and 2 trainers, sync and async, table and row sharding; and the
peer, the upstream `ddp_rpc` pattern on the same model and data (bench/ddp_rpc_peer.py),
with the same number of processes. A job's rate is the mean of its logged throughput windows
after the first; the peer's is its trainers' median step, summed.
"""

import argparse
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

COLUMNS = ["setup", "servers", "trainers", "batch", "rate", "vs_single", "vs_peer"]
HEADERS = ["setup", "servers", "trainers", "batch/step", "samples/s", "vs single-process", "vs ddp_rpc peer"]
SAME = ["experiment=dlrm_synthetic", "hybrid.embedding_optim=sgd"]
# (label, servers, trainers, overrides)
HYBRID = [("hybrid sync, table", 1, 1, []), ("hybrid sync, table", 1, 2, []), ("hybrid async, table", 1, 2,
          ["hybrid.sync=false"]), ("hybrid sync, table", 2, 2, []), ("hybrid sync, row", 2, 2,
          ["hybrid.sharding=row"]), ("hybrid async, row", 2, 2, ["hybrid.sharding=row", "hybrid.sync=false"])]
PEER = [(1, 2), (2, 2)]  # (servers, trainers)


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rpc_train.bench.hybrid", description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=128, help="per-trainer batch b")
    p.add_argument("--steps", type=int, default=60, help="steps per trainer in each job")
    p.add_argument("--log-every", type=int, default=10, help="steps per throughput window")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds each job may run")
    return p.parse_args(argv)


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
            "rate": batch / statistics.median(seconds)}


def peer_rate(args: argparse.Namespace, servers: int, trainers: int) -> float:
    with tempfile.TemporaryDirectory(prefix="ddp-rpc-peer-") as scratch:
        out = os.path.join(scratch, "rate.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={1 + servers + trainers}",
               "-m", "rpc_train.bench.ddp_rpc_peer", f"--servers={servers}", f"--steps={args.steps}", f"--out={out}",
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


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rows = [single_process_row(args, n) for n in (1, 2)]  # first and alone: no job competes for the cores
    torch.set_num_threads(1)  # this process only waits while the jobs run
    for label, servers, trainers, extra in HYBRID:
        rate = job_rate(["mode=hybrid", f"hybrid.servers={servers}", *overrides(args), *extra],
                        1 + servers + trainers, args.timeout)
        rows.append({"setup": label, "servers": servers, "trainers": trainers,
                     "batch": trainers * args.batch_size, "rate": rate})
    for servers, trainers in PEER:
        rows.append({"setup": "ddp_rpc peer (RemoteModule + DistributedOptimizer)", "servers": servers,
                     "trainers": trainers, "batch": trainers * args.batch_size,
                     "rate": peer_rate(args, servers, trainers)})
    add_ratios(rows)
    print(f"machine: {usable_cores()} usable cores, torch {torch.__version__}; DLRM preset, SGD tables, "
          f"b={args.batch_size} a trainer, {args.steps} steps a job, overrides: {args.override or '-'}")
    print(format_table(rows, COLUMNS, HEADERS, rate_cell))
    return 0


if __name__ == "__main__":
    sys.exit(main())
