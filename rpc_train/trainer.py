"""The training loop, run by the driver against any engine (pipeline, or a local reference).

An engine offers `train_step(x, y)` and `eval_step(x, y)` returning a `StepResult`; the loop
owns epochs, step limits, validation, metrics and the progress bar.
"""

import logging
import time
from collections import defaultdict
from typing import Callable, Dict, Optional, Sequence

from torch.utils.data import DataLoader
from tqdm import tqdm

from rpc_train.config import TrainerConf
from rpc_train.metrics import RunLogger

log = logging.getLogger(__name__)


class _Window:
    """Running sums between two log points."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps = self.samples = self.correct = 0
        self.loss = self.seconds = 0.0
        self.stats: Dict[str, float] = defaultdict(float)

    def add(self, result, samples: int, seconds: float) -> None:
        self.steps += 1
        self.samples += samples
        self.correct += result.correct
        self.loss += result.loss
        self.seconds += seconds
        for key, value in result.stats.items():
            self.stats[key] += value

    def scalars(self) -> Dict[str, float]:
        out = {
            "train/loss": self.loss / self.steps,
            "train/accuracy": self.correct / self.samples,
            "throughput/samples_per_s": self.samples / self.seconds,
            "time/step_ms": 1e3 * self.seconds / self.steps,
        }
        for key, value in self.stats.items():
            out[key if key == "lr" or "/" in key else f"train/{key}"] = value / self.steps
        return out


def evaluate(engine, val_loader: DataLoader) -> Dict[str, float]:
    """Validation loss (per sample) and accuracy of any engine with an `eval_step`."""
    loss = correct = count = 0
    for x, y in val_loader:
        result = engine.eval_step(x, y)
        loss, correct, count = loss + result.loss, correct + result.correct, count + len(y)
    return {"val/loss": loss / count, "val/accuracy": correct / count}


class Trainer:
    def __init__(self, engine, train_loader: DataLoader, val_loader: DataLoader,
                 cfg: TrainerConf, logger: Optional[RunLogger] = None,
                 hooks: Sequence[Callable[[int, object], None]] = ()):
        """`hooks` are called as hook(step, result) after every training step."""
        self.engine, self.cfg, self.logger, self.hooks = engine, cfg, logger, list(hooks)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.step = 0
        self.final: Dict[str, float] = {}

    def total_steps(self) -> int:
        total = self.cfg.epochs * len(self.train_loader)
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def fit(self) -> Dict[str, float]:
        total = self.total_steps()
        window, started = _Window(), time.perf_counter()
        bar = tqdm(total=total, desc="train", unit="step", disable=not self.cfg.progress,
                   dynamic_ncols=True)
        with bar:
            for epoch in range(self.cfg.epochs):
                for x, y in self.train_loader:
                    if self.step >= total:
                        break
                    t0 = time.perf_counter()
                    result = self.engine.train_step(x, y)
                    window.add(result, len(y), time.perf_counter() - t0)
                    self.step += 1
                    bar.update()
                    for hook in self.hooks:
                        hook(self.step, result)
                    if self.step % self.cfg.log_every == 0 or self.step == total:
                        scalars = window.scalars()
                        bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", epoch=epoch)
                        self._log(scalars)
                        self.final.update(scalars)
                        window.reset()
                self._validate(epoch)
                if self.step >= total:
                    break
        self.final["time/total_s"] = time.perf_counter() - started
        return self.final

    def _validate(self, epoch: int) -> None:
        scalars = evaluate(self.engine, self.val_loader)
        log.info("epoch %d step %d: val loss %.4f, val accuracy %.4f",
                 epoch, self.step, scalars["val/loss"], scalars["val/accuracy"])
        self._log(scalars)
        self.final.update(scalars)
        if self.logger:
            self.logger.flush()

    def _log(self, scalars: Dict[str, float]) -> None:
        if self.logger:
            self.logger.scalars(self.step, scalars)
