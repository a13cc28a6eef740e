"""The loss and accuracy of a batch: every engine and trainer computes them here."""

import torch
import torch.nn.functional as F


# trainer.loss: name -> a function of (logits, targets, reduction=...), as torch.nn.functional's;
# config/schema.py LOSS_NAMES lists the same names for the config check (which loads no torch).
LOSSES = {"cross_entropy": F.cross_entropy}


def loss_of(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
            name: str = "cross_entropy") -> torch.Tensor:
    """The named loss (trainer.loss; config/validate.py checks the name) of a batch's logits."""
    return LOSSES[name](logits, targets, reduction=reduction)


def correct_of(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """How many rows the logits classify right (top-1)."""
    return int((logits.argmax(1) == targets).sum())
