"""The bench's split bound: a zero-overhead pipeline's step on the measured stage costs."""

import pytest
import torch
from torch import nn

from helpers.probes import InputProbe
from rpc_train.bench.bound import Splits, add_split_bounds, ideal_step_s, stage_costs

pytestmark = pytest.mark.timeout(60)


def test_ideal_step_is_fill_and_drain_plus_the_slowest_stage():
    # Two equal stages, 4 micro-batches: the GPipe shape, 5 slots of 1 s.
    assert ideal_step_s([1.0, 1.0], 4) == 5.0
    # An unequal split waits on its slowest stage: 1 + 3 + 3 * 3.
    assert ideal_step_s([1.0, 3.0], 4) == 13.0


def test_bound_divides_the_whole_batch_by_k_ideal_steps():
    rows = [{"micro_batches": "-"}, {"micro_batches": 4}, {"micro_batches": 8}]
    add_split_bounds(rows, Splits(whole_s=0.008, by_m={4: ([1, 1], [0.001, 0.001])}))
    # Ideal step 5 ms on 2 stages against 8 ms for the whole batch; no split measured for m=8.
    assert [r["split_bound"] for r in rows] == ["-", pytest.approx(0.8), "-"]


def test_stage_costs_run_each_stage_as_the_pipeline_does():
    first, second = InputProbe(), InputProbe()
    layers = [first, nn.Linear(8, 8), second, nn.Linear(8, 2)]
    costs = stage_costs(layers, [2, 2], torch.randn(4, 8), repeats=2)
    assert len(costs) == 2 and all(c > 0 for c in costs)
    # Stage 0 gets data that needs no gradient; stage 1 gets an activation that does.
    assert set(first.seen) == {False} and set(second.seen) == {True}


def test_one_split_is_planned_per_micro_batch_count():
    from rpc_train.config.compose import compose
    from rpc_train.bench.bound import plan_splits

    cfg = compose(["model=convnet", "data=synthetic", "pipeline.balance=[2,4]"])
    assert plan_splits(cfg, 2, [1, 4]) == {1: [2, 4], 4: [2, 4]}
    cfg = compose(["model=convnet", "data=synthetic", "trainer.batch_size=8"])
    plans = plan_splits(cfg, 2, [2, 8])
    assert set(plans) == {2, 8} and all(sum(c) == 6 and len(c) == 2 for c in plans.values())
