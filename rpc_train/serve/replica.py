"""A replica of the served models on its workers: one stage, or a pipeline of stages, in eval mode.

The front end creates each `ServeStage` with `rpc.remote` and keeps the RRef (its lifetime);
batches go through `infer_on_stage` by (replica, stage) id, as the training pipeline's
micro-batches do, so no RRef travels per batch. A replica of several stages passes each
batch's activations stage to stage; the last stage's output returns along the chain.

A stage holds one module per (model, version) it has loaded, and every batch names its
(model, version): the stages of a replica compute a batch with the same version, whichever
others they hold. The front end sends the weights (`load`), read once from model.pt there.

A batch the front end gave up on (its RPC timed out) may still be computing: the first stage
keeps the ids of the batches running through the replica, and `probe` says which still are,
so that the front end counts them against the replica's in-flight limit until they end.
"""

import logging
import os
import threading
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.distributed.rpc as rpc
from torch import nn

from rpc_train.serve.kv_cache import SequenceCaches
from rpc_train.serve.source import ServedModel, build_served

log = logging.getLogger(__name__)

Key = Tuple[str, str]  # (model, version)

# The stages hosted by this process, by (replica, stage), for `infer_on_stage`.
_LOCAL: Dict[Tuple[int, int], "ServeStage"] = {}
# The batches running through each replica whose first stage is here, by id.
_RUNNING: Dict[int, Set[int]] = {}
_RUNNING_LOCK = threading.Lock()


def local_device(device: str) -> torch.device:
    """This worker's device: its machine's GPUs are shared out by local rank."""
    if device == "cpu":
        return torch.device("cpu")
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")


class ServeStage:
    def __init__(self, replica: int, stage: int, next_worker: Optional[str], device: str,
                 sequence_idle_s: float = 60.0):
        self.device = local_device(device)
        self.modules: Dict[Key, nn.Module] = {}
        self.sequences = SequenceCaches(sequence_idle_s)  # a GPT's KV caches, by sequence (kv_cache.py)
        self.key, self.next_worker = (replica, stage), next_worker
        _LOCAL[self.key] = self
        log.info("replica %d stage %d (pid %d) on %s", replica, stage, os.getpid(), self.device)

    def ready(self) -> int:
        return os.getpid()

    def load(self, key: Key, served: ServedModel, state: Dict[str, torch.Tensor], layers: Optional[range]) -> int:
        """Build (model, version) from the front end's weights: `layers` of it (None: all of it,
        `state` its whole state dict; else `state` holds those layers' entries only)."""
        model = build_served(served, state, strict=layers is None)
        module = model if layers is None else nn.Sequential(*[model[i] for i in layers])
        self.modules[key] = module.to(self.device).eval()
        log.info("replica %d stage %d: %s version %s loaded (%s)", *self.key, *key,
                 "whole" if layers is None else f"layers {layers.start}-{layers.stop - 1}")
        return os.getpid()

    def unload(self, key: Key) -> None:
        self.sequences.free_model(key)
        if self.modules.pop(key, None) is not None:
            log.info("replica %d stage %d: %s version %s unloaded", *self.key, *key)

    def release(self) -> None:
        _LOCAL.pop(self.key, None)


@rpc.functions.async_execution
def infer_on_stage(replica: int, stage: int, key: Key, inputs: Tuple[torch.Tensor, ...],
                   batch_id: Optional[int] = None) -> torch.futures.Future:
    """Run a batch through this stage's module of `key` (model, version), then on through the
    replica's next stage, if any. A first stage takes one tensor per model input.

    Tensors cross processes on the CPU: the front end only moves request and reply bytes, and
    a stage on a GPU copies its batch there and back. async_execution frees this RPC thread
    while the next stage computes. `batch_id` (first stage only) is kept in `_RUNNING` until
    the whole replica has answered it.
    """
    if batch_id is None:
        return _through(replica, stage, key, inputs)
    with _RUNNING_LOCK:
        _RUNNING.setdefault(replica, set()).add(batch_id)

    def ended(_=None) -> None:
        with _RUNNING_LOCK:
            _RUNNING[replica].discard(batch_id)

    try:
        future = _through(replica, stage, key, inputs)
    except BaseException:
        ended()
        raise
    future.add_done_callback(ended)
    return future


def _through(replica: int, stage: int, key: Key, inputs: Tuple[torch.Tensor, ...]) -> torch.futures.Future:
    here = _LOCAL[(replica, stage)]
    with torch.no_grad():
        y = here.modules[key](*(x.to(here.device) for x in inputs)).cpu()
    if here.next_worker is None:
        done = torch.futures.Future()
        done.set_result(y)
        return done
    return rpc.rpc_async(here.next_worker, infer_on_stage, args=(replica, stage + 1, key, (y,)))


@rpc.functions.async_execution
def probe(replica: int, batch: Optional[Tuple[Key, Tuple[torch.Tensor, ...]]],
          batch_ids: Sequence[int]) -> torch.futures.Future:
    """Which of `batch_ids` still run on this replica, after `batch` ((model, version), inputs: a
    real batch, when given) went through all its stages: a replica whose process answers but
    whose model is stuck does not."""
    def still_running(_=None) -> List[int]:
        with _RUNNING_LOCK:
            return [i for i in batch_ids if i in _RUNNING.get(replica, ())]

    if batch is None:
        done = torch.futures.Future()
        done.set_result(still_running())
        return done
    return _through(replica, 0, *batch).then(lambda answered: (answered.wait(), still_running())[1])
