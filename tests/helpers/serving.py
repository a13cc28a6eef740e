"""A serving job for the tests: ./launch.sh mode=serve in the background, ready when it says so."""

import functools
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import List, Optional

import grpc
import numpy as np

from helpers.launching import REPO, launch_env
from rpc_train.runtime.local_world import free_service_port


class ServingJob:
    def __init__(self, run: Path, run_dir: Path, args: List[str] = (), nproc: int = 3, cwd: Path = REPO,
                 credentials: Optional["grpc.ChannelCredentials"] = None):
        """`credentials`: how to reach a TLS job (grpc.ssl_channel_credentials)."""
        self.credentials = credentials
        self.port, self.metrics_port, self.run_dir = free_service_port(), free_service_port(), run_dir
        self.http_port = free_service_port()
        self.url, self.http_url = f"localhost:{self.port}", f"localhost:{self.http_port}"
        serve_run = [f"serve.run={run}"] if run else []
        self.proc = subprocess.Popen([str(REPO / "launch.sh"), "mode=serve", *serve_run, f"serve.port={self.port}",
                                      f"serve.metrics_port={self.metrics_port}", f"serve.http_port={self.http_port}",
                                      *args],
                                     cwd=cwd, env=launch_env(run_dir, NPROC=str(nproc)),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: Optional[str] = None

    def wait_ready(self, timeout_s: float = 120) -> "ServingJob":
        """Until the health service says SERVING (it needs no token, so any job can be asked)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        channel = (grpc.secure_channel(self.url, self.credentials) if self.credentials
                   else grpc.insecure_channel(self.url))
        health, deadline = health_pb2_grpc.HealthStub(channel), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the serving job exited ({self.proc.returncode}):\n{self.stop()[-3000:]}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return self
            except grpc.RpcError:  # not listening yet
                pass
            time.sleep(0.3)
        raise AssertionError(f"not ready in {timeout_s} s:\n{self.log()[-3000:]}")

    def metrics(self, token: Optional[str] = None, ca: Optional[Path] = None) -> dict:
        """The Prometheus samples on the job's metrics port, parsed by prometheus_client's own parser:
        {(name, frozen labels): value}. `ca`: over TLS, trusting that CA; `token`: sent as a bearer token."""
        import ssl
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        scheme, context = ("https", ssl.create_default_context(cafile=str(ca))) if ca else ("http", None)
        request = urllib.request.Request(f"{scheme}://localhost:{self.metrics_port}/metrics",
                                         headers={"authorization": f"Bearer {token}"} if token else {})
        text = urllib.request.urlopen(request, timeout=10, context=context).read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def log(self, rank: int = 0) -> str:
        path = self.run_dir / f"rank{rank}.log"
        return path.read_text() if path.exists() else ""

    def pid_of(self, rank: int) -> int:
        """The pid a rank's log names last (a restarted world's rank logs a new one)."""
        import re

        return int(re.findall(r"\(pid (\d+)\)", self.log(rank))[-1])

    def processes(self) -> List[int]:
        """The launcher and every process under it (torchrun, the ranks), read from /proc."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    todo += [int(child) for child in (task / "children").read_text().split()]
                except OSError:  # gone meanwhile
                    pass
        return found

    def ready(self) -> bool:
        """ServerReady, as a load balancer would ask (False when it cannot be asked)."""
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        try:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(self.url))
            return stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=2).ready
        except grpc.RpcError:
            return False

    def wait_exit(self, timeout_s: float) -> str:
        """The launcher's output once it exits by itself; on a timeout, an AssertionError saying where
        each process still alive is (py-spy's stacks, where it is installed), then every process killed."""
        try:
            self.output, _ = self.proc.communicate(timeout=timeout_s)
            return self.output
        except subprocess.TimeoutExpired as timeout:
            so_far = timeout.output or ""
        report = self.post_mortem()
        self.stop(timeout_s=1)  # kills what is left
        raise AssertionError(f"the job had not exited {timeout_s} s on; its output:\n{so_far[-2000:]}\n{report}")

    def post_mortem(self) -> str:
        """Each live process of the job (command line and, with py-spy, its Python stacks) and each rank log's end."""
        import shutil

        lines = []
        for pid in self.processes():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
            except OSError:
                continue
            lines.append(f"--- still alive: {pid} {command}")
            if shutil.which("py-spy") and "python" in command:
                dump = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True,
                                      timeout=30)
                lines.append(dump.stdout[-4000:] or dump.stderr[-500:])
        for rank in range(3):
            lines.append(f"--- rank{rank}.log ends:\n" + "\n".join(self.log(rank).splitlines()[-25:]))
        return "\n".join(lines)

    def stop(self, timeout_s: float = 90) -> str:
        """SIGTERM to the launcher, as a user's would be: drain, then every process ends."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.output, _ = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:  # torchrun and the ranks too: each runs in a session of its own
            for pid in reversed(self.processes()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.output, _ = self.proc.communicate()
        return self.output

    def __enter__(self) -> "ServingJob":
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


@functools.lru_cache(maxsize=1)
def _digits() -> np.ndarray:
    from rpc_train.config.compose import compose
    from rpc_train.data.datasets import load_datasets

    cfg = compose(["data=digits"])
    return load_datasets(cfg.data, cfg.seed)[1].tensors[0].numpy()


def digits_rows(count: int) -> np.ndarray:
    """Validation digits as the served model saw them in training: [count, 1, 8, 8] float32."""
    return _digits()[:count].copy()


def triton_input(rows: np.ndarray, name: str = "input", datatype: str = "FP32"):
    import tritonclient.grpc as triton

    tensor = triton.InferInput(name, list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows)
    return tensor


def served_reference(run: Path, rows: np.ndarray) -> np.ndarray:
    """What the served run's model computes for `rows` in this process: the answers to expect."""
    import torch

    from rpc_train.serve.source import build_served, served_model

    with torch.no_grad():
        return build_served(served_model(str(run), None))(torch.from_numpy(rows)).numpy()


class Load:
    """Clients in threads, each sending `rows` again and again until stopped; every call's
    (status, seconds) is kept. Status is "OK" or tritonclient's "StatusCode.X".

    `leave_when_draining`: a client told that the server is shutting down goes, as one told to
    retry elsewhere would. One that kept calling would sooner or later reach gRPC in its own
    shutdown, which cuts calls no handler has taken yet (CANCELLED) after the drain.
    """

    def __init__(self, url: str, rows: np.ndarray, clients: int = 4, deadline_s: float = 20.0,
                 leave_when_draining: bool = False):
        import threading

        self.url, self.rows, self.deadline_s = url, rows, deadline_s
        self.leave_when_draining = leave_when_draining
        self.outcomes: List[tuple] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def _client(self) -> None:
        import tritonclient.grpc as triton
        from tritonclient.utils import InferenceServerException

        client = triton.InferenceServerClient(self.url)
        while not self._stop.is_set():
            began, leaving = time.monotonic(), False
            try:
                client.infer("mlp", [triton_input(self.rows)], client_timeout=self.deadline_s)
                code = "OK"
            except InferenceServerException as err:
                code = str(err).split("]")[0].strip("[")
                leaving = self.leave_when_draining and "shutting down" in str(err)
                if not leaving:
                    time.sleep(0.05)
            self.outcomes.append((code, time.monotonic() - began))
            if leaving:
                return

    def codes(self, since: int = 0) -> List[str]:
        return [code for code, _ in self.outcomes[since:]]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def curl(server, path: str, *args: str):
    """curl on the HTTP door: (HTTP status, body)."""
    done = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args, f"http://{server.http_url}{path}"],
                          capture_output=True, text=True, timeout=30)
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body
