"""Sample ids -> a batch: decode what is not decoded yet, augment each sample seeded, stack.

The one path from ids to a batch, run in process and on data workers alike, so both give the
same tensors for the same (seed, epoch, ids) whatever decoded or cached the samples.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch.utils.data import Dataset

from rpc_train.loader.sources import SampleError, SampleSource
from rpc_train.loader.transforms import apply_seeded

ON_ERROR = ("raise", "skip")


@dataclass
class Batch:
    x: Union[torch.Tensor, Tuple[torch.Tensor, ...]]  # a tuple for samples of several tensors (clicks)
    y: torch.Tensor  # the labels: int64 classes, float32 clicks, or int64 [B, T] next bytes (text)
    ids: torch.Tensor  # int64: the samples in x, in order (the ids asked for, less any skipped)
    skipped: List[str] = field(default_factory=list)  # "<sample>: <reason>" of each sample left out


class BatchMaker:
    """Makes batches of `source`'s samples, each augmented by `transform` seeded by (seed, epoch, id).

    on_error="raise": a sample that does not decode fails the batch with its SampleError;
    "skip": it is left out and listed in `Batch.skipped`, and remembered so it is not read again.
    """

    def __init__(self, source: SampleSource, transform: Optional[Callable], seed: int, on_error: str = "raise"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: expected one of {', '.join(ON_ERROR)}")
        self.source, self.transform, self.seed, self.on_error = source, transform, seed, on_error
        # id -> "<sample>: <reason>": a file that did not decode will not the next time either.
        self.failed: Dict[int, str] = {}

    def decode_missing(self, ids: Iterable[int], have: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
        """The samples among `ids` that are not in `have`, decoded (failures skipped or raised)."""
        decoded = {}
        for i in map(int, ids):
            if i in have or i in decoded or i in self.failed:
                continue
            try:
                decoded[i] = self.source.decode(i)
            except SampleError as err:
                if self.on_error == "raise":
                    raise
                self.failed[i] = str(err)
        return decoded

    def make(self, ids: Iterable[int], epoch: int,
             raws: Optional[Dict[int, torch.Tensor]] = None) -> Tuple[Batch, Dict[int, torch.Tensor]]:
        """(the batch of `ids`, the samples this call decoded itself, for the caller to store).

        `raws`: samples already decoded (a cache's), used as they are.
        """
        ids = [int(i) for i in ids]
        raws = raws or {}
        decoded = self.decode_missing(ids, raws)
        kept = [i for i in ids if i in raws or i in decoded]
        skipped = [self.failed[i] for i in ids if i not in raws and i not in decoded]
        if not kept:
            raise SampleError(f"{self.source.name} batch of {len(ids)}", f"no sample decoded; first: {skipped[0]}")
        samples = [apply_seeded(self.transform, raws[i] if i in raws else decoded[i], self.seed, epoch, i) for i in kept]
        x = tuple(torch.stack(parts) for parts in zip(*samples)) if isinstance(samples[0], tuple) else torch.stack(samples)
        labels = [self.source.label(i) for i in kept]
        # int labels become int64, float ones (clicks) float32, as the in-memory datasets hold
        # them; a label of several targets (data=text: the next bytes) is a tensor, stacked.
        y = torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.tensor(labels)
        batch = Batch(x=x, y=y, ids=torch.tensor(kept, dtype=torch.int64), skipped=skipped)
        return batch, decoded


class SampleDataset(Dataset):
    """`source`'s samples augmented as BatchMaker augments them, for a torch DataLoader.

    Set `epoch` before iterating each epoch: the DataLoader's worker processes get their copy
    of the dataset when an epoch's iteration starts (unless persistent_workers=True).
    """

    def __init__(self, source: SampleSource, transform: Optional[Callable], seed: int):
        self.source, self.transform, self.seed = source, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        x = apply_seeded(self.transform, self.source.decode(i), self.seed, self.epoch, i)
        return x, self.source.label(i)
