"""data=text: byte-level language-model windows over text files (no tokenizer, 256 symbols).

A sample is a window of context + 1 bytes of one file: the input is its first `context`
bytes, the target the same window shifted by one. Windows start every `context` bytes of a
file (each byte is a target once; a file's tail shorter than a window is left out) and never
cross files. The train split's windows are the data set the usual seeded loaders shuffle
(data/datasets.py), so a pipeline, the parameter-server trainers, the data service and one
process draw the same windows in the same order. The validation windows, in file order, are
thinned to `data.val_limit` evenly spaced ones: evaluating a whole held-out tenth of the
standard library would take longer than training does in the preset.
"""

from typing import List, Tuple

import torch
from torch.utils.data import Dataset

from rpc_train.config.errors import ConfigError
from rpc_train.data.corpus import TextFile, split_files


class ByteWindows(Dataset):
    """Windows of `context` + 1 bytes of one flat buffer: sample i is (bytes [context], next bytes [context])."""

    def __init__(self, corpus: torch.Tensor, starts: torch.Tensor, context: int):
        self.corpus, self.starts, self.context = corpus, starts, context

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[i])
        window = self.corpus[start:start + self.context + 1].long()
        return window[:-1], window[1:]


def read_windows(files: List[TextFile], context: int) -> ByteWindows:
    """The files' bytes end to end in one uint8 tensor, and where each window starts in it."""
    chunks, starts, offset = [], [], 0
    for file in files:
        try:
            with open(file.path, "rb") as f:
                raw = f.read()
        except OSError as err:
            raise ConfigError(f"data=text: cannot read {file.path}: {err.strerror or err}") from err
        chunks.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8))
        starts.append(torch.arange(offset, offset + len(raw) - context, context))
        offset += len(raw)
    return ByteWindows(torch.cat(chunks), torch.cat(starts), context)


def load_text(data, seed: int) -> Tuple[ByteWindows, ByteWindows]:
    """(train, validation) windows of data=text; `data.limit` keeps the first N training
    windows, `data.val_limit` N evenly spaced validation ones."""
    context = int(data.shape[0])
    train_files, val_files = split_files(data, context + 1, seed)
    train, val = read_windows(train_files, context), read_windows(val_files, context)
    if data.limit is not None:
        if data.limit < 1:
            raise ConfigError(f"data.limit={data.limit} must be at least 1 (or null for all)")
        train.starts = train.starts[:data.limit]
    if data.val_limit is not None and data.val_limit < len(val):
        if data.val_limit < 1:
            raise ConfigError(f"data.val_limit={data.val_limit} must be at least 1 (or null for all)")
        val.starts = val.starts[torch.linspace(0, len(val) - 1, data.val_limit).round().long()]
    return train, val
