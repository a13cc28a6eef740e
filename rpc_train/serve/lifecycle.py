"""How a serving job stops: SIGTERM or SIGINT to any of its processes becomes one drain.

- The front end (rank 0) drains when told (`STOP`): readiness goes false at once, new requests
  are still taken for serve.drain_grace_s (time for a load balancer to notice), then refused
  with UNAVAILABLE; what is queued and in flight is answered, and the RPC world shuts down
  gracefully, so every rank exits 0.
- A replica never exits on a signal: it asks the front end to drain, and goes on serving
  until the front end's graceful shutdown ends it. A replica that exited by itself would fail
  the batches still on their way to it and, through torchrun, the whole job.
- torchrun itself is started through `rpc_train.serve.agent`, which passes such a signal on to
  its workers instead of killing them after a timeout.
"""

import logging
import signal
import threading
import time

import torch.distributed.rpc as rpc

from rpc_train.config.errors import first_line
from rpc_train.runtime.world import DRIVER

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP = threading.Event()  # the front end drains once this is set
ASK_FOR_S = 60.0  # a replica keeps asking this long (the front end may still be starting)

_asked = threading.Event()


def hold_signals(front_end: bool) -> None:
    """Turn SIGTERM and SIGINT into a drain on this rank, from now on (before init_rpc, so that a
    signal during start-up is held too)."""
    for sig in SIGNALS:
        signal.signal(sig, _on_front_end_signal if front_end else _on_replica_signal)


def _on_front_end_signal(signum, frame) -> None:
    STOP.set()  # nothing else in a handler: the serving loop logs and drains


def _on_replica_signal(signum, frame) -> None:
    if not _asked.is_set():
        _asked.set()
        threading.Thread(target=_ask_front_end, args=(signal.Signals(signum).name,), name="ask-drain",
                         daemon=True).start()


def _ask_front_end(signame: str) -> None:
    log.info("%s: asking the front end to drain; this replica serves until the front end stops it", signame)
    deadline = time.monotonic() + ASK_FOR_S
    while time.monotonic() < deadline:
        try:
            rpc.rpc_sync(DRIVER, request_drain, args=(rpc.get_worker_info().name, signame), timeout=5)
            return
        except Exception as err:  # noqa: BLE001 - RPC not up yet, or the front end stopping already
            reason = first_line(err)
            time.sleep(0.5)
    log.info("the front end did not take the request to drain (%s); waiting to be stopped", reason)


def request_drain(worker: str, signame: str) -> None:
    """On the front end, by RPC from a replica that got a signal."""
    if not STOP.is_set():
        log.info("%s got %s: draining", worker, signame)
    STOP.set()
