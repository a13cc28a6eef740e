"""Datasets as in-memory tensors, split and batched identically on every process.

The pipeline driver and a single-process reference run both call `load_datasets` and
`make_loaders` with the same seed, so their validation sets and batch orders match exactly.
"""

import os

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, TensorDataset

from rpc_train.data.files import check_available
from rpc_train.config.errors import ConfigError, first_line

# Per-channel (mean, std) of the training images scaled to [0, 1]: the usual published values.
# digits' pair is measured over all 1797 images / 16, so it does not depend on the split.
CHANNEL_STATS = {
    "digits": ((0.3053,), (0.3760,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# Largest raw pixel value, mapped to 1.0 before standardising.
_PIXEL_MAX = {"digits": 16.0, "mnist": 255.0, "fashion_mnist": 255.0, "cifar10": 255.0}
TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


def load_datasets(data, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation): float32 inputs [N, C, H, W] shaped like `data.shape`, int64 labels
    (data=text: byte windows, data/text.py).

    Validation is a seeded `data.val_fraction` of the training files (the test split is never
    read); `data.limit` then keeps the first N training samples.
    """
    check_available(data)
    if data.name == "text":
        from rpc_train.data.text import load_text

        return load_text(data, seed)
    inputs, labels = _load_raw(data, seed)
    _check_matches_conf(data, inputs, labels)
    train_idx, val_idx = split_train_val(data, len(labels), seed)
    # Index before normalising: with a limit, a smoke run on CIFAR converts only what it keeps.
    return (
        TensorDataset(normalise(data.name, inputs[train_idx]), labels[train_idx]),
        TensorDataset(normalise(data.name, inputs[val_idx]), labels[val_idx]),
    )


def make_loaders(data, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """(train, validation) loaders; the same seed gives the same batch order in any process."""
    train, val = load_datasets(data, seed)
    if not 1 <= batch_size <= len(train):
        raise ConfigError(
            f"trainer.batch_size={batch_size} must be between 1 and the {len(train)} training "
            f"samples of data={data.name} (after val_fraction and limit)"
        )
    return train_loader_of(train, batch_size, seed), val_loader_of(val, batch_size)


def train_loader_of(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    """The seeded training order: over a data set's samples, or over their ids (the data
    service's consumers draw ids this way, so they see the batches this loader would)."""
    # drop_last: micro-batching splits every batch into equal parts, so batches must be full.
    # num_workers=0: the data is already in memory and the driver gets a single core.
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed), num_workers=0)


def val_loader_of(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=0)


class _BatchSlices(Sampler):
    """Slice `part` of `parts` equal slices of every batch that `batches` yields."""

    def __init__(self, batches: BatchSampler, part: int, parts: int):
        self.batches, self.part, self.parts = batches, part, parts

    def __iter__(self):
        for batch in self.batches:
            size = len(batch) // self.parts
            yield batch[self.part * size:(self.part + 1) * size]

    def __len__(self) -> int:
        return len(self.batches)


def make_trainer_loader(train: Dataset, batch_size: int, trainer: int, trainers: int,
                        seed: int) -> DataLoader:
    """Trainer `trainer`'s disjoint shard of the training set, `batch_size` samples a step.

    Step t of trainer i is the slice [i*b, (i+1)*b) of the batch t that `make_loaders` with
    batch N*b draws, epoch after epoch: N trainers together see exactly what one process with
    batch N*b sees (the parameter-server sync equivalence rests on this). Sampler and loader
    share one seeded generator, as `DataLoader(shuffle=True, generator=g)` does, so both draw
    from it in the same order as that loader.
    """
    generator = torch.Generator().manual_seed(seed)
    whole = BatchSampler(RandomSampler(train, generator=generator), batch_size * trainers, drop_last=True)
    return DataLoader(train, batch_sampler=_BatchSlices(whole, trainer, trainers),
                      generator=generator, num_workers=0)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices of a seeded random split; validation holds at least 1."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise ConfigError(f"data.val_fraction={val_fraction} leaves no training samples out of {n}")
    # An explicit CPU generator: the global RNG differs between processes, this does not.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:], order[:n_val]


def split_train_val(data, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices of `n` samples: the seeded `data.val_fraction` split, then the
    first `data.limit` training samples (null keeps all)."""
    train_idx, val_idx = split_indices(n, data.val_fraction, seed)
    if data.limit is not None:
        if data.limit < 1:
            raise ConfigError(f"data.limit={data.limit} must be at least 1 (or null for all)")
        train_idx = train_idx[: data.limit]
    return train_idx, val_idx


def example_inputs(data, n: int, device="cpu") -> torch.Tensor:
    """`n` random inputs shaped and typed as `data`'s (for timing layers): normal floats, or
    random bytes for data=text."""
    if data.name == "text":
        return torch.randint(0, data.num_classes, (n, *data.shape), device=device)
    return torch.randn(n, *data.shape, device=device)


def normalise(name: str, inputs: torch.Tensor) -> torch.Tensor:
    """Raw pixels -> float32 standardised per channel; synthetic data is already standard."""
    if name not in CHANNEL_STATS:
        return inputs.float()
    mean, std = (torch.tensor(s).view(1, -1, 1, 1) for s in CHANNEL_STATS[name])
    # (x / max - mean) / std as one scale and one shift in place: full CIFAR is 0.6 GB of float32,
    # and temporaries would double that and the time on the driver's single core.
    return inputs.float().mul_(1.0 / (_PIXEL_MAX[name] * std)).sub_(mean / std)


def read_torchvision(dataset_cls, root: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Training images uint8 [N, C, H, W] and labels int64 of a torchvision dataset class.

    Converts `.data`/`.targets` in one go: the per-item PIL path takes minutes for CIFAR on the
    single core the driver has.
    """
    dataset = dataset_cls(root, train=True, download=download)
    images = torch.as_tensor(dataset.data)
    if images.dim() == 3:  # MNIST family: a uint8 tensor [N, H, W]
        images = images.unsqueeze(1)
    else:  # CIFAR: a numpy array [N, H, W, C]
        images = images.permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(dataset.targets, dtype=torch.int64)


def _load_raw(data, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if data.name == "digits":
        return _load_digits()
    if data.name == "synthetic":
        return make_synthetic(data.size, data.shape, data.num_classes, seed)
    if data.name == "imagefolder":
        # Files of any size and number: decoded and augmented per sample, never held whole in memory.
        raise ConfigError("data=imagefolder is decoded one sample at a time by the data service (rpc_train/loader); "
                          "load_datasets holds only in-memory datasets: digits, mnist, fashion_mnist, cifar10, synthetic")
    # Imported here: `import torchvision` takes seconds and the default digits run needs none of it.
    import torchvision

    dataset_cls = getattr(torchvision.datasets, TORCHVISION_CLASSES[data.name])
    try:
        return read_torchvision(dataset_cls, data.root, data.download)
    except (RuntimeError, OSError) as err:
        # check_available passed, so the files exist but failed torchvision's md5 check (CIFAR),
        # or the download failed. Its message spans lines and suggests a Python argument, so
        # keep only its first sentence, e.g. "Dataset not found or corrupted".
        reason = first_line(err).split(". ")[0]
        folder = os.path.abspath(os.path.expanduser(data.root))
        fix = "replace them with the official files or add data.download=true"
        if data.download:
            fix = "check the network, or put the files there yourself"
        raise ConfigError(
            f"data={data.name}: torchvision could not load {folder} (data.root={data.root}): {reason}; {fix}"
        ) from err


def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    # Imported here: sklearn is slow to import and only this dataset needs it.
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    return images, torch.as_tensor(digits.target, dtype=torch.int64)


def make_synthetic(size: int, shape, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` standard-normal inputs of `shape`, labelled by a fixed random linear map.

    Labels are the argmax of a seeded projection, so a model can learn them (loss falls), which
    benchmarks and tests rely on; random labels would leave nothing to learn.
    """
    if size < 2:
        raise ConfigError(f"data.size={size} must be at least 2 (one training, one validation)")
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(size, *shape, generator=generator)
    projection = torch.randn(inputs[0].numel(), num_classes, generator=generator)
    labels = (inputs.flatten(1) @ projection).argmax(dim=1)
    return inputs, labels


def _check_matches_conf(data, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    # Models are built from data.shape/num_classes, so a wrong override would fail later, deep in RPC.
    if list(inputs.shape[1:]) != list(data.shape):
        raise ConfigError(
            f"data.shape={list(data.shape)} does not match data={data.name}, whose inputs are "
            f"{list(inputs.shape[1:])}; drop the override or set data.shape={list(inputs.shape[1:])}"
        )
    if int(labels.max()) >= data.num_classes:
        raise ConfigError(
            f"data.num_classes={data.num_classes} is too small for data={data.name}, "
            f"whose labels go up to {int(labels.max())}"
        )
