"""Errors a user can fix by changing the launch, reported as one line and a non-zero exit."""


class ConfigError(ValueError):
    """A bad configuration value: the message names the value and what would be valid."""
