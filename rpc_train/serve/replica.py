"""A replica of the served models on its workers: one stage, or a pipeline of stages, in eval mode.

The front end creates each `ServeStage` with `rpc.remote` and keeps the RRef (its lifetime);
batches go through `infer_on_stage` by (replica, stage) id, as the training pipeline's
micro-batches do, so no RRef travels per batch. A replica of several stages passes each
batch's activations stage to stage; the last stage's output returns along the chain.

A stage holds one module per (model, version) it has loaded, and every batch names its
(model, version): the stages of a replica compute a batch with the same version, whichever
others they hold. The front end sends the weights (`load`), read once from model.pt there.
"""

import logging
import os
from typing import Dict, Optional, Tuple

import torch
import torch.distributed.rpc as rpc
from torch import nn

from rpc_train.serve.source import ServedModel, build_served

log = logging.getLogger(__name__)

# The stages hosted by this process, by (replica, stage), for `infer_on_stage`.
_LOCAL: Dict[Tuple[int, int], "ServeStage"] = {}


def local_device(device: str) -> torch.device:
    """This worker's device: its machine's GPUs are shared out by local rank."""
    if device == "cpu":
        return torch.device("cpu")
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")


class ServeStage:
    def __init__(self, replica: int, stage: int, next_worker: Optional[str], device: str):
        self.device = local_device(device)
        self.modules: Dict[Tuple[str, str], nn.Module] = {}  # by (model, version)
        self.key, self.next_worker = (replica, stage), next_worker
        _LOCAL[self.key] = self
        log.info("replica %d stage %d (pid %d) on %s", replica, stage, os.getpid(), self.device)

    def ready(self) -> int:
        return os.getpid()

    def load(self, key: Tuple[str, str], served: ServedModel, state: Dict[str, torch.Tensor],
             layers: Optional[range]) -> int:
        """Build (model, version) from the front end's weights: `layers` of it (None: all of it,
        `state` its whole state dict; else `state` holds those layers' entries only)."""
        model = build_served(served, state, strict=layers is None)
        module = model if layers is None else nn.Sequential(*[model[i] for i in layers])
        self.modules[key] = module.to(self.device).eval()
        log.info("replica %d stage %d: %s version %s loaded (%s)", *self.key, *key,
                 "whole" if layers is None else f"layers {layers.start}-{layers.stop - 1}")
        return os.getpid()

    def unload(self, key: Tuple[str, str]) -> None:
        if self.modules.pop(key, None) is not None:
            log.info("replica %d stage %d: %s version %s unloaded", *self.key, *key)

    def release(self) -> None:
        _LOCAL.pop(self.key, None)


@rpc.functions.async_execution
def infer_on_stage(replica: int, stage: int, key: Tuple[str, str], *inputs: torch.Tensor) -> torch.futures.Future:
    """Run a batch through this stage's module of `key` (model, version), then on through the
    replica's next stage, if any. A first stage takes one tensor per model input.

    Tensors cross processes on the CPU: the front end only moves request and reply bytes, and
    a stage on a GPU copies its batch there and back. async_execution frees this RPC thread
    while the next stage computes.
    """
    here = _LOCAL[(replica, stage)]
    with torch.no_grad():
        y = here.modules[key](*(x.to(here.device) for x in inputs)).cpu()
    if here.next_worker is None:
        done = torch.futures.Future()
        done.set_result(y)
        return done
    return rpc.rpc_async(here.next_worker, infer_on_stage, args=(replica, stage + 1, key, y))


def answer() -> int:
    """The probe of a replica out of rotation: any answer means its process serves RPCs again."""
    return os.getpid()
