"""The DLRM as mode=hybrid splits it: tables on the servers, the dense part on the trainers.

`build_dlrm` builds the plain `models/dlrm.py` model from its config and the seed, so every
process holds the same initial values; a server keeps its rows of the tables, a trainer the
`DenseArch` (bottom MLP, interaction, top MLP), which DDP replicates.
"""

from typing import List

import torch
from hydra.utils import instantiate
from torch import nn


def build_dlrm(model_cfg: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = instantiate(model_cfg)
    for attr in ("embeddings", "dense_forward", "table_rows", "embedding_dim"):
        if not hasattr(model, attr):
            raise TypeError(f"{model_cfg.get('_target_')} has no `{attr}`: mode=hybrid needs a DLRM-style model "
                            "(models/dlrm.py) whose tables it can shard")
    return model


class DenseArch(nn.Module):
    """Everything of the model but its tables: what each trainer holds and DDP wraps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model.embeddings = nn.ModuleList()  # the servers hold them; a trainer keeps no copy
        self.model = model

    def forward(self, dense: torch.Tensor, pooled: List[torch.Tensor]) -> torch.Tensor:
        return self.model.dense_forward(dense, pooled)

    def plain_state_dict(self) -> dict:
        """The dense parameters named as in the plain model (`bottom.0.weight`, ...)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
