"""Where each rank runs, and the TensorPipe device maps that let activations go GPU to GPU."""

import os
import threading
from contextlib import nullcontext
from typing import Dict, Optional, Sequence

import torch

from rpc_train.config.errors import ConfigError
from rpc_train.runtime.world import worker_name

_thread = threading.local()


def check_device(device: str) -> None:
    """device=cuda on a machine without one is an error, never a silent fall-back to CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA device is visible to torch on this machine "
                          "(torch.cuda.is_available() is False); use device=cpu")


def local_device(device: str, local_rank: int, gpus: int) -> str:
    """A rank's device: the CPU, or GPU (local rank mod the GPUs of its own machine).

    Each machine's ranks share that machine's GPUs round-robin, whatever the other machines
    have: the driver (local rank 0) takes cuda:0, and nodes with different GPU counts work.
    """
    if device == "cpu":
        return "cpu"
    if gpus < 1:  # the one-line error, not a ZeroDivisionError
        raise ConfigError(f"device={device}: this machine has no GPU (local rank {local_rank}); use device=cpu")
    return f"cuda:{local_rank % gpus}"


def own_device(device: str) -> str:
    """This process's device, from its own LOCAL_RANK and its own machine's GPU count."""
    check_device(device)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    return local_device(device, int(os.environ.get("LOCAL_RANK", 0)), gpus)


def mps_running() -> bool:
    """Whether an NVIDIA MPS control daemon is up: `nvidia-cuda-mps-control -d` leaves a
    `control` pipe in CUDA_MPS_PIPE_DIRECTORY (default /tmp/nvidia-mps), and CUDA clients
    started afterwards share one GPU context through it."""
    return os.path.exists(os.path.join(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"), "control"))


def shared_gpu_note(device: str, processes: int, gpus: int, mps: bool) -> Optional[str]:
    """What to tell a user whose GPU processes on this machine (the driver and its stages)
    share a GPU without MPS, else None.

    Without MPS each process has its own context and the GPU time-slices between them: every
    cross-process hand-off (activations through CUDA IPC, events waited on by another
    process) then waits for a time slice, which multiplies the step (docs/benchmarks.md,
    "On a GPU", has the figures with and without MPS).
    """
    if device != "cuda" or mps or processes <= gpus:
        return None
    return (f"{processes} processes (the driver and stages) share {gpus} GPU(s) without NVIDIA MPS, so the GPU "
            "time-slices between them (several times slower steps: docs/benchmarks.md); start MPS first "
            "with `nvidia-cuda-mps-control -d` (README, 'CPU and GPU')")


def chain_device_maps(devices: Sequence[str], rank: int, stage_ranks: Sequence[int]) -> Dict[str, Dict[str, str]]:
    """This rank's map to the next rank on the chain, from every rank's reported device:
    tensors sent there land on its GPU.

    The driver (rank 0) sends batches to stage 0 (`stage_ranks[0]`), stage k's activations go
    to stage k+1, up to the last stage. Replies and the backward's gradient messages use the
    reverse maps. A CPU on either end, or a rank off the chain (a data worker), needs no map.
    """
    chain = [0, *stage_ranks]
    if rank not in chain[:-1]:
        return {}
    after = chain[chain.index(rank) + 1]
    if "cpu" in (devices[rank], devices[after]):
        return {}
    return {worker_name(after): {devices[rank]: devices[after]}}


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
