"""Serving's parts without a server: the request codec, the routing policies, the served run."""

import os

import grpc
import numpy as np
import pytest
import torch

from rpc_train.config.errors import ConfigError
from rpc_train.serve.codec import decode, encode
from rpc_train.serve.protocol import pb
from rpc_train.serve.routing import POLICIES, ReplicaLoad
from rpc_train.serve.source import ServedModel, newest_run, served_model
from rpc_train.serve.spec import ModelSpec
from rpc_train.serve.tensors import BadRequest

pytestmark = pytest.mark.timeout(60)

SPEC = ModelSpec.classifier("mlp", [1, 8, 8], 10, max_batch_size=4)


def request(rows: np.ndarray, typed: bool = False):
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(rows.shape))
    if typed:
        tensor.contents.fp32_contents.extend(rows.flatten().tolist())
        return pb.ModelInferRequest(model_name="mlp", inputs=[tensor])
    return pb.ModelInferRequest(model_name="mlp", inputs=[tensor], raw_input_contents=[rows.astype("<f4").tobytes()])


def test_raw_and_typed_contents_decode_to_the_same_rows():
    rows = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    for typed in (False, True):
        assert torch.equal(decode(request(rows, typed), SPEC), torch.from_numpy(rows))


def test_a_reply_carries_the_logits_as_raw_fp32_and_the_batch_size():
    logits = torch.randn(2, 10)
    reply = encode(request(np.zeros((2, 1, 8, 8), np.float32)), SPEC, logits, batch_rows=7)
    assert reply.outputs[0].name == "logits" and list(reply.outputs[0].shape) == [2, 10]
    assert np.array_equal(np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(2, 10), logits.numpy())
    assert reply.parameters["batch_rows"].int64_param == 7


@pytest.mark.parametrize("change, code, needle", [
    (lambda r: setattr(r, "model_name", "other"), grpc.StatusCode.NOT_FOUND, "model 'other' is not served here"),
    (lambda r: setattr(r, "model_version", "7"), grpc.StatusCode.NOT_FOUND, "has no version '7'"),
    (lambda r: r.outputs.add(name="probs"), grpc.StatusCode.INVALID_ARGUMENT, "outputs ['probs']"),
    (lambda r: r.inputs[0].contents.fp32_contents.append(1.0), grpc.StatusCode.INVALID_ARGUMENT,
     "both raw_input_contents and typed contents"),
    (lambda r: r.raw_input_contents.append(b""), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 2 entries"),
])
def test_every_malformed_request_names_what_is_wrong(change, code, needle):
    bad = request(np.zeros((2, 1, 8, 8), np.float32))
    change(bad)
    with pytest.raises(BadRequest) as err:
        decode(bad, SPEC)
    assert err.value.code == code and needle in err.value.message and "\n" not in err.value.message


def test_bytes_protobuf_cannot_parse_reach_the_servicer_as_undecodable_not_grpcs_traceback():
    from types import SimpleNamespace

    from rpc_train.serve.protocol import SERVICE, Undecodable, handler

    class Servicer:  # every method answers its own name
        def __getattr__(self, name):
            return lambda request, context: name

    service = handler(Servicer())
    infer = service.service(SimpleNamespace(method=f"/{SERVICE}/ModelInfer", invocation_metadata=()))
    junk = infer.request_deserializer(b"\x07junk")
    assert isinstance(junk, Undecodable) and "ModelInfer" in junk.message and "5 bytes" in junk.message
    assert infer.unary_unary(junk, None) == "undecodable"
    valid = request(np.zeros((1, 1, 8, 8), np.float32))
    assert infer.request_deserializer(valid.SerializeToString()) == valid
    assert infer.unary_unary(valid, None) == "ModelInfer"
    stream = service.service(SimpleNamespace(method=f"/{SERVICE}/ModelStreamInfer", invocation_metadata=()))
    assert isinstance(stream.request_deserializer(b"\x07junk"), Undecodable)  # answered on the stream


def test_a_rate_limited_log_writes_one_line_a_window_and_then_says_how_many_it_held_back():
    import logging

    from rpc_train.serve.ratelimit import RateLimitedLog

    lines, now = [], [0.0]

    class Recorder(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("test_rate_limited_log")
    logger.addHandler(Recorder())
    limited = RateLimitedLog(logger, every_s=60, clock=lambda: now[0])
    written = [limited.log(logging.WARNING, "bad request: %s", i) for i in range(1000)]
    now[0] = 61.0
    written.append(limited.log(logging.WARNING, "bad request: %s", "%s"))  # the client's text is an argument
    assert written == [True] + [False] * 999 + [True]
    assert lines == ["bad request: 0", "bad request: %s (999 more like it since the last such line were not logged)"]


def test_an_error_message_is_one_line_of_at_most_a_kilobyte_whatever_the_client_sent():
    from rpc_train.serve.tensors import MESSAGE_CHARS, invalid

    message = invalid(f"input '{'n' * 20_000}\r\nX-Injected: yes' is not served").message
    assert "\n" not in message and "\r" not in message and len(message) < MESSAGE_CHARS + 40
    assert message.endswith("more characters)")


def test_http_timeouts_that_cannot_be_timed_are_refused_or_mean_no_deadline():
    import json

    from rpc_train.serve import http_codec

    def timeout(value):
        document = {"inputs": [], "parameters": {"timeout": value}}
        return http_codec.request_of(json.dumps(document).encode(), None, "mlp").request.deadline

    assert timeout(1e300) is None and timeout(5e6) > 0
    for bad in (float("inf"), float("nan"), -1, "10", True):
        with pytest.raises(BadRequest, match="expected a positive number of microseconds"):
            timeout(bad)


def test_routing_policies_pick_among_the_ready_replicas():
    loads = [ReplicaLoad(0, rows_in_flight=5), ReplicaLoad(1, rows_in_flight=1), ReplicaLoad(2, rows_in_flight=3)]
    assert POLICIES["least_loaded"]()(loads).replica == 1
    turn = POLICIES["round_robin"]()
    assert [turn(loads).replica for _ in range(4)] == [0, 1, 2, 0]
    two = POLICIES["power_of_two"]()
    picks = {two(loads).replica for _ in range(50)}
    assert picks <= {1, 2} and 1 in picks  # never the busiest of three: it loses every pair
    assert not ReplicaLoad(0, batches_in_flight=2).can_take(2) and not ReplicaLoad(0, in_rotation=False).can_take(2)


def test_the_newest_trained_run_is_found_and_a_missing_one_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no trained run under"):
        newest_run()
    for age, name in enumerate(("00-00-00-old", "00-00-01-new")):
        run = tmp_path / "outputs" / "2026-01-01" / name
        run.mkdir(parents=True)
        (run / "model.pt").write_bytes(b"")
        os.utime(run / "model.pt", (1e9 + age, 1e9 + age))
    assert newest_run().endswith("00-00-01-new")
    with pytest.raises(ConfigError, match=r"no \.hydra/config\.yaml there"):
        served_model(newest_run(), None)


def test_model_pt_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    # Training writes model.pt under a temporary name and renames it: a write that fails half-way
    # leaves no model.pt for the newest-run search to pick.
    from rpc_train.driver import save_model

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "2026-01-01" / "00-00-00-abcdef"
    run.mkdir(parents=True)
    with pytest.raises(Exception):
        save_model(str(run), {"w": torch.zeros(1000), "broken": lambda: None})  # a lambda does not pickle
    assert not (run / "model.pt").exists() and os.listdir(run) == []
    with pytest.raises(ConfigError, match="no trained run under"):
        newest_run()
    save_model(str(run), {"w": torch.ones(3)})
    assert newest_run() == os.path.join("outputs", "2026-01-01", "00-00-00-abcdef")
    assert torch.load(run / "model.pt", weights_only=True)["w"].tolist() == [1.0, 1.0, 1.0]


def test_a_hybrid_run_is_served_as_a_dlrm_and_refuses_several_stages_in_one_line(tmp_path):
    from omegaconf import OmegaConf

    from rpc_train.config.compose import compose
    from rpc_train.serve.checks import check_serving
    from rpc_train.serve.source import build_served

    cfg = compose(["experiment=dlrm_synthetic"])
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    torch.save(build_dlrm_state(cfg), tmp_path / "model.pt")
    served = served_model(str(tmp_path), "clicks")
    assert served.is_dlrm and served.table_rows == list(cfg.data.table_rows)
    dense, sparse = torch.randn(3, 13), torch.zeros(3, 8, dtype=torch.int64)
    assert build_served(served)(dense, sparse).shape == (3, 1)  # the click logit, one column
    conf = compose(["mode=serve", f"serve.run={tmp_path}", "serve.stages=2", "serve.port=1",
                    "serve.metrics_port=0"]).serve
    with pytest.raises(ConfigError, match=r"serve.stages=2: .* is a DLRM \(a mode=hybrid run\), served whole"):
        check_serving(conf)


def build_dlrm_state(cfg):
    from rpc_train.config.schema import as_dict
    from rpc_train.hybrid.model import build_dlrm

    return build_dlrm(as_dict(cfg.model), cfg.seed).state_dict()


def test_the_dispatcher_is_not_ready_and_refuses_while_no_replica_is_in_rotation():
    from rpc_train.serve.dispatch import BatchingLimits, Dispatcher, Refused, Replica

    replicas = [Replica(replica=0, workers=["worker1"], in_rotation=False)]
    dispatcher = Dispatcher(replicas, POLICIES["least_loaded"](), BatchingLimits(4, 1, 0.0, 8, 1.0))
    try:
        assert not dispatcher.ready()
        with pytest.raises(Refused) as err:
            dispatcher.submit(("mlp", "1"), (torch.zeros(1, 1, 8, 8),), None)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "no replica is in rotation" in err.value.message
        replicas[0].in_rotation = True
        assert dispatcher.ready()
        with pytest.raises(Refused) as err:  # 9 rows: over serve.max_queue_size=8
            dispatcher.submit(("mlp", "1"), (torch.zeros(9, 1, 8, 8),), None)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        dispatcher.drain(timeout_s=1)
    assert not dispatcher.ready()  # draining: no new request is taken


def test_http_json_nested_flat_and_binary_decode_to_the_same_rows_and_replies_encode_either_way():
    import json

    from rpc_train.serve import http_codec
    from rpc_train.serve.spec import InferRequest

    rows = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    tensor = {"name": "input", "datatype": "FP32", "shape": [3, 1, 8, 8]}
    bodies = [(json.dumps({"inputs": [{**tensor, "data": data}]}).encode(), None)
              for data in (rows.tolist(), rows.flatten().tolist())]
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": rows.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    bodies.append((header + rows.tobytes(), str(len(header))))
    for body, length in bodies:
        call = http_codec.request_of(body, length, "mlp")
        assert call.request.size == len(body) and torch.equal(SPEC.rows(call.request)[0], torch.from_numpy(rows))
    with pytest.raises(BadRequest, match="add up to 768"):
        http_codec.request_of(header + rows.tobytes() + b"extra", str(len(header)), "mlp")
    logits = torch.randn(3, 10)
    reply = SPEC.reply(InferRequest("mlp", []), logits, {"batch_rows": 3})
    body, headers = http_codec.reply_body(reply, call)  # binary_data_output: bytes after the JSON
    size = int(headers[http_codec.HEADER_LENGTH])
    assert json.loads(body[:size])["outputs"][0]["parameters"]["binary_data_size"] == 120
    assert np.array_equal(np.frombuffer(body[size:], "<f4").reshape(3, 10), logits.numpy())
    body, headers = http_codec.reply_body(reply, http_codec.request_of(*bodies[0], "mlp"))
    assert headers == {"Content-Type": "application/json"}
    assert np.array_equal(np.array(json.loads(body)["outputs"][0]["data"], np.float32).reshape(3, 10), logits.numpy())


def test_config_and_statistics_documents_parse_into_their_grpc_messages():
    from google.protobuf import json_format

    from rpc_train.serve.core import ServingCore
    from rpc_train.serve.repository import READY, Repository
    from rpc_train.serve.statistics import RequestTimes

    class Dispatcher:
        replicas = [object(), object()]
        limits = type("Limits", (), {"max_queue_delay_s": 0.005})

        def loaded_everywhere(self, key):
            return True

        loaded_anywhere = loaded_everywhere

    repository = Repository(keep_versions=2)
    version = repository.add(ServedModel(run_dir="runs/a", name="mlp", model_cfg={}, seed=0, shape=[1, 8, 8],
                                             num_classes=10), "digest", max_batch_size=4)
    repository.set_state(version, READY)
    repository.record_batch(("mlp", "1"), 4, 0.002)
    version.statistics.request(True, 0.003, RequestTimes(queue=0.001, compute_input=0.0001, compute_infer=0.002))
    version.statistics.request(False, 0.0005, RequestTimes(cache_miss=0.00001))
    core = ServingCore(repository, Dispatcher(), None, 1.0, instance_kind="KIND_GPU")
    config = json_format.ParseDict(core.model_config("mlp"), pb.ModelConfigResponse()).config
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000 and config.max_batch_size == 4
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    assert list(config.input[0].dims) == [1, 8, 8] and config.input[0].data_type == 11  # TYPE_FP32
    (stats,) = json_format.ParseDict(core.model_statistics(""), pb.ModelStatisticsResponse()).model_stats
    inference = stats.inference_stats
    assert (inference.success.count, inference.fail.count, inference.cache_miss.count) == (1, 1, 1)
    assert inference.compute_infer.ns == 2_000_000 and (stats.inference_count, stats.execution_count) == (4, 1)
    assert stats.batch_stats[0].batch_size == 4 and stats.batch_stats[0].compute_infer.count == 1


def test_liveness_never_depends_on_a_replica_and_readiness_goes_false_on_a_drain():
    # Triton #7014: a server whose model cannot serve is still live; only readiness says so.
    from rpc_train.serve.dispatch import BatchingLimits, Dispatcher, Replica
    from rpc_train.serve.core import ServingCore
    from rpc_train.serve.frontend import InferenceService
    from rpc_train.serve.repository import Repository

    replicas = [Replica(replica=0, workers=["worker1"], in_rotation=False)]
    dispatcher = Dispatcher(replicas, POLICIES["least_loaded"](), BatchingLimits(4, 1, 0.0, 8, 1.0))
    core = ServingCore(Repository(keep_versions=2), dispatcher, metrics=None, max_message_mb=1.0)
    core.loaded = True
    service = InferenceService(core)
    try:
        assert service.ServerLive(None, None).live and not service.ServerReady(None, None).ready
        replicas[0].in_rotation = True
        assert service.ServerReady(None, None).ready
        dispatcher.unready()  # a drain's grace period: not ready, still taking requests
        assert not service.ServerReady(None, None).ready and service.ServerLive(None, None).live
        assert dispatcher.submit(("mlp", "1"), (torch.zeros(1, 1, 8, 8),), None) is not None
    finally:
        dispatcher.drain(timeout_s=0.1)
    assert service.ServerLive(None, None).live and not service.ServerReady(None, None).ready
