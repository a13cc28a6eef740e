"""An embedding server: its pieces of the tables (an `EmbeddingShard`) and their one optimizer.

Trainers call `lookup_rows` once a step with every row they need from this server; the rows
go back with distributed autograd recording the way, so the trainer's backward sends the
rows' gradients here, into the trainer's autograd context. `apply_gradients` then reads them
from that context (`dist_autograd.get_gradients`) and steps this server's optimizer: sync,
once a step with every trainer's gradient averaged; async, at once. One optimizer per shard,
on its server, so its state (Adagrad's accumulators) sees every trainer's gradient, which a
per-trainer optimizer of the same table would not.

As in ps/server.py, trainers reach the server by id through module-level functions, not
through the RRef, which would run the RRef fork protocol on every call.
"""

import functools
import threading
import time
from typing import Dict, List, NamedTuple, Tuple

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
import torch.nn.functional as F
from torch import nn

from rpc_train.hybrid.model import build_dlrm
from rpc_train.hybrid.optim import build_embedding_optimizer
from rpc_train.hybrid.sharding import Piece
from rpc_train.training.staleness import AsyncUpdateRule

_LOCAL_SERVERS: Dict[int, "EmbeddingServer"] = {}


class EmbeddingShard(nn.Module):
    """Row ranges of the model's tables, initialised as the whole model's rows are."""

    def __init__(self, pieces: List[Piece], model_cfg: dict, seed: int):
        super().__init__()
        tables = build_dlrm(model_cfg, seed).embeddings  # the same values every process builds
        self.pieces = pieces
        self.weights = nn.ParameterList(nn.Parameter(tables[p.table].weight.detach()[p.lo : p.hi].clone())
                                        for p in pieces)


class LookupReply(NamedTuple):
    version: int  # updates this server has applied; the trainer's gradient is computed at it
    rows: List[torch.Tensor]  # one (ids, dim) tensor per request, in request order


class EmbeddingServer:
    def __init__(self, server_id: int, pieces: List[Piece], model_cfg: dict, seed: int, trainers: int,
                 sync: bool, optim: str, lr: float, rule: AsyncUpdateRule = AsyncUpdateRule()):
        self.server_id, self.trainers, self.sync, self.rule = server_id, trainers, sync, rule
        self.shard = EmbeddingShard(pieces, model_cfg, seed)
        self.optimizer = build_embedding_optimizer(optim, list(self.shard.weights), lr)
        self.version = 0
        # Guards the weights, the version and the open round; never held across an RPC or a wait.
        self._lock = threading.Lock()
        self._round: Dict[int, Dict[int, torch.Tensor]] = {}  # sync: trainer -> its gradients, by piece
        self._waiting: List[torch.futures.Future] = []
        self._stats = {"lookups": 0, "rows_looked_up": 0, "rows_updated": 0, "since": time.perf_counter()}
        self._max_staleness = 0
        _LOCAL_SERVERS[server_id] = self

    def lookup(self, requests: List[Tuple[int, torch.Tensor]]) -> LookupReply:
        """Rows `ids` of piece `index` for each (index, ids): local row numbers, unique."""
        with self._lock:
            # sparse=True: the gradient names only the rows looked up, so the optimizer touches only those.
            rows = [F.embedding(ids, self.shard.weights[index], sparse=True) for index, ids in requests]
            self._stats["lookups"] += 1
            self._stats["rows_looked_up"] += sum(len(ids) for _, ids in requests)
            return LookupReply(self.version, rows)

    def apply(self, trainer: int, context_id: int, version: int) -> torch.futures.Future:
        """Take trainer `trainer`'s gradients from its autograd context (none if it looked
        nothing up here, context_id < 0) and apply them, sync or async."""
        grads = {}
        if context_id >= 0:
            found = dist_autograd.get_gradients(context_id)
            grads = {i: found[w] for i, w in enumerate(self.shard.weights) if w in found}
        done = torch.futures.Future()
        if not self.sync:
            with self._lock:
                staleness = self.version - version
                self._max_staleness = max(self._max_staleness, staleness)
                self._step(grads, staleness)
            done.set_result(staleness)
            return done
        with self._lock:
            self._round[trainer] = grads
            self._waiting.append(done)
            if len(self._round) < self.trainers:
                return done
            arrived, waiting = [self._round[t] for t in sorted(self._round)], self._waiting
            self._round, self._waiting = {}, []
            self._step(_mean(arrived, self.trainers), 0)
        for waiter in waiting:  # completing a future sends its reply: outside the lock
            waiter.set_result(0)
        return done

    def _step(self, grads: Dict[int, torch.Tensor], staleness: int) -> None:
        grads = {i: g.coalesce() for i, g in grads.items()}
        # The rule scales the gradients' values in place: a coalesced sparse tensor's are its own.
        self.rule.prepare({i: g._values() for i, g in grads.items()}, staleness)
        for i, weight in enumerate(self.shard.weights):
            weight.grad = grads.get(i)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        self._stats["rows_updated"] += sum(g._nnz() for g in grads.values())

    def pieces(self) -> List[Piece]:
        return self.shard.pieces

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Each piece's rows, by piece name (sharding.Piece.name)."""
        with self._lock:
            return {p.name: w.detach().clone() for p, w in zip(self.shard.pieces, self.shard.weights)}

    def missing_trainers(self) -> List[int]:
        with self._lock:
            return sorted(set(range(self.trainers)) - set(self._round)) if self._round else []

    def pop_stats(self) -> Dict[str, float]:
        """Lookups/s and rows updated/s since the last call, and the stalest gradient applied."""
        with self._lock:
            now, s = time.perf_counter(), self._stats
            seconds = max(now - s["since"], 1e-9)
            out = {"lookups_per_s": s["lookups"] / seconds, "rows_looked_up_per_s": s["rows_looked_up"] / seconds,
                   "rows_updated_per_s": s["rows_updated"] / seconds, "max_staleness": self._max_staleness,
                   "version": self.version}
            self._stats = {"lookups": 0, "rows_looked_up": 0, "rows_updated": 0, "since": now}
            self._max_staleness = 0
            return out


def _mean(parts: List[Dict[int, torch.Tensor]], trainers: int) -> Dict[int, torch.Tensor]:
    """Each piece's gradient averaged over all trainers (one that did not touch a piece adds
    zero to it), summed in trainer order so that a run repeats bit for bit."""
    pieces = sorted({i for part in parts for i in part})
    return {i: functools.reduce(torch.add, [part[i] for part in parts if i in part]) / trainers for i in pieces}


def lookup_rows(server_id: int, requests: List[Tuple[int, torch.Tensor]]) -> LookupReply:
    return _LOCAL_SERVERS[server_id].lookup(requests)


@rpc.functions.async_execution
def apply_gradients(server_id: int, trainer: int, context_id: int, version: int) -> torch.futures.Future:
    return _LOCAL_SERVERS[server_id].apply(trainer, context_id, version)
