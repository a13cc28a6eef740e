"""The RPC micro-benchmark, the micro-batch anatomy and the side-by-side control run end to
end (figures are printed; only orderings that hold on any machine are asserted)."""

import subprocess
import sys

import pytest

from helpers.launching import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_rpc_microbenchmark_prints_rpc_and_gloo_columns():
    result = subprocess.run([sys.executable, "-m", "rpc_train.bench.rpc", "--sizes-mb", "1", "--repeats", "5"],
                            cwd=REPO, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"4 B", "1 MB"}
    assert all(float(v) > 0 for v in rows["1 MB"][4:8])  # rpc/gloo ms and MB/s


def test_micro_batch_anatomy_times_every_piece():
    result = subprocess.run([sys.executable, "-m", "rpc_train.bench.anatomy", "--repeats", "10"],
                            cwd=REPO, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = {line.rsplit(" ", 2)[0].strip(): float(line.split()[-2])
               for line in result.stdout.splitlines()[1:]}
    assert len(figures) == 11 and all(ms > 0 for ms in figures.values()), figures
    # Each row adds a piece to the one before: a micro-batch with its backward costs more than
    # the bare forward, and a step of 8 micro-batches more than a step of 1.
    assert figures["... + loss and distributed backward"] > figures["forward through the stages, no autograd"]
    assert figures["train_step, 8 micro-batches"] > figures["train_step, 1 micro-batch, all of it"]


def test_side_by_side_jobs_report_each_step():
    result = subprocess.run([sys.executable, "-m", "rpc_train.bench.cores", "--model", "mlp", "--jobs", "2",
                             "--steps", "3", "--warmup", "1"], cwd=REPO, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == ["1 job(s) at once", "2 job(s) at once"]
    assert [line.count(" ms") for line in lines] == [1, 2]  # one median step per job
