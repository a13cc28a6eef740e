"""runtime.allocator: its values, the library lookup, and launch.sh's one line and exit 2."""

import os
import shutil
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from helpers.launching import REPO
from rpc_train.config.errors import ConfigError
from rpc_train.runtime.allocator import (LIBRARIES, allocator_env, configure_allocator, find_library, is_loaded,
                                         require_library)

pytestmark = pytest.mark.timeout(60)


def launch(*args, wrapper=()):
    """./launch.sh for real (no dry run): these must stop before torchrun starts anything."""
    started = time.monotonic()
    result = subprocess.run([*wrapper, str(REPO / "launch.sh"), *args], cwd=REPO, capture_output=True, text=True,
                            timeout=50, env={**os.environ, "PYTHON": sys.executable})
    return result, time.monotonic() - started


def test_an_unknown_allocator_is_one_line_and_exit_2():
    result, seconds = launch("runtime.allocator=mimalloc")
    assert result.returncode == 2, result.stderr
    assert result.stderr == "error: runtime.allocator=mimalloc: expected one of glibc, jemalloc, tcmalloc\n"
    assert seconds < 30 and "torch.distributed" not in result.stderr


def hidden(path: str) -> tuple:
    """A command prefix that runs a command in a mount namespace of its own (unshare(1)) where
    /dev/null is bound over `path`: the file is there no more, for the lookup as for the dynamic
    loader. Empty where this machine does not allow it (no unprivileged user namespaces)."""
    wrapper = ("unshare", "--user", "--map-root-user", "--mount",
               "sh", "-c", 'mount --bind /dev/null "$0" && exec "$@"', os.path.realpath(path))
    if not shutil.which("unshare") or subprocess.run([*wrapper, "true"], capture_output=True).returncode != 0:
        return ()
    return wrapper


@pytest.mark.parametrize("allocator", sorted(LIBRARIES))
def test_an_absent_library_is_one_line_and_exit_2(allocator):
    name, package = LIBRARIES[allocator]
    path = find_library(allocator)
    wrapper = ()
    if path is not None:  # installed here: hidden, as on a machine without the package
        wrapper = hidden(path)
        if not wrapper:
            pytest.skip(f"{name} is installed and unshare --user --mount may not hide it here")
    result, seconds = launch(f"runtime.allocator={allocator}", wrapper=wrapper)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"error: runtime.allocator={allocator}: {name} not found (ldconfig -p, /usr/lib); "
                             f"install it with `apt-get install {package}`, or use runtime.allocator=glibc\n")
    assert seconds < 30


def test_the_lookup_takes_the_file_it_finds_in_the_directories_given(tmp_path):
    assert find_library("jemalloc", []) is None
    with pytest.raises(ConfigError, match=r"apt-get install libjemalloc2"):
        require_library("jemalloc", [])
    assert find_library("tcmalloc", [str(tmp_path)]) is None
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    found = require_library("tcmalloc", [str(tmp_path / "none"), str(tmp_path)])
    assert found == str(tmp_path / "libtcmalloc_minimal.so.4")


@pytest.mark.skipif(find_library("jemalloc") is None,
                    reason="libjemalloc.so.2 is not installed (apt-get install libjemalloc2)")
def test_the_environment_preloads_the_library_and_keeps_the_users_settings():
    path = find_library("jemalloc")
    jemalloc = OmegaConf.create({"allocator": "jemalloc", "hold_freed_memory": True})
    assert allocator_env(OmegaConf.create({"allocator": "glibc", "hold_freed_memory": True}), {}) == {}
    assert allocator_env(jemalloc, {}) == {"LD_PRELOAD": path,
                                           "MALLOC_CONF": "narenas:1,dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    # The user's MALLOC_CONF stands; their preloads come after ours, and ours is not doubled.
    env = allocator_env(jemalloc, {"MALLOC_CONF": "narenas:2", "LD_PRELOAD": f"libfoo.so {path}"})
    assert env == {"LD_PRELOAD": f"{path}:libfoo.so"}
    assert allocator_env(OmegaConf.create({"allocator": "jemalloc", "hold_freed_memory": False}), {}) == {
        "LD_PRELOAD": path}


@pytest.mark.parametrize("allocator", sorted(LIBRARIES))
def test_a_process_not_started_under_the_allocator_it_was_asked_for_fails(allocator):
    # This test process runs glibc's malloc: a rank started without launch.sh's LD_PRELOAD.
    if is_loaded(allocator):
        pytest.skip(f"pytest itself runs under {allocator}")
    with pytest.raises(ConfigError, match=rf"^runtime.allocator={allocator}: this process's malloc is .*libc.*"
                                          r"start it with ./launch.sh"):
        configure_allocator(OmegaConf.create({"allocator": allocator, "hold_freed_memory": True}))
