"""mode=serve end to end: a trained smoke model behind the Open Inference Protocol, asked by the
official tritonclient (gRPC and HTTP), curl, and rpc_train's own client on loopback."""

import json
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from helpers.events import event_tags, hparams_of, read_scalars
from helpers.launching import launch, ok
from helpers.malformed import grpc_cases, http_cases, http_valid
from helpers.serving import Load, ServingJob, curl, digits_rows, served_reference, triton_input
from rpc_train.serve.http_server import LOOP_BODY_BYTES

pytestmark = pytest.mark.timeout(300)

# Small limits, so that the over-size and over-batch requests stay small too.
LIMITS = ["serve.max_batch_size=32", "serve.max_message_mb=0.05"]


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    job = ServingJob(trained, tmp_path_factory.mktemp("serve") / "run", LIMITS).wait_ready()
    yield job
    job.stop()
    assert job.proc.returncode == 0, job.output[-3000:]


def test_tritonclient_gets_what_the_model_computes(server, trained):
    client = triton.InferenceServerClient(server.url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
    meta = client.get_model_metadata("mlp")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 1, 8, 8])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("logits", "FP32", [-1, 10])]
    assert client.get_server_metadata().name == "rpc_train"
    rows = digits_rows(5)
    answer = client.infer("mlp", [triton_input(rows)]).as_numpy("logits")
    np.testing.assert_allclose(answer, served_reference(trained, rows), rtol=0, atol=1e-5)


def test_typed_contents_are_accepted_too(server, trained):
    rows = digits_rows(3)
    request = service_pb2.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
    tensor.contents.fp32_contents.extend(rows.flatten().tolist())
    reply = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.url)).ModelInfer(request, timeout=30)
    logits = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(list(reply.outputs[0].shape))
    np.testing.assert_allclose(logits, served_reference(trained, rows), rtol=0, atol=1e-5)


def test_the_projects_own_client_reports_accuracy_and_latency(server):
    done = subprocess.run([sys.executable, "-m", "rpc_train.serve.client", "--url", server.url, "--count", "40"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    accuracy = float(done.stdout.split("accuracy ")[1].split()[0])
    assert accuracy > 0.5 and "p99" in done.stdout  # the smoke model learns digits past chance (0.1)


def test_the_health_service_says_serving(server):
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.url))
    for service in ("", "inference.GRPCInferenceService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_concurrent_clients_are_batched_and_each_gets_its_own_rows(server, trained):
    rows = digits_rows(64)
    expected = served_reference(trained, rows)
    sizes, errors = [], []

    def one_client(i: int) -> None:
        client = triton.InferenceServerClient(server.url)
        for j in range(8):
            k = (i * 8 + j) % len(rows)
            result = client.infer("mlp", [triton_input(rows[k:k + 1])])
            sizes.append(result.get_response().parameters["batch_rows"].int64_param)
            if not np.allclose(result.as_numpy("logits"), expected[k:k + 1], rtol=0, atol=1e-5):
                errors.append(k)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(sizes) == 128
    assert max(sizes) > 1, "16 concurrent clients never shared a batch"


def call(server, request, method="ModelInfer"):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.url))
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request, timeout=30)
    return err.value.code(), err.value.details()


def request_of(rows: np.ndarray, name="input", datatype="FP32", shape=None, model="mlp", raw=None):
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=list(rows.shape) if shape is None else shape)
    request.raw_input_contents.append(rows.astype("<f4").tobytes() if raw is None else raw)
    return request


def http_call(server, rows: np.ndarray, name="input", datatype="FP32", shape=None, model="mlp", raw=None):
    """The same request over HTTP (binary tensor data extension): (HTTP status, the error's text)."""
    raw = rows.astype("<f4").tobytes() if raw is None else raw
    header = json.dumps({"inputs": [{"name": name, "datatype": datatype,
                                     "shape": list(rows.shape) if shape is None else shape,
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/{model}/infer", data=header + raw,
                                     headers={"Inference-Header-Content-Length": str(len(header))})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    return err.value.code, json.loads(err.value.read())["error"]


def http_input(rows: np.ndarray, binary: bool = True):
    tensor = triton_http.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    return tensor


def with_nan(rows):
    rows = rows.copy()
    rows[2, 0, 3, 3] = np.nan
    return rows


# Each bad request as request_of/http_call's arguments: the same request through either door.
BAD = {
    "unknown model": (lambda r: dict(rows=r, model="resnet"), grpc.StatusCode.NOT_FOUND,
                      "model 'resnet' is not served here; the model is 'mlp'"),
    "input name": (lambda r: dict(rows=r, name="pixels"), grpc.StatusCode.INVALID_ARGUMENT,
                   "inputs ['pixels']: model 'mlp' takes one input named 'input'"),
    "datatype": (lambda r: dict(rows=r, datatype="INT64"), grpc.StatusCode.INVALID_ARGUMENT,
                 "datatype INT64: expected FP32"),
    "shape": (lambda r: dict(rows=r, shape=[4, 64]), grpc.StatusCode.INVALID_ARGUMENT,
              "shape [4, 64]: expected [rows, 1, 8, 8]"),
    "raw length": (lambda r: dict(rows=r, raw=b"\0" * 100), grpc.StatusCode.INVALID_ARGUMENT,
                   "holds 100 bytes; shape [4, 1, 8, 8] of FP32 needs 1024"),
    "NaN rows": (lambda r: dict(rows=with_nan(r)), grpc.StatusCode.INVALID_ARGUMENT,
                 "rows [2] hold NaN or infinite values"),
    "empty batch": (lambda r: dict(rows=r[:0]), grpc.StatusCode.INVALID_ARGUMENT, "an empty batch"),
    "too many rows": (lambda r: dict(rows=np.zeros((33, 1, 8, 8), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
                      "has 33 rows, more than serve.max_batch_size=32"),
    "too large": (lambda r: dict(rows=np.zeros((300, 1, 8, 8), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
                  "over serve.max_message_mb=0.05 MiB"),
}
HTTP_STATUS = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400}  # Triton's


@pytest.mark.parametrize("door", ["grpc", "http"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_request_gets_a_clear_status_and_the_server_goes_on(server, trained, case, door):
    build, code, needle = BAD[case]
    rows = digits_rows(4)
    if door == "grpc":
        got, details = call(server, request_of(**build(rows)))
        answer = triton.InferenceServerClient(server.url).infer("mlp", [triton_input(rows)]).as_numpy("logits")
    else:
        got, details = http_call(server, **build(rows))
        code = HTTP_STATUS[code]
        client = triton_http.InferenceServerClient(server.http_url)
        answer = client.infer("mlp", [http_input(rows)]).as_numpy("logits")
    assert got == code and needle in details, (got, details)
    np.testing.assert_allclose(answer, served_reference(trained, rows), rtol=0, atol=1e-5)


MALFORMED = "rpc_train_serve_malformed_requests_total"


def _raw_grpc(server):
    """Bytes as they are to a method of the service: (status, details, the reply's bytes)."""
    channel = grpc.insecure_channel(server.url)

    def send(method: str, body: bytes):
        try:
            return grpc.StatusCode.OK, "", channel.unary_unary(f"/inference.GRPCInferenceService/{method}")(
                body, timeout=30)
        except grpc.RpcError as err:
            return err.code(), err.details() or "", b""

    return send


def _raw_http(server, path: str, body: bytes, headers=None):
    """A POST as it is: (status, the error's text or the reply's body)."""
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=body, headers=headers or {})
    try:
        return 200, urllib.request.urlopen(request, timeout=30).read()
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())["error"]


def _infers(cases, valid: int) -> int:
    """ModelInfer calls the core answers (and counts): the cases the door reads, and the valid ones."""
    return valid + sum(not c.malformed and c.method in ("ModelInfer", "/v2/models/mlp/infer",
                                                        "/v2/models/resnet/infer") for c in cases)


def _stream_of_junk(server) -> int:
    """One ModelStreamInfer stream: junk, a request, junk; each answered on the stream, in order."""
    valid = request_of(digits_rows(2))
    bodies = [b"\x07junk", valid.SerializeToString(), valid.SerializeToString()[:-3]]
    stream = grpc.insecure_channel(server.url).stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    replies = [service_pb2.ModelStreamInferResponse.FromString(r) for r in stream(iter(bodies), timeout=30)]
    assert [bool(r.error_message) for r in replies] == [True, False, True], replies
    assert all("\n" not in r.error_message for r in replies)
    return 2


@pytest.mark.parametrize("door", ["grpc", "http"])
def test_malformed_and_hostile_requests_cost_a_status_and_a_count_never_a_traceback(server, door):
    """Fuzzed bytes and hostile messages: each its status with one line, the server answering in
    between, the malformed ones counted, and the log at most a few lines (issue #28)."""
    log_before, before = server.log(), server.metrics()
    cases, valid, wrong = (grpc_cases(28) if door == "grpc" else http_cases(28)), 0, []
    send = _raw_grpc(server)
    for i, case in enumerate(cases):
        if door == "grpc":
            status, message, _ = send(case.method, case.body)
        else:
            status, message = _raw_http(server, case.method, case.body, case.headers)
        if status != case.status or not message or "\n" in message or len(message) > 1100:
            wrong.append((case.what, status, message[:300]))
        if i % 20 == 0:  # the server goes on answering
            if door == "grpc":
                status, _, reply = send("ModelInfer", request_of(digits_rows(2)).SerializeToString())
                assert status == grpc.StatusCode.OK and service_pb2.ModelInferResponse.FromString(reply).outputs
            else:
                status, reply = _raw_http(server, "/v2/models/mlp/infer", json.dumps(http_valid()).encode())
                assert status == 200 and json.loads(reply)["outputs"][0]["shape"] == [2, 10]
            valid += 1
    assert not wrong, wrong
    streamed = _stream_of_junk(server) if door == "grpc" else 0
    log = server.log()[len(log_before):]
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]
    assert len([line for line in log.splitlines() if "serving: " not in line]) <= 3, log[-3000:]
    after = server.metrics()
    key = (MALFORMED, frozenset({("door", door)}))
    assert after[key] - before.get(key, 0) == sum(c.malformed for c in cases) + streamed
    answered = sum(v for (name, _), v in after.items() if name == "rpc_train_serve_requests_total") \
        - sum(v for (name, _), v in before.items() if name == "rpc_train_serve_requests_total")
    assert answered == _infers(cases, valid) + (streamed and 1)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_http_answers_tritonclient_and_curl_as_grpc_does(server, trained):
    client = triton_http.InferenceServerClient(server.http_url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
    meta = client.get_model_metadata("mlp")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_server_metadata()["name"] == "rpc_train"
    rows = digits_rows(5)
    expected = served_reference(trained, rows)
    # tritonclient.http's default: binary tensors both ways; then JSON input and JSON output.
    answer = client.infer("mlp", [http_input(rows)]).as_numpy("logits")
    np.testing.assert_allclose(answer, expected, rtol=0, atol=1e-5)
    result = client.infer("mlp", [http_input(rows, binary=False)],
                          outputs=[triton_http.InferRequestedOutput("logits", binary_data=False)])
    assert "data" in result.get_output("logits")
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=0, atol=1e-5)
    # curl with a JSON body: data nested by row, or flat.
    for data in (rows[:2].tolist(), rows[:2].flatten().tolist()):
        body = json.dumps({"id": "c1", "inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                                    "data": data}]})
        status, answer = curl(server, "/v2/models/mlp/infer", "-H", "Content-Type: application/json", "-d", body)
        assert status == 200, answer
        answer = json.loads(answer)
        assert answer["id"] == "c1" and answer["outputs"][0]["shape"] == [2, 10]
        np.testing.assert_allclose(np.array(answer["outputs"][0]["data"]).reshape(2, 10), expected[:2], atol=1e-5)
    # A body over LOOP_BODY_BYTES is decoded and answered on a pool thread instead of the event loop.
    rows = digits_rows(32)  # serve.max_batch_size
    body = json.dumps({"inputs": [{"name": "input", "shape": [32, 1, 8, 8], "datatype": "FP32",
                                   "data": rows.flatten().tolist()}]})
    assert LOOP_BODY_BYTES < len(body) < 0.05 * 2 ** 20, len(body)  # and under the server's serve.max_message_mb
    status, answer = curl(server, "/v2/models/mlp/infer", "-H", "Content-Type: application/json", "-d", body)
    assert status == 200, answer
    np.testing.assert_allclose(np.array(json.loads(answer)["outputs"][0]["data"]).reshape(32, 10),
                               served_reference(trained, rows), atol=1e-5)
    assert curl(server, "/v2/health/ready") == (200, "")
    assert curl(server, "/v2/models/mlp/versions/1/ready") == (200, "")
    status, body = curl(server, "/v2/models/resnet")
    assert status == 404 and "model 'resnet' is not served here" in json.loads(body)["error"]
    status, body = curl(server, "/v2/models/mlp/infer", "-d", "{not json")
    assert status == 400 and "the request is not JSON" in json.loads(body)["error"]
    status, body = curl(server, "/v2/repository/index", "-X", "POST")
    assert status == 200 and json.loads(body) == [{"name": "mlp", "version": "1", "state": "READY", "reason": ""}]


def _stats_counts(document: dict) -> dict:
    (stats,) = document["model_stats"]
    inference = stats["inference_stats"]
    return {"success": int(inference["success"].get("count", 0)), "fail": int(inference["fail"].get("count", 0)),
            "compute_infer": int(inference["compute_infer"].get("count", 0)),
            "rows": int(stats.get("inference_count", 0)), "batches": int(stats.get("execution_count", 0))}


def _metric_counts(metrics: dict) -> dict:
    codes = {dict(labels)["code"]: v for (name, labels), v in metrics.items()
             if name == "rpc_train_serve_requests_total"}
    return {"success": codes.get("OK", 0), "fail": sum(v for c, v in codes.items() if c not in ("OK", "NOT_FOUND")),
            "rows": sum(v for (name, _), v in metrics.items() if name == "rpc_train_serve_replica_rows_total"),
            "batches": metrics.get(("rpc_train_serve_batch_rows_count", frozenset()), 0)}


def test_model_config_and_statistics_through_both_doors_agree_with_the_metrics(server):
    grpc_client = triton.InferenceServerClient(server.url)
    http_client = triton_http.InferenceServerClient(server.http_url)
    config = http_client.get_model_config("mlp")  # Triton's JSON, proto field names
    assert config["max_batch_size"] == 32 and config["platform"] == "pytorch"
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}]
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}]
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}] and not config["response_cache"]["enable"]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 0
    message = grpc_client.get_model_config("mlp").config
    assert (message.max_batch_size, list(message.input[0].dims), message.instance_group[0].count) == (32, [1, 8, 8], 2)

    before, metrics_before = _stats_counts(http_client.get_inference_statistics("mlp")), _metric_counts(server.metrics())
    for n in (1, 2, 3):  # one after another: a batch each
        grpc_client.infer("mlp", [triton_input(digits_rows(n))])
        http_client.infer("mlp", [http_input(digits_rows(n))])
    call(server, request_of(digits_rows(2), name="pixels"))
    http_call(server, digits_rows(2), datatype="INT64")
    after, metrics_after = _stats_counts(http_client.get_inference_statistics()), _metric_counts(server.metrics())
    grown = {key: after[key] - before[key] for key in after}
    assert grown == {"success": 6, "fail": 2, "compute_infer": 6, "rows": 12, "batches": 6}, grown
    for key in metrics_after:  # the statistics count what the Prometheus counters count
        assert after[key] - before[key] == metrics_after[key] - metrics_before[key], key
    assert _stats_counts(grpc_client.get_inference_statistics("mlp", as_json=True)) == after


def test_methods_we_do_not_serve_answer_unimplemented(server):
    code, _ = call(server, service_pb2.SystemSharedMemoryStatusRequest(), method="SystemSharedMemoryStatus")
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_a_stream_answers_each_request_and_an_error_does_not_close_it(server, trained):
    replies = queue.Queue()
    client = triton.InferenceServerClient(server.url)
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    rows = digits_rows(6)
    try:
        client.async_stream_infer("mlp", [triton_input(rows[:2])], request_id="a")
        client.async_stream_infer("mlp", [triton_input(rows[:2], name="pixels")], request_id="bad")
        client.async_stream_infer("mlp", [triton_input(rows[2:])], request_id="b")
        got = [replies.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    (first, ok_a), (_, error), (second, ok_b) = got
    assert ok_a is None and ok_b is None and "inputs ['pixels']" in str(error)
    assert first.get_response().id == "a" and second.get_response().id == "b"
    np.testing.assert_allclose(np.concatenate([first.as_numpy("logits"), second.as_numpy("logits")]),
                               served_reference(trained, rows), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_full_queue_refuses_at_once_and_an_expired_request_is_never_computed(trained, tmp_path):
    # Batches wait up to 3 s to fill: requests stay queued long enough to see the limits.
    args = ["serve.max_queue_delay_ms=3000", "serve.max_queue_size=40", "serve.max_batch_size=32"]
    with ServingJob(trained, tmp_path / "run", args) as job:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(job.url))
        first = stub.ModelInfer.future(request_of(digits_rows(30)), timeout=30)
        time.sleep(0.5)
        code, details = call(job, request_of(digits_rows(20)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "serve.max_queue_size=40" in details, details
        code, _ = _expire(stub)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        reply = first.result(timeout=30)
        # The expired request was queued behind the first one and dropped, not computed with it.
        assert reply.parameters["batch_rows"].int64_param == 30


def _expire(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request_of(digits_rows(1)), timeout=0.5)
    return err.value.code(), err.value.details()


@pytest.mark.slow  # the quick suite drains through test_serve_lifecycle's every-process case
def test_sigterm_drains_answers_everything_and_exits_0(trained, tmp_path):
    # Served from a directory whose outputs/ holds the run: the newest run is found by itself.
    found = tmp_path / "outputs" / "2026-01-01" / "00-00-00-abcdef"
    shutil.copytree(trained, found)
    job = ServingJob(None, tmp_path / "run", cwd=tmp_path).wait_ready()
    assert f"serving model 'mlp' from {found}" in job.log()
    # A pid file left from an earlier front end (a torchrun restart) names a process that is not
    # the front end: launch.sh must signal only its own torchrun, never what such a file names.
    decoy = subprocess.Popen(["sleep", "120"])
    (job.run_dir / "frontend.pid").write_text(f"{decoy.pid}\n")
    with Load(job.url, digits_rows(2), leave_when_draining=True) as load:
        time.sleep(2)
        started = time.monotonic()
        output = job.stop()
    decoy_alive = decoy.poll() is None
    decoy.kill()
    assert job.proc.returncode == 0, output[-3000:]
    assert decoy_alive, "launch.sh signalled the pid a stale frontend.pid named"
    assert time.monotonic() - started < 60
    codes = set(load.codes())
    assert codes == {"OK", "StatusCode.UNAVAILABLE"}, codes  # answered, then refused: none cut
    assert "draining" in job.log()
    # The session ends with its HParams, as a training run does: the config and its totals.
    assert hparams_of(job.run_dir)["serve.max_batch_size"] == 32
    totals = read_scalars(job.run_dir)
    assert totals["hparam/serve/requests_ok"][-1][1] == load.codes().count("OK")
    assert "config/text_summary" in event_tags(job.run_dir)["tensors"]


@pytest.mark.parametrize("args, nproc, needle", [
    (["serve.stages=2"], "4", "serve.stages=2 does not divide the 3 workers"),
    (["serve.routing=random"], "3", "serve.routing=random: expected one of least_loaded, round_robin, power_of_two"),
])
def test_bad_serving_settings_fail_before_any_process_starts(tmp_path, trained, args, nproc, needle):
    result = launch(["mode=serve", f"serve.run={trained}", *args], tmp_path / "run", NPROC=nproc, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {needle}"), result.stderr


def test_no_run_to_serve_or_a_run_without_its_model_is_one_line(tmp_path, trained):
    result = launch(["mode=serve"], tmp_path / "run", cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "error: mode=serve: no trained run under" in result.stderr, result.stderr
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    (broken / "model.pt").unlink()
    result = launch(["mode=serve", f"serve.run={broken}"], tmp_path / "run", timeout=60)
    assert result.returncode == 2 and f"error: serve.run={broken}: no model.pt there" in result.stderr


def test_a_taken_port_is_one_line(tmp_path, trained):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = launch(["mode=serve", f"serve.run={trained}", f"serve.port={port}"], tmp_path / "run", timeout=60)
    assert result.returncode == 2 and f"error: serve.port={port}: 127.0.0.1:{port} is taken" in result.stderr


@pytest.mark.slow
def test_two_stage_replicas_answer_as_one_stage_does(trained, tmp_path):
    with ServingJob(trained, tmp_path / "run", ["serve.stages=2"], nproc=3) as job:
        rows = digits_rows(8)
        answer = triton.InferenceServerClient(job.url).infer("mlp", [triton_input(rows)]).as_numpy("logits")
        assert "1 replica(s) of 2 stage(s)" in job.log()
    np.testing.assert_allclose(answer, served_reference(trained, rows), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_stopped_replica_leaves_the_rotation_and_every_request_is_answered(trained, tmp_path):
    import os
    import signal

    with ServingJob(trained, tmp_path / "run", ["serve.replica_timeout_s=2"], nproc=3) as job:
        with Load(job.url, digits_rows(1), deadline_s=30) as load:
            time.sleep(1)
            replica = job.pid_of(2)
            os.kill(replica, signal.SIGSTOP)
            try:
                time.sleep(6)
                stopped_at = len(load.outcomes)
                time.sleep(2)
            finally:
                os.kill(replica, signal.SIGCONT)
            deadline = time.monotonic() + 30
            while "back in rotation" not in job.log() and time.monotonic() < deadline:
                time.sleep(0.5)
        log = job.log()
    codes = load.codes()
    assert set(codes) == {"OK"}, [c for c in codes if c != "OK"][:3]
    assert len(codes) > stopped_at > 0  # requests went on being answered while it was stopped
    assert "replica 1 (worker2) is out of rotation" in log and "replica 1 (worker2) answers again" in log


@pytest.mark.slow
def test_a_batch_norm_model_answers_each_row_as_it_does_alone(tmp_path):
    # The convnet's batch norm runs in eval mode: its running statistics, never the batch's own,
    # so rows that share a batch cannot change each other's answers.
    run = tmp_path / "convnet"
    ok(launch(["experiment=smoke", "model=convnet", "data=synthetic", "trainer.max_steps=3"], run))
    rows = np.random.default_rng(0).standard_normal((12, 3, 32, 32)).astype(np.float32)
    expected = served_reference(run, rows)
    with ServingJob(run, tmp_path / "serve", ["serve.max_queue_delay_ms=200"]) as job:
        answers, sizes = {}, []

        def ask(i: int) -> None:
            reply = triton.InferenceServerClient(job.url).infer("convnet", [triton_input(rows[i:i + 1])])
            answers[i] = reply.as_numpy("logits")
            sizes.append(reply.get_response().parameters["batch_rows"].int64_param)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(rows))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert max(sizes) > 1, "the rows never shared a batch: the test would prove nothing"
    for i, answer in answers.items():
        np.testing.assert_allclose(answer, expected[i:i + 1], rtol=0, atol=1e-5)
    assert len(answers) == len(rows)
