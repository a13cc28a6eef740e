"""A worker's share of a checkpoint, keyed by parameter name so that any layout can load it.

Each file holds the tensors (parameters and buffers) one worker owns, named as in the full
`models/` class; its optimizer state with parameters re-keyed from position to name; its LR
scheduler state; and its RNG state. A worker of another layout (3 stages where 2 saved, or a
parameter-server shard) reads every file that holds a name it owns (the manifest's `tensors`
maps name -> file) and keeps just those names.
"""

import os
from typing import Any, Dict, Iterable, Optional, Sequence

import torch

from rpc_train.checkpoint.store import load_file, name_list, save_file
from rpc_train.config.errors import ConfigError


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: Sequence[str]) -> Dict[str, Any]:
    """`optimizer.state_dict()` with each parameter's position replaced by its name."""
    state = optimizer.state_dict()
    return {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                         for group in state["param_groups"]],
    }


def optimizer_state_for(optimizer: torch.optim.Optimizer, names: Sequence[str],
                        shares: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """A state_dict for `optimizer` (over parameters `names`, in order), picked by name from
    the saved shares. Group hyper-parameters (lr, momentum, ...) come from the saved group
    that held the group's first parameter."""
    state: Dict[str, Any] = {}
    group_of: Dict[str, dict] = {}
    for share in shares:
        state.update(share["state"])
        for group in share["param_groups"]:
            group_of.update({name: group for name in group["params"]})
    groups = []
    for group in optimizer.state_dict()["param_groups"]:
        saved = group_of.get(names[group["params"][0]]) if group["params"] else None
        groups.append({**(saved or group), "params": group["params"]})
    return {"state": {i: state[name] for i, name in enumerate(names) if name in state},
            "param_groups": groups}


def save_worker_state(directory: str, filename: str, tensors: Dict[str, torch.Tensor],
                      optimizer: Optional[torch.optim.Optimizer], param_names: Sequence[str],
                      scheduler: Optional[Any], owner: Any) -> Dict[str, Any]:
    """Write one worker's share to `directory/filename`; returns its record for the manifest.

    A worker without parameters (a stage of pooling layers, a shard of buffers) has no
    optimizer: its share records an empty optimizer state.

    `owner` says what the worker held (a stage's layer range, a shard id): the RNG state is
    restored only into a worker that holds exactly the same thing.
    """
    payload = {
        "owner": owner,
        "tensors": {name: t.detach().cpu() for name, t in tensors.items()},
        "optimizer": (optimizer_state_by_name(optimizer, param_names) if optimizer is not None
                      else {"state": {}, "param_groups": []}),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": torch.get_rng_state(),
    }
    digest = save_file(os.path.join(directory, filename), payload)
    return {"file": filename, "sha256": digest,
            "tensors": {name: list(t.shape) for name, t in tensors.items()}}


def load_worker_state(directory: str, index: Dict[str, str], tensor_names: Iterable[str],
                      optimizer: Optional[torch.optim.Optimizer], param_names: Sequence[str],
                      scheduler: Optional[Any], owner: Any) -> Dict[str, torch.Tensor]:
    """Set the optimizer, scheduler (and, same owner only, RNG) state from the files holding
    `tensor_names`; returns those tensors by name for the caller to load into its module.
    `optimizer` is None exactly when `param_names` is empty (a stage of parameter-free layers)."""
    wanted = list(tensor_names)
    missing = [name for name in wanted if name not in index]
    if missing:
        raise ConfigError(f"checkpoint {directory} lacks {len(missing)} tensors this worker needs: "
                          f"{name_list(missing)}")
    files = sorted({index[name] for name in wanted})
    shares = {f: load_file(os.path.join(directory, f)) for f in files}
    tensors = {name: shares[index[name]]["tensors"][name] for name in wanted}
    if param_names:
        saved = [share["optimizer"] for share in shares.values()]
        optimizer.load_state_dict(optimizer_state_for(optimizer, param_names, saved))
    first = shares[index[param_names[0]]] if param_names else None
    if scheduler is not None and first is not None and first["scheduler"] is not None:
        # Every worker steps its scheduler once per optimizer step, so any share's state fits.
        scheduler.load_state_dict(first["scheduler"])
    same_owner = [s for s in shares.values() if s["owner"] == owner]
    if same_owner:
        torch.set_rng_state(same_owner[0]["rng"])
    return tensors

