"""Every command README.md and docs/*.md show is checked: Hydra overrides compose and pass the
launcher's checks; the flag-parsing tools answer --help and know the flags shown.

A launch's composition is the one the ranks and `./launch.sh --cfg job` make (rpc_train's
compose(), from conf/), followed by preflight's pure-Python checks: validate() against the world
NPROC x NNODES makes, and the data files. Two checks of `python -m rpc_train.preflight` are left
to the real launches: the GPU check (it depends on the machine, not the docs) and the serving
check (it needs a trained run and free ports; tests/multiprocess/test_doc_commands_run.py serves one).
"""

import itertools
import os
import re
import subprocess
import sys
from functools import lru_cache

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from helpers.datasets import criteo_line, write_cifar10, write_imagefolder, write_mnist
from helpers.doc_commands import doc_commands, page_commands
from helpers.launching import REPO
from rpc_train.config.compose import compose
from rpc_train.config.validate import validate
from rpc_train.data.files import check_available

pytestmark = pytest.mark.timeout(60)

COMMANDS = doc_commands()
HYDRA = [c for c in COMMANDS if c.hydra]
FLAGS = [c for c in COMMANDS if not c.hydra]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A home holding what the docs' commands read: tiny datasets in their real formats under
    ~/data (an image folder of 10 classes in ~/data/images) and ~/criteo, and the run dir
    outputs/x that the checkpoint commands resume from (the page's `RUN_DIR=outputs/x
    ./launch.sh` line trains it first)."""
    home = tmp_path_factory.mktemp("home")
    write_cifar10(str(home / "data"))
    write_imagefolder(str(home / "data" / "images"), classes=10, per_class=1)
    for class_name in ("MNIST", "FashionMNIST"):
        write_mnist(str(home / "data"), class_name)
    (home / "criteo").mkdir()
    (home / "criteo" / "train.txt").write_text(criteo_line() * 4)
    (home / "outputs" / "x" / "checkpoints" / "step_500").mkdir(parents=True)
    return home


def jobs(overrides):
    """The overrides of each job: one, or for a sweep (`-m a=1,2`) every combination, as Hydra's
    basic sweeper makes them."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.input_line] for o in parsed]
    keys = [o.key_or_group for o in parsed]
    return [[c if not o.is_sweep_override() else f"{k}={c}" for o, k, c in zip(parsed, keys, combo)]
            for combo in itertools.product(*choices)]


def test_the_docs_show_commands_in_every_mode():
    # The extraction itself: a change that stopped finding commands would pass every test below.
    shown = {str(c) for c in COMMANDS}
    assert "./launch.sh" in shown
    for mode in ("mode=parameter_server", "experiment=dlrm_synthetic", "mode=serve", "pipeline.micro_batches=8",
                 "loader=service", "mode=predict"):
        assert any(mode in c for c in shown), mode
    assert {c.where.split(":")[0] for c in COMMANDS} >= {"README.md", "docs/pipeline.md", "docs/serving.md",
                                                         "docs/data-service.md"}


def test_extraction_follows_the_shell(tmp_path, monkeypatch):
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text("""Text with `./launch.sh not=this` inline.

```bash
pip install -e . && NPROC=4 ./launch.sh a=1 \\
    b='"~/x"'   # a comment, not an override
python -m rpc_train.bench.ps --trainers 2; ./launch.sh ... c=3
tensorboard --logdir outputs
```

```python
./launch.sh not=python
```
""")
    monkeypatch.setattr("helpers.doc_commands.REPO", tmp_path)
    found = page_commands(page)
    assert [(c.where, c.environment, c.module, c.args) for c in found] == [
        ("docs/page.md:4", {"NPROC": "4"}, None, ("a=1", 'b="~/x"')),
        ("docs/page.md:6", {}, "rpc_train.bench.ps", ("--trainers", "2")),
        ("docs/page.md:6", {}, None, ("c=3",)),
    ]


@pytest.mark.parametrize("command", HYDRA, ids=[c.where for c in HYDRA])
def test_command_composes_and_passes_the_launch_checks(command, home, monkeypatch):
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    env = command.environment
    world_size = int(env.get("NPROC", "3")) * int(env.get("NNODES", "1"))
    overrides = [os.path.expandvars(arg) for arg in command.overrides()]  # the shell's $HOME
    for job in (jobs(overrides) if command.sweep else [overrides]):
        cfg = compose(job)
        validate(cfg, world_size)
        check_available(cfg.data)


@lru_cache(maxsize=None)
def help_text(module: str) -> str:
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=50)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.parametrize("command", FLAGS, ids=[c.where for c in FLAGS])
def test_flag_command_answers_help_and_knows_its_flags(command):
    known = set(re.findall(r"(?<![\w-])--?[\w-]+", help_text(command.module)))
    shown = {arg.split("=")[0] for arg in command.args if arg.startswith("-")}
    assert shown <= known, f"{command}: {sorted(shown - known)} not in its --help"
