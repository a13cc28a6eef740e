"""One pipeline stage: a slice of the model's layers, its optimizer, living on one worker.

The driver creates each `StageWorker` with `rpc.remote` and keeps the RRef: the RRef owns the
stage's lifetime and carries the control calls (state, checkpoints, profiles). The per-batch
and per-micro-batch paths, and stage 0's calls that have the other stages step, instead call
functions by stage id (`train_on_stage`, `forward_on_stage`, `_call_stage`): passing an RRef
as an argument would run the RRef fork protocol (extra messages) for every call.

A micro-batch goes stage to stage with its targets; the last stage computes the loss and
starts the distributed backward in the micro-batch's context (`finish`), and each stage's
reply carries only the loss and correct count, detached, so no autograd send/recv pair is
recorded on the way back.
"""

import functools
import logging
import os
import resource
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
from torch import nn
from torch.profiler import record_function

from rpc_train.checkpoint.shares import load_worker_state, save_worker_state
from rpc_train.pipeline.feed import Feeder
from rpc_train.pipeline.memory import ActivationMeter
from rpc_train.pipeline.messages import context_messages
from rpc_train.pipeline.profile import RankProfiler
from rpc_train.runtime.devices import on_device_stream, own_device
from rpc_train.training.builders import build_model, build_optimizer
from rpc_train.training.loss import correct_of, loss_of

log = logging.getLogger(__name__)

# The stages hosted by this process, by stage id, for `forward_on_stage`.
_LOCAL_STAGES: Dict[int, "StageWorker"] = {}


class _Clock(torch.autograd.Function):
    """Identity in forward; records when the gradient passes in backward.

    One at a stage's output and one at its input bracket the stage's backward compute
    (perf_counter is CLOCK_MONOTONIC: comparable across the processes of one machine). The
    `anchor` input requires grad so the node is in the graph even when `x` does not (stage 0).
    """

    @staticmethod
    def forward(ctx, x, anchor, record):
        ctx.record = record
        ctx.x_requires_grad = x.requires_grad
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.record(time.perf_counter())
        return (grad if ctx.x_requires_grad else None), None, None


def _ends_with_graph_task(span: list, ended):
    """The first stage's backward clock: start when the gradient arrives, end with the backward.

    Its input needs no gradient, and a clock on the input would ask for one: a conv block's
    backward then also computes its input's gradient, which nobody reads and which costs about
    as much as the weights' (docs/benchmarks.md has the convnet's figure). So the
    end (`ended(t)`) is taken by a callback that the autograd engine runs once this stage's
    part of the micro-batch's backward is done.
    """

    def started(t: float) -> None:
        span[1] = t
        torch.autograd.Variable._execution_engine.queue_callback(lambda: ended(time.perf_counter()))

    return started


def _on_stage_stream(method):
    """A control call (step, state, checkpoints) that touches the stage's GPU tensors."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with on_device_stream(self.device):
            return method(self, *args, **kwargs)

    return run


class StageWorker:
    def __init__(self, stage_id: int, model_cfg: dict, layers: range, optim_cfg: dict,
                 scheduler_cfg: Optional[dict], device: str, seed: int, max_in_flight: Optional[int] = None,
                 loss: str = "cross_entropy", micro_batches: int = 1):
        """`max_in_flight`: 1F1B's bound, training micro-batches past this stage's forward whose
        backward here has not ended (None: no bound, GPipe). `device`: cpu or cuda, which GPU
        this worker picks itself (`own_device`); `loss`: the last stage's loss function
        (training/loss.py); `micro_batches`: how stage 0 splits each batch."""
        self.stage_id = stage_id
        self.loss = loss
        self.max_in_flight = max_in_flight
        self._in_flight = 0
        self.device = torch.device(own_device(device))
        full = build_model(model_cfg, seed)
        with on_device_stream(self.device):  # the copies are ordered before the first forward
            self.module = nn.Sequential(*[full[i] for i in layers]).to(self.device)
        self.layers = layers
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        # A stage of parameter-free layers only (a time-balanced split can make one) steps nothing.
        self.optimizer, self.scheduler = (build_optimizer(self.params, optim_cfg, scheduler_cfg)
                                          if self.params else (None, None))
        self.memory = ActivationMeter(self.params, self.device)
        # Where each stage runs (own_device: by local rank), as the serving replicas say it.
        log.info("stage %d (pid %d) on %s", stage_id, os.getpid(), self.device)
        self.next_stage: Optional[tuple] = None  # (worker name, stage id)
        self.others: List[tuple] = []  # stage 0: the other stages, (worker name, stage id)
        self._anchor = torch.zeros((), requires_grad=True)
        self._turn = threading.Lock()  # guards _next_seq, _in_flight and _waiting
        self._next_seq = 0
        self._waiting: Dict[int, threading.Condition] = {}  # seq -> the RPC thread holding it
        self._forward_spans: List[tuple] = []
        self._backward_spans: List[list] = []
        self._faults = _page_faults()
        self.feeder = Feeder(self, micro_batches) if stage_id == 0 else None
        self._profiler: Optional[RankProfiler] = None  # made on the first start_profile
        _LOCAL_STAGES[stage_id] = self

    def __reduce__(self):
        # A stage never travels: it is reached through its RRef. But with CUDA device maps the
        # RPC agent pickles an RRef's value just to find the CUDA tensors in it (for stream
        # syncs), and the stage's lock cannot be pickled; as a lookup by id it holds none.
        return _local_stage, (self.stage_id,)

    def connect(self, next_worker: Optional[str], next_stage_id: Optional[int], others: Sequence[tuple] = ()) -> None:
        """The next stage, and for stage 0 the stages after it, which it has step (`step_pipeline`)."""
        self.next_stage = (next_worker, next_stage_id) if next_worker else None
        self.others = [tuple(other) for other in others]

    def _wait_turn(self, seq: int, training: bool) -> None:
        # Micro-batches run in the order stage 0 numbered them, whatever order the RPC
        # threads pick them up in: batch-norm statistics then match single-process training.
        # The wait blocks this RPC thread (hence micro_batches < num_worker_threads): queueing
        # the micro-batch for another thread would lose its distributed-autograd context,
        # which is current only on the thread that received the request.
        with self._turn:
            # Only micro-batch `_next_seq` may go on, so only its thread is woken (see _wake_next):
            # waking every waiting thread on every change would cost each a GIL round.
            wake = self._waiting[seq] = threading.Condition(self._turn)
            # 1F1B: the next forward starts here the moment an earlier backward ends here,
            # without a round trip to the driver. The earliest micro-batch in flight can
            # always finish, so the wait ends.
            while self._next_seq != seq or (training and self.max_in_flight is not None
                                            and self._in_flight >= self.max_in_flight):
                wake.wait()
            del self._waiting[seq]
            if training:
                self._in_flight += 1

    def _wake_next(self) -> None:
        # Called with self._turn held.
        wake = self._waiting.get(self._next_seq)
        if wake is not None:
            wake.notify()

    def _backward_ended(self, span: list, t: float) -> None:
        span[2] = t
        with self._turn:
            self.memory.released(span[0])
            self._in_flight -= 1
            self._wake_next()

    def _done_turn(self) -> None:
        with self._turn:
            self._next_seq += 1
            self._wake_next()

    def compute(self, seq: int, x: torch.Tensor, training: bool) -> torch.Tensor:
        self._wait_turn(seq, training)
        try:
            start = time.perf_counter()
            if x.is_cuda:
                # TensorPipe allocated x on the request's pool stream; once freed, its memory
                # must not be reused there before this stream's kernels have read it.
                x.record_stream(torch.cuda.current_stream(x.device))
            x = x.to(self.device, non_blocking=True)
            if self.module.training != training:
                self.module.train(training)
            with torch.set_grad_enabled(training):
                if training:
                    span = [seq, 0.0, 0.0]  # backward (start, end), filled in by the clocks
                    self._backward_spans.append(span)
                    ended = functools.partial(self._backward_ended, span)
                    if x.requires_grad:  # the backward ends when the gradient reaches the input
                        x = _Clock.apply(x, self._anchor, ended)
                        started = lambda t: span.__setitem__(1, t)  # noqa: E731
                    else:
                        started = _ends_with_graph_task(span, ended)
                    with self.memory.forward(seq), record_function(f"stage{self.stage_id}/forward"):
                        y = self.module(x)
                    y = _Clock.apply(y, self._anchor, started)
                else:
                    with record_function(f"stage{self.stage_id}/forward"):
                        y = self.module(x)
            if training:
                self._forward_spans.append((seq, start, time.perf_counter()))
                with self._turn:
                    self.memory.held(seq)
            return y
        except BaseException:
            if training:  # no backward will ever end here for it: give its 1F1B place back
                with self._turn:
                    self._in_flight -= 1
            raise
        finally:
            self._done_turn()

    def forward_async(self, seq: int, x: torch.Tensor, targets: torch.Tensor, batch: Optional[int],
                      context_id: Optional[int]) -> torch.futures.Future:
        """Micro-batch `seq` through this stage, then on to the next one, or to the loss here on
        the last: a Future of (loss, correct). Training when `context_id` names its autograd
        context; `batch`, the whole batch's predictions (training/loss.py `predictions`: its
        samples, or its tokens), then scales its share of the loss."""
        with on_device_stream(self.device):  # y is sent as ready on the stage's stream
            y = self.compute(seq, x, context_id is not None)
            if self.next_stage is None:
                done = torch.futures.Future()
                done.set_result(self.finish(y, targets, batch, context_id))
                return done
            worker, next_id = self.next_stage
            return rpc.rpc_async(worker, forward_on_stage, args=(next_id, seq, y, targets, batch, context_id))

    def forward(self, seq: int, x: torch.Tensor, targets: torch.Tensor, batch: int, context_id: int) -> tuple:
        return self.forward_async(seq, x, targets, batch, context_id).wait()

    def finish(self, out: torch.Tensor, targets: torch.Tensor, batch: Optional[int],
               context_id: Optional[int]) -> tuple:
        """The last stage: the micro-batch's loss and correct count, and in training its backward.

        The loss is summed, then divided by the whole batch's predictions (one per sample, or
        one per token of a sequence model): the micro-batches' losses add up to the batch's
        mean loss, so gradients match one pass over the batch. The backward
        runs even for a non-finite loss (the driver then drops the step): with 1f1b, later
        forwards wait at each stage for this backward to end there.
        """
        targets = targets.to(out.device, non_blocking=True)
        loss = loss_of(out, targets, reduction="sum", name=self.loss)
        correct = correct_of(out, targets)
        if context_id is None:
            return loss.item(), correct
        loss = loss / batch
        dist_autograd.backward(context_id, [loss])
        return loss.item(), correct

    def step_pipeline(self, context_ids: List[int], skip: bool) -> Optional[List[Dict[str, Any]]]:
        """Stage 0, once every backward of the step is done: every stage steps (`step`), the
        others through one call each while this one steps, and their stats come back in stage
        order; or, to skip a step with a non-finite loss, every stage drops its stats (None)."""
        call = ("drop_stats",) if skip else ("step", context_ids)
        calls = [rpc.rpc_async(worker, _call_stage, args=(stage_id, *call)) for worker, stage_id in self.others]
        own = self.drop_stats() if skip else self.step(context_ids)
        others = torch.futures.wait_all(calls)
        return None if skip else [own, *others]

    @_on_stage_stream
    def step(self, context_ids: List[int]) -> Dict[str, Any]:
        """Sum this stage's gradients over the micro-batches' autograd contexts and step.

        Contexts are summed in the order given, so the result does not depend on the order in
        which the backward passes happened to finish.
        """
        for p in self.params:
            p.grad = None
        # Each micro-batch's forward request to this stage and its reply (stage 0 gets whole
        # batches from the driver instead), and what the contexts record (pipeline/messages.py).
        requests = len(context_ids) if self.stage_id > 0 else 0
        messages = 2 * requests + sum(context_messages(c) for c in context_ids)
        for context_id in context_ids:
            grads = dist_autograd.get_gradients(context_id)
            sums, addends = [], []
            for p in self.params:
                g = grads.get(p)
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g  # the context's own tensor: it is not read again once summed here
                else:
                    sums.append(p.grad)
                    addends.append(g)
            if sums:
                # One fused add per context rather than one kernel per parameter: ResNet-50 on a
                # GPU would otherwise launch ~160 kernels per micro-batch here.
                torch._foreach_add_(sums, addends)
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return {**self.pop_stats(), "messages": messages}

    def pop_stats(self) -> Dict[str, Any]:
        """Compute times of the last step, each micro-batch's forward/backward span, and the
        process's page faults since the last step (memory the allocator gave back and re-took)."""
        spans = [("F", seq, a, b) for seq, a, b in self._forward_spans]
        spans += [("B", seq, a, b) for seq, a, b in self._backward_spans if a and b]
        faults, self._faults = self._faults, _page_faults()
        stats = {"forward_ms": 1e3 * sum(b - a for kind, _, a, b in spans if kind == "F"),
                 "backward_ms": 1e3 * sum(b - a for kind, _, a, b in spans if kind == "B"),
                 "page_faults": self._faults - faults, "peak_memory_mb": self.memory.pop_peak_mb(),
                 "lr": self.optimizer.param_groups[0]["lr"] if self.optimizer else None, "spans": spans}
        self._forward_spans, self._backward_spans = [], []
        return stats

    def drop_stats(self) -> None:
        """Forget a step that was not applied (a skipped non-finite loss)."""
        self._forward_spans, self._backward_spans = [], []
        self.memory.pop_peak_mb()

    @_on_stage_stream
    def state_dict(self) -> Dict[str, Any]:
        """Parameters and buffers named as in the full model (`<layer index>.<name>`)."""
        return {self._global_name(key): value.detach().cpu() for key, value in self.module.state_dict().items()}

    def start_profile(self) -> None:
        if self._profiler is None:
            self._profiler = RankProfiler()
        self._profiler.start(self.device.type)

    def stop_profile(self) -> dict:
        return self._profiler.stop()

    def release(self) -> None:
        """Forget this stage so its tensors can be freed once the driver's RRef goes too."""
        if self.feeder is not None:
            self.feeder.close()
        if self._profiler is not None:
            self._profiler.close()
        if _LOCAL_STAGES.get(self.stage_id) is self:
            del _LOCAL_STAGES[self.stage_id]

    # Checkpoints: this stage's share, keyed by names of the full model (checkpoint/shares.py),
    # so a checkpoint saved with another split of the layers loads here too.
    def _global_name(self, local: str) -> str:
        idx, rest = local.split(".", 1)
        return f"{self.layers[int(idx)]}.{rest}"

    def _param_names(self) -> List[str]:
        # In the optimizer's order, that of self.params.
        return [self._global_name(n) for n, p in self.module.named_parameters() if p.requires_grad]

    def _owner(self) -> list:
        return ["pipeline layers", self.layers.start, self.layers.stop]

    @_on_stage_stream
    def save_checkpoint(self, directory: str) -> Dict[str, Any]:
        return save_worker_state(directory, f"stage{self.stage_id}.pt", self.state_dict(), self.optimizer,
                                 self._param_names(), self.scheduler, self._owner())

    @_on_stage_stream
    def load_checkpoint(self, directory: str, index: Dict[str, str]) -> None:
        local = {self._global_name(n): n for n in self.module.state_dict()}
        tensors = load_worker_state(directory, index, local, self.optimizer, self._param_names(),
                                    self.scheduler, self._owner())
        self.module.load_state_dict({local[name]: t for name, t in tensors.items()})


def _page_faults() -> int:
    # Minor faults: a page the kernel had to map (and zero) on first touch.
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _local_stage(stage_id: int) -> "StageWorker":
    return _LOCAL_STAGES[stage_id]


def _call_stage(stage_id: int, method: str, *args):
    """Stage 0's call to another stage's `step` or `drop_stats` (`StageWorker.step_pipeline`)."""
    return getattr(_LOCAL_STAGES[stage_id], method)(*args)


@rpc.functions.async_execution
def forward_on_stage(stage_id: int, seq: int, x: torch.Tensor, targets: torch.Tensor, batch: Optional[int],
                     context_id: Optional[int]) -> torch.futures.Future:
    """Run micro-batch `seq` through this stage and push it on (`StageWorker.forward_async`).

    Activations go stage to stage, never through the driver; async_execution frees this RPC
    thread while the later stages work.
    """
    return _LOCAL_STAGES[stage_id].forward_async(seq, x, targets, batch, context_id)


@rpc.functions.async_execution
def train_on_stage(stage_id: int, x: torch.Tensor, y: torch.Tensor) -> torch.futures.Future:
    """Stage 0: a training batch through the pipeline (`Feeder.train`)."""
    return _LOCAL_STAGES[stage_id].feeder.train(x, y)


@rpc.functions.async_execution
def evaluate_on_stage(stage_id: int, x: torch.Tensor, y: torch.Tensor) -> torch.futures.Future:
    """Stage 0: an evaluation batch through the pipeline (`Feeder.evaluate`)."""
    return _LOCAL_STAGES[stage_id].feeder.evaluate(x, y)
