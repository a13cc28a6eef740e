"""pipeline.profile_step=N: step N recorded with torch.profiler on every rank, and merged.

Every process (the driver and each stage) records all its threads (`profile_all_threads`:
RPC handlers, the autograd engine's, stage 0's micro-batch threads), with CUDA activity when
the stage runs on a GPU. Kineto wants a profiler started and stopped on one thread, and RPC
calls arrive on any of the agent's, so each process runs its profiler on a thread of its own.

The traces come back to the driver, which writes one per rank and a merged one under
`<run dir>/profile/step_N/`. Kineto's timestamps are on each process's own clock; a marker
event recorded at a known wall-clock time puts every trace on the wall clock, which
processes of one machine share (across machines, as closely as their clocks agree).

Kineto prints a few lines straight to each process's stderr whenever a profiler starts or
stops, on every rank: harmless, but they read as errors. They are filtered out (KINETO_NOISE);
anything else written to stderr meanwhile is passed on.
"""

import json
import logging
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

from torch.profiler import ProfilerActivity, profile, record_function

from rpc_train.config.errors import ConfigError

log = logging.getLogger(__name__)

CLOCK_MARK = "rpc_train/wall_clock"

# What Kineto writes to fd 2 on a profiler's start and stop (torch 2.11-2.14), none of which
# means anything went wrong: the thread check of its init callback (our profiler runs on a
# thread of its own on purpose), its USDT probe points, and, on a machine without a CUDA
# driver, the failed GPU count (35: cudaErrorInsufficientDriver).
KINETO_NOISE = re.compile(r"ERROR: External init callback must run in same thread as registerClient"
                          r"|USDT:.*\] profiler_(start|stop)$"
                          r"|ERROR:.*\] gpuGetDeviceCount failed with code 35$")


@contextmanager
def without_kineto_noise() -> Iterator[None]:
    """Run with this process's fd 2 in a temporary file, then write back all but Kineto's noise.

    Only around a profiler's start and stop (milliseconds): whatever another thread writes to
    stderr meanwhile comes out a little late, never lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not KINETO_NOISE.match(line.rstrip("\n")))
            if kept:
                os.write(2, kept.encode())


class RankProfiler:
    """This process's profiler, started and stopped on its own thread."""

    def __init__(self):
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="profiler")
        self._profile: Optional[profile] = None
        self._wall_us = 0.0

    def start(self, device_type: str) -> None:
        self._thread.submit(self._start, device_type).result()

    def stop(self) -> dict:
        """The trace (Chrome trace format) since `start`, its times on the wall clock."""
        return self._thread.submit(self._stop).result()

    def _start(self, device_type: str) -> None:
        from torch._C._profiler import _ExperimentalConfig

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
        with without_kineto_noise():
            self._profile = profile(activities=activities,
                                    experimental_config=_ExperimentalConfig(profile_all_threads=True))
            self._profile.start()
        with record_function(CLOCK_MARK):
            self._wall_us = time.time_ns() / 1e3

    def _stop(self) -> dict:
        prof, self._profile = self._profile, None
        with without_kineto_noise():
            prof.stop()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                trace = json.load(f)
        return on_wall_clock(trace, self._wall_us)

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def on_wall_clock(trace: dict, wall_us: float) -> dict:
    """Shift every event so that the clock marker sits at `wall_us` (taken inside it)."""
    mark = next((e for e in trace["traceEvents"] if e.get("name") == CLOCK_MARK), None)
    if mark is None:  # said, and the trace kept on its own clock: never a lost profile
        log.warning("the profiler's trace has no %s marker: this rank's times are on its own clock", CLOCK_MARK)
        return trace
    offset = wall_us - (float(mark["ts"]) + float(mark.get("dur", 0)) / 2)
    for event in trace["traceEvents"]:
        if "ts" in event:
            event["ts"] = float(event["ts"]) + offset
    # Its times are absolute now: a viewer that added Kineto's base time would count it twice.
    trace.pop("baseTimeNanoseconds", None)
    return trace


def merge(traces: Dict[str, dict]) -> dict:
    """One trace of every rank's events: each process of each rank a process of its own,
    named after the rank (Kineto numbers them by OS pid, and GPUs by device index)."""
    events, ids = [], {}
    for rank, trace in traces.items():
        named = set()
        for event in trace["traceEvents"]:
            event = dict(event)
            if "pid" in event:
                event["pid"] = ids.setdefault((rank, event["pid"]), len(ids))
            if "id" in event:  # flow arrows are matched by id: keep each rank's apart
                event["id"] = f"{rank}:{event['id']}"
            if event.get("ph") == "M" and event.get("name") == "process_name":
                event["args"] = {"name": f"{rank}: {event.get('args', {}).get('name', '')}"}
                named.add(event["pid"])
            events.append(event)
        events += [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": rank}}
                   for (r, _), pid in ids.items() if r == rank and pid not in named]
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_traces(run_dir: str, step: int, traces: Dict[str, dict]) -> str:
    """`profile/step_N/<rank>.json` for each rank and `merged.json`; returns the directory."""
    directory = os.path.join(run_dir, "profile", f"step_{step}")
    os.makedirs(directory, exist_ok=True)
    for rank, trace in traces.items():
        with open(os.path.join(directory, f"{rank}.json"), "w") as f:
            json.dump(trace, f)
    with open(os.path.join(directory, "merged.json"), "w") as f:
        json.dump(merge(traces), f)
    return directory


class ProfileHook:
    """A Trainer hook: profile step `step` on every rank of `engine` (after step-1 ends, it
    starts; after step ends, it stops and writes). The run goes from `first_step` to `last_step`.
    A validation that ends step-1's epoch runs before step-1's hooks, so it is not in the trace."""

    def __init__(self, engine, run_dir: str, step: Optional[int], first_step: int, last_step: int):
        self.engine, self.run_dir, self.step = engine, run_dir, step
        if step is None:
            return
        if step > last_step:
            raise ConfigError(f"pipeline.profile_step={step}: this run ends at step {last_step}; "
                              f"profile a step from {first_step} to {last_step}")
        if step < first_step:
            log.warning("pipeline.profile_step=%d: this run resumes at step %d, past it; nothing is profiled",
                        step, first_step)
        elif step == first_step:
            engine.start_profile()

    def __call__(self, step: int, result) -> None:
        if self.step is None:
            return
        if step == self.step - 1:
            self.engine.start_profile()
        elif step == self.step:
            directory = write_traces(self.run_dir, step, self.engine.stop_profile())
            log.info("pipeline.profile_step=%d: a torch.profiler trace per rank and all of them on one clock "
                     "(merged.json) in %s; open them in https://ui.perfetto.dev", step, directory)
