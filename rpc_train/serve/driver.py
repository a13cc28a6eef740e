"""Serving on the driver (rank 0): start the replicas, load every model into them one replica at a
time (`rollout.py`, which warms each up), answer gRPC and HTTP until told to stop.

SIGTERM or SIGINT to any process of the job drains (serve/lifecycle.py): readiness goes false,
new requests get UNAVAILABLE (HTTP 503) after serve.drain_grace_s, queued and in-flight ones are
answered, then the front ends stop and the RPC world shuts down gracefully, so every rank exits 0.
"""

import logging
import os
import threading
import time
from typing import Optional

import torch
import torch.distributed.rpc as rpc
from omegaconf import DictConfig

from rpc_train.config.errors import ConfigError
from rpc_train.metrics.tensorboard import RunLogger, flat_hparams
from rpc_train.runtime.world import worker_name
from rpc_train.serve.cache import ResponseCache
from rpc_train.serve.core import ServingCore
from rpc_train.serve.dispatch import BatchingLimits, Dispatcher, Replica
from rpc_train.serve.generation import GenerationScheduler
from rpc_train.serve.frontend import HealthReporter, InferenceService, start_server
from rpc_train.serve.http_server import start_http, start_metrics
from rpc_train.serve.lifecycle import STOP
from rpc_train.serve.observe import ServeMetrics, summary_line
from rpc_train.serve.replica import ServeStage
from rpc_train.serve.repository import Repository
from rpc_train.serve.rollout import Rollout
from rpc_train.serve.routing import POLICIES
from rpc_train.serve.source import served_models
from rpc_train.serve.tensors import ServeError

log = logging.getLogger(__name__)

LINGER_S = 1.0


def build_replicas(cfg: DictConfig, world_size: int) -> tuple:
    """(each replica's stage RRefs, one Replica per group of serve.stages workers): replica r's
    stage k on worker 1 + r x stages + k. They hold no model until the rollout loads one."""
    stages = cfg.serve.stages
    rrefs, replicas = [], []
    for r in range((world_size - 1) // stages):
        workers = [worker_name(1 + r * stages + k) for k in range(stages)]
        rrefs.append([rpc.remote(workers[k], ServeStage, args=(r, k, workers[k + 1] if k + 1 < stages else None,
                                                               cfg.device, cfg.serve.sequence_idle_s))
                      for k in range(stages)])
        replicas.append(Replica(replica=r, workers=workers))
    return rrefs, replicas


def serve(cfg: DictConfig, world_size: int, run_dir: str) -> dict:
    conf = cfg.serve
    models = served_models(conf)
    stage_rrefs, replicas = build_replicas(cfg, world_size)
    rrefs = [rref for stages in stage_rrefs for rref in stages]
    torch.futures.wait_all([rref.rpc_async().ready() for rref in rrefs])  # every stage started, or its error
    metrics = ServeMetrics(len(replicas), conf.max_batch_size, lambda r: replicas[r].rows_in_flight,
                           lambda: sum(r.in_rotation for r in replicas))
    limits = BatchingLimits(conf.max_batch_size, conf.max_inflight_batches, conf.max_queue_delay_ms / 1e3,
                            conf.max_queue_size, conf.replica_timeout_s, max_waiting_requests=conf.threads)
    repository = Repository(conf.keep_versions)
    dispatcher = Dispatcher(replicas, POLICIES[conf.routing](), limits, on_batch=metrics.batch_sent,
                            on_computed=repository.record_batch)
    generation = GenerationScheduler(replicas, conf.max_batch_size, conf.max_queue_size, conf.continuous_batching,
                                     conf.replica_timeout_s, on_step=repository.record_batch)
    metrics.sequences(generation.live_caches, generation.running)
    cache = ResponseCache(conf.cache_size) if conf.cache_size else None
    rollout = Rollout(repository, dispatcher, stage_rrefs, conf, cfg.pipeline.balance,
                      max(conf.replica_timeout_s, cfg.runtime.rpc_timeout_s))
    core = ServingCore(repository, dispatcher, metrics, conf.max_message_mb, cache, rollout,
                       "KIND_GPU" if cfg.device == "cuda" else "KIND_CPU", generation)
    service, health = InferenceService(core), HealthReporter()
    try:
        server = start_server(service, health, conf)
        http = start_http(core, conf) if conf.http_port else None
        if conf.metrics_port:
            start_metrics(metrics.registry, conf)
    except (RuntimeError, OSError) as err:
        raise ConfigError(f"serve.port={conf.port}, serve.http_port={conf.http_port} or serve.metrics_port="
                          f"{conf.metrics_port}: {err} (is another server on it?); choose free ports") from err
    # Live from here, ready once every model answered its warm-up on every replica.
    for name, served in models.items():
        log.info("serving model '%s' from %s", name, os.path.abspath(served.run_dir))
        try:
            rollout.load(name, served.run_dir)
        except ServeError as err:
            raise ConfigError(err.message) from err
    core.loaded = True
    if conf.watch:
        rollout.watch(STOP)
    health.update(core.ready() and not STOP.is_set())  # a signal during start-up: never ready, drain at once
    log.info("ready: %s on %d replica(s) of %d stage(s) on %s, gRPC on %s:%d%s%s%s%s", ", ".join(models),
             len(replicas), conf.stages, ", ".join(r.workers[0] for r in replicas), conf.host, conf.port,
             f", HTTP on {conf.host}:{conf.http_port}" if conf.http_port else "",
             " (TLS" + (", mutual)" if conf.tls.client_ca else ")") if conf.tls.cert else " (plaintext)",
             ", token required" if conf.auth_token_file else "",
             f", metrics on {conf.host}:{conf.metrics_port}" if conf.metrics_port else "")
    logger, started = RunLogger(run_dir), time.monotonic()
    logger.config(cfg)
    try:
        report(STOP, metrics, logger, conf.log_every_s, health, core)
        _drain_and_stop(conf, core, health, dispatcher, server, rrefs, http, generation)
    finally:
        # The config and the session's totals, as a training run ends with its HParams.
        logger.hparams(flat_hparams(cfg), metrics.totals(time.monotonic() - started))
        logger.close()
    return {}


def _drain_and_stop(conf, core: ServingCore, health: HealthReporter, dispatcher: Dispatcher, server,
                    rrefs, http=None, generation: Optional[GenerationScheduler] = None) -> None:
    """Answer what is queued and in flight, refuse what comes, stop gRPC and HTTP, free the replicas."""
    log.info("draining: not ready now; new requests get UNAVAILABLE in %g s (serve.drain_grace_s), queued and "
             "in-flight ones are answered", conf.drain_grace_s)
    dispatcher.unready()
    health.update(False)
    time.sleep(conf.drain_grace_s)  # still serving: time for a load balancer to see we are not ready
    core.draining = True
    drained = dispatcher.drain(timeout_s=2 * conf.replica_timeout_s)
    if generation is not None:  # sequences being generated end first (each within its max_tokens)
        drained = generation.drain(timeout_s=2 * conf.replica_timeout_s) and drained
    # Every handler has its answer now; new calls keep getting UNAVAILABLE from the handlers for a
    # moment, so that few arrive just as gRPC closes (those may see CANCELLED instead).
    linger_until = time.monotonic() + LINGER_S
    while time.monotonic() < linger_until or not core.idle():
        time.sleep(0.05)
        if time.monotonic() > linger_until + 5:
            break
    server.stop(grace=5).wait()
    if http is not None:
        http.stop()
    for rref in rrefs:
        try:
            rref.rpc_sync(timeout=5).release()
        except RuntimeError:  # that worker is gone (torchrun is restarting the world): nothing to free
            pass
    log.info("stopped%s", "" if drained else " (some requests were still unanswered after the drain timeout)")


def report(stop: threading.Event, metrics: ServeMetrics, logger: RunLogger, every_s: float, health: HealthReporter,
           core: ServingCore) -> None:
    """Until told to stop: readiness to the health service, and every `every_s` the window's
    scalars to TensorBoard (step: seconds since ready) and one line to the log."""
    started = next_report = time.monotonic()
    while not stop.wait(0.5):
        health.update(core.ready())
        if time.monotonic() >= next_report + every_s:
            next_report = time.monotonic()
            scalars = metrics.window()
            logger.scalars(int(next_report - started), scalars)
            logger.flush()
            log.info(summary_line(scalars))
