"""Compose the config from conf/ as every rank does: for the launcher's check, benchmarks and tests.

conf/ is reached as `rpc_train/conf`: a link to the checkout's conf/ in the source tree, and the
configs themselves in a wheel (pyproject.toml), so an installed rpc_train composes from any
directory.
"""

import os
import shlex
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError

from rpc_train.config.errors import ConfigError, first_line
from rpc_train.config.schema import register_configs

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The config `rpc_train.train` would run with these command-line overrides."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def one_line(err: Exception) -> str:
    """Hydra's multi-line composition errors, cut to the line that names the bad value."""
    if isinstance(err, OverrideParseException):
        return unparsable_override(err.override)
    if isinstance(err, MissingConfigException) and err.options:
        group = os.path.dirname(err.missing_cfg_file or "") or "option"
        name = os.path.basename(err.missing_cfg_file or "")
        return f"{group}={name} is not a known {group}; choose one of: {', '.join(sorted(err.options))}"
    cause = err.__cause__
    if isinstance(cause, ConfigAttributeError) and is_dataclass(cause.object_type):
        valid = ", ".join(f.name for f in fields(cause.object_type))
        return f"{cause.full_key} is not a setting; valid keys there: {valid}"
    if cause is not None:
        return f"{first_line(err)}: {first_line(cause)}"
    return first_line(err)


def unparsable_override(override: str) -> str:
    """One line for an override Hydra's grammar rejects, with the quoting that would pass.

    A bare `~` is the usual case: the shell leaves `data.root=~/data` alone (`data.root` is no
    shell variable), and Hydra's lexer stops at the `~`.
    """
    key, equals, value = override.partition("=")
    fix = "see https://hydra.cc/docs/advanced/override_grammar/basic"
    if equals and _parses(f"{key}=x"):
        quote = "'" if '"' in value else '"'
        quoted = f"{key}={quote}{value}{quote}"
        if _parses(quoted):
            fix = f"quote the value: {shlex.quote(quoted)}"
    return f"override '{override}' does not parse (Hydra's grammar); {fix}"


def _parses(override: str) -> bool:
    try:
        OverridesParser.create().parse_overrides([override])
    except OverrideParseException:
        return False
    return True


def check_override_syntax(argv: Sequence[str]) -> None:
    """Raise ConfigError for the first command-line override Hydra's grammar rejects.

    For `python -m rpc_train.train` (launch.sh --cfg job): Hydra's own main would print the
    parser's three-line report and exit 1. Hydra's command-line parser tells its flags
    (`--cfg job`) from the overrides, as its main does.
    """
    from hydra._internal.utils import get_args_parser

    for override in get_args_parser().parse_known_args(list(argv))[0].overrides:
        if not _parses(override):
            raise ConfigError(unparsable_override(override))
