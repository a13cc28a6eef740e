"""Overload through a real gRPC server in this process (replicas faked: helpers.fake_replicas):
past the limits a request is refused at once, and the time requests wait shows in the metrics."""

import time

import grpc
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from helpers.fake_replicas import FakeReplicas
from rpc_train.config.schema import ServeConf
from rpc_train.runtime.local_world import free_service_port
from rpc_train.serve.core import ServingCore
from rpc_train.serve.dispatch import BatchingLimits, Dispatcher, Replica
from rpc_train.serve.frontend import HealthReporter, InferenceService, start_server
from rpc_train.serve.repository import READY, Repository
from rpc_train.serve.source import ServedModel
from rpc_train.serve.observe import ServeMetrics
from rpc_train.serve.protocol import pb
from rpc_train.serve.routing import POLICIES

pytestmark = pytest.mark.timeout(120)


def request() -> "pb.ModelInferRequest":
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    return pb.ModelInferRequest(model_name="mlp", inputs=[tensor],
                                raw_input_contents=[np.zeros(64, "<f4").tobytes()])


def slow_model(x: torch.Tensor) -> torch.Tensor:
    time.sleep(0.02)
    return x.flatten(1)[:, :10]


def test_past_the_limits_a_request_is_refused_at_once_and_waiting_shows_in_the_queue_metrics(monkeypatch):
    # The measurement: 200 concurrent 1-row requests against serve.threads=4,
    # max_queue_size=8, max_batch_size=4 were all queued (in gRPC's own queue) and none refused.
    conf = OmegaConf.structured(ServeConf(port=free_service_port(), threads=4, max_queue_size=8, max_batch_size=4))
    FakeReplicas(monkeypatch, {0: slow_model, 1: slow_model})
    replicas = [Replica(replica=r, workers=[f"worker{r + 1}"], loaded={("mlp", "1")}) for r in range(2)]
    metrics = ServeMetrics(2, 4, lambda r: replicas[r].rows_in_flight, lambda: 2)
    dispatcher = Dispatcher(replicas, POLICIES["least_loaded"](), BatchingLimits(4, 2, 0.0, 8, 5.0, conf.threads),
                            on_batch=metrics.batch_sent)
    repository = Repository(keep_versions=1)
    repository.set_state(repository.add(ServedModel(run_dir="runs/a", name="mlp", model_cfg={}, seed=0,
                                                    shape=[1, 8, 8], num_classes=10), "digest", 4), READY)
    core = ServingCore(repository, dispatcher, metrics, max_message_mb=1.0)
    core.loaded = True
    service = InferenceService(core)
    server = start_server(service, HealthReporter(), conf)
    try:
        from rpc_train.serve.protocol import SERVICE

        channel = grpc.insecure_channel(f"127.0.0.1:{conf.port}")
        call = channel.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        call(request(), timeout=10)  # connected and warm
        outcomes = []

        def record(future, sent):
            code = future.code()
            outcomes.append((code, time.monotonic() - sent))

        for _ in range(200):
            sent = time.monotonic()
            call.future(request(), timeout=30).add_done_callback(lambda f, sent=sent: record(f, sent))
        deadline = time.monotonic() + 60
        while len(outcomes) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        codes = [code for code, _ in outcomes]
        assert len(codes) == 200 and set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
        refused = [s for code, s in outcomes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert refused, "no request was refused: they waited in gRPC's own queue"
        assert max(refused) < 2.0, f"a refusal took {max(refused):.2f} s: it waited before being refused"
        # Every answered request's wait is in the queue histogram, counted from its arrival.
        ok = [s for code, s in outcomes if code == grpc.StatusCode.OK]
        value = metrics.registry.get_sample_value
        assert value("rpc_train_serve_queue_seconds_count") == len(ok) + 1
        served_s, waited_s = value("rpc_train_serve_latency_seconds_sum"), sum(ok)
        assert served_s >= 0.7 * waited_s - 0.05 * len(ok), (served_s, waited_s)
    finally:
        dispatcher.drain(timeout_s=5)
        server.stop(grace=1).wait()
