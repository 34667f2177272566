"""One run per workdir: a lock file that names its holder, taken before anything is written.

Two processes writing one workdir interleave their checkpoints and their metrics (the second
resumes from the first one's checkpoint while it still writes). The trainer, ``python -m
qtarget.cache_prior`` and ``experiments/compare.py`` therefore hold ``DIR/qtarget.lock`` while
they write in ``DIR``:

- The lock is an OS file lock (``fcntl.flock``) on that file, held for the life of the holding
  process, and the file records the holder: host, boot id, pid and the process's start time
  (which tell a reused pid apart), when it started, its command line and a heartbeat time the
  holder rewrites every ``HEARTBEAT_SECONDS``.
- A second launch stops at once with :class:`~qtarget.train.errors.WorkdirLocked`, naming the
  directory, the holder's host and pid, and what to do.
- A lock left by a process that died is taken over, with a log line, by the next launch; nobody
  deletes the file by hand. On the same machine (same host name and boot id) the OS released the
  file lock when the holder died, even by SIGKILL, so it is taken over at once (where the file
  system has no ``flock``, the recorded pid and its start time are checked instead). A holder
  on another machine (a shared file system), or on this one before it restarted (another boot
  id), cannot be checked from here: it counts as dead once its heartbeat is older than
  ``STALE_SECONDS`` (10 minutes), for example after that machine was lost.
- A clean exit empties the file and releases the lock (the file itself stays: deleting it
  would let two processes lock two different files of the same name).

In a multi-process (multi-host) run, process 0 takes the lock and the others wait for its
verdict (:func:`hold_for_run`).
"""

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import pathlib
import secrets
import shlex
import socket
import sys
import threading
import time

from qtarget.train.errors import WorkdirLocked

LOCK_FILE = 'qtarget.lock'
HEARTBEAT_SECONDS = 30.0  # how often the holder rewrites its heartbeat
STALE_SECONDS = 600.0  # a holder on another machine with an older heartbeat counts as dead


def _log(message: str) -> None:
  print(f'[qtarget] {message}', flush=True)


def _boot_id() -> str:
  try:
    return pathlib.Path('/proc/sys/kernel/random/boot_id').read_text().strip()
  except OSError:
    return ''


def process_start_ticks(pid: int) -> int | None:
  """When process ``pid`` started, in clock ticks since boot (``/proc/PID/stat``, field 22);
  None where that cannot be read (another OS, or no such process)."""
  try:
    stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
  except OSError:
    return None
  try:  # the command name (field 2) may hold spaces and parentheses: split after its ')'
    return int(stat.rsplit(')', 1)[1].split()[19])
  except (IndexError, ValueError):
    return None


@dataclasses.dataclass
class Holder:
  """Who holds a lock, as its file records it."""
  host: str
  boot_id: str
  pid: int
  process_start: int | None  # clock ticks since boot (tells a reused pid apart)
  started: float  # seconds since the epoch
  heartbeat: float  # seconds since the epoch, rewritten every HEARTBEAT_SECONDS
  purpose: str  # 'training', 'cache_prior', 'experiments/compare.py'
  command: str
  token: str  # this acquisition's own mark: a takeover by another process changes it

  @classmethod
  def of_this_process(cls, purpose: str) -> 'Holder':
    now = time.time()
    return cls(host=socket.gethostname(), boot_id=_boot_id(), pid=os.getpid(),
               process_start=process_start_ticks(os.getpid()), started=now, heartbeat=now,
               purpose=purpose, command=shlex.join(sys.argv)[:500],
               token=secrets.token_hex(8))

  def on_this_machine(self) -> bool:
    boot_id = _boot_id()
    return self.host == socket.gethostname() and (not boot_id or not self.boot_id or
                                                 self.boot_id == boot_id)

  def running(self) -> bool:
    """Whether the process still runs (on this machine only: the pid and its start time)."""
    try:
      os.kill(self.pid, 0)
    except ProcessLookupError:
      return False
    except PermissionError:  # another user's process
      pass
    ticks = process_start_ticks(self.pid)
    return ticks is None or self.process_start is None or ticks == self.process_start

  def describe(self) -> str:
    started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))
    return (f'{self.purpose} process {self.pid} on host {self.host}, started {started}, last '
            f'heartbeat {max(0.0, time.time() - self.heartbeat):.0f} s ago '
            f'(command: {self.command})')


def _encode(holder: Holder) -> bytes:
  fields = dataclasses.asdict(holder)
  # Fixed-width times: a heartbeat rewrites the record in place with the same length.
  fields['started'], fields['heartbeat'] = f'{holder.started:.3f}', f'{holder.heartbeat:.3f}'
  return json.dumps(fields).encode()


def _decode(data: bytes) -> Holder:
  fields = json.loads(data)
  fields['started'], fields['heartbeat'] = float(fields['started']), float(fields['heartbeat'])
  return Holder(**fields)


def _read(fd: int) -> Holder | None:
  """The record in an open lock file: None where it is empty (free); a record that does not
  parse (a writer caught mid-write, or foreign content) is read again, then counts as an unknown
  holder whose heartbeat is the file's modification time."""
  for attempt in range(3):
    data = os.pread(fd, 1 << 16, 0)
    if not data.strip():
      return None
    try:
      return _decode(data)
    except (ValueError, TypeError, KeyError):
      if attempt < 2:
        time.sleep(0.05)
  modified = os.fstat(fd).st_mtime
  return Holder(host='(unknown: the lock file does not parse)', boot_id='', pid=-1,
                process_start=None, started=modified, heartbeat=modified, purpose='unknown',
                command='?', token='')


def _write(fd: int, holder: Holder) -> None:
  data = _encode(holder)
  os.pwrite(fd, data, 0)
  os.ftruncate(fd, len(data))
  os.fsync(fd)  # seen by other machines that share the file system


def read_holder(directory) -> Holder | None:
  """The recorded holder of ``directory``'s lock (None where it is free or has no lock file)."""
  try:
    fd = os.open(pathlib.Path(directory) / LOCK_FILE, os.O_RDONLY)
  except FileNotFoundError:
    return None
  try:
    return _read(fd)
  finally:
    os.close(fd)


def _try_flock(fd: int) -> bool:
  """True where this process now holds the OS lock; False where the file system has none;
  BlockingIOError where another process holds it."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as error:
    if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise BlockingIOError(error.errno, error.strerror) from error
    if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
      return False
    raise
  return True


class WorkdirLock:
  """``DIR/qtarget.lock``: :meth:`acquire` (or ``with``) takes it or raises
  :class:`WorkdirLocked`; :meth:`release` gives it back. The rules are in the module's
  docstring."""

  def __init__(self, directory, *, purpose: str, stale_seconds: float = STALE_SECONDS,
               heartbeat_seconds: float = HEARTBEAT_SECONDS):
    self.directory = pathlib.Path(directory)
    self.path = self.directory / LOCK_FILE
    self.purpose = purpose
    self.stale_seconds = stale_seconds
    self.heartbeat_seconds = heartbeat_seconds
    self._fd = None
    self._holder = None
    self._stop = threading.Event()
    self._thread = None

  def _refusal(self, holder: Holder | None, why: str) -> WorkdirLocked:
    who = holder.describe() if holder else 'another process (it has not recorded itself yet)'
    return WorkdirLocked(
        f'{self.directory} is in use by {who}; {why}. Two processes writing one directory '
        'interleave their checkpoints and metrics, so this one stops before writing anything. '
        'Wait for that run to finish, or stop it (on its host: kill '
        f'{holder.pid if holder and holder.pid > 0 else "<pid>"}), then run the same command '
        'again; or use another --config.workdir. A lock whose process has died is taken over '
        'by the next launch (at once on the same machine; from another machine once its '
        f'heartbeat is {self.stale_seconds / 60:.0f} minutes old): do not delete the lock '
        'file.')

  def _verdict(self, previous: Holder, os_locked: bool) -> str | None:
    """Why ``previous`` (recorded, never released) no longer holds the lock, or None where it
    may still run."""
    if previous.on_this_machine():
      if os_locked:  # its OS lock is gone: the process ended, however it ended
        return 'it is no longer running'
      return None if previous.running() else 'it is no longer running'
    # Another machine (or this one before a restart, or a namesake: another boot id).
    age = time.time() - previous.heartbeat
    if age > self.stale_seconds:
      return (f'it ran on another machine and its last heartbeat is {age / 60:.0f} minutes old '
              f'(more than {self.stale_seconds / 60:.0f})')
    return None

  def acquire(self) -> 'WorkdirLock':
    self.directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      try:
        os_locked = _try_flock(fd)
      except BlockingIOError:
        raise self._refusal(_read(fd), 'it holds the lock file') from None
      previous = _read(fd)
      if previous is not None:
        why = self._verdict(previous, os_locked)
        if why is None:
          raise self._refusal(previous, 'it may still be running (another machine, or a file '
                                        'system without file locks)')
        _log(f'taking over the lock of {self.directory} from {previous.describe()}: {why}.')
      holder = Holder.of_this_process(self.purpose)
      _write(fd, holder)
      if not os_locked:  # only the record guards it: a rival may have written at once
        time.sleep(0.2)
      if (current := _read(fd)) is None or current.token != holder.token:
        raise self._refusal(current, 'it took the lock at the same moment')
    except BaseException:
      os.close(fd)  # releases the OS lock too
      raise
    self._fd, self._holder = fd, holder
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name='qtarget-lock-heartbeat',
                                    daemon=True)
    self._thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_seconds):
      self._holder.heartbeat = time.time()
      try:
        _write(self._fd, self._holder)
      except OSError:  # a full or unreachable disk: the next beat tries again
        pass

  def release(self) -> None:
    if self._fd is None:
      return
    self._stop.set()
    self._thread.join()
    try:
      current = _read(self._fd)
      if current is not None and current.token == self._holder.token:
        os.ftruncate(self._fd, 0)  # free; another process's takeover is left alone
        os.fsync(self._fd)
    except OSError:
      pass
    finally:
      os.close(self._fd)  # releases the OS lock
      self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()


@contextlib.contextmanager
def hold_for_run(directory, *, purpose: str = 'training'):
  """Holds ``directory``'s lock for a run of one or more processes (after
  ``jax.distributed.initialize``): process 0 takes it, and every process learns its verdict
  (``multihost_utils.broadcast_one_to_all``) before anything is written, so all of them stop
  with :class:`WorkdirLocked` where it is held. Released when the block ends, however it ends."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    with WorkdirLock(directory, purpose=purpose) as lock:
      yield lock
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(directory, purpose=purpose).acquire()
    except Exception as e:  # pylint: disable=broad-except  # every process must hear the verdict
      error = e
  refused = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
  if error is not None:
    raise error
  if refused:
    holder = read_holder(directory)
    raise WorkdirLocked(
        f'{directory}: process 0 could not take the lock of this workdir'
        + (f', held by {holder.describe()}' if holder else '') + '; its output says why and '
        'what to do.')
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
