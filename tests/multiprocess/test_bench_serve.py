"""`python -m rpc_train.bench.serve` end to end: it trains, serves, loads and prints every row.

No timing assertions: speed depends on the machine; the shape of the table is checked.
"""

import subprocess
import sys

import pytest

from rpc_train.bench import ray_peer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_serving_bench_prints_every_row_with_its_figures():
    done = subprocess.run([sys.executable, "-m", "rpc_train.bench.serve", "--models", "mlp", "--clients", "2",
                           "--seconds", "1", "--rate", "50"], capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    rows = [line for line in lines if line.startswith(("in process", "rpc_train", "Ray Serve"))]
    # Two in-process rows; four rpc_train setups and, with the bench extra, Ray Serve's two; closed and open loop.
    skipped = ray_peer.missing()
    assert len(rows) == 2 + 4 * 2 + (0 if skipped else 2 * 2), done.stdout
    if skipped:
        assert f"Ray Serve @serve.batch (the peer) skipped: {skipped}" in done.stdout
    else:  # the peer batched too
        peer = [line for line in rows if line.startswith("Ray Serve")]
        assert all(float(line.split()[-2]) >= 1 for line in peer), peer
    unbatched = [line for line in rows if "batching off" in line]
    assert all(line.split()[-1] == "1" or line.split()[-1].startswith("1.") for line in unbatched), unbatched
    assert "failed requests: 0" in done.stdout
