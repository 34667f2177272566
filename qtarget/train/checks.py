"""Checks of a run's config before anything loads, and of a resumed run against its checkpoint.

:func:`check_config` names the key, the value and the fix for every field that cannot train.
:func:`config_differences` splits the differences between a checkpoint's config and the current
one into fields that define the run (a resume must refuse them) and harmless ones (logging,
evaluation, checkpoint cadence), which a resume lists and accepts.
"""

import difflib
import json
import math

from qtarget import targets
from qtarget.train.errors import ConfigError

# Fields a resumed run may change: how it is logged, evaluated, checkpointed and exported, and
# where it runs. Everything else (method, hyperparameters, models, prior, data, optimizer,
# steps, batch, seed, mesh) defines what is trained.
HARMLESS_PREFIXES = ('workdir', 'log_every', 'progress_bar', 'eval.', 'checkpoint.every',
                     'checkpoint.keep', 'export_hf', 'distributed.', 'start_over',
                     'on_nonfinite', 'mesh.', 'data.data_dir', 'data.prefetch_batches',
                     'model.attention', 'model.remat', 'model.scan_layers', 'prior.attention',
                     'prior.remat', 'prior.scan_layers', 'checkpoint.asynchronous',
                     'prior.cache.path', 'prior.cache.records_per_shard',
                     'prior.cache.batch_size')
# Fields added after checkpoints were written, at the values that give the behaviour those runs
# had: absent from a saved config and at this value now, they are no difference.
ADDED_WITH_DEFAULTS = {'loss_head_grad_accumulation': 'float32', 'prior.cache.source': 'initial',
                       'prior.cache.k': 64, 'prior.cache.dtype': 'float32'}
MODEL_SOURCES = ('gguf', 'hf', 'random')
LOSSES = ('dense', 'fused')
HEAD_GRAD_ACCUMULATIONS = ('float32', 'head_dtype')
FROZEN_WEIGHTS = ('compute_dtype', 'param_dtype')
DATA_KINDS = ('reasoning_gym', 'files')
PRIOR_SOURCES = ('initial',) + MODEL_SOURCES + ('cached',)


def _at_least(config, key, lowest, integer=True):
  value = _get(config, key)
  kind = int if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kind) or value < lowest or (
      not integer and not math.isfinite(value)):
    noun = 'an integer' if integer else 'a finite number'
    raise ConfigError(f'{key}={value!r}: must be {noun} >= {lowest} '
                      f'(set --config.{key}=VALUE).')


def _between(config, key, low, high, *, low_open=False, high_open=False):
  value = _get(config, key)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value > low if low_open else value >= low) and (
      value < high if high_open else value <= high)
  if not ok:
    interval = f'{"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
    raise ConfigError(f'{key}={value!r}: must lie in {interval} (set --config.{key}=VALUE).')


def _get(config, key):
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def resolve_method(config) -> targets.Method:
  """The config's method as a :class:`qtarget.targets.Method`: a name, or a design object
  (registered, and the config then names it, so checkpoints and logs hold a name)."""
  method = config.method
  try:
    resolved = targets.resolve(method)
  except ValueError as error:
    raise ConfigError(f'{error} A new design is a qtarget.targets.Method set as config.method '
                      '(or registered with qtarget.targets.register).') from error
  if not isinstance(method, str):
    with config.ignore_type():
      config.method = resolved.name
  return resolved


def check_config(config) -> None:
  """Raises :class:`ConfigError` for a field that cannot train; touches no file or model."""
  resolve_method(config)
  for key in ('steps', 'batch_size', 'accum_steps', 'loss_chunk_size', 'log_every',
              'checkpoint.every', 'checkpoint.keep', 'data.train_size', 'eval.batch_size',
              'eval.max_new_tokens', 'eval.num_samples'):
    _at_least(config, key, 1)
  for key in ('optimizer.warmup_steps', 'eval.num_problems', 'eval.every', 'data.eval_size',
              'eval.validation_problems', 'model.lora_rank'):
    _at_least(config, key, 0)
  _at_least(config, 'data.seq_len', 2)
  lr = config.optimizer.learning_rate
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
    raise ConfigError(f'optimizer.learning_rate={lr!r}: must be a finite number > 0 (a '
                      'negative rate trains by gradient ascent); set '
                      '--config.optimizer.learning_rate=VALUE.')
  _between(config, 'optimizer.end_learning_rate_ratio', 0, 1)
  _between(config, 'optimizer.b1', 0, 1, high_open=True)
  _between(config, 'optimizer.b2', 0, 1, high_open=True)
  _at_least(config, 'optimizer.weight_decay', 0, integer=False)
  _between(config, 'optimizer.clip_norm', 0, math.inf, low_open=True, high_open=True)
  _at_least(config, 'eval.temperature', 0, integer=False)
  _between(config, 'eval.top_p', 0, 1, low_open=True)
  if config.eval.num_samples > 1 and config.eval.temperature == 0:
    raise ConfigError(f'eval.num_samples={config.eval.num_samples} needs sampling: set '
                      '--config.eval.temperature above 0 (or num_samples=1 for greedy).')
  if config.get('on_nonfinite', 'stop') not in ('stop', 'skip'):
    raise ConfigError(f"on_nonfinite={config.on_nonfinite!r}: must be 'stop' (end the run at "
                      "the first non-finite loss or gradient) or 'skip' (skip that update).")
  _check_choices(config)
  _check_sources(config)


def _choice(key: str, value, choices) -> None:
  if value not in choices:
    nearest = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    raise ConfigError(f'{key}={value!r}: must be one of {", ".join(map(repr, choices))}' +
                      (f' (did you mean {nearest[0]!r}?)' if nearest else '') + '.')


def _is_floating_dtype(name) -> bool:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  try:
    return bool(jnp.issubdtype(jnp.dtype(name), jnp.floating))
  except TypeError:
    return False


def _check_choices(config) -> None:
  """Fields with a fixed set of values, before anything loads (the model and the step check
  them again where they are used)."""
  from qtarget.models import attention  # pylint: disable=g-import-not-at-top
  from qtarget.models import llama  # pylint: disable=g-import-not-at-top
  _choice('loss', config.loss, LOSSES)
  _choice('loss_head_grad_accumulation', config.get('loss_head_grad_accumulation', 'float32'),
          HEAD_GRAD_ACCUMULATIONS)
  _choice('frozen_weights', config.get('frozen_weights', 'compute_dtype'), FROZEN_WEIGHTS)
  _choice('data.kind', config.data.kind, DATA_KINDS)
  sections = ('model', 'prior') if targets.needs_prior(config.method) else ('model',)
  for section in sections:
    fields = config.get(section) or {}
    if 'remat' in fields and not isinstance(fields['remat'], bool):
      _choice(f'{section}.remat', fields['remat'], tuple(llama.REMAT_POLICIES))
    if 'attention' in fields:
      _choice(f'{section}.attention', fields['attention'], tuple(attention.IMPLEMENTATIONS))
    for key in ('compute_dtype', 'param_dtype'):
      if key in fields and not _is_floating_dtype(fields[key]):
        raise ConfigError(f'{section}.{key}={fields[key]!r}: must name a floating dtype '
                          "('float32', 'bfloat16', ...).")
  if config.data.kind == 'reasoning_gym':
    from reasoning_gym import factory  # pylint: disable=g-import-not-at-top
    if config.data.task not in factory.DATASETS:
      nearest = difflib.get_close_matches(config.data.task, list(factory.DATASETS), n=3)
      raise ConfigError(f'data.task={config.data.task!r} is not a reasoning-gym task' +
                        (f'; did you mean {", ".join(nearest)}?' if nearest else '.') +
                        ' reasoning_gym.factory.DATASETS lists them (a dataset of your own: '
                        'reasoning_gym.register_dataset it in the config file).')


def _check_sources(config) -> None:
  if config.model.source not in MODEL_SOURCES:
    raise ConfigError(f'model.source={config.model.source!r}: must be one of '
                      f'{", ".join(MODEL_SOURCES)}.')
  if config.model.source == 'hf' and not config.model.path:
    raise ConfigError("model.path is empty: model.source='hf' needs the Hugging Face directory "
                      '(set --config.model.path=DIR).')
  if config.method in targets.CONSTRUCTORS and targets.needs_prior(config.method):
    source = config.prior.source
    if source not in PRIOR_SOURCES:
      raise ConfigError(
          f'method {config.method!r} needs a prior, and prior.source={source!r} gives none: set '
          f'--config.prior.source to one of {", ".join(PRIOR_SOURCES)} ("initial": the frozen '
          'student at step 0), or choose a method without a prior.')
    if source == 'cached':
      from qtarget.data import prior_cache_files  # pylint: disable=g-import-not-at-top
      prior_cache_files.check_cache_config(config)
      source = config.prior.cache.source
    if source == 'hf' and not config.prior.path:
      raise ConfigError("prior.path is empty: prior.source='hf' needs the teacher's Hugging Face "
                        'directory (set --config.prior.path=DIR).')
    if source == 'random' and not len(config.prior.architecture):
      raise ConfigError("prior.architecture is empty: prior.source='random' needs the "
                        'LlamaConfig fields (set --config.prior.architecture.NAME=VALUE).')
  if config.model.source == 'random' and not len(config.model.architecture):
    raise ConfigError("model.architecture is empty: model.source='random' needs the LlamaConfig "
                      'fields (set --config.model.architecture.NAME=VALUE).')
  data = config.data
  if data.kind == 'files' and not data.train_path:
    raise ConfigError("data.train_path is empty: data.kind='files' needs a training jsonl or "
                      'parquet file (set --config.data.train_path=FILE).')


def flatten(config) -> dict:
  """``{'a.b': value}`` of a ConfigDict (or nested dicts), values as JSON would store them."""
  data = json.loads(config.to_json()) if hasattr(config, 'to_json') else config
  flat = {}

  def walk(node, prefix):
    if isinstance(node, dict):
      for key, value in node.items():
        walk(value, f'{prefix}{key}.' if isinstance(value, dict) else f'{prefix}{key}')
    else:
      flat[prefix.rstrip('.')] = node

  walk(data, '')
  return flat


def config_differences(saved: dict, current: dict) -> tuple[list, list]:
  """``(defining, harmless)``: lines ``key: saved -> current`` of the fields that differ."""
  defining, harmless = [], []
  for key in sorted(set(saved) | set(current)):
    old, new = saved.get(key, '<absent>'), current.get(key, '<absent>')
    if old == new or (old == '<absent>' and ADDED_WITH_DEFAULTS.get(key, old) == new):
      continue
    line = f'{key}: {old!r} -> {new!r}'
    unused_cache = key.startswith('prior.cache.') and 'cached' not in (
        saved.get('prior.source'), current.get('prior.source'))
    (harmless if key.startswith(HARMLESS_PREFIXES) or unused_cache else defining).append(line)
  return defining, harmless


def nearest_keys(key: str, valid: list, count: int = 3) -> list:
  """The valid config keys closest to ``key`` (for an unknown ``--config.KEY``)."""
  return difflib.get_close_matches(key, valid, n=count, cutoff=0.5) or difflib.get_close_matches(
      key.split('.')[-1], valid, n=count, cutoff=0.3)
