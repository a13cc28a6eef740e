"""Closed-loop HTTP load from `wrk`, a compiled load generator, so that the client is not the limit.

`wrk` (Debian's package) keeps `concurrency` connections busy, each sending the next request
when its answer is back, and records every latency to the microsecond; a Lua script here sets
the request and prints the counts and percentiles. A one-second run before each measured one
warms the connections up and is not counted. wrk's own CPU time comes from the kernel's
accounting of its process (`os.wait4`), so every row can say what share of the machine the
generator took. The request is the protocol's binary tensor extension: a JSON header, then the
row's raw bytes, as `tritonclient.http` sends it.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from rpc_train.bench.loadgen import WARMUP_S, LoadResult

WRK = "wrk"
DRAIN_S = 0.5
# Every request the same body; done() prints one line: requests, microseconds, errors, then the
# latency's p50, p90, p99 in microseconds.
SCRIPT = """
local f = assert(io.open(os.getenv("RPC_TRAIN_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = os.getenv("RPC_TRAIN_HEADER_LENGTH")
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def missing() -> Optional[str]:
    """Why the HTTP rows cannot run here, or None."""
    return None if shutil.which(WRK) else "wrk is not installed (apt-get install wrk)"


def infer_body(shape: List[int], seed: int = 0) -> tuple:
    """(body, header length) of a one-row FP32 request with binary input and output."""
    row = np.random.default_rng(seed).standard_normal((1, *shape)).astype(np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, *shape],
                                     "parameters": {"binary_data_size": len(row)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return header + row, len(header)


def run_wrk(url: str, model: str, shape: List[int], concurrency: int, duration_s: float,
            started: Callable[[], None] = lambda: None) -> LoadResult:
    """`concurrency` closed-loop connections to http://`url`'s infer route for `duration_s`
    after a warm-up second, `started()` called between the two. Percentiles come from wrk
    (`percentiles_ms`); `batch_rows` stays empty (the server's statistics say it)."""
    body, header_length = infer_body(shape)
    with tempfile.TemporaryDirectory(prefix="wrk-") as scratch:
        (Path(scratch) / "body").write_bytes(body)
        (Path(scratch) / "infer.lua").write_text(SCRIPT)
        env = {**os.environ, "RPC_TRAIN_BODY": str(Path(scratch) / "body"),
               "RPC_TRAIN_HEADER_LENGTH": str(header_length)}
        target = f"http://{url}/v2/models/{model}/infer"
        threads = str(min(concurrency, os.cpu_count() or 1))

        def wrk(seconds: float):
            command = [WRK, "-t", threads, "-c", str(concurrency), "-d", f"{seconds:g}s",
                       "-s", str(Path(scratch) / "infer.lua"), target]
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
            out, err = proc.communicate(timeout=seconds + 60)
            if proc.returncode != 0 or "RESULT" not in out:
                raise RuntimeError(f"{' '.join(command)} failed: {(out + err)[-2000:]}")
            return out, proc

        wrk(WARMUP_S)
        # wrk leaves its last requests unanswered: let the server answer them before counting,
        # or at c = serve.threads the first ones of the measured run are refused as too many.
        time.sleep(DRAIN_S)
        started()
        before = os.times()
        out, _ = wrk(duration_s)
        after = os.times()
    requests, micros, errors, *percentiles = (int(v) for v in out.split("RESULT")[1].split())
    # wrk has exited and been reaped: its CPU time is in this process's children's.
    cpu_s = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return LoadResult(seconds=micros / 1e6, errors=errors, answered=requests - errors, cpu_s=cpu_s,
                      wall_s=micros / 1e6, percentiles_ms=[p / 1e3 for p in percentiles])
