"""`python -m rpc_train.bench.pipeline [--model convnet] [--csv out.csv]`: pipeline vs single-process speed.

One table of training samples/s: the same model, data and batch trained in this process with one
thread and with every core (with `--device cuda`: on one GPU), then through a K-stage pipeline
(one RPC world of K+1 processes that this script starts) for each micro-batch count. The
single-process rows run before the world starts, so no two rows compete for the cores or the GPU.
"""

import argparse
import csv
import itertools
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from rpc_train.runtime.allocator import configure_allocator, describe, restart_under_allocator
from rpc_train.bench.bound import add_split_bounds, measure_splits, plan_splits, split_notes
from rpc_train.bench.peer import peer_medians
from rpc_train.runtime.local_world import run_in_local_world
from rpc_train.data.datasets import make_loaders
from rpc_train.runtime.devices import check_device, mps_running
from rpc_train.config.errors import ConfigError
from rpc_train.training.local import LocalEngine
from rpc_train.pipeline.engine import PipelineEngine
from rpc_train.config.compose import compose, one_line
from rpc_train.metrics.table import format_table
from rpc_train.runtime.world import World, usable_cores
from rpc_train.config.validate import validate

# The ratio columns ("vs 1 thread", ...) come from the baseline rows (see `baseline_rows`).
COLUMNS = ["setup", "micro_batches", "threads_processes", "median_step_ms", "samples_per_s"]
HEADERS = ["setup", "micro-batches", "threads/processes", "median step ms", "samples/s"]
TAIL = [("vs_peer", "vs peer"), ("pipeline_efficiency", "efficiency"), ("gpipe_bound", "GPipe bound")]


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rpc_train.bench.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnet", help="a conf/model option")
    p.add_argument("--data", help="a conf/data option (default: synthetic, or text for --model gpt)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: the baseline is one GPU and each rank runs on cuda:(rank mod #gpus)")
    p.add_argument("--micro-batches", default="1,2,4,8", help="comma-separated counts")
    p.add_argument("--stages", type=int, default=2, help="pipeline stages K (K+1 processes)")
    p.add_argument("--schedules", default="1f1b,gpipe", help="comma-separated pipeline.schedule values")
    p.add_argument("--no-peer", action="store_true", help="skip the torch.distributed.pipelining rows")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the single-process rows and the split bound (their columns read '-'): for a slow "
                        "model when rpc_train's rows and per-stage notes are what is wanted")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the pipeline world may run")
    args = p.parse_args(argv)
    args.data = args.data or ("text" if args.model == "gpt" else "synthetic")
    args.micro_batches = [int(m) for m in args.micro_batches.split(",") if m.strip()]
    args.schedules = [name for name in args.schedules.split(",") if name.strip()]
    if args.steps < 1 or args.warmup < 0 or args.stages < 1 or not args.micro_batches:
        p.error("need --steps >= 1, --warmup >= 0, --stages >= 1 and at least one micro-batch count")
    return args


def compose_config(args: argparse.Namespace) -> DictConfig:
    """The config every row shares; checked for each micro-batch count before any process starts."""
    overrides = [f"model={args.model}", f"data={args.data}", f"trainer.batch_size={args.batch_size}",
                 f"pipeline.stages={args.stages}", f"device={args.device}",
                 # Stage workers get one thread each: the target is K single-core stages.
                 "runtime.threads=1",
                 # A stuck stage fails the run within a minute instead of hanging it.
                 "runtime.rpc_timeout_s=60", *args.override]
    cfg = compose(overrides)
    check_device(cfg.device)
    for m in args.micro_batches:
        for schedule in args.schedules:
            cfg.pipeline.micro_batches, cfg.pipeline.schedule = m, schedule
            validate(cfg, args.stages + 1)
    return cfg


def draw_batches(cfg: DictConfig, count: int) -> list:
    """Up to `count` training batches, drawn once so the timed loop never loads data."""
    loader, _ = make_loaders(cfg.data, cfg.trainer.batch_size, cfg.seed)
    return list(itertools.islice(loader, count))


def time_steps(engine, batches: list, warmup: int, steps: int) -> tuple:
    """(seconds of each timed step, their StepResults); the loop itself does nothing else."""
    feed = itertools.cycle(batches)
    for _ in range(warmup):
        engine.train_step(*next(feed))
    seconds, results = [], []
    for _ in range(steps):
        x, y = next(feed)
        start = time.perf_counter()
        results.append(engine.train_step(x, y))
        seconds.append(time.perf_counter() - start)
    return seconds, results


def local_row(cfg: DictConfig, batches: list, threads: int, warmup: int, steps: int, ratio: str) -> Dict:
    torch.set_num_threads(threads)
    on_gpu = cfg.device == "cuda"
    label = f"1 GPU ({torch.cuda.get_device_name()})" if on_gpu else f"{threads} thread" + ("s" if threads > 1 else "")
    # LocalEngine reads the loss every step (.item()), so each timed step ends with the GPU idle.
    seconds, _ = time_steps(LocalEngine(cfg, cfg.device), batches, warmup, steps)
    if on_gpu:
        torch.cuda.empty_cache()  # the pipeline's stages need the memory next
    return {"setup": f"single-process, {label}", "micro_batches": "-", "threads_processes": label,
            "median_step_ms": 1e3 * statistics.median(seconds), "ratio": ratio}


def baseline_rows(cfg: DictConfig, batches: list, warmup: int, steps: int) -> List[Dict]:
    """What the pipeline rows are compared with: one thread and all cores, or one GPU."""
    if cfg.device == "cuda":
        return [local_row(cfg, batches, 1, warmup, steps, "vs 1 GPU")]
    return [local_row(cfg, batches, 1, warmup, steps, "vs 1 thread"),
            local_row(cfg, batches, usable_cores(), warmup, steps, "vs all cores")]


def pipeline_rows(world: World, cfg: DictConfig, runs: List[tuple], warmup: int, steps: int) -> List[Dict]:
    """On the driver: a fresh PipelineEngine per (schedule, micro-batches, split), on the same workers."""
    batches = draw_batches(cfg, warmup + steps)
    k = world.size - 1
    rows, where = [], f"{k}x1 thread" + (" on cuda" if cfg.device == "cuda" else "")
    for schedule, m, counts in runs:
        cfg.pipeline.schedule, cfg.pipeline.micro_batches, cfg.pipeline.balance = schedule, m, counts
        engine = PipelineEngine(cfg, world.size)
        engine.wait_ready()
        seconds, results = time_steps(engine, batches, warmup, steps)
        stage_ms = {key: statistics.median(r.stats[key] for r in results)
                    for key in results[0].stats if key.startswith(("stage", "pipeline/"))}
        rows.append({"setup": f"rpc_train {schedule} K={k}", "schedule": schedule, "micro_batches": m,
                     "threads_processes": f"{world.size} proc: driver + {where}",
                     "median_step_ms": 1e3 * statistics.median(seconds), "stage_ms": stage_ms,
                     "counts": list(engine.counts)})
        engine.close()  # the old stages are freed before the next ones are built
    return rows


def peer_rows(cfg: DictConfig, runs: List[tuple], batches: list, k: int, warmup: int, steps: int,
              timeout: float) -> List[Dict]:
    """torch.distributed.pipelining over gloo on the same stage split: the peer to beat.

    Its schedules need at least K micro-batches, so smaller counts have no peer row.
    """
    runs = [run for run in runs if run[1] >= k]
    medians = peer_medians(cfg, k, runs, batches, steps, warmup, timeout) if runs else {}
    return [{"setup": f"torch pipelining {schedule} K={k}", "peer_of": schedule, "micro_batches": m,
             "threads_processes": f"{k} proc x1 thread", "median_step_ms": 1e3 * medians[(schedule, m)]}
            for schedule, m, _ in runs]


def add_ratios(rows: List[Dict], batch: int, k: int, devices: int) -> List[tuple]:
    """Samples/s, speed-ups over each baseline row, efficiency; returns the (column, header) added.

    `devices`: how many the K stages actually spread over (cores, or GPUs round-robin).
    """
    baselines = [row for row in rows if "ratio" in row]
    ratios = [(row["ratio"].replace(" ", "_"), row["ratio"]) for row in baselines]
    one = baselines[0]["median_step_ms"] if baselines else None
    for row in rows:
        ms = row["median_step_ms"]
        row["samples_per_s"] = 1e3 * batch / ms
        for (key, _), base in zip(ratios, baselines):
            row[key] = base["median_step_ms"] / ms
        m = row["micro_batches"]
        piped = isinstance(m, int)
        # Efficiency: the speedup each stage's device delivers; GPipe's bubble caps it at m/(m+K-1).
        row["pipeline_efficiency"] = one / ms / min(k, devices) if piped and one else "-"
        row["gpipe_bound"] = m / (m + k - 1) if piped else "-"
    # rpc_train against torch.distributed.pipelining, same schedule and micro-batches.
    peers = {(row["peer_of"], row["micro_batches"]): row["median_step_ms"] for row in rows if "peer_of" in row}
    for row in rows:
        peer = peers.get((row.get("schedule"), row["micro_batches"]))
        row["vs_peer"] = peer / row["median_step_ms"] if peer else "-"
    return ratios + TAIL


def machine_line() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = (f", {torch.cuda.device_count()}x {torch.cuda.get_device_name()} (MPS {'on' if mps_running() else 'off'})"
            if torch.cuda.is_available() else "")
    return f"machine: {usable_cores()} usable cores, {cpu}{gpus}, torch {torch.__version__}"


def stage_notes(rows: List[Dict]) -> str:
    """Per-stage compute per step (median ms, from the stages' own clocks), page faults, the
    optimizer-step RPC and the bubble: where the time went."""
    notes = []
    for row in rows:
        if "stage_ms" in row:
            ms = row["stage_ms"]
            stages = sorted({key.split("/")[0] for key in ms if key.startswith("stage")})
            parts = ", ".join(f"{s} fwd {ms[s + '/forward_ms']:.1f} bwd {ms[s + '/backward_ms']:.1f}"
                              f" faults {ms[s + '/page_faults']:.0f} peak {ms[s + '/peak_memory_mb']:.1f} MB"
                              for s in stages)
            notes.append(f"  {row['setup']} m={row['micro_batches']} (layers {row['counts']}): {parts}; "
                         f"step {ms['pipeline/step_ms']:.1f}, bubble {ms['pipeline/bubble_fraction']:.2f}, "
                         f"handoff fwd {ms['pipeline/forward_handoff_ms']:.1f} "
                         f"bwd {ms['pipeline/backward_handoff_ms']:.1f}, "
                         f"messages {ms['pipeline/messages_per_micro_batch']:.0f}/micro-batch "
                         f"{ms['pipeline/messages_per_step']:.0f}/step")
    return ("per step (medians): stage compute ms, page faults, peak memory (CPU: activations held for "
            "the backward; GPU: allocated), the stages' optimizer step ms (gradient sums included), "
            "bubble fraction, median ms from a micro-batch's end on one stage to its start on the next "
            "(forward) or previous (backward) one, RPC messages:\n" + "\n".join(notes)) if notes else ""


def write_csv(path: str, rows: List[Dict], columns: List[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        cfg = compose_config(args)
        # runtime.allocator=jemalloc|tcmalloc: this process and the worlds it spawns run under it.
        restart_under_allocator(cfg.runtime, "rpc_train.bench.pipeline", argv)
        batches = draw_batches(cfg, args.warmup + args.steps)
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    configure_allocator(cfg.runtime)  # as every pipeline and peer process does
    rows = [] if args.no_baselines else baseline_rows(cfg, batches, args.warmup, args.steps)
    torch.set_num_threads(1)  # the parent only waits while the world runs
    on_gpu = cfg.device == "cuda"
    devices = torch.cuda.device_count() if on_gpu else usable_cores()
    plans = plan_splits(cfg, args.stages, args.micro_batches)
    # Stages that share a device do not overlap, and there is no bound of this shape for them.
    timed = devices >= args.stages and not on_gpu and not args.no_baselines
    splits = measure_splits(cfg, plans) if timed else None
    runs = [(schedule, m, plans[m]) for schedule in args.schedules for m in args.micro_batches]
    rows += run_in_local_world(cfg, args.stages + 1, pipeline_rows, (runs, args.warmup, args.steps), args.timeout)
    if not args.no_peer and not on_gpu:
        rows += peer_rows(cfg, runs, batches, args.stages, args.warmup, args.steps, args.timeout)
    added = add_ratios(rows, args.batch_size, args.stages, devices)
    add_split_bounds(rows, splits)
    added.append(("split_bound", "split bound"))
    columns, headers = COLUMNS + [c for c, _ in added], HEADERS + [h for _, h in added]
    print(machine_line())
    print(f"model={args.model} data={args.data} shape={list(cfg.data.shape)} batch={args.batch_size} "
          f"device={cfg.device} steps={args.steps} (median) warmup={args.warmup} overrides={args.override or '-'}")
    print(describe(cfg.runtime))
    if on_gpu and not args.no_peer:
        # gloo's send/recv take CPU tensors only, and NCCL refuses two ranks on one GPU.
        print("no torch.distributed.pipelining rows on cuda")
    print(format_table(rows, columns, headers))
    print(stage_notes(rows))
    print(split_notes(splits))
    if args.csv:
        write_csv(args.csv, rows, columns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
