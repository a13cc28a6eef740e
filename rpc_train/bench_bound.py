"""What a pipeline without any overhead would reach on a split: the bench's "split bound".

The GPipe bound m/(m+K-1) assumes K equal stages whose micro-batches cost 1/m of a batch.
Real splits are neither: layers are indivisible, and small micro-batches run less
efficiently per sample. Here each stage's cost per micro-batch is measured (its forward and
backward at the micro-batch size, in this process, one thread), and the step a perfect
pipeline would take is fill and drain plus the slowest stage for every other micro-batch:

    ideal step = sum(stage costs) + (m - 1) * max(stage costs)

Bound = (one-thread step of the whole batch) / ideal step / K. Against it, a row's efficiency
shows what the pipeline's own machinery (messages, threads, processes) costs.
"""

import time
from typing import Dict, List, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from rpc_train.builders import build_model
from rpc_train.config import as_dict
from rpc_train.partition import plan_stages, stage_bounds


def stage_costs(layers: Sequence[nn.Module], counts: Sequence[int], sample: torch.Tensor,
                repeats: int, budget_s: float = 5.0) -> List[float]:
    """Fastest forward+backward seconds of each stage on one micro-batch, as a stage runs it:
    no input gradient on stage 0, a materialised gradient from the next stage. The fastest,
    not the median: it is a bound, and other load on the machine only ever adds time."""
    costs, x = [], sample
    for k, bounds in enumerate(stage_bounds(counts)):
        stage = nn.Sequential(*[layers[i] for i in bounds])
        timings, out = [], None
        # Two warm-up runs, then `repeats`, or fewer for a slow stage (ResNet-50: seconds each).
        while len(timings) < 2 + repeats and (len(timings) < 4 or sum(timings) < budget_s):
            inp = x.detach().requires_grad_(k > 0)
            start = time.perf_counter()
            out = stage(inp)
            out.backward(torch.ones_like(out))
            timings.append(time.perf_counter() - start)
        costs.append(min(timings[2:]))
        x = out.detach()
    return costs


def ideal_step_s(costs: Sequence[float], m: int) -> float:
    return sum(costs) + (m - 1) * max(costs)


def measure_splits(cfg: DictConfig, k: int, micro_batches: Sequence[int], repeats: int = 10) -> Dict[int, tuple]:
    """For each micro-batch count: (layer counts per stage, stage costs per micro-batch in s),
    split as the engine splits it (`pipeline.balance`)."""
    layers = list(build_model(as_dict(cfg.model), cfg.seed))
    splits = {}
    for m in micro_batches:
        sample = torch.randn(max(1, cfg.trainer.batch_size // m), *cfg.data.shape)
        counts = plan_stages(layers, k, cfg.pipeline.balance, sample)
        splits[m] = (counts, stage_costs(layers, counts, sample, repeats))
    return splits


def add_split_bounds(rows: List[Dict], splits: Dict[int, tuple], one_thread_ms: float) -> None:
    for row in rows:
        m = row["micro_batches"]
        if isinstance(m, int) and m in splits:
            counts, costs = splits[m]
            row["split_bound"] = one_thread_ms / (1e3 * ideal_step_s(costs, m)) / len(costs)
        else:
            row["split_bound"] = "-"


def split_notes(splits: Dict[int, tuple]) -> str:
    lines = [f"  m={m}: layers per stage {counts}, ms per micro-batch "
             + " / ".join(f"{1e3 * c:.2f}" for c in costs) + f", ideal step {1e3 * ideal_step_s(costs, m):.1f} ms"
             for m, (counts, costs) in splits.items()]
    return "split bound (stage costs measured in one process, one thread):\n" + "\n".join(lines) if lines else ""
