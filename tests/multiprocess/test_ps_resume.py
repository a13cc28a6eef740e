"""mode=parameter_server checkpoints: a server's share on disk, and real launches that resume."""

import os
import shutil

import pytest
import torch

from helpers.hung_server import HANG_S, save_through_a_hung_server
from helpers.launching import launch, ok
from helpers.models import assert_same_parameters, exported_model
from rpc_train.checkpoint.store import damage
from rpc_train.config.compose import compose
from rpc_train.runtime.local_world import run_in_local_world

pytestmark = pytest.mark.timeout(240)

# NPROC=4, one server: 2 trainers x 32 samples a step, 640 / 64 = 10 steps an epoch.
PS = ["experiment=smoke", "mode=parameter_server", "ps.servers=1", "trainer.epochs=2"]
TOTAL, HALF, EPOCH = 16, 6, 10


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """TOTAL steps in one go; every_steps=4 saves at the end of epoch 0 (step 10) and the end."""
    run = tmp_path_factory.mktemp("ps_uninterrupted") / "run"
    ok(launch(PS + [f"trainer.max_steps={TOTAL}", "checkpoint.every_steps=4"], run, NPROC="4"))
    return run


@pytest.fixture(scope="module")
def first_part(tmp_path_factory):
    """The same job stopped after HALF steps, in the middle of epoch 0 (saved at the end)."""
    run = tmp_path_factory.mktemp("ps_first_part") / "run"
    ok(launch(PS + [f"trainer.max_steps={HALF}"], run, NPROC="4"))
    return run


@pytest.mark.slow
def test_sync_resume_mid_epoch_ends_with_the_same_parameters_bit_for_bit(tmp_path, first_part, uninterrupted):
    assert set(os.listdir(uninterrupted / "checkpoints")) == {f"step_{EPOCH}", f"step_{TOTAL}"}
    run = tmp_path / "run"
    shutil.copytree(first_part, run)
    result = ok(launch(PS + [f"trainer.max_steps={TOTAL}"], run, NPROC="4"))
    assert f"resumed from {run}/checkpoints/step_{HALF}: step {HALF} (epoch 0, {HALF} batches" in result.stdout
    assert_same_parameters(run, uninterrupted)
    assert set(os.listdir(run / "checkpoints")) == {f"step_{HALF}", f"step_{TOTAL}"}
    assert damage(str(run / "checkpoints" / f"step_{TOTAL}")) is None


@pytest.mark.slow
def test_sync_resume_from_an_epoch_end_checkpoint_is_bit_for_bit(tmp_path, uninterrupted):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    shutil.rmtree(run / "checkpoints" / f"step_{TOTAL}")
    (run / "model.pt").unlink()
    result = ok(launch(PS + [f"trainer.max_steps={TOTAL}"], run, NPROC="4"))
    assert f"resumed from {run}/checkpoints/step_{EPOCH}: step {EPOCH} (epoch 1, 0 batches" in result.stdout
    assert_same_parameters(run, uninterrupted)


@pytest.mark.slow
def test_async_resume_goes_on_from_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    async_ps = PS + ["ps.sync=false", "ps.max_staleness=4", "optim.momentum=0.0"]
    ok(launch(async_ps + [f"trainer.max_steps={HALF}"], run, NPROC="4"))
    result = ok(launch(async_ps + [f"trainer.max_steps={TOTAL}"], run, NPROC="4"))
    assert f"resumed from {run}/checkpoints/step_{HALF}: step {HALF}" in result.stdout
    assert set(os.listdir(run / "checkpoints")) == {f"step_{HALF}", f"step_{TOTAL}"}
    assert all(torch.isfinite(t).all() for t in exported_model(run).values() if t.is_floating_point())


def test_a_hung_server_fails_a_checkpoint_save_within_the_rpc_timeout(tmp_path):
    # Saves run with no trainer watchdog: only the RPC timeout stands between a stuck server and
    # a driver that waits for ever.
    cfg = compose(["mode=parameter_server", "runtime.rpc_timeout_s=2"])
    waited, error = run_in_local_world(cfg, 2, save_through_a_hung_server, (str(tmp_path),), timeout_s=120)
    assert waited is not None and waited < HANG_S, "the save waited for the hung server"
    assert "timeout" in error.lower() or "timed out" in error.lower(), error
