"""A trainer's place in the data order, for workers that resume from a checkpoint.

The parameter-server and hybrid trainers each own a loader whose shuffling generator is seeded
alike on every process. A checkpoint records that generator's state when the epoch began and
the batches of the epoch done; `DataOrder` gives the epoch's batches from there and reports
the state to save.
"""

import itertools
from typing import Iterable, Optional, Tuple

import torch
from torch.utils.data import DataLoader


class DataOrder:
    def __init__(self, loader: DataLoader):
        self.loader = loader
        self._epoch_start: Optional[torch.Tensor] = None  # the generator's state when the last epoch began
        self._resume_at: Optional[Tuple[Optional[torch.Tensor], int]] = None

    def resume(self, loader_state: Optional[torch.Tensor], batch: int) -> None:
        """The next epoch starts from `loader_state` (None: from where the generator is) and
        skips its first `batch` batches."""
        self._resume_at = (loader_state, batch)

    def epoch(self) -> Iterable:
        """This epoch's batches. Iterate it with a for loop to its end or a break, as one
        process runs an epoch: a full epoch runs the sampler to its end, where RandomSampler
        draws from the seeded generator once more; stopping after the last batch instead would
        shift every later epoch's order."""
        batches: Iterable = self.loader
        if self._resume_at is not None:
            (state, skip), self._resume_at = self._resume_at, None
            if state is not None:
                self.loader.generator.set_state(state)
            batches = itertools.islice(self.loader, skip, None)
        self._epoch_start = self.loader.generator.get_state()
        return batches

    def state(self, at_epoch_start: bool) -> Optional[torch.Tensor]:
        """The position to save: the generator when the last epoch began, or now (after it)."""
        return self._epoch_start if at_epoch_start else self.loader.generator.get_state()
