"""`python -m rpc_train.preflight [overrides]`: check a launch before torchrun starts it.

launch.sh runs this once, so a bad override, layout or dataset path gives one clear line and
exit code 2 in well under a second, instead of the same error from every rank wrapped in
torchrun's failure report. It composes the config exactly as the ranks will.

On success it prints, one `NAME=value` a line on stdout, the environment the ranks must start
with, which launch.sh exports before torchrun: today only `runtime.allocator`'s (LD_PRELOAD and
its tuning, runtime/allocator.py); nothing for the default glibc.
"""

import os
import sys
from contextlib import redirect_stdout
from typing import Dict, List

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from rpc_train.config.compose import compose, one_line
from rpc_train.config.errors import ConfigError
from rpc_train.config.validate import validate
from rpc_train.data.files import check_available
from rpc_train.runtime.allocator import allocator_env
from rpc_train.runtime.interface import check_interface


def check(overrides: List[str], world_size: int) -> Dict[str, str]:
    """Raise on a bad launch; return the environment the ranks must start with."""
    cfg = compose(overrides)
    validate(cfg, world_size)
    check_available(cfg.data)
    check_interface(cfg.runtime.interface, cfg.runtime.allow_public_interface)
    if cfg.loader.transform is not None or cfg.loader.val_transform is not None:
        from rpc_train.loader.transforms import build_transform  # imports torchvision: only when a transform is set

        # The loader's are the ones used (the data set's by default, `${data.train_transform}`).
        for key in ("transform", "val_transform"):
            build_transform(cfg.loader[key], f"loader.{key}")
    if cfg.device == "cuda":
        from rpc_train.runtime.devices import check_device  # imports torch: only when it matters

        check_device(cfg.device)
    if cfg.mode.name == "serve":
        from rpc_train.serve.checks import check_serving  # imports torch and grpc: only for serving

        check_serving(cfg.serve)
    return allocator_env(cfg.runtime)  # raises when the library is absent


def main(argv: List[str]) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", "3"))
    try:
        with redirect_stdout(sys.stderr):  # stdout carries the environment lines alone
            env = check(argv, world_size)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    for name, value in env.items():
        print(f"{name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
