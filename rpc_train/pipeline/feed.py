"""Stage 0 feeds the pipeline: the driver hands it a whole batch in one call.

Stage 0 splits the batch into micro-batches and gives each its own distributed-autograd
context, on a thread of its own that holds the context open until the stages have stepped
(closing it frees the gradients). Its forward goes to the next stage with the targets; the
last stage computes the loss and starts the backward (`StageWorker.finish`), so gradients
cross only the K-1 stage boundaries and the driver takes no part in autograd at all. Once
every backward is done, stage 0 has every stage step (itself in place, the others by one call
each) and closes the contexts before it answers: a training step is one call from the driver,
where it was one per micro-batch, each carrying a recorded send whose backward and context
cleanup cost four more messages, plus one per stage to step and one to end the step
(docs/benchmarks.md, "anatomy").
"""

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List

import torch
import torch.distributed.autograd as dist_autograd

from rpc_train.runtime.devices import after_current_stream, bind_cuda_context
from rpc_train.training.loss import predictions


class Feeder:
    def __init__(self, stage, micro_batches: int):
        self.stage = stage
        self.micro_batches = micro_batches
        # One thread per micro-batch: each holds its autograd context until the step. A new
        # thread starts with OpenMP's default team (every core), not the process's
        # runtime.threads: on a busy machine its idle team spins, burning cores the other
        # stages need (stage 0 of the MLP took 2x its CPU time). torch's own threads (RPC,
        # autograd) are set up this way when they start.
        self._pool = ThreadPoolExecutor(micro_batches, thread_name_prefix="micro-batch",
                                        initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
        self._release = threading.Event()
        self._seq = 0

    def take_seq(self) -> int:
        """The next micro-batch's sequence number: every stage runs micro-batches in this order."""
        seq, self._seq = self._seq, self._seq + 1
        return seq

    def _chunks(self, x: torch.Tensor, y: torch.Tensor):
        m = min(self.micro_batches, len(x))  # a last, short batch may have fewer rows than that
        return zip(x.tensor_split(m), y.tensor_split(m))

    def train(self, x: torch.Tensor, y: torch.Tensor) -> torch.futures.Future:
        """A Future of the step: ([(loss share, correct)] per micro-batch, then each stage's
        stats from its optimizer step in stage order, or None where a non-finite loss skipped
        the step, then the steps' wall-clock ms), set once every stage has stepped."""
        self._release = release = threading.Event()
        reports = []
        # On a GPU the batch arrived on this request's stream; the micro-batch threads work on
        # the stage's stream, which must wait for it first.
        after_current_stream(self.stage.device)
        for cx, cy in self._chunks(x, y):
            report = torch.futures.Future()
            self._pool.submit(self._micro_batch, self.take_seq(), cx, cy, predictions(y), release, report)
            reports.append(report)
        # Runs on the thread of the micro-batch that ends last (or fails first): ours, not an
        # RPC thread, so it may wait for the other stages' steps.
        return all_or_first_error(reports).then(lambda done: self._step(done, release))

    def _step(self, done: torch.futures.Future, release: threading.Event) -> tuple:
        """Every backward is done: every stage steps, or drops the step's stats where the
        batch's loss is not finite, and then the micro-batches' contexts close."""
        try:
            reports = done.wait()
            ids = [r[0] for r in reports]
            skip = not math.isfinite(sum(r[1] for r in reports))
            started = time.perf_counter()
            per_stage = self.stage.step_pipeline(ids, skip)
            return [r[1:] for r in reports], per_stage, 1e3 * (time.perf_counter() - started)
        finally:
            release.set()  # the stages have read their gradients (or never will)

    def _micro_batch(self, seq, x, y, batch, release, report: torch.futures.Future) -> None:
        try:
            bind_cuda_context(self.stage.device)
            with dist_autograd.context() as context_id:
                loss, correct = self.stage.forward(seq, x, y, batch, context_id)
                report.set_result((context_id, loss, correct))
                release.wait()
        except BaseException as err:  # noqa: BLE001 - handed to the driver's call
            if not report.done():
                report.set_exception(err)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> torch.futures.Future:
        """A Future of the batch's (summed loss, correct count); micro-batches pipeline as in training."""
        results = [self.stage.forward_async(self.take_seq(), cx, cy, None, None) for cx, cy in self._chunks(x, y)]
        return all_or_first_error(results).then(lambda done: tuple(map(sum, zip(*done.wait()))))

    def close(self) -> None:
        self._release.set()  # a step that failed may still hold its contexts
        self._pool.shutdown(wait=True)


def all_or_first_error(futures: List[torch.futures.Future]) -> torch.futures.Future:
    """A Future of every result, in order, or of the first error as soon as it happens.

    `collect_all` would wait for every future, and after one micro-batch fails the others may
    never finish: a stage that never sees that micro-batch's forward, or whose 1F1B place it
    never gives back, holds the later ones at their turn. The step then fails at once with
    its real error, not after runtime.rpc_timeout_s with a timeout.
    """
    combined, lock, left = torch.futures.Future(), threading.Lock(), [len(futures)]

    def done(future: torch.futures.Future) -> None:
        try:
            future.wait()
        except BaseException as err:  # noqa: BLE001 - handed on as the combined error
            with lock:
                if not combined.done():
                    combined.set_exception(err)
            return
        with lock:
            left[0] -= 1
            if left[0] == 0 and not combined.done():
                combined.set_result([f.value() for f in futures])

    if not futures:
        combined.set_result([])
    for future in futures:
        future.add_done_callback(done)
    return combined
