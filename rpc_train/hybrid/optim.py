"""The embedding shards' optimizers: only the rows a step touched change.

`sgd` is torch.optim.SGD, which applies a sparse gradient to the rows it names. Row-wise
Adagrad (the optimizer DLRM and TorchRec train tables with; torch has only the element-wise
one) keeps one accumulator a row, the running sum of the mean squared gradient of that row,
so its state costs one float a row instead of a copy of the table.
"""

from typing import Iterable

import torch

from rpc_train.config.errors import ConfigError
from rpc_train.config.schema import EMBEDDING_OPTIMS


class RowWiseAdagrad(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.01, eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for weight in group["params"]:
                if weight.grad is None:
                    continue
                state = self.state[weight]
                if not state:
                    state["sum"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
                grad = weight.grad.coalesce() if weight.grad.is_sparse else weight.grad.to_sparse(1).coalesce()
                rows, values = grad.indices()[0], grad.values()
                total = state["sum"].index_add_(0, rows, values.pow(2).mean(dim=1))[rows]
                weight.index_add_(0, rows, values / (total.sqrt() + group["eps"]).unsqueeze(1), alpha=-group["lr"])


def build_embedding_optimizer(name: str, params: list, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "rowwise_adagrad":
        return RowWiseAdagrad(params, lr=lr)
    raise ConfigError(f"hybrid.embedding_optim={name}: expected one of {', '.join(EMBEDDING_OPTIMS)}")
