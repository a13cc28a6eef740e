"""The loader group's settings: composed, checked in one line before any process starts."""

import subprocess
import sys

import pytest

from helpers.launching import REPO
from rpc_train.config.compose import compose
from rpc_train.config.errors import ConfigError
from rpc_train.config.validate import validate
from rpc_train.runtime.roles import data_worker_names, hybrid_roles, ps_roles, stage_ranks

SERVICE = ["loader=service"]


@pytest.mark.parametrize("overrides, world, needle", [
    (["loader.workers=0"], 5, "loader.workers=0: must be a positive integer"),
    (["loader.workers=2"], 3, "loader.workers=2 leaves too few ranks in a world of 3"),
    (["loader.workers=2", "mode=parameter_server"], 4, "loader.workers=2 leaves too few ranks in a world of 4"),
    (["loader.prefetch=0"], 3, "loader.prefetch=0: must be a positive integer"),
    (["loader.timeout_s=0"], 3, "loader.timeout_s=0.0: must be a positive number of seconds"),
    (["loader.cache_mb=-1"], 3, "loader.cache_mb=-1.0: must be 0 (no store) or a positive size in MB"),
    (["loader.routing=random"], 3, "loader.routing=random: expected one of least_loaded, round_robin, power_of_two"),
    (["loader.on_error=ignore"], 3, "loader.on_error=ignore: expected one of raise, skip"),
    (["mode=serve"], 3, "loader=service with mode=serve"),
])
def test_a_bad_loader_setting_is_one_line(overrides, world, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose([*SERVICE, *overrides]), world)
    assert str(err.value).startswith(needle) and "\n" not in str(err.value)


def test_the_launcher_refuses_before_any_process_starts():
    result = subprocess.run([str(REPO / "launch.sh"), *SERVICE, "loader.workers=3"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "NPROC": "4", "PYTHON": sys.executable})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: loader.workers=3 leaves too few ranks in a world of 4 (NPROC x NNODES) for the driver and "
        "mode=pipeline's 1 worker(s); use NPROC x NNODES >= 5 or loader.workers<=2"]


def test_the_data_workers_come_right_after_the_driver_and_every_role_after_them():
    cfg = compose([*SERVICE, "loader.workers=2"])
    assert data_worker_names(cfg) == ["worker1", "worker2"]
    assert stage_ranks(cfg, 5) == [3, 4]  # NPROC=5: the default pipeline keeps its 2 stages
    ps = ps_roles(compose([*SERVICE, "loader.workers=2", "mode=parameter_server"]), 6)
    assert (ps.servers, ps.trainers) == (["worker3"], ["worker4", "worker5"])
    hybrid = hybrid_roles(compose([*SERVICE, "loader.workers=1", "experiment=dlrm_synthetic"]), 5)
    assert (hybrid.servers, hybrid.trainers) == (["worker2"], ["worker3", "worker4"])
    assert data_worker_names(compose([])) == [] and stage_ranks(compose([]), 3) == [1, 2]  # loader=local
