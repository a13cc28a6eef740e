"""Checkpoints for real: launches that save, resume (also on another layout), skip a damaged
checkpoint, and stop on a NaN loss. Process kills and stalls are in test_faults.py."""

import json
import os
import re
import shutil

import pytest
import torch

from helpers.events import read_scalars
from helpers.launching import launch, ok
from helpers.models import assert_same_parameters, exported_model
from rpc_train.checkpoint.store import damage

pytestmark = pytest.mark.timeout(300)

STEPS = ["experiment=smoke", "trainer.epochs=2"]  # the smoke preset has 20 batches an epoch
TOTAL = 26  # past the end of epoch 0, so a resumed run must also get epoch 1's order right
HALF = 6


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """TOTAL steps in one go, saving every 4 steps (so step_24 and step_26 are kept)."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    ok(launch(STEPS + [f"trainer.max_steps={TOTAL}", "checkpoint.every_steps=4"], run))
    return run


@pytest.fixture(scope="module")
def first_part(tmp_path_factory):
    """The same job stopped after HALF steps (a checkpoint is always written at the end)."""
    run = tmp_path_factory.mktemp("first_part") / "run"
    ok(launch(STEPS + [f"trainer.max_steps={HALF}"], run))
    return run


def test_a_resumed_run_ends_with_the_same_parameters_bit_for_bit(tmp_path, first_part, uninterrupted):
    run = tmp_path / "run"
    shutil.copytree(first_part, run)
    result = ok(launch(STEPS + [f"trainer.max_steps={TOTAL}"], run))  # checkpoint.resume=auto: the default
    assert f"resumed from {run}/checkpoints/step_{HALF}: step {HALF} (epoch 0, {HALF} batches" in result.stdout
    assert_same_parameters(run, uninterrupted)
    assert set(os.listdir(run / "checkpoints")) == {f"step_{HALF}", f"step_{TOTAL}"}
    # One TensorBoard curve: the first part's last point (HALF), then the resumed part's.
    assert [step for step, _ in read_scalars(run)["train/loss"]] == [5, HALF, 10, 15, 20, 25, TOTAL]


@pytest.mark.slow
def test_a_damaged_checkpoint_is_skipped_with_a_warning(tmp_path, uninterrupted):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    (run / "model.pt").unlink()
    bad = run / "checkpoints" / f"step_{TOTAL}" / "stage1.pt"
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    interrupted = run / "checkpoints" / "step_28"  # a save cut short: files, no manifest
    interrupted.mkdir()
    (interrupted / "stage0.pt").write_bytes(b"partial")

    result = ok(launch(STEPS + [f"trainer.max_steps={TOTAL}"], run))
    warnings = [line for line in result.stdout.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, warnings
    assert f"step_{TOTAL}" in warnings[0] and "stage1.pt fails its sha256 check" in warnings[0]
    assert f"resumed from {run}/checkpoints/step_24: step 24" in result.stdout
    assert_same_parameters(run, uninterrupted)  # steps 25 and 26 trained again, identically
    assert set(os.listdir(run / "checkpoints")) == {"step_24", f"step_{TOTAL}"}
    assert damage(str(run / "checkpoints" / f"step_{TOTAL}")) is None


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    # lr=1e6 on the MLP: loss 2.3 at step 1, ~1e20 at step 2, then NaN at step 3, every time.
    run = tmp_path / "run"
    result = launch(["experiment=smoke", "optim.lr=1e6", "checkpoint.every_steps=1", "checkpoint.keep=10"], run)
    assert result.returncode != 0
    assert re.search(r"error: non-finite loss \((nan|inf)\) at step 3; .*set trainer.skip_nonfinite=true",
                     result.stderr), result.stderr[-3000:]
    assert set(os.listdir(run / "checkpoints")) == {"step_1", "step_2"}
    assert damage(str(run / "checkpoints" / "step_2")) is None
    assert not (run / "model.pt").exists()


@pytest.mark.slow
def test_skip_nonfinite_skips_and_counts_the_steps(tmp_path):
    run = tmp_path / "run"
    ok(launch(["experiment=smoke", "optim.lr=1e6", "trainer.skip_nonfinite=true",
               "checkpoint.every_steps=2", "checkpoint.keep=20"], run))
    assert read_scalars(run)["train/skipped_steps"][-1] == (20, 18.0)  # steps 3..20
    # No optimizer stepped after step 2, so the model is still step 2's.
    at_step_2 = {}
    for stage in ("stage0.pt", "stage1.pt"):
        at_step_2.update(torch.load(run / "checkpoints" / "step_2" / stage, weights_only=True)["tensors"])
    final = exported_model(run)
    for name, value in at_step_2.items():
        assert torch.equal(final[name], value), name


@pytest.mark.slow
def test_a_two_stage_checkpoint_resumes_on_three_stages(tmp_path, first_part, uninterrupted):
    run = tmp_path / "run"
    checkpoint = first_part / "checkpoints" / f"step_{HALF}"
    result = ok(launch(STEPS + [f"trainer.max_steps={TOTAL}", "pipeline.stages=3", f"checkpoint.resume={checkpoint}"],
                       run, NPROC="4"))
    assert "pipeline: 3 stages" in result.stdout and f"resumed from {checkpoint}" in result.stdout
    manifest = json.loads((run / "checkpoints" / f"step_{TOTAL}" / "manifest.json").read_text())
    assert manifest["layout"]["stages"] == 3
    saved = json.loads((checkpoint / "manifest.json").read_text())
    assert saved["layout"]["stages"] == 2 and saved["tensors"].keys() == manifest["tensors"].keys()
    mine, theirs = exported_model(run), exported_model(uninterrupted)
    for name, value in theirs.items():
        torch.testing.assert_close(mine[name], value, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path, first_part):
    run = tmp_path / "run"
    result = launch(STEPS + ["model.hidden=[256,128]", f"checkpoint.resume={first_part}"], run)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "holds a different model" in errors[0] and "missing 2: 3.bias, 3.weight" in errors[0]
    assert not (run / "checkpoints").exists()
