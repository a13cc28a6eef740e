"""Run ./launch.sh for real (torchrun, RPC) and check how it ended."""

import os
import subprocess
import sys
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"

SMOKE = ["experiment=smoke"]


def launch_env(run_dir: Path, **env: str) -> dict:
    """The environment of a launch: the run dir pinned, and `helpers` importable on every rank
    (the fault drills' step hooks live there)."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    # Run inside a Slurm job, launch.sh would take that job's layout (nodes, rendezvous, run dir).
    outer = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**outer, "RUN_DIR": str(run_dir), "PYTHON": sys.executable, "PYTHONPATH": path, **env}


def launch(args: List[str], run_dir: Path, timeout: float = 180, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    """./launch.sh, run to its end, from `cwd` (where outputs/ would be)."""
    return subprocess.run([str(REPO / "launch.sh"), *args], cwd=cwd, env=launch_env(run_dir, **env),
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
