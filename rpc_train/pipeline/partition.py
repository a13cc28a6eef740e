"""Split a sequence of layers into contiguous pipeline stages.

A pipeline runs no faster than its slowest stage, so every strategy here reduces to the
same problem: cut a list of per-layer costs into k contiguous parts and make the largest
part as small as possible.
"""

import copy
import time
from typing import Any, List, Sequence

import torch
from torch import nn

from rpc_train.config.errors import ConfigError
from rpc_train.config.schema import BALANCE_HELP


def balance_costs(costs: Sequence[float], k: int) -> List[int]:
    """Layer counts per stage that minimise the costliest stage (exact, O(k·n²)).

    Every stage gets at least one layer. Ties go to the split that puts more layers early.
    """
    n = len(costs)
    if not 1 <= k <= n:
        raise ConfigError(f"cannot split {n} layers into {k} stages: need 1 <= stages <= {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[j][i]: smallest max-stage cost for the first i layers in j stages; cut[j][i] the
    # start of the last of those j stages.
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for s in range(j - 1, i):
                cost = max(best[j - 1][s], prefix[i] - prefix[s])
                if cost < best[j][i]:
                    best[j][i], cut[j][i] = cost, s
    counts, i = [], n
    for j in range(k, 0, -1):
        counts.append(i - cut[j][i])
        i = cut[j][i]
    return counts[::-1]


def param_costs(layers: Sequence[nn.Module]) -> List[float]:
    # A layer without parameters (ReLU, Flatten) still costs something to run; a token cost
    # keeps such layers from piling up on one stage.
    return [sum(p.numel() for p in layer.parameters()) + 1.0 for layer in layers]


def run_as_stage(piece: nn.Module, x: torch.Tensor, first: bool) -> torch.Tensor:
    """One forward and backward of `piece` on `x` as a pipeline stage runs it; the output.

    The data needs no gradient, so the first piece's backward computes none for its input
    (nor does stage 0's): a conv's input gradient costs as much as its weights'. The output
    gets a materialised gradient, as the next stage sends: sum()'s expanded one takes slower
    (strided) backward kernels in pooling and batch norm.
    """
    out = piece(x.detach().requires_grad_(not first and x.is_floating_point()))
    if out.requires_grad:  # not so for a first piece without parameters
        out.backward(torch.ones_like(out))
    return out


def time_costs(layers: Sequence[nn.Module], sample: torch.Tensor, repeats: int = 3) -> List[float]:
    """Median forward+backward seconds of each layer on `sample`, measured in this process.

    Layers are timed on `sample`'s device (a copy of each moves there): a GPU's costs split a
    model differently from a CPU's, and kernels run asynchronously, hence the synchronize.
    """
    device = sample.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    costs, x = [], sample
    for i, layer in enumerate(layers):
        layer = copy.deepcopy(layer).to(device) if device.type != "cpu" else layer
        timings, out = [], None
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            out = run_as_stage(layer, x, first=i == 0)
            sync()
            timings.append(time.perf_counter() - start)
        costs.append(sorted(timings)[len(timings) // 2])
        x = out.detach()
    return costs


def plan_stages(layers: Sequence[nn.Module], k: int, balance: Any, sample: torch.Tensor) -> List[int]:
    """Layer counts per stage for the `pipeline.balance` setting."""
    if isinstance(balance, str):
        if balance == "params":
            return balance_costs(param_costs(layers), k)
        if balance == "time":
            return balance_costs(time_costs(layers, sample), k)
    elif isinstance(balance, Sequence):
        counts = [int(c) for c in balance]
        if len(counts) != k or sum(counts) != len(layers) or min(counts) < 1:
            raise ConfigError(
                f"pipeline.balance={counts}: need {k} positive layer counts summing to "
                f"{len(layers)} (the model's layers)")
        return counts
    raise ConfigError(f"pipeline.balance={balance!r}: expected {BALANCE_HELP}")


def stage_bounds(counts: Sequence[int]) -> List[range]:
    """Layer index ranges from layer counts: [2, 3] -> [range(0, 2), range(2, 5)]."""
    bounds, start = [], 0
    for count in counts:
        bounds.append(range(start, start + count))
        start += count
    return bounds
