"""`python -m rpc_train.bench.pipeline` end to end: it starts its own RPC world, finishes, writes its CSV.

No timing assertions: speed depends on the machine and its load; only the shape is checked.
"""

import csv
import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_runs_and_writes_every_row(tmp_path):
    out = tmp_path / "bench.csv"
    cmd = [sys.executable, "-m", "rpc_train.bench.pipeline", "--model", "mlp", "--data", "synthetic",
           "--steps", "2", "--warmup", "1", "--micro-batches", "1,2", "--batch-size", "16",
           "--csv", str(out), "--timeout", "240"]
    # The bench's own timeout ends its RPC world before pytest's, so a hang fails with its output.
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-4000:]

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    setups = [(r["setup"], r["micro_batches"]) for r in rows]
    # The peer (torch.distributed.pipelining) needs micro-batches >= stages: no row for m=1.
    cores = len(os.sched_getaffinity(0))
    all_cores = f"single-process, {cores} thread" + ("s" if cores > 1 else "")
    assert setups == [("single-process, 1 thread", "-"), (all_cores, "-")] + [
        (f"rpc_train {s} K=2", m) for s in ("1f1b", "gpipe") for m in ("1", "2")] + [
        (f"torch pipelining {s} K=2", "2") for s in ("1f1b", "gpipe")]
    assert all(float(r["samples_per_s"]) > 0 for r in rows)
    # Every pipeline row, rpc_train's and the peer's, is set against a zero-overhead pipeline.
    piped = [r for r in rows if r["micro_batches"] != "-"]
    assert all(0 < float(r["split_bound"]) for r in piped)
    assert all(r["split_bound"] == "-" for r in rows if r["micro_batches"] == "-")
    # rpc_train's rows at 2 micro-batches are set against the peer's, same schedule; m=1 has none.
    assert [r["vs_peer"] != "-" for r in rows if r["setup"].startswith("rpc_train")] == [False, True, False, True]
    assert all(float(r["vs_peer"]) > 0 for r in rows if r["setup"].startswith("rpc_train") and r["micro_batches"] == "2")
    assert "samples/s" in done.stdout
    # Each rpc_train row's notes: stage compute and peak memory, the optimizer-step RPC, the
    # bubble, the handoffs and the messages (6 a micro-batch with K=2: pipeline/messages.py).
    notes = re.findall(r"^  rpc_train .* peak [\d.]+ MB; step [\d.]+, bubble [\d.]+, handoff fwd [\d.]+ bwd [\d.]+, "
                       r"messages (\d+)/micro-batch \d+/step$",
                       done.stdout, re.M)
    assert notes == ["6"] * 4, done.stdout
