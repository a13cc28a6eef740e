"""`python -m rpc_train.bench.anatomy`: where a pipeline micro-batch's time goes, piece by piece.

A profile of the per-micro-batch path of `PipelineEngine` (driver + K stages on this machine,
a model small enough that messaging dominates): one round trip, a forward through the stages,
the stages' optimizer steps and compute, then whole training steps at 1 to 8 micro-batches,
so the differences say what each piece costs. It times the engine's own path (`train_step`:
one call to stage 0, which has every stage step), counts each step's RPC messages
(pipeline/messages.py), and measures the CPU time each process spends per step: on a machine
with fewer cores than processes, the CPU a micro-batch costs, more than its messages'
latency, sets the step.
"""

import argparse
import resource
import statistics
from typing import Callable, Dict, List

import torch
import torch.distributed.rpc as rpc

from rpc_train.bench.rpc import echo, median_s
from rpc_train.runtime.local_world import run_in_local_world
from rpc_train.pipeline.engine import PipelineEngine
from rpc_train.config.compose import compose


NAME = 56  # the width of the row names


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return 1e3 * median_s(fn, repeats, warmup=10)


def _rows(engine: PipelineEngine, x: torch.Tensor, y: torch.Tensor, repeats: int) -> List[tuple]:
    first = engine.workers[0]
    x, y = x.to(engine.device), y.to(engine.device)  # where the engine keeps them (a GPU with device=cuda)

    rows = [("RPC round trip, driver <-> stage 0", median_ms(lambda: rpc.rpc_sync(first, echo, args=(x,)), repeats)),
            ("forward and loss through the stages (eval_step)", median_ms(lambda: engine.eval_step(x, y), repeats))]
    step_ms, compute_ms = [], []
    for i in range(repeats // 2 + 5):
        result = engine.train_step(x, y)
        if i >= 5:
            step_ms.append(result.stats["pipeline/step_ms"])
            compute_ms.append(sum(v for k, v in result.stats.items() if k.endswith(("forward_ms", "backward_ms"))))
    rows += [("stages' optimizer steps (stage 0's, one call to stage 1)", statistics.median(step_ms)),
             ("stage compute in a 1-micro-batch step (stages' clocks)", statistics.median(compute_ms))]
    return rows


def cpu_ms() -> float:
    """This process's CPU time so far (user + system), in ms."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return 1e3 * (usage.ru_utime + usage.ru_stime)


def cpu_per_call(engine: PipelineEngine, fn: Callable[[], object], calls: int) -> List[float]:
    """The CPU ms per call of the driver and of each stage's process while `fn` runs `calls` times."""
    def read():
        return [cpu_ms()] + [rpc.rpc_sync(worker, cpu_ms) for worker in engine.workers]

    before = read()
    for _ in range(calls):
        fn()
    return [(b - a) / calls for a, b in zip(before, read())]


def measure(world, cfg, repeats: int) -> Dict[int, List[tuple]]:
    """On the driver: the anatomy at one micro-batch, then train_step at more, same batch."""
    engine = PipelineEngine(cfg, world.size)
    engine.wait_ready()
    batch = cfg.trainer.batch_size
    x, y = torch.randn(batch, *cfg.data.shape), torch.randint(0, cfg.data.num_classes, (batch,))
    rows = _rows(engine, x, y, repeats)
    engine.close()
    for m in (1, 2, 4, 8):
        if m > batch:
            break
        cfg.pipeline.micro_batches = m
        engine = PipelineEngine(cfg, world.size)
        engine.wait_ready()
        stats = engine.train_step(x, y).stats
        ms = median_ms(lambda: engine.train_step(x, y), repeats // 2)
        rows.append((f"train_step, {m} micro-batch{'es' if m > 1 else ''}", ms,
                     stats["pipeline/messages_per_micro_batch"], stats["pipeline/messages_per_step"],
                     *cpu_per_call(engine, lambda: engine.train_step(x, y), repeats // 2)))
        engine.close()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m rpc_train.bench.anatomy", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", help="a conf/model option")
    p.add_argument("--batch-size", type=int, default=8, help="the batch; 1 micro-batch = all of it")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per row")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    args = p.parse_args(argv)
    cfg = compose([
        f"model={args.model}", "data=synthetic", f"trainer.batch_size={args.batch_size}",
        "pipeline.micro_batches=1", "pipeline.stages=2", "runtime.threads=1", "runtime.rpc_timeout_s=60",
        # Every micro-batch in flight at once: what the messaging costs, not held back by the
        # schedule (as the figures in docs/benchmarks.md were taken).
        "pipeline.schedule=gpipe", *args.override])
    rows = run_in_local_world(cfg, 3, measure, (args.repeats,), timeout_s=600)
    print(f"torch {torch.__version__}, driver + 2 stages on this machine, model={args.model}, "
          f"batch {args.batch_size}, medians")
    print(f"{'':<{NAME}} {'median':>11} {'messages per':>26} {'CPU ms per step':>30}")
    print(f"{'':<{NAME}} {'':>11} {'micro-batch':>13} {'step':>12} {'driver':>10} {'stage 0':>9} {'stage 1':>9}")
    for name, ms, *figures in rows:
        columns = "".join(f"{n:13.1f}" for n in figures[:2]) + "".join(f"{n:10.2f}" for n in figures[2:])
        print(f"{name:<{NAME}} {ms:8.2f} ms{columns}")
    steps = [(int(name.split()[1]), ms, sum(figures[2:])) for name, ms, *figures in rows
             if name.startswith("train_step, ")]
    if len(steps) > 1:
        (m0, t0, c0), (m1, t1, c1) = steps[0], steps[-1]
        print(f"each added micro-batch: {(t1 - t0) / (m1 - m0):.2f} ms of the step, {(c1 - c0) / (m1 - m0):.2f} ms "
              f"of CPU in all processes (train_step at {m0} and {m1})")


if __name__ == "__main__":
    main()
