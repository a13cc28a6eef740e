"""Which worker is behind a failed call: one that died, one that stopped answering, or none.

torch's errors for a lost peer say "RPC ran for more than set timeout" or "eof" without naming
it, and a stopped stage shows up as a timeout of the call that went to the stage before it.
So when a driver call fails, `WorkerWatch` pings every worker with a short timeout; if one is
gone or silent the error becomes a one-line RunFailure naming it and the call. An error raised
by code on a worker that still answers (a bad optimizer setting, say) passes through unchanged.

A worker that is stopped (SIGSTOP) or hung cannot act on the driver's request to exit, and
torchrun's SIGTERM does not end a stopped process: torchrun waits 30 s before its SIGKILL, and
only then ends or restarts the job. So the driver SIGKILLs such a worker itself when it is a
sibling: a child of the same torchrun agent, on this machine, in this pid namespace.
"""

import functools
import logging
import os
import signal
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed.rpc as rpc

from rpc_train.config.errors import ConfigError, RunFailure

log = logging.getLogger(__name__)

# A live worker answers a ping in milliseconds; this only bounds the wait for a silent one.
PING_TIMEOUT_S = 3.0


def timed_out(err: Exception) -> bool:
    text = str(err).lower()
    return "timeout" in text or "timed out" in text


def unresponsive(workers: List[str], timeout_s: float) -> Dict[str, bool]:
    """worker -> True if it stopped answering (alive but silent), False if it is gone; only
    the workers that do not answer a ping are listed."""
    futures, found = {}, {}
    for worker in workers:
        try:
            futures[worker] = rpc.rpc_async(worker, os.getpid, timeout=timeout_s)
        except RuntimeError as err:  # the agent already knows the connection is closed
            found[worker] = timed_out(err)
    for worker, future in futures.items():
        try:
            future.wait()
        except RuntimeError as err:
            found[worker] = timed_out(err)
    return found


def describe(call: str, silent: Dict[str, bool], rpc_timeout_s: float) -> str:
    return "; ".join(
        f"{worker} did not answer `{call}` within {rpc_timeout_s:g} s (runtime.rpc_timeout_s) and does not "
        "answer a ping either: is it stopped or hung?" if stopped else
        f"{worker} failed during `{call}`: its connection is closed (did the process die?)"
        for worker, stopped in sorted(silent.items()))


def _namespace() -> str:
    """The same for every process of one boot of one machine and one pid namespace; empty
    without Linux's /proc (then no worker is ever killed)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _parent_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def whereabouts() -> Tuple[str, int, int]:
    """(namespace, pid, parent pid) of the process it runs in: the driver asks each worker."""
    return _namespace(), os.getpid(), os.getppid()


def ask_whereabouts(workers: List[str]) -> Dict[str, torch.futures.Future]:
    return {worker: rpc.rpc_async(worker, whereabouts) for worker in workers}


def kill_if_sibling(worker: str, where: Optional[torch.futures.Future]) -> bool:
    """SIGKILL a worker that stopped answering, if it is a sibling of this process (see above)."""
    if where is None or not where.done():
        return False
    try:
        namespace, pid, parent = where.value()
    except RuntimeError:
        return False
    if not namespace or namespace != _namespace() or parent != os.getppid() or _parent_of(pid) != parent:
        return False
    os.kill(pid, signal.SIGKILL)
    log.warning("%s (pid %d) does not answer: killed it, as torchrun's SIGTERM cannot end a stopped process",
                worker, pid)
    return True


class WorkerWatch:
    """An engine whose failed calls name the worker that died or stopped answering.

    Wraps every public method of `engine`; attributes pass through.
    """

    def __init__(self, engine, workers: List[str], rpc_timeout_s: float):
        self._engine, self._workers, self._rpc_timeout_s = engine, workers, rpc_timeout_s

    def __getattr__(self, name: str):
        attr = getattr(self._engine, name)
        if name.startswith("_") or not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except (RunFailure, ConfigError):
                raise
            except Exception as err:
                silent = unresponsive(self._workers, min(PING_TIMEOUT_S, self._rpc_timeout_s))
                if not silent:
                    raise
                raise RunFailure(describe(name, silent, self._rpc_timeout_s)) from err

        return call
