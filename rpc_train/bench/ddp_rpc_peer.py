"""The hybrid benchmark's peer: the upstream `ddp_rpc` pattern on the same DLRM and data.

PyTorch's example (pytorch/examples, distributed/rpc/ddp_rpc) puts the embedding table in a
`RemoteModule` on a parameter server, wraps the dense part in DDP on the trainers, and gives
each trainer a TorchScript `DistributedOptimizer` over both, so every trainer steps the
shared table with its own optimizer (Hogwild, unsaid). Here the same, at this model's size:
the tables placed on the servers as mode=hybrid's `table` sharding places them, one
`RemoteModule` per server, one RPC per server a step (the pattern does not deduplicate), SGD
with the job's settings. Run by `python -m rpc_train.bench.hybrid` under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node N -m rpc_train.bench.ddp_rpc_peer \\
        --servers S --steps K --log-every W --out rate.json

Rank 0 builds the remote modules and starts the trainers; each trainer times its steps; rank 0
writes the rate a hybrid job would log for those steps (`windowed_rate`): so the bench compares
the two by one estimator.
"""

import argparse
import json
import os
import statistics
import time
import warnings
from datetime import timedelta
from typing import List

import torch
import torch.distributed as dist
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.nn import RemoteModule
from torch.distributed.optim import DistributedOptimizer
from torch.nn.parallel import DistributedDataParallel

from rpc_train.config.compose import compose
from rpc_train.config.schema import RuntimeConf, as_dict
from rpc_train.data.clicks import load_clicks
from rpc_train.data.datasets import make_trainer_loader
from rpc_train.hybrid.model import DenseArch, build_dlrm
from rpc_train.hybrid.sharding import plan
from rpc_train.runtime.world import World, configure_threads, worker_name

_TRAINERS = None  # the trainers' process group, made on every rank in main()


class Tables(nn.Module):
    """Some of the model's tables, as the pattern's parameter server holds its one table."""

    def __init__(self, model_cfg: dict, seed: int, tables: List[int]):
        super().__init__()
        whole = build_dlrm(model_cfg, seed).embeddings
        self.tables = tables
        self.bags = nn.ModuleList(whole[t] for t in tables)

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        return torch.stack([bag(sparse[:, i : i + 1]) for i, bag in enumerate(self.bags)], dim=1)


def windowed_rate(step_seconds: List[List[float]], log_every: int, batch_size: int) -> float:
    """Samples/s as a hybrid job logs it (hybrid/driver.py log_windows) and bench.launched reads
    it: per window of `log_every` steps, every trainer's samples over the slowest trainer's time
    in it; the mean of the windows after the first (start-up) one. `step_seconds`: per trainer."""
    steps = min(len(s) for s in step_seconds)
    windows = []
    for start in range(0, steps, log_every):
        taken = min(log_every, steps - start)
        seconds = max(sum(s[start : start + taken]) for s in step_seconds)
        windows.append(len(step_seconds) * batch_size * taken / max(seconds, 1e-9))
    return statistics.mean(windows[1:] or windows)


def train(remotes: list, tables: List[List[int]], trainer: int, trainers: int, cfg_yaml: str,
          steps: int) -> List[float]:
    """One trainer: the pattern's loop; the seconds of each step."""
    cfg = OmegaConf.create(cfg_yaml)
    model = build_dlrm(as_dict(cfg.model), cfg.seed)
    dense = DistributedDataParallel(DenseArch(model), process_group=_TRAINERS)
    params = [rpc.RRef(p) for p in dense.parameters()]
    for remote in remotes:
        params += remote.remote_parameters()
    optim = cfg.optim
    optimizer = DistributedOptimizer(torch.optim.SGD, params, lr=optim.lr, momentum=optim.momentum)
    train_set, _ = load_clicks(cfg.data, cfg.seed)
    loader = make_trainer_loader(train_set, cfg.trainer.batch_size, trainer, trainers, cfg.seed)
    times, batches = [], iter(loader)
    for step in range(steps):
        try:
            x, sparse, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, sparse, y = next(batches)
        started = time.perf_counter()
        with dist_autograd.context() as context_id:
            futures = [remote.forward_async(sparse[:, held]) for remote, held in zip(remotes, tables)]
            pooled = [None] * sparse.shape[1]
            for held, future in zip(tables, futures):
                out = future.wait()
                for i, t in enumerate(held):
                    pooled[t] = out[:, i]
            loss = F.binary_cross_entropy_with_logits(dense(x, pooled), y)
            dist_autograd.backward(context_id, [loss])
            optimizer.step(context_id)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10, help="steps a throughput window, as trainer.log_every")
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    warnings.filterwarnings("ignore")  # the pattern's TorchScript optimizer warns; its figures are what matter
    world = World.from_env()
    configure_threads(RuntimeConf(), world)
    cfg = compose(["experiment=dlrm_synthetic", *args.override])
    trainers = world.size - 1 - args.servers
    ranks = list(range(1 + args.servers, world.size))
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    global _TRAINERS
    _TRAINERS = dist.new_group(ranks)  # every rank takes part in making the trainers' group
    rpc.init_rpc(worker_name(world.rank), rank=world.rank, world_size=world.size,
                 rpc_backend_options=rpc.TensorPipeRpcBackendOptions(rpc_timeout=120))
    if world.rank == 0:
        model = build_dlrm(as_dict(cfg.model), cfg.seed)
        held = [[p.table for p in pieces] for pieces in plan("table", model.table_rows, model.embedding_dim, args.servers)]
        remotes = [RemoteModule(f"{worker_name(1 + j)}/cpu", Tables, args=(as_dict(cfg.model), cfg.seed, held[j]))
                   for j in range(args.servers)]
        yaml = OmegaConf.to_yaml(cfg, resolve=True)
        futures = [rpc.rpc_async(worker_name(r), train, args=(remotes, held, i, trainers, yaml, args.steps), timeout=0)
                   for i, r in enumerate(ranks)]
        rate = windowed_rate([f.wait() for f in futures], args.log_every, cfg.trainer.batch_size)
        with open(args.out, "w") as f:
            json.dump({"samples_per_s": rate}, f)
    rpc.shutdown()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TP_SOCKET_IFNAME", "lo")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
