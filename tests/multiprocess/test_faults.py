"""Real faults in a running job: a worker killed with SIGKILL, and one stopped with SIGSTOP."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.events import read_scalars
from helpers.launching import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

# Full digits (50 batches an epoch): long enough to be caught mid-training after a checkpoint.
LONG = ["experiment=smoke", "data.limit=null", "trainer.max_steps=null", "trainer.epochs=3",
        "checkpoint.every_steps=10"]


class Job:
    """./launch.sh in the background, in its own session so cleanup can end all of it."""

    def __init__(self, args, run_dir: Path, **env: str):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True)
        self.stdout, self.stderr = open(run_dir.parent / "stdout", "w+"), open(run_dir.parent / "stderr", "w+")
        full_env = {**os.environ, "RUN_DIR": str(run_dir), "PYTHON": sys.executable, **env}
        self.proc = subprocess.Popen([str(REPO / "launch.sh"), *args], cwd=REPO, env=full_env,
                                     stdout=self.stdout, stderr=self.stderr, start_new_session=True)

    def wait_for_checkpoint(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not list(self.run_dir.glob("checkpoints/step_*/manifest.json")):
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)

    def rank_pid(self, rank: int) -> int:
        """The process of `rank` in this job: torchrun's children carry RUN_DIR and RANK."""
        wanted = {f"RUN_DIR={self.run_dir}".encode(), f"RANK={rank}".encode()}
        for proc in Path("/proc").iterdir():
            try:
                environ = set((proc / "environ").read_bytes().split(b"\0"))
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if wanted <= environ and b"rpc_train.train" in cmdline and b"torch.distributed.run" not in cmdline:
                return int(proc.name)
        raise AssertionError(f"no process for rank {rank}")

    def output(self) -> str:
        self.stdout.seek(0)
        self.stderr.seek(0)
        return self.stdout.read()[-3000:] + self.stderr.read()[-3000:]

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.stdout.close()
        self.stderr.close()


@pytest.fixture
def job_factory():
    jobs = []

    def start(*args, **kwargs):
        jobs.append(Job(*args, **kwargs))
        return jobs[-1]

    yield start
    for job in jobs:
        job.close()


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
    pid = job.rank_pid(2)
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        code = job.proc.wait(timeout=120)
        elapsed = time.monotonic() - stopped
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGCONT)
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
