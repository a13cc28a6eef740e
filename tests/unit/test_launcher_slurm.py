"""launch.sh inside a Slurm job, without a cluster: Slurm's variables as srun sets them, the real
`scontrol` to expand node lists, and LAUNCH_DRY_RUN=1 to read the torchrun command it would run."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from helpers.launching import REPO

pytestmark = pytest.mark.timeout(60)

# Node 1 of a two-node job step, one task per node, as srun exports it.
STEP = {"SLURM_JOB_ID": "42", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_STEP_NODELIST": "node[07-08]",
        "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2"}
LAUNCHER_VARS = ("NPROC", "NNODES", "NODE_RANK", "RDZV_ENDPOINT", "RDZV_PORT", "RUN_DIR", "LAUNCH_DRY_RUN")


@pytest.fixture
def slurm_conf(tmp_path):
    """scontrol reads a slurm.conf before anything; expanding a host list needs no controller."""
    if shutil.which("scontrol") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("scontrol is missing; .ci/run installs slurm-wlm, so CI must have it")
        pytest.skip("slurm-wlm is not installed (no scontrol): apt-get install slurm-wlm")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=unit\nSlurmctldHost=localhost\n")
    return str(conf)


def dry_run(*args, path=os.environ["PATH"], **env):
    """launch.sh's dry run in a clean environment (no Slurm or launcher variables of this shell)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_VARS}
    return subprocess.run([shutil.which("bash"), str(REPO / "launch.sh"), "experiment=smoke", *args], cwd=REPO,
                          env={**base, "PATH": path, "PYTHON": sys.executable, "LAUNCH_DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=50)


def command(result):
    """The torchrun arguments (after the interpreter) and the run dir of a dry run."""
    assert result.returncode == 0, result.stderr
    run_dir, line = result.stdout.splitlines()
    assert run_dir.startswith("run dir: ") and line.startswith("command: ")
    return shlex.split(line.removeprefix("command: "))[1:], run_dir.removeprefix("run dir: ")


def rendezvous(argv):
    return {flag: argv[argv.index(flag) + 1] for flag in ("--nnodes", "--node-rank", "--rdzv-endpoint")}


def test_each_node_of_a_step_takes_its_layout_and_one_run_dir_from_slurm(slurm_conf):
    for node in ("0", "1"):
        argv, run_dir = command(dry_run(**{**STEP, "SLURM_NODEID": node}, SLURM_CONF=slurm_conf))
        assert rendezvous(argv) == {"--nnodes": "2", "--node-rank": node, "--rdzv-endpoint": "node07:29500"}
        assert run_dir == "outputs/slurm-42" and "hydra.run.dir=outputs/slurm-42" in argv
        assert argv[argv.index("--nproc-per-node") + 1] == "3" and argv[-1] == "experiment=smoke"


def test_the_rendezvous_is_on_the_steps_first_node_at_rdzv_port(slurm_conf):
    # A step on part of the allocation: SLURM_NNODES and SLURM_NODEID count the step's nodes.
    step = {**STEP, "SLURM_JOB_NODELIST": "node[07-09],gpu1", "SLURM_STEP_NODELIST": "node[08-09]"}
    argv, _ = command(dry_run(**step, RDZV_PORT="29600", SLURM_CONF=slurm_conf))
    assert rendezvous(argv)["--rdzv-endpoint"] == "node08:29600"
    # Without a step list (an older srun), the job's.
    step = {k: v for k, v in STEP.items() if k != "SLURM_STEP_NODELIST"}
    argv, _ = command(dry_run(**{**step, "SLURM_JOB_NODELIST": "gpu[3,5]"}, SLURM_CONF=slurm_conf))
    assert rendezvous(argv)["--rdzv-endpoint"] == "gpu3:29500"


def test_values_set_by_the_user_win_over_slurms():
    # No scontrol needed when the endpoint is given.
    argv, run_dir = command(dry_run(**STEP, NODE_RANK="0", RDZV_ENDPOINT="head:1234", RUN_DIR="/shared/x", NPROC="4"))
    assert rendezvous(argv) == {"--nnodes": "2", "--node-rank": "0", "--rdzv-endpoint": "head:1234"}
    assert run_dir == "/shared/x" and argv[argv.index("--nproc-per-node") + 1] == "4"
    # A user who sets NNODES lays the job out alone: no job step is required (a salloc shell).
    shell = {k: v for k, v in STEP.items() if not k.startswith("SLURM_STEP")}
    argv, _ = command(dry_run(**shell, NNODES="2", RDZV_ENDPOINT="head:1234"))
    assert rendezvous(argv) == {"--nnodes": "2", "--node-rank": "1", "--rdzv-endpoint": "head:1234"}


def test_a_one_node_job_runs_standalone_in_the_jobs_run_dir():
    # An sbatch script on one node may run launch.sh itself, without srun or a step.
    argv, run_dir = command(dry_run(SLURM_JOB_ID="7", SLURM_NNODES="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="n1"))
    assert "--standalone" in argv and run_dir == "outputs/slurm-7"


@pytest.mark.parametrize("env, message", [
    ({"SLURM_STEP_ID": None},
     "error: SLURM_NNODES=2 outside a job step: start launch.sh once per node with srun --ntasks-per-node=1"),
    ({"SLURM_STEP_NUM_TASKS": "4"},
     "error: SLURM_STEP_NUM_TASKS=4 on 2 nodes: launch.sh runs once per node (srun --ntasks-per-node=1)"),
    ({"RDZV_PORT": "70000"}, "error: RDZV_PORT=70000: must be a port number from 1 to 65535"),
    ({"SLURM_JOB_NODELIST": None, "SLURM_STEP_NODELIST": None}, "error: SLURM_JOB_NODELIST is not set"),
])
def test_a_bad_slurm_layout_is_one_line_and_exit_2(env, message):
    step = {k: v for k, v in {**STEP, **env}.items() if v is not None}
    result = dry_run(**step)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


def test_a_missing_scontrol_is_one_line_and_exit_2(tmp_path):
    # An empty PATH: launch.sh is run by bash and the interpreter by its full path.
    result = dry_run(**STEP, path=str(tmp_path))
    assert result.returncode == 2 and result.stderr == (
        "error: scontrol not found on PATH: it expands SLURM_STEP_NODELIST=node[07-08] into the rendezvous host"
        " (or set RDZV_ENDPOINT=host:port)\n")


def test_a_failing_scontrol_is_one_line_and_exit_2(tmp_path, slurm_conf):
    # scontrol without a usable slurm.conf (an empty one: a missing one is retried for 60 s).
    empty = tmp_path / "empty.conf"
    empty.write_text("")
    result = dry_run(**STEP, SLURM_CONF=str(empty))
    assert result.returncode == 2 and result.stderr == (
        "error: scontrol show hostnames node[07-08] (SLURM_STEP_NODELIST) failed:"
        " scontrol: fatal: Unable to process configuration file\n")
