"""End to end: ./launch.sh starts torchrun, 3 RPC processes train the smoke preset."""

import json
import re

import pytest
import torch
from hydra.utils import instantiate

from rpc_train.config.compose import compose
from helpers.events import event_tags, hparams_of, read_scalars
from helpers.launching import REPO, SMOKE, launch_env
from helpers.progress import LINE, REPORT_OFTEN, assert_reports_to_the_end, run_in_terminal

pytestmark = pytest.mark.timeout(240)

EXPECTED_SCALARS = {
    "train/loss", "train/accuracy", "val/loss", "val/accuracy", "lr",
    "throughput/samples_per_s", "time/step_ms",
    "stage0/forward_ms", "stage0/backward_ms", "stage1/forward_ms", "stage1/backward_ms",
    "stage0/page_faults", "stage1/page_faults", "stage0/peak_memory_mb", "stage1/peak_memory_mb",
    "pipeline/bubble_fraction", "pipeline/step_ms",
    "pipeline/messages_per_micro_batch", "pipeline/messages_per_step",
    "pipeline/forward_handoff_ms", "pipeline/backward_handoff_ms",
}


def test_smoke_run_logs_every_tag_and_loss_falls(smoke_run):
    run_dir, _ = smoke_run
    scalars = read_scalars(run_dir)
    assert EXPECTED_SCALARS <= set(scalars)
    losses = [value for _, value in scalars["train/loss"]]
    assert len(losses) == 4  # 20 steps, logged every 5
    assert losses[-1] < 0.8 * losses[0]
    # Stage 1 clocks its backward at its input; stage 0, whose input needs no gradient, by an
    # autograd-engine callback.
    for stage in ("stage0", "stage1"):
        assert all(value > 0 for _, value in scalars[f"{stage}/backward_ms"]), stage
    assert scalars["val/accuracy"][-1][1] > 0.5  # digits, 20 steps: well above chance (0.1)
    tags = event_tags(run_dir)
    assert "config/text_summary" in tags["tensors"]


def test_smoke_run_writes_hparams_and_config_once(smoke_run):
    run_dir, _ = smoke_run
    assert hparams_of(run_dir)["pipeline.micro_batches"] == 4
    assert "hparam/val/accuracy" in read_scalars(run_dir)
    # Only the driver records the config; every rank keeps its own log file.
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in run_dir.glob("rank*.log")) == ["rank0.log", "rank1.log", "rank2.log"]
    assert "[rank0]" in (run_dir / "rank0.log").read_text()


def test_smoke_run_shows_the_pipeline_timeline(smoke_run):
    run_dir, _ = smoke_run
    assert event_tags(run_dir)["images"] == ["pipeline/timeline"]  # steps 10 and 20
    trace = json.loads((run_dir / "trace.json").read_text())
    boxes = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    # 4 micro-batches, forward and backward, on each of 2 stages.
    assert sorted((e["tid"], e["cat"]) for e in boxes) == sorted(
        [(k, c) for k in (0, 1) for c in ("forward", "backward") for _ in range(4)])
    assert all(0 < v < 1 for _, v in read_scalars(run_dir)["pipeline/bubble_fraction"])
    # A micro-batch's handoff between the stages takes at least a message's time each way.
    assert all(v > 0 for way in ("forward", "backward") for _, v in read_scalars(run_dir)[f"pipeline/{way}_handoff_ms"])
    # The smoke run's 1f1b schedule: stage k of K=2 holds at most K-k micro-batches at once,
    # from the start of a micro-batch's forward there to the end of its backward there (with
    # gpipe, stage 0 would hold all 4).
    for stage in (0, 1):
        held = {}
        for e in boxes:
            if e["tid"] == stage:
                start, end = held.get(e["name"][1:], (None, None))
                held[e["name"][1:]] = (e["ts"], end) if e["cat"] == "forward" else (start, e["ts"] + e["dur"])
        assert max(sum(a <= start < b for a, b in held.values()) for start, _ in held.values()) <= 2 - stage, held
    # Each stage reports the activations it held at their peak.
    peaks = {k: [v for _, v in read_scalars(run_dir)[f"stage{k}/peak_memory_mb"]] for k in (0, 1)}
    assert all(v > 0 for k in (0, 1) for v in peaks[k]), peaks


def test_the_profiled_step_has_every_stage_on_one_clock(smoke_run):
    run_dir, result = smoke_run
    directory = run_dir / "profile" / "step_12"
    assert sorted(p.name for p in directory.iterdir()) == ["driver.json", "merged.json", "worker1.json", "worker2.json"]
    assert str(directory) in (run_dir / "rank0.log").read_text()  # the log says where
    events = json.loads((directory / "merged.json").read_text())["traceEvents"]
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}

    def ops(worker, match):
        return [e for e in events if e.get("ph") == "X" and process[e["pid"]].startswith(worker) and match(e["name"])]

    forwards = [ops(f"worker{k + 1}", lambda name, k=k: name == f"stage{k}/forward") for k in (0, 1)]
    backwards = [ops(f"worker{k + 1}", lambda name: "Backward" in name) for k in (0, 1)]
    assert [len(f) for f in forwards] == [4, 4]  # the smoke preset's 4 micro-batches, on each stage
    assert all(backwards), "a stage's backward ops are missing"
    # One clock: the first forward starts on stage 0 before stage 1, the first backward starts
    # on stage 1 before stage 0 (the gradient comes back to it). Starts, not ends: stage 1's
    # last op sends the gradient and may end after stage 0 has used it.
    assert min(e["ts"] for e in forwards[0]) < min(e["ts"] for e in forwards[1])
    assert min(e["ts"] for e in backwards[1]) < min(e["ts"] for e in backwards[0])


def test_exported_model_loads_without_rpc(smoke_run):
    run_dir, _ = smoke_run
    cfg = compose(SMOKE)
    model = instantiate(cfg.model)
    state = torch.load(run_dir / "model.pt", weights_only=True)
    model.load_state_dict(state)  # strict: every parameter and buffer, named as in models/
    assert model(torch.zeros(2, *cfg.data.shape)).shape == (2, cfg.data.num_classes)


def test_run_is_warning_free(smoke_run):
    _, result = smoke_run
    output = result.stdout + result.stderr
    assert "Warning" not in output, output[-3000:]
    # The profiled step's start and stop print nothing alarming on any rank (Kineto's lines).
    assert "ERROR" not in output and "USDT" not in output, output[-3000:]


def test_a_run_logged_to_a_pipe_reports_progress_in_plain_lines(smoke_run):
    run_dir, result = smoke_run  # launched with its output to pipes, as CI, nohup or Slurm would
    assert_reports_to_the_end(result.stdout + result.stderr, 20)
    assert_reports_to_the_end((run_dir / "rank0.log").read_text(), 20)  # and in the driver's log file


def test_a_run_on_a_terminal_shows_the_bar_and_no_plain_lines(tmp_path):
    status, output = run_in_terminal([str(REPO / "launch.sh"), *SMOKE, *REPORT_OFTEN],
                                     launch_env(tmp_path / "run"), REPO, timeout=180)
    assert status == 0, output[-3000:]
    assert "\r" in output and re.search(r"train: +100%\|.*\| 20/20", output), output[-3000:]
    assert LINE.search(output) is None
