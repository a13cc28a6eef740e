"""How an asynchronous update treats a gradient computed on parameters `staleness` updates old.

One rule for every server that applies gradients as they arrive: the parameter server's shards
and the hybrid mode's embedding shards. Three remedies from the literature, each a
setting (ps.*); docs/benchmarks.md ("Asynchronous convergence") measures which the default needs:

- momentum compensation (Mitliagkas et al., "Asynchrony begets momentum", 2016): N workers
  applying gradients asynchronously behave like SGD with an extra, implicit momentum of about
  1 - 1/N, so the server's explicit momentum is lowered by that much to keep their sum;
- staleness-aware steps (Zhang et al., "Staleness-aware Async-SGD", IJCAI 2016): a gradient
  `staleness` updates old moves the parameters 1/staleness as far. The rule scales that
  update's learning rate, not the gradient: Adam and Adagrad divide a gradient by its own size,
  so a scaled gradient would move the parameters as far as a fresh one, and would shrink
  Adagrad's accumulator, making later steps of those rows larger. The optimizer's state
  (momentum, moments, accumulators) takes the gradient as it is. Exact for the optimizers in
  config/schema.py STEP_FOLLOWS_LR; validation refuses the setting with any other;
- gradient-norm clipping of each applied gradient, as torch.nn.utils.clip_grad_norm_ clips:
  with SGD it bounds the step; Adam and Adagrad bound their steps by the learning rate already,
  and there it bounds what one gradient adds to their moments or accumulators.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch


def implicit_momentum(workers: int) -> float:
    """The momentum asynchrony itself adds with `workers` workers pushing at once."""
    return 1.0 - 1.0 / workers


def compensated_momentum(momentum: float, workers: int) -> float:
    """The explicit momentum that, with asynchrony's implicit one, sums to `momentum` (not below 0)."""
    return max(0.0, momentum - implicit_momentum(workers))


@dataclass(frozen=True)
class AsyncUpdateRule:
    scale_by_staleness: bool = False
    clip_grad_norm: Optional[float] = None

    def step_scale(self, staleness: int) -> float:
        """The fraction of a full step a gradient of this staleness takes (1 for a fresh one)."""
        return 1.0 / max(1, staleness) if self.scale_by_staleness else 1.0

    def step(self, optimizer: torch.optim.Optimizer, grads: List[torch.Tensor], staleness: int) -> None:
        """Step `optimizer` on its parameters' gradients: `grads` (those gradients, or a sparse
        one's values) clipped in place, the learning rate scaled by `step_scale` for this step."""
        self.clip(grads)
        with scaled_lr(optimizer, self.step_scale(staleness)):
            optimizer.step()

    def clip(self, grads: List[torch.Tensor]) -> None:
        """Scale `grads` in place so that their joint L2 norm is at most clip_grad_norm.

        The norm is computed only when clipping is on: it is a pass over every gradient on the
        server's hot path, and a read back of its value."""
        if self.clip_grad_norm is None or not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        if norm > self.clip_grad_norm:
            torch._foreach_mul_(grads, self.clip_grad_norm / (norm + 1e-6))


@contextmanager
def scaled_lr(optimizer: torch.optim.Optimizer, scale: float) -> Iterator[None]:
    """Every parameter group's learning rate times `scale` inside, restored exactly after (a
    scheduler then steps from the unscaled value)."""
    if scale == 1.0:
        yield
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, saved):
        group["lr"] = lr * scale
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr


def remedy(sync: bool, momentum_compensation: bool, clip_grad_norm: Optional[float]) -> str:
    """What to try when training diverges, given the remedies already on."""
    if sync:
        return "lower optim.lr"
    if not momentum_compensation:
        return "set ps.momentum_compensation=true, or lower optim.momentum"
    if clip_grad_norm is None:
        return "set ps.clip_grad_norm=1.0, or lower optim.lr"
    return f"lower ps.clip_grad_norm={clip_grad_norm:g} or optim.lr"
