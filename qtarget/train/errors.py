"""The trainer's error types (:class:`ConfigError` lives in :mod:`qtarget.errors`, where the
layers below the trainer import it too)."""

from qtarget.errors import ConfigError  # pylint: disable=unused-import  # re-exported


class WorkdirLocked(RuntimeError):
  """Another live process holds the directory's lock (:mod:`qtarget.train.workdir_lock`); raised
  before anything is written there."""


class DiskFull(RuntimeError):
  """A checkpoint or an export stopped for lack of space; what was written before it is intact
  (the message says what was being written, the space it needed and the space that was free)."""
