"""mode=hybrid for real: torchrun, RPC to the embedding servers, DDP among the trainers.

The reference is the plain DLRM trained in one process (rpc_train/hybrid/local.py) at the
trainers' summed batch: in sync mode N trainers of batch b must end where it ends.
"""

import json
import re
import time

import pytest
import torch

from helpers.events import read_scalars
from helpers.launching import launch, ok
from helpers.progress import REPORT_OFTEN, assert_reports_to_the_end
from rpc_train.config.compose import compose
from rpc_train.config.schema import as_dict
from rpc_train.hybrid.local import train_clicks_locally
from rpc_train.hybrid.model import build_dlrm
from models.dlrm import DLRM

SHORT = ["experiment=dlrm_synthetic", "data.size=4000", "trainer.epochs=2", "trainer.max_steps=12",
         "trainer.batch_size=64", "trainer.log_every=4"]


def assert_same_state(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=atol, rtol=0), (name, (got[name] - want[name]).abs().max())


@pytest.mark.timeout(240)
@pytest.mark.parametrize("nproc, setup", [
    pytest.param(4, ["hybrid.sharding=table", "hybrid.embedding_optim=sgd"], id="table-1-server-sgd"),
    pytest.param(5, ["hybrid.servers=2", "hybrid.sharding=row", "hybrid.embedding_optim=sgd"],
                 id="row-2-servers-sgd", marks=pytest.mark.slow),
    pytest.param(5, ["hybrid.servers=2", "hybrid.sharding=table", "hybrid.embedding_optim=rowwise_adagrad"],
                 id="table-2-servers-rowwise-adagrad", marks=pytest.mark.slow),
])
def test_sync_hybrid_ends_where_one_process_at_the_summed_batch_ends(tmp_path, nproc, setup):
    overrides = [*SHORT, *setup, *REPORT_OFTEN]
    run = tmp_path / "run"
    result = ok(launch(overrides, run, NPROC=str(nproc)))
    assert_reports_to_the_end(result.stdout + result.stderr, 12, at_least=1)  # output to a pipe: plain lines
    cfg = compose(overrides)
    trainers = nproc - 1 - cfg.hybrid.servers
    want, metrics = train_clicks_locally(cfg, batch_size=trainers * cfg.trainer.batch_size)
    got = torch.load(run / "model.pt", weights_only=True)
    assert_same_state(got, want)
    # model.pt is the plain model's state_dict, and the job trained it.
    initial = build_dlrm(as_dict(cfg.model), cfg.seed).state_dict()
    DLRM(13, cfg.data.table_rows).load_state_dict(got)
    for name in ("top.0.weight", "bottom.0.weight", "embeddings.0.weight", "embeddings.7.weight"):
        assert not torch.allclose(got[name], initial[name]), name
    final = json.loads((run / "metrics.json").read_text())
    assert final["val/auc"] == pytest.approx(metrics["val/auc"], abs=1e-4)
    scalars = read_scalars(run)
    for tag in ("train/loss", "throughput/samples_per_s", "time/lookup_ms", "val/auc", "val/logloss",
                "server0/lookups_per_s", "server0/rows_updated_per_s", "hparam/val/auc"):
        assert tag in scalars, (tag, sorted(scalars))
    assert [step for step, _ in scalars["val/auc"]] == [12]  # 25 steps an epoch, max_steps=12
    assert [step for step, _ in scalars["train/loss"]] == [4, 8, 12]
    sharding = cfg.hybrid.sharding
    assert f"hybrid (sync, {sharding} sharding): {cfg.hybrid.servers} server(s)" in (run / "rank0.log").read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_async_hybrid_trains_to_within_0_02_auc_of_sync(tmp_path):
    overrides = ["experiment=dlrm_synthetic", "hybrid.sync=false"]
    run = tmp_path / "run"
    ok(launch(overrides, run, NPROC="4", timeout=280))
    cfg = compose(overrides)
    _, sync = train_clicks_locally(cfg, batch_size=2 * cfg.trainer.batch_size)  # what sync reaches
    final = json.loads((run / "metrics.json").read_text())
    assert final["val/auc"] >= sync["val/auc"] - 0.02, (final, sync)
    assert "hybrid (async, table sharding)" in (run / "rank0.log").read_text()
    # DDP's all-reduce keeps two trainers within a step: a trainer's lookup may precede the
    # other's previous update and its own update follow the other's current one, so at most 2.
    assert {value for _, value in read_scalars(run)["server0/max_staleness"]} <= {0.0, 1.0, 2.0}


@pytest.mark.timeout(120)
def test_a_bad_hybrid_setting_is_one_line_and_exit_2_before_any_rank_starts(tmp_path):
    # Every refused setting is checked in tests/unit/test_hybrid_config.py; this is the launch's path.
    result = launch(["experiment=dlrm_synthetic", "hybrid.servers=3"], tmp_path / "run", NPROC="4")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "hybrid.servers=3 leaves no trainer in a world of 4" in errors[0]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_raising_trainer_fails_the_job_naming_it(tmp_path):
    hook = "hybrid.step_hook={_target_:helpers.faults.FailAt,trainer:1,step:5}"
    result = launch([*SHORT, hook], tmp_path / "run", NPROC="4")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: worker3 (hybrid trainer 1) failed: RuntimeError: injected fault at step 5")
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_non_finite_loss_is_one_line_naming_the_trainer_and_the_gradient_that_made_it(tmp_path):
    # Trainer 1's backward at step 3 is poisoned: step 3's update, every trainer's gradient
    # averaged (sync), sends NaN into the dense part and the rows, and step 4's loss is NaN.
    hook = "hybrid.step_hook={_target_:helpers.faults.NanGradientAt,trainer:1,step:3}"
    result = launch([*SHORT, hook], tmp_path / "run", NPROC="4")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert re.fullmatch(r"error: worker(2|3) \(hybrid trainer (0|1)\) failed: FloatingPointError: non-finite loss "
                        r"\(nan\) at step 4 of hybrid trainer \2, on parameters last updated by step 3's gradient "
                        r"\(every trainer's, averaged\); lower optim.lr or hybrid.embedding_lr", errors[0]), errors
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stopped_embedding_server_fails_the_job_within_the_rpc_timeout_naming_it(tmp_path, job_factory):
    run = tmp_path / "run"
    job = job_factory(["experiment=dlrm_synthetic", "trainer.epochs=50", "runtime.rpc_timeout_s=5"], run, NPROC="4")
    job.wait_for_log("epoch 1 (step")
    code, elapsed = job.stop_rank_until_exit(1)
    assert code != 0
    errors = [line for line in job.stderr_text().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, job.output()
    # A lookup that timed out names the server; so does a backward that timed out waiting for it.
    assert re.search(r"(on worker1 \(embedding server 0\) failed|worker1 \(embedding server 0\) does not answer)",
                     errors[0]), errors
    assert elapsed < 35, elapsed


RESUMABLE = ["experiment=dlrm_synthetic", "data.size=4000", "trainer.batch_size=64", "trainer.log_every=4",
             "trainer.epochs=2"]  # 25 steps an epoch, row-wise Adagrad and momentum: state to restore


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_resumed_mid_epoch_ends_bit_for_bit_where_an_uninterrupted_one_ends(tmp_path):
    whole, first, second = tmp_path / "whole", tmp_path / "first", tmp_path / "second"
    ok(launch(RESUMABLE, whole, NPROC="4"))
    ok(launch([*RESUMABLE, "trainer.max_steps=12"], first, NPROC="4"))  # its final checkpoint: step 12, mid-epoch
    assert (first / "checkpoints" / "step_12" / "manifest.json").exists()
    ok(launch([*RESUMABLE, f"checkpoint.resume={first}"], second, NPROC="4"))
    assert "resumed from" in (second / "rank0.log").read_text()
    got, want = (torch.load(run / "model.pt", weights_only=True) for run in (second, whole))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[name], want[name]) for name in want), [n for n in want if not torch.equal(got[n], want[n])]
    assert [step for step, _ in read_scalars(second)["train/loss"]][0] == 16  # it went on from step 12


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_checkpoint_of_one_server_by_table_loads_into_two_servers_by_row(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    sgd = [*RESUMABLE, "hybrid.embedding_optim=sgd"]
    ok(launch([*sgd, "trainer.max_steps=12"], first, NPROC="4"))
    # A few steps past the checkpoint: what differs after them is the loaded state, not rounding.
    resharded = [*sgd, "hybrid.servers=2", "hybrid.sharding=row", "trainer.max_steps=16"]
    ok(launch([*resharded, f"checkpoint.resume={first}"], second, NPROC="5"))
    cfg = compose([*sgd, "trainer.max_steps=16"])
    want, _ = train_clicks_locally(cfg, batch_size=2 * cfg.trainer.batch_size)  # two trainers both times
    assert_same_state(torch.load(second / "model.pt", weights_only=True), want)
    manifest = json.loads((second / "checkpoints" / "step_16" / "manifest.json").read_text())
    assert manifest["layout"] == {"servers": 2, "trainers": 2, "sharding": "row", "samples_per_step": 128}
    assert "embeddings.0.weight@0:250" in manifest["tensors"] and "embeddings.0.weight@250:500" in manifest["tensors"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_hung_trainer_fails_the_job_within_the_rpc_timeout_naming_it(tmp_path):
    hook = "hybrid.step_hook={_target_:helpers.faults.FailAt,trainer:1,step:5,stall:true}"
    started = time.monotonic()
    result = launch([*SHORT, hook, "runtime.rpc_timeout_s=5"], tmp_path / "run", NPROC="4")
    elapsed = time.monotonic() - started
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("error: worker3 (hybrid trainer 1) stopped in its step hook after step 4: "
                                "worker2 (hybrid trainer 0) timed out waiting ("), errors
    assert elapsed < 90, elapsed  # start-up, 5 s of timeout, the stop


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_lone_trainer_that_hangs_fails_the_job_naming_it(tmp_path):
    # One trainer: no peer's all-reduce times out for it; the driver's watch has to.
    hook = "hybrid.step_hook={_target_:helpers.faults.FailAt,trainer:0,step:5,stall:true}"
    result = launch([*SHORT, hook, "runtime.rpc_timeout_s=4"], tmp_path / "run", NPROC="3")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0] == ("error: worker2 (hybrid trainer 0) made no step for 8 s (1.5 x runtime.rpc_timeout_s + 2 s): "
                         "stopped in its step hook after step 4"), errors


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resuming_with_another_step_size_is_one_line_naming_both(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    ok(launch([*RESUMABLE, "trainer.max_steps=12"], first, NPROC="4"))
    result = launch([*RESUMABLE, "trainer.batch_size=32", f"checkpoint.resume={first}"], second, NPROC="4")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    # Found after the world started: the driver's one line, and torchrun's non-zero exit.
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert "written with 128 samples a step (trainers x trainer.batch_size), this run takes 64" in errors[0]
