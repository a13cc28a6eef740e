"""Sweeps (one torchrun world per job) and a two-"node" launch on this machine."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.events import read_scalars
from helpers.launching import REPO
from rpc_train.runtime.local_world import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def sweep(tmp_path, *args):
    """./launch.sh -m ... run from a copy of nothing but the cwd, so multirun/ lands in tmp."""
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([str(REPO / "launch.sh"), "-m", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=280)


def sweep_dir(tmp_path) -> Path:
    (found,) = (tmp_path / "multirun").glob("*/*")
    return found


def summary(tmp_path):
    with open(sweep_dir(tmp_path) / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_sweep_runs_each_job_in_its_own_world(tmp_path):
    result = sweep(tmp_path, "experiment=smoke", "trainer.max_steps=10", "optim.lr=0.1,0.05")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = summary(tmp_path)
    assert [r["overrides"] for r in rows] == ["experiment=smoke trainer.max_steps=10 optim.lr=0.1",
                                              "experiment=smoke trainer.max_steps=10 optim.lr=0.05"]
    assert all(r["status"] == "ok" and float(r["val/accuracy"]) > 0.1 for r in rows)
    for job in ("0", "1"):
        job_dir = sweep_dir(tmp_path) / job
        assert "hparam/val/accuracy" in read_scalars(job_dir)
        assert (job_dir / ".hydra" / "overrides.yaml").is_file()
        assert (job_dir / "exit_status").read_text().strip() == "0"
    assert "2 of 2 jobs passed" in result.stdout


def test_a_failed_job_is_reported_and_the_sweep_goes_on(tmp_path):
    result = sweep(tmp_path, "experiment=smoke", "trainer.max_steps=5", "pipeline.micro_batches=0,2")
    assert result.returncode != 0
    rows = summary(tmp_path)
    assert rows[0]["status"] == "failed (exit 2)" and rows[1]["status"] == "ok"
    assert "error: pipeline.micro_batches=0" in result.stderr
    assert "1 of 2 jobs passed" in result.stdout


def test_two_nodes_on_loopback_train_together(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "NNODES": "2", "NPROC": "2",
           "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "RUN_DIR": str(tmp_path / "run")}
    args = [str(REPO / "launch.sh"), "experiment=smoke", "runtime.interface=lo"]
    nodes = [subprocess.Popen(args, cwd=REPO, env={**env, "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    # One world of 4: a driver and three stages spread over the two agents.
    assert "pipeline: 3 stages on worker1, worker2, worker3" in "".join(outputs)
    assert sorted(p.name for p in (tmp_path / "run").glob("rank*.log")) == [f"rank{r}.log" for r in range(4)]
    assert read_scalars(tmp_path / "run")["val/accuracy"]
