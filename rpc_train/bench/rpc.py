"""`python -m rpc_train.bench.rpc`: what one RPC costs here, next to plain torch.distributed.

Between two processes of one machine: the round-trip latency of a small tensor, and the
throughput of 1 MB to 64 MB tensors, through torch RPC (TensorPipe, as rpc_train uses it) and
through `torch.distributed` send/recv over gloo. The gloo group is built inside the same two
processes, after RPC has started, so both columns share one machine state.
"""

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc


from rpc_train.runtime.local_world import free_port, run_in_local_world
from rpc_train.config.compose import compose
from rpc_train.runtime.world import worker_name

MB = 1 << 20
PEER = worker_name(1)


def echo(x: torch.Tensor) -> torch.Tensor:
    return x


def size_of(x: torch.Tensor) -> int:
    return x.numel()  # a tiny reply: the timing is the one-way transfer


def median_s(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _plan(sizes_mb: List[int], repeats: int):
    """The same sequence of transfers on both gloo ranks: (tensor elements, how many times)."""
    return [(1, repeats + 3)] + [(mb * MB // 4, max(3, repeats // 4) + 3) for mb in sizes_mb]


def gloo_peer(port: int, sizes_mb: List[int], repeats: int) -> None:
    """Rank 1 of the gloo group: echo the small tensor, acknowledge each large one."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2)
    ack = torch.zeros(1)
    for elements, times in _plan(sizes_mb, repeats):
        buf = torch.empty(elements)
        for _ in range(times):
            dist.recv(buf, src=0)
            dist.send(buf if elements == 1 else ack, dst=0)
    dist.destroy_process_group()


def _gloo_side(sizes_mb: List[int], repeats: int) -> Dict[int, float]:
    port = free_port()
    peer = rpc.rpc_async(PEER, gloo_peer, args=(port, sizes_mb, repeats), timeout=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    out, ack = {}, torch.zeros(1)
    for elements, times in _plan(sizes_mb, repeats):
        x, back = torch.ones(elements), torch.empty(elements if elements == 1 else 1)

        def ping():
            dist.send(x, dst=1)
            dist.recv(back if elements == 1 else ack, src=1)

        out[elements] = median_s(ping, times - 3)
    dist.destroy_process_group()
    peer.wait()
    return out


def measure(world, cfg, sizes_mb: List[int], repeats: int) -> List[dict]:
    """Runs on the driver of a 2-process world; one row per transfer size."""
    small = torch.ones(1)
    rows = [{"transfer": "4 B round trip", "rpc": median_s(lambda: rpc.rpc_sync(PEER, echo, args=(small,)), repeats)}]
    for mb in sizes_mb:
        x = torch.ones(mb * MB // 4)
        count = max(3, repeats // 4)
        rows.append({"transfer": f"{mb} MB one way", "mb": mb,
                     "rpc": median_s(lambda: rpc.rpc_sync(PEER, size_of, args=(x,)), count)})
    gloo = _gloo_side(sizes_mb, repeats)
    for row, elements in zip(rows, [1] + [mb * MB // 4 for mb in sizes_mb]):
        row["gloo"] = gloo[elements]
    return rows


def format_rows(rows: List[dict]) -> str:
    lines = [f"{'transfer':<16} {'rpc ms':>9} {'gloo ms':>9} {'rpc MB/s':>9} {'gloo MB/s':>9} {'rpc/gloo time':>13}"]
    for r in rows:
        rate = (lambda s: f"{r['mb'] / s:9.0f}") if "mb" in r else (lambda s: f"{'':>9}")
        lines.append(f"{r['transfer']:<16} {1e3 * r['rpc']:9.3f} {1e3 * r['gloo']:9.3f} "
                     f"{rate(r['rpc'])} {rate(r['gloo'])} {r['rpc'] / r['gloo']:13.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m rpc_train.bench.rpc", description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mb", default="1,4,16,64", help="comma-separated tensor sizes")
    p.add_argument("--repeats", type=int, default=200, help="round trips timed for the latency row")
    p.add_argument("--override", action="append", default=[],
                   help="Hydra override for both processes, e.g. runtime.transports=[shm,uv] (repeatable)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    cfg = compose(["runtime.threads=1", *args.override])
    rows = run_in_local_world(cfg, 2, measure, args=(sizes, args.repeats), timeout_s=600)
    print(f"torch {torch.__version__}, 2 processes on this machine, medians"
          + (f", {' '.join(args.override)}" if args.override else "") + f"\n{format_rows(rows)}")


if __name__ == "__main__":
    main()
