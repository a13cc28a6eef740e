"""device=cuda for real: stages on the GPU, activations and gradients through TensorPipe device maps.

Skipped on a machine without CUDA (CI has none); run them on a GPU machine with
`pytest tests/multiprocess/test_cuda.py`, or all of the GPU check with `python -m rpc_train.bench.gpu_check`
(docs/benchmarks.md, "On a GPU"). All stages share cuda:0 when there is one GPU.
"""

import re
import shutil
import subprocess

import pytest
import torch

from helpers.events import read_scalars
from helpers.launching import REPO, launch, launch_env, ok
from helpers.models import exported_model
from helpers.reference import initial_state, train_locally
from rpc_train.runtime.local_world import free_port

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = ["experiment=smoke", "trainer.epochs=1", "device=cuda"]
# GEMMs on different micro-batch shapes may pick different cuBLAS kernels: equal to rounding.
ATOL = 1e-4


@pytest.mark.parametrize("schedule, nproc", [("1f1b", 3), ("gpipe", 4)])
def test_a_cuda_pipeline_matches_single_gpu_training(tmp_path, schedule, nproc):
    overrides = STEPS + ["trainer.max_steps=6", f"pipeline.schedule={schedule}"]
    result = ok(launch(overrides, tmp_path / "run", NPROC=str(nproc)))
    assert "Warning" not in result.stderr, result.stderr[-3000:]
    piped, reference = exported_model(tmp_path / "run"), train_locally(overrides, "cuda")
    initial = initial_state(overrides)
    assert piped.keys() == reference.keys()
    moved = max((reference[name] - initial[name]).abs().max().item() for name in reference)
    assert moved > 100 * ATOL, "training barely moved the parameters: the comparison would prove nothing"
    for name, value in reference.items():
        torch.testing.assert_close(piped[name], value, rtol=0, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")
    scalars = read_scalars(tmp_path / "run")
    assert [step for step, _ in scalars["train/loss"]] == [5, 6]
    assert all(value > 0 for _, value in scalars["stage1/backward_ms"])


def test_ranks_of_two_nodes_take_their_gpu_by_local_rank_and_share_it(tmp_path):
    # NNODES=2 x NPROC=1 on loopback: the driver and the one stage are each local rank 0 of
    # their "machine", so both take cuda:0 whatever the GPU count, and their device maps come
    # from the ranks' exchange over the rendezvous (runtime/roles.py), not from one machine's view.
    overrides = STEPS + ["trainer.max_steps=6", "runtime.interface=lo"]
    env = launch_env(tmp_path / "run", NNODES="2", NPROC="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}")
    nodes = [subprocess.Popen([str(REPO / "launch.sh"), *overrides], cwd=REPO, env={**env, "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=200)[0] for node in nodes]
    finally:  # a node left waiting for its peer at the rendezvous
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    both = "".join(outputs)
    assert "pipeline: 1 stages on worker1" in both, both[-3000:]
    assert re.search(r"stage 0 \(pid \d+\) on cuda:0", both), both[-3000:]
    piped, reference = exported_model(tmp_path / "run"), train_locally(overrides, "cuda")
    assert piped.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(piped[name], value, rtol=0, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")


def test_a_cuda_run_resumes_from_its_checkpoint(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    ok(launch(STEPS + ["trainer.max_steps=10"], whole))
    ok(launch(STEPS + ["trainer.max_steps=4"], part))
    resumed = tmp_path / "resumed"
    shutil.copytree(part, resumed)
    result = ok(launch(STEPS + ["trainer.max_steps=10"], resumed))
    assert "resumed from" in result.stdout
    mine, theirs = exported_model(resumed), exported_model(whole)
    assert mine.keys() == theirs.keys()
    for name, value in theirs.items():
        torch.testing.assert_close(mine[name], value, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_cuda_replicas_answer_as_the_model_on_the_cpu(tmp_path):
    import tritonclient.grpc as triton

    from helpers.serving import ServingJob, digits_rows, triton_input
    from rpc_train.serve.source import build_served, served_model

    ok(launch(["experiment=smoke"], tmp_path / "trained"))
    with ServingJob(tmp_path / "trained", tmp_path / "serve", ["device=cuda"]) as job:
        rows = digits_rows(8)
        answer = triton.InferenceServerClient(job.url).infer("mlp", [triton_input(rows)]).as_numpy("logits")
        assert "on cuda:" in job.log(1)
    with torch.no_grad():
        expected = build_served(served_model(str(tmp_path / "trained"), None))(torch.from_numpy(rows)).numpy()
    torch.testing.assert_close(torch.from_numpy(answer), torch.from_numpy(expected), rtol=0, atol=ATOL)


def test_a_cuda_hybrid_trainer_matches_one_process_on_the_cpu(tmp_path):
    from rpc_train.config.compose import compose
    from rpc_train.hybrid.local import train_clicks_locally

    # One trainer: NCCL takes a GPU per trainer, and a lent machine may have one.
    overrides = ["experiment=dlrm_synthetic", "data.size=4000", "trainer.max_steps=8", "hybrid.embedding_optim=sgd",
                 "device=cuda"]
    result = ok(launch(overrides, tmp_path / "run", NPROC="3"))
    assert "samples on cuda:0" in result.stdout + result.stderr  # the trainer says where it trains
    want, _ = train_clicks_locally(compose([*overrides[:-1], "device=cpu"]))
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=ATOL, msg=lambda m, name=name: f"{name}: {m}")
