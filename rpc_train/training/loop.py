"""The training loop, run by the driver against any `Engine` (training/protocol.py).

The engine runs the steps; the loop owns epochs, step limits, validation, metrics and the
progress report (metrics/progress.py).
"""

import logging
import math
import time
from collections import defaultdict
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence

from torch.utils.data import DataLoader

from rpc_train.config.schema import TrainerConf
from rpc_train.config.errors import RunFailure
from rpc_train.metrics.progress import Progress
from rpc_train.metrics.tensorboard import RunLogger
from rpc_train.checkpoint.position import Position
from rpc_train.loader.stream import batches_from
from rpc_train.training.loss import predictions
from rpc_train.training.protocol import Engine, Evaluator, StepResult

log = logging.getLogger(__name__)


class _Window:
    """Running sums between two log points."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps = self.samples = self.predictions = self.correct = 0
        self.loss = self.seconds = 0.0
        self.stats: Dict[str, float] = defaultdict(float)

    def add(self, result: StepResult, samples: int, predictions: int, seconds: float) -> None:
        self.steps += 1
        self.samples += samples
        self.predictions += predictions
        self.correct += result.correct
        self.loss += result.loss
        self.seconds += seconds
        for key, value in result.stats.items():
            self.stats[key] += value

    def scalars(self) -> Dict[str, float]:
        out = {
            "train/loss": self.loss / self.steps,
            "train/accuracy": self.correct / self.predictions,
            "throughput/samples_per_s": self.samples / self.seconds,
            "time/step_ms": 1e3 * self.seconds / self.steps,
        }
        if self.predictions != self.samples:  # a sequence model: one prediction per token
            out["throughput/tokens_per_s"] = self.predictions / self.seconds
        for key, value in self.stats.items():
            out[key if key == "lr" or "/" in key else f"train/{key}"] = value / self.steps
        return out


def evaluate(engine: Evaluator, val_loader: DataLoader) -> Dict[str, float]:
    """Validation loss and accuracy per prediction (per sample, or per token of a sequence
    model: data=text's loss is in nats per byte) of any engine with an `eval_step`."""
    loss = correct = count = 0
    for x, y in val_loader:
        result = engine.eval_step(x, y)
        loss, correct, count = loss + result.loss, correct + result.correct, count + predictions(y)
    return {"val/loss": loss / count, "val/accuracy": correct / count}


ValidationExtra = Callable[[int, Dict[str, float]], None]


def validate_and_log(engine: Evaluator, val_loader: DataLoader, logger: Optional[RunLogger], final: Dict[str, float],
                     epoch: int, step: int, extras: Sequence[ValidationExtra] = ()) -> None:
    """Evaluate (`epoch` counted from 0), say so, log it (flushed), and record it in `final`.
    `extras` are called as extra(step, scalars) first, to add scalars or log more
    (metrics/text.py: a language model's bits per byte and a sample of its text)."""
    scalars = evaluate(engine, val_loader)
    for extra in extras:
        extra(step, scalars)
    log.info("epoch %d step %d: val loss %.4f, val accuracy %.4f%s", epoch + 1, step, scalars["val/loss"],
             scalars["val/accuracy"], "".join(f", {k[4:].replace('_', ' ')} {v:.4f}" for k, v in scalars.items()
                                               if k not in ("val/loss", "val/accuracy")))
    if logger:
        logger.scalars(step, scalars)
        logger.flush()
    final.update(scalars)


class Trainer:
    def __init__(self, engine: Engine, train_loader: DataLoader, val_loader: DataLoader,
                 cfg: TrainerConf, logger: Optional[RunLogger] = None,
                 hooks: Sequence[Callable[[int, object], None]] = (), start: Optional[Position] = None,
                 progress_s: float = 10.0, validation_extras: Sequence[ValidationExtra] = ()):
        """`hooks` are called as hook(step, result) after every training step. `start` (from a
        checkpoint) is where to go on from; the loop advances that object in place.
        `progress_s`: seconds between progress lines when stderr is not a terminal.
        `validation_extras`: see `validate_and_log`."""
        self.engine, self.cfg, self.logger, self.hooks = engine, cfg, logger, list(hooks)
        self.validation_extras = list(validation_extras)
        self.progress_s = progress_s
        self.train_loader, self.val_loader = train_loader, val_loader
        self.position = start if start is not None else Position()
        self.final: Dict[str, float] = {}

    @property
    def step(self) -> int:
        return self.position.step

    @step.setter
    def step(self, value: int) -> None:
        self.position.step = value

    def total_steps(self) -> int:
        total = self.cfg.epochs * len(self.train_loader)
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def fit(self) -> Dict[str, float]:
        total = self.total_steps()
        window, started = _Window(), time.perf_counter()
        progress = Progress(total, initial=self.step, epochs=self.cfg.epochs, every_s=self.progress_s,
                            enabled=self.cfg.progress)
        try:
            for epoch in range(self.position.epoch, self.cfg.epochs):
                if self.step >= total:
                    break
                batches = iter(self._batches(epoch))
                for x, y in batches:
                    t0 = time.perf_counter()
                    result = self.engine.train_step(x, y)
                    applied = self._applied(result)
                    if applied:
                        window.add(result, len(y), predictions(y), time.perf_counter() - t0)
                    self.step += 1
                    self.position.batch += 1
                    progress.update(self.step, len(y), result.loss if applied else None, epoch)
                    if self.position.batch == len(self.train_loader) or self.step == total:
                        self._end_epoch(epoch, batches)
                    elif self.cfg.val_every and self.step % self.cfg.val_every == 0:
                        self._validate(epoch)
                    for hook in self.hooks:
                        hook(self.step, result)
                    if self.step % self.cfg.log_every == 0 or self.step == total:
                        scalars = window.scalars() if window.steps else {}
                        if self.cfg.skip_nonfinite:
                            scalars["train/skipped_steps"] = self.position.skipped
                        progress.postfix(loss=f"{scalars.get('train/loss', math.nan):.4f}", epoch=epoch + 1)
                        self._log(scalars)
                        self.final.update(scalars)
                        window.reset()
                    if self.step >= total:
                        break  # before asking for another batch: the data service would make it for nothing
        finally:
            progress.close()
        if "val/loss" not in self.final:  # resumed at the run's end: validated and logged before
            self.final.update(evaluate(self.engine, self.val_loader))
        self.final["time/total_s"] = time.perf_counter() - started
        return self.final

    def _end_epoch(self, epoch: int, batches: Iterator) -> None:
        """Validate after an epoch's (or the run's) last step, before that step's hooks, so a
        checkpoint written there resumes after the validation instead of logging it again; an
        epoch run to its end moves the position to the next one."""
        if self.position.batch == len(self.train_loader):
            # Run the epoch's loader to its end now: RandomSampler draws from the generator once
            # more when it runs out, and the next epoch begins from the state after that draw.
            for _ in batches:
                raise RuntimeError("the training loader gave more batches than its len()")
            generator = self.train_loader.generator
            self.position.epoch, self.position.batch = epoch + 1, 0
            self.position.loader_state = generator.get_state() if generator is not None else None
        self._validate(epoch)

    def _validate(self, epoch: int) -> None:
        validate_and_log(self.engine, self.val_loader, self.logger, self.final, epoch, self.step,
                         self.validation_extras)

    def _batches(self, epoch: int) -> Iterable:
        """This epoch's batches, less those a resumed run already trained on.

        Restoring the shuffling generator to its state at the epoch's start makes the loader
        draw the same order again; the batches done are then skipped (an in-memory loader reads
        and drops them, the data service is not asked for them).
        """
        position, generator = self.position, self.train_loader.generator
        if epoch == position.epoch and position.loader_state is not None:
            generator.set_state(position.loader_state)
            return batches_from(self.train_loader, epoch, position.batch)
        position.epoch, position.batch = epoch, 0
        position.loader_state = generator.get_state() if generator is not None else None
        return batches_from(self.train_loader, epoch, 0)

    def _applied(self, result: StepResult) -> bool:
        """False for a step skipped for its non-finite loss; raises unless such steps may be skipped."""
        if math.isfinite(result.loss) and not result.skipped:
            return True
        at = self.step + 1
        if not result.skipped:  # an engine that stepped anyway: nothing to keep
            raise RunFailure(f"non-finite loss ({result.loss}) at step {at}, already applied by the optimizers; "
                             "lower optim.lr")
        if not self.cfg.skip_nonfinite:
            raise RunFailure(f"non-finite loss ({result.loss}) at step {at}; no optimizer stepped on it and "
                             "no checkpoint is written after it; lower optim.lr, or set "
                             "trainer.skip_nonfinite=true to skip such steps")
        self.position.skipped += 1
        log.warning("non-finite loss (%s) at step %d: skipped (trainer.skip_nonfinite=true)", result.loss, at)
        return False

    def _log(self, scalars: Dict[str, float]) -> None:
        if self.logger:
            self.logger.scalars(self.step, scalars)
