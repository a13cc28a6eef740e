"""Which samples make each batch: the seeded order the in-memory loaders draw, as sample ids.

A consumer of the data service never holds the data set, only its size: it draws the ids of
each batch from a loader over the ids themselves (`IndexDataset`), built exactly as the
in-memory loaders are (data/datasets.py), so the same seed gives the same batches either way,
and a checkpoint's generator state means the same position in both.
"""

from torch.utils.data import Dataset

from rpc_train.data.datasets import make_trainer_loader, train_loader_of, val_loader_of


class IndexDataset(Dataset):
    """Sample i is its own id: a loader over it yields the ids a loader of the data would draw."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> int:
        return i


def id_loaders(sizes: dict, batch_size: int, seed: int, trainer: int = 0, trainers: int = 0):
    """(train, validation) loaders of sample ids for a split of `sizes["train"]` and
    `sizes["val"]` samples: the pipeline driver's order, or with `trainers`, trainer
    `trainer`'s slice of each batch (the parameter-server and hybrid trainers' order)."""
    train = IndexDataset(sizes["train"])
    if trainers:
        train_ids = make_trainer_loader(train, batch_size, trainer, trainers, seed)
    else:
        train_ids = train_loader_of(train, batch_size, seed)
    return train_ids, val_loader_of(IndexDataset(sizes["val"]), batch_size)
