"""The byte-level GPT (experiment=gpt_text) in every training mode it fits, launched for real.

The pipeline's equivalence with one process is in test_equivalence.py.
"""

import sysconfig

import pytest
import torch

from helpers.events import read_scalars, read_texts
from helpers.launching import launch, ok
from helpers.reference import initial_state, train_locally
from rpc_train.config.compose import compose

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

# The standard library's json package (5 files): a corpus small enough to load in no time.
SMALL = ["experiment=gpt_text", f"data.root={sysconfig.get_paths()['stdlib']}/json", "model.context=32",
         "model.dim=32", "model.layers=2", "trainer.batch_size=8", "data.val_limit=16", "data.sample.length=8"]


def assert_trained_like(run_dir, reference, overrides) -> None:
    trained = torch.load(run_dir / "model.pt", weights_only=True)
    initial = initial_state(overrides)
    assert trained.keys() == reference.keys()
    for name, value in reference.items():
        assert not torch.equal(value, initial[name]), f"{name} never trained: the test would prove nothing"
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-5, msg=name)


def test_the_preset_shortened_learns_and_logs_bits_per_byte_and_samples(tmp_path):
    """The preset itself (the standard library, its model), 90 steps validated every 30."""
    run = tmp_path / "run"
    ok(launch(["experiment=gpt_text", "trainer.max_steps=90", "trainer.val_every=30", "trainer.log_every=10"], run,
              timeout=280))
    scalars = read_scalars(run)
    bits = [v for _, v in scalars["val/bits_per_byte"]]
    assert [s for s, _ in scalars["val/bits_per_byte"]] == [30, 60, 90]
    assert bits[0] < 8.0 and bits[2] < bits[0], bits
    nats = [v for _, v in scalars["val/loss"]]
    torch.testing.assert_close(torch.tensor(bits), torch.tensor(nats) / torch.log(torch.tensor(2.0)))
    assert all(v > 0 for _, v in scalars["throughput/tokens_per_s"])
    samples = read_texts(run)["val/sample"]
    assert [s for s, _ in samples] == [30, 60, 90]
    prompt = compose(["experiment=gpt_text"]).data.sample.prompt
    assert all(text.lstrip().startswith(prompt.strip()) for _, text in samples), samples
    assert "layers per stage [3, 4]" in (run / "rank0.log").read_text()


def test_sync_parameter_server_matches_single_process(tmp_path):
    """Driver, 1 server, 2 trainers at batch b: what one process trains at batch 2b."""
    overrides = SMALL + ["mode=parameter_server", "ps.servers=1", "trainer.max_steps=5", "trainer.val_every=0"]
    ok(launch(overrides, tmp_path / "run", NPROC="4"))
    b = compose(overrides).trainer.batch_size
    reference = train_locally([*overrides, f"trainer.batch_size={2 * b}"])
    assert_trained_like(tmp_path / "run", reference, overrides)
    assert "val/bits_per_byte" in read_scalars(tmp_path / "run")
    assert "val/sample" in read_texts(tmp_path / "run")


def test_data_service_gives_the_batches_of_one_process(tmp_path):
    """A data worker cuts the windows; the pipeline trains what one process loading them trains."""
    overrides = SMALL + ["trainer.max_steps=6", "trainer.val_every=3", "pipeline.micro_batches=2"]
    ok(launch([*overrides, "loader=service", "loader.workers=1"], tmp_path / "run", NPROC="4"))
    assert_trained_like(tmp_path / "run", train_locally(overrides), overrides)
    assert [s for s, _ in read_scalars(tmp_path / "run")["val/bits_per_byte"]] == [3, 6]
