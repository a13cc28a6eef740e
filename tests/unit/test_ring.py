"""rpc_train.loader.ring: every process agrees on owners, and a leaving worker moves only its keys."""

import json
import os
import subprocess
import sys

import pytest

from helpers.launching import REPO
from rpc_train.loader.ring import HashRing

NODES = ["worker1", "worker2", "worker3", "worker4"]
KEYS = range(20_000)


def mapping(ring):
    return {key: ring.owner(key) for key in KEYS}


def test_same_owner_across_rings_and_key_types():
    a, b = HashRing(NODES), HashRing(list(reversed(NODES)))
    for key in [0, 1, 12345, "train/00017.png", ""]:
        assert a.owner(key) == b.owner(key)


def test_same_owner_in_another_process():
    # A different PYTHONHASHSEED would change hash() of a str: the ring must not depend on it.
    keys = [0, 7, 999, 123456, "a/b.jpg", "sample-42"]
    code = ("import json, sys; from rpc_train.loader.ring import HashRing; "
            f"r = HashRing({NODES!r}); print(json.dumps([r.owner(k) for k in {keys!r}]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    ring = HashRing(NODES)
    assert json.loads(out) == [ring.owner(k) for k in keys]


def test_shares_are_even():
    owned = HashRing(NODES).owners(KEYS)
    assert sorted(owned) == NODES
    for node, keys in owned.items():
        assert 0.15 <= len(keys) / len(KEYS) <= 0.35, node


def test_owners_keeps_order_and_every_key():
    keys = [5, 3, 9, 1, 8, 2, 7]
    owned = HashRing(NODES).owners(keys)
    assert sorted(k for group in owned.values() for k in group) == sorted(keys)
    for group in owned.values():
        assert group == [k for k in keys if k in group]


def test_removing_a_node_moves_only_its_keys_and_adding_it_back_restores():
    ring = HashRing(NODES)
    before = mapping(ring)
    smaller = ring.without("worker3")
    after = mapping(smaller)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert 0.15 <= len(moved) / len(KEYS) <= 0.35
    assert all(before[key] == "worker3" for key in moved)  # no other worker's key moved
    assert "worker3" not in set(after.values())
    assert mapping(smaller.with_node("worker3")) == before
    assert ring.nodes == NODES and mapping(ring) == before  # the original ring is untouched


def test_one_node_owns_everything():
    ring = HashRing(["only"])
    assert set(mapping(ring).values()) == {"only"}


def test_empty_ring_and_bad_input_raise_clearly():
    with pytest.raises(ValueError, match="no nodes"):
        HashRing([]).owner(1)
    with pytest.raises(ValueError, match="no nodes"):
        HashRing(["a"]).without("a").owner(1)
    with pytest.raises(ValueError, match="not on the ring"):
        HashRing(["a"]).without("b")
    with pytest.raises(TypeError):
        HashRing(["a"]).owner(1.5)
