"""`python -m rpc_train.bench.serve` end to end: it trains, serves, loads and prints every row.

No timing assertions: speed depends on the machine; the table's shape and its own accounts
(the generator's and the server's CPU, the server's batches) are checked.
"""

import re
import subprocess
import sys

import pytest

from rpc_train.bench import httpload, ray_peer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def cells(line: str) -> list:
    return re.split(r"\s{2,}", line.strip())


def test_serving_bench_prints_every_row_with_its_figures():
    done = subprocess.run([sys.executable, "-m", "rpc_train.bench.serve", "--models", "mlp", "--clients", "2",
                           "--concurrency", "1,4", "--seconds", "1", "--rate", "50", "--max-batch-size", "8",
                           "--setups", "unbatched,batching"],
                          capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    header = cells(next(line for line in lines if line.startswith("setup")))
    rows = [dict(zip(header, cells(line))) for line in lines if line.startswith(("in process", "rpc_train", "Ray Serve"))]
    # In process at batch 1, 2, 4, 8; per server: wrk at 2 concurrencies (where wrk is installed),
    # the gRPC clients and the Poisson rate; two rpc_train setups and, with the bench extra, Ray's two.
    no_wrk, no_ray = httpload.missing(), ray_peer.missing()
    loads = (0 if no_wrk else 2) + 2
    assert len(rows) == 4 + 2 * loads + (0 if no_ray else 2 * 2), done.stdout
    assert [row["mean batch"] for row in rows[:4]] == ["1", "2", "4", "8"]
    if no_wrk:
        assert f"HTTP rows skipped: {no_wrk}" in done.stdout
    if no_ray:
        assert f"Ray Serve @serve.batch (the peer) skipped: {no_ray}" in done.stdout
    served = [row for row in rows if row["setup"].startswith("rpc_train")]
    for row in served:
        generator, cores = row["generator cores"].split("/")
        server = float(row["server cores"].split("/")[0])
        assert 0 < float(generator) and 0 < server <= float(cores) + 0.2, row  # the job's processes' CPU, measured
        assert 0 < float(row["vs model"]), row
    assert all(row["vs unbatched"] == "1" or row["vs unbatched"].startswith("1.")
               for row in served if "batching off" in row["setup"]), served
    assert all(float(row["mean batch"]) == 1 for row in served if "batching off" in row["setup"]), served
    assert "failed requests: 0" in done.stdout
    assert "the server adds" in done.stdout or no_wrk
