"""`python -m rpc_train.bench.serve [--models convnet,mlp]`: what the server delivers of what the model computes.

One table per model, every row from the same run: the model in this process with no server,
at every batch size up to serve.max_batch_size (the compute bound: timed before and after the
servers, the faster kept), then real serving jobs
(`launch.sh mode=serve`): batching off (serve.max_batch_size=1), batching on, one and two
replicas, two stages; then the peer, Ray Serve with @serve.batch on the same model, one and
two replicas (bench/ray_peer.py; skipped, with a note, without the optional `bench` extra).
Each request is one row. The load:

- HTTP, closed loop, from `wrk` (compiled; bench/httpload.py) at each --concurrency;
- gRPC, closed loop, from --clients Python client processes (bench/loadgen.py);
- gRPC, open loop: Poisson arrivals at each --rate, whether or not answers have come back.

Every row says what share of the machine's cores the load generator itself took and what
the serving job's processes took, and "vs model": the requests/s over what the model computes
in this process at the batch size the server formed (its mean batch, from the server's
statistics), the physical limit of a server on these cores.
"""

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import grpc
import torch

from rpc_train.bench import httpload, ray_peer
from rpc_train.bench.hybrid import machine_line
from rpc_train.bench.loadgen import LoadResult, run_load
from rpc_train.metrics.table import format_table
from rpc_train.runtime.local_world import free_service_port
from rpc_train.runtime.world import usable_cores
from rpc_train.serve.source import build_served, served_model

REPO = Path(__file__).resolve().parents[2]  # the checkout, where launch.sh is
DATA = {"convnet": ["data=synthetic"], "mlp": ["data=digits"], "resnet18": ["data=synthetic"]}  # 3x32x32 or 1x8x8
COLUMNS = ["setup", "load", "rps", "p50", "p90", "p99", "errors", "batch", "vs_model", "generator", "server",
           "vs_unbatched"]
HEADERS = ["setup", "load", "requests/s", "p50 ms", "p90 ms", "p99 ms", "failed", "mean batch", "vs model",
           "generator cores", "server cores", "vs unbatched"]


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rpc_train.bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="convnet,mlp", help="comma-separated conf/model options")
    p.add_argument("--concurrency", default="1,16,64", help="HTTP closed-loop connections (wrk), comma-separated")
    p.add_argument("--clients", type=int, default=16, help="gRPC closed-loop client processes (0: no such row)")
    p.add_argument("--rate", default="", help="gRPC open-loop Poisson rates (requests/s), comma-separated")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds of load per row")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--setups", default=",".join(SETUPS), help=f"rpc_train setups, comma-separated: {', '.join(SETUPS)}")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for every serving job")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.rate = [float(r) for r in args.rate.split(",") if r]
    args.setups = [key for key in args.setups.split(",") if key]
    unknown = [key for key in args.setups if key not in SETUPS]
    if unknown:
        p.error(f"--setups {','.join(unknown)}: expected some of {', '.join(SETUPS)}")
    return args


def train(model: str, run_dir: Path) -> Path:
    """A few steps of training: the weights do not matter to speed, the run's files do."""
    env = {**os.environ, "RUN_DIR": str(run_dir), "PYTHON": sys.executable}
    done = subprocess.run([str(REPO / "launch.sh"), "experiment=smoke", f"model={model}", *DATA[model],
                           "trainer.max_steps=2", "data.size=256"], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"training {model} failed:\n{done.stderr[-3000:]}")
    return run_dir


def batch_sizes(max_batch: int) -> List[int]:
    return sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)})


def in_process_rows(run: Path, max_batch: int, repeats: int = 100) -> List[Dict]:
    """The model in this process on every core, at batch 1, 2, 4, ... max_batch."""
    torch.set_num_threads(usable_cores())
    served = served_model(str(run), None)
    model = build_served(served)
    rows = []
    for batch in batch_sizes(max_batch):
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
                     "rps": 1e3 * batch / median_ms, "p50": median_ms, "p90": "-", "p99": "-", "errors": "-",
                     "batch": batch})
    torch.set_num_threads(1)  # this process only waits while the jobs run
    return rows


def faster(first: List[Dict], second: List[Dict]) -> List[Dict]:
    """Per batch size, the faster of two in-process timings (taken before and after the serving
    rows): the model's own rate is the bound, and a moment of another process's load on this
    machine only ever slows a timing down."""
    return [a if a["rps"] >= b["rps"] else b for a, b in zip(first, second)]


def model_rate(in_process: List[Dict], batch: float) -> float:
    """Rows/s the model computes in process at `batch` rows (interpolated in log2 of the batch)."""
    points = sorted((r["batch"], r["rps"]) for r in in_process)
    if batch <= points[0][0]:
        return points[0][1]
    for (b0, r0), (b1, r1) in zip(points, points[1:]):
        if batch <= b1:
            t = (math.log2(batch) - math.log2(b0)) / (math.log2(b1) - math.log2(b0))
            return r0 + t * (r1 - r0)
    return points[-1][1]


@dataclass
class Job:
    grpc_url: str
    http_url: str
    pid: int  # launch.sh's: the job is it and its descendants


@contextmanager
def serving(run: Path, nproc: int, overrides: List[str]) -> Iterator[Job]:
    """A serving job on free ports, ready; drained and gone afterwards."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port, http_port = free_service_port(), free_service_port()
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as run_dir:
        env = {**os.environ, "RUN_DIR": run_dir, "PYTHON": sys.executable, "NPROC": str(nproc)}
        proc = subprocess.Popen([str(REPO / "launch.sh"), "mode=serve", f"serve.run={run}", f"serve.port={port}",
                                 "serve.metrics_port=0", f"serve.http_port={http_port}", *overrides], env=env,
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
            yield Job(url, f"127.0.0.1:{http_port}", proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def tree_cpu_s(root: int) -> float:
    """CPU seconds so far of `root` and its living descendants (the serving job's processes)."""
    parents, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            parents[int(entry)] = int(fields[1])
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    family, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    return sum(cpu.get(pid, 0.0) for pid in family)


def served_batches(job: Job, model: str) -> tuple:
    """(rows, batches) the job's model has computed so far, from its statistics (the protocol's)."""
    with urllib.request.urlopen(f"http://{job.http_url}/v2/models/{model}/stats", timeout=10) as reply:
        stats = json.load(reply)["model_stats"]
    return sum(s["inference_count"] for s in stats), sum(s["execution_count"] for s in stats)


def measured(job: Optional[Job], model: str, load: Callable[[Callable[[], None]], LoadResult]) -> tuple:
    """`load(started)`'s LoadResult, the job's CPU from `started()` on (cores) and its mean
    batch over the load (None: unknown)."""
    if job is None:
        return load(lambda: None), "-", None
    rows0, batches0 = served_batches(job, model)
    since = []
    result = load(lambda: since.append((tree_cpu_s(job.pid), time.monotonic())))
    cores = (tree_cpu_s(job.pid) - since[0][0]) / (time.monotonic() - since[0][1])
    rows1, batches1 = served_batches(job, model)
    return result, cores, (rows1 - rows0) / max(1, batches1 - batches0)


def load_row(setup: str, load: str, result: LoadResult, server_cores, batch: Optional[float]) -> Dict:
    if result.percentiles_ms is not None:
        p50, p90, p99 = result.percentiles_ms
    else:
        cuts = statistics.quantiles(result.latencies_ms, n=100)
        p50, p90, p99 = statistics.median(result.latencies_ms), cuts[89], cuts[98]
    if batch is None:
        batch = statistics.mean(result.batch_rows)
    cores = usable_cores()
    return {"setup": setup, "load": load, "rps": result.answered / result.seconds, "p50": p50, "p90": p90,
            "p99": p99, "batch": batch, "errors": result.errors,
            "generator": f"{result.generator_cores():.2f}/{cores}",
            "server": server_cores if server_cores == "-" else f"{server_cores:.2f}/{cores}"}


POISSON_CLIENTS = 4  # processes sending the open-loop load, each its share of the rate
# (setup, processes, batch limit: None for --max-batch-size, overrides)
SETUPS = {"unbatched": ("rpc_train, batching off, 1 replica", 2, 1, []),
          "batching": ("rpc_train, batching, 1 replica", 2, None, []),
          "replicas": ("rpc_train, batching, 2 replicas", 3, None, []),
          "stages": ("rpc_train, batching, 1 replica of 2 stages", 3, None, ["serve.stages=2"])}


def serving_rows(args: argparse.Namespace, run: Path, name: str, shape: List[int]) -> List[Dict]:
    rows = []
    for setup, nproc, batch, overrides in (SETUPS[key] for key in args.setups):
        overrides = [f"serve.max_batch_size={batch or args.max_batch_size}", *overrides, *args.override]
        with serving(run, nproc, overrides) as job:
            rows += loaded_rows(args, setup, job, name, shape, http=True)
    return rows


def loaded_rows(args: argparse.Namespace, setup: str, job: Optional[Job], name: str, shape: List[int],
                metadata: tuple = (), http: bool = False) -> List[Dict]:
    """Every load of the run against one server: wrk over HTTP (where `http`), the gRPC clients,
    and the Poisson rates; `job` None: a server whose processes and statistics are not ours."""
    url = job.grpc_url if job is not None else args.peer_url
    loads = []
    if http and not httpload.missing():
        loads += [(f"HTTP wrk c={c}", lambda started, c=c: httpload.run_wrk(job.http_url, name, shape, c,
                                                                             args.seconds, started))
                  for c in args.concurrency]
    if args.clients:
        loads.append((f"gRPC {args.clients} clients",
                      lambda started: run_load(url, name, shape, args.clients, args.seconds, None, metadata, started)))
    loads += [(f"gRPC Poisson {rate:g}/s",
               lambda started, rate=rate: run_load(url, name, shape, POISSON_CLIENTS, args.seconds, rate, metadata,
                                                   started))
              for rate in args.rate]
    return [load_row(setup, label, *measured(job, name, load)) for label, load in loads]


def peer_rows(args: argparse.Namespace, run: Path, name: str, shape: List[int]) -> List[Dict]:
    """Ray Serve with @serve.batch, one and two replicas, at the same batch limit and load."""
    rows = []
    for replicas in (1, 2):
        with ray_peer.ray_serving(str(run), replicas, args.max_batch_size, free_service_port(), usable_cores()) as url:
            args.peer_url = url
            setup = f"{ray_peer.NAME}, {replicas} replica{'s' if replicas > 1 else ''}"
            rows += loaded_rows(args, setup, None, name, shape, (("application", "peer"),))
    return rows


def add_ratios(rows: List[Dict], in_process: List[Dict]) -> None:
    unbatched = {r["load"]: r["rps"] for r in rows if "batching off" in r["setup"]}
    for row in rows:
        if row["load"] == "-":
            continue
        base = unbatched.get(row["load"])
        row["vs_unbatched"] = row["rps"] / base if base else "-"
        row["vs_model"] = row["rps"] / model_rate(in_process, row["batch"])


def front_end_cost(rows: List[Dict], in_process: List[Dict]) -> str:
    """One line: one client's served p50 against the model's own time at batch 1."""
    alone = min(in_process, key=lambda r: r["batch"])["p50"]
    served = [r for r in rows if r["load"] == "HTTP wrk c=1" and "batching," in r["setup"]]
    if not served:
        return ""
    p50 = served[0]["p50"]
    return (f"one client ({served[0]['setup']}, HTTP): served p50 {p50:.2f} ms, the model in process "
            f"{alone:.2f} ms: the server adds {p50 - alone:.2f} ms")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print(f"{machine_line()}, torch {torch.__version__}; {args.seconds:g} s of load "
          f"a row, one row per request, serve.max_batch_size={args.max_batch_size}"
          + (f"; HTTP rows skipped: {httpload.missing()}" if httpload.missing() else ""))
    with tempfile.TemporaryDirectory(prefix="serve-bench-runs-") as scratch:
        for name in args.models:
            run = train(name, Path(scratch) / name)
            before = in_process_rows(run, args.max_batch_size)
            shape = served_model(str(run), None).shape
            rows = serving_rows(args, run, name, shape)
            skipped = ray_peer.missing()
            if not skipped:
                rows += peer_rows(args, run, name, shape)
            in_process = faster(before, in_process_rows(run, args.max_batch_size))
            add_ratios(rows, in_process)
            print(f"\nmodel={name} input={shape}")
            print(format_table(in_process + rows, COLUMNS, HEADERS))
            errors = sum(r.get("errors", 0) for r in rows)
            print(f"failed requests: {errors}" + (f"; {ray_peer.NAME} (the peer) skipped: {skipped}" if skipped else ""))
            print(front_end_cost(rows, in_process))
    return 0


if __name__ == "__main__":
    sys.exit(main())
