"""What is served: a trained run's model, rebuilt from its own config and loaded from model.pt.

`serve.run` names the run directory; without it, the newest run under outputs/ that has a
model.pt is served (`serve.models` names several). The model comes from the run's
`.hydra/config.yaml` (its `model` and `data` groups), so it is the class and shape that were
trained, whatever the serving job's own config says; model.pt loads with `weights_only=True`,
which never runs pickled code. A mode=hybrid run is its DLRM, served whole: dense features and
categorical indices in, the click logit out. A GPT run (a model with a KV-cache `decode`) is
served as a text generator (serve/generation.py).

The front end reads model.pt once (`read_weights`): the bytes it hashes are the bytes whose
tensors every replica is sent, so the response cache's digest names what computed the answer.
"""

import glob
import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf
from torch import nn

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
    shape: List[int]  # one input row (the DLRM's: its dense features)
    num_classes: int
    table_rows: List[int] = field(default_factory=list)  # a DLRM's tables' sizes; empty: a classifier
    generative: bool = False  # a model with a KV-cache `decode` (a GPT): it is served as a text generator

    @property
    def is_dlrm(self) -> bool:
        return bool(self.table_rows)

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
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    tables = list(cfg.data.table_rows) if cfg.mode.name == "hybrid" else []
    return ServedModel(run_dir=run_dir, name=model_name or _model_option(run_dir, model_cfg), model_cfg=model_cfg,
                       seed=int(cfg.seed), shape=list(cfg.data.shape), num_classes=int(cfg.data.num_classes),
                       table_rows=[int(rows) for rows in tables], generative=_generative(model_cfg))


def _generative(model_cfg: dict) -> bool:
    """The model class has an incremental `decode` (models/gpt.py): text in, text out."""
    from hydra.utils import get_class

    try:
        return callable(getattr(get_class(model_cfg["_target_"]), "decode", None))
    except Exception:  # noqa: BLE001 - not a class (a factory function): build_model says what is wrong
        return False


def sample_input(served: ServedModel):
    """One row of what the model takes, zeros: a GPT's is a window of byte indices."""
    if served.generative:
        return torch.zeros(1, *served.shape, dtype=torch.int64)
    return torch.zeros(1, *served.shape)


def served_models(conf) -> Dict[str, ServedModel]:
    """The models serve.* names, by name: `serve.models`, or the one of serve.run / the newest run."""
    if not conf.models:
        served = served_model(conf.run, conf.model_name)
        return {served.name: served}
    return {name: served_model(str(run), str(name)) for name, run in conf.models.items()}


def _model_option(run_dir: str, model_cfg: dict) -> str:
    """The `model=` option the run was trained with (Hydra records it), e.g. mlp or resnet18."""
    choices_path = os.path.join(run_dir, CHOICES_FILE)
    if os.path.isfile(choices_path):
        choice = OmegaConf.load(choices_path).hydra.runtime.choices.get("model")
        if choice:
            return str(choice)
    return model_cfg["_target_"].split(".")[-2]  # models.<file>.<Class>


def read_weights(served: ServedModel) -> Tuple[str, Dict[str, torch.Tensor]]:
    """(sha256 of model.pt's bytes, the state dict loaded from those same bytes), read once."""
    try:
        with open(served.weights, "rb") as f:
            data = f.read()
    except FileNotFoundError as err:
        raise ConfigError(f"serve.run={served.run_dir}: no {MODEL_FILE} there") from err
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: say which
        raise ConfigError(f"serve.run={served.run_dir}: {MODEL_FILE} is not a state dict torch can load "
                          f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})") from err
    return hashlib.sha256(data).hexdigest(), state


def load_state(served: ServedModel) -> Dict[str, torch.Tensor]:
    return read_weights(served)[1]


class ClickLogits(nn.Module):
    """A DLRM as served: (dense, sparse) -> its click logit, one column ([rows, 1])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.model(dense, sparse).unsqueeze(1)


def build_served(served: ServedModel, state: Optional[Dict[str, torch.Tensor]] = None, strict: bool = True):
    """The trained model in eval mode, loaded with `state` (default: its model.pt); a ConfigError
    naming the run when the weights do not fit it. A DLRM comes wrapped in `ClickLogits`."""
    if served.is_dlrm:
        from rpc_train.hybrid.model import build_dlrm  # the hybrid mode's builder: a DLRM is not a Sequential

        model = build_dlrm(served.model_cfg, served.seed)
    else:
        model = build_model(served.model_cfg, served.seed)
    try:
        model.load_state_dict(load_state(served) if state is None else state, strict=strict)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ConfigError(f"serve.run={served.run_dir}: {MODEL_FILE} does not match the model in its "
                          f"{CONFIG_FILE} ({first[1].strip() if len(first) > 1 else first[0]}); serve a run "
                          "whose files belong together") from err
    return (ClickLogits(model) if served.is_dlrm else model).eval()
