"""What a pipeline without any overhead would reach on a split: the bench's "split bound".

The GPipe bound m/(m+K-1) assumes K equal stages whose micro-batches cost 1/m of a batch.
Real splits are neither: layers are indivisible, and small micro-batches run less
efficiently per sample. Here each stage's cost per micro-batch is measured (its forward and
backward at the micro-batch size, in this process, one thread), and the step a perfect
pipeline would take is fill and drain plus the slowest stage for every other micro-batch:

    ideal step = sum(stage costs) + (m - 1) * max(stage costs)

Bound = (the whole batch through the whole model, same measurement) / ideal step / K. Against
it, a row's efficiency shows what the pipeline's own machinery (messages, threads, processes)
costs; within the noise of a shared machine (the rows and the bound are timed minutes apart).
"""

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from rpc_train.training.builders import build_model
from rpc_train.config.schema import as_dict
from rpc_train.data.datasets import example_inputs
from rpc_train.runtime.devices import own_device
from rpc_train.pipeline.partition import plan_stages, run_as_stage, stage_bounds


def stage_costs(layers: Sequence[nn.Module], counts: Sequence[int], sample: torch.Tensor,
                repeats: int, budget_s: float = 5.0) -> List[float]:
    """Fastest forward+backward seconds of each stage on one micro-batch, as a stage runs it
    (`partition.run_as_stage`). The fastest, not the median: it is a bound, and other load on
    the machine only ever adds time."""
    costs, x = [], sample
    for k, bounds in enumerate(stage_bounds(counts)):
        stage = nn.Sequential(*[layers[i] for i in bounds])
        timings, out = [], None
        # Two warm-up runs, then `repeats`, or fewer for a slow stage (ResNet-50: seconds each).
        while len(timings) < 2 + repeats and (len(timings) < 4 or sum(timings) < budget_s):
            start = time.perf_counter()
            out = run_as_stage(stage, x, first=k == 0)
            timings.append(time.perf_counter() - start)
        costs.append(min(timings[2:]))
        x = out.detach()
    return costs


def ideal_step_s(costs: Sequence[float], m: int) -> float:
    return sum(costs) + (m - 1) * max(costs)


@dataclass
class Splits:
    whole_s: float  # the whole model's forward+backward on the whole batch, one thread
    by_m: Dict[int, tuple]  # micro-batches -> (layer counts per stage, stage costs per micro-batch)


def plan_splits(cfg: DictConfig, k: int, micro_batches: Sequence[int]) -> Dict[int, List[int]]:
    """Layer counts per stage for each micro-batch count, as the engine would plan them
    (`pipeline.balance`). Planned once here and given to every row (rpc_train's and the peer's)
    and to the bound: timing-based plans differ from run to run where costs nearly tie
    (ResNet-50), and the peer's ranks must agree on one split."""
    layers = list(build_model(as_dict(cfg.model), cfg.seed))
    device = own_device(cfg.device)
    return {m: plan_stages(layers, k, cfg.pipeline.balance,
                           example_inputs(cfg.data, max(1, cfg.trainer.batch_size // m), device))
            for m in micro_batches}


def measure_splits(cfg: DictConfig, plans: Dict[int, List[int]], repeats: int = 10) -> Splits:
    """The stages' costs on each planned split, and the whole batch through the whole model,
    measured back to back: the bound is their ratio, so a machine that is slower for a while
    slows both alike."""
    layers = list(build_model(as_dict(cfg.model), cfg.seed))
    batch = example_inputs(cfg.data, cfg.trainer.batch_size)
    whole_s = stage_costs(layers, [len(layers)], batch, repeats)[0]
    by_m = {m: (counts, stage_costs(layers, counts, batch[:max(1, cfg.trainer.batch_size // m)], repeats))
            for m, counts in plans.items()}
    return Splits(whole_s, by_m)


def add_split_bounds(rows: List[Dict], splits: Optional[Splits]) -> None:
    for row in rows:
        m = row["micro_batches"]
        if splits is not None and isinstance(m, int) and m in splits.by_m:
            counts, costs = splits.by_m[m]
            row["split_bound"] = splits.whole_s / ideal_step_s(costs, m) / len(costs)
        else:
            row["split_bound"] = "-"


def split_notes(splits: Optional[Splits]) -> str:
    if splits is None:
        return ""
    lines = [f"  m={m}: layers per stage {counts}, ms per micro-batch "
             + " / ".join(f"{1e3 * c:.2f}" for c in costs) + f", ideal step {1e3 * ideal_step_s(costs, m):.1f} ms"
             for m, (counts, costs) in splits.by_m.items()]
    return (f"split bound (forward+backward measured in one process, one thread; whole batch "
            f"{1e3 * splits.whole_s:.1f} ms):\n" + "\n".join(lines))
