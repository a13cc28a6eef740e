"""The data service's figures in TensorBoard, logged by the driver.

`loader/input_wait_fraction` is the share of the consumers' time spent waiting for their next
batch: near 0 the input keeps up, well above it the job is input-bound and more data workers
(or a warm store) would help. Each worker reports its own rates (`loader/worker<i>/...`).
"""

import time
from typing import Dict, List, Optional

from rpc_train.loader.service import DataService
from rpc_train.loader.stream import BatchLoader


def loader_scalars(service: Optional[DataService], consumers: List[Dict[str, float]], seconds: float) -> Dict[str, float]:
    """The window's scalars: `consumers` are BatchLoader.pop_stats() of each consumer (their
    waits overlap in time, so the fraction is their mean), `seconds` the window's wall time."""
    scalars: Dict[str, float] = {}
    if consumers:
        waited = sum(c.get("waited_s", 0.0) for c in consumers) / len(consumers)
        scalars["loader/input_wait_fraction"] = min(1.0, waited / max(seconds, 1e-9))
        scalars["loader/retries"] = sum(c.get("retries", 0.0) for c in consumers)
        scalars["loader/skipped_samples"] = sum(c.get("skipped", 0.0) for c in consumers)
    if service is not None:
        for i, stats in enumerate(service.pop_stats()):
            for key, value in (stats or {}).items():
                scalars[f"loader/worker{i}/{key}"] = value
    return scalars


class LoaderMetrics:
    """A pipeline Trainer hook: every `every` steps, the loader's window to TensorBoard."""

    def __init__(self, logger, every: int, loader, service: Optional[DataService]):
        self.logger, self.every, self.loader, self.service = logger, every, loader, service
        self._since = time.monotonic()

    def __call__(self, step: int, result) -> None:
        if step % self.every or not isinstance(self.loader, BatchLoader):
            return
        now = time.monotonic()
        self.logger.scalars(step, loader_scalars(self.service, [self.loader.pop_stats()], now - self._since))
        self._since = now
