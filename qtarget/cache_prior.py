r"""The prior cache's command: ``python -m qtarget.cache_prior`` writes the prior's top-k once.

    python -m qtarget.cache_prior --config configs/NAME.py [--config.prior.cache.k=64]

With the cache written, training never loads the prior. The math of a cached prior
(:class:`~qtarget.cached_prior.CachedPrior`, the bound on the target's error) is
:mod:`qtarget.cached_prior`; the files this command writes are
:mod:`qtarget.data.prior_cache_files`.

One forward pass of the prior (``prior.cache.source``: 'initial' for the student's initial
weights, or the prior's own 'gguf'/'hf'/'random' fields) over the training split, tokenized and
truncated exactly as the trainer does, examples packed into rows of ``data.seq_len`` (segments
attend only within themselves, so the result per example does not depend on the packing) and
run in batches sharded over the config's mesh. For every response token it stores the prior's
k most likely tokens, their log-probabilities and the log of the tail mass, in shards of
``prior.cache.records_per_shard`` examples. Rerun after an interruption: finished shards are
kept. Then train with ``--config.prior.source=cached``. While it writes it holds the lock of the
run's workdir (the cache's default place, ``WORKDIR/prior_cache``) or of the cache directory set
in ``prior.cache.path`` (:mod:`qtarget.train.workdir_lock`): a training run or another
``cache_prior`` there stops it at once, and it stops them.
"""

import pathlib
import sys
import time

import jax
import numpy as np
from flax import nnx

from qtarget import cached_prior
from qtarget.data import prior_cache_files as store
from qtarget.train import workdir_lock
from qtarget.train.errors import ConfigError, WorkdirLocked


def _load_prior(config, mesh, rules):
  """``(prior, student tokenizer)``: the prior as the trainer would build it, and the tokenizer
  the trainer tokenizes the data with (the student's)."""
  from qtarget.train import loading  # pylint: disable=g-import-not-at-top
  placement = dict(mesh=mesh, rules=rules)
  if store.prior_source(config) == 'initial':
    # Loaded as the trainer loads the student (a random model's LoRA adapters are drawn between
    # its base weights); the forward runs with the adapters off.
    return loading.load_model(config.model, seed=config.seed, **placement)
  prior_config = config.prior.copy_and_resolve_references()
  with prior_config.unlocked():
    prior_config.source = store.prior_source(config)
  prior, prior_tokenizer = loading.load_model(prior_config, seed=config.seed + 1,
                                              with_lora=False, **placement)
  tokenizer = loading.load_tokenizer(config.model)
  loading.check_same_vocabulary(tokenizer, prior_tokenizer)
  return prior, tokenizer


def _pack(examples: list[dict], seq_len: int) -> list[list[int]]:
  """Consecutive examples into rows of at most ``seq_len`` tokens (indices per row)."""
  rows, current, used = [], [], 0
  for index, example in enumerate(examples):
    n = len(example['tokens'])
    if current and used + n > seq_len:
      rows.append(current)
      current, used = [], 0
    current.append(index)
    used += n
  if current:
    rows.append(current)
  return rows


def _row_arrays(examples: list[dict], row: list[int], seq_len: int) -> dict:
  tokens = np.zeros(seq_len, np.int32)
  segments = np.zeros(seq_len, np.int32)
  positions = np.zeros(seq_len, np.int32)
  start = 0
  for segment, index in enumerate(row, 1):
    n = len(examples[index]['tokens'])
    tokens[start:start + n] = examples[index]['tokens']
    segments[start:start + n] = segment
    positions[start:start + n] = np.arange(n)
    start += n
  return {'tokens': tokens, 'segment_ids': segments, 'positions': positions}


def locked_directory(config) -> pathlib.Path:
  """The directory whose lock :func:`build` holds: the workdir where the cache is its default
  ``WORKDIR/prior_cache`` (a training run there reads it), else the cache directory."""
  directory = store.cache_directory(config)
  workdir = pathlib.Path(config.workdir)
  return workdir if directory.resolve() == (workdir / 'prior_cache').resolve() else directory


def build(config, *, progress: bool = True, stop_after_shards: int | None = None
          ) -> store.Metadata:
  """Builds (or finishes) the cache of ``config``; returns its metadata.

  It holds the lock of :func:`locked_directory` while it writes, and raises
  :class:`~qtarget.train.errors.WorkdirLocked` before writing anything where another live
  process holds it. ``stop_after_shards`` stops after writing that many new shards (to test
  resumption).
  """
  store.check_cache_config(config)
  if jax.process_count() > 1:
    raise ConfigError('cache_prior runs on one host (its mesh may span that host\'s devices); '
                      f'this job has {jax.process_count()} processes.')
  with workdir_lock.WorkdirLock(locked_directory(config), purpose='cache_prior'):
    return _build(config, progress=progress, stop_after_shards=stop_after_shards)


def _build(config, *, progress: bool, stop_after_shards: int | None) -> store.Metadata:
  """:func:`build` under the lock."""
  from qtarget import compile_check  # pylint: disable=g-import-not-at-top
  from qtarget.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  started = time.time()
  directory = store.cache_directory(config)
  mesh = sharding_lib.build_mesh(config.mesh)
  rules = sharding_lib.config_rules(config)
  prior, tokenizer = _load_prior(config, mesh, rules)
  # The student's embedding rows, read from its config (not its weights): a prior whose
  # vocabulary is padded differently (Qwen2.5 1.5B and 7B) is cut or padded with -inf to it,
  # as the trainer does with an online prior.
  vocab_size = compile_check.student_vocab_size(config)
  store.check_cache_config(config, vocab_size)
  records, metadata = _records_and_metadata(config, tokenizer, vocab_size)
  metadata = _start_or_continue(directory, metadata)
  if metadata.complete:
    _log(f'the cache at {directory} is already complete: {_summary(metadata)}')
    return metadata
  top_k = _top_k_program(prior, vocab_size, metadata.k)
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  _write_shards(config, directory, metadata, records, tokenizer, top_k, batch_sharding,
                progress=progress, stop_after_shards=stop_after_shards, started=started)
  metadata.build_seconds += time.time() - started
  if all(metadata.shard_path(directory, s).exists() for s in range(metadata.num_shards)):
    # Counted from the shards (a crash between a shard's rename and the metadata's update
    # would leave the running count short).
    metadata.response_tokens = sum(
        len(store.decode_row(row, metadata, str(path))['targets'])
        for path in sorted(directory.glob('prior-*.array_record'))
        for row in store.read_shard(path))
    metadata.complete = True
  store.write_metadata(directory, metadata)
  _log(f'{"wrote" if metadata.complete else "partly wrote"} {directory}: {_summary(metadata)}')
  return metadata


def _records_and_metadata(config, tokenizer, vocab_size: int) -> tuple:
  """The training split's records, read and scanned as the trainer reads them, and the
  metadata a cache of them made with this config has."""
  from qtarget.data import builders, pipeline, splits  # pylint: disable=g-import-not-at-top
  records = builders.load_split(splits.dataset_builder(config), 'train')
  data = config.data
  report = pipeline.scan(records, tokenizer, max_length=data.seq_len, truncate=data.truncate,
                         vocab_size=vocab_size, name='train')
  cache = config.prior.cache
  metadata = store.Metadata(k=cache.k, vocab_size=vocab_size, value_dtype=cache.dtype,
                            num_records=len(records), records_per_shard=cache.records_per_shard,
                            fingerprint=store.fingerprint(config, tokenizer, report))
  return records, metadata


def _start_or_continue(directory: pathlib.Path, metadata: store.Metadata) -> store.Metadata:
  """The metadata to build on: the directory's own where it holds this very cache (complete,
  or partly written), else ``metadata`` written to a new cache; a cache of anything else, or
  shards without metadata, are refused."""
  existing = store.read_metadata(directory)
  if existing is not None:
    settings = lambda m: (m.k, m.vocab_size, m.value_dtype, m.num_records, m.records_per_shard,
                          m.format_version)
    differing = store.differences(metadata.fingerprint, existing.fingerprint)
    if settings(existing) != settings(metadata):
      differing.append(f'settings (k, vocabulary, dtype, records, records per shard, format: the '
                       f'cache: {settings(existing)}; this config: {settings(metadata)})')
    if differing:
      raise store.PriorCacheError(
          f'{directory} holds a cache made from something else: {"; ".join(differing)}. Delete '
          'it or set --config.prior.cache.path elsewhere.')
    return existing
  if directory.exists() and any(directory.glob('prior-*')):
    raise store.PriorCacheError(
        f'{directory} holds cache shards but no {store.METADATA}: they cannot be trusted as part '
        'of this cache. Delete them or set --config.prior.cache.path elsewhere.')
  directory.mkdir(parents=True, exist_ok=True)
  store.write_metadata(directory, metadata)
  return metadata


def _top_k_program(prior, vocab_size: int, k: int):
  """The jitted forward of the prior, its adapters off: ``(state, tokens, segment_ids,
  positions) -> CachedPrior`` of its logits cut or padded to ``vocab_size`` rows."""
  from qtarget.train import step as step_lib  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(prior)

  @jax.jit
  def top_k(state, tokens, segment_ids, positions):
    model = nnx.merge(graphdef, state)
    hidden = model.hidden(tokens, segment_ids_BxT=segment_ids, positions_BxT=positions,
                          lora=False, remat=False)
    logits = step_lib.match_vocabulary(model.logits(hidden), vocab_size)
    return cached_prior.from_logits(logits, k)

  return lambda batch: top_k(state, batch['tokens'], batch['segment_ids'], batch['positions'])


def _write_shards(config, directory: pathlib.Path, metadata: store.Metadata, records, tokenizer,
                  top_k, batch_sharding, *, progress: bool, stop_after_shards: int | None,
                  started: float) -> None:
  """Writes the shards not yet on disk (the metadata after each), or ``stop_after_shards``."""
  from qtarget.data import pipeline  # pylint: disable=g-import-not-at-top
  data = config.data
  batch_rows = config.prior.cache.get('batch_size', 0) or config.batch_size
  todo = [s for s in range(metadata.num_shards)
          if not metadata.shard_path(directory, s).exists()]
  done_records = metadata.num_records - sum(len(metadata.shard_records(s)) for s in todo)
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=metadata.num_records, initial=done_records, desc='cache_prior',
               unit='example', dynamic_ncols=True, file=sys.stdout)
  for written, shard in enumerate(todo, 1):
    examples = [pipeline.example_arrays(records[i], tokenizer, data.seq_len, data.truncate)
                for i in metadata.shard_records(shard)]
    encoded = [None] * len(examples)
    rows = _pack(examples, data.seq_len)
    for start in range(0, len(rows), batch_rows):
      group = rows[start:start + batch_rows]
      arrays = [_row_arrays(examples, row, data.seq_len) for row in group]
      arrays += [_row_arrays(examples, [], data.seq_len)] * (batch_rows - len(group))
      batch = {key: jax.device_put(np.stack([a[key] for a in arrays]), batch_sharding)
               for key in ('tokens', 'segment_ids', 'positions')}
      _encode_rows(examples, group, jax.device_get(top_k(batch)), metadata, encoded)
      if bar is not None:
        bar.update(sum(len(row) for row in group))
    store.write_shard(directory, metadata, shard, encoded)
    metadata.shard_bytes = sum(p.stat().st_size for p in directory.glob('*.array_record'))
    store.write_metadata(directory, metadata)
    if bar is not None:
      bar.set_postfix(bytes_per_token=f'{metadata.bytes_per_token():.0f}')
    else:  # progress in the log instead
      _log(f'shard {shard + 1} of {metadata.num_shards} written ({metadata.response_tokens} '
           f'response tokens so far, {time.time() - started:.0f} s)')
    if stop_after_shards is not None and written >= stop_after_shards:
      break
  if bar is not None:
    bar.close()


def _encode_rows(examples: list[dict], group: list[list[int]], result, metadata: store.Metadata,
                 encoded: list) -> None:
  """Each example of the packed rows ``group`` encoded from the prior's top-k ``result`` at its
  response tokens, into ``encoded`` (by example); counts them in ``metadata``."""
  for r, row in enumerate(group):
    offset = 0
    for index in row:
      example = examples[index]
      where = offset + np.flatnonzero(example['loss_mask'])
      encoded[index] = store.encode_row(
          example['targets'][example['loss_mask']], result.token_ids[r, where],
          result.log_probs[r, where], result.tail_log_mass[r, where], metadata)
      metadata.response_tokens += len(where)
      offset += len(example['tokens'])


def _summary(metadata: store.Metadata) -> str:
  return (f'{metadata.num_records} examples, {metadata.response_tokens} response tokens in the '
          f'shards written, k={metadata.k}, '
          f'{metadata.value_dtype}: {metadata.bytes_per_token():.0f} bytes per token, '
          f'{metadata.shard_bytes / 2**20:.1f} MiB on disk, {metadata.build_seconds:.0f} s')


def _log(message: str) -> None:
  print(f'[qtarget.cache_prior] {message}', flush=True)


def main(argv) -> None:
  del argv
  from qtarget.train import checks  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    checks.check_config(config)
    build(config, progress=config.progress_bar)
  except (ConfigError, store.PriorCacheError, WorkdirLocked) as error:
    sys.exit(f'[qtarget.cache_prior] {type(error).__name__}: {error}')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'a configs/*.py file',
                                            lock_config=True)
  app.run(main)
