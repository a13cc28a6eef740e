"""A non-editable install (a wheel, conf/ inside it) composes and trains from another directory."""

import os
import subprocess
import sys

import pytest

from helpers.launching import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def run(cmd, cwd, timeout=300, **env):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


def test_a_wheel_install_composes_and_trains_from_another_directory(tmp_path):
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The system site lends torch, hydra and setuptools: nothing is downloaded, only rpc_train built.
    assert run([sys.executable, "-m", "venv", "--system-site-packages", venv], tmp_path).returncode == 0
    python = venv / "bin" / "python"
    # The wheel is built by this interpreter's setuptools (the venv's bundled one may be too old
    # to build one), then installed into the venv like any downloaded wheel.
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
                 REPO], tmp_path)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("rpc_train-*.whl")
    installed = run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], tmp_path)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]

    where = run([python, "-c", "import rpc_train; print(rpc_train.__file__)"], elsewhere)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr  # the wheel, not the checkout

    shown = run([python, "-m", "rpc_train.train", "--cfg", "job", "experiment=smoke"], elsewhere)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "_target_: models.mlp.MLP" in shown.stdout and "max_steps: 20" in shown.stdout

    run_dir = tmp_path / "run"
    trained = run([python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                   "-m", "rpc_train.train", "experiment=smoke", f"hydra.run.dir={run_dir}"], elsewhere,
                  OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert (run_dir / "model.pt").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert not (elsewhere / "outputs").exists()  # the run dir given was used
