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
    rows = {line[:56].strip(): [float(v) for v in line[56:].replace(" ms", "").split()]
            for line in result.stdout.splitlines()[3:] if " ms" in line and not line.startswith("each")}
    assert len(rows) == 8 and all(figures[0] > 0 for figures in rows.values()), rows
    # A training step costs more than the forward alone, and a step of 8 micro-batches more
    # than a step of 1.
    assert rows["train_step, 1 micro-batch"][0] > rows["forward and loss through the stages (eval_step)"][0]
    assert rows["train_step, 8 micro-batches"][0] > rows["train_step, 1 micro-batch"][0]
    # Messages a micro-batch costs with K=2 (pipeline/messages.py), whatever the count; a step
    # adds the driver's call to stage 0 and stage 0's to stage 1 to step, and their replies.
    steps = {m: rows[f"train_step, {m} micro-batch{'es' if m > 1 else ''}"] for m in (1, 2, 4, 8)}
    assert all(figures[1:3] == [6.0, 6 * m + 4.0] for m, figures in steps.items()), steps
    # ... and each process's CPU per step: every stage works, the driver at least waits.
    assert all(len(figures) == 6 and min(figures[4:]) > 0 for figures in steps.values()), steps
    assert "each added micro-batch:" in result.stdout


def test_side_by_side_jobs_report_each_step():
    result = subprocess.run([sys.executable, "-m", "rpc_train.bench.cores", "--model", "mlp", "--jobs", "2",
                             "--steps", "3", "--warmup", "1"], cwd=REPO, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == ["1 job(s) at once", "2 job(s) at once"]
    assert [line.count(" ms") for line in lines] == [1, 2]  # one median step per job
