"""One rank of a two-process RPC world whose graceful shutdown can never end
(`python -m helpers.stuck_shutdown <runtime.rpc_timeout_s>`, under torchrun on one machine).

The driver stops the worker with SIGSTOP before it shuts down: torch's shutdown then waits, with
no timeout of its own, for the worker to acknowledge the end (`_all_gather`'s broadcast)."""

import os
import signal
import sys

import torch.distributed.rpc as rpc

from rpc_train.config.compose import compose
from rpc_train.runtime.session import rpc_session
from rpc_train.runtime.world import World, configure_process, worker_name


def main(rpc_timeout_s: float) -> None:
    cfg = compose([f"runtime.rpc_timeout_s={rpc_timeout_s}"])
    world = World.from_env()
    configure_process(cfg.runtime, world)
    with rpc_session(cfg.runtime, world):
        if world.is_driver:
            worker = rpc.rpc_sync(worker_name(1), os.getpid)
            os.kill(worker, signal.SIGSTOP)
            print(f"driver: stopped the worker ({worker}), shutting down", flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]))
