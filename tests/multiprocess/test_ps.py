"""mode=parameter_server end to end: sync equivalence, async learning, tags, splits, failures."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from rpc_train.config.compose import compose
from helpers.events import event_tags, read_scalars
from helpers.launching import launch, REPO
from helpers.progress import REPORT_OFTEN, assert_reports_to_the_end
from helpers.reference import initial_state, train_locally
from rpc_train.training.local import LocalEngine

pytestmark = pytest.mark.timeout(240)

PS = ["experiment=smoke", "mode=parameter_server"]
# 2 servers, 2 trainers: 640 samples / (2 x 32) = 10 steps an epoch, so 12 steps cross an epoch.
SYNC = PS + ["ps.servers=2", "trainer.epochs=2", "trainer.max_steps=12"]
# Asynchrony itself acts like momentum (about 1 - 1/trainers), so the preset's 0.9 on top
# of it makes a 20-step run erratic; plain SGD learns steadily. At 30 steps the validation
# accuracy varied from 0.32 to 0.76 with the interleaving (a CI run failed the 0.5 bar); at 60
# it was 0.92-0.95 in six runs.
ASYNC = PS + ["ps.servers=2", "ps.sync=false", "ps.max_staleness=4", "optim.momentum=0.0",
              "trainer.epochs=6", "trainer.max_steps=60"]
# Trainer 1 raises, or hangs, just before its 7th step (tests/helpers/faults.py).
FAIL_AT_7 = "ps.step_hook={_target_:helpers.faults.FailAt,trainer:1,step:7}"
STALL_AT_7 = "ps.step_hook={_target_:helpers.faults.FailAt,trainer:1,step:7,stall:true}"


@pytest.mark.parametrize("args, nproc, needle", [
    (["ps.servers=3"], "4", "error: ps.servers=3 leaves no trainer in a world of 4"),
    ([], "2", "error: ps.servers=1 leaves no trainer in a world of 2"),
    (["ps.servers=0"], "4", "error: ps.servers=0: must be a positive integer"),
])
def test_launcher_rejects_a_bad_split_in_one_line(tmp_path, args, nproc, needle):
    result = launch(["mode=parameter_server", *args], tmp_path / "run", timeout=60, NPROC=nproc)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(needle), result.stderr
    assert not (tmp_path / "run").exists()


def test_sync_matches_single_process_with_trainers_times_the_batch(tmp_path):
    result = launch(SYNC, tmp_path / "run", NPROC="5")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    served = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    b = compose(SYNC).trainer.batch_size
    reference = train_locally([*SYNC, f"trainer.batch_size={2 * b}"])
    initial = initial_state(SYNC)
    assert served.keys() == reference.keys()
    for name, value in reference.items():
        assert not torch.equal(value, initial[name]), f"{name} never trained: the test would prove nothing"
        torch.testing.assert_close(served[name], value, rtol=0, atol=1e-5, msg=name)
    steps = [s for s, _ in read_scalars(tmp_path / "run")["server1/updates_per_s"]]
    assert steps == [5, 10, 12]


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("async") / "run"
    result = launch(ASYNC + REPORT_OFTEN, run_dir, NPROC="5")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


def test_async_run_learns_the_digits(async_run):
    run_dir, _ = async_run
    scalars = read_scalars(run_dir)
    assert scalars["val/accuracy"][-1][1] > 0.5  # chance is 0.1
    losses = [value for _, value in scalars["train/loss"]]
    assert losses[-1] < 0.8 * losses[0]


def test_async_run_reports_progress_in_plain_lines_to_a_pipe(async_run):
    run_dir, result = async_run
    assert_reports_to_the_end(result.stdout + result.stderr, 60)


def test_async_run_logs_trainers_servers_and_staleness(async_run):
    run_dir, result = async_run
    scalars = read_scalars(run_dir)
    expected = {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "lr",
                "throughput/samples_per_s", "time/step_ms", "trainer0/samples_per_s",
                "trainer1/samples_per_s", "server0/updates_per_s", "server1/updates_per_s",
                "ps/staleness_mean", "ps/staleness_max", "ps/stale_refreshes", "hparam/val/accuracy"}
    assert expected <= set(scalars), expected - set(scalars)
    assert "ps/staleness" in event_tags(run_dir)["histograms"]
    assert all(0 <= v <= 4 for _, v in scalars["ps/staleness_max"])  # ps.max_staleness=4
    assert all(v > 0 for _, v in scalars["trainer1/samples_per_s"])
    assert "Warning" not in result.stdout + result.stderr


def test_exported_model_loads_without_rpc(async_run):
    run_dir, _ = async_run
    cfg = compose(ASYNC)
    model = LocalEngine(cfg).model
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))  # strict


def test_a_failing_trainer_stops_a_sync_job_naming_it(tmp_path):
    result = launch(PS + [FAIL_AT_7], tmp_path / "run", timeout=120, NPROC="4")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: trainer1 (worker3) failed: RuntimeError: injected fault"), errors[0]
    assert "sync mode needs every trainer" in errors[0]


@pytest.mark.slow
def test_a_failing_trainer_is_reported_and_async_training_goes_on(tmp_path):
    result = launch(PS + ["ps.sync=false", FAIL_AT_7], tmp_path / "run", timeout=120, NPROC="4")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "run" / "rank0.log").read_text()
    assert re.search(r"WARNING .*trainer1 \(worker3\) failed and is left out: RuntimeError: injected fault", log)
    scalars = read_scalars(tmp_path / "run")
    assert scalars["ps/live_trainers"][-1][1] == 1
    assert scalars["trainer0/samples_per_s"][-1][0] == 20  # trainer0 ran to the last step
    assert (tmp_path / "run" / "model.pt").is_file()


@pytest.mark.slow
def test_a_killed_trainer_process_ends_the_job_promptly(tmp_path):
    """SIGKILL, not an exception: torchrun ends the job and names the rank; nothing hangs."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "RUN_DIR": str(run_dir), "PYTHON": sys.executable, "NPROC": "4"}
    proc = subprocess.Popen([str(REPO / "launch.sh"), "mode=parameter_server", "trainer.progress=false"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = _wait_for_pid(run_dir / "rank3.log", deadline=time.monotonic() + 90)
        time.sleep(2)  # well into training
        os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    root_cause = stderr.split("Root Cause", 1)[-1]
    assert "rank      : 3" in root_cause and "SIGKILL" in root_cause, stderr[-3000:]


@pytest.mark.slow
def test_a_stalled_trainer_stops_a_sync_job_naming_it(tmp_path):
    result = launch(PS + ["runtime.rpc_timeout_s=10", STALL_AT_7], tmp_path / "run", timeout=150, NPROC="4")
    assert result.returncode == 1
    assert ("error: trainer1 (worker3) failed: no progress report for 10 s (runtime.rpc_timeout_s); "
            "sync mode needs every trainer") in result.stderr, result.stderr[-3000:]
    assert "(the servers were waiting for trainer1)" in result.stderr


@pytest.mark.slow
def test_a_stalled_trainer_is_left_out_of_an_async_job_which_then_stops(tmp_path):
    result = launch(PS + ["ps.sync=false", "runtime.rpc_timeout_s=10", STALL_AT_7], tmp_path / "run",
                    timeout=150, NPROC="4")
    assert result.returncode == 1
    assert "error: trainer1 (worker3) stopped reporting and never finished" in result.stderr
    scalars = read_scalars(tmp_path / "run")
    assert scalars["val/accuracy"][-1][0] == 20  # the other trainer finished the run


def _wait_for_pid(log_file, deadline: float) -> int:
    while time.monotonic() < deadline:
        if log_file.exists():
            match = re.search(r"trainer \d+ \(pid (\d+)\)", log_file.read_text())
            if match:
                return int(match.group(1))
        time.sleep(0.2)
    raise TimeoutError(f"no trainer pid in {log_file}")


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_job_before_any_server_steps_on_it(tmp_path):
    # lr=1e6 sends this MLP's loss to NaN at step 3, every time.
    result = launch(PS + ["optim.lr=1e6"], tmp_path / "run", NPROC="4")
    assert result.returncode != 0
    assert "non-finite loss (nan) at step 3" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.slow
def test_an_async_non_finite_loss_names_the_trainer_the_staleness_and_a_remedy(tmp_path):
    result = launch(PS + ["ps.sync=false", "optim.lr=1e6"], tmp_path / "run", NPROC="4")
    assert result.returncode != 0
    assert re.search(r"non-finite loss \(nan\) at step \d+ of trainer \d, on parameters last updated by "
                     r"trainer \d's gradient of staleness \d+ \(server 0\); set ps.clip_grad_norm=1.0",
                     result.stderr), result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("seed", range(5))
def test_the_documented_async_command_converges(tmp_path, seed):
    """The README's asynchronous command, as a user runs it: before momentum compensation a
    third of such runs ended under 0.9, at chance, or at a NaN (docs/benchmarks.md)."""
    result = launch(["mode=parameter_server", "ps.servers=1", "ps.sync=false", "trainer.progress=false",
                     f"seed={seed}"], tmp_path / "run", timeout=600, NPROC="4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_scalars(tmp_path / "run")["val/accuracy"][-1][1] >= 0.93
