"""The serving dispatcher's faults, without processes: replicas that hang, fail, answer the wrong
shape, or whose RPC agent refuses calls (helpers.fake_replicas runs the real replica functions
in threads, with torch RPC's timeout)."""

import threading
import time

import grpc
import pytest
import torch

from helpers.fake_replicas import FakeReplicas, wait_until
from rpc_train.serve.dispatch import BatchingLimits, Dispatcher, Replica
from rpc_train.serve.routing import POLICIES

pytestmark = pytest.mark.timeout(60)

ROW = (1, 8, 8)
KEY = ("mlp", "1")  # the one (model, version) every fake replica has loaded


def rows(n: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((n, *ROW), value)


def logits(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)[:, :3] * 2


def dispatcher(replicas: int, timeout_s: float = 0.3, inflight: int = 1, on_batch=lambda r, n: None) -> Dispatcher:
    group = [Replica(replica=r, workers=[f"worker{r + 1}"], loaded={KEY}) for r in range(replicas)]
    return Dispatcher(group, POLICIES["least_loaded"](), BatchingLimits(4, inflight, 0.0, 64, timeout_s), on_batch)


def test_a_replica_stuck_in_its_model_stays_out_while_its_process_answers(monkeypatch):
    # Replica 0's model hangs on every batch, but its process still answers RPCs: only a real
    # batch through it tells that it cannot serve, so it must stay out of rotation.
    release = threading.Event()
    fake = FakeReplicas(monkeypatch, {0: lambda x: (release.wait(), logits(x))[1], 1: logits})
    d = dispatcher(2)
    try:
        first = d.submit(KEY, (rows(1, 1.0),), None)
        assert first.done.wait(5) and first.error is None  # timed out on 0, answered by 1
        assert not d.replicas[0].in_rotation
        time.sleep(1.5)  # three probe rounds
        assert not d.replicas[0].in_rotation, "readmitted while its model is stuck"
        answered = [d.submit(KEY, (rows(1, 2.0),), None) for _ in range(5)]
        assert all(p.done.wait(5) and p.error is None for p in answered)
        assert [c for c in fake.calls if c[0] == "infer_on_stage" and c[1] == 0] == [("infer_on_stage", 0, 1)]
    finally:
        release.set()
        d.drain(timeout_s=5)


def test_a_timed_out_batch_counts_against_the_in_flight_limit_until_it_ends(monkeypatch):
    # Only batches holding the value 7 hang on replica 0: it comes back when a probe goes through,
    # but its hung batch still holds its one in-flight place until it really ends.
    release = threading.Event()

    def model0(x):
        if (x == 7).any():
            release.wait()
        return logits(x)

    fake = FakeReplicas(monkeypatch, {0: model0, 1: logits})
    d = dispatcher(2, inflight=1)
    try:
        stuck = d.submit(KEY, (rows(1, 7.0),), None)
        assert stuck.done.wait(5) and stuck.error is None  # answered by replica 1
        zero = d.replicas[0]
        assert wait_until(lambda: zero.in_rotation, 2), "a real batch went through: it should be back"
        assert zero.batches_in_flight == 1 and len(zero.lingering) == 1
        sent = len(fake.calls)
        answered = [d.submit(KEY, (rows(1),), None) for _ in range(4)]
        assert all(p.done.wait(5) and p.error is None for p in answered)
        assert not [c for c in fake.calls[sent:] if c[0] == "infer_on_stage" and c[1] == 0]
        release.set()
        assert wait_until(lambda: zero.batches_in_flight == 0 and not zero.lingering, 3)
        for _ in range(4):  # idle replicas share the work again
            assert d.submit(KEY, (rows(1),), None).done.wait(5)
        assert [c for c in fake.calls if c[0] == "infer_on_stage" and c[1] == 0][1:]
    finally:
        release.set()
        d.drain(timeout_s=5)


def test_a_retry_waits_for_room_and_never_computes_an_expired_request(monkeypatch):
    hold = threading.Event()
    computed = []

    def busy(x):
        computed.extend(x[:, 0, 0, 0].tolist())
        if (x == 5).any():
            hold.wait()
        return logits(x)

    def failing(x):
        time.sleep(0.3)
        raise RuntimeError("replica 1 broke")

    FakeReplicas(monkeypatch, {0: busy, 1: failing})
    over = []
    d = dispatcher(2, timeout_s=5, inflight=1,
                   on_batch=lambda r, n: over.append(r) if d.replicas[r].batches_in_flight > 1 else None)
    try:
        held = d.submit(KEY, (rows(1, 5.0),), None)  # replica 0, at its one batch in flight until `hold`
        assert wait_until(lambda: computed == [5.0])
        late = d.submit(KEY, (rows(1, 3.0),), time.monotonic() + 0.2)  # these two go to replica 1, which fails
        keep = d.submit(KEY, (rows(1, 4.0),), None)
        assert late.done.wait(2) and late.error.code == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.5)
        assert not over, "a retry went past serve.max_inflight_batches"
        assert not keep.done.is_set()  # waiting in the queue for room
        hold.set()
        assert held.done.wait(5) and keep.done.wait(5) and held.error is None and keep.error is None
        assert computed == [5.0, 4.0], "an expired request was computed on the retry"
    finally:
        hold.set()
        d.drain(timeout_s=5)


def test_a_drain_waits_for_a_retry_in_progress(monkeypatch):
    # The failed batch's requests are retried while the drain waits: slow logging between the
    # failure and the retry must not let the drain believe nothing is left.
    from rpc_train.serve import dispatch

    def failing(x):
        time.sleep(0.2)
        raise RuntimeError("replica 0 broke")

    FakeReplicas(monkeypatch, {0: failing, 1: logits})
    warn = dispatch.log.warning
    monkeypatch.setattr(dispatch.log, "warning", lambda *a, **k: (time.sleep(0.5), warn(*a, **k)))
    d = dispatcher(2, timeout_s=5)
    pending = d.submit(KEY, (rows(1),), None)
    assert d.drain(timeout_s=5)
    assert pending.done.is_set() and pending.error is None, pending.error and pending.error.message


def test_a_reply_that_does_not_fit_the_batch_answers_every_request(monkeypatch):
    FakeReplicas(monkeypatch, {0: lambda x: logits(x)[:1]})  # one row whatever the batch
    d = dispatcher(1, timeout_s=5, inflight=1)
    try:
        first = d.submit(KEY, (rows(1),), None)
        assert first.done.wait(5) and first.error is None
        hold = [d.submit(KEY, (rows(2),), None) for _ in range(2)]
        assert all(p.done.wait(5) for p in hold), "requests left unanswered"
        assert {p.error.code for p in hold} == {grpc.StatusCode.INTERNAL}
    finally:
        d.drain(timeout_s=5)


def test_the_prober_survives_rpc_async_raising(monkeypatch):
    broken = threading.Event()
    broken.set()

    def flaky(x):
        if broken.is_set():
            raise RuntimeError("replica 0 broke")
        return logits(x)

    fake = FakeReplicas(monkeypatch, {0: flaky})
    d = dispatcher(1, timeout_s=5)
    try:
        failed = d.submit(KEY, (rows(1),), None)
        assert failed.done.wait(5) and failed.error.code == grpc.StatusCode.UNAVAILABLE
        fake.refuse = 3  # the probes' rpc_async raises, as an agent whose connection closed does
        broken.clear()
        assert wait_until(lambda: d.replicas[0].in_rotation, 5), "the prober stopped probing"
    finally:
        d.drain(timeout_s=5)
