"""rpc_train.loader.store: an LRU bounded by bytes, honest about what it holds, safe across threads."""

import threading

import pytest
import torch

from rpc_train.loader.store import SampleStore, tensor_bytes

ROW = 100  # bytes of one sample below: 25 float32


def sample(value: float = 0.0) -> torch.Tensor:
    return torch.full((25,), value, dtype=torch.float32)


def test_lru_order_a_get_refreshes():
    store = SampleStore(3 * ROW)
    store.put_many({1: sample(), 2: sample(), 3: sample()})
    assert set(store.get_many([1])) == {1}  # 1 is now the most recent; 2 the least
    store.put_many({4: sample()})
    assert set(store.get_many([1, 2, 3, 4])) == {1, 3, 4}
    assert store.stats()["evictions"] == 1


def test_get_many_returns_hits_and_counts_both():
    store = SampleStore(10 * ROW)
    store.put_many({"a": sample(1.0), "b": sample(2.0)})
    found = store.get_many(["a", "x", "b", "y", "z"])
    assert set(found) == {"a", "b"}
    torch.testing.assert_close(found["b"], sample(2.0))
    stats = store.stats()
    assert (stats["hits"], stats["misses"]) == (2, 3)


def test_byte_accounting_after_replace_and_eviction():
    store = SampleStore(4 * ROW)
    store.put_many({1: sample(), 2: sample()})
    store.put_many({1: torch.zeros(50)})  # replaced by a tensor twice the size
    assert store.stats()["bytes"] == 3 * ROW and len(store) == 2
    torch.testing.assert_close(store.get_many([1])[1], torch.zeros(50))
    store.put_many({3: torch.zeros(50)})  # 5 rows: 2 (least recent) goes, then 3 rows + 2 fit
    stats = store.stats()
    assert (stats["bytes"], stats["items"], stats["evictions"]) == (4 * ROW, 2, 1)
    assert set(store.get_many([1, 2, 3])) == {1, 3}


def test_bigger_than_capacity_is_rejected_and_evicts_nothing():
    store = SampleStore(2 * ROW)
    store.put_many({1: sample(), 2: sample()})
    store.put_many({3: torch.zeros(75)})
    stats = store.stats()
    assert (stats["rejected"], stats["evictions"], stats["items"], stats["bytes"]) == (1, 0, 2, 2 * ROW)
    store.put_many({1: torch.zeros(75)})  # a rejected re-put drops the stale value too
    assert set(store.get_many([1, 2])) == {2} and store.stats()["bytes"] == ROW


def test_capacity_zero_stores_nothing():
    store = SampleStore(0)
    store.put_many({1: sample(), 2: torch.zeros(0)})
    assert store.get_many([1, 2]) == {}
    assert store.stats() == {"hits": 0, "misses": 2, "bytes": 0, "items": 0, "evictions": 0,
                             "rejected": 0, "capacity_bytes": 0}
    with pytest.raises(ValueError):
        SampleStore(-1)


def test_pop_window_counts_since_last_call():
    store = SampleStore(10 * ROW)
    store.put_many({1: sample()})
    store.get_many([1, 2])
    assert store.pop_window() == {"hits": 1, "misses": 1}
    store.get_many([1, 1, 1])
    assert store.pop_window() == {"hits": 3, "misses": 0}
    assert store.pop_window() == {"hits": 0, "misses": 0}
    assert (store.stats()["hits"], store.stats()["misses"]) == (4, 1)  # totals are kept


def test_views_are_stored_compact():
    batch = torch.randn(1024, 256)  # 1 MiB of float32; one row is 1 KiB
    row = batch[7]
    store = SampleStore(4 * 1024)
    store.put_many({7: row})
    kept = store.get_many([7])[7]
    assert store.stats()["bytes"] == 1024
    assert kept.untyped_storage().nbytes() == 1024  # the 1 MiB base is not kept alive
    torch.testing.assert_close(kept, batch[7])
    column = batch[:, 0]  # a strided view: compact and contiguous once stored
    store.put_many({"col": column})
    assert store.get_many(["col"])["col"].is_contiguous()


def test_concurrent_puts_and_gets_stay_within_capacity():
    capacity = 50 * ROW
    store = SampleStore(capacity)
    n_threads, rounds, gets_per_round = 8, 200, 5
    errors = []

    def work(seed):
        try:
            for i in range(rounds):
                keys = [(seed * 7 + i * 3 + j) % 120 for j in range(gets_per_round)]
                store.get_many(keys)
                store.put_many({k: sample(k) for k in keys[:3]})
                assert store.stats()["bytes"] <= capacity
        except AssertionError as e:  # an assert in a thread would otherwise go unseen
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = store.stats()
    assert stats["hits"] + stats["misses"] == n_threads * rounds * gets_per_round
    assert stats["bytes"] == stats["items"] * ROW <= capacity
    held = store.get_many(range(120))
    assert len(held) == stats["items"]
    assert all(torch.equal(t, sample(k)) for k, t in held.items())  # no value under another key


def test_tensor_bytes_counts_elements_not_storage():
    assert tensor_bytes(torch.zeros(10, 10, dtype=torch.uint8)[0]) == 10
