"""Spread a model's tensors over the parameter servers, balanced by size."""

import heapq
from typing import Dict, List, Mapping

from torch import nn

from rpc_train.config.errors import ConfigError


def tensor_sizes(model: nn.Module) -> Dict[str, int]:
    """Elements of every parameter and buffer, by the name `state_dict` gives it.

    Buffers (batch-norm statistics) are sharded with the parameters so that the servers
    together hold the whole state: the driver validates and saves the model from them.
    """
    return {name: tensor.numel() for name, tensor in model.state_dict().items()}


def shard_by_size(sizes: Mapping[str, int], servers: int) -> List[List[str]]:
    """Names per server: largest tensor first, each onto the least-loaded server so far.

    Greedy "longest processing time first": the fullest server ends at most 4/3 of the best
    possible split, and usually much closer, since the big weights go out first and the small
    ones fill the gaps. Deterministic: equal sizes keep model order, equal loads take the
    lowest server. Each shard lists its names in model order.
    """
    names = list(sizes)
    if servers < 1:
        raise ValueError(f"servers={servers}: need at least one")
    if servers > len(names):
        raise ConfigError(f"ps.servers={servers}: the model has only {len(names)} tensors to "
                          f"spread over them; use ps.servers<={len(names)}")
    loads = [(0, server) for server in range(servers)]  # a heap of (elements held, server)
    owner: Dict[str, int] = {}
    for index in sorted(range(len(names)), key=lambda i: (-sizes[names[i]], i)):
        load, server = heapq.heappop(loads)
        owner[names[index]] = server
        heapq.heappush(loads, (load + sizes[names[index]], server))
    return [[name for name in names if owner[name] == server] for server in range(servers)]
