"""`python -m rpc_train.bench.serve` end to end: it trains, serves, loads and prints every row.

No timing assertions: speed depends on the machine; the shape of the table is checked.
"""

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_serving_bench_prints_every_row_with_its_figures():
    done = subprocess.run([sys.executable, "-m", "rpc_train.bench.serve", "--models", "mlp", "--clients", "2",
                           "--seconds", "1", "--rate", "50"], capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    rows = [line for line in lines if line.startswith(("in process", "rpc_train"))]
    assert len(rows) == 2 + 4 * 2, done.stdout  # two in-process rows; four setups, closed and open loop
    unbatched = [line for line in rows if "batching off" in line]
    assert all(line.split()[-1] == "1" or line.split()[-1].startswith("1.") for line in unbatched), unbatched
    assert "failed requests: 0" in done.stdout
