"""serve/generation.py's scheduler with in-process stages: a real GPT and real KV caches behind a
fake `send`, no RPC. Same seed, same text whatever else is in the batch; continuous batching on
and off; a cancelled sequence's cache is freed."""

import threading
import time

import pytest
import torch

from helpers.gpt_runs import gpt_run
from rpc_train.generation.decoding import generate
from rpc_train.generation.sampling import Sampling
from rpc_train.serve.dispatch import Replica
from rpc_train.serve.generation import GenerationScheduler
from rpc_train.serve.kv_cache import SequenceCaches
from rpc_train.serve.source import build_served, served_model

pytestmark = pytest.mark.timeout(60)
KEY = ("gpt", "1")


class InProcessStage:
    """What decode_on_stage does on a one-stage replica; it records each step's sequence ids."""

    def __init__(self, model, delay_s: float = 0.0):
        self.model, self.caches, self.delay_s = model, SequenceCaches(60), delay_s
        self.steps = []

    def __call__(self, replica, key, steps, ended):
        self.steps.append([sequence for sequence, _, _ in steps])
        time.sleep(self.delay_s)
        rows = []
        with torch.no_grad():
            for sequence, x, start in steps:
                rows.append(self.model.decode(x, self.caches.for_step(key, sequence, start), start)[0, -1])
        self.caches.free(ended)
        done = torch.futures.Future()
        done.set_result((torch.stack(rows) if rows else torch.empty(0), [len(self.caches)]))
        return done


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_served(served_model(str(gpt_run(tmp_path_factory.mktemp("gpt"))), None))


def scheduler(stage, continuous=True):
    return GenerationScheduler([Replica(replica=0, workers=["w"], loaded={KEY})], max_batch=8, max_waiting=64,
                               continuous=continuous, timeout_s=10, send=stage)


def text(stream) -> bytes:
    return bytes(stream)


def test_same_seed_same_text_alone_or_beside_others(model):
    alone_stage = InProcessStage(model)
    sampling = Sampling(20, 1.0, 0, 11)
    alone = text(scheduler(alone_stage).submit(KEY, b"def ", sampling, 32, None))
    assert list(alone) == list(generate(model, b"def ", sampling))  # and what one process draws
    crowd_stage = InProcessStage(model)
    crowd = scheduler(crowd_stage)
    others = [crowd.submit(KEY, b"class X", Sampling(15, 0.9, 5, seed), 32, None) for seed in range(3)]
    mine = crowd.submit(KEY, b"def ", sampling, 32, None)
    results = {}
    threads = [threading.Thread(target=lambda i=i, s=s: results.__setitem__(i, text(s)))
               for i, s in enumerate(others + [mine])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results[3] == alone
    assert max(map(len, crowd_stage.steps)) == 4  # they really were decoded together
    assert wait_for(lambda: len(crowd_stage.caches) == 0 and crowd.live_caches() == 0)  # ended: freed
    assert crowd.drain(5)


def wait_for(condition, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_continuous_batching_lets_a_new_sequence_join_the_running_batch(model):
    for continuous in (True, False):
        stage = InProcessStage(model, delay_s=0.01)
        s = scheduler(stage, continuous)
        first = s.submit(KEY, b"a", Sampling(30, 1.0, 0, 1), 32, None)
        while not stage.steps:
            time.sleep(0.005)
        second = s.submit(KEY, b"b", Sampling(5, 1.0, 0, 2), 32, None)
        text(second), text(first)
        mixed = any(len(ids) == 2 for ids in stage.steps)
        assert mixed == continuous, (continuous, stage.steps)
        assert s.drain(5)


def test_a_cancelled_sequence_frees_its_cache(model):
    stage = InProcessStage(model, delay_s=0.01)
    s = scheduler(stage)
    stream = s.submit(KEY, b"def ", Sampling(1000, 1.0, 0, 1), 32, None)
    tokens = iter(stream)
    next(tokens), next(tokens)
    assert len(stage.caches) == 1
    stream.cancel()
    assert wait_for(lambda: len(stage.caches) == 0 and s.live_caches() == 0 and s.running() == 0)
    assert list(tokens) == []  # the caller's iteration ends
