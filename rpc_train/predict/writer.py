"""Predictions on disk: one Parquet file per split, each written whole or not at all.

A split's file appears only by an atomic rename of a finished, fsynced temp file, so after a
crash every `part-NNNNN.parquet` is complete and a rerun writes exactly the splits that are
missing. Temp files are hidden (leading dot) and never match the final names.
"""

import os
import re
import secrets
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rpc_train.checkpoint.store import fsync_dir

Column = Union[Sequence, np.ndarray, torch.Tensor, pa.Array]

_PART = re.compile(r"part-(\d{5,})\.parquet")
_TEMP = re.compile(r"\.part-\d{5,}\.parquet\.tmp-.+")


def split_path(out_dir: str, split: int) -> str:
    """The final file of `split`: <out_dir>/part-00003.parquet."""
    return os.path.join(out_dir, f"part-{split:05d}.parquet")


def missing_splits(out_dir: str, n_splits: int) -> List[int]:
    """The splits in range(n_splits) with no final file yet, in order.

    Temp files left by a killed run are removed here: they are never finished, and a rerun
    writes those splits again. Call it before writers start, not while they run: it would
    delete their temp files too.
    """
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if _TEMP.fullmatch(name):
                os.remove(os.path.join(out_dir, name))
    return [s for s in range(n_splits) if not os.path.exists(split_path(out_dir, s))]


def to_arrow(values: Column) -> pa.Array:
    """One column as an Arrow array; a 2-D tensor/array becomes a list column, a row per list."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if not isinstance(values, np.ndarray):
        return pa.array(values)
    if values.ndim == 1:
        return pa.array(values)
    if values.ndim == 2:
        # Offsets over the flat values build the list column without a Python object per row.
        rows, width = values.shape
        offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values).reshape(-1)))
    raise ValueError(f"a column is 1-D, or 2-D for a list column; got shape {values.shape}")


def write_split(out_dir: str, split: int, columns: Dict[str, Column]) -> str:
    """Write `columns` as split `split`'s Parquet file, atomically; returns its path."""
    table = pa.table({name: to_arrow(values) for name, values in columns.items()})
    os.makedirs(out_dir, exist_ok=True)
    final = split_path(out_dir, split)
    # pid + random: unique even between hosts writing to one shared filesystem.
    temp = os.path.join(out_dir, f".{os.path.basename(final)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(temp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name says it is finished
        os.replace(temp, final)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    fsync_dir(out_dir)  # and the rename itself survives a power cut
    return final


def read_predictions(out_dir: str, n_splits: Optional[int] = None) -> pa.Table:
    """All parts in split order as one table; with `n_splits`, fail if any split is missing."""
    if n_splits is not None:
        missing = [s for s in range(n_splits) if not os.path.exists(split_path(out_dir, s))]
        if missing:
            raise FileNotFoundError(f"{out_dir}: splits {missing} of {n_splits} are not written yet")
    parts = sorted((int(m.group(1)), name) for name in os.listdir(out_dir)
                   if (m := _PART.fullmatch(name)))
    if not parts:
        raise FileNotFoundError(f"{out_dir} holds no part-NNNNN.parquet files")
    return pa.concat_tables([pq.read_table(os.path.join(out_dir, name)) for _, name in parts])

