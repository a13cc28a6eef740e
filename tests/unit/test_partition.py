"""Stage partitioning: exact min-max split, and the three balance strategies."""

import itertools

import pytest
import torch
from torch import nn

from helpers.probes import InputProbe
from rpc_train.config.errors import ConfigError
from rpc_train.pipeline.partition import balance_costs, param_costs, plan_stages, stage_bounds, time_costs

pytestmark = pytest.mark.timeout(60)


def brute_force_max(costs, k):
    n, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_balance_costs_is_optimal(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 9, (1,), generator=gen))
    k = int(torch.randint(1, n + 1, (1,), generator=gen))
    costs = torch.randint(1, 50, (n,), generator=gen).tolist()
    counts = balance_costs(costs, k)
    assert len(counts) == k and sum(counts) == n and min(counts) >= 1
    bounds = stage_bounds(counts)
    assert max(sum(costs[r.start:r.stop]) for r in bounds) == brute_force_max(costs, k)


def test_balance_costs_rejects_more_stages_than_layers():
    with pytest.raises(ConfigError, match="3 layers into 4 stages"):
        balance_costs([1, 1, 1], 4)


def test_params_balance_isolates_the_heavy_layer():
    layers = [nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 400), nn.Linear(400, 4)]
    costs = param_costs(layers)
    assert costs[1] == 1.0  # parameter-free layers still count a little
    assert plan_stages(layers, 2, "params", torch.randn(2, 4)) == [3, 1]


def test_time_balance_measures_the_slow_layer():
    layers = [nn.Linear(64, 64), nn.Linear(64, 2048), nn.Linear(2048, 2048), nn.Linear(2048, 64)]
    costs = time_costs(layers, torch.randn(64, 64))
    assert costs[2] == max(costs)
    assert len(plan_stages(layers, 2, "time", torch.randn(64, 64))) == 2


def test_time_costs_times_backward_as_the_stages_run_it():
    first, later = InputProbe(), InputProbe()
    # A parameter-free first layer (no gradient to compute at all) is timed too.
    costs = time_costs([first, nn.Flatten(), nn.Linear(12, 4), later, nn.ReLU()], torch.randn(4, 3, 4))
    assert len(costs) == 5 and all(c > 0 for c in costs)
    # Like stage 0, the first layer gets the data without a gradient; later layers get one.
    assert set(first.seen) == {False} and set(later.seen) == {True}


def test_explicit_balance_is_used_as_given_and_checked():
    layers = [nn.ReLU() for _ in range(5)]
    assert plan_stages(layers, 2, [4, 1], torch.randn(1)) == [4, 1]
    with pytest.raises(ConfigError, match=r"pipeline.balance=\[2, 2\]"):
        plan_stages(layers, 2, [2, 2], torch.randn(1))


def test_stage_bounds_are_contiguous():
    assert stage_bounds([2, 3, 1]) == [range(0, 2), range(2, 5), range(5, 6)]
