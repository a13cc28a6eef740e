"""The loss and accuracy of a batch: every engine and trainer computes them here.

A classifier's logits are [B, classes] against targets [B]; a sequence model's (models/gpt.py)
are [B, T, vocab] against targets [B, T], one prediction per position. Both are scored over
their predictions flattened to rows, so a loss averages over every predicted byte, and a
pipeline that divides its summed micro-batch losses by `predictions(targets)` of the whole
batch gets the same mean.
"""

import torch
import torch.nn.functional as F


# trainer.loss: name -> a function of (logits, targets, reduction=...), as torch.nn.functional's;
# config/schema.py LOSS_NAMES lists the same names for the config check (which loads no torch).
LOSSES = {"cross_entropy": F.cross_entropy}


def loss_of(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
            name: str = "cross_entropy") -> torch.Tensor:
    """The named loss (trainer.loss; config/validate.py checks the name) of a batch's logits."""
    if targets.dim() > 1:  # a sequence: every position's prediction is one row
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return LOSSES[name](logits, targets, reduction=reduction)


def correct_of(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """How many predictions the logits get right (top-1)."""
    return int((logits.argmax(-1) == targets).sum())


def predictions(targets: torch.Tensor) -> int:
    """The predictions a batch's loss averages over: one per sample, or one per position."""
    return targets.numel()
