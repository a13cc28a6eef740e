"""A trainer's place in the data order, for workers that resume from a checkpoint.

The parameter-server and hybrid trainers each own a loader whose shuffling generator is seeded
alike on every process. A checkpoint records that generator's state when the epoch began and
the batches of the epoch done; `DataOrder` gives the epoch's batches from there and reports
the state to save.
"""

from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from rpc_train.loader.stream import batches_from


class DataOrder:
    def __init__(self, loader: DataLoader):
        self.loader = loader
        self._epoch_start: Optional[torch.Tensor] = None  # the generator's state when the last epoch began
        self._resume_at: Optional[Tuple[Optional[torch.Tensor], int]] = None

    def resume(self, loader_state: Optional[torch.Tensor], batch: int) -> None:
        """The next epoch starts from `loader_state` (None: from where the generator is) and
        skips its first `batch` batches."""
        self._resume_at = (loader_state, batch)

    def epoch(self, number: int, steps: int) -> Iterator:
        """At most `steps` batches of epoch `number` (the number seeds the data service's
        augmentations), none asked for beyond them. An epoch run to its last batch also runs the
        loader to its end, as one process's epoch does: RandomSampler draws from the seeded
        generator once more when it runs out, and every later epoch's order starts after that."""
        skip = 0
        if self._resume_at is not None:
            (state, skip), self._resume_at = self._resume_at, None
            if state is not None:
                self.loader.generator.set_state(state)
        self._epoch_start = self.loader.generator.get_state()
        batches = iter(batches_from(self.loader, number, skip))
        for taken, batch in enumerate(batches, start=1):
            yield batch
            if taken == steps:
                if skip + taken == len(self.loader):
                    for _ in batches:
                        raise RuntimeError("the training loader gave more batches than its len()")
                return

    def state(self, at_epoch_start: bool) -> Optional[torch.Tensor]:
        """The position to save: the generator when the last epoch began, or now (after it)."""
        return self._epoch_start if at_epoch_start else self.loader.generator.get_state()
