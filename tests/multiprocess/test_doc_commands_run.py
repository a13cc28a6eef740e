"""The quickstart and each mode's first command, taken from the docs' text and run for real
through launch.sh (torchrun, RPC): they exit 0 and leave their metrics and event files.

Each runs as written: all of them take well under a minute on 2 cores (20-35 s), so none needs
a `trainer.max_steps` to shorten it. Only the run dir (RUN_DIR) and, for serving, the run to
serve and free ports are added.
"""

import json

import numpy as np
import pytest

from helpers.doc_commands import DocCommand, page_commands
from helpers.events import read_scalars
from helpers.launching import REPO, launch, ok
from helpers.serving import ServingJob, digits_rows, served_reference, triton_input

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

def first_command(page: str, naming: str = "") -> DocCommand:
    """The page's first launch whose overrides include `naming`."""
    return next(c for c in page_commands(REPO / page) if c.launcher and naming in " ".join(c.args))


def run(command: DocCommand, run_dir):
    return ok(launch(list(command.args), run_dir, timeout=200, **command.environment))


def assert_trained(run_dir, metric: str) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metric in metrics, metrics
    scalars = read_scalars(run_dir)
    assert "train/loss" in scalars and metric in scalars, sorted(scalars)
    return metrics


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """README's quickstart job as written (`pip install -e ".[dev]" && ./launch.sh`): the default
    digits MLP, about 40 s on 2 cores."""
    command = first_command("README.md")
    assert command.args == () and command.environment == {}, command
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    run(command, run_dir)
    return run_dir


def test_quickstart_trains_the_default_job(quickstart):
    metrics = assert_trained(quickstart, "val/accuracy")
    assert metrics["val/accuracy"] > 0.9  # the README says about 98%
    assert (quickstart / "model.pt").is_file()


@pytest.mark.parametrize("page, naming, metric, better_than", [
    ("docs/pipeline.md", "", "val/accuracy", 0.5),  # chance: 0.1
    ("docs/parameter-server.md", "mode=parameter_server", "val/accuracy", 0.5),
    ("docs/hybrid.md", "experiment=dlrm_synthetic", "val/auc", 0.8),  # the page says about 0.86
    ("docs/data-service.md", "loader=service", "val/accuracy", 0.9),  # the default job's batches, from 2 workers
])
def test_each_mode_first_command_trains(page, naming, metric, better_than, tmp_path):
    command = first_command(page, naming)
    run(command, tmp_path / "run")
    assert assert_trained(tmp_path / "run", metric)[metric] > better_than


def test_serving_first_command_serves_the_quickstart_run(quickstart, tmp_path):
    import tritonclient.grpc as triton

    command = first_command("docs/serving.md", "mode=serve")
    others = [arg for arg in command.args if arg != "mode=serve"]  # ServingJob names the mode and the run
    job = ServingJob(quickstart, tmp_path / "serve", others, nproc=int(command.environment.get("NPROC", "3")))
    try:
        job.wait_ready()
        rows = digits_rows(4)
        logits = triton.InferenceServerClient(job.url).infer("mlp", [triton_input(rows)]).as_numpy("logits")
        np.testing.assert_allclose(logits, served_reference(quickstart, rows), rtol=1e-5, atol=1e-5)
    finally:
        output = job.stop()
    assert job.proc.returncode == 0, output[-3000:]
