"""The RPC session: init_rpc with TensorPipe on entry, shutdown on exit, and ending the job.

One failing rank must end the whole job: on an error the driver makes every worker exit
(`abort_workers`) before it shuts down without waiting for them. A graceful shutdown that does
not end within an RPC timeout ends the driver with its stacks printed (docs/launcher.md).
"""

import faulthandler
import logging
import os
import threading
import warnings
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch.distributed.rpc as rpc

from rpc_train.config.errors import first_line
from rpc_train.config.schema import RuntimeConf
from rpc_train.runtime.liveness import ask_whereabouts, kill_if_sibling, timed_out
from rpc_train.runtime.world import World, worker_name

log = logging.getLogger(__name__)

def _quiet_torch_internals() -> None:
    # init_rpc exchanges device maps through a gloo group internally and trips torch's own
    # deprecation warning about using a Backend as a ProcessGroup; nothing we call can avoid it.
    warnings.filterwarnings("ignore", message=r"You are using a Backend .* as a ProcessGroup")


def backend_options(runtime: RuntimeConf, device_maps: Optional[Dict[str, Dict[str, str]]] = None):
    options = rpc.TensorPipeRpcBackendOptions(
        init_method="env://",
        num_worker_threads=runtime.num_worker_threads,
        rpc_timeout=runtime.rpc_timeout_s,
        _transports=list(runtime.transports),
    )
    for peer, mapping in (device_maps or {}).items():
        options.set_device_map(peer, mapping)
    return options


@contextmanager
def rpc_session(runtime: RuntimeConf, world: World, device_maps=None) -> Iterator[None]:
    """init_rpc on entry (after world.configure_process, which names the interface to listen on);
    a graceful shutdown on success.

    On an exception the driver stops every worker first (see `abort_workers`) and shuts down
    without waiting, so one failing rank ends the whole job instead of leaving the others
    blocked in shutdown.
    """
    _quiet_torch_internals()
    rpc.init_rpc(world.name, rank=world.rank, world_size=world.size,
                 rpc_backend_options=backend_options(runtime, device_maps))
    workers = [worker_name(r) for r in range(1, world.size)]
    whereabouts = ask_whereabouts(workers) if world.is_driver else {}
    try:
        yield
    except BaseException as err:
        if world.is_driver:
            # Said first: once a worker exits, torchrun may end this process before it prints.
            log.error("stopping every worker after %s: %s", type(err).__name__, first_line(err))
            abort_workers(world, whereabouts)
        rpc.shutdown(graceful=False)
        raise
    if world.is_driver:
        # The driver reaches the graceful shutdown last, every other rank waiting in it already, so
        # it ends in moments. One still going after an RPC timeout is stuck inside torch, where
        # Python cannot interrupt it: faulthandler then prints every thread's stack to stderr and
        # ends this rank with 1 (torchrun stops the rest), where the job would never exit.
        faulthandler.dump_traceback_later(runtime.rpc_timeout_s, exit=True)
    rpc.shutdown()
    if world.is_driver:
        faulthandler.cancel_dump_traceback_later()


def _exit_soon(code: int, delay_s: float) -> None:
    # Runs on a worker's RPC thread: the timer lets this reply leave first, and lets the
    # driver exit before the workers, so torchrun reports the driver's error as the root cause.
    threading.Timer(delay_s, os._exit, args=(code,)).start()


def abort_workers(world: World, whereabouts: Optional[Dict] = None, code: int = 1, delay_s: float = 5.0) -> None:
    """Make every worker exit with `code` shortly (best effort: dead workers are skipped).

    On one machine torchrun stops the workers as soon as the driver fails; the timer is
    what ends workers on other machines. A stopped worker never answers, so the wait is
    bounded well inside `delay_s`: the driver ends first and torchrun reports its error.
    One that does not answer is killed if it runs on this machine (`liveness.kill_if_sibling`).
    """
    futures = {}
    for name in (worker_name(r) for r in range(1, world.size)):
        try:
            futures[name] = rpc.rpc_async(name, _exit_soon, args=(code, delay_s), timeout=delay_s / 2)
        except RuntimeError:  # the agent already knows this worker's connection is closed: gone
            pass
    for name, future in futures.items():
        try:
            future.wait()
        except Exception as err:  # noqa: BLE001 - gone already (what we wanted), or silent
            if timed_out(err):
                kill_if_sibling(name, (whereabouts or {}).get(name))
