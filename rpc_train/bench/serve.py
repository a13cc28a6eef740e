"""`python -m rpc_train.bench.serve [--models convnet,mlp] [--clients 16]`: what batching and replicas buy.

One table per model, every row from the same run: the model in this process with no server
(batch 1, and a full batch: the compute bound), then real serving jobs (`launch.sh mode=serve`)
under load from real gRPC clients in processes of their own (closed loop: each client waits
for its answer; with --rate, also an open-loop Poisson load at that many requests/s): batching
off (serve.max_batch_size=1), batching on, one and two replicas, two stages; then the peer,
Ray Serve with @serve.batch on the same model, one and two replicas (bench/ray_peer.py; its
rows are skipped, with a note, when the optional `bench` extra is not installed). Each
request is one row.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import grpc
import torch

from rpc_train.bench import ray_peer
from rpc_train.bench.loadgen import LoadResult, run_load
from rpc_train.metrics.table import format_table
from rpc_train.runtime.local_world import free_service_port
from rpc_train.runtime.world import usable_cores
from rpc_train.serve.source import build_served, served_model

REPO = Path(__file__).resolve().parents[2]  # the checkout, where launch.sh is
DATA = {"convnet": ["data=synthetic"], "mlp": ["data=digits"], "resnet18": ["data=synthetic"]}  # 3x32x32 or 1x8x8
COLUMNS = ["setup", "load", "rps", "p50", "p90", "p99", "batch", "vs_unbatched"]
HEADERS = ["setup", "load", "requests/s", "p50 ms", "p90 ms", "p99 ms", "mean batch", "vs unbatched"]


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rpc_train.bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="convnet,mlp", help="comma-separated conf/model options")
    p.add_argument("--clients", type=int, default=16, help="closed-loop clients (processes)")
    p.add_argument("--rate", type=float, default=0.0, help="also an open-loop row set at this many requests/s")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds of load per row")
    p.add_argument("--max-batch-size", type=int, default=32)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    return args


def train(model: str, run_dir: Path) -> Path:
    """A few steps of training: the weights do not matter to speed, the run's files do."""
    env = {**os.environ, "RUN_DIR": str(run_dir), "PYTHON": sys.executable}
    done = subprocess.run([str(REPO / "launch.sh"), "experiment=smoke", f"model={model}", *DATA[model],
                           "trainer.max_steps=2", "data.size=256"], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"training {model} failed:\n{done.stderr[-3000:]}")
    return run_dir


def in_process_rows(run: Path, max_batch: int, repeats: int = 100) -> List[Dict]:
    torch.set_num_threads(usable_cores())
    served = served_model(str(run), None)
    model = build_served(served)
    rows = []
    for batch in (1, max_batch):
        x = torch.randn(batch, *served.shape)
        times = []
        with torch.no_grad():
            for i in range(repeats + 10):
                start = time.perf_counter()
                model(x)
                if i >= 10:
                    times.append(time.perf_counter() - start)
        median_ms = 1e3 * statistics.median(times)
        rows.append({"setup": f"in process, no server, batch {batch}", "load": "-",
                     "rps": 1e3 * batch / median_ms, "p50": median_ms, "p90": "-", "p99": "-", "batch": batch})
    return rows


@contextmanager
def serving(run: Path, nproc: int, overrides: List[str]) -> Iterator[str]:
    """A serving job on a free port, ready; drained and gone afterwards. Yields its address."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_service_port()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as run_dir:
        env = {**os.environ, "RUN_DIR": run_dir, "PYTHON": sys.executable, "NPROC": str(nproc)}
        proc = subprocess.Popen([str(REPO / "launch.sh"), "mode=serve", f"serve.run={run}", f"serve.port={port}",
                                 "serve.metrics_port=0", "serve.http_port=0", *overrides], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url, deadline = f"127.0.0.1:{port}", time.monotonic() + 180
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(url))
        try:
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serving {' '.join(overrides)} did not come up:\n{proc.stderr.read()[-3000:]}")
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        break
                except grpc.RpcError:
                    time.sleep(0.3)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def load_row(setup: str, load: str, result: LoadResult) -> Dict:
    cuts = statistics.quantiles(result.latencies_ms, n=100)
    return {"setup": setup, "load": load, "rps": len(result.latencies_ms) / result.seconds,
            "p50": statistics.median(result.latencies_ms), "p90": cuts[89], "p99": cuts[98],
            "batch": statistics.mean(result.batch_rows), "errors": result.errors}


def serving_rows(args: argparse.Namespace, run: Path, name: str, shape: List[int]) -> List[Dict]:
    b = args.max_batch_size
    setups = [("rpc_train, batching off, 1 replica", 2, ["serve.max_batch_size=1"]),
              ("rpc_train, batching, 1 replica", 2, [f"serve.max_batch_size={b}"]),
              ("rpc_train, batching, 2 replicas", 3, [f"serve.max_batch_size={b}"]),
              ("rpc_train, batching, 1 replica of 2 stages", 3, [f"serve.max_batch_size={b}", "serve.stages=2"])]
    rows = []
    for setup, nproc, overrides in setups:
        with serving(run, nproc, overrides) as url:
            rows += loaded_rows(args, setup, url, name, shape)
    return rows


def loaded_rows(args: argparse.Namespace, setup: str, url: str, name: str, shape: List[int],
                metadata: tuple = ()) -> List[Dict]:
    """The closed-loop row, and the Poisson one with --rate, against the server at `url`."""
    loads = [(f"{args.clients} clients", None)] + ([(f"Poisson {args.rate:g}/s", args.rate)] if args.rate else [])
    return [load_row(setup, label, run_load(url, name, shape, args.clients, args.seconds, rate, metadata))
            for label, rate in loads]


def peer_rows(args: argparse.Namespace, run: Path, name: str, shape: List[int]) -> List[Dict]:
    """Ray Serve with @serve.batch, one and two replicas, at the same batch limit and load."""
    rows = []
    for replicas in (1, 2):
        with ray_peer.ray_serving(str(run), replicas, args.max_batch_size, free_service_port(), usable_cores()) as url:
            setup = f"{ray_peer.NAME}, {replicas} replica{'s' if replicas > 1 else ''}"
            rows += loaded_rows(args, setup, url, name, shape, (("application", "peer"),))
    return rows


def add_ratios(rows: List[Dict]) -> None:
    unbatched = {r["load"]: r["rps"] for r in rows if "batching off" in r["setup"]}
    for row in rows:
        base = unbatched.get(row["load"])
        row["vs_unbatched"] = row["rps"] / base if base else "-"


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print(f"{usable_cores()} usable cores, torch {torch.__version__}; {args.seconds:g} s of load a row, one row "
          f"per request, serve.max_batch_size={args.max_batch_size}")
    with tempfile.TemporaryDirectory(prefix="serve-bench-runs-") as scratch:
        for name in args.models:
            run = train(name, Path(scratch) / name)
            rows = in_process_rows(run, args.max_batch_size)
            torch.set_num_threads(1)  # this process only waits while the jobs run
            shape = served_model(str(run), None).shape
            rows += serving_rows(args, run, name, shape)
            skipped = ray_peer.missing()
            if not skipped:
                rows += peer_rows(args, run, name, shape)
            add_ratios(rows)
            print(f"\nmodel={name} input={shape}")
            print(format_table(rows, COLUMNS, HEADERS))
            errors = sum(r.get("errors", 0) for r in rows)
            print(f"failed requests: {errors}" + (f"; {ray_peer.NAME} (the peer) skipped: {skipped}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
