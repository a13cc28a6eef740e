"""What is served: a trained run's model, rebuilt from its own config and loaded from model.pt.

`serve.run` names the run directory; without it, the newest run under outputs/ that has a
model.pt is served. The model comes from the run's `.hydra/config.yaml` (its `model` and
`data` groups), so it is the class and shape that were trained, whatever the serving job's own
config says; model.pt loads with `weights_only=True`, which never runs pickled code.
"""

import glob
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf

from rpc_train.config.errors import ConfigError
from rpc_train.training.builders import build_model

MODEL_FILE = "model.pt"
CONFIG_FILE = os.path.join(".hydra", "config.yaml")
CHOICES_FILE = os.path.join(".hydra", "hydra.yaml")


@dataclass(frozen=True)
class ServedModel:
    run_dir: str
    name: str  # the model's name in the protocol
    model_cfg: dict  # the run's `model` group, a `_target_` config
    seed: int
    shape: List[int]  # one input row
    num_classes: int

    @property
    def weights(self) -> str:
        return os.path.join(self.run_dir, MODEL_FILE)


def newest_run(outputs: str = "outputs") -> str:
    """The run directory under `outputs` (outputs/DATE/TIME-XXXXXX) whose model.pt is newest."""
    found = glob.glob(os.path.join(outputs, "*", "*", MODEL_FILE))
    if not found:
        raise ConfigError(f"mode=serve: no trained run under {os.path.abspath(outputs)} (no */*/{MODEL_FILE}); "
                          "train one first (./launch.sh), or name one with serve.run=<run dir>")
    return os.path.dirname(max(found, key=os.path.getmtime))


def served_model(run: Optional[str], model_name: Optional[str]) -> ServedModel:
    """The run `serve.run` names (or the newest), read and checked; a one-line ConfigError if unusable."""
    run_dir = os.path.expanduser(run) if run else newest_run()
    for needed in (MODEL_FILE, CONFIG_FILE):
        if not os.path.isfile(os.path.join(run_dir, needed)):
            raise ConfigError(f"serve.run={run_dir}: no {needed} there; give a run directory that training "
                              f"wrote (it holds {MODEL_FILE} and {CONFIG_FILE})")
    cfg = OmegaConf.load(os.path.join(run_dir, CONFIG_FILE))
    if cfg.mode.name == "hybrid":
        # Its input is dense features and categorical indices, two tensors the served protocol's one does not carry.
        raise ConfigError(f"serve.run={run_dir}: a mode=hybrid run (a DLRM); serving takes image and digits models "
                          "only; give a run of mode=pipeline or mode=parameter_server")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    return ServedModel(run_dir=run_dir, name=model_name or _model_option(run_dir, model_cfg), model_cfg=model_cfg,
                       seed=int(cfg.seed), shape=list(cfg.data.shape), num_classes=int(cfg.data.num_classes))


def _model_option(run_dir: str, model_cfg: dict) -> str:
    """The `model=` option the run was trained with (Hydra records it), e.g. mlp or resnet18."""
    choices_path = os.path.join(run_dir, CHOICES_FILE)
    if os.path.isfile(choices_path):
        choice = OmegaConf.load(choices_path).hydra.runtime.choices.get("model")
        if choice:
            return str(choice)
    return model_cfg["_target_"].split(".")[-2]  # models.<file>.<Class>


def load_state(served: ServedModel) -> Dict[str, torch.Tensor]:
    return torch.load(served.weights, map_location="cpu", weights_only=True)


def build_served(served: ServedModel):
    """The trained model in eval mode; a ConfigError naming the run when model.pt does not fit it."""
    model = build_model(served.model_cfg, served.seed)
    try:
        model.load_state_dict(load_state(served))
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ConfigError(f"serve.run={served.run_dir}: {MODEL_FILE} does not match the model in its "
                          f"{CONFIG_FILE} ({first[1].strip() if len(first) > 1 else first[0]}); serve a run "
                          "whose files belong together") from err
    return model.eval()
