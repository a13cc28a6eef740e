"""runtime.hold_freed_memory: training steps stop page-faulting their activations back in."""

import subprocess
import sys

import pytest

from helpers.launching import REPO

pytestmark = pytest.mark.timeout(120)

# A stage's pattern in one process: each step on another thread, as RPC threads take turns.
STEPS = """
import resource, sys, threading, torch
from omegaconf import OmegaConf
from models.convnet import ConvNet
from rpc_train.runtime.allocator import configure_allocator

torch.set_num_threads(1)
held = configure_allocator(OmegaConf.create({"hold_freed_memory": sys.argv[1] == "true"}))
model, x, y = ConvNet([3, 32, 32], 10), torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))

def steps(n):
    for _ in range(n):
        worker = threading.Thread(target=lambda: torch.nn.functional.cross_entropy(model(x), y).backward())
        worker.start()
        worker.join()

steps(3)  # warm-up: the first steps grow the heap
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps(10)
print(held, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_step(hold: bool) -> float:
    result = subprocess.run([sys.executable, "-c", STEPS, str(hold).lower()], cwd=REPO,
                            capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stderr[-3000:]
    held, faults = result.stdout.split()
    assert held == str(hold)  # glibc: the thresholds were taken, or left alone when off
    return float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt thresholds are glibc's")
def test_held_memory_is_reused_instead_of_faulted_back_in():
    default, held = faults_per_step(False), faults_per_step(True)
    # Measured: ~1000 faults per step with glibc's defaults, ~50 with memory held.
    assert held * 4 < default, (held, default)
