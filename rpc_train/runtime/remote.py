"""Calls on several remote objects at once: every call is sent before any reply is awaited."""

from typing import Any, Dict, List, Sequence

import torch
from torch.distributed.rpc import RRef
from torch.distributed.rpc.constants import UNSET_RPC_TIMEOUT


def call_all(rrefs: Sequence[RRef], method: str, *args: Any, timeout: float = UNSET_RPC_TIMEOUT) -> List[Any]:
    """`method(*args)` on the object behind each RRef, all in flight together; results in order.

    timeout: seconds per call (0: none; by default the RPC agent's `runtime.rpc_timeout_s`).
    """
    return torch.futures.wait_all([getattr(r.rpc_async(timeout=timeout), method)(*args) for r in rrefs])


def gather_state(rrefs: Sequence[RRef]) -> Dict[str, torch.Tensor]:
    """The whole model's state, named as in the `models/` class, from each object's share."""
    state: Dict[str, torch.Tensor] = {}
    for part in call_all(rrefs, "state_dict"):
        state.update(part)
    return state
