"""The loss and accuracy of a batch: every engine and trainer computes them here."""

import torch
import torch.nn.functional as F


def loss_of(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of class logits against integer labels."""
    return F.cross_entropy(logits, targets, reduction=reduction)


def correct_of(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """How many rows the logits classify right (top-1)."""
    return int((logits.argmax(1) == targets).sum())
