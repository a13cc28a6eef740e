"""Errors a user can fix by changing the launch, reported as one line and a non-zero exit."""

import re


class ConfigError(ValueError):
    """A bad configuration value: the message names the value and what would be valid."""


class RunFailure(RuntimeError):
    """A failure the driver diagnosed mid-run (a trainer died or stalled): one line, exit 1."""


def first_line(err: BaseException) -> str:
    """The line of an error worth one line of log: its first, or for a remote error the original.

    A remote error reads "RuntimeError: On WorkerInfo(...):" then the original exception's
    repr, e.g. "RuntimeError('injected fault')", then its traceback: that becomes
    "RuntimeError: injected fault".
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if "On WorkerInfo(" not in line]
    if not lines:
        return type(err).__name__
    remote = re.fullmatch(r"(\w+)\((['\"])(.*)\2\)", lines[0])
    return f"{remote.group(1)}: {remote.group(3)}" if remote else lines[0]
