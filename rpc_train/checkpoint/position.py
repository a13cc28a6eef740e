"""The training loop's position: what a checkpoint records so that a resumed run sees the same batches."""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Position:
    """Where training stands: what a checkpoint records so a resumed run sees the same batches."""

    # Training steps done: batches trained on, including those skipped for a non-finite loss
    # (trainer.skip_nonfinite). The LR scheduler advances only on applied steps, as the
    # optimizer does, so a skipped step leaves the learning rate where it was.
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of `epoch` done
    # The shuffling generator's state when `epoch` began; None until an epoch has begun.
    loader_state: Optional[torch.Tensor] = None
    skipped: int = 0  # steps skipped for a non-finite loss (trainer.skip_nonfinite)
