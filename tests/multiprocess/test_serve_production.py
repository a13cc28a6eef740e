"""Serving as a team would run it: TLS, mutual TLS and a token; the response cache; Prometheus
metrics read with prometheus_client's parser; TensorBoard scalars read back."""

import http.client
import json
import os
import signal
import ssl
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from helpers.certs import make_certificates
from helpers.events import read_scalars
from helpers.serving import Load, ServingJob, digits_rows, served_reference, triton_input

pytestmark = pytest.mark.timeout(300)

TOKEN = "s3cret-token-never-logged"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


def refused(call) -> str:
    with pytest.raises(InferenceServerException) as err:
        call()
    return str(err.value)


@pytest.mark.slow
def test_tls_with_a_token_refuses_plaintext_and_wrong_tokens_and_keeps_health_open(trained, certs, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    ca = certs["ca"]["cert"]
    args = [f"serve.tls.cert={certs['server']['cert']}", f"serve.tls.key={certs['server']['key']}",
            f"serve.auth_token_file={token_file}"]
    tls = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    with ServingJob(trained, tmp_path / "run", args, credentials=tls) as job:
        client = triton.InferenceServerClient(job.url, ssl=True, root_certificates=str(ca))
        rows = digits_rows(3)
        assert "UNAUTHENTICATED" in refused(lambda: client.infer("mlp", [triton_input(rows)]))
        assert "UNAUTHENTICATED" in refused(lambda: client.infer("mlp", [triton_input(rows)],
                                                                 headers={"authorization": "Bearer wrong"}))
        assert "UNAUTHENTICATED" in refused(lambda: client.is_server_ready())
        answer = client.infer("mlp", [triton_input(rows)], headers={"authorization": f"Bearer {TOKEN}"})
        np.testing.assert_allclose(answer.as_numpy("logits"), served_reference(trained, rows), rtol=0, atol=1e-5)
        health = health_pb2_grpc.HealthStub(grpc.secure_channel(job.url, tls))
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        plain = triton.InferenceServerClient(job.url)
        refused(lambda: plain.is_server_live(headers={"authorization": f"Bearer {TOKEN}"}, client_timeout=5))
        assert "(TLS), token required" in job.log()
        https_checks(job, ca, rows, served_reference(trained, rows))
        logs = [job.log(rank) for rank in range(3)]
    assert all(TOKEN not in text for text in logs + [job.output])


def https(url: str, ca, token=None, body=None):
    """(HTTP status, body) of a GET, or a POST of `body`, over TLS trusting `ca`."""
    request = urllib.request.Request(url, data=body, headers={"authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=ssl.create_default_context(cafile=str(ca))) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def https_checks(job, ca, rows, expected) -> None:
    """The HTTP door and /metrics take the same TLS and token as gRPC; HTTP's health stays open."""
    base = f"https://{job.http_url}"
    assert https(f"{base}/v2/health/ready", ca) == (200, b"")
    status, body = https(f"{base}/v2", ca)
    assert status == 401 and "missing or wrong token" in json.loads(body)["error"]
    infer = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape),
                                    "data": rows.tolist()}]}).encode()
    assert https(f"{base}/v2/models/mlp/infer", ca, "wrong", infer)[0] == 401
    status, body = https(f"{base}/v2/models/mlp/infer", ca, TOKEN, infer)
    assert status == 200, body
    np.testing.assert_allclose(np.array(json.loads(body)["outputs"][0]["data"]).reshape(expected.shape), expected,
                               rtol=0, atol=1e-5)
    plaintext = (urllib.error.URLError, http.client.HTTPException, ConnectionError)
    with pytest.raises(plaintext):
        urllib.request.urlopen(f"http://{job.http_url}/v2/health/ready", timeout=10)
    # /metrics: refused in plaintext and without the token, read with it over TLS.
    with pytest.raises(plaintext):
        job.metrics(token=TOKEN)
    with pytest.raises(urllib.error.HTTPError) as err:
        job.metrics(ca=ca)
    assert err.value.code == 401
    assert sample(job.metrics(token=TOKEN, ca=ca), "rpc_train_serve_requests_total", code="OK") >= 1


@pytest.mark.slow
def test_mutual_tls_refuses_a_client_without_a_certificate(trained, certs, tmp_path):
    ca, client_cert = certs["ca"]["cert"], certs["client"]
    args = [f"serve.tls.cert={certs['server']['cert']}", f"serve.tls.key={certs['server']['key']}",
            f"serve.tls.client_ca={ca}"]
    mutual = grpc.ssl_channel_credentials(ca.read_bytes(), client_cert["key"].read_bytes(),
                                          client_cert["cert"].read_bytes())
    with ServingJob(trained, tmp_path / "run", args, credentials=mutual) as job:
        rows = digits_rows(2)
        with_cert = triton.InferenceServerClient(job.url, ssl=True, root_certificates=str(ca),
                                                 private_key=str(client_cert["key"]),
                                                 certificate_chain=str(client_cert["cert"]))
        np.testing.assert_allclose(with_cert.infer("mlp", [triton_input(rows)]).as_numpy("logits"),
                                   served_reference(trained, rows), rtol=0, atol=1e-5)
        without = triton.InferenceServerClient(job.url, ssl=True, root_certificates=str(ca))
        assert "UNAVAILABLE" in refused(lambda: without.infer("mlp", [triton_input(rows)], client_timeout=10))
        # HTTP: the same CA decides (the handshake of a client without a certificate fails).
        context = ssl.create_default_context(cafile=str(ca))
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(f"https://{job.http_url}/v2/health/ready", timeout=10, context=context).read()
        context.load_cert_chain(str(client_cert["cert"]), str(client_cert["key"]))
        assert urllib.request.urlopen(f"https://{job.http_url}/v2/health/ready", timeout=10, context=context).status \
            == 200


def sample(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.slow
def test_the_cache_answers_repeats_without_a_replica_and_the_metrics_and_scalars_say_so(trained, tmp_path):
    args = ["serve.cache_size=8", "serve.log_every_s=1"]
    with ServingJob(trained, tmp_path / "run", args) as job:
        client, rows = triton.InferenceServerClient(job.url), digits_rows(4)
        first = client.infer("mlp", [triton_input(rows)]).get_response()
        again = client.infer("mlp", [triton_input(rows)])
        assert "cache_hit" not in first.parameters and again.get_response().parameters["cache_hit"].bool_param
        computed = np.frombuffer(first.raw_output_contents[0], "<f4").reshape(4, 10)
        assert np.array_equal(again.as_numpy("logits"), computed)  # exactly what the replica answered
        refused(lambda: client.infer("other-model", [triton_input(rows)]))
        metrics = job.metrics()
        assert sample(metrics, "rpc_train_serve_cache_hits_total") == 1
        assert sample(metrics, "rpc_train_serve_cache_misses_total") == 1
        # The hit never reached a replica: only the first request's 4 rows were sent.
        sent = sum(v for (name, _), v in metrics.items() if name == "rpc_train_serve_replica_rows_total")
        assert sent == 4
        assert sample(metrics, "rpc_train_serve_requests_total", code="OK") == 2
        assert sample(metrics, "rpc_train_serve_requests_total", code="NOT_FOUND") == 1
        assert sample(metrics, "rpc_train_serve_latency_seconds_count") == 3
        assert sample(metrics, "rpc_train_serve_batch_rows_count") == 1
        assert sample(metrics, "rpc_train_serve_replicas_in_rotation") == 2
        for _ in range(20):  # a few more, spread over more than one reporting window
            client.infer("mlp", [triton_input(digits_rows(2))])
        time.sleep(2.5)
    scalars = read_scalars(job.run_dir)
    for tag in ("serve/latency_ms_p50", "serve/latency_ms_p99", "serve/queue_ms_p50", "serve/batch_size_mean",
                "serve/requests_per_s", "serve/cache_hit_rate", "replica0/rows_in_flight", "replica1/rows_in_flight"):
        assert tag in scalars, (tag, sorted(scalars))
    assert max(v for _, v in scalars["serve/cache_hit_rate"]) > 0
    assert "serving: " in job.log() and "req/s" in job.log()


@pytest.mark.slow
def test_a_killed_replica_restarts_the_world_and_no_request_outlives_its_deadline(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MAX_RESTARTS", "1")
    deadline_s = 5.0
    with ServingJob(trained, tmp_path / "run", ["serve.replica_timeout_s=2"]) as job:
        with Load(job.url, digits_rows(1), clients=3, deadline_s=deadline_s) as load:
            time.sleep(1)
            replica = job.pid_of(2)
            killed = time.monotonic()
            os.kill(replica, signal.SIGKILL)
            health = health_pb2_grpc.HealthStub(grpc.insecure_channel(job.url))
            while time.monotonic() - killed < 120:
                try:
                    if job.pid_of(2) != replica and health.Check(health_pb2.HealthCheckRequest(), timeout=1).status \
                            == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
            back_s, answered_before = time.monotonic() - killed, len(load.outcomes)
            # The clients' own channels reconnect after gRPC's backoff (up to ~10 s after a 12 s outage).
            while "OK" not in load.codes(answered_before) and time.monotonic() - killed < back_s + 30:
                time.sleep(0.2)
    print(f"serving again {back_s:.1f} s after the replica was killed")  # docs/benchmarks.md quotes it
    assert back_s < 120 and job.pid_of(2) != replica, job.log()[-2000:]
    # These clients keep calling through the restart; a call that reaches the old front end's gRPC
    # server in its own shutdown, after the drain, is cut with CANCELLED (docs/serving.md says so):
    # it came in 1 of several full slow-suite runs. Issue #26 (lifecycle) is to remove it.
    assert set(load.codes()) <= {"OK", "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED",
                                 "StatusCode.CANCELLED"}, set(load.codes())
    assert max(seconds for _, seconds in load.outcomes) < deadline_s + 1.0  # nothing hung past its deadline
    assert "OK" in load.codes(answered_before)  # and it answers again
