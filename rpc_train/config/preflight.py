"""`python -m rpc_train.config.preflight [overrides]`: check a launch before torchrun starts it.

launch.sh runs this once, so a bad override, layout or dataset path gives one clear line and
exit code 2 in well under a second, instead of the same error from every rank wrapped in
torchrun's failure report. It composes the config exactly as the ranks will.
"""

import os
import sys
from dataclasses import fields, is_dataclass
from typing import List

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException

from rpc_train.config.schema import register_configs
from rpc_train.data.files import check_available
from rpc_train.config.errors import ConfigError
from rpc_train.config.validate import validate

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _one_line(err: Exception) -> str:
    """Hydra's multi-line composition errors, cut to the line that names the bad value."""
    if isinstance(err, MissingConfigException) and err.options:
        group = os.path.dirname(err.missing_cfg_file or "") or "option"
        name = os.path.basename(err.missing_cfg_file or "")
        return f"{group}={name} is not a known {group}; choose one of: {', '.join(sorted(err.options))}"
    cause = err.__cause__
    if isinstance(cause, ConfigAttributeError) and is_dataclass(cause.object_type):
        valid = ", ".join(f.name for f in fields(cause.object_type))
        return f"{cause.full_key} is not a setting; valid keys there: {valid}"
    if cause is not None:
        return f"{_first_line(err)}: {_first_line(cause)}"
    return _first_line(err)


def check(overrides: List[str], world_size: int) -> None:
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    validate(cfg, world_size)
    check_available(cfg.data)
    if cfg.device == "cuda":
        from rpc_train.runtime.devices import check_device  # imports torch: only when it matters

        check_device(cfg.device)


def main(argv: List[str]) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", "3"))
    try:
        check(argv, world_size)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
