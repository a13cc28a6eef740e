"""docs/slurm.sbatch through a real Slurm (munged, slurmctld, slurmd on loopback, one node):
sbatch runs srun, srun runs launch.sh, launch.sh takes its layout and run dir from the job."""

import json
import os
import re
import subprocess
import sys

import pytest

from helpers.events import read_scalars
from helpers.launching import REPO
from helpers.slurm import Cluster, missing_programs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def needs_slurm():
    """Skip without slurm-wlm (or root, which runs the daemons), except in CI, which installs it."""
    missing = missing_programs()
    why = (f"slurm-wlm is not installed (no {', '.join(missing)}): apt-get install slurm-wlm" if missing
           else None if os.geteuid() == 0 else "the Slurm daemons run as root here")
    if why and os.environ.get("CI") == "true":
        pytest.fail(f"{why}; .ci/run installs it, so CI must have it")
    if why:
        pytest.skip(why)


@pytest.fixture
def cluster(tmp_path):
    needs_slurm()
    slurm = Cluster(tmp_path / "slurm")
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


@pytest.fixture
def checkout(tmp_path):
    """The checkout's root seen from elsewhere: links to what a job needs, so the job's
    outputs/ lands in tmp_path (job ids restart at 1 with each fresh controller, and an old
    outputs/slurm-1 would be resumed)."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("launch.sh", "rpc_train", "models", "conf", "docs"):
        (root / name).symlink_to(REPO / name)
    return root


def test_sbatch_runs_the_smoke_experiment_in_the_jobs_run_dir(cluster, checkout, tmp_path):
    # The documented command, one node; NPROC comes from --cpus-per-task (2, which any CI
    # machine has), the run dir from the job id.
    env = {k: v for k, v in cluster.env.items() if k not in ("NPROC", "NNODES", "NODE_RANK", "RUN_DIR")}
    output = tmp_path / "job.out"
    result = subprocess.run(
        ["sbatch", "--wait", "--nodes=1", "--cpus-per-task=2", f"--output={output}", "docs/slurm.sbatch",
         "experiment=smoke"], cwd=checkout, env={**env, "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=200)
    job_output = output.read_text() if output.exists() else ""
    assert result.returncode == 0, result.stdout + result.stderr + job_output[-3000:] + cluster.logs()
    job_id = re.fullmatch(r"Submitted batch job (\d+)\n", result.stdout).group(1)
    run_dir = checkout / "outputs" / f"slurm-{job_id}"
    assert f"rpc_train: run dir outputs/slurm-{job_id}" in job_output
    assert sorted(p.name for p in run_dir.glob("rank*.log")) == ["rank0.log", "rank1.log"]  # NPROC=2
    assert json.loads((run_dir / "metrics.json").read_text())["val/accuracy"] > 0.5
    assert len(read_scalars(run_dir)["train/loss"]) == 4  # 20 steps, logged every 5
    # Slurm saw the job end well, not only sbatch.
    state = cluster.run("scontrol", "show", "job", job_id).stdout
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, state
