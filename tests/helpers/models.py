"""The trained models runs export (model.pt), compared."""

from pathlib import Path

import torch


def exported_model(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)


def assert_same_parameters(run: Path, reference: Path) -> None:
    """The two runs' exported models are equal, bit for bit."""
    mine, theirs = exported_model(run), exported_model(reference)
    assert mine.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(mine[name], value), name
