"""A stand-in for a parameter server whose disk hangs, for the checkpoint-timeout test.

Run on the driver of a local RPC world (rpc_train.runtime.local_world), so it lives here,
importable by name in the spawned ranks.
"""

import time
from types import SimpleNamespace

import torch.distributed.rpc as rpc

from rpc_train.ps.driver import ServerEngine
from rpc_train.runtime.world import worker_name

HANG_S = 8.0  # longer than the test's runtime.rpc_timeout_s, short enough for a clean shutdown


class HungShard:
    def save_checkpoint(self, directory: str) -> dict:
        time.sleep(HANG_S)
        return {}


def save_through_a_hung_server(world, cfg, directory: str) -> tuple:
    """(seconds until the driver's save gave up, or None if it never did; the error's text)."""
    servers = [rpc.remote(worker_name(1), HungShard)]
    engine = ServerEngine(SimpleNamespace(servers=servers, trainers=[]))
    started = time.monotonic()
    try:
        engine.save_checkpoint(directory)
    except RuntimeError as err:
        return time.monotonic() - started, str(err)
    return None, ""
