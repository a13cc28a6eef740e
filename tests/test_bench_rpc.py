"""The RPC micro-benchmark runs end to end (figures are printed, never asserted)."""

import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_rpc_microbenchmark_prints_rpc_and_gloo_columns():
    result = subprocess.run([sys.executable, "-m", "rpc_train.bench_rpc", "--sizes-mb", "1", "--repeats", "5"],
                            cwd=REPO, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"4 B", "1 MB"}
    assert all(float(v) > 0 for v in rows["1 MB"][4:8])  # rpc/gloo ms and MB/s
