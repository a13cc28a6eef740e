"""Shared test helpers: compose the real config, run the real launcher, read real event files."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from hydra import compose, initialize_config_dir

from rpc_train.config.schema import register_configs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/dataset_writers.py and friends

register_configs()


def compose_config(overrides: Optional[List[str]] = None):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def launch(args: List[str], run_dir: Path, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """Run ./launch.sh for real (torchrun, RPC) with the run dir pinned to `run_dir`."""
    full_env = {**os.environ, "RUN_DIR": str(run_dir), "PYTHON": sys.executable, **env}
    return subprocess.run([str(REPO / "launch.sh"), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_scalars(run_dir: Path) -> Dict[str, List[tuple]]:
    """Every scalar in the run's event files, as tag -> [(step, value), ...], via TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def event_tags(run_dir: Path) -> Dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc.Tags()


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def exported_model(run: Path) -> dict:
    import torch

    return torch.load(run / "model.pt", weights_only=True)


def assert_same_parameters(run: Path, reference: Path) -> None:
    """The two runs' exported models are equal, bit for bit."""
    import torch

    mine, theirs = exported_model(run), exported_model(reference)
    assert mine.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(mine[name], value), name


SMOKE = ["experiment=smoke"]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One real 3-process smoke launch shared by the tests that only read its outputs."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    result = launch(SMOKE + ["pipeline.timeline_every=10", "pipeline.trace_step=12"], run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result
