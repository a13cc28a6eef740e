"""K-stage pipeline training ends with the same parameters as single-process training."""

import sysconfig

import pytest
import torch

from helpers.launching import launch
from helpers.reference import initial_state, train_locally

pytestmark = pytest.mark.timeout(240)

STEPS = ["experiment=smoke", "trainer.max_steps=6", "trainer.epochs=1"]


@pytest.mark.parametrize("schedule, micro_batches, nproc, balance", [
    # One row in the quick suite (the three-stage one), the others under -m slow.
    pytest.param("1f1b", 1, 3, "params", marks=pytest.mark.slow),
    pytest.param("1f1b", 4, 3, "params", marks=pytest.mark.slow),
    pytest.param("gpipe", 4, 3, "params", marks=pytest.mark.slow),
    # Three stages, the first holding only the parameter-free Flatten: it has no optimizer.
    ("1f1b", 4, 4, "[1,2,2]"),
])
def test_pipeline_matches_single_process(tmp_path, schedule, micro_batches, nproc, balance):
    overrides = STEPS + [f"pipeline.micro_batches={micro_batches}", f"pipeline.schedule={schedule}",
                         f"pipeline.balance={balance}"]
    result = launch(overrides, tmp_path / "run", NPROC=str(nproc))
    assert result.returncode == 0, result.stderr[-3000:]
    piped = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    reference = train_locally(overrides)
    assert piped.keys() == reference.keys()
    initial = initial_state(overrides)
    for name, value in reference.items():
        assert not torch.equal(value, initial[name]), f"{name} never trained: the test would prove nothing"
        torch.testing.assert_close(piped[name], value, rtol=0, atol=1e-5, msg=name)


# A small GPT on the standard library's json package (5 files): 2 stages of [embedding, block]
# and [block, norm, head], balanced by parameters.
GPT = ["experiment=gpt_text", f"data.root={sysconfig.get_paths()['stdlib']}/json", "model.context=32",
       "model.dim=32", "model.layers=2", "trainer.batch_size=8", "trainer.max_steps=6", "trainer.val_every=0",
       "data.val_limit=16", "data.sample.length=8"]


@pytest.mark.parametrize("schedule, micro_batches", [
    pytest.param("1f1b", 4, marks=pytest.mark.slow), pytest.param("1f1b", 1, marks=pytest.mark.slow),
    pytest.param("gpipe", 1, marks=pytest.mark.slow), pytest.param("gpipe", 4, marks=pytest.mark.slow),
])
def test_gpt_pipeline_matches_single_process(tmp_path, schedule, micro_batches):
    """The loss over every byte of a batch, computed per micro-batch on the last stage, trains
    what one process's mean over the whole batch trains."""
    overrides = GPT + [f"pipeline.micro_batches={micro_batches}", f"pipeline.schedule={schedule}"]
    result = launch(overrides, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layers per stage [2, 3]" in (tmp_path / "run" / "rank0.log").read_text()
    piped = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    reference = train_locally(overrides)
    initial = initial_state(overrides)
    assert piped.keys() == reference.keys()
    for name, value in reference.items():
        assert not torch.equal(value, initial[name]), f"{name} never trained: the test would prove nothing"
        torch.testing.assert_close(piped[name], value, rtol=0, atol=1e-5, msg=name)
