"""How many RPC messages a pipeline step costs, counted from torch's own records.

TensorPipe keeps no message counters (`get_debug_info()` has active calls and threads only),
so every process counts its share from what it knows exactly:
- each forward request a stage serves, and its reply: 2;
- per distributed-autograd context, from the records torch keeps in it
  (`DistAutogradContext`): every recorded receive makes the backward send one gradient
  message back to its sender, answered once that part of the graph is done (2 each); and
  releasing the context sends a cleanup message, also answered, to every worker it knows (2
  each; torch/csrc/distributed/autograd/context/container.cpp).
Control calls (the optimizer step, one per stage) are counted where they are made.
"""

import torch.distributed.autograd as dist_autograd


def context_messages(context_id: int) -> int:
    """The messages this process's part of one autograd context sends or answers, call
    before the context is released (its records go with it)."""
    context = dist_autograd._retrieve_context(context_id)
    return 2 * (len(context._recv_functions()) + len(context._known_worker_ids()))
