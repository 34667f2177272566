"""Errors any layer may raise. This module imports nothing, so the data pipeline, the trainer
and the tools raise and catch the same types (:mod:`qtarget.train.errors` re-exports them)."""


class ConfigError(ValueError):
  """A configuration that cannot train; raised before any work starts."""
