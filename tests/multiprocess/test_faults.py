"""Real faults in a running job: a worker killed with SIGKILL, and one stopped with SIGSTOP."""

import json
import os
import re
import signal

import pytest

from helpers.events import read_scalars

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

# Full digits (50 batches an epoch): long enough to be caught mid-training after a checkpoint.
LONG = ["experiment=smoke", "data.limit=null", "trainer.max_steps=null", "trainer.epochs=3",
        "checkpoint.every_steps=10"]


def test_a_killed_worker_is_restarted_and_the_job_resumes(tmp_path, job_factory):
    run = tmp_path / "run"
    job = job_factory(LONG, run, MAX_RESTARTS="1")
    job.wait_for_checkpoint()
    os.kill(job.rank_pid(2), signal.SIGKILL)
    assert job.proc.wait(timeout=300) == 0, job.output()

    log = (run / "rank0.log").read_text()  # both attempts append to it
    assert "torchrun restart 1 of at most 1" in log
    resumed = re.search(r"resumed from \S+/step_(\d+): step (\d+)", log)
    assert resumed, log[-3000:]
    assert 10 <= int(resumed.group(2)) < 150  # killed mid-training, after a checkpoint
    assert json.loads((run / "metrics.json").read_text())["val/accuracy"] > 0.85
    steps = [step for step, _ in read_scalars(run)["train/loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # one curve: the lost steps were purged


def test_a_stopped_worker_fails_the_job_within_the_rpc_timeout(tmp_path, job_factory):
    job = job_factory(LONG + ["runtime.rpc_timeout_s=5"], tmp_path / "run")
    job.wait_for_checkpoint()
    code, elapsed = job.stop_rank_until_exit(2)
    assert code != 0
    errors = [line for line in job.stderr_text().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, job.output()
    assert re.match(r"error: worker2 did not answer `\w+` within 5 s \(runtime.rpc_timeout_s\)", errors[0]), errors
    # 5 s RPC timeout, a 3 s ping, then the driver ends the stopped worker instead of torchrun's
    # 30 s wait: generous, but well short of what that wait alone would take.
    assert elapsed < 35, elapsed


def test_a_killed_parameter_server_trainer_is_restarted_and_the_job_resumes(tmp_path, job_factory):
    run = tmp_path / "run"
    # Driver, one server, two trainers; the servers save between epochs (25 steps each here).
    job = job_factory(LONG + ["mode=parameter_server", "ps.servers=1"], run, MAX_RESTARTS="1", NPROC="4")
    job.wait_for_checkpoint()
    os.kill(job.rank_pid(3), signal.SIGKILL)
    assert job.proc.wait(timeout=300) == 0, job.output()

    log = (run / "rank0.log").read_text()
    assert "torchrun restart 1 of at most 1" in log
    resumed = re.search(r"resumed from \S+/step_(\d+): step (\d+)", log)
    assert resumed and 0 < int(resumed.group(2)) < 75, log[-3000:]
    assert json.loads((run / "metrics.json").read_text())["val/accuracy"] > 0.8
