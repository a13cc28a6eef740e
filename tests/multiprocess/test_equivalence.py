"""K-stage pipeline training ends with the same parameters as single-process training."""

import pytest
import torch

from helpers.launching import launch
from helpers.reference import initial_state, train_locally

pytestmark = pytest.mark.timeout(240)

STEPS = ["experiment=smoke", "trainer.max_steps=6", "trainer.epochs=1"]


@pytest.mark.parametrize("schedule, micro_batches, nproc, balance", [
    ("1f1b", 1, 3, "params"), pytest.param("1f1b", 4, 3, "params", marks=pytest.mark.slow), ("gpipe", 4, 3, "params"),
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
