"""`python -m rpc_train.bench.ps --repeats 2` end to end: real launches, one row of medians per job.

No timing assertions: only that every row is there, with its spread and the async/sync ratio.
"""

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ps_bench_repeats_jobs_and_reports_async_over_sync():
    cmd = [sys.executable, "-m", "rpc_train.bench.ps", "--trainers", "2", "--steps", "20", "--log-every", "5",
           "--repeats", "2", "--timeout", "240"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "median of 2 run(s) a row" in done.stdout
    rows = {line.split("  ")[0].strip(): line for line in done.stdout.splitlines() if line.startswith(("single", "parameter"))}
    assert set(rows) == {"single-process", "parameter server, sync", "parameter server, async"}
    # Two runs a job: the spread is a min-max pair; the async row alone carries the ratio.
    assert re.search(r"\d+-\d+", rows["parameter server, sync"])
    assert float(rows["parameter server, async"].split()[-1]) > 0
    assert rows["parameter server, sync"].split()[-1] == "-"


def test_ps_bench_refuses_zero_repeats():
    done = subprocess.run([sys.executable, "-m", "rpc_train.bench.ps", "--repeats", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--repeats must be at least 1, got 0" in done.stderr
