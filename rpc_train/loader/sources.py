"""Where samples come from: a source decodes sample i of one split, before any augmentation.

A source is built from the config on each process that decodes (`build_sources`), never
shipped: a data worker and an in-process loader built from one config hold the same samples
at the same indices. Index i is the sample's position within its split (train 0..n-1).
"""

import re
from typing import List, Protocol, Tuple

import torch
from torch.utils.data import TensorDataset

from rpc_train.config.errors import first_line
from rpc_train.data.files import CLICK_DATASETS

# PIL ends "cannot identify image file" with the file object's repr, which names the path again.
_FILE_REPR = re.compile(r" <_io\.\w+ name=.*>$")


class SampleError(Exception):
    """A sample that cannot be decoded: one line naming it (its file) and why."""

    def __init__(self, sample: str, reason: str):
        # Both in args, so the error pickles across RPC and comes back the same.
        super().__init__(sample, reason)
        self.sample, self.reason = sample, reason

    def __str__(self) -> str:
        return f"{self.sample}: {self.reason}"


class SampleSource(Protocol):
    """What a data worker or an in-process loader needs from one split of a dataset."""

    # The dataset and split, e.g. "digits train": unique per split, so a store can key samples by (name, i).
    name: str

    def __len__(self) -> int: ...

    def describe(self, i: int) -> str:
        """Sample i for a person: its file, or e.g. "digits train[12]"."""

    def label(self, i: int) -> int: ...

    def decode(self, i: int) -> torch.Tensor:
        """Sample i before augmentation (uint8 [C, H, W] for image files); raises SampleError."""


class TensorSource:
    """A split that `load_datasets` holds in memory; a sample is its row, already normalised."""

    def __init__(self, name: str, dataset: TensorDataset):
        self.name = name
        self.inputs, self.labels = dataset.tensors

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def decode(self, i: int) -> torch.Tensor:
        # A copy, not a view: RPC sends a view's whole storage, here the whole split.
        return self.inputs[i].clone()


class ImageFolderSource:
    """A split of data=imagefolder's files, decoded from disk at each call.

    rpc_train.data.imagefolder is imported where used: it imports torchvision, which costs
    seconds that a process reading an in-memory dataset need not pay.
    """

    def __init__(self, name: str, samples: List[Tuple[str, int]]):
        self.name = name
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, i: int) -> str:
        return self.samples[i][0]

    def label(self, i: int) -> int:
        return self.samples[i][1]

    def decode(self, i: int) -> torch.Tensor:
        from rpc_train.data.imagefolder import read_rgb

        path = self.samples[i][0]
        try:
            return read_rgb(path)
        except (RuntimeError, OSError, ValueError) as err:
            raise SampleError(path, _FILE_REPR.sub("", first_line(err))) from err


class ClickSource:
    """A split of click data (mode=hybrid): a sample is (dense features, categorical indices),
    its label the click as a float. Criteo's TSV lines are parsed where the source is built."""

    def __init__(self, name: str, dataset: TensorDataset):
        self.name = name
        self.dense, self.sparse, self.labels = dataset.tensors

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def label(self, i: int) -> float:
        return float(self.labels[i])

    def decode(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.dense[i].clone(), self.sparse[i].clone()


class WindowSource:
    """A split of data=text (data/text.py): sample i is a window's input bytes, its label the
    next bytes, both int64 [context]."""

    def __init__(self, name: str, windows):
        self.name, self.windows = name, windows

    def __len__(self) -> int:
        return len(self.windows)

    def describe(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def label(self, i: int) -> torch.Tensor:
        return self.windows[i][1]

    def decode(self, i: int) -> torch.Tensor:
        return self.windows[i][0]


def build_sources(data, seed: int) -> Tuple[SampleSource, SampleSource]:
    """(train, validation) sources of a dataset, split as `load_datasets` / `load_clicks` split it."""
    if data.name in CLICK_DATASETS:
        from rpc_train.data.clicks import load_clicks

        train, val = load_clicks(data, seed)
        return ClickSource(f"{data.name} train", train), ClickSource(f"{data.name} val", val)
    if data.name == "imagefolder":
        from rpc_train.data.imagefolder import load_imagefolder

        train, val = load_imagefolder(data, seed)
        return ImageFolderSource("imagefolder train", train), ImageFolderSource("imagefolder val", val)
    if data.name == "text":
        from rpc_train.data.text import load_text

        train, val = load_text(data, seed)
        return WindowSource("text train", train), WindowSource("text val", val)
    from rpc_train.data.datasets import load_datasets

    train, val = load_datasets(data, seed)
    return TensorSource(f"{data.name} train", train), TensorSource(f"{data.name} val", val)
