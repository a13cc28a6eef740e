"""Placement advice that needs no GPU to check: is MPS up, and when to say that it should be."""

import os

import pytest

from rpc_train.runtime.devices import mps_running, shared_gpu_note

pytestmark = pytest.mark.timeout(30)


def test_mps_is_seen_by_its_control_pipe(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert not mps_running()
    os.mkfifo(tmp_path / "control")  # what nvidia-cuda-mps-control -d creates
    assert mps_running()


def test_stages_sharing_a_gpu_without_mps_are_told_to_start_it():
    note = shared_gpu_note("cuda", num_stages=2, gpus=1, mps=False)
    assert note.startswith("2 stages share 1 GPU(s)") and "nvidia-cuda-mps-control -d" in note
    # Nothing to say: MPS is up, every stage has a GPU of its own, or there is no GPU at all.
    assert shared_gpu_note("cuda", num_stages=2, gpus=1, mps=True) is None
    assert shared_gpu_note("cuda", num_stages=2, gpus=2, mps=False) is None
    assert shared_gpu_note("cpu", num_stages=2, gpus=0, mps=False) is None
