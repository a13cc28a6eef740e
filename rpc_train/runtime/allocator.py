"""Keep freed tensor memory in the process for reuse instead of handing it back to the OS.

glibc's malloc returns large freed blocks to the kernel (munmap, or madvise when it trims a
heap), and the next micro-batch's activations then fault every page back in, zeroed by the
kernel. A stage allocates on whichever RPC or autograd thread runs the work, and glibc gives
each thread an arena of its own (up to 8 per core), each growing and trimming its own heap.
With the thresholds and the single arena set here a stage stops faulting its activations in
on every micro-batch and computes as fast as one process (`python -m rpc_train.bench.pipeline`
prints the faults per step; docs/benchmarks.md has the convnet's figures, before and after).
The cost: a process keeps the peak of its heap (as PyTorch's CUDA caching allocator does).
"""

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters and values.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_NEVER_TRIM = -1
# The largest mmap threshold glibc takes on 64-bit: blocks up to 32 MB (a ResNet activation at
# batch 64) come from the heap and are reused; larger ones are still mapped per allocation.
_MMAP_THRESHOLD = 32 << 20


def configure_allocator(runtime) -> bool:
    """Apply `runtime.hold_freed_memory` to this process; benchmarks call it in every process
    they time, baselines and peers included, so that their rows compare the same allocator."""
    return hold_freed_memory() if runtime.hold_freed_memory else False


def hold_freed_memory() -> bool:
    """Set glibc's thresholds for this process; False where there is no glibc (macOS, musl).

    Call it before the process starts threads: threads that already have an arena keep it.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        log.info("runtime.hold_freed_memory: this C library has no mallopt; allocator left as is")
        return False
    settings = [(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _NEVER_TRIM), (_M_ARENA_MAX, 1)]
    return all([bool(mallopt(param, value)) for param, value in settings])
