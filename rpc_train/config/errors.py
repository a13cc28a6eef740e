"""Errors a user can fix by changing the launch, reported as one line and a non-zero exit."""


class ConfigError(ValueError):
    """A bad configuration value: the message names the value and what would be valid."""


class RunFailure(RuntimeError):
    """A failure the driver diagnosed mid-run (a trainer died or stalled): one line, exit 1."""
