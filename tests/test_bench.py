"""`python -m rpc_train.bench` end to end: it starts its own RPC world, finishes, writes its CSV.

No timing assertions: speed depends on the machine and its load; only the shape is checked.
"""

import csv
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_runs_and_writes_every_row(tmp_path):
    out = tmp_path / "bench.csv"
    cmd = [sys.executable, "-m", "rpc_train.bench", "--model", "mlp", "--data", "synthetic",
           "--steps", "2", "--warmup", "1", "--micro-batches", "1,2", "--batch-size", "16",
           "--csv", str(out), "--timeout", "240"]
    # The bench's own timeout ends its RPC world before pytest's, so a hang fails with its output.
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-4000:]

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["micro_batches"] for r in rows] == ["-", "-", "1", "2"]
    assert [r["setup"].split(",")[0] for r in rows] == ["single-process"] * 2 + ["pipeline K=2"] * 2
    assert all(float(r["samples_per_s"]) > 0 for r in rows)
    assert "samples/s" in done.stdout
