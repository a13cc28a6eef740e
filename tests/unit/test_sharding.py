"""Parameter sharding: every tensor on exactly one server, the servers balanced by size."""

import itertools
import random

import pytest

from rpc_train.config.compose import compose
from rpc_train.training.builders import build_model
from rpc_train.config.errors import ConfigError
from rpc_train.ps.sharding import shard_by_size, tensor_sizes

pytestmark = pytest.mark.timeout(60)


def loads(sizes, shards):
    return [sum(sizes[name] for name in shard) for shard in shards]


def best_max_load(sizes, servers):
    """The optimum, by trying every assignment (small cases only)."""
    values = list(sizes.values())
    best = float("inf")
    for owners in itertools.product(range(servers), repeat=len(values)):
        per = [0] * servers
        for value, owner in zip(values, owners):
            per[owner] += value
        best = min(best, max(per))
    return best


def test_each_tensor_goes_to_exactly_one_server_in_model_order():
    sizes = {"a": 5, "b": 1, "c": 9, "d": 3, "e": 3}
    shards = shard_by_size(sizes, 2)
    assert sorted(n for shard in shards for n in shard) == sorted(sizes)
    order = list(sizes)
    assert all(shard == sorted(shard, key=order.index) for shard in shards)


def test_largest_first_into_the_least_loaded_server():
    # 9 -> s0, 5 -> s1, 3 -> s1 (5 < 9), 3 -> s1 (8 < 9), 1 -> s0 (9 < 11)
    assert shard_by_size({"a": 5, "b": 1, "c": 9, "d": 3, "e": 3}, 2) == [["b", "c"], ["a", "d", "e"]]


def test_equal_tensors_split_evenly_and_deterministically():
    sizes = {f"t{i}": 10 for i in range(6)}
    shards = shard_by_size(sizes, 3)
    assert loads(sizes, shards) == [20, 20, 20]
    # Ties go to the lowest-numbered server, in name order: the same split on every rank.
    assert shards == [["t0", "t3"], ["t1", "t4"], ["t2", "t5"]]


@pytest.mark.parametrize("seed", range(20))
def test_within_four_thirds_of_the_best_split(seed):
    rng = random.Random(seed)
    sizes = {f"t{i}": rng.randint(1, 1000) for i in range(rng.randint(3, 8))}
    servers = rng.randint(2, 3)
    shards = shard_by_size(sizes, servers)
    assert max(loads(sizes, shards)) <= 4 / 3 * best_max_load(sizes, servers)


@pytest.mark.parametrize("model, servers", [("mlp", 2), ("mlp", 3), ("convnet", 2), ("resnet18", 4)])
def test_real_models_balance_within_their_largest_tensor(model, servers):
    cfg = compose([f"model={model}", "data=cifar10" if model == "resnet18" else "data=digits"])
    sizes = tensor_sizes(build_model(cfg.model, 0))
    per = loads(sizes, shard_by_size(sizes, servers))
    # Greedy keeps any two servers within one tensor of each other, largest tensor at most.
    assert max(per) - min(per) <= max(sizes.values())
    assert sum(per) == sum(sizes.values())


def test_more_servers_than_tensors_is_a_config_error():
    with pytest.raises(ConfigError, match=r"ps.servers=4: the model has only 3 tensors"):
        shard_by_size({"a": 1, "b": 2, "c": 3}, 4)
