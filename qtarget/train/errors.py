"""The trainer's error type."""


class ConfigError(ValueError):
  """A configuration that cannot train; raised before any work starts."""
