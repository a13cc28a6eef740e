"""How an asynchronous update treats a gradient computed on parameters `staleness` updates old.

One rule for every server that applies gradients as they arrive: the parameter server's shards
now, the hybrid mode's embedding shards next. Three remedies from the literature, each a
setting (ps.*); docs/benchmarks.md ("Asynchronous convergence") measures which the default needs:

- momentum compensation (Mitliagkas et al., "Asynchrony begets momentum", 2016): N workers
  applying gradients asynchronously behave like SGD with an extra, implicit momentum of about
  1 - 1/N, so the server's explicit momentum is lowered by that much to keep their sum;
- staleness-aware steps (Zhang et al., "Staleness-aware Async-SGD", IJCAI 2016): a gradient
  `staleness` updates old moves the parameters 1/staleness as far;
- gradient-norm clipping of each applied gradient.
"""

from dataclasses import dataclass
from typing import Dict, Optional

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

    def prepare(self, grads: Dict[str, torch.Tensor], staleness: int) -> None:
        """Clip and scale `grads` in place before the optimizer applies them.

        The norm is computed only when clipping is on: it is a pass over every gradient on the
        server's hot path, and a read back of its value."""
        scale = self.step_scale(staleness)
        if self.clip_grad_norm is not None and grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])).item()
            if norm > self.clip_grad_norm:
                scale *= self.clip_grad_norm / (norm + 1e-6)
        if scale != 1.0:
            torch._foreach_mul_(list(grads.values()), scale)


def remedy(sync: bool, momentum_compensation: bool, clip_grad_norm: Optional[float]) -> str:
    """What to try when training diverges, given the remedies already on."""
    if sync:
        return "lower optim.lr"
    if not momentum_compensation:
        return "set ps.momentum_compensation=true, or lower optim.momentum"
    if clip_grad_norm is None:
        return "set ps.clip_grad_norm=1.0, or lower optim.lr"
    return f"lower ps.clip_grad_norm={clip_grad_norm:g} or optim.lr"
