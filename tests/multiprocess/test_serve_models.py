"""Several versions reloaded while clients call, and a DLRM served with two inputs, end to end."""

import json
import os
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from helpers.launching import launch, ok
from helpers.serving import ServingJob, curl, digits_rows, triton_input
from rpc_train.serve.source import build_served, served_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def other_run(trained, path, change) -> str:
    """A copy of the trained run whose model.pt is `change(state)`: another run's checkpoint."""
    shutil.copytree(trained, path, ignore=shutil.ignore_patterns("events.*", "*.log", "checkpoints"))
    state = torch.load(trained / "model.pt", weights_only=True)
    torch.save(change(state), path / "model.pt")
    return str(path)


def scaled(factor):
    return lambda state: {k: v * factor if v.is_floating_point() else v for k, v in state.items()}


def reference(run: str, rows: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return build_served(served_model(run, None))(torch.from_numpy(rows)).numpy()


def repository(url):
    return service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(url))


def load(url, run):
    request = service_pb2.RepositoryModelLoadRequest(model_name="mlp")
    request.parameters["run"].string_param = run
    repository(url).RepositoryModelLoad(request, timeout=120)


def failed(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_three_reloads_under_load_answer_every_request_with_the_version_it_names(trained, tmp_path):
    served = other_run(trained, tmp_path / "served", lambda state: state)
    runs = {"1": served, "3": other_run(trained, tmp_path / "b", scaled(1.5)),
            "4": other_run(trained, tmp_path / "c", scaled(0.5))}
    watched = other_run(trained, tmp_path / "watched", scaled(2.0))  # becomes version 2 through serve.watch
    bad = other_run(trained, tmp_path / "bad", lambda state: {k: v[:1] for k, v in state.items()})
    rows = digits_rows(4)
    expected = {version: reference(run, rows) for version, run in runs.items()}
    expected["2"] = reference(watched, rows)
    answers, errors, stop = [], [], threading.Event()

    def client() -> None:
        triton_client = triton.InferenceServerClient(job.url)
        while not stop.is_set():
            try:
                result = triton_client.infer("mlp", [triton_input(rows)], client_timeout=60)
                answers.append((result.get_response().model_version, result.as_numpy("logits")))
            except InferenceServerException as err:
                errors.append(str(err))

    job = ServingJob(served, tmp_path / "serve", ["serve.watch=true", "serve.keep_versions=2"])
    with job:
        threads = [threading.Thread(target=client) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1)
            # Reload 1: training writes a newer model.pt into the served run (atomically, as it does).
            shutil.copy(os.path.join(watched, "model.pt"), tmp_path / "next.pt")
            os.replace(tmp_path / "next.pt", os.path.join(served, "model.pt"))
            stub, deadline = repository(job.url), time.monotonic() + 60
            while not any(m.version == "2" and m.state == "READY"
                          for m in stub.RepositoryIndex(service_pb2.RepositoryIndexRequest()).models):
                assert time.monotonic() < deadline, "serve.watch never loaded the new model.pt"
                time.sleep(0.3)
            load(job.url, runs["3"])  # reload 2
            caller = triton.InferenceServerClient(job.url)
            old = caller.infer("mlp", [triton_input(rows)], model_version="2")  # still loaded: keep_versions=2
            assert old.get_response().model_version == "2"
            np.testing.assert_allclose(old.as_numpy("logits"), expected["2"], rtol=0, atol=1e-5)
            code, message = failed(lambda: load(job.url, bad))  # a failed load: the error is the reply
            assert code == grpc.StatusCode.INVALID_ARGUMENT and bad in message and "\n" not in message
            # Reload 3 through the HTTP door (curl), as a missing run's 404 is: version 2 is now beyond keep_versions.
            status, body = curl(job, "/v2/repository/models/mlp/load", "-d",
                                json.dumps({"parameters": {"run": str(tmp_path / "nowhere")}}))
            assert status == 404 and "nowhere" in json.loads(body)["error"], (status, body)
            assert curl(job, "/v2/repository/models/mlp/load", "-d", json.dumps({"parameters": {"run": runs["4"]}})) \
                == (200, "")
            time.sleep(1)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        code, message = failed(lambda: repository(job.url).ModelInfer(
            service_pb2.ModelInferRequest(model_name="mlp", model_version="2"), timeout=30))
        assert code == grpc.StatusCode.NOT_FOUND and "has no version '2'" in message
        index = {m.version: m.state for m in stub.RepositoryIndex(service_pb2.RepositoryIndexRequest()).models}
        assert index["3"] == index["4"] == "READY" and index["1"] == index["2"] == "UNAVAILABLE", index
        assert curl(job, "/v2/repository/models/mlp/unload", "-X", "POST") == (200, "")
        with pytest.raises(InferenceServerException, match="was unloaded"):
            caller.infer("mlp", [triton_input(rows)])
    assert not errors, errors[:3]
    assert {version for version, _ in answers} >= {"1", "2", "3", "4"}, sorted({v for v, _ in answers})
    for version, logits in answers:
        np.testing.assert_allclose(logits, expected[version], rtol=0, atol=1e-5, err_msg=f"version {version}")


TINY_DLRM = ["experiment=dlrm_synthetic", "data.size=2000", "trainer.epochs=1", "trainer.max_steps=4",
             "trainer.batch_size=64"]


def test_a_dlrm_is_served_with_dense_and_sparse_inputs_and_answers_as_in_one_process(tmp_path):
    run = tmp_path / "hybrid"
    ok(launch(TINY_DLRM, run, NPROC="3"))
    served = served_model(str(run), None)
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((6, 13)).astype(np.float32)
    sparse = np.stack([rng.integers(0, rows, 6) for rows in served.table_rows], axis=1).astype(np.int64)
    with torch.no_grad():
        want = build_served(served)(torch.from_numpy(dense), torch.from_numpy(sparse)).numpy()
    with ServingJob(run, tmp_path / "serve", nproc=2) as job:
        client = triton.InferenceServerClient(job.url)
        meta = client.get_model_metadata("dlrm")
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("dense", "FP32", [-1, 13]),
                                                                              ("sparse", "INT64", [-1, 8])]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("logits", "FP32", [-1, 1])]
        got = client.infer("dlrm", [triton_input(dense, "dense"), triton_input(sparse, "sparse", "INT64")])
        np.testing.assert_allclose(got.as_numpy("logits"), want, rtol=0, atol=1e-5)
        sparse[3, 4] = served.table_rows[4]
        with pytest.raises(InferenceServerException, match=r"input 'sparse' column 4 holds 50 \(row 3\); its table "
                                                           r"has 50 rows: send indices in \[0, 50\)"):
            client.infer("dlrm", [triton_input(dense, "dense"), triton_input(sparse, "sparse", "INT64")])
