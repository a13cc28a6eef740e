"""A real `./launch.sh` job's training throughput, for the benchmarks that time whole jobs."""

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[2]  # the checkout, where launch.sh is


def job_rate(args: List[str], nproc: int, timeout: float) -> float:
    """Run `./launch.sh args` with NPROC=nproc; the mean of its logged
    `throughput/samples_per_s` windows after the first (start-up) one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory(prefix="bench-job-") as run_dir:
        env = {**os.environ, "RUN_DIR": run_dir, "PYTHON": sys.executable, "NPROC": str(nproc)}
        cmd = [str(REPO / "launch.sh"), *args]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
        acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        acc.Reload()
        windows = [e.value for e in acc.Scalars("throughput/samples_per_s")]
    return statistics.mean(windows[1:] or windows)
