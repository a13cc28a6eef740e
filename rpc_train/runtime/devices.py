"""Where each stage runs, and the TensorPipe device maps that let activations go GPU to GPU."""

import os
import threading
from contextlib import nullcontext
from typing import Dict, Optional

import torch

from rpc_train.config.errors import ConfigError

_thread = threading.local()


def check_device(device: str) -> None:
    """device=cuda on a machine without one is an error, never a silent fall-back to CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA device is visible to torch on this machine "
                          "(torch.cuda.is_available() is False); use device=cpu")


def stage_device(device: str, stage: int) -> str:
    """Stage k runs on cuda:(k mod #gpus), so K stages share the GPUs round-robin."""
    if device == "cpu":
        return "cpu"
    check_device(device)  # a GPU count of 0 must be the one-line error, not a ZeroDivisionError
    return f"cuda:{stage % torch.cuda.device_count()}"


def mps_running() -> bool:
    """Whether an NVIDIA MPS control daemon is up: `nvidia-cuda-mps-control -d` leaves a
    `control` pipe in CUDA_MPS_PIPE_DIRECTORY (default /tmp/nvidia-mps), and CUDA clients
    started afterwards share one GPU context through it."""
    return os.path.exists(os.path.join(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"), "control"))


def shared_gpu_note(device: str, num_stages: int, gpus: int, mps: bool) -> Optional[str]:
    """What to tell a user whose stage processes share a GPU without MPS, else None.

    Without MPS each process has its own context and the GPU time-slices between them: every
    cross-process hand-off (activations through CUDA IPC, events waited on by another
    process) then waits for a time slice, which multiplies the step (docs/benchmarks.md,
    "On a GPU", has the figures with and without MPS).
    """
    if device != "cuda" or mps or num_stages <= gpus:
        return None
    return (f"{num_stages} stages share {gpus} GPU(s) in separate processes without NVIDIA MPS, so the GPU "
            "time-slices between them (several times slower steps: docs/benchmarks.md); start MPS first "
            "with `nvidia-cuda-mps-control -d` (README, 'CPU and GPU')")


def driver_device(device: str) -> str:
    """With CUDA the driver keeps each batch, the logits and the loss on its first GPU.

    A batch then reaches stage 0 GPU to GPU (CUDA IPC on one machine), which is far faster
    than TensorPipe's CPU path for image batches (tens of MB a step).
    """
    return "cpu" if device == "cpu" else "cuda:0"


def pipeline_device_maps(device: str, stage, num_stages: int, next_worker: str) -> Dict[str, Dict[str, str]]:
    """This rank's map to the next rank on the chain: tensors sent there land on its GPU.

    The driver (`stage` None) sends micro-batches to stage 0, stage k activations to stage
    k+1. Replies (the last stage's output, back along the chain) and gradients in the backward
    pass use the reverse maps, so the logits reach the driver's GPU too.
    """
    if device == "cpu" or (stage is not None and stage + 1 >= num_stages):
        return {}
    here = driver_device(device) if stage is None else stage_device(device, stage)
    there = stage_device(device, 0 if stage is None else stage + 1)
    return {next_worker: {here: there}}


def bind_cuda_context(device: torch.device) -> None:
    """Make the GPU's primary context current on this thread, once per thread.

    RPC and micro-batch threads start without one, and cuBLAS then warns ("no current CUDA
    context") on a stage's first matmul; any CUDA runtime call binds it. A stream query is one
    that never waits: RPC threads first show up mid-run, and a synchronize there would stall
    the host until the GPU had drained. Stage work gets it through `on_device_stream`; the
    driver's threads call it directly.
    """
    if device.type == "cuda" and getattr(_thread, "bound", None) != device:
        torch.cuda.default_stream(device).query()
        _thread.bound = device


def on_device_stream(device: torch.device):
    """Run a stage's work on its GPU's default stream, after what the current stream queued.

    The RPC agent runs each request on a fresh stream from a pool (ready once the request's
    tensors are). A forward, the optimizer step that follows its backward and the next
    forward would then race on separate streams; on one stream they run in order. Tensors
    sent, or set on a Future naming the device, inside this block are recorded as ready on
    that stream; a plain return value is serialised after the block, so control calls that
    use this return CPU values only.
    """
    if device.type != "cuda":
        return nullcontext()
    return torch.cuda.stream(after_current_stream(device))


def after_current_stream(device: torch.device):
    """The GPU's default stream, made to wait for what this thread's current stream queued
    (an RPC request's stream: its tensors are ready on it). None for the CPU."""
    if device.type != "cuda":
        return None
    bind_cuda_context(device)
    stream = torch.cuda.default_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream
