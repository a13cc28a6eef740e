"""data=text (rpc_train/data/corpus.py, text.py) on real files the tests write, and its errors."""

import os

import pytest
import torch

from rpc_train.config.compose import compose
from rpc_train.config.errors import ConfigError
from rpc_train.data.corpus import hash_position, list_files, split_files
from rpc_train.data.datasets import make_loaders
from rpc_train.data.text import load_text
from rpc_train.loader.maker import BatchMaker
from rpc_train.loader.sources import build_sources
from rpc_train.preflight import main as preflight

pytestmark = pytest.mark.timeout(60)


def write_files(root, count: int, size: int = 100, folder: str = "pkg") -> dict:
    """`count` files of distinct bytes under root/folder; their contents by relative path."""
    contents = {}
    for i in range(count):
        path = root / folder / f"mod{i:02d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = bytes((i * 7 + j) % 256 for j in range(size + i))
        path.write_bytes(data)
        contents[f"{folder}/mod{i:02d}.py"] = data
    return contents


def text_data(root, *overrides):
    return compose(["model=gpt", "data=text", f"data.root={root}", "model.context=8", *overrides]).data


def test_the_split_is_by_file_seeded_and_stable(tmp_path):
    write_files(tmp_path, 40)
    data = text_data(tmp_path, "data.val_fraction=0.25")
    train, val = split_files(data, 9, seed=0)
    assert {f.relative for f in train}.isdisjoint(f.relative for f in val)
    assert len(train) + len(val) == 40 and 3 <= len(val) <= 18
    assert all((hash_position(f.relative, 0) < 0.25) == (f in val) for f in train + val)
    assert split_files(data, 9, seed=0) == (train, val)
    assert [f.relative for f in split_files(data, 9, seed=1)[1]] != [f.relative for f in val]
    # Another file changes nobody else's side.
    write_files(tmp_path, 1, folder="more")
    train2, val2 = split_files(data, 9, seed=0)
    assert [f for f in val2 if f.relative != "more/mod00.py"] == val


def test_windows_hold_the_files_bytes_and_never_cross_them(tmp_path):
    contents = write_files(tmp_path, 6, size=30)
    data = text_data(tmp_path, "data.val_fraction=0.3")
    train, val = load_text(data, seed=0)
    train_files, val_files = split_files(data, 9, seed=0)
    # A file of n bytes gives (n - 1) // 8 windows of 8 inputs and 8 targets, every 8 bytes.
    assert len(train) == sum((f.size - 1) // 8 for f in train_files)
    windows = [bytes(torch.cat([x, y[-1:]]).tolist()) for x, y in (train[i] for i in range(len(train)))]
    expected = [contents[f.relative][s:s + 9] for f in train_files for s in range(0, f.size - 8, 8)]
    assert windows == expected
    x, y = train[0]
    assert x.dtype == y.dtype == torch.int64 and torch.equal(x[1:], y[:-1])
    val_bytes = {contents[f.relative] for f in val_files}
    assert all(any(w in v for v in val_bytes) for w in (bytes(torch.cat([x, y[-1:]]).tolist()) for x, y in val))


def test_loaders_draw_a_seeded_order_of_byte_windows(tmp_path):
    write_files(tmp_path, 10, size=200)
    data = text_data(tmp_path)
    first, _ = make_loaders(data, 4, seed=0)
    again, val = make_loaders(data, 4, seed=0)
    first, again = list(first), list(again)
    x, y = first[0]
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert len(first) == len(again) > 1 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert next(iter(val))[0].shape[1] == 8


def test_the_data_service_makes_the_loaders_batches(tmp_path):
    write_files(tmp_path, 10, size=200)
    data = text_data(tmp_path)
    train, _ = build_sources(data, seed=0)
    windows, _ = load_text(data, seed=0)
    ids = [5, 0, 17, 3]
    batch, _ = BatchMaker(train, None, seed=0).make(ids, epoch=0)
    assert torch.equal(batch.x, torch.stack([windows[i][0] for i in ids]))
    assert torch.equal(batch.y, torch.stack([windows[i][1] for i in ids]))


def test_limits_keep_the_first_training_and_evenly_spaced_validation_windows(tmp_path):
    write_files(tmp_path, 10, size=400)
    whole_train, whole_val = load_text(text_data(tmp_path, "data.val_limit=null"), seed=0)
    train, val = load_text(text_data(tmp_path, "data.limit=5", "data.val_limit=3"), seed=0)
    assert train.starts.tolist() == whole_train.starts[:5].tolist()
    spaced = torch.linspace(0, len(whole_val) - 1, 3).round().long()
    assert len(whole_val) > 3 and val.starts.tolist() == whole_val.starts[spaced].tolist()


def test_excluded_folders_and_other_names_are_left_out(tmp_path):
    write_files(tmp_path, 3)
    write_files(tmp_path, 2, folder="pkg/test")
    (tmp_path / "notes.txt").write_text("not python")
    (tmp_path / "dir.py").mkdir()
    data = text_data(tmp_path, "data.exclude=[test]")
    assert [f.relative for f in list_files(data)] == ["pkg/mod00.py", "pkg/mod01.py", "pkg/mod02.py"]
    top = text_data(tmp_path, "data.glob=*.txt")
    assert [f.relative for f in list_files(top)] == ["notes.txt"]


def test_the_default_corpus_is_the_standard_library():
    data = compose(["model=gpt", "data=text"]).data
    files = list_files(data)
    import sysconfig

    assert data.root == sysconfig.get_paths()["stdlib"]
    assert any(f.relative == "json/decoder.py" for f in files)
    assert not any("site-packages/" in f.relative or f.relative.startswith("test/") for f in files)


@pytest.mark.parametrize("setup, overrides, message", [
    ("empty", [], "no file matches data.glob=**/*.py under"),
    ("dangling", [], "cannot read"),
    ("short", ["model.context=500"], "model.context=500 needs files of at least 501 bytes"),
    ("one", [], "it needs two such files"),
    ("missing", [], "no folder"),
])
def test_errors_are_one_line_before_anything_starts(tmp_path, capsys, setup, overrides, message):
    root = tmp_path / "corpus"
    root.mkdir()
    if setup == "dangling":
        write_files(root, 3)
        os.symlink(root / "gone.py", root / "pkg" / "broken.py")
    elif setup == "short":
        write_files(root, 3)
    elif setup == "one":
        write_files(root, 1)
    elif setup == "missing":
        root = tmp_path / "nowhere"
    args = ["model=gpt", "data=text", f"data.root={root}", "model.context=8", *overrides]
    assert preflight(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace("(", r"\(")):
        load_text(compose(args).data, seed=0)
