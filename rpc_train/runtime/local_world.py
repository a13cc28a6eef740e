"""Run a function on the driver of a local RPC world that this process starts itself.

`python -m rpc_train.bench.pipeline` needs a pipeline world without torchrun: it spawns `size` processes
on this machine, each joins RPC exactly as `rpc_train.train` does, the driver runs the function
and the workers serve it. Whatever happens, every child is gone when `run_in_local_world` returns.
"""

import os
import queue
import socket
import threading
import time
import traceback
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp
from omegaconf import DictConfig

from rpc_train.runtime.roles import stage_device_maps
from rpc_train.runtime.session import rpc_session
from rpc_train.runtime.world import World, configure_process

# Seconds a graceful RPC shutdown may take after the driver has reported.
_SHUTDOWN_S = 60.0


def free_port() -> int:
    # The port is free now; another process could take it before init_rpc, which is rare
    # enough on a test machine that a retry by hand is the fix.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_service_port(low: int = 20000, high: int = 32000) -> int:
    """A free port for a server that binds it later (a serving job's gRPC and metrics ports).

    Picked below Linux's ephemeral range (32768-60999), where `free_port`'s come from: between
    the pick and the bind, the job's own TensorPipe and rendezvous sockets take ephemeral ports,
    and one of them had taken a port picked that way.
    """
    import random

    for _ in range(100):
        port = random.randint(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def _exit_with_parent() -> None:
    """End this child if the bench process dies without stopping it (SIGKILL, a test timeout).

    Daemon children are only reaped by a parent that exits normally; an orphaned rank would
    otherwise sit in RPC until its timeouts, holding cores and the port.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _rank_main(rank: int, size: int, port: int, cfg: DictConfig, fn: Callable, args: Sequence,
               results) -> None:
    """One child: the environment torchrun would export, then the same start-up as train.py."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size))
    _exit_with_parent()
    world = World.from_env()
    try:
        configure_process(cfg.runtime, world)
        with rpc_session(cfg.runtime, world, stage_device_maps(cfg, world)):
            if world.is_driver:
                # Reported before the shutdown, so a shutdown that hangs loses no results.
                results.put(("ok", fn(world, cfg, *args)))
    except BaseException:
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        raise


def _await_driver(procs, results, deadline: float) -> Any:
    """The driver's result; raises if it failed, a child died first, or time ran out."""
    while True:
        try:
            status, payload = results.get(timeout=0.5)
        except queue.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"rank(s) exited early (rank, exit code): {dead}")
            if time.monotonic() > deadline:
                raise TimeoutError("the RPC world did not finish in time")
            continue
        if status == "error":
            raise RuntimeError(f"the RPC world failed on {payload}")
        return payload


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5)
        if p.is_alive():  # ignored SIGTERM (stuck in native code): no hang, whatever it costs
            p.kill()
            p.join(5)


def run_in_local_world(cfg: DictConfig, size: int, fn: Callable, args: Sequence = (),
                       timeout_s: float = 1800.0) -> Any:
    """`fn(world, cfg, *args)` on the driver of a fresh `size`-process world; its return value.

    `fn` must be importable by name (spawned children unpickle it); so must `args`.
    """
    ctx = mp.get_context("spawn")  # fork would copy the parent's threads and torch state
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, size, port, cfg, fn, args, results),
                         name=f"bench-rank{r}", daemon=True) for r in range(size)]
    try:
        for p in procs:
            p.start()
        payload = _await_driver(procs, results, time.monotonic() + timeout_s)
        end = time.monotonic() + _SHUTDOWN_S
        for p in procs:
            p.join(max(0.1, end - time.monotonic()))
        return payload
    finally:
        _stop(procs)
