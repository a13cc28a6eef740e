"""`python -m rpc_train.bench.loader`: an input-bound job's samples/s, by where its batches are made.

The benchmark writes an ImageFolder of JPEGs (`--images`, `--side` px, 10 classes), and one
consumer takes `--batches` batches of the default training augmentation
(RandomResizedCrop + flip + normalise to `--image-size`) and runs a small convnet's forward
and backward on each (single-threaded, as a pipeline driver or trainer here is). Rows:
- local: decoded and augmented in the consumer's own process (loader=local);
- DataLoader k: torch's DataLoader with k worker processes over the same samples (the peer);
- service k: loader=service with k data worker ranks (driver + k processes, as the peer);
- service k, store warm: the same with loader.cache_mb, timed over epoch 2 (nothing decoded).
Columns: samples/s, the consumer's share of time waiting for batches, CPU seconds per sample
in the processes that made the batches, and their peak RSS. Every process is on this machine:
on 2 cores, rows past 2 workers share the cores with the consumer.
"""

import argparse
import os
import resource
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from rpc_train.config.compose import compose
from rpc_train.loader.maker import SampleDataset
from rpc_train.loader.service import consumer_loaders, start_data_service
from rpc_train.metrics.table import format_table, rate_cell
from rpc_train.runtime.local_world import run_in_local_world

COLUMNS = ["row", "samples_per_s", "vs_peer", "input_wait", "cpu_ms_per_sample", "peak_rss_mb"]
HEADERS = ["row", "samples/s", "vs DataLoader k", "input wait", "worker CPU ms/sample", "worker peak RSS MB"]


def write_images(root: str, count: int, side: int, seed: int = 0) -> None:
    """`count` JPEGs in 10 class folders: smooth gradients with noise, sized like photos once compressed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    for i in range(count):
        folder = os.path.join(root, f"class{i % 10}")
        os.makedirs(folder, exist_ok=True)
        base = (ramp[None, :, None] * rng.random(3) + ramp[:, None, None] * rng.random(3)) / 2
        pixels = np.clip(base + rng.normal(0, 24, (side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"img{i:05d}.jpg"), quality=90)


def small_convnet(size: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def cpu_seconds(pids) -> float:
    """User and system CPU seconds of these processes so far (Linux's /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def consume(batches, count: int, size: int, warmup: int = 2, producers=None) -> Dict[str, float]:
    """Train the small model on `count` batches after `warmup`; samples/s and the wait share.
    `producers(iterator)`: the pids that make the batches, whose CPU per sample is measured."""
    torch.manual_seed(0)
    model = small_convnet(size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    pids = producers(it) if producers else []
    cpu = cpu_seconds(pids)
    waited = samples = 0.0
    started = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        x, y = next(it)
        waited += time.perf_counter() - t0
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        samples += len(y)
    seconds = time.perf_counter() - started
    row = {"samples_per_s": samples / seconds, "input_wait": waited / seconds}
    if pids:
        row["cpu_ms_per_sample"] = 1e3 * (cpu_seconds(pids) - cpu) / samples
    return row


def local_row(cfg, count: int) -> Dict[str, float]:
    train, _ = consumer_loaders(cfg, None, "bench")
    cpu = time.process_time()
    row = consume(train.batches(0), count, cfg.data.image_size)
    row["cpu_ms_per_sample"] = 1e3 * (time.process_time() - cpu) / ((count + 2) * cfg.trainer.batch_size)
    return {"row": "local (in the consumer)", **row}


def dataloader_row(cfg, count: int, workers: int) -> Dict[str, float]:
    """torch's DataLoader peer, in a child process of its own so that its workers' rusage is its alone."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_dataloader_child, args=(cfg, count, workers, results))
    proc.start()
    row = results.get(timeout=1200)
    proc.join()
    return row


def _dataloader_child(cfg, count: int, workers: int, results) -> None:
    torch.set_num_threads(1)
    train, _ = consumer_loaders(cfg, None, "bench")
    maker = train.producer.makers["train"]
    dataset = SampleDataset(maker.source, maker.transform, cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.trainer.batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(cfg.seed), prefetch_factor=2)
    # The iterator's worker processes (a private attribute: torch offers no public handle on them).
    row = consume(loader, count, cfg.data.image_size, producers=lambda it: [w.pid for w in it._workers])
    del loader  # its workers exit, so their peak RSS is in the children's rusage
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    results.put({"row": f"DataLoader k={workers}", **row})


def service_rows(world, cfg, count: int, warm: bool) -> Dict[str, float]:
    """On the driver of a local world of 1 + loader.workers processes."""
    service = start_data_service(cfg)
    train, _ = consumer_loaders(cfg, service, "driver")
    if warm:  # epoch 1 fills the stores; epoch 2 is timed
        for _ in train.batches(0):
            pass
    service.pop_stats()
    row = consume(train.batches(1 if warm else 0), count, cfg.data.image_size)
    stats = [s for s in service.pop_stats() if s]
    row.update(cpu_ms_per_sample=1e3 * sum(s["cpu_s_per_sample"] * s["samples_per_s"] for s in stats)
               / max(sum(s["samples_per_s"] for s in stats), 1e-9),
               peak_rss_mb=max(s["peak_rss_mb"] for s in stats))
    return row


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=256, help="pixels a side of the JPEGs written")
    parser.add_argument("--image-size", type=int, default=96, help="the augmentation's crop (data.image_size)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=30, help="timed batches a row (after 2 of warm-up)")
    parser.add_argument("--workers", default="1,2,3", help="k for the DataLoader and service rows")
    parser.add_argument("--cache-mb", type=float, default=512.0)
    parser.add_argument("--prefetch", type=int, default=4, help="loader.prefetch of the service rows")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as root:
        write_images(root, args.images, args.side)
        base = ["data=imagefolder", f"data.root={root}", "data.num_classes=10", f"data.image_size={args.image_size}",
                f"trainer.batch_size={args.batch_size}", "runtime.rpc_timeout_s=600"]
        cfg = compose(base)
        torch.set_num_threads(1)
        rows = [local_row(cfg, args.batches)]
        peers = {k: dataloader_row(cfg, args.batches, k) for k in ks if k <= 2}
        rows += peers.values()
        for k in ks:
            for warm in ([False, True] if k == 2 else [False]):
                served = compose([*base, "loader=service", f"loader.workers={k}", f"loader.prefetch={args.prefetch}",
                                  f"loader.cache_mb={args.cache_mb if warm else 0}"])
                row = run_in_local_world(served, k + 1, service_rows, (args.batches, warm), timeout_s=1200)
                rows.append({"row": f"service k={k}" + (", store warm (epoch 2)" if warm else ""), **row})
    for row in rows:  # against the DataLoader with as many worker processes, where there is one
        k = int(row["row"].split("k=")[1][0]) if "k=" in row["row"] else None
        if "service" in row["row"] and k in peers:
            row["vs_peer"] = row["samples_per_s"] / peers[k]["samples_per_s"]
    print(format_table(rows, COLUMNS, HEADERS, cell=rate_cell))


if __name__ == "__main__":
    main()
