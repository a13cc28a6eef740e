"""`python -m rpc_train.bench.hybrid` end to end: real hybrid launches and the ddp_rpc peer under torchrun.

No timing assertions: only that every row is there with a rate and its ratios.
"""

import re
import subprocess
import sys

import pytest

PEER = "ddp_rpc peer (RemoteModule + DistributedOptimizer)"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hybrid_bench_prints_every_row_with_its_ratios():
    done = subprocess.run([sys.executable, "-m", "rpc_train.bench.hybrid", "--steps", "10", "--log-every", "5",
                           "--timeout", "240", "--repeats", "1"], capture_output=True, text=True, timeout=880)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [re.split(r"\s{2,}", line.strip()) for line in done.stdout.splitlines()
            if line.startswith(("single", "hybrid", "ddp_rpc"))]
    assert [r[0] for r in rows] == ["single-process"] * 2 + [
        "hybrid sync, table", "hybrid sync, table", "hybrid async, table", "hybrid sync, table", "hybrid sync, row",
        "hybrid async, row", PEER, PEER], done.stdout
    setup, servers, trainers, batch, rate, spread, vs_single, vs_peer = zip(*rows)
    assert all(float(r) > 0 for r in rate)
    # A hybrid row has a ratio to the peer of its layout (2 trainers); the 1-trainer row has none.
    assert [v != "-" for v in vs_peer] == [False, False, False, True, True, True, True, True, False, False]
    assert all(float(v) > 0 for v in vs_single[:2 + 6])
