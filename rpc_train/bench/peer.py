"""The peer for the pipeline benchmark: `torch.distributed.pipelining` on the same split.

K processes over gloo, one per stage (the peer has no driver process), each stage the same
contiguous layers as in rpc_train's rows (the split the bench planned), stepped by ScheduleGPipe or
Schedule1F1B, then a local optimizer step per stage. Rows match `rpc_train.bench.pipeline`'s.
"""

import queue
import statistics
import time
import traceback
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from rpc_train.runtime.allocator import configure_allocator
from rpc_train.runtime.local_world import free_port
from rpc_train.training.builders import build_model, build_optimizer
from rpc_train.pipeline.partition import stage_bounds
from rpc_train.training.loss import loss_of

SCHEDULES = ("gpipe", "1f1b")


def _schedule(stage, name: str, micro_batches: int):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name]
    return cls(stage, n_microbatches=micro_batches, loss_fn=loss_of)


def _timed_steps(schedule, optimizer, rank: int, k: int, batches, steps: int, warmup: int) -> List[float]:
    times = []
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        dist.barrier()  # every stage starts the step together, as the driver's step does
        start = time.perf_counter()
        if rank == 0:
            schedule.step(x)
        elif rank == k - 1:
            schedule.step(target=y, losses=[])
        else:
            schedule.step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _stage_main(rank: int, k: int, port: int, container: dict, runs: list, batches, steps: int,
                warmup: int, results) -> None:
    from torch.distributed.pipelining import PipelineStage

    try:
        torch.set_num_threads(1)  # K single-core stages, as in the rpc_train rows
        cfg = OmegaConf.create(container)
        configure_allocator(cfg.runtime)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=k)
        layers = list(build_model(container["model"], cfg.seed))
        for name, m, counts in runs:  # the split the bench planned: every rank the same one
            module = torch.nn.Sequential(*[layers[i] for i in stage_bounds(counts)[rank]])
            optimizer, _ = build_optimizer(module.parameters(), container["optim"], None)
            stage = PipelineStage(module, rank, k, torch.device("cpu"))
            times = _timed_steps(_schedule(stage, name, m), optimizer, rank, k, batches, steps, warmup)
            if rank == 0:
                results.put(("ok", (name, m, statistics.median(times))))
        dist.destroy_process_group()
    except BaseException:
        results.put(("error", f"stage {rank}:\n{traceback.format_exc()}"))
        raise


def peer_medians(cfg: DictConfig, k: int, runs: List[tuple], batches, steps: int, warmup: int,
                 timeout_s: float = 1800.0) -> Dict[tuple, float]:
    """Median step seconds of torch.distributed.pipelining for each run (schedule, micro-batches,
    layer counts per stage), by (schedule, micro-batches)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port, container = free_port(), OmegaConf.to_container(cfg, resolve=True)
    procs = [ctx.Process(target=_stage_main, daemon=True, name=f"peer-stage{r}",
                         args=(r, k, port, container, runs, batches, steps, warmup, results))
             for r in range(k)]
    medians: Dict[tuple, float] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.start()
        while len(medians) < len(runs):
            try:
                status, payload = results.get(timeout=0.5)
            except queue.Empty:
                dead = [(p.name, p.exitcode) for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"torch.distributed.pipelining: stage(s) died or timed out: {dead}")
                continue
            if status == "error":
                raise RuntimeError(f"torch.distributed.pipelining failed on {payload}")
            name, m, median = payload
            medians[(name, m)] = median
        return medians
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
