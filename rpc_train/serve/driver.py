"""Serving on the driver (rank 0): build the replicas, warm them up, answer gRPC until told to stop.

SIGTERM or SIGINT to any process of the job drains (serve/lifecycle.py): readiness goes false,
new requests get UNAVAILABLE after serve.drain_grace_s, queued and in-flight ones are answered,
then the front end stops and the RPC world shuts down gracefully, so every rank exits 0.
"""

import logging
import os
import threading
import time
from typing import List

import torch
import torch.distributed.rpc as rpc
from omegaconf import DictConfig

from rpc_train.config.errors import ConfigError
from rpc_train.metrics.tensorboard import RunLogger, flat_hparams
from rpc_train.pipeline.partition import plan_stages, stage_bounds
from rpc_train.runtime.world import worker_name
from rpc_train.checkpoint.store import sha256_of
from rpc_train.serve.cache import ResponseCache
from rpc_train.serve.codec import ModelSpec
from rpc_train.serve.dispatch import BatchingLimits, Dispatcher, Replica
from rpc_train.serve.frontend import HealthReporter, InferenceService, start_server
from rpc_train.serve.lifecycle import STOP
from rpc_train.serve.observe import ServeMetrics, summary_line
from rpc_train.serve.replica import ServeStage, infer_on_stage
from rpc_train.serve.routing import POLICIES
from rpc_train.serve.source import ServedModel, build_served, served_model

log = logging.getLogger(__name__)

LINGER_S = 1.0


def build_replicas(cfg: DictConfig, served: ServedModel, world_size: int) -> tuple:
    """(the stages' RRefs, one Replica per group of serve.stages workers): replica r's stage k on
    worker 1 + r x stages + k."""
    stages = cfg.serve.stages
    layers = list(build_served(served))
    sample = torch.zeros(1, *served.shape)
    bounds = stage_bounds(plan_stages(layers, stages, cfg.pipeline.balance, sample) if stages > 1 else [len(layers)])
    rrefs, replicas = [], []
    for r in range((world_size - 1) // stages):
        workers = [worker_name(1 + r * stages + k) for k in range(stages)]
        for k, layer_range in enumerate(bounds):
            after = workers[k + 1] if k + 1 < stages else None
            rrefs.append(rpc.remote(workers[k], ServeStage, args=(r, k, served, layer_range, after, cfg.device)))
        replicas.append(Replica(replica=r, workers=workers))
    return rrefs, replicas


def warm_up(replicas: List[Replica], shape: List[int], timeout_s: float) -> None:
    """One batch through every replica: ready means each has loaded the model and answered."""
    torch.futures.wait_all([rpc.rpc_async(r.workers[0], infer_on_stage, args=(r.replica, 0, torch.zeros(1, *shape)),
                                          timeout=timeout_s) for r in replicas])


def serve(cfg: DictConfig, world_size: int, run_dir: str) -> dict:
    conf = cfg.serve
    served = served_model(conf.run, conf.model_name)
    log.info("serving model '%s' from %s", served.name, os.path.abspath(served.run_dir))
    rrefs, replicas = build_replicas(cfg, served, world_size)
    torch.futures.wait_all([rref.rpc_async().ready() for rref in rrefs])  # every stage built, or its error
    warm_up(replicas, served.shape, max(conf.replica_timeout_s, cfg.runtime.rpc_timeout_s))
    metrics = ServeMetrics(len(replicas), conf.max_batch_size, lambda r: replicas[r].rows_in_flight,
                           lambda: sum(r.in_rotation for r in replicas))
    limits = BatchingLimits(conf.max_batch_size, conf.max_inflight_batches, conf.max_queue_delay_ms / 1e3,
                            conf.max_queue_size, conf.replica_timeout_s, max_waiting_requests=conf.threads)
    dispatcher = Dispatcher(replicas, POLICIES[conf.routing](), limits, on_batch=metrics.batch_sent)
    cache = ResponseCache(conf.cache_size, sha256_of(served.weights)) if conf.cache_size else None
    spec = ModelSpec(served.name, served.shape, served.num_classes, conf.max_batch_size)
    service, health = InferenceService(spec, dispatcher, conf.max_message_mb, metrics, cache), HealthReporter()
    try:
        server = start_server(service, health, conf)
        if conf.metrics_port:
            metrics.serve_http(conf.host, conf.metrics_port)
    except (RuntimeError, OSError) as err:
        raise ConfigError(f"serve.port={conf.port} or serve.metrics_port={conf.metrics_port}: {err} (is another "
                          "server on it?); choose free ports") from err
    health.update(not STOP.is_set())  # a signal during start-up: never ready, drain at once
    log.info("ready: %d replica(s) of %d stage(s) on %s, gRPC on %s:%d%s%s%s", len(replicas), conf.stages,
             ", ".join(r.workers[0] for r in replicas), conf.host, conf.port,
             " (TLS" + (", mutual)" if conf.tls.client_ca else ")") if conf.tls.cert else " (plaintext)",
             ", token required" if conf.auth_token_file else "",
             f", metrics on {conf.host}:{conf.metrics_port}" if conf.metrics_port else "")
    logger, started = RunLogger(run_dir), time.monotonic()
    logger.config(cfg)
    try:
        report(STOP, metrics, logger, conf.log_every_s, health, service)
        _drain_and_stop(conf, service, health, dispatcher, server, rrefs)
    finally:
        # The config and the session's totals, as a training run ends with its HParams.
        logger.hparams(flat_hparams(cfg), metrics.totals(time.monotonic() - started))
        logger.close()
    return {}


def _drain_and_stop(conf, service: InferenceService, health: HealthReporter, dispatcher: Dispatcher, server,
                    rrefs) -> None:
    """Answer what is queued and in flight, refuse what comes, stop gRPC, free the replicas."""
    log.info("draining: not ready now; new requests get UNAVAILABLE in %g s (serve.drain_grace_s), queued and "
             "in-flight ones are answered", conf.drain_grace_s)
    dispatcher.unready()
    health.update(False)
    time.sleep(conf.drain_grace_s)  # still serving: time for a load balancer to see we are not ready
    service.draining = True
    drained = dispatcher.drain(timeout_s=2 * conf.replica_timeout_s)
    # Every handler has its answer now; new calls keep getting UNAVAILABLE from the handlers for a
    # moment, so that few arrive just as gRPC closes (those may see CANCELLED instead).
    linger_until = time.monotonic() + LINGER_S
    while time.monotonic() < linger_until or not service.idle():
        time.sleep(0.05)
        if time.monotonic() > linger_until + 5:
            break
    server.stop(grace=5).wait()
    for rref in rrefs:
        try:
            rref.rpc_sync(timeout=5).release()
        except RuntimeError:  # that worker is gone (torchrun is restarting the world): nothing to free
            pass
    log.info("stopped%s", "" if drained else " (some requests were still unanswered after the drain timeout)")


def report(stop: threading.Event, metrics: ServeMetrics, logger: RunLogger, every_s: float, health: HealthReporter,
           service: InferenceService) -> None:
    """Until told to stop: readiness to the health service, and every `every_s` the window's
    scalars to TensorBoard (step: seconds since ready) and one line to the log."""
    started = next_report = time.monotonic()
    while not stop.wait(0.5):
        health.update(service.ready())
        if time.monotonic() >= next_report + every_s:
            next_report = time.monotonic()
            scalars = metrics.window()
            logger.scalars(int(next_report - started), scalars)
            logger.flush()
            log.info(summary_line(scalars))
