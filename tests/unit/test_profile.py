"""The profiler's hook and trace merging, without RPC: when it starts and stops, what it refuses,
and how every rank's trace lands on one clock."""

import json
import logging
import os

import pytest
import torch

from rpc_train.config.errors import ConfigError
from rpc_train.pipeline.profile import ProfileHook, RankProfiler, merge, without_kineto_noise

pytestmark = pytest.mark.timeout(60)


class Ranks:
    """An engine's profiling calls, with this process's profiler standing in for every rank."""

    def __init__(self):
        self.calls, self.profiler = [], RankProfiler()

    def start_profile(self):
        self.calls.append("start")
        self.profiler.start("cpu")

    def stop_profile(self):
        self.calls.append("stop")
        trace = self.profiler.stop()
        return {"driver": trace, "worker1": json.loads(json.dumps(trace))}


def test_the_hook_profiles_exactly_its_step_and_writes_every_rank(tmp_path):
    ranks = Ranks()
    hook = ProfileHook(ranks, str(tmp_path), step=3, first_step=1, last_step=5)
    for step in (1, 2):
        hook(step, None)
    assert ranks.calls == ["start"]
    torch.randn(8, 8) @ torch.randn(8, 8)
    hook(3, None)
    hook(4, None)
    assert ranks.calls == ["start", "stop"]
    directory = tmp_path / "profile" / "step_3"
    assert sorted(p.name for p in directory.iterdir()) == ["driver.json", "merged.json", "worker1.json"]
    merged = json.loads((directory / "merged.json").read_text())["traceEvents"]
    names = {e["args"]["name"] for e in merged if e.get("ph") == "M" and e["name"] == "process_name"}
    assert {n.split(":")[0] for n in names} == {"driver", "worker1"}
    assert any(e.get("name") == "aten::mm" for e in merged)
    ranks.profiler.close()


def test_the_first_step_starts_at_once_and_a_step_out_of_the_run_is_refused_or_told(caplog):
    ranks = Ranks()
    ProfileHook(ranks, "unused", step=1, first_step=1, last_step=5)
    assert ranks.calls == ["start"]
    ranks.profiler.stop()
    with pytest.raises(ConfigError, match=r"^pipeline.profile_step=9: this run ends at step 5; profile a step from 1 to 5$"):
        ProfileHook(ranks, "unused", step=9, first_step=1, last_step=5)
    with caplog.at_level(logging.WARNING):
        ProfileHook(ranks, "unused", step=2, first_step=4, last_step=5)  # resumed past it
    assert "resumes at step 4, past it" in caplog.text and ranks.calls == ["start"]
    ranks.profiler.close()


def test_a_trace_lands_on_the_wall_clock_by_its_marker():
    from rpc_train.pipeline.profile import CLOCK_MARK, on_wall_clock

    trace = {"baseTimeNanoseconds": 5, "traceEvents": [
        {"ph": "X", "name": CLOCK_MARK, "ts": 100.0, "dur": 2.0}, {"ph": "X", "name": "op", "ts": 150.0, "dur": 1.0},
        {"ph": "M", "name": "process_name", "args": {"name": "python3"}}]}
    shifted = on_wall_clock(trace, wall_us=1e6)
    assert [e.get("ts") for e in shifted["traceEvents"]] == [1e6 - 1, 1e6 + 49, None]
    assert "baseTimeNanoseconds" not in shifted
    unmarked = {"traceEvents": [{"ph": "X", "name": "op", "ts": 150.0, "dur": 1.0}]}
    assert on_wall_clock(unmarked, wall_us=1e6)["traceEvents"][0]["ts"] == 150.0  # kept, with a warning


def test_merged_ranks_keep_their_processes_and_flow_ids_apart():
    def trace(pid, ts):
        return {"traceEvents": [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": "python3"}},
                                {"ph": "X", "name": "op", "pid": pid, "tid": 1, "ts": ts, "dur": 1.0},
                                {"ph": "s", "name": "flow", "pid": pid, "tid": 1, "ts": ts, "id": 7}]}

    # Two ranks with the same OS pid (two machines) stay two processes.
    events = merge({"driver": trace(100, 5.0), "worker1": trace(100, 6.0)})["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    assert sorted(names.values()) == ["driver: python3", "worker1: python3"]
    assert sorted(e["id"] for e in events if e["ph"] == "s") == ["driver:7", "worker1:7"]


def test_kinetos_known_lines_are_filtered_and_everything_else_passes(capfd):
    with without_kineto_noise():
        os.write(2, b"ERROR: External init callback must run in same thread as registerClient (67 != 17)\n")
        os.write(2, b"USDT:2026-12-07 10:26:03 16983:17222 SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        os.write(2, b"ERROR:2026-12-07 10:26:04 16982:17225 DeviceProperties.cpp:56] gpuGetDeviceCount failed "
                    b"with code 35\n")
        os.write(2, b"ERROR: something else went wrong\n")
    assert capfd.readouterr().err == "ERROR: something else went wrong\n"
