"""rpc_train.predict.writer: predictions round-trip, and a split's file is whole or absent."""

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from rpc_train.predict.writer import missing_splits, read_predictions, split_path, write_split


def predictions(first: int, rows: int = 4, classes: int = 3):
    """The columns mode=predict writes, for samples first..first+rows-1."""
    generator = torch.Generator().manual_seed(first)
    probabilities = torch.softmax(torch.randn(rows, classes, generator=generator), dim=1)
    ids = torch.arange(first, first + rows, dtype=torch.int64)
    return {
        "sample": ids,
        "path": [f"images/{i:04d}.png" for i in ids.tolist()],
        "label": np.arange(rows, dtype=np.int64) % classes,
        "predicted": probabilities.argmax(dim=1),
        "probabilities": probabilities,
    }


def test_split_path_names():
    assert split_path("out", 3) == os.path.join("out", "part-00003.parquet")


def test_write_then_read_back_equals_input(tmp_path):
    parts = [predictions(0), predictions(4, rows=2)]
    write_split(str(tmp_path), 1, parts[1])  # written out of order, read in split order
    write_split(str(tmp_path), 0, parts[0])
    table = read_predictions(str(tmp_path), n_splits=2)
    assert table.schema.field("probabilities").type == pa.list_(pa.float32())
    assert table.schema.field("sample").type == pa.int64()
    assert table.schema.field("path").type == pa.string()
    got = table.to_pydict()
    assert got["sample"] == list(range(6))
    assert got["path"] == parts[0]["path"] + parts[1]["path"]
    for name in ("label", "predicted"):
        assert got[name] == [int(v) for p in parts for v in p[name]]
    # float32 -> Parquet -> Python float is exact, so the lists compare equal as they are.
    assert got["probabilities"] == [row for p in parts for row in p["probabilities"].tolist()]


def test_leftover_temp_file_is_not_done_and_is_removed(tmp_path):
    write_split(str(tmp_path), 0, predictions(0))
    killed = tmp_path / ".part-00001.parquet.tmp-4242-deadbeef"  # what a killed writer leaves
    killed.write_bytes(b"PAR1 half a file")
    assert missing_splits(str(tmp_path), 2) == [1]
    assert not killed.exists()
    assert missing_splits(str(tmp_path / "not-yet"), 2) == [0, 1]


def test_unconvertible_column_leaves_no_file(tmp_path):
    bad = {**predictions(0), "path": [object()] * 4}  # pyarrow cannot convert an object()
    with pytest.raises(pa.ArrowInvalid):
        write_split(str(tmp_path), 0, bad)
    assert missing_splits(str(tmp_path), 1) == [0]
    assert os.listdir(tmp_path) == []


def test_failure_inside_the_parquet_writer_leaves_no_file(tmp_path):
    # An interval converts to Arrow but Parquet has no type for it: the writer fails after the
    # temp file was opened, and neither it nor a final file may stay.
    interval = pa.array([pa.MonthDayNano([1, 2, 3])] * 4, type=pa.month_day_nano_interval())
    with pytest.raises(pa.ArrowNotImplementedError):
        write_split(str(tmp_path), 0, {**predictions(0), "interval": interval})
    assert os.listdir(tmp_path) == []


def test_failure_after_the_temp_file_is_written_leaves_no_final_file(tmp_path):
    # A directory at the final name makes os.replace fail after the whole temp file was written:
    # the temp file must go, and nothing that looks finished may stay.
    os.mkdir(split_path(str(tmp_path), 0))
    with pytest.raises(OSError):
        write_split(str(tmp_path), 0, predictions(0))
    assert os.listdir(tmp_path) == ["part-00000.parquet"]
    assert os.path.isdir(split_path(str(tmp_path), 0))


def test_rerun_writes_only_the_missing_splits(tmp_path):
    out = str(tmp_path)
    for split in (0, 2):
        write_split(out, split, predictions(4 * split))
    done = {s: os.stat(split_path(out, s)) for s in (0, 2)}
    todo = missing_splits(out, 4)
    assert todo == [1, 3]
    for split in todo:
        write_split(out, split, predictions(4 * split))
    assert missing_splits(out, 4) == []
    for split, before in done.items():  # the finished splits were not rewritten
        after = os.stat(split_path(out, split))
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert read_predictions(out).column("sample").to_pylist() == list(range(16))


def test_read_refuses_an_incomplete_output(tmp_path):
    write_split(str(tmp_path), 1, predictions(4))
    with pytest.raises(FileNotFoundError, match=r"\[0\]"):
        read_predictions(str(tmp_path), n_splits=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no part"):
        read_predictions(str(tmp_path / "empty"))


def test_three_dimensional_column_is_refused(tmp_path):
    with pytest.raises(ValueError, match="1-D, or 2-D"):
        write_split(str(tmp_path), 0, {"x": torch.zeros(2, 2, 2)})
