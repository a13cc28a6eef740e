"""`python -m rpc_train.bench.cores`: do single-thread trainings slow each other down here, without RPC?

The control for the pipeline benchmark: K one-thread stages can only be K times faster than
one thread if K one-thread jobs run side by side at full speed on this machine. This trains the
same model in 1, then 2, ... independent processes at once (one thread each, no RPC, no
communication) and prints each one's median step next to the step of one alone.
"""

import argparse
import statistics
from typing import List

import torch
import torch.multiprocessing as mp

from rpc_train.runtime.allocator import configure_allocator
from rpc_train.bench.pipeline import draw_batches, time_steps
from rpc_train.training.local import LocalEngine
from rpc_train.config.compose import compose
from rpc_train.runtime.world import usable_cores


def _job(cfg, warmup: int, steps: int, start, results) -> None:
    torch.set_num_threads(1)
    configure_allocator(cfg.runtime)
    engine, batches = LocalEngine(cfg), draw_batches(cfg, warmup + steps)
    start.wait()  # every job times its steps at the same moment
    seconds, _ = time_steps(engine, batches, warmup, steps)
    results.put(statistics.median(seconds))


def side_by_side(cfg, jobs: int, warmup: int, steps: int) -> List[float]:
    """Median step seconds of each of `jobs` processes training at once."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(jobs), ctx.Queue()
    procs = [ctx.Process(target=_job, args=(cfg, warmup, steps, start, results), daemon=True) for _ in range(jobs)]
    for p in procs:
        p.start()
    try:
        return sorted(results.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m rpc_train.bench.cores", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnet", help="a conf/model option")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--jobs", type=int, default=usable_cores(), help="the most processes at once")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    cfg = compose([
        f"model={args.model}", "data=synthetic", f"trainer.batch_size={args.batch_size}"])
    print(f"torch {torch.__version__}, {usable_cores()} usable cores, model={args.model}, "
          f"batch {args.batch_size}, one thread per job, medians")
    alone = None
    for jobs in range(1, args.jobs + 1):
        steps = side_by_side(cfg, jobs, args.warmup, args.steps)
        alone = alone or steps[0]
        print(f"{jobs} job(s) at once: step " + ", ".join(f"{1e3 * s:.1f} ms" for s in steps)
              + f"; slowest vs alone {max(steps) / alone:.2f}x")


if __name__ == "__main__":
    main()
