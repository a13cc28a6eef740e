"""A GPT run served for real (launch.sh mode=serve): tokens streamed one by one over
ModelStreamInfer with tritonclient, the whole text over ModelInfer through both doors, the same
seed giving the same text alone or among other streams, a cancelled stream's caches freed, and
a replica of two stages."""

import json
import queue
import threading
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton

from helpers.gpt_runs import gpt_run
from helpers.serving import ServingJob
from rpc_train.generation.decoding import generate
from rpc_train.generation.sampling import Sampling
from rpc_train.serve.source import build_served, served_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LIVE = ("rpc_train_serve_sequences_live", frozenset())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return gpt_run(tmp_path_factory.mktemp("gpt"))


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    with ServingJob(run, tmp_path_factory.mktemp("serve"), nproc=2) as job:
        yield job


def prompt(text: bytes = b"def "):
    tensor = triton.InferInput("prompt", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[text]], dtype=object))
    return tensor


def params(max_tokens: int, seed: int, temperature: float = 1.0) -> dict:
    return {"max_tokens": max_tokens, "seed": seed, "temperature": temperature}


class Stream:
    """One tritonclient stream: each response as it arrives (bytes, generated_tokens, final)."""

    def __init__(self, url: str):
        self.client, self.responses = triton.InferenceServerClient(url), queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, parameters: dict, text: bytes = b"def ", request_id: str = "") -> None:
        self.client.async_stream_infer("gpt", [prompt(text)], parameters=parameters, request_id=request_id)

    def next(self):
        result, error = self.responses.get(timeout=60)
        assert error is None, error
        p = result.get_response().parameters
        return result.as_numpy("text").item(), p["generated_tokens"].int64_param, p["triton_final_response"].bool_param

    def text(self) -> tuple:
        tokens, counts = [], []
        while True:
            token, count, final = self.next()
            tokens.append(token)
            counts.append(count)
            if final:
                return b"".join(tokens), counts

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)


def test_tokens_arrive_one_by_one_and_join_into_modelinfers_text(server, run):
    stream = Stream(server.url)
    stream.send(params(24, 5))
    streamed, counts = stream.text()
    stream.close()
    assert counts == list(range(1, 25))  # one response per byte, in order
    whole = triton.InferenceServerClient(server.url).infer("gpt", [prompt()], parameters=params(24, 5))
    assert whole.as_numpy("text").item() == streamed
    model = build_served(served_model(str(run), None))
    assert streamed == bytes(generate(model, b"def ", Sampling(24, 1.0, 0, 5)))  # what one process draws
    body = json.dumps({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["def "]}],
                       "parameters": {**params(24, 5), "binary_data_output": True}}).encode()
    reply = urllib.request.urlopen(f"http://{server.http_url}/v2/models/gpt/infer", body, timeout=60).read()
    assert reply.endswith(streamed)  # the HTTP door: the same text (binary, after the JSON header)
    config = triton.InferenceServerClient(server.url).get_model_config("gpt").config
    assert config.model_transaction_policy.decoupled


def test_same_seed_same_text_alone_or_among_other_streams(server):
    alone = Stream(server.url)
    alone.send(params(40, 9))
    expected, _ = alone.text()
    alone.close()
    results, streams = {}, [Stream(server.url) for _ in range(4)]

    def one(i: int) -> None:
        streams[i].send(params(40, 9) if i == 0 else params(20 + 10 * i, 100 + i), b"import " if i else b"def ")
        results[i] = streams[i].text()[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in (1, 2, 3, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for stream in streams:
        stream.close()
    assert results[0] == expected
    assert len(set(results.values())) == 4


def test_a_cancelled_stream_frees_its_caches(server):
    stream = Stream(server.url)
    stream.send(params(4000, 1))
    for _ in range(5):
        stream.next()
    assert server.metrics()[LIVE] == 1
    stream.close(cancel=True)
    for _ in range(100):
        if server.metrics()[LIVE] == 0:
            break
        threading.Event().wait(0.1)
    assert server.metrics()[LIVE] == 0
    assert server.metrics()[("rpc_train_serve_sequences_running", frozenset())] == 0


def test_a_replica_of_two_stages_keeps_a_cache_on_each(run, tmp_path):
    with ServingJob(run, tmp_path / "serve", ["serve.stages=2"], nproc=3) as job:
        stream = Stream(job.url)
        stream.send(params(40, 5))  # past the context of 32: the window slides on both stages
        streamed, _ = stream.text()
        stream.close()
    model = build_served(served_model(str(run), None))
    assert streamed == bytes(generate(model, b"def ", Sampling(40, 1.0, 0, 5)))
