"""Keep freed tensor memory in the process for reuse instead of handing it back to the OS.

glibc's malloc returns large freed blocks to the kernel (munmap, or madvise when it trims a
heap), and the next micro-batch's activations then fault every page back in, zeroed by the
kernel. A stage allocates on whichever RPC or autograd thread runs the work, and glibc gives
each thread an arena of its own (up to 8 per core), each growing and trimming its own heap.
With the thresholds and the single arena set here a stage stops faulting its activations in
on every micro-batch and computes as fast as one process (`python -m rpc_train.bench.pipeline`
prints the faults per step; docs/benchmarks.md has the convnet's figures, before and after).
The cost: a process keeps the peak of its heap (as PyTorch's CUDA caching allocator does).

glibc's thresholds stop at 32 MB: larger tensors (ResNet-50's activations at 224 px) are still
mapped and faulted in afresh on every use. `runtime.allocator=jemalloc|tcmalloc` replaces malloc
with a caching allocator that keeps those too. It must be loaded before the process starts
(LD_PRELOAD), so launch.sh preloads it (the environment comes from `allocator_env`, through
`python -m rpc_train.preflight`) and the benchmarks restart themselves under it
(`restart_under_allocator`); `python -m rpc_train.runtime.allocator --library jemalloc` prints
the library's path.
"""

import argparse
import ctypes
import ctypes.util
import logging
import os
import subprocess
import sys
import sysconfig
from typing import Dict, Iterable, List, Optional

from rpc_train.config.errors import ConfigError

log = logging.getLogger(__name__)

# mallopt(3) parameters and values.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_NEVER_TRIM = -1
# The largest mmap threshold glibc takes on 64-bit: blocks up to 32 MB (a ResNet activation at
# batch 64) come from the heap and are reused; larger ones are still mapped per allocation.
_MMAP_THRESHOLD = 32 << 20

# runtime.allocator values other than glibc: (shared object, the Debian/Ubuntu package with it).
LIBRARIES = {"jemalloc": ("libjemalloc.so.2", "libjemalloc2"),
             "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4")}
# With runtime.hold_freed_memory, the setting that makes each allocator keep freed memory; set
# only where the user has not set that variable. jemalloc by default purges dirty pages over 10 s,
# and allocations of 8 MB or more (a dedicated arena, `oversize_threshold`) at once whenever the
# default decay is positive: -1 (never) is the value that keeps those too. Its 4 arenas per core
# are what glibc's are: a micro-batch on another RPC thread lands in another arena, which faults
# its own copy of the peak in, so one arena, as hold_freed_memory sets for glibc. gperftools'
# tcmalloc shares one page heap among threads and returns free spans to the OS gradually
# (TCMALLOC_RELEASE_RATE, default 1); 0 never does. docs/benchmarks.md ("Large tensors") has
# the faults with and without them.
HOLD_SETTINGS = {"jemalloc": ("MALLOC_CONF", "narenas:1,dirty_decay_ms:-1,muzzy_decay_ms:-1"),
                 "tcmalloc": ("TCMALLOC_RELEASE_RATE", "0")}


def library_dirs() -> List[str]:
    """Where `find_library` looks: the directories of the dynamic loader's cache (`ldconfig -p`),
    then Debian's multiarch directories and /usr/local/lib."""
    dirs = []
    ldconfig = next((p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), "ldconfig")
    try:
        cache = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        cache = ""
    for line in cache.splitlines():
        if "=>" in line:
            dirs.append(os.path.dirname(line.split("=>", 1)[1].strip()))
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        dirs += [f"/usr/lib/{multiarch}", f"/lib/{multiarch}"]
    dirs += ["/usr/lib", "/usr/local/lib"]
    return list(dict.fromkeys(dirs))


def find_library(allocator: str, dirs: Optional[Iterable[str]] = None) -> Optional[str]:
    """The path of `allocator`'s shared object in `dirs` (default `library_dirs()`), or None."""
    name = LIBRARIES[allocator][0]
    for directory in library_dirs() if dirs is None else dirs:
        path = os.path.join(directory, name)
        if os.path.isfile(path):  # a regular file: not a dangling link, nor a device bound over it
            return path
    return None


def require_library(allocator: str, dirs: Optional[Iterable[str]] = None) -> str:
    """`find_library`, or a ConfigError that says what would install it."""
    path = find_library(allocator, dirs)
    if path is None:
        name, package = LIBRARIES[allocator]
        raise ConfigError(f"runtime.allocator={allocator}: {name} not found (ldconfig -p, /usr/lib); "
                          f"install it with `apt-get install {package}`, or use runtime.allocator=glibc")
    return path


def allocator_env(runtime, environ: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The variables a process must start with to run under `runtime.allocator`: none for glibc;
    LD_PRELOAD (the library ahead of any the user preloads) and, with runtime.hold_freed_memory,
    the allocator's HOLD_SETTINGS unless the user set that variable."""
    environ = os.environ if environ is None else environ
    if runtime.allocator not in LIBRARIES:
        return {}
    path = require_library(runtime.allocator)
    preloaded = [p for p in environ.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    env = {"LD_PRELOAD": ":".join([path] + [p for p in preloaded if p != path])}
    name, value = HOLD_SETTINGS[runtime.allocator]
    if runtime.hold_freed_memory and name not in environ:
        env[name] = value
    return env


def malloc_library() -> Optional[str]:
    """The file of the shared object whose `malloc` this process calls (the preloaded one wins
    symbol lookup), from /proc/self/maps; None where that cannot be told (not Linux)."""
    address = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= address < high:
                    return fields[5].strip() if len(fields) == 6 else None
    except OSError:
        pass
    return None


def is_loaded(allocator: str) -> bool:
    """Whether this process's malloc is the library of `allocator` (jemalloc or tcmalloc)."""
    library = os.path.basename(malloc_library() or "")
    return library.startswith(LIBRARIES[allocator][0].split(".so")[0] + ".so")


def configure_allocator(runtime) -> bool:
    """Apply `runtime.allocator` and `runtime.hold_freed_memory` to this process; every rank and
    every process a benchmark times (baselines and peers included) calls it. True when glibc's
    thresholds were set.

    With jemalloc or tcmalloc nothing is set here (their tuning is in the environment the process
    started with), but a process that was asked for one and does not run it fails with one line:
    `python -m rpc_train.train` started without launch.sh would otherwise train on glibc, without
    its thresholds either, the slowest of the three, while its config and logs say jemalloc.
    """
    allocator = runtime.get("allocator", "glibc")
    if allocator == "glibc":
        return hold_freed_memory() if runtime.hold_freed_memory else False
    if not is_loaded(allocator):
        raise ConfigError(f"runtime.allocator={allocator}: this process's malloc is {malloc_library() or 'unknown'}, "
                          f"not {LIBRARIES[allocator][0]}; start it with ./launch.sh, which preloads it, or "
                          f"with LD_PRELOAD={find_library(allocator) or LIBRARIES[allocator][0]}")
    log.info(describe(runtime))
    return False


def restart_under_allocator(runtime, module: str, argv: List[str]) -> None:
    """Replace this process (exec: same pid) with `python -m module argv` under
    `runtime.allocator`, unless it runs under it already: for the commands that run without
    launch.sh (the benchmarks), at the top of their main. Processes they spawn inherit it."""
    if runtime.allocator not in LIBRARIES or is_loaded(runtime.allocator):
        return
    env = allocator_env(runtime)
    if env["LD_PRELOAD"].split(":")[0] in os.environ.get("LD_PRELOAD", ""):
        return  # preloaded and still not malloc: configure_allocator says so instead of looping
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], {**os.environ, **env})


def describe(runtime) -> str:
    """One line for a benchmark's header: the allocator this process runs and its settings."""
    if runtime.allocator == "glibc":
        held = "mallopt thresholds and one arena" if runtime.hold_freed_memory else "defaults"
        return f"allocator: glibc ({held}: runtime.hold_freed_memory={runtime.hold_freed_memory})"
    name = HOLD_SETTINGS[runtime.allocator][0]
    return (f"allocator: {runtime.allocator} ({malloc_library()}, "
            f"{name}={os.environ.get(name, 'unset')})")


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


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rpc_train.runtime.allocator",
                                description="Print the path of runtime.allocator's library (exit 2 if absent).")
    p.add_argument("--library", required=True, choices=sorted(LIBRARIES))
    args = p.parse_args(argv)
    try:
        print(require_library(args.library))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
