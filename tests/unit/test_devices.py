"""Placement that needs no GPU to check: each rank's device, the device maps between them, is
MPS up, and when to say that it should be."""

import os

import pytest

from rpc_train.config.errors import ConfigError
from rpc_train.runtime.devices import chain_device_maps, local_device, mps_running, shared_gpu_note

pytestmark = pytest.mark.timeout(30)


def test_mps_is_seen_by_its_control_pipe(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert not mps_running()
    os.mkfifo(tmp_path / "control")  # what nvidia-cuda-mps-control -d creates
    assert mps_running()


def test_stages_sharing_a_gpu_without_mps_are_told_to_start_it():
    note = shared_gpu_note("cuda", processes=3, gpus=2, mps=False)
    assert note.startswith("3 processes (the driver and stages) share 2 GPU(s)") and "nvidia-cuda-mps-control -d" in note
    # Nothing to say: MPS is up, every stage has a GPU of its own, or there is no GPU at all.
    assert shared_gpu_note("cuda", processes=3, gpus=1, mps=True) is None
    assert shared_gpu_note("cuda", processes=3, gpus=3, mps=False) is None
    assert shared_gpu_note("cpu", processes=3, gpus=0, mps=False) is None


def test_each_rank_takes_a_gpu_of_its_own_machine_by_local_rank():
    assert [local_device("cuda", r, gpus=2) for r in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert local_device("cpu", 3, gpus=0) == "cpu"
    with pytest.raises(ConfigError, match=r"^device=cuda: this machine has no GPU \(local rank 1\)"):
        local_device("cuda", 1, gpus=0)


def test_device_maps_follow_what_each_rank_reports_across_unequal_machines():
    # Node A: 3 ranks (the driver and stages 0-1) on 2 GPUs; node B: 2 ranks (stages 2-3) on 1 GPU.
    devices = [local_device("cuda", r, 2) for r in range(3)] + [local_device("cuda", r, 1) for r in range(2)]
    assert devices == ["cuda:0", "cuda:1", "cuda:0", "cuda:0", "cuda:0"]
    maps = [chain_device_maps(devices, rank, [1, 2, 3, 4]) for rank in range(5)]
    assert maps == [{"worker1": {"cuda:0": "cuda:1"}}, {"worker2": {"cuda:1": "cuda:0"}},
                    {"worker3": {"cuda:0": "cuda:0"}}, {"worker4": {"cuda:0": "cuda:0"}}, {}]
    # With 2 stages the ranks after the last one host nothing and map nothing.
    assert chain_device_maps(devices, 2, [1, 2]) == {} and chain_device_maps(devices, 3, [1, 2]) == {}
    assert chain_device_maps(["cpu", "cpu", "cpu"], 0, [1, 2]) == {}
    # Data workers (ranks 1 and 2 here) are off the chain: the driver sends to stage 0 on rank 3.
    assert [chain_device_maps(devices, rank, [3, 4]) for rank in range(5)] == [
        {"worker3": {"cuda:0": "cuda:0"}}, {}, {}, {"worker4": {"cuda:0": "cuda:0"}}, {}]
