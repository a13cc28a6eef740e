"""A launched job with runtime.allocator=jemalloc: every rank runs it, and steps stop faulting."""

import pytest

from helpers.events import read_scalars
from helpers.launching import SMOKE, launch, ok
from rpc_train.runtime.allocator import find_library

# Slow: a whole launch (17 s); tests/unit/test_allocator.py checks each allocator's faults in seconds.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120),
              pytest.mark.skipif(find_library("jemalloc") is None,
                                 reason="libjemalloc.so.2 is not installed (apt-get install libjemalloc2)")]

# Stage 0 holds the convnet's first block at 128 px: its activations (16 x 32 x 128 x 128
# floats) are 32 MB, past glibc's ceiling. Measured: 106k-142k page faults per step on stage 0
# with glibc and runtime.hold_freed_memory, 40-800 with jemalloc.
LARGE = ["model=convnet", "data=synthetic", "data.shape=[3,128,128]", "pipeline.micro_batches=2",
         "pipeline.balance=[1,5]", "trainer.max_steps=6", "trainer.log_every=2"]


def test_every_rank_runs_jemalloc_and_its_steps_stop_faulting(tmp_path):
    ok(launch([*SMOKE, *LARGE, "runtime.allocator=jemalloc"], tmp_path, timeout=100))
    path = find_library("jemalloc").rsplit("/", 1)[1]
    for rank in range(3):  # each rank checked its own malloc (/proc/self/maps) and said so
        log = (tmp_path / f"rank{rank}.log").read_text()
        assert "allocator: jemalloc (/" in log and path in log and "MALLOC_CONF=narenas:1," in log, rank
    scalars = read_scalars(tmp_path)
    for stage in ("stage0", "stage1"):
        faults = [value for _, value in scalars[f"{stage}/page_faults"]][1:]  # after the first steps
        # Fewer than one 32 MB activation's pages (8192) a step.
        assert faults and max(faults) < 8192, (stage, faults)
