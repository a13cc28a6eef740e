"""Checks of a composed config against the world it will run in.

Pure Python (no torch), so the launcher runs them before torchrun starts anything, and every
rank runs them again before it joins RPC: a bad value fails fast and the same on every rank.
"""

import os
from typing import Iterator, Sequence

from omegaconf import DictConfig

from rpc_train.config.errors import ConfigError
from rpc_train.config.schema import (ALLOCATORS, BALANCE_HELP, BALANCE_STRATEGIES, DEVICES, EMBEDDING_OPTIMS,
                                     LOSS_NAMES, MODES, ROUTINGS, SCHEDULES, SHARDINGS, LOADERS, ON_SAMPLE_ERROR,
                                     STEP_FOLLOWS_LR, mode_world_size, num_stages)
from rpc_train.data.files import CLICK_DATASETS


def _positive(name: str, value) -> Iterator[str]:
    if value is None or int(value) < 1:
        yield f"{name}={value}: must be a positive integer"


def _problems(cfg: DictConfig, world_size: int) -> Iterator[str]:
    if cfg.mode.name not in MODES:
        yield f"mode.name={cfg.mode.name}: expected one of {', '.join(MODES)}"
    if cfg.device not in DEVICES:
        yield f"device={cfg.device}: expected one of {', '.join(DEVICES)}"
    yield from _runtime_problems(cfg)
    trainer = cfg.trainer
    yield from _positive("trainer.batch_size", trainer.batch_size)
    yield from _positive("trainer.epochs", trainer.epochs)
    yield from _positive("trainer.log_every", trainer.log_every)
    if not cfg.log.progress_s > 0:
        yield f"log.progress_s={cfg.log.progress_s}: must be a positive number of seconds between progress lines"
    if trainer.max_steps is not None:
        yield from _positive("trainer.max_steps", trainer.max_steps)
    if trainer.loss not in LOSS_NAMES:
        yield f"trainer.loss={trainer.loss}: expected one of {', '.join(LOSS_NAMES)}"
    yield from _checkpoint_problems(cfg)
    parameter_server, serving, hybrid, predicting = (cfg.mode.name == m for m in
                                                     ("parameter_server", "serve", "hybrid", "predict"))
    if hybrid != (cfg.data.name in CLICK_DATASETS):
        yield (f"data={cfg.data.name} with mode={cfg.mode.name}: the click datasets ({', '.join(CLICK_DATASETS)}) "
               "train with mode=hybrid only, and mode=hybrid trains on them only")
    if not (serving or hybrid or predicting):
        yield from _text_problems(cfg)
    if trainer.val_every is None or trainer.val_every < 0:
        yield f"trainer.val_every={trainer.val_every}: must be 0 (validate at epoch ends only) or a number of steps"
    elif trainer.val_every and (parameter_server or hybrid):
        yield (f"trainer.val_every={trainer.val_every}: mode={cfg.mode.name} validates at the end of each epoch "
               "only; set trainer.val_every=0 (data.limit shortens epochs)")
    if not (parameter_server or serving or hybrid or predicting):
        yield from _micro_batch_problems(cfg.pipeline, trainer.batch_size, cfg.runtime.num_worker_threads)
    if world_size < 2:
        yield (f"world size {world_size} (NPROC x NNODES): rpc_train needs at least 2 processes, "
               "a driver and one worker; use NPROC=2 or more")
        return
    loader_problems = list(_loader_problems(cfg, world_size))
    yield from loader_problems
    if loader_problems:
        return
    # The mode lays out its roles after the data workers, as if they were not there.
    world_size = mode_world_size(cfg, world_size)
    if parameter_server:
        yield from _ps_problems(cfg, world_size)
    elif hybrid:
        yield from _hybrid_problems(cfg, world_size)
    elif serving:
        yield from _serve_problems(cfg.serve, world_size)
    elif predicting:
        yield from _predict_problems(cfg)
    else:
        yield from _stage_problems(cfg.pipeline, world_size)
    if not 0.0 < cfg.data.val_fraction < 1.0:
        yield f"data.val_fraction={cfg.data.val_fraction}: must be between 0 and 1"


def _text_problems(cfg: DictConfig) -> Iterator[str]:
    """data=text trains a sequence model (one with a context, models/gpt.py), and only on it."""
    text, sequence = cfg.data.name == "text", "context" in cfg.model
    if text and not sequence:
        yield (f"data=text with model={cfg.model.get('_target_')}: byte-level text trains a sequence model "
               "(one with model.context); use model=gpt")
    elif sequence and not text:
        yield f"model={cfg.model.get('_target_')} with data={cfg.data.name}: it reads bytes; use data=text"
    if not text:
        return
    yield from _positive("model.context", cfg.model.context)
    if cfg.data.val_limit is not None:
        yield from _positive("data.val_limit", cfg.data.val_limit)
    sample = cfg.data.sample
    if sample is not None:
        yield from _positive("data.sample.length", sample.length)
        if not sample.prompt:
            yield "data.sample.prompt is empty: give the text to continue, or set data.sample=null for no samples"
        if sample.temperature < 0:
            yield f"data.sample.temperature={sample.temperature}: must be 0 (greedy) or more"


def _checkpoint_problems(cfg: DictConfig) -> Iterator[str]:
    ckpt = cfg.checkpoint
    if ckpt.every_steps is None or ckpt.every_steps < 0:
        yield (f"checkpoint.every_steps={ckpt.every_steps}: must be 0 (save only at the end) "
               "or a positive number of steps")
    yield from _positive("checkpoint.keep", ckpt.keep)
    if ckpt.resume not in ("auto", "none") and not os.path.isdir(os.path.expanduser(ckpt.resume)):
        yield (f"checkpoint.resume={ckpt.resume}: no such directory; use auto, none, a "
               "checkpoints/step_<N> directory or a run directory")


def _runtime_problems(cfg: DictConfig) -> Iterator[str]:
    runtime = cfg.runtime
    if not runtime.rpc_timeout_s > 0:
        # TensorPipe reads 0 as "no timeout": a stuck worker would hang the job forever.
        yield f"runtime.rpc_timeout_s={runtime.rpc_timeout_s}: must be a positive number of seconds"
    yield from _positive("runtime.num_worker_threads", runtime.num_worker_threads)
    if runtime.threads < 0:
        yield f"runtime.threads={runtime.threads}: must be 0 (share the cores) or a positive count"
    if runtime.allocator not in ALLOCATORS:
        yield f"runtime.allocator={runtime.allocator}: expected one of {', '.join(ALLOCATORS)}"
    if cfg.pipeline.timeline_every < 0:
        yield f"pipeline.timeline_every={cfg.pipeline.timeline_every}: must be 0 (never) or a positive count"
    profile_step, max_steps = cfg.pipeline.profile_step, cfg.trainer.max_steps
    if profile_step is not None:
        yield from _positive("pipeline.profile_step", profile_step)
        if max_steps is not None and profile_step > max_steps >= 1:
            yield (f"pipeline.profile_step={profile_step}: the run stops at trainer.max_steps={max_steps}; "
                   f"profile a step from 1 to {max_steps}")


def _micro_batch_problems(pipe: DictConfig, batch_size: int, rpc_threads: int) -> Iterator[str]:
    yield from _positive("pipeline.micro_batches", pipe.micro_batches)
    if pipe.micro_batches >= rpc_threads:
        # A stage runs micro-batches in order; each one waiting for its turn holds an RPC
        # thread, so as many waiting as there are threads would leave none for the one due.
        yield (f"pipeline.micro_batches={pipe.micro_batches} needs runtime.num_worker_threads > "
               f"{pipe.micro_batches} (it is {rpc_threads}): raise it, or use fewer micro-batches")
    if pipe.micro_batches > batch_size >= 1:
        yield (f"pipeline.micro_batches={pipe.micro_batches} is larger than "
               f"trainer.batch_size={batch_size}: each micro-batch needs at least one sample")


def _loader_problems(cfg: DictConfig, world_size: int) -> Iterator[str]:
    loader = cfg.loader
    if loader.name not in LOADERS:
        yield f"loader.name={loader.name}: expected one of {', '.join(LOADERS)}"
        return
    if loader.on_error not in ON_SAMPLE_ERROR:
        yield f"loader.on_error={loader.on_error}: expected one of {', '.join(ON_SAMPLE_ERROR)}"
    if loader.name != "service":
        return
    if cfg.mode.name == "serve":
        yield "loader=service with mode=serve: serving takes requests, not a data set; use loader=local"
    if loader.workers is None or loader.workers < 1:
        yield f"loader.workers={loader.workers}: must be a positive integer (ranks that make batches)"
        return
    # The mode needs a driver and at least one worker of its own besides the data workers.
    least = {"parameter_server": 2, "hybrid": 2}.get(cfg.mode.name, 1)
    if loader.workers > world_size - 1 - least:
        fewer = f" or loader.workers<={world_size - 1 - least}" if world_size - 1 - least >= 1 else ""
        yield (f"loader.workers={loader.workers} leaves too few ranks in a world of {world_size} (NPROC x NNODES) "
               f"for the driver and mode={cfg.mode.name}'s {least} worker(s); use NPROC x NNODES >= "
               f"{loader.workers + 1 + least}{fewer}")
    yield from _positive("loader.prefetch", loader.prefetch)
    if not loader.timeout_s > 0:
        yield f"loader.timeout_s={loader.timeout_s}: must be a positive number of seconds"
    if loader.cache_mb is None or loader.cache_mb < 0:
        yield f"loader.cache_mb={loader.cache_mb}: must be 0 (no store) or a positive size in MB"
    if loader.routing not in ROUTINGS:
        yield f"loader.routing={loader.routing}: expected one of {', '.join(ROUTINGS)}"


def _predict_problems(cfg: DictConfig) -> Iterator[str]:
    if cfg.data.name != "imagefolder":
        yield f"data={cfg.data.name} with mode=predict: it predicts image files; use data=imagefolder data.root=<dir>"
    if not cfg.predict.out:
        yield "predict.out=null: mode=predict needs the directory to write the prediction files to"
    yield from _positive("predict.split_size", cfg.predict.split_size)
    if cfg.loader.name == "service":
        yield "loader=service with mode=predict: every rank but the driver predicts already; drop loader=service"


def _stage_problems(pipe: DictConfig, world_size: int) -> Iterator[str]:
    if pipe.stages is not None:
        yield from _positive("pipeline.stages", pipe.stages)
        if pipe.stages > world_size - 1:
            yield (f"pipeline.stages={pipe.stages} needs {pipe.stages + 1} processes (a driver and "
                   f"one per stage) but the world has {world_size}; use NPROC={pipe.stages + 1} "
                   f"or pipeline.stages<={world_size - 1}")
    yield from _balance_problems(pipe.balance, num_stages(pipe, world_size))
    if pipe.schedule not in SCHEDULES:
        yield f"pipeline.schedule={pipe.schedule}: expected one of {', '.join(SCHEDULES)}"


def _ps_problems(cfg: DictConfig, world_size: int) -> Iterator[str]:
    """The parameter-server split of the world: a driver, ps.servers servers, >= 1 trainer."""
    ps = cfg.ps
    if ps.servers is None or ps.servers < 1:
        yield f"ps.servers={ps.servers}: must be a positive integer (ranks holding parameter shards)"
    elif ps.servers > world_size - 2:
        fewer = f" or ps.servers<={world_size - 2}" if world_size >= 3 else ""
        yield (f"ps.servers={ps.servers} leaves no trainer in a world of {world_size} (NPROC x NNODES): "
               f"need NPROC >= ps.servers + 2 = {ps.servers + 2} (driver, servers, a trainer){fewer}")
    if ps.clip_grad_norm is not None and not ps.clip_grad_norm > 0:
        yield f"ps.clip_grad_norm={ps.clip_grad_norm}: must be a positive norm, or null for no clipping"
    if ps.staleness_lr and not ps.sync:
        target = str(cfg.optim.get("_target_"))
        if target.rsplit(".", 1)[-1] not in STEP_FOLLOWS_LR:
            yield (f"ps.staleness_lr=true with optim._target_={target}: a stale gradient's step is scaled through "
                   f"the learning rate, which this optimizer's step does not follow; use one of torch.optim's "
                   f"{', '.join(STEP_FOLLOWS_LR)}, or ps.staleness_lr=false")
    if ps.max_staleness is None or ps.max_staleness < 0:
        yield f"ps.max_staleness={ps.max_staleness}: must be 0 or more (updates a gradient may lag)"
    elif not ps.sync and ps.max_staleness == 0 and world_size - 1 - ps.servers > 1:
        # With several async trainers, every other trainer's push makes a copy stale: a bound
        # of 0 would send a trainer back to recompute for ever.
        yield ("ps.max_staleness=0 with ps.sync=false and several trainers: a trainer could retry "
               "for ever; use ps.max_staleness>=1, or ps.sync=true")
    if cfg.trainer.skip_nonfinite:
        # A sync round needs every trainer's gradient: a skipped one would stall the servers.
        yield ("trainer.skip_nonfinite=true: mode=parameter_server stops on a non-finite loss "
               "instead; use trainer.skip_nonfinite=false or mode=pipeline")
    if cfg.device != "cpu":
        yield (f"device={cfg.device}: mode=parameter_server runs on CPU only (servers and trainers "
               "exchange CPU tensors); use device=cpu")


def _hybrid_problems(cfg: DictConfig, world_size: int) -> Iterator[str]:
    """A driver, hybrid.servers embedding servers, >= 1 trainer; settings the mode has."""
    hybrid = cfg.hybrid
    if hybrid.servers is None or hybrid.servers < 1:
        yield f"hybrid.servers={hybrid.servers}: must be a positive integer (ranks holding embedding shards)"
    elif hybrid.servers > world_size - 2:
        yield (f"hybrid.servers={hybrid.servers} leaves no trainer in a world of {world_size} (NPROC x NNODES): "
               f"need NPROC >= hybrid.servers + 2 = {hybrid.servers + 2} (driver, servers, a trainer)")
    if hybrid.sharding not in SHARDINGS:
        yield f"hybrid.sharding={hybrid.sharding}: expected one of {', '.join(SHARDINGS)}"
    if hybrid.embedding_optim not in EMBEDDING_OPTIMS:
        yield f"hybrid.embedding_optim={hybrid.embedding_optim}: expected one of {', '.join(EMBEDDING_OPTIMS)}"
    if not hybrid.embedding_lr > 0:
        yield f"hybrid.embedding_lr={hybrid.embedding_lr}: must be a positive learning rate"
    if hybrid.clip_grad_norm is not None and not hybrid.clip_grad_norm > 0:
        yield f"hybrid.clip_grad_norm={hybrid.clip_grad_norm}: must be a positive norm, or null for no clipping"
    elif hybrid.clip_grad_norm is not None and hybrid.sync:
        # Each server would clip its own shard's part while DDP's dense part goes unclipped: the
        # result would depend on the sharding, and sync mode promises one process's result.
        yield (f"hybrid.clip_grad_norm={hybrid.clip_grad_norm} with hybrid.sync=true: clipping applies to "
               "asynchronous updates only; set hybrid.sync=false or hybrid.clip_grad_norm=null")
    if cfg.model.get("table_rows") is None:
        yield (f"model={cfg.model.get('_target_')}: mode=hybrid shards a DLRM-style model's tables "
               "(model.table_rows); use model=dlrm")
    rows = cfg.data.table_rows
    if not rows or not all(isinstance(r, int) and r >= 1 for r in rows):
        yield f"data.table_rows={rows}: must list each categorical feature's table size, positive integers"
    elif hybrid.sharding == "table" and len(rows) < (hybrid.servers or 1):
        yield (f"hybrid.sharding=table with {hybrid.servers} servers and {len(rows)} tables: a server would hold "
               f"nothing; use hybrid.servers<={len(rows)} or hybrid.sharding=row")
    elif cfg.data.name == "criteo" and len(rows) != 26:
        yield f"data.table_rows has {len(rows)} entries; Criteo has 26 categorical features, one table each"
    elif hybrid.sharding == "row" and min(rows) < (hybrid.servers or 1):
        t = min(range(len(rows)), key=lambda i: rows[i])
        yield (f"hybrid.sharding=row: table {t} has {rows[t]} rows, fewer than the {hybrid.servers} servers it "
               "would be split over; use hybrid.sharding=table or fewer servers")
    if cfg.data.limit is not None and cfg.data.limit < 1:
        yield f"data.limit={cfg.data.limit}: must be at least 1 (or null for all)"
    if cfg.trainer.skip_nonfinite:
        yield ("trainer.skip_nonfinite=true: mode=hybrid stops on a non-finite loss (a sync step needs every "
               "trainer's gradient); use trainer.skip_nonfinite=false")


def _serve_problems(serve: DictConfig, world_size: int) -> Iterator[str]:
    """A front end on rank 0 and whole replicas of serve.stages workers on the others."""
    yield from _positive("serve.stages", serve.stages)
    workers = world_size - 1
    if serve.stages >= 1 and workers % serve.stages:
        yield (f"serve.stages={serve.stages} does not divide the {workers} workers (NPROC x NNODES - 1) into "
               f"replicas; use serve.stages in {[s for s in range(1, workers + 1) if workers % s == 0]} or "
               f"NPROC x NNODES = {serve.stages * max(1, workers // serve.stages) + 1}")
    for key in ("max_batch_size", "max_inflight_batches", "max_queue_size", "threads", "keep_versions"):
        yield from _positive(f"serve.{key}", serve[key])
    if serve.max_queue_size < serve.max_batch_size:
        yield (f"serve.max_queue_size={serve.max_queue_size} is below serve.max_batch_size={serve.max_batch_size}: "
               "a full batch could never queue")
    if serve.max_queue_delay_ms < 0:
        yield f"serve.max_queue_delay_ms={serve.max_queue_delay_ms}: must be 0 (no wait) or more"
    if serve.drain_grace_s < 0:
        yield f"serve.drain_grace_s={serve.drain_grace_s}: must be 0 (refuse at once) or more seconds"
    if serve.routing not in ROUTINGS:
        yield f"serve.routing={serve.routing}: expected one of {', '.join(ROUTINGS)}"
    if not 0 < serve.port < 65536:
        yield f"serve.port={serve.port}: must be a TCP port, 1-65535"
    if not serve.replica_timeout_s > 0:
        yield f"serve.replica_timeout_s={serve.replica_timeout_s}: must be a positive number of seconds"
    if not serve.max_message_mb > 0:
        yield f"serve.max_message_mb={serve.max_message_mb}: must be a positive size in MiB"
    yield from _serve_security_problems(serve)
    if serve.cache_size < 0:
        yield f"serve.cache_size={serve.cache_size}: must be 0 (no cache) or a number of answers to keep"
    if not 0 <= serve.metrics_port < 65536 or (serve.metrics_port and serve.metrics_port == serve.port):
        yield (f"serve.metrics_port={serve.metrics_port}: must be 0 (no metrics) or a TCP port other than "
               f"serve.port={serve.port}")
    if not 0 <= serve.http_port < 65536 or (serve.http_port and serve.http_port in (serve.port, serve.metrics_port)):
        yield (f"serve.http_port={serve.http_port}: must be 0 (no HTTP) or a TCP port other than "
               f"serve.port={serve.port} and serve.metrics_port={serve.metrics_port}")
    if not serve.log_every_s > 0:
        yield f"serve.log_every_s={serve.log_every_s}: must be a positive number of seconds"


def _serve_security_problems(serve: DictConfig) -> Iterator[str]:
    tls = serve.tls
    if bool(tls.cert) != bool(tls.key):
        yield (f"serve.tls.cert={tls.cert} and serve.tls.key={tls.key}: TLS needs both, the server's certificate "
               "and its key (PEM files)")
    if tls.client_ca and not tls.cert:
        yield f"serve.tls.client_ca={tls.client_ca}: mutual TLS needs serve.tls.cert and serve.tls.key too"
    for key in ("cert", "key", "client_ca"):
        if tls[key] and not os.path.isfile(os.path.expanduser(tls[key])):
            yield f"serve.tls.{key}={tls[key]}: no such file; give a PEM file"
    if serve.auth_token_file and not _holds_text(serve.auth_token_file):
        yield (f"serve.auth_token_file={serve.auth_token_file}: no such file, or it is empty; give a file "
               "holding the token")


def _holds_text(path: str) -> bool:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return bool(f.read().strip())


def _balance_problems(balance, stages: int) -> Iterator[str]:
    if isinstance(balance, str):
        if balance not in BALANCE_STRATEGIES:
            yield f"pipeline.balance={balance}: expected {BALANCE_HELP}"
    elif isinstance(balance, Sequence):
        if len(balance) != stages or not all(isinstance(c, int) and c >= 1 for c in balance):
            yield (f"pipeline.balance={list(balance)}: expected {stages} positive layer counts, "
                   f"one per stage")
    else:
        yield f"pipeline.balance={balance}: expected {BALANCE_HELP}"


def validate(cfg: DictConfig, world_size: int) -> None:
    """Raise ConfigError naming the first bad value and what would be valid."""
    for problem in _problems(cfg, world_size):
        raise ConfigError(problem)
