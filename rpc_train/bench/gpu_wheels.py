"""`python -m rpc_train.bench.gpu_wheels [--dest .whl]`: the wheels a lent GPU machine lacks, for gpu_check.

The lent machines (docs/benchmarks.md, "On a GPU") have torch with CUDA and most of the
scientific stack, but not Hydra nor the serving extras, and reach no registry. This downloads,
here, wheels for their Python (3.12 on x86-64 Linux) at the versions installed on this machine,
into `.whl/` (git-ignored), which the device call carries and installs with
`pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
"""

import argparse
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import List, Optional

# Not on the machines at all (their package list: rpc_train's imports, and tritonclient's for
# the serving test).
MISSING = ["hydra-core", "omegaconf", "antlr4-python3-runtime", "grpcio-tools", "grpcio-health-checking",
           "tritonclient", "python-rapidjson"]
# There, in versions nobody has read: carried so that grpcio-tools and the health service run
# on the grpcio and protobuf they require (protobuf>=6.33.5,<7, grpcio>=1.81.1).
MATCHED = ["grpcio", "protobuf"]
# Published as a source archive only (4.9.3, which Hydra 1.3 pins): built into a wheel here
# (pure Python, so any Python 3 takes it).
SOURCE_ONLY = {"antlr4-python3-runtime"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rpc_train.bench.gpu_wheels", description=__doc__.splitlines()[0])
    p.add_argument("--dest", default=".whl", help="the folder for the wheels (default .whl, git-ignored)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    return p.parse_args(argv)


def project(wheel: Path) -> str:
    """A wheel file's project name, normalized: grpcio_tools-1.81.1-cp312-....whl -> grpcio-tools."""
    return wheel.name.split("-")[0].lower().replace("_", "-").replace(".", "-")


def remove_stale(dest: Path, names: List[str]) -> None:
    """Earlier wheels of these projects: two versions of one stop the whole install there."""
    for wheel in dest.glob("*.whl"):
        if project(wheel) in names:
            wheel.unlink()


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    names = MISSING + MATCHED
    try:
        pins = {name: f"{name}=={version(name)}" for name in names}
    except PackageNotFoundError as err:
        print(f"error: {err.name} is not installed here, and its version is the one carried: "
              "pip install -e '.[dev]' first", file=sys.stderr)
        return 2
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale(dest, names)
    platforms = [flag for tag in PLATFORMS for flag in ("--platform", tag)]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", args.python_version,
        "--implementation", "cp", *platforms, "-d", str(dest), *[pins[n] for n in names if n not in SOURCE_ONLY])
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), *[pins[n] for n in SOURCE_ONLY])
    wheels = sorted(dest.glob("*.whl"))
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:6.1f} MiB  {wheel.name}")
    print(f"{sum(w.stat().st_size for w in wheels) / 2**20:6.1f} MiB  in {dest}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
