"""Click data for mode=hybrid: Criteo's TSV files, or seeded synthetic clicks with a signal.

Both give `ClickData`: dense features float32 (N, num_dense), categorical indices int64
(N, tables), already inside each table's rows, and labels float32 (N,) of 0 or 1.

Criteo Display Advertising (Kaggle's `train.txt`, the Terabyte `day_N` files) is one sample a
line: the label, 13 integer features and 26 categorical features as 8-digit hexadecimal hashes,
tab-separated, any feature possibly empty. As in the DLRM reference preprocessing, an integer
becomes log(1 + max(x, 0)) and a categorical its value modulo its table's rows; an empty field
counts as 0.
"""

import math
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch.utils.data import TensorDataset

from rpc_train.config.errors import ConfigError
from rpc_train.data.files import check_available

CRITEO_DENSE, CRITEO_TABLES = 13, 26


@dataclass
class ClickData:
    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor

    def dataset(self, index: torch.Tensor) -> TensorDataset:
        return TensorDataset(self.dense[index], self.sparse[index], self.labels[index])


def criteo_path(data) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(data.root)), data.file)


def read_criteo(path: str, table_rows: Sequence[int], limit=None) -> ClickData:
    """The first `limit` lines (all if None) of a Criteo TSV file; a bad line is a ConfigError
    naming the file and line number."""
    if len(table_rows) != CRITEO_TABLES:
        raise ConfigError(f"data.table_rows has {len(table_rows)} entries; Criteo has {CRITEO_TABLES} "
                          "categorical features, one table each")
    dense: List[List[float]] = []
    sparse: List[List[int]] = []
    labels: List[float] = []
    with open(path, encoding="ascii", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(labels) >= limit:
                break
            line = line.rstrip("\n").rstrip("\r")
            if not line:  # a blank line (one at the end of a file, say) holds no sample
                continue
            label, ints, cats = _parse_line(line, path, number)
            labels.append(label)
            dense.append([math.log1p(max(x, 0)) for x in ints])
            sparse.append([c % rows for c, rows in zip(cats, table_rows)])
    if not labels:
        raise ConfigError(f"data=criteo: {path} holds no samples")
    return ClickData(torch.tensor(dense, dtype=torch.float32), torch.tensor(sparse, dtype=torch.int64),
                     torch.tensor(labels, dtype=torch.float32))


def _parse_line(line: str, path: str, number: int) -> Tuple[float, List[int], List[int]]:
    fields = line.split("\t")
    where = f"{path}:{number}"
    if len(fields) != 1 + CRITEO_DENSE + CRITEO_TABLES:
        raise ConfigError(f"{where}: {len(fields)} tab-separated fields, a Criteo line has "
                          f"{1 + CRITEO_DENSE + CRITEO_TABLES} (label, {CRITEO_DENSE} integers, "
                          f"{CRITEO_TABLES} categoricals)")
    if fields[0] not in ("0", "1"):
        raise ConfigError(f"{where}: label {fields[0]!r} must be 0 or 1")
    try:
        ints = [int(v) if v else 0 for v in fields[1 : 1 + CRITEO_DENSE]]
    except ValueError:
        bad = next(v for v in fields[1 : 1 + CRITEO_DENSE] if not _is_int(v))
        raise ConfigError(f"{where}: integer feature {bad!r} is not an integer") from None
    try:
        cats = [int(v, 16) if v else 0 for v in fields[1 + CRITEO_DENSE :]]
    except ValueError:
        bad = next(v for v in fields[1 + CRITEO_DENSE :] if not _is_hex(v))
        raise ConfigError(f"{where}: categorical feature {bad!r} is not hexadecimal") from None
    return float(fields[0]), ints, cats


def _is_int(value: str) -> bool:
    try:
        int(value or "0")
        return True
    except ValueError:
        return False


def _is_hex(value: str) -> bool:
    try:
        int(value or "0", 16)
        return True
    except ValueError:
        return False


def make_synthetic_clicks(size: int, num_dense: int, table_rows: Sequence[int], seed: int) -> ClickData:
    """`size` seeded samples whose click probability a model can learn.

    Categorical values follow a Zipf-like law (a few values common, most rare, as in real logs);
    each table's values and one dense direction carry a planted effect on the logit, and the
    label is drawn from the resulting click probability (about a quarter of samples click).
    """
    if size < 2:
        raise ConfigError(f"data.size={size} must be at least 2 (one training, one validation)")
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(size, num_dense, generator=g)
    direction = torch.randn(num_dense, generator=g) / math.sqrt(num_dense)
    logit = 1.5 * dense @ direction - 1.2
    columns = []
    for rows in table_rows:
        popularity = 1.0 / torch.arange(1, rows + 1, dtype=torch.float64) ** 1.1
        column = torch.multinomial(popularity, size, replacement=True, generator=g)
        effect = torch.randn(rows, generator=g) * (2.0 / math.sqrt(len(table_rows)))
        logit += effect[column].float()
        columns.append(column)
    labels = torch.bernoulli(torch.sigmoid(logit), generator=g)
    return ClickData(dense, torch.stack(columns, dim=1), labels)


def check_indices(sparse: torch.Tensor, table_rows: Sequence[int], features: Sequence[str]) -> None:
    """Every index inside its table, else a ConfigError naming the feature and the value."""
    for t, rows in enumerate(table_rows):
        column = sparse[:, t]
        bad = column[(column < 0) | (column >= rows)]
        if len(bad):
            raise ConfigError(f"categorical feature {features[t]} has index {int(bad[0])}, outside its "
                              f"table of {rows} rows (valid: 0..{rows - 1}); raise data.table_rows[{t}] "
                              "or hash the values into the table")


def load_clicks(data, seed: int) -> Tuple[TensorDataset, TensorDataset]:
    """(train, validation) of `data` (criteo or synthetic_clicks), split by `data.val_fraction`."""
    from rpc_train.data.datasets import split_indices

    check_available(data)
    rows = list(data.table_rows)
    if data.name == "criteo":
        clicks = read_criteo(criteo_path(data), rows, data.limit)
    else:
        clicks = make_synthetic_clicks(data.size, data.shape[0], rows, seed)
    if clicks.dense.shape[1] != data.shape[0]:
        raise ConfigError(f"data.shape={list(data.shape)} does not match data={data.name}, which has "
                          f"{clicks.dense.shape[1]} dense features; set data.shape=[{clicks.dense.shape[1]}]")
    check_indices(clicks.sparse, rows, [f"C{t + 1}" for t in range(len(rows))])
    train_idx, val_idx = split_indices(len(clicks.labels), data.val_fraction, seed)
    return clicks.dataset(train_idx), clicks.dataset(val_idx)
