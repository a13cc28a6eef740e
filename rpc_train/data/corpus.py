"""data=text's files: which ones, which split each is in, and the checks the launcher runs.

Stdlib only: the launcher's preflight imports this (data/text.py holds the torch side). A file
goes to validation when a seeded hash of its path relative to `data.root` falls below
`data.val_fraction`, so no byte of a validation file is trained on, the split does not depend
on which other files exist, and every process computes it alike (Python's own `hash` is salted
per process; blake2b is not).
"""

import fnmatch
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

from rpc_train.config.errors import ConfigError


@dataclass(frozen=True)
class TextFile:
    path: str  # absolute
    relative: str  # to data.root, with "/": what the split hashes
    size: int


def root_of(data) -> Path:
    return Path(os.path.abspath(os.path.expanduser(data.root)))


def list_files(data) -> List[TextFile]:
    """The files under data.root matching data.glob, less those under a folder named in
    data.exclude, sorted by relative path. Raises ConfigError when there is none or one cannot
    be read."""
    root = root_of(data)
    if not root.is_dir():
        raise ConfigError(f"data=text: no folder {root} (data.root={data.root}); set data.root to a folder of text files")
    excluded, pattern = set(data.exclude or ()), data.glob.split("/")
    files = []
    # A walk that never enters an excluded folder: the standard library's site-packages alone
    # can be twenty times the rest, and Path.glob would list all of it first.
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in excluded)
        for name in names:
            path = Path(folder, name)
            relative = path.relative_to(root)
            if not _matches(relative.parts, pattern):
                continue
            if not os.access(path, os.R_OK) or not path.is_file():  # a dangling link, a socket, no permission
                raise ConfigError(f"data=text: cannot read {path}; remove it, or leave it out with data.glob "
                                  "or data.exclude")
            files.append(TextFile(str(path), relative.as_posix(), path.stat().st_size))
    if not files:
        raise ConfigError(f"data=text: no file matches data.glob={data.glob} under {root} (data.root={data.root})"
                          + (f" outside the folders of data.exclude={sorted(excluded)}" if excluded else ""))
    return sorted(files, key=lambda f: f.relative)


def _matches(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    """Path.glob's test of a relative path's parts against a pattern's: `**` is any number of folders."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return _matches(parts, pattern[1:]) or (bool(parts) and _matches(parts[1:], pattern))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


def hash_position(relative: str, seed: int) -> float:
    """Where a file's seeded hash falls in [0, 1): below data.val_fraction is validation."""
    digest = hashlib.blake2b(f"{seed}:{relative}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


def usable_files(data, window: int) -> List[TextFile]:
    """The files that hold at least one window of `window` bytes (context + 1); at least two."""
    files = list_files(data)
    usable = [f for f in files if f.size >= window]
    if not usable:
        largest = max(files, key=lambda f: f.size)
        raise ConfigError(f"data=text: model.context={window - 1} needs files of at least {window} bytes, but the "
                          f"largest of the {len(files)} files under {root_of(data)} is {largest.size} "
                          f"({largest.relative}); lower model.context")
    if len(usable) < 2:
        raise ConfigError(f"data=text: only {usable[0].relative} holds {window} bytes (model.context + 1) under "
                          f"{root_of(data)}; it needs two such files, one to train on and one to validate")
    return usable


def split_files(data, window: int, seed: int) -> Tuple[List[TextFile], List[TextFile]]:
    """(train, validation) usable files (`usable_files`).

    A split the hash leaves empty (few files) takes the other side's file whose hash is
    nearest the cut, so both always hold one.
    """
    if not 0.0 < data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={data.val_fraction}: must be between 0 and 1")
    usable = usable_files(data, window)
    val = [f for f in usable if hash_position(f.relative, seed) < data.val_fraction]
    train = [f for f in usable if f not in val]
    if not val or not train:
        rank = sorted(usable, key=lambda f: hash_position(f.relative, seed))
        moved = rank[0] if not val else rank[-1]
        val = [moved] if not val else [f for f in val if f != moved]
        train = [f for f in usable if f not in val]
    return train, val
