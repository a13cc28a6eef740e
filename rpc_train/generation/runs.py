"""A GPT run written without training: the files mode=serve and `rpc_train.generate` read.

For benchmarks and tests while no trained run is at hand: the speed of generation does not
depend on the weights, only on the model's shape. The run holds `.hydra/config.yaml` (the
`model` group, the `data` keys serving reads, as data=text has them) and the model.pt of a GPT
built with `seed`, as training would start it.
"""

import os
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from rpc_train.serve.source import CONFIG_FILE, MODEL_FILE
from rpc_train.training.builders import build_model

# experiment=gpt_text's model (the training side's preset): 4 blocks of 64 wide, 64 positions.
PRESET = {"context": 64, "dim": 64, "heads": 4, "layers": 4}


def write_untrained_run(run_dir: str, seed: int = 0, model: Optional[dict] = None) -> Path:
    model_cfg = {"_target_": "models.gpt.GPT", "vocab": 256, **PRESET, "dropout": 0.0, **(model or {})}
    cfg = {"seed": seed, "mode": {"name": "pipeline"}, "model": model_cfg,
           "data": {"name": "text", "shape": [model_cfg["context"]], "num_classes": model_cfg["vocab"]}}
    run = Path(run_dir)
    os.makedirs(run / ".hydra", exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), run / CONFIG_FILE)
    torch.save(build_model(model_cfg, seed).state_dict(), run / MODEL_FILE)
    return run
