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
import os
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
import torch.nn.functional as F
from torch import nn

from rpc_train.checkpoint.pieces import overlaps, piece_key
from rpc_train.checkpoint.store import load_file, save_file
from rpc_train.config.errors import ConfigError
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
    # (trainer, staleness) of the update that made these rows, trainer None for a sync step's
    # average; None before any update.
    made_by: Optional[Tuple[Optional[int], int]] = None


class EmbeddingServer:
    def __init__(self, server_id: int, pieces: List[Piece], model_cfg: dict, seed: int, trainers: int,
                 sync: bool, optim: str, lr: float, rule: AsyncUpdateRule = AsyncUpdateRule()):
        self.server_id, self.trainers, self.sync, self.rule = server_id, trainers, sync, rule
        self.shard = EmbeddingShard(pieces, model_cfg, seed)
        self.optimizer = build_embedding_optimizer(optim, list(self.shard.weights), lr)
        self.version = 0  # updates that changed rows
        self.made_by: Optional[Tuple[Optional[int], int]] = None  # see LookupReply
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
            return LookupReply(self.version, rows, self.made_by)

    def push(self, trainer: int, version: int, grads: Dict[int, torch.Tensor]) -> torch.futures.Future:
        """Trainer `trainer`'s sparse gradients by piece, computed on rows of `version` (none if
        it looked nothing up here): async, applied at once; sync, averaged with the step's others."""
        done = torch.futures.Future()
        if not self.sync:
            with self._lock:
                # Only an update that changes rows counts: a trainer that looked nothing up here
                # neither steps the optimizer nor makes the others' gradients staler.
                staleness = self.version - version
                if self._step(grads, trainer, staleness):
                    self._max_staleness = max(self._max_staleness, staleness)
            done.set_result(staleness)
            return done
        with self._lock:
            self._round[trainer] = grads
            self._waiting.append(done)
            if len(self._round) < self.trainers:
                return done
            arrived, waiting = [self._round[t] for t in sorted(self._round)], self._waiting
            self._round, self._waiting = {}, []
            self._step(_mean(arrived, self.trainers), None, 0)
        for waiter in waiting:  # completing a future sends its reply: outside the lock
            waiter.set_result(0)
        return done

    def _step(self, grads: Dict[int, torch.Tensor], trainer: Optional[int], staleness: int) -> bool:
        """Apply `grads` (trainer None: a sync step's average); False, and no update, if they name no row."""
        grads = {i: g.coalesce() for i, g in grads.items()}
        rows = sum(g._nnz() for g in grads.values())
        if not rows:
            return False
        for i, weight in enumerate(self.shard.weights):
            weight.grad = grads.get(i)
        # A coalesced sparse tensor's values are its own: clipping scales them in place.
        self.rule.step(self.optimizer, [g._values() for g in grads.values()], staleness)
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        self.made_by = (trainer, staleness)
        self._stats["rows_updated"] += rows
        return True

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Each piece's rows, by piece name (sharding.Piece.name)."""
        with self._lock:
            return {p.name: w.detach().clone() for p, w in zip(self.shard.pieces, self.shard.weights)}

    # Checkpoints: each piece's rows (and row-wise Adagrad's accumulators) under the key of its
    # row range (checkpoint/pieces.py), so another layout loads them by overlap. Called by the
    # driver between epochs, when no trainer is stepping.
    def save_checkpoint(self, directory: str) -> dict:
        filename = f"server{self.server_id}.pt"
        with self._lock:
            tensors = {_key(p): w.detach().clone() for p, w in zip(self.shard.pieces, self.shard.weights)}
            sums = {_key(p): self.optimizer.state[w]["sum"].clone()
                    for p, w in zip(self.shard.pieces, self.shard.weights) if "sum" in self.optimizer.state.get(w, {})}
        payload = {"tensors": tensors, "optimizer": type(self.optimizer).__name__, "row_sums": sums}
        digest = save_file(os.path.join(directory, filename), payload)
        return {"file": filename, "sha256": digest, "tensors": {k: list(t.shape) for k, t in tensors.items()}}

    def load_checkpoint(self, directory: str, index: Dict[str, str]) -> None:
        """Fill each piece from whichever saved pieces overlap its rows, whatever layout wrote them."""
        files: Dict[str, dict] = {}
        with self._lock:
            for piece, weight in zip(self.shard.pieces, self.shard.weights):
                name = f"embeddings.{piece.table}.weight"
                found = overlaps(index, name, piece.lo, piece.hi)
                if sum(min(hi, piece.hi) - max(lo, piece.lo) for _, lo, hi, _ in found) != piece.rows:
                    raise ConfigError(f"checkpoint {directory} does not hold every row {piece.lo}-{piece.hi - 1} of "
                                      f"{name}; resume from a checkpoint of this model")
                for key, lo, hi, file in found:
                    saved = files.setdefault(file, load_file(os.path.join(directory, file)))
                    self._check_optimizer(directory, saved["optimizer"])
                    a, b = max(lo, piece.lo), min(hi, piece.hi)
                    with torch.no_grad():
                        weight[a - piece.lo : b - piece.lo] = saved["tensors"][key][a - lo : b - lo]
                    if key in saved["row_sums"]:
                        state = self.optimizer.state[weight]
                        state.setdefault("sum", torch.zeros(weight.shape[0], dtype=weight.dtype))
                        state["sum"][a - piece.lo : b - piece.lo] = saved["row_sums"][key][a - lo : b - lo]

    def _check_optimizer(self, directory: str, saved: str) -> None:
        if saved != type(self.optimizer).__name__:
            raise ConfigError(f"checkpoint {directory} holds embedding tables trained with {saved}, but "
                              f"hybrid.embedding_optim builds {type(self.optimizer).__name__}; resume with the same "
                              "hybrid.embedding_optim, or start over with checkpoint.resume=none")

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


def _key(piece: Piece) -> str:
    return piece_key(f"embeddings.{piece.table}.weight", piece.lo, piece.hi)


def _mean(parts: List[Dict[int, torch.Tensor]], trainers: int) -> Dict[int, torch.Tensor]:
    """Each piece's gradient averaged over all trainers (one that did not touch a piece adds
    zero to it), summed in trainer order so that a run repeats bit for bit."""
    pieces = sorted({i for part in parts for i in part})
    return {i: functools.reduce(torch.add, [part[i] for part in parts if i in part]) / trainers for i in pieces}


def lookup_rows(server_id: int, requests: List[Tuple[int, torch.Tensor]]) -> LookupReply:
    return _LOCAL_SERVERS[server_id].lookup(requests)


@rpc.functions.async_execution
def apply_gradients(server_id: int, trainer: int, context_id: int, version: int) -> torch.futures.Future:
    """Take trainer `trainer`'s gradients for this server's rows from its autograd context
    (none if it looked nothing up here: context_id < 0) and apply them."""
    server = _LOCAL_SERVERS[server_id]
    grads = {}
    if context_id >= 0:
        found = dist_autograd.get_gradients(context_id)
        grads = {i: found[w] for i, w in enumerate(server.shard.weights) if w in found}
    return server.push(trainer, version, grads)
