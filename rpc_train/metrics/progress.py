"""The driver's training progress: tqdm's bar on a terminal, a plain log line in a file or pipe.

A bar redraws itself with carriage returns; written to a file (CI, nohup, Slurm, `| tee`) every
redraw lands on one ever-growing line, with the log lines wedged between them. So the bar is
kept for a terminal only, and anything else gets one line every `log.progress_s` seconds
through the driver's logger, which also writes it to the run's rank0.log:

    train step 120/400 (30%) epoch 1/2: loss 0.4321, 812 samples/s, ETA 0:00:35

Every training mode reports here (the pipeline loop, the parameter-server and hybrid
drivers), by absolute step: a resumed run starts at its checkpoint's step.
"""

import datetime
import logging
import sys
import time
from typing import Optional, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("rpc_train.progress")


def eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(0.0, seconds))))


class Progress:
    def __init__(self, total: int, *, initial: int = 0, epochs: Optional[int] = None, every_s: float = 10.0,
                 enabled: bool = True, stream: Optional[TextIO] = None):
        stream = stream if stream is not None else sys.stderr
        self.total, self.epochs, self.every_s = total, epochs, every_s
        self.step = self._line_step = self._start_step = initial
        self.epoch: Optional[int] = None
        self._loss_sum, self._losses, self._samples = 0.0, 0, 0
        self._last_loss: Optional[float] = None
        self._started = self._line_at = time.monotonic()
        terminal = enabled and stream.isatty()
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                        file=stream) if terminal else None
        self.lines = enabled and not terminal
        # Log lines printed while the bar shows go above it, instead of into its line.
        self._redirect = logging_redirect_tqdm() if terminal else None
        if self._redirect is not None:
            self._redirect.__enter__()

    def update(self, step: int, samples: int = 0, loss: Optional[float] = None, epoch: Optional[int] = None) -> None:
        """Training reached `step` (absolute), with `samples` more samples since the last call;
        `loss`: the latest step's (or window's) loss, `epoch`: counted from 0."""
        if self.bar is not None:
            self.bar.update(step - self.step)
        self.step, self._samples = step, self._samples + samples
        if epoch is not None:
            self.epoch = epoch
        if loss is not None:
            self._loss_sum, self._losses, self._last_loss = self._loss_sum + loss, self._losses + 1, loss
        if self.lines and time.monotonic() - self._line_at >= self.every_s:
            self._line()

    def postfix(self, **fields) -> None:
        """The bar's trailing fields (a terminal only: the plain line has its own)."""
        if self.bar is not None:
            self.bar.set_postfix(**fields)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
        elif self.lines and self.step > self._line_step:
            self._line()  # the last stretch, however short, so a file always ends with where it stopped

    def _line(self) -> None:
        now = time.monotonic()
        parts = [f"train step {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.0f}%)"]
        if self.epoch is not None:
            parts.append(f" epoch {self.epoch + 1}" + (f"/{self.epochs}" if self.epochs else ""))
        fields = []
        loss = self._loss_sum / self._losses if self._losses else self._last_loss
        if loss is not None:
            fields.append(f"loss {loss:.4f}")
        if self._samples:
            fields.append(f"{self._samples / max(now - self._line_at, 1e-9):.0f} samples/s")
        done = self.step - self._start_step
        if done > 0 and self.step < self.total:
            fields.append(f"ETA {eta((self.total - self.step) * (now - self._started) / done)}")
        log.info("%s: %s", "".join(parts), ", ".join(fields) if fields else "started")
        self._line_at, self._line_step = now, self.step
        self._loss_sum, self._losses, self._samples = 0.0, 0, 0
