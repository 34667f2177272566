"""The prior cache on disk (`python -m qtarget.cache_prior`) and training with it."""

import shutil
import types

import numpy as np
import pytest

from qtarget import cache_prior
from qtarget import train
from qtarget.data import prior_cache_files as store
from tests import availability
from tests import test_train_step

availability.skip_module_without_smollm2()  # the tiny config uses SmolLM2's tokenizer
VOCAB = 49152


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def _config(workdir, data_dir, **overrides):
  """The tiny config on a few training problems, 2 steps."""
  return test_train_step.tiny_config(**{
      'workdir': str(workdir), 'data.data_dir': str(data_dir), 'data.train_size': 24,
      'model.architecture.vocab_size': VOCAB, 'batch_size': 8, 'steps': 2,
      'checkpoint.every': 2, 'eval.before': False, 'eval.after': False, 'export_hf': False,
      'prior.cache.k': 4, 'prior.cache.records_per_shard': 8, 'progress_bar': False,
      **overrides})


@pytest.fixture(scope='module')
def built(tmp_path_factory, data_dir):
  """A whole k=4 cache of two shards, and its config."""
  config = _config(tmp_path_factory.mktemp('cache') / 'run', data_dir)
  metadata = cache_prior.build(config, progress=False)
  return config, metadata


def _scan(config):
  from qtarget.data import builders, pipeline, splits  # pylint: disable=g-import-not-at-top
  builder = splits.dataset_builder(config)
  records = builders.load_split(builder, 'train')
  tokenizer = train.loading.load_tokenizer(config.model)
  return records, tokenizer, pipeline.scan(records, tokenizer, max_length=config.data.seq_len,
                                           truncate=config.data.truncate, vocab_size=VOCAB)


def _open(config, k=None, **changes):
  _, tokenizer, report = _scan(config)
  expected = store.fingerprint(config, tokenizer, report)
  for name, value in changes.items():
    expected[name] = value
  return store.open_cache(store.cache_directory(config), expected,
                          vocab_size=VOCAB, k=k or config.prior.cache.k,
                          value_dtype=config.prior.cache.dtype, build_command='BUILD')


def test_the_cache_holds_the_priors_top_k_at_every_response_token(built):
  config, metadata = built
  assert metadata.complete and metadata.num_shards == 2 and metadata.num_records > 4
  source = _open(config)
  rows = [source[i] for i in range(len(source))]
  assert sum(len(r['targets']) for r in rows) == metadata.response_tokens > 0
  for row in rows:
    probs = np.exp(row['log_probs'])
    assert np.all(np.diff(row['log_probs'], axis=1) <= 0)  # descending
    np.testing.assert_allclose(probs.sum(1) + np.exp(row['tail']), 1.0, rtol=1e-5)
  assert metadata.bytes_per_token() == 4 + 4 * (2 + 4) + 4  # target, uint16 ids, f32 values


@pytest.mark.slow  # a build killed mid-way (two builds; the refusal of incomplete caches stays in the default run)
def test_an_interrupted_build_is_refused_then_resumes_to_the_same_cache(built, tmp_path):
  config, _ = built
  partial = config.copy_and_resolve_references()
  partial.prior.cache.path = str(tmp_path / 'partial')
  first = cache_prior.build(partial, progress=False, stop_after_shards=1)
  assert not first.complete
  with pytest.raises(store.PriorCacheError, match=r'incomplete \(1 of 2 shards\)'):
    _open(partial)
  second = cache_prior.build(partial, progress=False)
  assert second.complete and second.response_tokens == built[1].response_tokens
  whole = store.cache_directory(config)
  for name in ('prior-00000-of-00002.array_record', 'prior-00001-of-00002.array_record'):
    assert (tmp_path / 'partial' / name).read_bytes() == (whole / name).read_bytes()
  # Shards without metadata are never adopted by a new build.
  (tmp_path / 'partial' / store.METADATA).unlink()
  with pytest.raises(store.PriorCacheError, match='holds cache shards but no metadata.json'):
    cache_prior.build(partial, progress=False)


@pytest.mark.parametrize('component, override, message', [
    # prior_identity (seed, architecture, LoRA rank) by default; the other parts are slow.
    pytest.param('data', {'data.train_size': 25}, r'made from something else: data \(the cache',
                 marks=pytest.mark.slow),
    pytest.param('sequences', {'data.seq_len': 64}, r'made from something else: sequences '
                 r"\(the cache: \{'seq_len': 128", marks=pytest.mark.slow),
    ('prior', {'seed': 3}, r'made from something else: prior \(the cache'),
])
def test_a_cache_made_from_something_else_is_refused(built, data_dir, component, override,
                                                     message):
  config, _ = built
  other = _config(config.workdir, data_dir, **override)
  other.prior.cache.path = str(store.cache_directory(config))
  with pytest.raises(store.PriorCacheError, match=message):
    _open(other)
  # and the builder will not overwrite it with another cache
  with pytest.raises(store.PriorCacheError, match=f'holds a cache made from something '
                     f'else: {component}'):
    cache_prior.build(other, progress=False)


@pytest.mark.slow  # two more builds; the prior's fingerprint refusal stays in the default run
def test_another_tokenizer_or_other_contents_are_refused(built):
  config, _ = built
  records, tokenizer, report = _scan(config)
  vocab = {'a': 0, 'b': 1}
  other = types.SimpleNamespace(backend=types.SimpleNamespace(get_vocab=lambda: vocab),
                                chat_template=tokenizer.chat_template)
  with pytest.raises(store.PriorCacheError, match=r'something else: tokenizer \(the cache: '
                     r"\{'tokens': 49152"):
    _open(config, tokenizer=store.fingerprint(config, other, report)['tokenizer'])
  # Same vocabulary, another chat template: the tokenizer part differs too.
  templated = types.SimpleNamespace(backend=tokenizer.backend, chat_template='{{ messages }}')
  with pytest.raises(store.PriorCacheError, match='something else: tokenizer'):
    _open(config, tokenizer=store.fingerprint(config, templated, report)['tokenizer'])
  # Same records count and sizes, one prompt's text changed: the data digest (token ids of
  # every example) differs.
  from qtarget.data import pipeline  # pylint: disable=g-import-not-at-top
  edited = [dict(r) for r in records]
  edited[0]['prompt'] = edited[0]['prompt'].replace('?', '!', 1) + ' '
  changed = pipeline.scan(edited, tokenizer, max_length=config.data.seq_len,
                          truncate=config.data.truncate, vocab_size=VOCAB)
  assert changed.examples == report.examples and changed.digest != report.digest
  with pytest.raises(store.PriorCacheError, match=r'something else: data \(the cache'):
    _open(config, data=store.fingerprint(config, tokenizer, changed)['data'])


def test_another_k_is_refused(built):
  config, _ = built
  with pytest.raises(store.PriorCacheError, match=r'keeps k=4 in float32; this config asks '
                     r'for k=8 in float32'):
    _open(config, k=8)


def test_missing_truncated_and_damaged_caches_are_refused(built, tmp_path):
  config, _ = built
  copy = config.copy_and_resolve_references()
  copy.prior.cache.path = str(tmp_path / 'copy')
  with pytest.raises(store.PriorCacheError, match='no prior cache at .*: build it with'):
    _open(copy)
  shutil.copytree(store.cache_directory(config), tmp_path / 'copy')
  shard = tmp_path / 'copy' / 'prior-00001-of-00002.array_record'
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2])
  with pytest.raises(store.PriorCacheError, match='prior-00001-of-00002.array_record: '
                     r'(unreadable|holds \d+ records, expected \d+)'):
    _open(copy)
  shard.unlink()
  with pytest.raises(store.PriorCacheError, match='prior-00001-of-00002.array_record is '
                     'missing'):
    _open(copy)
  metadata = store.read_metadata(tmp_path / 'copy')
  with pytest.raises(store.PriorCacheError, match='does not hold 3 positions of k=4'):
    store.decode_row(np.asarray([3, 4], np.int32).tobytes() + b'\0' * 10, metadata, 'row')
  row = {'targets': np.asarray([5, 6]), 'token_ids': np.zeros((2, 4), np.int32),
         'log_probs': np.zeros((2, 4)), 'tail': np.zeros(2)}
  example = {'tokens': np.zeros(4, np.int32), 'targets': np.asarray([1, 2, 5, 7]),
             'loss_mask': np.asarray([False, False, True, True])}
  with pytest.raises(store.PriorCacheError, match='record 3: the cached response tokens '
                     'differ'):
    store.expand(example, row, 4, 'record 3')


def test_bad_cache_settings_are_refused(built, data_dir, tmp_path):
  config, _ = built
  too_large = _config(tmp_path / 'run', data_dir, **{'prior.cache.k': VOCAB + 1})
  with pytest.raises(train.ConfigError, match=r'prior.cache.k=49153 is larger than the '
                     r'vocabulary \(49152 tokens\)'):
    cache_prior.build(too_large, progress=False)
  with pytest.raises(train.ConfigError, match=r"prior.cache.dtype='float8'"):
    train.checks.check_config(_config(tmp_path / 'run', data_dir, **{
        'prior.source': 'cached', 'prior.cache.dtype': 'float8'}))


@pytest.mark.slow  # a whole training run; the cached step equals the online one in test_train_step
def test_training_with_the_cache_never_loads_the_prior(built, monkeypatch):
  config, _ = built
  cached = config.copy_and_resolve_references()
  cached.prior.source = 'cached'
  real_load = train.load_model
  loads = []

  def counting_load(model_config, **kwargs):
    loads.append(kwargs.get('with_lora', True))
    return real_load(model_config, **kwargs)

  monkeypatch.setattr(train.loading, 'load_model', counting_load)
  summary = train.run(cached)
  assert loads == [True]  # the student only
  assert np.isfinite(summary['final_metrics']['loss'])


def test_the_batches_carry_the_priors_top_k_for_their_own_tokens(built):
  """Through shuffling and packing, each batch position's cached rows are the prior's top k
  at that position of that batch (the prior run online on the batch, as the step would)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qtarget import cached_prior  # pylint: disable=g-import-not-at-top
  from qtarget.data import pipeline, splits  # pylint: disable=g-import-not-at-top
  config, _ = built
  builder = splits.dataset_builder(config)
  prior, tokenizer = train.load_model(config.model, seed=config.seed)
  dataset = pipeline.train_dataset(
      builder, tokenizer, seq_len=config.data.seq_len, batch_size=4, seed=5, num_epochs=None,
      pack=True, truncate=True, prior_cache_source=_open(config))
  iterator = iter(dataset)
  checked = 0
  for _ in range(3):
    batch = next(iterator)
    hidden = prior.hidden(jnp.asarray(batch['tokens']),
                          segment_ids_BxT=jnp.asarray(batch['segment_ids']),
                          positions_BxT=jnp.asarray(batch['positions']))
    online = jax.device_get(cached_prior.from_logits(prior.logits(hidden), 4))
    mask = batch['loss_mask']
    assert (batch['segment_ids'] > 1).any()  # several examples packed in a row
    np.testing.assert_array_equal(batch['prior_token_ids'][mask], online.token_ids[mask])
    np.testing.assert_allclose(batch['prior_log_probs'][mask], online.log_probs[mask],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch['prior_tail_log_mass'][mask], online.tail_log_mass[mask],
                               rtol=1e-5, atol=1e-5)
    # outside the response: a valid point mass, never the zeros packing pads with
    assert np.all(batch['prior_log_probs'][~mask][:, 0] == 0.0)
    assert np.all(np.isneginf(batch['prior_log_probs'][~mask][:, 1:]))
    checked += int(mask.sum())
  assert checked > 20
