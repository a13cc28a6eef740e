"""Trainers report to the driver by RPC; the driver combines, logs, and watches for failures.

A trainer sends a `TrainerReport` every `trainer.log_every` steps (and a heartbeat when it has
been quiet for a while). The driver puts reports and the trainers' finished epochs on one
queue and blocks on it, so it needs no polling: when every live trainer has reported step s,
step s is logged as one point, as the pipeline logs one step.
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from rpc_train.config.errors import RunFailure, first_line
from rpc_train.loader.metrics import loader_scalars
from rpc_train.metrics.progress import Progress
from rpc_train.metrics.tensorboard import RunLogger
from rpc_train.runtime.remote import call_all

log = logging.getLogger(__name__)

# On the driver: ("report", trainer, TrainerReport) and ("done", trainer, Future) events.
_EVENTS: "queue.Queue[tuple]" = queue.Queue()


@dataclass
class TrainerReport:
    """One trainer's window of steps; `step` 0 marks a heartbeat that carries nothing."""

    trainer: int
    step: int = 0  # the trainer's steps so far when sent (its last step in the window)
    epoch: int = 0
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    loss: float = 0.0  # summed over the steps; each step's loss is a batch mean
    correct: int = 0
    predictions: int = 0  # what `correct` counts of: samples, or a sequence model's tokens
    staleness: List[int] = field(default_factory=list)  # one per applied gradient
    refreshes: int = 0  # gradients a server refused as too stale
    lr: float = 0.0
    input_wait_s: float = 0.0  # waiting for batches from the data service (loader=service)

    def add(self, loss: float, correct: int, samples: int, seconds: float, predictions: Optional[int] = None) -> None:
        self.steps, self.samples, self.seconds = self.steps + 1, self.samples + samples, self.seconds + seconds
        self.loss, self.correct = self.loss + loss, self.correct + correct
        self.predictions += samples if predictions is None else predictions

    def note_push(self, applied: bool, staleness: int, lr: float) -> None:
        if applied:
            self.staleness.append(staleness)
        else:
            self.refreshes += 1
        self.lr = lr

    def heartbeat(self, epoch: int) -> "TrainerReport":
        return TrainerReport(self.trainer, epoch=epoch)


def record_report(report: TrainerReport) -> None:
    """RPC target, run on the driver: a trainer's report joins the driver's event queue."""
    _EVENTS.put(("report", report.trainer, report))


# Validation accuracy this far below the run's best so far counts as a collapse.
COLLAPSE = 0.2


def collapse_warning(best: Optional[float], now: float, step: int, stalest: Optional[Tuple[int, int]],
                     remedy: str) -> Optional[str]:
    """One line for a validation accuracy that collapsed, naming the stalest gradient since the
    last validation (the likeliest culprit) and what to try; None when nothing collapsed."""
    if best is None or now >= best - COLLAPSE:
        return None
    culprit = (f"; the stalest gradient applied since the last validation was trainer {stalest[1]}'s, "
               f"staleness {stalest[0]}" if stalest else "")
    return f"validation accuracy collapsed from {best:.3f} to {now:.3f} at step {step}{culprit}; {remedy}"


def staleness_of(reports: List[TrainerReport]) -> List[int]:
    """The staleness of every gradient the servers applied in these windows."""
    return [s for r in reports for s in r.staleness]


def combine(reports: List[TrainerReport]) -> Dict[str, float]:
    """One logged point from the trainers' windows ending at the same step."""
    steps, samples = sum(r.steps for r in reports), sum(r.samples for r in reports)
    scalars = {
        "train/loss": sum(r.loss for r in reports) / steps,
        "train/accuracy": sum(r.correct for r in reports) / sum(r.predictions for r in reports),
        # The trainers run side by side, so their rates add up.
        "throughput/samples_per_s": sum(r.samples / r.seconds for r in reports),
        "time/step_ms": 1e3 * sum(r.seconds for r in reports) / steps,
        "lr": reports[0].lr,
        "ps/stale_refreshes": float(sum(r.refreshes for r in reports)),
    }
    if sum(r.predictions for r in reports) != samples:  # a sequence model: one prediction per token
        scalars["throughput/tokens_per_s"] = sum(r.predictions / r.seconds for r in reports)
    waited = sum(r.input_wait_s for r in reports)
    if waited:  # the trainers wait side by side: the share of their time spent waiting
        scalars["loader/input_wait_fraction"] = waited / (waited + sum(r.seconds for r in reports))
    staleness = staleness_of(reports)
    if staleness:
        scalars["ps/staleness_mean"] = sum(staleness) / len(staleness)
        scalars["ps/staleness_max"] = float(max(staleness))
    return scalars


class ProgressMonitor:
    """On the driver: logs what the trainers report and ends, or goes on, when one fails."""

    def __init__(self, logger: RunLogger, trainer_names: List[str], servers: list, sync: bool,
                 stall_s: float, progress: Progress, service=None):
        """`service`: the data service (loader=service), whose workers' figures are logged too."""
        self.logger, self.names, self.servers = logger, trainer_names, servers
        self.sync, self.stall_s = sync, stall_s
        self.live = set(range(len(trainer_names)))
        self.final: Dict[str, float] = {}
        self._windows: Dict[int, Dict[int, TrainerReport]] = {}
        self._heard: Dict[int, float] = {}
        self._futures: Dict[int, torch.futures.Future] = {}
        self._silent: Dict[int, torch.futures.Future] = {}  # left out for silence (async)
        self.progress, self.service = progress, service
        self._logged_step = progress.step
        # (staleness, trainer) of the stalest gradient applied since `pop_stalest`.
        self._stalest: Optional[Tuple[int, int]] = None

    def watch(self, futures: Dict[int, torch.futures.Future]) -> None:
        """Block until every trainer's `run_epoch` future is done, logging as reports come."""
        for i, future in futures.items():
            future.add_done_callback(lambda f, i=i: _EVENTS.put(("done", i, f)))
        running, self._futures = set(futures), futures
        self._heard = {i: time.monotonic() for i in running}
        while running:
            try:
                kind, i, payload = _EVENTS.get(timeout=self._until_stall(running))
            except queue.Empty:
                running -= self._drop_stalled(running)
                continue
            if i not in self.live:
                continue  # a trainer already given up on (async) may still report
            self._heard[i] = time.monotonic()
            if kind == "report" and payload.step:
                self._on_report(payload)
            elif kind == "done":
                running.discard(i)
                self._on_done(i, payload)
        self._log_complete(flush=True)

    def _until_stall(self, running: set) -> float:
        return max(0.05, min(self._heard[i] for i in running) + self.stall_s - time.monotonic())

    def _drop_stalled(self, running: set) -> set:
        now = time.monotonic()
        stalled = sorted(i for i in running if now - self._heard[i] >= self.stall_s)
        if self.sync and stalled:
            # One stuck trainer silences them all (each waits for its gradient), whichever
            # fell quiet first: blame the one the servers are waiting for (`_lost` raises).
            stalled = sorted(self._missing() & running) or stalled
        for i in stalled:
            self._lost(i, f"no progress report for {self.stall_s:.0f} s (runtime.rpc_timeout_s)")
            self._silent[i] = self._futures[i]
        return set(stalled)

    def stuck_trainers(self) -> List[str]:
        """Trainers left out for silence whose epoch still has not ended, given one more limit.

        A stuck process cannot join RPC's graceful shutdown, so the caller must end the job.
        """
        deadline = time.monotonic() + self.stall_s
        for future in self._silent.values():
            done = threading.Event()
            future.add_done_callback(lambda _, done=done: done.set())
            done.wait(max(0.0, deadline - time.monotonic()))
        return [f"trainer{i} ({self.names[i]})" for i, f in sorted(self._silent.items()) if not f.done()]

    def pop_stalest(self) -> Optional[Tuple[int, int]]:
        stalest, self._stalest = self._stalest, None
        return stalest

    def _on_report(self, report: TrainerReport) -> None:
        if report.staleness:
            worst = (max(report.staleness), report.trainer)
            self._stalest = max(self._stalest or worst, worst)
        rate = report.samples / report.seconds
        self.logger.scalars(report.step, {f"trainer{report.trainer}/samples_per_s": rate})
        self._windows.setdefault(report.step, {})[report.trainer] = report
        self._log_complete()

    def _on_done(self, i: int, future: torch.futures.Future) -> None:
        try:
            future.wait()
        except Exception as err:  # the trainer raised, died, or its RPC timed out
            self._lost(i, first_line(err))

    def _lost(self, i: int, reason: str) -> None:
        who = f"trainer{i} ({self.names[i]})"
        if self.sync:
            raise RunFailure(f"{who} failed: {reason}; sync mode needs every trainer's gradient "
                             f"each step, so the job stops{self._waiting_note()}")
        self.live.discard(i)
        if not self.live:
            raise RunFailure(f"{who} failed: {reason}; no trainer is left")
        log.warning("%s failed and is left out: %s; %d trainer(s) go on", who, reason, len(self.live))
        self.logger.scalars(self._logged_step, {"ps/live_trainers": len(self.live)})
        self._log_complete()

    def _waiting_note(self) -> str:
        """Which trainers the servers still wait for: the slow or dead one, named."""
        missing = self._missing()
        return f" (the servers were waiting for {', '.join(f'trainer{t}' for t in sorted(missing))})" if missing else ""

    def _missing(self) -> set:
        try:
            return set().union(*torch.futures.wait_all(
                [s.rpc_async(timeout=5).missing_trainers() for s in self.servers]))
        except Exception:  # a server is gone too: this is only a diagnosis, the error stands
            return set()

    def _log_complete(self, flush: bool = False) -> None:
        """Log, in step order, each step every live trainer has reported (all, on `flush`)."""
        for step in sorted(self._windows):
            reports = self._windows[step]
            if not flush and not self.live <= set(reports):
                break
            self._log_step(step, [reports[t] for t in sorted(reports)])
            del self._windows[step]

    def _log_step(self, step: int, reports: List[TrainerReport]) -> None:
        scalars = combine(reports)
        staleness = staleness_of(reports)
        if staleness:
            self.logger.writer.add_histogram("ps/staleness", torch.tensor(staleness), step)
        stats = call_all(self.servers, "pop_stats")
        for j, server_stats in enumerate(stats):
            scalars[f"server{j}/updates_per_s"] = server_stats["updates_per_s"]
        if self.service is not None:
            scalars.update(loader_scalars(self.service, [], 0.0))
        self.logger.scalars(step, scalars)
        self.final.update(scalars)
        # The trainers' steps are one count of the run's steps (job.total), as they are logged.
        self.progress.update(step, sum(r.samples for r in reports), scalars["train/loss"],
                             max(r.epoch for r in reports))
        self.progress.postfix(loss=f"{scalars['train/loss']:.4f}")
        self._logged_step = step

    def close(self) -> None:
        self.progress.close()
