"""Bad input: one clear line, a non-zero exit on every rank within seconds, never a hang."""

import os
import subprocess
import sys
import time

import pytest
import torch

from helpers.launching import launch, REPO
from rpc_train.runtime.local_world import free_port

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("args, env, needle", [
    (["pipeline.micro_batches=0"], {}, "pipeline.micro_batches=0"),
    (["pipeline.micro_batches=-2"], {}, "pipeline.micro_batches=-2"),
    (["pipeline.stages=3"], {}, "pipeline.stages=3"),
    ([], {"NPROC": "1"}, "NPROC"),
    ([], {"NPROC": "two"}, "NPROC=two"),
    (["pipeline.micro_batches=12", "trainer.batch_size=8"], {}, "trainer.batch_size=8"),
    (["model=transformer"], {}, "model=transformer is not a known model; choose one of: convnet, dlrm, gpt, mlp"),
    (["pipeline.micro_batch=4"], {}, "pipeline.micro_batch is not a setting"),
    (["trainer.epochs=two"], {}, "trainer.epochs=two"),
    (["data=mnist", "data.root=/nonexistent"], {}, "data.download=true"),
    (["device=cuda"], {}, "device=cuda"),
])
def test_launcher_rejects_bad_input_in_one_line(tmp_path, args, env, needle):
    started = time.monotonic()
    result = launch(args, tmp_path / "run", timeout=60, **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("override, needle", [
    ("pipeline.micro_batches=0", "error: pipeline.micro_batches=0: must be a positive integer"),
    # Checked before the device maps are built: they divide by the GPU count.
    pytest.param("device=cuda", "error: device=cuda: no CUDA device is visible to torch on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_every_rank_refuses_a_bad_value_even_without_the_launcher(tmp_path, override, needle):
    """torchrun straight at the entry point: each rank validates before it joins RPC."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
           "-m", "rpc_train.train", f"hydra.run.dir={tmp_path}", override]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert result.stderr.count(needle) == 1, result.stderr[-3000:]
    assert "ZeroDivisionError" not in result.stderr, result.stderr[-3000:]
    # Every rank fails: with exit 2, or with torchrun's SIGTERM once another rank has failed.
    codes = [line.split(":")[1].split()[0] for line in result.stderr.splitlines()
             if line.strip().startswith("exitcode")]
    assert len(codes) == 3 and set(codes) <= {"2", "-15"} and "2" in codes, result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_each_machine_says_why_its_ranks_refuse(tmp_path):
    """Two torchrun nodes on loopback, straight at the entry point: a machine without a GPU is
    named on that machine's console too, not only on the driver's (whose machine may be fine)."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def node(rank: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
               "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
               "-m", "rpc_train.train", f"hydra.run.dir={tmp_path}", "device=cuda"]
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    nodes = [node(0), node(1)]
    outputs = [node.communicate(timeout=90)[1] for node in nodes]
    needle = "error: device=cuda: no CUDA device is visible to torch on this machine"
    assert all(node.returncode != 0 for node in nodes), outputs
    assert [out.count(needle) for out in outputs] == [1, 1], "\n".join(out[-2000:] for out in outputs)


def test_a_failing_worker_ends_the_job_with_its_traceback(tmp_path):
    started = time.monotonic()
    # A string learning rate passes composition (optimizer configs are free-form) and breaks
    # inside torch.optim on each stage worker: the remote traceback must reach the console.
    result = launch(["experiment=smoke", "optim.lr=fast"], tmp_path / "run", timeout=90)
    assert result.returncode != 0
    assert "stage.py" in result.stderr and "TypeError" in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - started < 60


def test_a_driver_error_found_at_run_time_stops_every_rank(tmp_path):
    # The layer counts are checked against the model only once the driver has built it.
    result = launch(["experiment=smoke", "pipeline.balance=[1,1]"], tmp_path / "run", timeout=90)
    assert result.returncode != 0
    assert "error: pipeline.balance=[1, 1]: need 2 positive layer counts summing to 5" in result.stderr
    assert "exitcode  : 2" in result.stderr  # the driver's own exit is the root cause
