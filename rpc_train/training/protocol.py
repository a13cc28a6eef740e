"""The contract between the training loop and an engine: what a step returns, what it must offer.

The loop (`training/loop.py`) and the checkpoint manager call engines only through these
protocols. The pipeline (`pipeline/engine.py`) and the single-process reference
(`training/local.py`) are full `Engine`s; the parameter-server driver's adapter
(`ps/driver.py`) is an `Evaluator` and `Checkpointable` only, since its trainers run their own
steps.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple, runtime_checkable

import torch


@dataclass
class StepResult:
    loss: float
    correct: int
    stats: Dict[str, float] = field(default_factory=dict)
    # True when the loss was not finite and the optimizer step was not applied.
    skipped: bool = False
    # Per stage: (kind "F"/"B", micro-batch seq, start, end) in perf_counter seconds.
    spans: Optional[List[List[tuple]]] = None
    started: float = 0.0


@runtime_checkable
class Evaluator(Protocol):
    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """The batch's summed loss and correct count, no parameter changed."""


@runtime_checkable
class Checkpointable(Protocol):
    def save_checkpoint(self, directory: str) -> List[dict]:
        """Every worker writes its share into `directory`; their records for the manifest."""

    def load_checkpoint(self, directory: str, index: Dict[str, str]) -> None:
        """Every worker loads the tensors it owns, by name (index: tensor name -> file)."""

    def layout(self) -> Dict[str, Any]:
        """Where the model lives (stages, servers): recorded in the manifest."""


@runtime_checkable
class Engine(Evaluator, Checkpointable, Protocol):
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """One optimizer step on the batch: its mean loss, correct count and stats."""

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The whole model's state, named as in the `models/` class, on the CPU."""


# What a mode's `fit(cfg, world_size, logger)` returns to the driver: the final metrics, and a
# function that gathers the trained model's state (called only if the model is saved).
FitResult = Tuple[Dict[str, float], Callable[[], Dict[str, torch.Tensor]]]
