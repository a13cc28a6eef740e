"""Where each stage runs, and the TensorPipe device maps that let activations go GPU to GPU."""

from typing import Dict

import torch

from rpc_train.errors import ConfigError


def check_device(device: str) -> None:
    """device=cuda on a machine without one is an error, never a silent fall-back to CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA device is visible to torch on this machine "
                          "(torch.cuda.is_available() is False); use device=cpu")


def stage_device(device: str, stage: int) -> str:
    """Stage k runs on cuda:(k mod #gpus), so K stages share the GPUs round-robin."""
    if device == "cpu":
        return "cpu"
    return f"cuda:{stage % torch.cuda.device_count()}"


def pipeline_device_maps(device: str, stage: int, num_stages: int, next_worker: str) -> Dict[str, Dict[str, str]]:
    """This stage's map to the next stage's worker: tensors sent there land on its GPU.

    Replies (and gradients in backward) use the reverse map. The driver has no map: the last
    stage hands it CPU tensors.
    """
    if device == "cpu" or stage + 1 >= num_stages:
        return {}
    return {next_worker: {stage_device(device, stage): stage_device(device, stage + 1)}}
