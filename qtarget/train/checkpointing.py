"""A run's checkpoints: saved with the config, restored from the newest readable one, and
earlier results never silently erased.

Each orbax checkpoint holds the trainable parameters, the optimizer state, the step, the data
iterator's position and the run's config (flattened JSON). On resume:

- the newest checkpoint that cannot be read is reported (which, and why, in one paragraph), moved
  to ``workdir/damaged_checkpoints/`` and the newest readable earlier one is used instead;
- a config that differs from the checkpoint's in a field that defines the run refuses to resume,
  naming the fields; harmless differences (logging, evaluation, checkpoint cadence) are listed;
- a workdir with earlier results but no checkpoint refuses to start over unless
  ``config.start_over`` is set, and then moves the old results to ``workdir/previous_<time>/``.
"""

import json
import pathlib
import shutil
import time

import jax

from qtarget.train import checks
from qtarget.train.errors import ConfigError


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
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), data=grain.checkpoint.CheckpointSave(iterator),
        config=ocp.args.JsonSave(self.config)), force=True)
    if first:
      self.manager.wait_until_finished()

  def latest_step(self):
    return self.manager.latest_step()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def _restore(self, step: int, abstract_tree, iterator):
    import grain  # pylint: disable=g-import-not-at-top
    ocp = self._ocp
    items = dict(state=ocp.args.StandardRestore(abstract_tree),
                 data=grain.checkpoint.CheckpointRestore(iterator))
    if (self.directory / str(step) / 'config').exists():
      items['config'] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state'], restored.get('config') if 'config' in items else None

  def restore(self, abstract_tree, iterator):
    """``(tree, step)`` from the newest readable checkpoint, or ``(None, 0)`` to start anew."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      self._check_fresh_start()
      return None, 0
    failures = []
    for step in steps:
      try:
        tree, saved_config = self._restore(step, abstract_tree, iterator)
      except Exception as error:  # pylint: disable=broad-except  # orbax/tensorstore types vary
        failures.append((step, error))
        later = [s for s in steps if s < step]
        _log(f'the checkpoint at step {step} ({self.directory / str(step)}) cannot be read: '
             f'{_first_line(error)}. ' + (f'Falling back to the checkpoint at step {later[0]}.'
                                          if later else 'No earlier checkpoint is left.'))
        continue
      self._check_same_run(saved_config, step)
      self._set_aside(failures)
      return tree, step
    raise ConfigError(
        f'no checkpoint in {self.directory} can be read (' + '; '.join(
            f'step {step}: {_first_line(error)}' for step, error in failures) +
        '). Point --config.workdir elsewhere, or move the checkpoints aside to start over.')

  def _set_aside(self, failures) -> None:
    if not failures or jax.process_index() != 0:
      return
    damaged = self.workdir / 'damaged_checkpoints'
    damaged.mkdir(exist_ok=True)
    for step, _ in failures:
      target = damaged / f'{step}_{time.strftime("%Y%m%d_%H%M%S")}'
      shutil.move(str(self.directory / str(step)), str(target))
      _log(f'moved the unreadable checkpoint of step {step} to {target}')
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
