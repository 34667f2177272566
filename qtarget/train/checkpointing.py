"""A run's checkpoints: saved with the config, restored from the newest readable one, and
earlier results never silently erased.

Each orbax checkpoint holds the trainable parameters, the optimizer state, the step, the data
iterator's position and the run's config (flattened JSON). On resume:

- the newest checkpoint that cannot be read is reported (which, and why, in one paragraph), moved
  to ``workdir/damaged_checkpoints/`` and the newest readable earlier one is used instead; in a
  multi-process run every process reads its own shards, and all of them fall back together
  when any one cannot read its part, so they resume from the same step;
- a config that differs from the checkpoint's in a field that defines the run refuses to resume,
  naming the fields; harmless differences (logging, evaluation, checkpoint cadence) are listed;
- a workdir with earlier results but no checkpoint refuses to start over unless
  ``config.start_over`` is set, and then moves the old results to ``workdir/previous_<time>/``.

A checkpoint or an export that runs out of disk space stops the run with
:class:`~qtarget.train.errors.DiskFull` (what was being written, the space it needs, the space
that is free); the partial write is removed and the checkpoints before it are untouched, so the
same command resumes once there is room.
"""

import errno
import json
import os
import pathlib
import re
import shutil
import time

import jax
import numpy as np

from qtarget.train import checks
from qtarget.train.errors import ConfigError, DiskFull


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f'[qtarget] {message}', flush=True)


def earlier_results(workdir: pathlib.Path, first_checkpoint: int) -> list[pathlib.Path]:
  """Results that only a run past its first checkpoint (step ``first_checkpoint``) leaves.

  A run killed before its first checkpoint legitimately leaves the evaluation before training
  and metrics up to that step (written just before the checkpoint): those are not counted.
  """
  found = [workdir / 'hf'] if (workdir / 'hf').exists() else []
  summary = workdir / 'summary.json'
  if summary.exists() and '"steps"' in summary.read_text():
    found.append(summary)
  metrics = workdir / 'metrics.jsonl'
  if metrics.exists():
    steps = [json.loads(line).get('step', 0) for line in metrics.read_text().splitlines()
             if line.strip()]
    if steps and max(steps) > first_checkpoint:
      found.append(metrics)
  return found + sorted(p for p in workdir.glob('predictions_*.jsonl')
                        if p.name != 'predictions_before.jsonl')


def move_aside(workdir: pathlib.Path, paths) -> pathlib.Path:
  """Moves ``paths`` (and the TensorBoard events) into a new ``workdir/previous_<time>/``."""
  target = workdir / time.strftime('previous_%Y%m%d_%H%M%S')
  target.mkdir(parents=True, exist_ok=False)
  extra = [workdir / name for name in ('metrics.jsonl', 'summary.json', 'tensorboard',
                                       'predictions_before.jsonl') if (workdir / name).exists()]
  for path in dict.fromkeys(list(paths) + extra):
    shutil.move(str(path), str(target / path.name))
  return target


# A full disk, as Python (OSError), tensorstore (orbax's arrays: "RESOURCE_EXHAUSTED: ... No space
# left on device [os_error_code='28']") and safetensors ("I/O error: No space left on device (os
# error 28)") word it, and a full quota.
_NO_SPACE = re.compile(r'No space left on device|Disk quota exceeded|\bENOSPC\b|\bEDQUOT\b|'
                       r"os error 28\b|os_error_code='?28\b|\[Errno 28\]")


def is_disk_full(error: BaseException) -> bool:
  """Whether ``error``, or an exception it was raised from or during (its cause, its context,
  the members of an exception group), says the disk or the quota is full."""
  pending, seen = [error], set()
  while pending:
    current = pending.pop()
    if current is None or id(current) in seen:
      continue
    seen.add(id(current))
    if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if _NO_SPACE.search(str(current)):
      return True
    pending += [current.__cause__, current.__context__, *getattr(current, 'exceptions', ())]
  return False


def tree_bytes(tree) -> int:
  """The bytes of a tree's arrays (global arrays counted whole)."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _size(count: float) -> str:
  return f'{count / 2**30:.2f} GiB' if count >= 2**30 else f'{count / 2**20:.1f} MiB'


def _free(directory: pathlib.Path) -> str:
  try:
    return f'{_size(shutil.disk_usage(directory).free)} is free there'
  except OSError:
    return 'the free space cannot be read'


def export_hf(model, directory, tokenizer=None) -> pathlib.Path:
  """:func:`qtarget.checkpoints.export_hf`, whole or not at all: written to ``DIR.partial`` and
  renamed to ``directory`` once complete, so an export cut short (a full disk, a kill) never
  leaves a ``hf/`` that looks finished. A full disk raises :class:`DiskFull`."""
  from qtarget import checkpoints  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  partial = directory.with_name(directory.name + '.partial')
  shutil.rmtree(partial, ignore_errors=True)
  try:
    checkpoints.export_hf(model, partial, tokenizer)
  except Exception as error:  # pylint: disable=broad-except  # safetensors' own error type
    if not is_disk_full(error):
      raise
    shutil.rmtree(partial, ignore_errors=True)
    needed = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model))) * 4
    raise DiskFull(
        f'no space left on the file system of {directory.parent} while exporting the model to '
        f'{directory}: it needs about {_size(needed)} (the weights in float32) and '
        f'{_free(directory.parent)} (the partial export was removed). The checkpoints are '
        'untouched: make room and run the same command again; it resumes from the last '
        'checkpoint and exports.') from error
  if directory.exists():  # an earlier export of this run, replaced whole
    shutil.rmtree(directory)
  os.replace(partial, directory)
  return directory


def _first_line(error: Exception) -> str:
  text = f'{type(error).__name__}: {error}'.strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]


def check_same_run(workdir: pathlib.Path, saved: dict, current: dict, step: int) -> list[str]:
  """ConfigError where the checkpoint's config differs from ``current`` (both flat) in a field
  that defines the training; the harmless differences otherwise."""
  defining, harmless = checks.config_differences(saved, current)
  if defining:
    further = ''
    if saved.get('steps') == step and current.get('steps', 0) > step:  # finished: train more
      export = workdir / 'hf'
      first = ('' if (export / 'model.safetensors').exists() else
               ' (export it first: the same command as before with --config.export_hf=True)')
      further = (' To train the finished run further, start a new workdir from its export, '
                 f'{export}{first}: --config.model.source=hf --config.model.path={export}; the '
                 "optimizer state and the warmup start anew, and prior.source='initial' would "
                 'then be the fine-tuned model.')
    raise ConfigError(
        f'{workdir} holds a run with another config (checkpoint at step {step}); these fields '
        'define what is trained and differ (checkpoint -> now): ' + '; '.join(defining) +
        '. Resume with the checkpoint\'s values, or use another --config.workdir.' + further)
  return harmless


def latest_saved_config(workdir: pathlib.Path) -> tuple[int, dict] | None:
  """``(step, flat config)`` of the newest checkpoint whose saved config reads, straight from
  its file, before anything loads (None where there is none; a damaged checkpoint is left to
  :meth:`RunCheckpoints.restore`, which compares again)."""
  directory = workdir / 'checkpoints'
  if not directory.is_dir():
    return None
  steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)
  for step in steps:
    try:  # orbax's JsonSave item: checkpoints/<step>/config/metadata
      return step, json.loads((directory / str(step) / 'config' / 'metadata').read_text())
    except (OSError, ValueError):
      continue
  return None


def _all_processes(ok: bool) -> list[bool]:
  """Each process's ``ok``, on every process (one collective in a multi-process run)."""
  if jax.process_count() == 1:
    return [ok]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return [bool(x) for x in np.asarray(multihost_utils.process_allgather(np.int32(ok))).ravel()]


class RunCheckpoints:
  """The orbax manager of ``workdir/checkpoints`` and the resume rules above."""

  def __init__(self, workdir: pathlib.Path, config):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.workdir = workdir
    self.directory = (workdir / 'checkpoints').resolve()
    self.config = checks.flatten(config)
    self.start_over = bool(config.get('start_over', False))
    self.first_checkpoint = min(config.checkpoint.every, config.steps)
    self.keep = config.checkpoint.keep
    self._writing = None  # (step, bytes) of the checkpoint being written
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep,
            enable_async_checkpointing=bool(config.checkpoint.get('asynchronous', True))))

  def save(self, step: int, tree, iterator) -> None:
    """Saves ``tree`` and the data position. Asynchronous saves copy the arrays to the host
    before returning and write them in the background (orbax renames a checkpoint into place
    only when it is whole, so a kill mid-write leaves the previous one). The first checkpoint
    of a run is waited for: results written past it must always have a checkpoint to resume
    from (:func:`earlier_results`)."""
    import grain  # pylint: disable=g-import-not-at-top
    ocp = self._ocp
    first = self.manager.latest_step() is None
    self.wait()  # as orbax's save would: a failed previous write is named as that step's
    self._writing = (step, tree_bytes(tree))
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree), data=grain.checkpoint.CheckpointSave(iterator),
          config=ocp.args.JsonSave(self.config)), force=True)
    except Exception as error:  # pylint: disable=broad-except  # re-raised
      self._stop_if_disk_full(error)
      raise
    if first:
      self.wait()

  def latest_step(self):
    return self.manager.latest_step()

  def wait(self) -> None:
    """Until the checkpoint being written is on disk; :class:`DiskFull` where there was no room
    for it."""
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except  # re-raised
      self._stop_if_disk_full(error)
      raise
    self._writing = None

  def _stop_if_disk_full(self, error: Exception) -> None:
    """DiskFull for the checkpoint being written, its partial write removed, where ``error``
    says the disk is full."""
    if self._writing is None or not is_disk_full(error):
      return
    step, needed = self._writing
    self._writing = None
    if jax.process_index() == 0:  # orbax writes STEP.orbax-checkpoint-tmp*, renamed when whole
      for partial in self.directory.glob(f'{step}.orbax-checkpoint-tmp*'):
        shutil.rmtree(partial, ignore_errors=True)
    kept = sorted((int(p.name) for p in self.directory.iterdir()
                   if p.name.isdigit() and int(p.name) != step), reverse=True)
    resume = (f'The checkpoint at step {kept[0]} is intact, and the same command resumes from '
              'it once there is room' if kept else
              'No earlier checkpoint was written: the same command starts from step 0 once '
              'there is room')
    raise DiskFull(
        f'no space left on the file system of {self.directory} while writing the checkpoint of '
        f'step {step}: it needs about {_size(needed)} (the parameters and the optimizer '
        f'state) and {_free(self.directory)} (the partial write was removed). {resume}; '
        f'--config.checkpoint.keep={self.keep} keeps {self.keep} checkpoints, and one more '
        'exists while the next is written.') from error

  def reached_preemption(self, step: int) -> bool:
    """Whether ``step`` is the step at which every process saves and stops after a preemption
    notice (SIGTERM to any process of a multi-process run): JAX's preemption sync point
    (``multihost_utils.reached_preemption_sync_point``), asked as orbax's manager asks it. Asked
    at every step by every process; always False in a single-process run."""
    return self.manager.reached_preemption(step)

  def _restore(self, reader, step: int, abstract_tree, iterator):
    import grain  # pylint: disable=g-import-not-at-top
    ocp = self._ocp
    items = dict(state=ocp.args.StandardRestore(abstract_tree),
                 data=grain.checkpoint.CheckpointRestore(iterator))
    if (self.directory / str(step) / 'config').exists():
      items['config'] = ocp.args.JsonRestore()
    restored = reader.restore(step, args=ocp.args.Composite(**items))
    return restored['state'], restored.get('config') if 'config' in items else None

  def _reader(self):
    """A read-only manager that reads this process's shards without waiting for the others
    (orbax's barrier after a read would pair a process that read a checkpoint with one that
    failed and moved on to an older one); :func:`_all_processes` settles the outcome."""
    ocp = self._ocp
    return ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        read_only=True, multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index(), active_processes={jax.process_index()})))

  def restore(self, abstract_tree, iterator):
    """``(tree, step)`` from the newest checkpoint that every process reads, or ``(None, 0)``
    to start anew."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      self._check_fresh_start()
      return None, 0
    reader, failures = self._reader(), []
    for step in steps:
      tree, saved_config, error = None, None, None
      try:
        tree, saved_config = self._restore(reader, step, abstract_tree, iterator)
      except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore types vary
        error = e
      readable = _all_processes(error is None)
      if all(readable) or step == steps[-1]:
        reader.close()
      if all(readable):
        self._check_same_run(saved_config, step)
        self._set_aside(failures)
        return tree, step
      failures.append((step, error))
      later = [s for s in steps if s < step]
      unread = [i for i, ok in enumerate(readable) if not ok]
      by = (f' by process {", ".join(map(str, unread))} of {len(readable)}'
            if len(readable) > 1 else '')
      if jax.process_index() == 0 or error is not None:  # each process says its own reason
        print(f'[qtarget] the checkpoint at step {step} ({self.directory / str(step)}) cannot '
              f'be read{by}' + (f': {_first_line(error)}' if error is not None else '') + '. ' +
              (f'Falling back to the checkpoint at step {later[0]}.' if later else
               'No earlier checkpoint is left.'), flush=True)
    raise ConfigError(
        f'no checkpoint in {self.directory} can be read (' + '; '.join(
            f'step {step}: ' + (_first_line(error) if error is not None else
                                'another process cannot read its part')
            for step, error in failures) +
        '). Point --config.workdir elsewhere, or move the checkpoints aside to start over.')

  def _set_aside(self, failures) -> None:
    if not failures:
      return
    if jax.process_index() == 0:
      damaged = self.workdir / 'damaged_checkpoints'
      damaged.mkdir(exist_ok=True)
      for step, _ in failures:
        target = damaged / f'{step}_{time.strftime("%Y%m%d_%H%M%S")}'
        shutil.move(str(self.directory / str(step)), str(target))
        _log(f'moved the unreadable checkpoint of step {step} to {target}')
    if jax.process_count() > 1:  # moved before any process lists the directory again
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('qtarget: damaged checkpoints set aside')
    self.manager.reload()

  def _check_same_run(self, saved_config, step: int) -> None:
    if saved_config is None:
      _log(f'the checkpoint at step {step} predates saved configs: the config is not compared.')
      return
    harmless = check_same_run(self.workdir, dict(saved_config), self.config, step)
    if harmless:
      _log('resuming with changed fields that do not change the training: ' +
           '; '.join(harmless))

  def _check_fresh_start(self) -> None:
    earlier = earlier_results(self.workdir, self.first_checkpoint)
    if not earlier:
      return
    names = ', '.join(p.name for p in earlier)
    if not self.start_over:
      raise ConfigError(
          f'{self.workdir} holds results of an earlier run ({names}) but no checkpoint to '
          'resume from. Set --config.start_over=True to move them aside and start from step 0, '
          'or use another --config.workdir.')
    if jax.process_index() == 0:
      target = move_aside(self.workdir, earlier)
      _log(f'start_over: moved the earlier results ({names}) to {target}')
