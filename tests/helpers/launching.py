"""Run ./launch.sh for real (torchrun, RPC) and check how it ended."""

import os
import subprocess
import sys
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"

SMOKE = ["experiment=smoke"]


def launch(args: List[str], run_dir: Path, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """./launch.sh with the run dir pinned to `run_dir`. Every rank can import `helpers`
    (the fault drills' step hooks live there)."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "RUN_DIR": str(run_dir), "PYTHON": sys.executable, "PYTHONPATH": path, **env}
    return subprocess.run([str(REPO / "launch.sh"), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
