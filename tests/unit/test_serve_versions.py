"""Several models and versions, without a server: the repository's version choice, the
dispatcher's queue per (model, version), inputs of several tensors and the cache key over them."""

import threading
import time

import grpc
import numpy as np
import pytest
import torch

from rpc_train.serve.cache import ResponseCache
from rpc_train.serve.dispatch import BatchingLimits, Dispatcher, Refused, Replica
from rpc_train.serve.repository import LOADING, READY, UNAVAILABLE, Repository
from rpc_train.serve.routing import POLICIES
from rpc_train.serve.source import ServedModel
from rpc_train.serve.spec import InferRequest, ModelSpec
from rpc_train.serve.tensors import BadRequest, Tensor

pytestmark = pytest.mark.timeout(60)


def served(name="mlp", run="runs/a") -> ServedModel:
    return ServedModel(run_dir=run, name=name, model_cfg={}, seed=0, shape=[1, 8, 8], num_classes=10)


def test_a_request_without_a_version_gets_the_newest_one_every_replica_in_rotation_has():
    repo = Repository(keep_versions=2)
    one = repo.add(served(), "d1", 4)
    repo.set_state(one, READY)
    two = repo.add(served(run="runs/b"), "d2", 4)
    assert two.version == "2" and two.state == LOADING
    half = {("mlp", "1"), ("mlp", "2")}  # replica 0 has both, replica 1 only "1"
    everywhere = lambda key: key in {("mlp", "1")}  # noqa: E731
    anywhere = lambda key: key in half  # noqa: E731
    assert repo.resolve("mlp", "", everywhere, anywhere).version == "1"  # "2" is not rolled out yet
    assert repo.resolve("mlp", "2", everywhere, anywhere).version == "2"  # named, it may be asked already
    repo.set_state(two, READY)
    assert repo.resolve("mlp", "", lambda key: True).version == "2"
    three = repo.add(served(run="runs/c"), "d3", 4)
    repo.set_state(three, READY)
    assert [v.version for v in repo.to_retire("mlp")] == ["1"]  # keep_versions=2: "2" and "3" stay
    with pytest.raises(BadRequest) as err:
        repo.resolve("mlp", "1", lambda key: True)
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "its versions are '2', '3'" in err.value.message
    index = {(m["name"], m["version"]): m for m in repo.index()}
    assert index[("mlp", "1")]["state"] == UNAVAILABLE and "keep_versions=2" in index[("mlp", "1")]["reason"]
    assert [m["version"] for m in repo.index(ready_only=True)] == ["2", "3"]


def test_unknown_and_unloaded_models_are_not_found_in_one_line():
    repo = Repository(keep_versions=2)
    repo.set_state(repo.add(served(), "d1", 4), READY)
    with pytest.raises(BadRequest, match="model 'resnet' is not served here; the model is 'mlp'"):
        repo.resolve("resnet", "", lambda key: True)
    repo.unload("mlp")
    with pytest.raises(BadRequest, match="model 'mlp' was unloaded") as err:
        repo.resolve("mlp", "", lambda key: True)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert repo.index()[0]["state"] == UNAVAILABLE


@pytest.fixture
def fake_replicas(monkeypatch):
    """rpc_async to a replica answers at once: each row's logits are its key's version number."""
    sent = []

    def rpc_async(worker, fn, args, timeout):
        replica, _, key, inputs, _batch_id = args
        sent.append((replica, key, len(inputs[0])))
        done = torch.futures.Future()
        done.set_result(torch.full((len(inputs[0]), 1), float(key[1])))
        return done

    monkeypatch.setattr("rpc_train.serve.dispatch.rpc.rpc_async", rpc_async)
    return sent


def dispatcher_of(replicas, max_batch_size=8):
    return Dispatcher(replicas, POLICIES["least_loaded"](), BatchingLimits(max_batch_size, 2, 0.0, 64, 5.0))


def test_a_batch_holds_one_version_and_goes_to_a_replica_that_has_it(fake_replicas):
    replicas = [Replica(replica=0, workers=["w1"], loaded={("mlp", "1")}),
                Replica(replica=1, workers=["w2"], loaded={("mlp", "1"), ("mlp", "2")})]
    dispatcher = dispatcher_of(replicas)
    try:
        pending = [dispatcher.submit(("mlp", str(1 + i % 2)), (torch.zeros(1, 3),), None) for i in range(20)]
        for p in pending:
            assert p.done.wait(10) and p.error is None
            assert float(p.logits[0, 0]) == float(p.key[1])  # computed by the version it asked for
        assert all(replica == 1 for replica, key, _ in fake_replicas if key == ("mlp", "2"))
    finally:
        dispatcher.drain(timeout_s=1)


def test_a_paused_replica_gets_no_batch_and_its_requests_wait_in_the_queue(fake_replicas):
    replica = Replica(replica=0, workers=["w1"], loaded={("mlp", "1")})
    dispatcher = dispatcher_of([replica])
    try:
        assert dispatcher.pause(replica, timeout_s=1)
        waiting = dispatcher.submit(("mlp", "1"), (torch.zeros(2, 3),), None)  # accepted: still in rotation
        time.sleep(0.3)
        assert not waiting.done.is_set() and not fake_replicas
        dispatcher.resume(replica, loaded=("mlp", "2"))
        assert waiting.done.wait(10) and waiting.error is None and replica.loaded == {("mlp", "1"), ("mlp", "2")}
    finally:
        dispatcher.drain(timeout_s=1)


def test_a_retired_version_is_answered_what_was_queued_then_refused(fake_replicas):
    replica = Replica(replica=0, workers=["w1"], loaded={("mlp", "1"), ("mlp", "2")})
    dispatcher = dispatcher_of([replica])
    try:
        dispatcher.pause(replica, timeout_s=1)
        queued = dispatcher.submit(("mlp", "1"), (torch.zeros(1, 3),), None)
        retired = threading.Thread(target=dispatcher.retire, args=(("mlp", "1"), 10))
        retired.start()
        time.sleep(0.2)
        assert retired.is_alive()  # waits for the queued request
        dispatcher.resume(replica)
        retired.join(10)
        assert queued.done.wait(5) and queued.error is None and ("mlp", "1") not in replica.loaded
        with pytest.raises(Refused) as err:
            dispatcher.submit(("mlp", "1"), (torch.zeros(1, 3),), None)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        dispatcher.drain(timeout_s=1)


def test_the_oldest_head_goes_first_among_versions(fake_replicas):
    replica = Replica(replica=0, workers=["w1"], loaded={("mlp", "1"), ("mlp", "2")})
    dispatcher = dispatcher_of([replica])
    try:
        dispatcher.pause(replica, timeout_s=1)
        first = dispatcher.submit(("mlp", "2"), (torch.zeros(1, 3),), None)
        dispatcher.submit(("mlp", "1"), (torch.zeros(1, 3),), None)
        dispatcher.resume(replica)
        assert first.done.wait(10)
        assert fake_replicas[0][1] == ("mlp", "2")
    finally:
        dispatcher.drain(timeout_s=1)


DLRM = ModelSpec.dlrm("clicks", 3, [5, 2], max_batch_size=8)


def dlrm_request(dense, sparse) -> InferRequest:
    return InferRequest("clicks", [Tensor("dense", "FP32", list(dense.shape), raw=dense.astype("<f4").tobytes()),
                                   Tensor("sparse", "INT64", list(sparse.shape), raw=sparse.astype("<i8").tobytes())])


def test_a_dlrm_takes_dense_and_sparse_inputs_and_indices_are_checked_against_each_table():
    dense, sparse = np.ones((2, 3), np.float32), np.array([[4, 1], [0, 0]])
    rows = DLRM.rows(dlrm_request(dense, sparse))
    assert [tuple(x.shape) for x in rows] == [(2, 3), (2, 2)] and rows[1].dtype == torch.int64
    assert DLRM.metadata()["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1]}]
    with pytest.raises(BadRequest) as err:
        DLRM.rows(dlrm_request(dense, np.array([[4, 1], [0, 2]])))
    assert err.value.message == ("input 'sparse' column 1 holds 2 (row 1); its table has 2 rows: "
                                 "send indices in [0, 2)")
    with pytest.raises(BadRequest, match="every input needs the same number of rows"):
        DLRM.rows(dlrm_request(dense, sparse[:1]))


def test_the_cache_key_covers_every_input_and_the_versions_digest():
    cache = ResponseCache(4)
    dense, sparse = torch.zeros(1, 3), torch.zeros(1, 2, dtype=torch.int64)
    other = sparse.clone()
    other[0, 1] = 1
    keys = {cache.key("d1", (dense, sparse)), cache.key("d1", (dense, other)), cache.key("d2", (dense, sparse))}
    assert len(keys) == 3 and cache.key("d1", (dense, sparse)) in keys
