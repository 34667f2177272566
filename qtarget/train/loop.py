"""The training loop: data, the mesh, checkpoints, logging, evaluation, export.

:func:`run` builds the mesh (``data``, ``fsdp``, ``tensor``), loads the student and the prior
straight into their shards, initialises the optimizer state under ``jit`` into its shards, jits
:func:`qtarget.train.step.train_step` with shardings derived from ``jax.eval_shape`` and the
logical-axis rules, checkpoints with orbax (trainable parameters, optimizer state, step and the
data iterator; never the prior), resumes from the latest checkpoint, logs to TensorBoard and
JSON lines, evaluates before and after, and exports the model to a Hugging Face directory.
"""

import json
import pathlib
import signal
import sys
import threading
import time

import jax
import numpy as np
from flax import nnx

from qtarget import targets
from qtarget.train import checkpointing
from qtarget.train import checks
from qtarget.train import loading
from qtarget.train import metrics_log
from qtarget.train import sharding as sharding_lib
from qtarget.train import state as state_lib
from qtarget.train import workdir_lock
from qtarget.train.errors import ConfigError
from qtarget.train.step import batch_keys, student_model

# The loop.

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


EVAL_SPLITS = ('test', 'validation')


def checked_eval_split(config) -> str:
  """The held-out split ``eval.split`` names (test, unless a config chooses on validation)."""
  split = config.eval.get('split', 'test')
  if split not in EVAL_SPLITS:
    raise ConfigError(f'eval.split={split!r}: must be one of {EVAL_SPLITS}.')
  if split != 'test' and config.data.kind != 'reasoning_gym':
    raise ConfigError(f'eval.split={split!r}: data.kind={config.data.kind!r} has a test split '
                      'only (data.eval_path).')
  if split != 'test' and config.eval.get('validation_problems', 0):
    raise ConfigError(f'eval.validation_problems={config.eval.validation_problems} with '
                      f'eval.split={split!r}: the evaluations already read that split; set '
                      'eval.validation_problems=0.')
  return split


def _builder(config):
  """The tfds builder of ``config.data`` (prepared) and the name of the held-out split its
  evaluations read (``eval.split``), or None where the data has none."""
  from qtarget.data import builders  # pylint: disable=g-import-not-at-top
  data = config.data
  eval_split = checked_eval_split(config)
  if data.kind == 'reasoning_gym':
    builder_config = builders.ReasoningGymConfig(
        task=data.task, train_size=data.train_size, eval_size=data.eval_size, seed=data.seed,
        difficulty=dict(data.difficulty), rationale=dict(data.get('rationale', {})))
  elif data.kind == 'files':
    builder_config = builders.LocalFilesConfig(
        train_path=data.train_path, eval_path=data.eval_path or None, task=data.task,
        prompt_field=data.prompt_field or None, response_field=data.response_field or None)
    eval_split = eval_split if data.eval_path else None
  else:
    raise ConfigError(f"data.kind must be 'reasoning_gym' or 'files', got {data.kind!r}.")
  return builders.prepare(builder_config, data.data_dir or None), eval_split


def dataset_builder(config):
  """The prepared tfds builder of a config's data (its train, validation and test splits)."""
  return _builder(config)[0]


def held_out_records(config) -> list[dict]:
  """The held-out problems a run with ``config`` evaluates on (the training split is not read)."""
  from qtarget.data import builders  # pylint: disable=g-import-not-at-top
  builder, eval_split = _builder(config)
  return builders.load_split(builder, eval_split) if eval_split else []


def _data(config, tokenizer, vocab_size):
  from qtarget.data import builders, pipeline  # pylint: disable=g-import-not-at-top
  data = config.data
  builder, eval_split = _builder(config)
  train_records = builders.load_split(builder, 'train')
  report = pipeline.scan(train_records, tokenizer, max_length=data.seq_len,
                         truncate=data.truncate, vocab_size=vocab_size, name='train')
  eval_records = builders.load_split(builder, eval_split) if eval_split else []
  cache_source = None
  if targets.needs_prior(config.method) and config.prior.source == 'cached':
    from qtarget.data import prior_cache  # pylint: disable=g-import-not-at-top
    cache_source = prior_cache.open_for_training(config, tokenizer, report, vocab_size)
    _log(f'prior: cached top-{cache_source.metadata.k} at {prior_cache.cache_directory(config)}')
  dataset = pipeline.train_dataset(
      builder, tokenizer, seq_len=data.seq_len, batch_size=config.batch_size,
      seed=data.seed * 1_000_003 + config.seed,  # the run seed varies the order, not the data
      num_epochs=None, pack=data.pack, truncate=data.truncate,
      process_index=jax.process_index(), process_count=jax.process_count(),
      prefetch_batches=data.get('prefetch_batches', 2), prior_cache_source=cache_source)
  return dataset, report, eval_records


def _validation_records(config, test_records: list[dict]) -> list[dict]:
  """The validation split's problems when ``eval.validation_problems`` asks for them
  (``test_records``: the held-out split the run is scored on, which they must not share)."""
  if not config.eval.get('validation_problems', 0):
    return []
  if config.data.kind != 'reasoning_gym':
    raise ConfigError(f'eval.validation_problems={config.eval.validation_problems}: '
                      f"data.kind={config.data.kind!r} has no validation split.")
  from qtarget.data import builders  # pylint: disable=g-import-not-at-top
  builder, _ = _builder(config)
  records = builders.load_split(builder, 'validation')
  test = {r['prompt'] for r in test_records}
  shared = sum(r['prompt'] in test for r in records)
  if shared:  # the builder draws validation without test questions: a stale or foreign split
    raise ConfigError(f'eval.validation_problems={config.eval.validation_problems}: the '
                      f'validation split shares {shared} of its {len(records)} problems with the '
                      'test split; it cannot choose hyperparameters.')
  if len(records) < config.eval.validation_problems:
    raise ConfigError(f'eval.validation_problems={config.eval.validation_problems}: the '
                      f'validation split holds {len(records)} (data.eval_size).')
  return records


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


def _evaluate(label, state, tokenizer, eval_records, config, workdir, step, *,
              greedy: bool = False, num_problems: int | None = None):
  """Held-out Average@k and pass@k (``greedy``: one greedy answer each) on the first
  ``num_problems`` (default ``eval.num_problems``); predictions to
  ``workdir/predictions_{label}.jsonl``."""
  from qtarget import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  records = eval_records[:config.eval.num_problems if num_problems is None else num_problems]
  if not records:
    return None
  if jax.process_count() > 1:
    _log(f'skipping the {label} evaluation: generation runs in single-process runs only; '
         'evaluate the exported model instead.')
    return None
  _log(f'evaluating {label} on {len(records)} held-out problems...')
  k = 1 if greedy else config.eval.num_samples
  result = evaluate_lib.evaluate(student_model(state), tokenizer, records,
                                 max_new_tokens=config.eval.max_new_tokens,
                                 batch_size=config.eval.batch_size, num_samples=k,
                                 temperature=0.0 if greedy else config.eval.temperature,
                                 top_p=1.0 if greedy else config.eval.top_p,
                                 seed=config.eval.seed)
  _log(f'{label}: accuracy {result.accuracy:.3f}' + (
      f' (Average@{k}; pass@{k} {result.pass_at_k:.3f})' if k > 1 else '') +
       f' ({len(records)} problems, {result.seconds:.0f} s)')
  if jax.process_index() == 0:
    out = workdir / f'predictions_{label}.jsonl'
    out.write_text(''.join(
        json.dumps({**p, 'method': config.method, 'seed': config.seed, 'step': step}) + '\n'
        for p in result.predictions))
  return {'accuracy': result.accuracy, f'pass_at_{k}': result.pass_at_k, 'k': k,
          'problems': len(records), 'step': step, 'seconds': round(result.seconds, 1)}


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
  """:func:`run` under the workdir's lock."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file at INFO
  tfds.disable_progress_bar()
  started = time.time()
  workdir = pathlib.Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # A bad method, hyperparameter, range or source stops here, before anything loads.
  checks.check_config(config)
  checked_eval_split(config)
  state_lib.hyperparameters(config)
  mesh = sharding_lib.build_mesh(config.mesh)
  sharding_lib.check_layout(mesh, batch_size=config.batch_size, accum_steps=config.accum_steps)
  rules = {**dict(config.sharding_rules), **dict(config.get('activation_rules', ()))}
  placement = dict(mesh=mesh, rules=rules)
  summary_path = workdir / 'summary.json'
  saved = checkpointing.latest_saved_config(workdir)
  if saved is not None:  # another run's workdir is refused before anything loads
    checkpointing.check_same_run(workdir, saved[1], checks.flatten(config), saved[0])
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if saved[0] == config.steps and _complete(summary, config, workdir):
      _log(f'the run in {workdir} is complete ({config.steps} of {config.steps} steps): nothing '
           f'to do; {summary_path} is unchanged. To train it further, start a new workdir from '
           f'its export: --config.model.source=hf --config.model.path={workdir / "hf"}.')
      return summary
  if jax.process_index() == 0:
    metrics_log.import_summary_writer()  # while no other thread runs (its docstring says why)

  student, tokenizer = loading.load_model(config.model, seed=config.seed, **placement)
  prior_model = None
  if targets.needs_prior(config.method) and config.prior.source != 'cached' and (
      config.prior.source != 'initial' or config.model.lora_rank == 0):
    if config.prior.source == 'initial':
      prior_model, prior_tokenizer = loading.load_model(config.model, seed=config.seed,
                                                        with_lora=False, **placement)
    else:
      prior_model, prior_tokenizer = loading.load_model(config.prior, seed=config.seed + 1,
                                                        with_lora=False, **placement)
    loading.check_same_vocabulary(tokenizer, prior_tokenizer)
  sharding_lib.check_layout(mesh, batch_size=config.batch_size, accum_steps=config.accum_steps,
                            model_configs=(student.config, getattr(prior_model, 'config', None)))
  dataset, report, eval_records = _data(config, tokenizer, student.config.vocab_size)
  validation_records = _validation_records(config, eval_records)
  _log(f'train data: {report}')

  state = state_lib.create_state(config, student, prior_model, **placement)
  del student, prior_model
  step_fn, shardings = sharding_lib.jit_train_step(jax.eval_shape(lambda: state), mesh, rules)
  state = state_lib.place(state, shardings)  # already there: moves nothing
  trainable = sum(x.size for x in jax.tree.leaves(state.params))
  _log(f'mesh {dict(mesh.shape)}; method {config.method} {dict(config.hparams)}; prior: '
       f'{state.spec.prior}; trainable parameters {trainable:,}')

  run_checkpoints = checkpointing.RunCheckpoints(workdir, config)
  iterator = iter(dataset)
  saved_tree = lambda s: {'step': s.step, 'params': s.params, 'opt_state': s.opt_state}
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          saved_tree(state), saved_tree(shardings))
  restored, start_step = run_checkpoints.restore(abstract, iterator)
  if restored is not None:
    state = state.replace(step=restored['step'], params=restored['params'],
                          opt_state=restored['opt_state'])
    _log(f'resumed from the checkpoint at step {start_step}')

  summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
  if config.eval.before and 'accuracy_before' not in summary:
    summary['eval_before'] = _evaluate('before', state, tokenizer, eval_records, config,
                                       workdir, 0)
    summary['accuracy_before'] = (summary['eval_before'] or {}).get('accuracy')
    if jax.process_index() == 0:
      summary_path.write_text(json.dumps(summary, indent=2))

  log = metrics_log.MetricsLog(workdir, start_step)
  progress = None
  if jax.process_index() == 0 and config.progress_bar:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm(total=config.steps, initial=start_step, desc='train', unit='step',
                    dynamic_ncols=True, file=sys.stdout)
  sharding = sharding_lib.batch_sharding(mesh, rules)

  def save(step):
    run_checkpoints.save(step, saved_tree(state), iterator)

  def interval_eval(step):
    every = config.eval.get('every', 0)
    if not every or step <= 0 or step % every or step >= config.steps:
      return
    if (workdir / f'predictions_step{step}.jsonl').exists():
      return  # done before an interruption (its metrics line survived the rewind)
    # The step's checkpoint is on disk before its evaluation is: a kill mid-evaluation then
    # resumes at this step and evaluates it again (not past a half-written checkpoint).
    run_checkpoints.wait()
    result = _evaluate(f'step{step}', state, tokenizer, eval_records, config, workdir, step)
    if result is not None:
      log.write(step, {'eval_accuracy': result['accuracy']})

  interval_eval(start_step)  # killed during an evaluation right after its checkpoint
  train_seconds, train_cpu_seconds, tokens_seen, last, skipped = 0.0, 0.0, 0, {}, 0
  # Steps run whose metrics are still on the device: fetched together once per log interval
  # (and before any checkpoint or evaluation), so the host never waits on the device in between
  # and the next batch is prepared while the step runs.
  pending = []
  # CPU time of the whole process (every thread) beside wall time: on a shared machine the
  # wall clock counts other jobs' work, the CPU clock (nearly) only this run's.
  interval_start, interval_cpu_start = time.time(), time.process_time()

  def flush():
    nonlocal train_seconds, train_cpu_seconds, tokens_seen, last, skipped
    nonlocal interval_start, interval_cpu_start
    if not pending:
      return
    fetched = fetch_metrics([device_metrics for _, device_metrics, _ in pending])
    seconds = (time.time() - interval_start) / len(pending)  # the interval's mean step
    cpu_seconds = (time.process_time() - interval_cpu_start) / len(pending)
    for (step, _, real_tokens), values in zip(pending, fetched):
      metrics = {name: float(value) for name, value in values.items()}
      problem = _divergence(metrics)
      if problem and state.spec.skip_nonfinite and metrics['nonfinite']:
        skipped += 1  # the step kept the previous parameters and optimizer state
      elif problem:
        log.write(step + 1, metrics)
        log.close()
        run_checkpoints.wait()  # a good checkpoint in flight is finished, not cut off
        latest = run_checkpoints.latest_step()
        kept = (f'the last good checkpoint is step {latest} in {run_checkpoints.directory}'
                if latest else 'no checkpoint was written before it')
        fix = ('Lower --config.optimizer.learning_rate, or set --config.on_nonfinite=skip to '
               'skip updates whose loss or gradient is not finite.' if metrics['nonfinite'] else
               'Lower --config.optimizer.learning_rate.')
        raise TrainingDiverged(f'step {step + 1}: {problem}. The run stops; nothing is saved '
                               f'for this step or later ones and nothing is exported; {kept}. '
                               f'{fix}')
      metrics['skipped_updates'] = skipped
      metrics['tokens_per_second'] = real_tokens / seconds
      metrics['step_seconds'] = seconds
      metrics['step_cpu_seconds'] = cpu_seconds
      if step > start_step:  # the first step of a process includes compilation
        train_seconds += seconds
        train_cpu_seconds += cpu_seconds
        tokens_seen += real_tokens
      last = metrics
      if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
        log.write(step + 1, metrics)
        if progress is None:  # no bar (pods, batch jobs): a line per logged step instead
          _log(f"step {step + 1}/{config.steps}: loss {metrics['loss']:.4f}, nll "
               f"{metrics['nll']:.4f}, accuracy {metrics['accuracy']:.3f}, "
               f"{metrics['tokens_per_second']:.0f} tokens/s")
    if progress is not None:
      progress.update(len(pending))
      progress.set_postfix(loss=f"{last['loss']:.3f}", nll=f"{last['nll']:.3f}",
                           acc=f"{last['accuracy']:.2f}")
    pending.clear()
    interval_start, interval_cpu_start = time.time(), time.process_time()

  def end_training():
    """After the last step or a signal: the saves finished, the logs and the bar closed, the
    prefetch thread stopped."""
    run_checkpoints.wait()
    log.close()
    if progress is not None:
      progress.close()
    if hasattr(iterator, 'close'):
      iterator.close()

  eval_every = config.eval.get('every', 0)
  with _StopSignals(run_checkpoints.reached_preemption) as stop:
    for step in range(start_step, config.steps):
      local = next(iterator)
      batch = {key: jax.make_array_from_process_local_data(sharding, np.asarray(local[key]))
               for key in batch_keys(state.spec)}
      state, metrics = step_fn(state, batch)  # dispatched: runs while the host goes on
      real_tokens = int(np.sum(local['segment_ids'] > 0)) * jax.process_count()
      pending.append((step, metrics, real_tokens))
      done = step + 1
      # The last step is always a checkpoint, so every step's metrics are flushed in the loop.
      checkpoint_due = done % config.checkpoint.every == 0 or done == config.steps
      eval_due = bool(eval_every) and done % eval_every == 0
      if step == start_step or done % config.log_every == 0 or checkpoint_due or eval_due:
        flush()  # metrics are checked before anything is saved or evaluated
      if checkpoint_due:
        save(done)
      if stop.pending(done):  # before an evaluation: a preemption's grace is short
        flush()  # checked before it is saved
        if not checkpoint_due:
          save(done)
        end_training()
        # An evaluation due at this step runs on resume (its predictions file is absent); at
        # the last step the final evaluation and the export do.
        raise TrainingInterrupted(stop.received, done, run_checkpoints.directory)
      interval_eval(done)
      if checkpoint_due or eval_due:
        # step times exclude the checkpoint and the evaluation
        interval_start, interval_cpu_start = time.time(), time.process_time()
  run_checkpoints.wait()  # an asynchronous save in flight finishes before anything reads it
  if run_checkpoints.latest_step() != config.steps:
    save(config.steps)  # resumed at the end: make sure the final state is on disk
  end_training()

  if config.eval.after:
    summary['eval_after'] = _evaluate('after', state, tokenizer, eval_records, config, workdir,
                                      config.steps)
    summary['accuracy_after'] = (summary['eval_after'] or {}).get('accuracy')
    if config.eval.get('greedy_after', False) and config.eval.num_samples > 1:
      summary['eval_after_greedy'] = _evaluate('after_greedy', state, tokenizer, eval_records,
                                               config, workdir, config.steps, greedy=True)
      summary['accuracy_after_greedy'] = (summary['eval_after_greedy'] or {}).get('accuracy')
  if validation_records:  # for choosing hyperparameters: never the test split
    summary['eval_validation'] = _evaluate(
        'validation', state, tokenizer, validation_records, config, workdir, config.steps,
        greedy=True, num_problems=config.eval.validation_problems)
    summary['accuracy_validation'] = (summary['eval_validation'] or {}).get('accuracy')
  if config.export_hf:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    model = student_model(state)
    if jax.process_count() > 1:  # a collective: every process takes part
      nnx.update(model, multihost_utils.process_allgather(nnx.state(model), tiled=True))
    if jax.process_index() == 0:
      checkpointing.export_hf(model, workdir / 'hf', tokenizer)  # whole, or DiskFull
    summary['exported_to'] = str(workdir / 'hf')
  timed_steps = config.steps - start_step - 1  # this process's steps after its first
  if not last:  # resumed at the end (killed after the last checkpoint): its logged metrics
    last = log.last_metrics(config.steps)
  summary.update(
      method=config.method, hyperparameters=dict(config.hparams), steps=config.steps,
      final_metrics=last, train_data=str(report), resumed_at_step=start_step,
      wall_seconds=round(time.time() - started, 1),
      # The timing covers this process's steps (after a resume, those since resumed_at_step).
      mean_step_seconds=round(train_seconds / timed_steps, 3) if timed_steps > 0 else None,
      mean_step_cpu_seconds=(round(train_cpu_seconds / timed_steps, 3) if timed_steps > 0
                             else None),
      tokens_per_second=round(tokens_seen / train_seconds, 1) if train_seconds else None)
  if jax.process_index() == 0:
    summary_path.write_text(json.dumps(summary, indent=2))
    _log('summary: ' + json.dumps(summary))
    for line in accuracy_lines(summary, config):
      _log(line)
  return summary
