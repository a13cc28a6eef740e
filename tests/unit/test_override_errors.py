"""An override Hydra's grammar rejects is one line naming it and the quoting that would pass."""

import os
import subprocess
import sys

import pytest

from helpers.datasets import write_mnist
from helpers.launching import REPO
from rpc_train.config.compose import compose
from rpc_train.data.datasets import load_datasets

pytestmark = pytest.mark.timeout(60)

TILDE_ERROR = ("error: override 'data.root=~/data' does not parse (Hydra's grammar); "
               """quote the value: 'data.root="~/data"'""")


def run(*command, **env):
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=50,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def test_preflight_names_an_unparsable_override_in_one_line():
    result = run(sys.executable, "-m", "rpc_train.preflight", "model=resnet18", "data.root=~/data")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [TILDE_ERROR]


def test_cfg_job_names_it_in_one_line_too():
    # launch.sh --cfg runs rpc_train.train itself, whose Hydra main would print three lines and exit 1.
    result = run(str(REPO / "launch.sh"), "--cfg", "job", "data.root=~/data")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [TILDE_ERROR] and result.stdout == ""


def test_a_key_that_does_not_parse_points_to_the_grammar():
    result = run(sys.executable, "-m", "rpc_train.preflight", "data..root=x")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: override 'data..root=x' does not parse (Hydra's grammar); "
        "see https://hydra.cc/docs/advanced/override_grammar/basic"]


def test_the_suggested_quoting_passes_and_the_data_code_expands_the_tilde(tmp_path, monkeypatch):
    write_mnist(str(tmp_path / "data"), n_train=20)
    checked = run(sys.executable, "-m", "rpc_train.preflight", "data=mnist", 'data.root="~/data"', HOME=str(tmp_path))
    assert checked.returncode == 0, checked.stderr
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = compose(["data=mnist", 'data.root="~/data"'])
    assert cfg.data.root == "~/data"  # kept as written; the data code expands it when it reads
    train, val = load_datasets(cfg.data, seed=0)
    assert (len(train), len(val)) == (18, 2)
