"""The data service for real: data workers on torchrun ranks, decoding real JPEG files, and
consumers pulling batches from them over RPC (loader=service)."""

import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from helpers.datasets import write_corrupt_image, write_imagefolder
from helpers.events import read_scalars
from helpers.launching import REPO, launch, launch_env, ok
from helpers.loader_hooks import by_consumer, read_ids
from rpc_train.runtime.local_world import free_port

pytestmark = pytest.mark.timeout(240)

# 36 JPEGs in 3 classes: 32 train (4 batches of 8 an epoch) and 4 validation samples.
IMAGES = ["data=imagefolder", "data.num_classes=3", "data.image_size=16", "trainer.batch_size=8",
          "trainer.epochs=3", "trainer.log_every=2", "pipeline.micro_batches=2"]


def service(workers: int) -> list:
    return ["loader=service", f"loader.workers={workers}"]


def record(path, **kwargs) -> str:
    extra = "".join(f",{k}:{v}" for k, v in kwargs.items())
    return f"loader.batch_hook={{_target_:helpers.loader_hooks.RecordIds,path:{path}{extra}}}"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_imagefolder(str(root), classes=3, per_class=12, size=(40, 32))
    return root


def run(images, tmp_path, name: str, args: list, nproc: int, **env):
    """Launch the image job; (run dir, the ids it trained on, by consumer)."""
    run_dir, ids = tmp_path / name, tmp_path / f"{name}.ids"
    result = launch([*IMAGES, f"data.root={images}", *args, record(ids)], run_dir, NPROC=str(nproc), **env)
    ok(result)
    return run_dir, by_consumer(ids), result


def assert_same_losses(a, b) -> None:
    got, want = read_scalars(a)["train/loss"], read_scalars(b)["train/loss"]
    assert [s for s, _ in got] == [s for s, _ in want]
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in want]),
                               rtol=0, atol=1e-6)


def test_two_workers_and_their_store_give_the_batches_and_losses_of_one_process(images, tmp_path):
    epochs = ["trainer.log_every=4"]  # each logged window is one epoch (4 batches)
    local_dir, local_ids, _ = run(images, tmp_path, "local", epochs, 3)
    served_dir, served_ids, _ = run(images, tmp_path, "served", [*epochs, *service(2), "loader.cache_mb=8"], 5)
    assert served_ids == local_ids and len(local_ids["driver"]) == 12  # 3 epochs of 4 batches
    assert_same_losses(served_dir, local_dir)
    log = (served_dir / "rank0.log").read_text()
    assert "data service: 2 worker(s) on worker1, worker2, least_loaded routing" in log
    assert "pipeline: 2 stages on worker3, worker4" in log  # the stages come after the data workers
    scalars = read_scalars(served_dir)
    for tag in ("loader/input_wait_fraction", "loader/retries", "loader/worker0/samples_per_s",
                "loader/worker1/batches_per_s", "loader/worker0/queue_depth_max", "loader/worker1/cpu_s_per_sample"):
        assert tag in scalars, (tag, sorted(scalars))
    assert all(0 <= v <= 1 for _, v in scalars["loader/input_wait_fraction"])
    # Both workers made batches: least_loaded spreads a consumer's requests in flight.
    assert all(sum(v for _, v in scalars[f"loader/worker{i}/batches_per_s"]) > 0 for i in (0, 1))
    decoded = [sum(scalars[f"loader/worker{w}/decoded"][e][1] for w in (0, 1)) for e in range(3)]
    assert decoded == [36, 0, 0]  # every file once, in epoch 1 (train and validation), then none
    assert all(scalars[f"loader/worker{w}/cache_hit_rate"][-1][1] == 1.0 for w in (0, 1))
    held = sum(scalars[f"loader/worker{w}/store_mb"][-1][1] for w in (0, 1))
    assert held == pytest.approx(36 * 3 * 40 * 32 / 2 ** 20)  # each decoded uint8 image held once


@pytest.mark.slow
def test_one_worker_gives_the_same_batches_as_two_without_a_store(images, tmp_path):
    one_dir, one_ids, _ = run(images, tmp_path, "one", service(1), 4)
    two_dir, two_ids, _ = run(images, tmp_path, "two", service(2), 5)
    assert one_ids == two_ids
    assert_same_losses(one_dir, two_dir)


@pytest.mark.slow
def test_a_stopped_worker_leaves_the_rotation_and_no_batch_is_lost_or_repeated(images, tmp_path, job_factory):
    want_dir, want, _ = run(images, tmp_path, "undisturbed", service(2), 5)
    ids = tmp_path / "stopped.ids"
    job = job_factory([*IMAGES, f"data.root={images}", *service(2), "loader.timeout_s=2",
                       record(ids, delay_s=0.3)], tmp_path / "stopped", NPROC="5")
    while not ids.exists() or len(read_ids(ids)) < 2:
        assert job.proc.poll() is None, job.output()
        time.sleep(0.05)
    worker = job.rank_pid(1)  # data worker 0
    os.kill(worker, signal.SIGSTOP)
    try:
        job.wait_for_log("data worker worker1 left the rotation", timeout=30)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert job.proc.wait(timeout=120) == 0, job.output()
    assert by_consumer(ids) == want  # every batch once, in order, as if nothing had happened
    log = (job.run_dir / "rank0.log").read_text()
    assert log.count("left the rotation") == 1, log
    assert "data worker worker1 answers again and is back in the rotation" in log
    assert sum(v for _, v in read_scalars(job.run_dir)["loader/retries"]) >= 1


def broken_images(tmp_path):
    root = tmp_path / "broken"
    write_imagefolder(str(root), classes=3, per_class=12, size=(40, 32))
    return root, write_corrupt_image(str(root / "class1"), "img_corrupt.jpg")


@pytest.mark.slow
def test_a_file_that_does_not_decode_is_one_line_naming_it(tmp_path):
    root, bad = broken_images(tmp_path)
    started = time.monotonic()
    result = launch([*IMAGES, f"data.root={root}", *service(1), "trainer.epochs=1"], tmp_path / "run", NPROC="4")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and time.monotonic() - started < 90, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and bad in lines[0], output[-3000:]


@pytest.mark.slow
def test_a_skipped_file_is_skipped_alike_on_any_worker_count(tmp_path):
    root, bad = broken_images(tmp_path)
    args = ["loader.on_error=skip", "trainer.epochs=1"]
    local_dir, local_ids, local = run(root, tmp_path, "local", args, 3)
    served_dir, served_ids, served = run(root, tmp_path, "served", [*args, *service(2)], 5)
    assert served_ids == local_ids
    for result in (local, served):
        assert f"(loader.on_error=skip): {bad}" in result.stdout + result.stderr
    taken = [i for _, _, ids in served_ids["driver"] for i in ids]
    assert len(taken) == len(set(taken))  # no sample twice
    assert sum(v for _, v in read_scalars(served_dir)["loader/skipped_samples"]) >= 1


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_with_3_workers_or_in_process_goes_on_with_the_same_batches(images, tmp_path):
    full_dir, full, _ = run(images, tmp_path, "full", service(2), 5)
    half_dir, half, _ = run(images, tmp_path, "half", [*service(2), "trainer.max_steps=6"], 5)  # epoch 2, batch 2
    assert half["driver"] == full["driver"][:6]
    copy = tmp_path / "half_copy"
    shutil.copytree(half_dir, copy)
    for name, args, nproc, run_dir in [("three", service(3), 6, half_dir), ("local", [], 3, copy)]:
        ids = tmp_path / f"{name}.ids"
        ok(launch([*IMAGES, f"data.root={images}", *args, record(ids)], run_dir, NPROC=str(nproc)))
        assert by_consumer(ids)["driver"] == full["driver"][6:], name  # the next batch on, to the end
        resumed, want = read_scalars(run_dir)["train/loss"], read_scalars(full_dir)["train/loss"]
        torch.testing.assert_close(dict(resumed)[12], dict(want)[12], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_killed_job_restarts_at_the_next_batch_after_its_checkpoint(images, tmp_path):
    _, full, _ = run(images, tmp_path, "full", service(2), 5)
    ids = tmp_path / "killed.ids"
    # The driver dies taking batch 1 of epoch 2 (step 6); the newest checkpoint is step 4's.
    args = [*IMAGES, f"data.root={images}", *service(2), "checkpoint.every_steps=2",
            record(ids, kill_epoch=1, kill_index=1)]
    ok(launch(args, tmp_path / "killed", NPROC="5", MAX_RESTARTS="1"))
    rows = read_ids(ids)
    first, second = [r[2:] for r in rows if r[0] == 0], [r[2:] for r in rows if r[0] == 1]
    assert [(e, i) for e, i, _ in first] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert second[0][:2] == (1, 0)  # resumed after step 4: epoch 2's first batch again
    assert first[:4] + second == full["driver"]


@pytest.mark.slow
def test_parameter_server_trainers_pull_the_batches_they_would_load(images, tmp_path):
    ps = ["mode=parameter_server", "trainer.batch_size=4"]  # 2 trainers x 4 = the pipeline's batch of 8
    local_dir, local, _ = run(images, tmp_path, "local", ps, 4)
    served_dir, served, _ = run(images, tmp_path, "served", [*ps, *service(1)], 5)
    assert served == local and sorted(served) == ["trainer0", "trainer1"]
    assert_same_losses(served_dir, local_dir)
    assert "loader/input_wait_fraction" in read_scalars(served_dir)


@pytest.mark.slow
def test_hybrid_trainers_pull_click_rows_from_the_data_workers(tmp_path):
    hybrid = ["experiment=dlrm_synthetic", "data.size=2000", "trainer.max_steps=12", "trainer.batch_size=32"]
    ok(launch(hybrid, tmp_path / "local", NPROC="4"))
    ok(launch([*hybrid, *service(1)], tmp_path / "served", NPROC="5"))
    assert "loader/input_wait_fraction" in read_scalars(tmp_path / "served")
    want = torch.load(tmp_path / "local" / "model.pt", weights_only=True)
    got = torch.load(tmp_path / "served" / "model.pt", weights_only=True)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_data_workers_on_two_torchrun_nodes_over_loopback(images, tmp_path):
    # NNODES=2 x NPROC=3: the driver and data workers 1-2 on the first node to join, data
    # worker 3 and the two stages on the other: a worker answers from another agent's world.
    env = launch_env(tmp_path / "run", NNODES="2", NPROC="3", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}")
    args = [str(REPO / "launch.sh"), *IMAGES, f"data.root={images}", *service(3), "runtime.interface=lo"]
    nodes = [subprocess.Popen(args, cwd=REPO, env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=200)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    both = "".join(outputs)
    assert "data service: 3 worker(s) on worker1, worker2, worker3" in both
    assert "pipeline: 2 stages on worker4, worker5" in both
    assert all(sum(v for _, v in read_scalars(tmp_path / "run")[f"loader/worker{i}/batches_per_s"]) > 0
               for i in range(3))
