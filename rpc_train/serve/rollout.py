"""Versions onto the replicas and off them: the repository extension's load and unload, and serve.watch.

A load reads the run's model.pt once on the front end, hashes those bytes, checks the weights
fit the run's model, and numbers a new version. Then, one replica at a time: the replica is
paused (no new batch goes to it; its in-flight ones finish), each of its stages is sent its
tensors and builds the version beside the ones it holds, a warm-up batch goes through, and the
replica returns with the version loaded. The others serve meanwhile; with one replica, requests
wait in the queue. Versions beyond `serve.keep_versions` are unloaded once no batch uses them.
A load that fails leaves what was served serving, and the error is the reply.
"""

import logging
import os
import threading
from typing import Dict, List, Optional, Sequence

import grpc
import torch
import torch.distributed.rpc as rpc

from rpc_train.config.errors import ConfigError, first_line
from rpc_train.pipeline.partition import plan_stages, stage_bounds
from rpc_train.serve.dispatch import Dispatcher
from rpc_train.serve.kv_cache import WARM_UP, decode_on_stage
from rpc_train.serve.replica import infer_on_stage
from rpc_train.serve.repository import READY, UNAVAILABLE, Repository, Version
from rpc_train.serve.source import (CONFIG_FILE, MODEL_FILE, ServedModel, build_served, read_weights, sample_input,
                                    served_model)
from rpc_train.serve.tensors import BadRequest, ServeError

log = logging.getLogger(__name__)

WATCH_EVERY_S = 1.0


class Rollout:
    def __init__(self, repository: Repository, dispatcher: Dispatcher, stages: Sequence[Sequence[rpc.RRef]],
                 conf, balance, timeout_s: float):
        """`stages[r]`: replica r's ServeStage RRefs, first to last (the dispatcher's replicas' order)."""
        self.repository, self.dispatcher, self.stages = repository, dispatcher, stages
        self.conf, self.balance, self.timeout_s = conf, balance, timeout_s
        self._lock = threading.Lock()  # one load or unload at a time
        self._seen: Dict[str, tuple] = {}  # serve.watch: the model.pt (mtime, size) last looked at, by model

    # -- load
    def load(self, name: str, run: Optional[str] = None, only_if_new: bool = False) -> Version:
        """A new version of `name` from `run` (default: the run its newest version came from), on
        every replica; a ServeError (NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE) leaves the others serving."""
        with self._lock:
            run_dir = os.path.expanduser(run) if run else self._last_run(name)
            served, digest, state, stamp = self._read(name, run_dir)
            model = self.repository.models.get(name)
            newest = model.newest() if model and not model.unloaded else None
            if only_if_new and newest is not None and newest.digest == digest:
                return newest
            version = self.repository.add(served, digest, self.conf.max_batch_size, stamp)
            log.info("model '%s' version %s: loading from %s (sha256 %s...)", name, version.version,
                     os.path.abspath(run_dir), digest[:12])
            try:
                layers = self._layers(served, state)
                for replica, stage_rrefs in zip(self.dispatcher.replicas, self.stages):
                    self._load_on(replica, stage_rrefs, version, state, layers)
            except Exception as err:  # noqa: BLE001 - a replica could not take it: keep what is served
                self.repository.set_state(version, UNAVAILABLE, f"load failed: {first_line(err)}")
                self._free(version)
                log.warning("model '%s' version %s from %s failed to load: %s", name, version.version, run_dir,
                            first_line(err))
                if isinstance(err, ServeError):
                    raise
                raise ServeError(grpc.StatusCode.UNAVAILABLE, f"model '{name}' from run {run_dir}: a replica "
                                                              f"failed to load it ({first_line(err)})") from err
            self.repository.set_state(version, READY)
            log.info("model '%s' version %s: ready on %d replica(s)", name, version.version,
                     len(self.dispatcher.replicas))
            for old in self.repository.to_retire(name):
                self._free(old)
            self._seen[name] = stamp
            return version

    def _last_run(self, name: str) -> str:
        model = self.repository.models.get(name)
        if model is None or model.newest() is None:
            raise BadRequest(grpc.StatusCode.NOT_FOUND, f"model '{name}' is not served here; load it with the "
                                                        "parameter 'run' naming its run directory")
        return model.newest().served.run_dir

    def _read(self, name: str, run_dir: str) -> tuple:
        """(ServedModel, digest, state dict, stamp) of the run, checked; BadRequest naming the run."""
        for needed in (MODEL_FILE, CONFIG_FILE):
            if not os.path.isfile(os.path.join(run_dir, needed)):
                raise BadRequest(grpc.StatusCode.NOT_FOUND, f"model '{name}' from run {run_dir}: no {needed} there; "
                                                            "name a run directory that training wrote")
        try:
            served = served_model(run_dir, name)
            stamp = _stamp(served.weights)
            digest, state = read_weights(served)
            build_served(served, state)  # the weights fit the run's model, or one line saying why not
        except ConfigError as err:
            message = str(err).removeprefix(f"serve.run={run_dir}: ")
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"model '{name}' from run {run_dir}: {message}") \
                from err
        if served.is_dlrm and self.conf.stages > 1:
            raise BadRequest(grpc.StatusCode.INVALID_ARGUMENT, f"model '{name}' from run {run_dir}: a DLRM is served "
                                                               f"whole, but serve.stages={self.conf.stages}")
        return served, digest, state, stamp

    def _layers(self, served: ServedModel, state: dict) -> List[Optional[range]]:
        """Each stage's layers of the model (None: the whole model, on a single stage)."""
        if self.conf.stages == 1:
            return [None]
        layers = list(build_served(served, state))
        sample = sample_input(served)
        return stage_bounds(plan_stages(layers, self.conf.stages, self.balance, sample))

    def _load_on(self, replica, stage_rrefs, version: Version, state: dict, layers: List[Optional[range]]) -> None:
        if not self.dispatcher.pause(replica, self.timeout_s):
            self.dispatcher.resume(replica)
            raise ServeError(grpc.StatusCode.UNAVAILABLE, f"replica {replica.replica} still had batches in flight "
                                                          f"after {self.timeout_s:g} s; try the load again")
        loaded = False
        try:
            torch.futures.wait_all([
                rref.rpc_async(timeout=self.timeout_s).load(version.key, version.served, _part(state, part), part)
                for rref, part in zip(stage_rrefs, layers)])
            if version.spec.decoupled:  # a text generator: one decode step of one byte through every stage
                rpc.rpc_sync(replica.workers[0], decode_on_stage, timeout=self.timeout_s,
                             args=(replica.replica, 0, version.key, [(WARM_UP, torch.zeros(1, 1, dtype=torch.int64), 0)],
                                   [WARM_UP]))
            else:
                warm_up = [torch.zeros(1, *t.dims, dtype=torch.int64 if t.datatype == "INT64" else torch.float32)
                           for t in version.spec.inputs]
                rpc.rpc_sync(replica.workers[0], infer_on_stage,
                             args=(replica.replica, 0, version.key, tuple(warm_up)), timeout=self.timeout_s)
            loaded = True
        finally:
            self.dispatcher.resume(replica, version.key if loaded else None)

    # -- unload
    def unload(self, name: str) -> None:
        """Stop serving `name`: later requests get NOT_FOUND, queued and in-flight ones are answered."""
        with self._lock:
            for version in self.repository.unload(name):
                self._free(version)
            log.info("model '%s' unloaded", name)

    def _free(self, version: Version) -> None:
        """Once no batch uses the version, its modules leave every replica."""
        if not self.dispatcher.retire(version.key, self.timeout_s):
            log.warning("model '%s' version %s: still in use after %g s; unloading it anyway", *version.key,
                        self.timeout_s)
        for stage_rrefs in self.stages:
            for rref in stage_rrefs:
                try:
                    rref.rpc_sync(timeout=self.timeout_s).unload(version.key)
                except RuntimeError as err:  # that worker is gone: nothing to free there
                    log.warning("unloading %s version %s: %s", *version.key, first_line(err))
        if version.state == UNAVAILABLE and not version.reason:
            self.repository.set_state(version, UNAVAILABLE, "unloaded")

    # -- serve.watch
    def watch(self, stop: threading.Event) -> threading.Thread:
        """A thread that loads each served run's model.pt again whenever it changes (mtime or size)."""
        def forever() -> None:
            while not stop.wait(WATCH_EVERY_S):
                for name, model in list(self.repository.models.items()):
                    newest = model.newest()
                    if model.unloaded or newest is None:
                        continue
                    stamp = _stamp(newest.served.weights)
                    if stamp is None or stamp == self._seen.get(name, newest.stamp):
                        continue
                    self._seen[name] = stamp
                    try:
                        self.load(name, newest.served.run_dir, only_if_new=True)
                    except ServeError as err:
                        log.warning("serve.watch: %s", err.message)

        thread = threading.Thread(target=forever, name="watch", daemon=True)
        thread.start()
        return thread


def _part(state: dict, layers: Optional[range]) -> dict:
    """The entries of `state` a stage of `layers` needs (a Sequential's keys start with the layer's index)."""
    if layers is None:
        return state
    return {k: v for k, v in state.items() if int(k.split(".")[0]) in layers}


def _stamp(path: str) -> Optional[tuple]:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size
