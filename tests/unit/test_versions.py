"""The install check CI runs after `pip install -e ".[dev]"` (.ci/check_versions.py)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "check_versions.py"


def _load():
    spec = importlib.util.spec_from_file_location("check_versions", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_this_install_is_within_the_stated_ranges():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("resolved: ")
    for name in ("torch", "protobuf", "grpcio", "tritonclient"):
        assert f"{name} " in result.stdout


def test_every_key_package_has_a_floor_and_a_ceiling():
    for name, requirement in _load().stated_requirements(ROOT / "pyproject.toml").items():
        operators = {spec.operator for spec in requirement.specifier}
        assert ">=" in operators and "<" in operators, f"{name}: {requirement} leaves the major version open"


def test_a_client_resolved_below_its_minimum_is_named():
    check = _load()
    requirements = {"tritonclient": Requirement("tritonclient[grpc]>=2.60,<3"), "protobuf": Requirement("protobuf>=6.30,<7")}
    bad = check.problems(requirements, {"tritonclient": "2.41.0", "protobuf": "6.33.6"})
    assert len(bad) == 1 and bad[0].startswith("tritonclient 2.41.0 resolved outside pyproject.toml's range")
    missing = check.problems(requirements, {"tritonclient": "2.73.0"})
    assert len(missing) == 1 and missing[0].startswith("protobuf is not installed")
