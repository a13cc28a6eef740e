"""Checkpoints on disk: one directory per step, written atomically, listed, verified, pruned.

    run_dir/checkpoints/step_<N>/
        stage0.pt ...   each worker's share, keyed by parameter name (checkpoint/shares.py);
                        server0.pt ... in parameter-server mode
        trainer.pt      the driver's loop position and RNG state
        manifest.json   written last: step, config, layout, the sha256 of every file, and
                        which file holds each named tensor

A directory without a manifest is an interrupted save and never counts. Every file goes to a
temporary name, is fsynced and renamed into place (then the directory is fsynced), so a crash
leaves the old file or the new one, never half of one. Workers write their own files into the
run dir: on several machines it must be a filesystem they all share at the same path.
Files are read with `torch.load(weights_only=True)`, which never runs pickled code.
"""

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from rpc_train.config.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1  # bump when the layout of the files changes
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Checkpoint:
    path: str
    step: int
    manifest: Dict[str, Any]


def name_list(names: List[str], limit: int = 6) -> str:
    """The first few names, and how many more: keeps an error about a big model on one line."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def checkpoints_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def checkpoint_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step}")


def fsync_dir(directory: str) -> None:
    # Makes the rename itself durable: without it a power cut can forget the new name.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> str:
    """Write `data` to `path` atomically and durably; returns its sha256 (hex)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return hashlib.sha256(data).hexdigest()


def save_file(path: str, obj: Any) -> str:
    """torch.save `obj` to `path` atomically; returns the file's sha256."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, buffer.getvalue())


def load_file(path: str) -> Any:
    """Tensors, numbers, strings and containers only: weights_only never runs pickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def begin(directory: str) -> None:
    """Make `directory` ready for a save; one that already holds a checkpoint stops counting
    as complete until its new manifest lands."""
    os.makedirs(directory, exist_ok=True)
    manifest = os.path.join(directory, MANIFEST)
    if os.path.exists(manifest):
        os.unlink(manifest)
        fsync_dir(directory)


def write_manifest(directory: str, manifest: Dict[str, Any]) -> None:
    atomic_write(os.path.join(directory, MANIFEST), json.dumps({"format": FORMAT, **manifest}, indent=1).encode())


def _step_dirs(root: str) -> List[tuple]:
    """(step, path) of every step_<N> directory under `root`, newest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name))
             for name in os.listdir(root) if (m := _STEP_DIR.match(name))]
    return sorted(found, reverse=True)


def _verified(directory: str) -> Tuple[Optional[Checkpoint], Optional[str]]:
    """(the checkpoint, None) when every file checks out, else (None, why it cannot be trusted).

    The manifest is read once, for the check and for the Checkpoint."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = json.load(f)
        files, step = manifest["files"], int(manifest["step"])
        if manifest.get("format") != FORMAT:
            return None, f"{MANIFEST} has format {manifest.get('format')}, this version reads {FORMAT}"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"
    for name, digest in sorted(files.items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            return None, f"{name} is missing"
        if sha256_of(path) != digest:
            return None, f"{name} fails its sha256 check (truncated or corrupted)"
    return Checkpoint(directory, step, manifest), None


def damage(directory: str) -> Optional[str]:
    """Why the checkpoint in `directory` cannot be trusted, or None when every file checks out."""
    return _verified(directory)[1]


def newest_intact(root: str) -> Optional[Checkpoint]:
    """The newest complete checkpoint whose files all check out, saying why each newer one was skipped.

    Raises ConfigError when checkpoints exist but all are damaged: starting over silently
    would prune them.
    """
    damaged = []
    for step, path in _step_dirs(root):
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            log.info("ignoring %s: no %s (a save that was interrupted)", path, MANIFEST)
            continue
        found, problem = _verified(path)
        if found is not None:
            return found
        log.warning("checkpoint %s is damaged: %s; falling back to the one before it", path, problem)
        damaged.append(f"step_{step}: {problem}")
    if damaged:
        raise ConfigError(f"no intact checkpoint under {root} ({'; '.join(damaged)}); remove the damaged "
                          "ones, or start over with checkpoint.resume=none")
    return None


def resolve_resume(resume: str, root: str) -> Optional[Checkpoint]:
    """`checkpoint.resume`: auto (this run's newest intact one, if any), none, or a path to a
    checkpoint directory (used as is, or an error) or to a run directory (its newest intact one)."""
    if resume == "none":
        return None
    if resume == "auto":
        return newest_intact(root)
    path = os.path.expanduser(resume)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        found, problem = _verified(path)
        if problem:
            raise ConfigError(f"checkpoint.resume={resume}: {problem}")
        return found
    if os.path.isdir(checkpoints_root(path)):
        found = newest_intact(checkpoints_root(path))
        if found:
            return found
    raise ConfigError(f"checkpoint.resume={resume}: no complete checkpoint there; give a "
                      f"checkpoints/step_<N> directory holding {MANIFEST}, a run directory, auto or none")


def prune(root: str, keep: int, current_step: int) -> None:
    """Keep the newest `keep` complete checkpoints up to `current_step`.

    Also removes interrupted saves, and checkpoints past `current_step`: those belong to a
    history this run abandoned by resuming from an earlier step, and `resume=auto` must never
    pick one of them.
    """
    kept = 0
    for step, path in _step_dirs(root):
        complete = os.path.isfile(os.path.join(path, MANIFEST))
        if complete and step <= current_step and kept < keep:
            kept += 1
            continue
        if complete and step > current_step:
            log.info("removing %s: it is past step %d, which this run resumed before", path, current_step)
        shutil.rmtree(path, ignore_errors=True)
