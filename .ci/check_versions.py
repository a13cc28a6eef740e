"""Print the versions the install resolved for the key packages; fail on one outside its range.

    python3 .ci/check_versions.py      # .ci/run calls it right after `pip install -e ".[dev]"`

The ranges are the ones pyproject.toml states (its dependencies and the dev extra), so this
script holds no version of its own: a registry that made pip pick an old tritonclient to
satisfy a newer protobuf (as happened with protobuf 7) fails CI here, with the culprit named,
instead of running the tests against a client from years ago.
"""

import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, List

from packaging.requirements import Requirement

KEY_PACKAGES = ("torch", "torchvision", "protobuf", "grpcio", "grpcio-tools", "tritonclient", "aiohttp",
                "hydra-core", "numpy", "tensorboard")


def stated_requirements(pyproject: Path) -> Dict[str, Requirement]:
    """The key packages' requirements from pyproject.toml, by package name."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["dev"]
    requirements = {Requirement(line).name: Requirement(line) for line in lines}
    return {name: requirements[name] for name in KEY_PACKAGES}


def problems(requirements: Dict[str, Requirement], installed: Dict[str, str]) -> List[str]:
    """One line per key package that is missing or outside its stated range."""
    out = []
    for name, requirement in requirements.items():
        found = installed.get(name)
        if found is None:
            out.append(f"{name} is not installed; pyproject.toml asks for {requirement}")
        elif not requirement.specifier.contains(found, prereleases=True):
            out.append(f"{name} {found} resolved outside pyproject.toml's range {requirement.specifier}")
    return out


def installed_versions(names) -> Dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def main() -> int:
    requirements = stated_requirements(Path(__file__).resolve().parents[1] / "pyproject.toml")
    installed = installed_versions(requirements)
    print("resolved: " + ", ".join(f"{name} {installed.get(name, 'missing')}" for name in requirements))
    bad = problems(requirements, installed)
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
