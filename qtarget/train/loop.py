"""The training loop: data, the mesh, checkpoints, logging, evaluation, export.

:func:`run` builds the mesh (``data``, ``fsdp``, ``tensor``), loads the student and the prior
straight into their shards, initialises the optimizer state under ``jit`` into its shards, jits
:func:`qtarget.train.step.train_step` with shardings derived from ``jax.eval_shape`` and the
logical-axis rules, checkpoints with orbax (trainable parameters, optimizer state, step and the
data iterator; never the prior), resumes from the latest checkpoint, logs to TensorBoard and
JSON lines, evaluates before and after, and exports the model to a Hugging Face directory.

A run is a sequence of phases, each a function of what the earlier ones built: a
:class:`_Training` (the config, the models' state, the data, the checkpoints) and, in the step
loop, its bookkeeping, a :class:`_Steps`.

===========================  ===============================================================
set up or resume             :func:`_check`, :func:`_finished_summary`, :func:`_set_up`,
                             :func:`_resume`
the step loop                :func:`_train_steps`, :func:`_dispatch`
flush metrics, checkpoints   :func:`_flush`, :func:`_stop_diverged`, :func:`_save`,
                             :func:`_end_training`
evaluate                     :func:`_evaluate_before`, :func:`_interval_eval`,
                             :func:`_evaluate_after`
finish and export            :func:`_export`, :func:`_finish`
===========================  ===============================================================
"""

import dataclasses
import json
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from qtarget import targets
from qtarget.data import splits
from qtarget.data.splits import checked_eval_split
from qtarget.train import checkpointing
from qtarget.train import checks
from qtarget.train import loading
from qtarget.train import metrics_log
from qtarget.train import sharding as sharding_lib
from qtarget.train import state as state_lib
from qtarget.train import workdir_lock
from qtarget.train.step import batch_keys, student_model


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f'[qtarget] {message}', flush=True)


def maybe_initialize_distributed(config) -> None:
  """``jax.distributed.initialize`` for multi-host runs (a TPU pod or a GPU cluster), once per
  process. It also starts JAX's preemption service (``jax_enable_preemption_service``, on by
  default), whose SIGTERM handler tells every process of the run (:class:`_StopSignals`)."""
  dist = config.distributed
  if not dist.enabled or jax.distributed.is_initialized():
    return
  if dist.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', dist.cpu_collectives)
  kwargs = {}
  if dist.coordinator_address:
    kwargs = dict(coordinator_address=dist.coordinator_address,
                  num_processes=dist.num_processes, process_id=dist.process_id)
  jax.distributed.initialize(**kwargs)  # without arguments: detected from the cluster


def _data(config, tokenizer, vocab_size):
  """``(dataset, report, eval_records)``: the training batches (grain, with the cached prior's
  rows where the prior is cached), the scan of the training split and the held-out problems."""
  from qtarget.data import builders, pipeline  # pylint: disable=g-import-not-at-top
  data = config.data
  builder, eval_split = splits.prepared(config)
  train_records = builders.load_split(builder, 'train')
  report = pipeline.scan(train_records, tokenizer, max_length=data.seq_len,
                         truncate=data.truncate, vocab_size=vocab_size, name='train')
  eval_records = builders.load_split(builder, eval_split) if eval_split else []
  cache_source = None
  if targets.needs_prior(config.method) and config.prior.source == 'cached':
    from qtarget.data import prior_cache_files  # pylint: disable=g-import-not-at-top
    cache_source = prior_cache_files.open_for_training(config, tokenizer, report, vocab_size)
    _log(f'prior: cached top-{cache_source.metadata.k} at '
         f'{prior_cache_files.cache_directory(config)}')
  dataset = pipeline.train_dataset(
      builder, tokenizer, seq_len=data.seq_len, batch_size=config.batch_size,
      seed=data.seed * 1_000_003 + config.seed,  # the run seed varies the order, not the data
      num_epochs=None, pack=data.pack, truncate=data.truncate,
      process_index=jax.process_index(), process_count=jax.process_count(),
      prefetch_batches=data.get('prefetch_batches', 2), prior_cache_source=cache_source)
  return dataset, report, eval_records


class TrainingInterrupted(KeyboardInterrupt):
  """SIGTERM or SIGINT stopped the run after saving the step it was on (in a multi-process run,
  on every process, the step they agreed on); a KeyboardInterrupt: ``except Exception`` in a
  driver loop does not swallow it."""

  def __init__(self, signum: int, step: int, directory):
    self.signum = signum
    super().__init__(f'{signal.Signals(signum).name} at step {step}: its checkpoint is saved in '
                     f'{directory}; run the same command to resume from it.')


class _StopSignals:
  """While training, SIGTERM (a preemption, a scheduler's stop) and SIGINT (Ctrl-C) ask for a
  checkpoint and a clean stop.

  In a single-process run (on the main thread) the step in flight is saved; a second signal
  stops at once. In a multi-process run a save is collective, so the processes must agree on
  its step: JAX's preemption service owns SIGTERM there (``jax.distributed.initialize``
  installs its handler, which tells the coordination service, which tells every process), and
  every process asks at every step whether this is the agreed step (``reached_preemption``:
  ``multihost_utils.reached_preemption_sync_point`` through orbax's manager); at that step all
  of them save and stop. SIGINT keeps its default there.
  """

  def __init__(self, reached_preemption=None):
    self.received = None
    self._said = False
    self._previous = {}
    self._reached_preemption = reached_preemption if jax.process_count() > 1 else None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame  # only the flag: printing here could re-enter a write to stdout
    if self.received is not None:  # the second: the previous handler, as if never caught
      self.__exit__()
      signal.raise_signal(signum)
      return
    self.received = signum

  def pending(self, step: int) -> bool:
    """Whether to save ``step`` (just trained) and stop; says once what happens next. Every
    process calls it at every step."""
    if self._reached_preemption is not None:
      if self.received is None and self._reached_preemption(step):
        self.received = signal.SIGTERM
        _log(f'a preemption notice (SIGTERM) reached the run: every process saves step {step}, '
             'then stops')
      return self.received is not None
    if self.received is not None and not self._said:
      self._said = True
      _log(f'{signal.Signals(self.received).name}: saving the current step, then stopping (send '
           'it again to stop at once)')
    return self.received is not None

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    self._previous = {}


class TrainingDiverged(RuntimeError):
  """The loss or the gradient stopped being usable; the run stops without saving or exporting."""


def _divergence(metrics: dict) -> str | None:
  """What went wrong in a step's metrics, or None."""
  bad = [name for name in ('loss', 'grad_norm') if not np.isfinite(metrics.get(name, 0.0))]
  if bad:
    return ' and '.join(f'{name} is {metrics[name]}' for name in bad) + ' (not finite)'
  if metrics.get('grad_norm') == 0.0 and metrics.get('response_tokens', 0) > 0:
    return (f"the gradient norm is exactly 0 with loss {metrics['loss']:.4g} (the model has "
            'died: it no longer learns)')
  return None


def fetch_metrics(device_metrics: list[dict]) -> list[dict]:
  """One device-to-host transfer for a log interval's metrics (the loop's only wait on the
  device between checkpoints)."""
  return jax.device_get(device_metrics)


def accuracy_lines(summary: dict, config) -> list[str]:
  """The run's result as printed last: held-out accuracy before and after training with their
  95% Wilson intervals, and where the methods are compared (nothing without both evaluations)."""
  if summary.get('accuracy_before') is None or summary.get('accuracy_after') is None:
    return []
  from qtarget import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  problems = summary['eval_after']['problems']
  k = summary['eval_after']['k']
  metric = 'greedy' if k == 1 else f'Average@{k}'
  before = evaluate_lib.format_accuracy(summary['accuracy_before'], problems)
  after = evaluate_lib.format_accuracy(summary['accuracy_after'], problems)
  return [f'held-out accuracy ({problems} {checked_eval_split(config)} problems of '
          f'{config.data.task}, {metric}, 95% Wilson intervals): before {before} -> after '
          f"{after}; wall time {summary['wall_seconds']:.0f} s",
          'Target-SFT against SFT, DFT and distillation over seeds and tasks: '
          'experiments/grid2/RESULTS.md']


def _complete(summary: dict, config, workdir: pathlib.Path) -> bool:
  """Whether a run's summary holds everything this config asks for: all its steps, each
  requested evaluation and, with ``export_hf``, the exported weights."""
  wanted = ['final_metrics']
  wanted += ['accuracy_before'] if config.eval.before else []
  wanted += ['accuracy_after'] if config.eval.after else []
  if config.eval.after and config.eval.get('greedy_after', False) and config.eval.num_samples > 1:
    wanted.append('accuracy_after_greedy')
  wanted += ['accuracy_validation'] if config.eval.get('validation_problems', 0) else []
  exported = not config.export_hf or (workdir / 'hf' / 'model.safetensors').exists()
  return summary.get('steps') == config.steps and all(k in summary for k in wanted) and exported


# What the phases share.

@dataclasses.dataclass
class _Training:
  """What the phases of one run share. The step loop advances ``state``; ``summary`` is what
  ``workdir/summary.json`` holds so far."""
  config: Any
  workdir: pathlib.Path
  started: float  # time.time() when the run began
  mesh: Any
  rules: dict  # logical axis -> mesh axes (sharding.config_rules)
  tokenizer: Any
  report: Any  # the scan of the training split (pipeline.ScanReport)
  eval_records: list  # the held-out problems (eval.split)
  validation_records: list  # the validation problems that choose hyperparameters, or []
  state: Any  # the step's TrainState
  step_fn: Any  # the jitted train step
  shardings: Any  # the state's shardings
  checkpoints: checkpointing.RunCheckpoints
  iterator: Any  # the training batches (their position is saved with each checkpoint)
  start_step: int = 0  # the step the run resumed at (0: a fresh start)
  summary: dict = dataclasses.field(default_factory=dict)

  @property
  def summary_path(self) -> pathlib.Path:
    return self.workdir / 'summary.json'

  def write_summary(self) -> None:
    if jax.process_index() == 0:
      self.summary_path.write_text(json.dumps(self.summary, indent=2))


@dataclasses.dataclass
class _Steps:
  """The step loop's bookkeeping: its metrics log and progress bar, the steps whose metrics are
  still on the device, and the timing of every step after the process's first."""
  log: metrics_log.MetricsLog
  progress: Any  # a tqdm bar (process 0, config.progress_bar), or None
  # Steps run whose metrics are still on the device, (step, metrics, real tokens): fetched
  # together once per log interval (and before any checkpoint or evaluation), so the host never
  # waits on the device in between and the next batch is prepared while the step runs.
  pending: list = dataclasses.field(default_factory=list)
  last: dict = dataclasses.field(default_factory=dict)  # the latest flushed step's metrics
  skipped: int = 0  # updates skipped because the loss or the gradient was not finite
  train_seconds: float = 0.0
  train_cpu_seconds: float = 0.0
  tokens_seen: int = 0
  # CPU time of the whole process (every thread) beside wall time: on a shared machine the
  # wall clock counts other jobs' work, the CPU clock (nearly) only this run's.
  interval_start: float = 0.0
  interval_cpu_start: float = 0.0

  def restart_clock(self) -> None:
    """Times the steps from now (excluding a checkpoint or an evaluation just done)."""
    self.interval_start, self.interval_cpu_start = time.time(), time.process_time()


def _saved_tree(tree) -> dict:
  """What a checkpoint holds of a state (or of its shardings)."""
  return {'step': tree.step, 'params': tree.params, 'opt_state': tree.opt_state}


def run(config) -> dict:
  """Trains as configured; returns the summary (also written to ``workdir/summary.json``).

  One run at a time per workdir: its lock (:mod:`qtarget.train.workdir_lock`) is taken before
  anything is written there (in a multi-process run by process 0, the others waiting for its
  verdict) and held until the run returns or raises; where another live process holds it, every
  process raises :class:`~qtarget.train.errors.WorkdirLocked` at once."""
  maybe_initialize_distributed(config)
  with workdir_lock.hold_for_run(config.workdir, purpose='training'):
    return _train(config)


def _train(config) -> dict:
  """:func:`run` under the workdir's lock: the phases in order."""
  _quiet_libraries()
  started = time.time()
  workdir = pathlib.Path(config.workdir)
  mesh, rules = _check(config, workdir)
  finished = _finished_summary(config, workdir)
  if finished is not None:
    return finished
  training = _set_up(config, workdir, started, mesh, rules)
  _resume(training)
  _evaluate_before(training)
  steps = _train_steps(training)
  _evaluate_after(training)
  _export(training)
  return _finish(training, steps)


# Set up or resume.

def _quiet_libraries() -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file at INFO
  tfds.disable_progress_bar()


def _check(config, workdir: pathlib.Path) -> tuple:
  """``(mesh, rules)``. A bad method, hyperparameter, range, source or layout stops here,
  before anything loads."""
  workdir.mkdir(parents=True, exist_ok=True)
  checks.check_config(config)
  checked_eval_split(config)
  state_lib.hyperparameters(config)
  mesh = sharding_lib.build_mesh(config.mesh)
  sharding_lib.check_layout(mesh, batch_size=config.batch_size, accum_steps=config.accum_steps)
  return mesh, sharding_lib.config_rules(config)


def _read_summary(workdir: pathlib.Path) -> dict:
  path = workdir / 'summary.json'
  return json.loads(path.read_text()) if path.exists() else {}


def _finished_summary(config, workdir: pathlib.Path) -> dict | None:
  """The summary where ``workdir`` holds this config's run, finished (nothing to do); else
  None. Another run's workdir is refused here, before anything loads."""
  saved = checkpointing.latest_saved_config(workdir)
  if saved is None:
    return None
  checkpointing.check_same_run(workdir, saved[1], checks.flatten(config), saved[0])
  summary = _read_summary(workdir)
  if saved[0] != config.steps or not _complete(summary, config, workdir):
    return None
  _log(f'the run in {workdir} is complete ({config.steps} of {config.steps} steps): nothing '
       f'to do; {workdir / "summary.json"} is unchanged. To train it further, start a new '
       f'workdir from its export: --config.model.source=hf '
       f'--config.model.path={workdir / "hf"}.')
  return summary


def _load_models(config, placement: dict) -> tuple:
  """``(student, prior, tokenizer)``, loaded straight into their shards. The prior is None
  unless the step runs a separate frozen model (none for a cached prior, or for the student
  with its LoRA adapters switched off)."""
  student, tokenizer = loading.load_model(config.model, seed=config.seed, **placement)
  if not targets.needs_prior(config.method) or config.prior.source == 'cached' or (
      config.prior.source == 'initial' and config.model.lora_rank != 0):
    return student, None, tokenizer
  if config.prior.source == 'initial':
    prior, prior_tokenizer = loading.load_model(config.model, seed=config.seed,
                                                with_lora=False, **placement)
  else:
    prior, prior_tokenizer = loading.load_model(config.prior, seed=config.seed + 1,
                                                with_lora=False, **placement)
  loading.check_same_vocabulary(tokenizer, prior_tokenizer)
  return student, prior, tokenizer


def _set_up(config, workdir: pathlib.Path, started: float, mesh, rules: dict) -> _Training:
  """Loads the models, reads the data, builds the sharded state and jits the step (nothing is
  restored yet)."""
  if jax.process_index() == 0:
    metrics_log.import_summary_writer()  # while no other thread runs (its docstring says why)
  placement = dict(mesh=mesh, rules=rules)
  student, prior, tokenizer = _load_models(config, placement)
  sharding_lib.check_layout(mesh, batch_size=config.batch_size, accum_steps=config.accum_steps,
                            model_configs=(student.config, getattr(prior, 'config', None)))
  dataset, report, eval_records = _data(config, tokenizer, student.config.vocab_size)
  validation_records = splits.validation_records(config, eval_records)
  _log(f'train data: {report}')
  state = state_lib.create_state(config, student, prior, **placement)
  del student, prior
  step_fn, shardings = sharding_lib.jit_train_step(jax.eval_shape(lambda: state), mesh, rules)
  state = state_lib.place(state, shardings)  # already there: moves nothing
  trainable = sum(x.size for x in jax.tree.leaves(state.params))
  _log(f'mesh {dict(mesh.shape)}; method {config.method} {dict(config.hparams)}; prior: '
       f'{state.spec.prior}; trainable parameters {trainable:,}')
  return _Training(
      config=config, workdir=workdir, started=started, mesh=mesh, rules=rules,
      tokenizer=tokenizer, report=report, eval_records=eval_records,
      validation_records=validation_records, state=state, step_fn=step_fn, shardings=shardings,
      checkpoints=checkpointing.RunCheckpoints(workdir, config), iterator=iter(dataset))


def _resume(training: _Training) -> None:
  """The newest readable checkpoint restored (parameters, optimizer state, step and the data
  iterator's position), if there is one, and the summary written so far read."""
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          _saved_tree(training.state), _saved_tree(training.shardings))
  restored, training.start_step = training.checkpoints.restore(abstract, training.iterator)
  if restored is not None:
    training.state = training.state.replace(
        step=restored['step'], params=restored['params'], opt_state=restored['opt_state'])
    _log(f'resumed from the checkpoint at step {training.start_step}')
  training.summary = _read_summary(training.workdir)


# The step loop.

def _progress_bar(config, start_step: int):
  """A tqdm bar of the steps on process 0 where ``progress_bar`` asks for one, else None."""
  if jax.process_index() != 0 or not config.progress_bar:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=config.steps, initial=start_step, desc='train', unit='step',
              dynamic_ncols=True, file=sys.stdout)


def _train_steps(training: _Training) -> _Steps:
  """The steps from the resumed one to ``config.steps``, each dispatched without waiting on the
  device; metrics flushed once per log interval and before every checkpoint and evaluation.
  SIGTERM or SIGINT saves the step and raises :class:`TrainingInterrupted`. At the end the
  final state is on disk and the logs are closed."""
  config = training.config
  steps = _Steps(log=metrics_log.MetricsLog(training.workdir, training.start_step),
                 progress=_progress_bar(config, training.start_step))
  sharding = sharding_lib.batch_sharding(training.mesh, training.rules)
  # Killed during an evaluation right after its checkpoint: that evaluation first.
  _interval_eval(training, steps.log, training.start_step)
  steps.restart_clock()
  eval_every = config.eval.get('every', 0)
  with _StopSignals(training.checkpoints.reached_preemption) as stop:
    for step in range(training.start_step, config.steps):
      _dispatch(training, steps, sharding, step)
      done = step + 1
      # The last step is always a checkpoint, so every step's metrics are flushed in the loop.
      checkpoint_due = done % config.checkpoint.every == 0 or done == config.steps
      eval_due = bool(eval_every) and done % eval_every == 0
      if (step == training.start_step or done % config.log_every == 0 or checkpoint_due or
          eval_due):
        _flush(training, steps)  # metrics are checked before anything is saved or evaluated
      if checkpoint_due:
        _save(training, done)
      if stop.pending(done):  # before an evaluation: a preemption's grace is short
        _flush(training, steps)  # checked before it is saved
        if not checkpoint_due:
          _save(training, done)
        _end_training(training, steps)
        # An evaluation due at this step runs on resume (its predictions file is absent); at
        # the last step the final evaluation and the export do.
        raise TrainingInterrupted(stop.received, done, training.checkpoints.directory)
      _interval_eval(training, steps.log, done)
      if checkpoint_due or eval_due:
        steps.restart_clock()  # step times exclude the checkpoint and the evaluation
  training.checkpoints.wait()  # an asynchronous save in flight finishes before anything reads it
  if training.checkpoints.latest_step() != config.steps:
    _save(training, config.steps)  # resumed at the end: make sure the final state is on disk
  _end_training(training, steps)
  return steps


def _dispatch(training: _Training, steps: _Steps, sharding, step: int) -> None:
  """Step ``step`` on the next batch, dispatched: it runs while the host goes on, its metrics
  pending on the device."""
  local = next(training.iterator)
  batch = {key: jax.make_array_from_process_local_data(sharding, np.asarray(local[key]))
           for key in batch_keys(training.state.spec)}
  training.state, metrics = training.step_fn(training.state, batch)
  real_tokens = int(np.sum(local['segment_ids'] > 0)) * jax.process_count()
  steps.pending.append((step, metrics, real_tokens))


# Flush metrics and checkpoints.

def _flush(training: _Training, steps: _Steps) -> None:
  """The pending steps' metrics in one transfer: checked (a diverged run stops), timed, and
  logged every ``log_every`` steps and at the last."""
  if not steps.pending:
    return
  config = training.config
  fetched = fetch_metrics([device_metrics for _, device_metrics, _ in steps.pending])
  seconds = (time.time() - steps.interval_start) / len(steps.pending)  # the interval's mean step
  cpu_seconds = (time.process_time() - steps.interval_cpu_start) / len(steps.pending)
  for (step, _, real_tokens), values in zip(steps.pending, fetched):
    metrics = {name: float(value) for name, value in values.items()}
    problem = _divergence(metrics)
    if problem and training.state.spec.skip_nonfinite and metrics['nonfinite']:
      steps.skipped += 1  # the step kept the previous parameters and optimizer state
    elif problem:
      _stop_diverged(training, steps.log, step, metrics, problem)
    metrics['skipped_updates'] = steps.skipped
    metrics['tokens_per_second'] = real_tokens / seconds
    metrics['step_seconds'] = seconds
    metrics['step_cpu_seconds'] = cpu_seconds
    if step > training.start_step:  # the first step of a process includes compilation
      steps.train_seconds += seconds
      steps.train_cpu_seconds += cpu_seconds
      steps.tokens_seen += real_tokens
    steps.last = metrics
    if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
      steps.log.write(step + 1, metrics)
      if steps.progress is None:  # no bar (pods, batch jobs): a line per logged step instead
        _log(f"step {step + 1}/{config.steps}: loss {metrics['loss']:.4f}, nll "
             f"{metrics['nll']:.4f}, accuracy {metrics['accuracy']:.3f}, "
             f"{metrics['tokens_per_second']:.0f} tokens/s")
  if steps.progress is not None:
    steps.progress.update(len(steps.pending))
    steps.progress.set_postfix(loss=f"{steps.last['loss']:.3f}", nll=f"{steps.last['nll']:.3f}",
                               acc=f"{steps.last['accuracy']:.2f}")
  steps.pending.clear()
  steps.restart_clock()


def _stop_diverged(training: _Training, log, step: int, metrics: dict, problem: str) -> None:
  """Raises :class:`TrainingDiverged` for ``step`` (its metrics logged, a good checkpoint in
  flight finished, not cut off); nothing is saved for it or later ones."""
  log.write(step + 1, metrics)
  log.close()
  training.checkpoints.wait()
  latest = training.checkpoints.latest_step()
  kept = (f'the last good checkpoint is step {latest} in {training.checkpoints.directory}'
          if latest else 'no checkpoint was written before it')
  fix = ('Lower --config.optimizer.learning_rate, or set --config.on_nonfinite=skip to skip '
         'updates whose loss or gradient is not finite.' if metrics['nonfinite'] else
         'Lower --config.optimizer.learning_rate.')
  raise TrainingDiverged(f'step {step + 1}: {problem}. The run stops; nothing is saved for '
                         f'this step or later ones and nothing is exported; {kept}. {fix}')


def _save(training: _Training, step: int) -> None:
  training.checkpoints.save(step, _saved_tree(training.state), training.iterator)


def _end_training(training: _Training, steps: _Steps) -> None:
  """After the last step or a signal: the saves finished, the logs and the bar closed, the
  prefetch thread stopped."""
  training.checkpoints.wait()
  steps.log.close()
  if steps.progress is not None:
    steps.progress.close()
  if hasattr(training.iterator, 'close'):
    training.iterator.close()


# Evaluate.

def _evaluate(training: _Training, label: str, step: int, *, records: list | None = None,
              greedy: bool = False, num_problems: int | None = None):
  """Held-out Average@k and pass@k of the current state (``greedy``: one greedy answer each) on
  the first ``num_problems`` (default ``eval.num_problems``) of ``records`` (default the
  held-out split's); predictions to ``workdir/predictions_{label}.jsonl``."""
  from qtarget import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  config = training.config
  records = training.eval_records if records is None else records
  records = records[:config.eval.num_problems if num_problems is None else num_problems]
  if not records:
    return None
  if jax.process_count() > 1:
    _log(f'skipping the {label} evaluation: generation runs in single-process runs only; '
         'evaluate the exported model instead.')
    return None
  _log(f'evaluating {label} on {len(records)} held-out problems...')
  k = 1 if greedy else config.eval.num_samples
  result = evaluate_lib.evaluate(student_model(training.state), training.tokenizer, records,
                                 max_new_tokens=config.eval.max_new_tokens,
                                 batch_size=config.eval.batch_size, num_samples=k,
                                 temperature=0.0 if greedy else config.eval.temperature,
                                 top_p=1.0 if greedy else config.eval.top_p,
                                 seed=config.eval.seed)
  _log(f'{label}: accuracy {result.accuracy:.3f}' + (
      f' (Average@{k}; pass@{k} {result.pass_at_k:.3f})' if k > 1 else '') +
       f' ({len(records)} problems, {result.seconds:.0f} s)')
  if jax.process_index() == 0:
    out = training.workdir / f'predictions_{label}.jsonl'
    out.write_text(''.join(
        json.dumps({**p, 'method': config.method, 'seed': config.seed, 'step': step}) + '\n'
        for p in result.predictions))
  return {'accuracy': result.accuracy, f'pass_at_{k}': result.pass_at_k, 'k': k,
          'problems': len(records), 'step': step, 'seconds': round(result.seconds, 1)}


def _evaluate_before(training: _Training) -> None:
  """The untouched model's held-out accuracy, once (a resumed run has it in its summary)."""
  if not training.config.eval.before or 'accuracy_before' in training.summary:
    return
  training.summary['eval_before'] = _evaluate(training, 'before', 0)
  training.summary['accuracy_before'] = (training.summary['eval_before'] or {}).get('accuracy')
  training.write_summary()


def _interval_eval(training: _Training, log, step: int) -> None:
  """The evaluation every ``eval.every`` steps (between the first and the last step)."""
  config = training.config
  every = config.eval.get('every', 0)
  if not every or step <= 0 or step % every or step >= config.steps:
    return
  if (training.workdir / f'predictions_step{step}.jsonl').exists():
    return  # done before an interruption (its metrics line survived the rewind)
  # The step's checkpoint is on disk before its evaluation is: a kill mid-evaluation then
  # resumes at this step and evaluates it again (not past a half-written checkpoint).
  training.checkpoints.wait()
  result = _evaluate(training, f'step{step}', step)
  if result is not None:
    log.write(step, {'eval_accuracy': result['accuracy']})


def _evaluate_after(training: _Training) -> None:
  """The trained model's held-out accuracy (and greedy, and on validation, where asked)."""
  config, summary = training.config, training.summary
  if config.eval.after:
    summary['eval_after'] = _evaluate(training, 'after', config.steps)
    summary['accuracy_after'] = (summary['eval_after'] or {}).get('accuracy')
    if config.eval.get('greedy_after', False) and config.eval.num_samples > 1:
      summary['eval_after_greedy'] = _evaluate(training, 'after_greedy', config.steps,
                                               greedy=True)
      summary['accuracy_after_greedy'] = (summary['eval_after_greedy'] or {}).get('accuracy')
  if training.validation_records:  # for choosing hyperparameters: never the test split
    summary['eval_validation'] = _evaluate(
        training, 'validation', config.steps, records=training.validation_records,
        greedy=True, num_problems=config.eval.validation_problems)
    summary['accuracy_validation'] = (summary['eval_validation'] or {}).get('accuracy')


# Finish and export.

def _export(training: _Training) -> None:
  """With ``export_hf``, the trained model as a Hugging Face directory, ``workdir/hf``."""
  if not training.config.export_hf:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  model = student_model(training.state)
  if jax.process_count() > 1:  # a collective: every process takes part
    nnx.update(model, multihost_utils.process_allgather(nnx.state(model), tiled=True))
  if jax.process_index() == 0:
    checkpointing.export_hf(model, training.workdir / 'hf', training.tokenizer)  # or DiskFull
  training.summary['exported_to'] = str(training.workdir / 'hf')


def _finish(training: _Training, steps: _Steps) -> dict:
  """The summary completed (the method, the final metrics, the timing), written and printed."""
  config = training.config
  timed_steps = config.steps - training.start_step - 1  # this process's steps after its first
  # Resumed at the end (killed after the last checkpoint): its logged metrics.
  last = steps.last or steps.log.last_metrics(config.steps)
  training.summary.update(
      method=config.method, hyperparameters=dict(config.hparams), steps=config.steps,
      final_metrics=last, train_data=str(training.report), resumed_at_step=training.start_step,
      wall_seconds=round(time.time() - training.started, 1),
      # The timing covers this process's steps (after a resume, those since resumed_at_step).
      mean_step_seconds=(round(steps.train_seconds / timed_steps, 3) if timed_steps > 0
                         else None),
      mean_step_cpu_seconds=(round(steps.train_cpu_seconds / timed_steps, 3) if timed_steps > 0
                             else None),
      tokens_per_second=(round(steps.tokens_seen / steps.train_seconds, 1)
                         if steps.train_seconds else None))
  training.write_summary()
  if jax.process_index() == 0:
    _log('summary: ' + json.dumps(training.summary))
    for line in accuracy_lines(training.summary, config):
      _log(line)
  return training.summary
