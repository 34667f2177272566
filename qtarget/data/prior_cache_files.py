"""The prior cache's storage: the files on disk, their format, fingerprint and reading.

The command that writes them is :mod:`qtarget.cache_prior`; the math of the rows they hold
(:class:`~qtarget.cached_prior.CachedPrior`, the bound on the target's error) is
:mod:`qtarget.cached_prior`.

A cache is a directory of array_record shards and ``metadata.json``. Record ``i`` belongs to
record ``i`` of the training split (the tfds source's order, before any shuffle) and holds, for
each of that example's response positions (``loss_mask`` True, after truncation): the target
token, the prior's k most likely token ids, their log-probabilities and the log of the tail
mass. The cache is per example, not per packed row: packed segments attend only within
themselves and their positions restart, so a prior's logits at an example's tokens do not
depend on what it is packed with; the trainer packs cache rows with their examples.

Shards are written to a temporary name and renamed when whole, and the metadata says
``complete`` only after the last one: an interrupted build resumes from the shards it has, and
training refuses a cache that is incomplete, truncated or made from something else
(:func:`fingerprint` names what differs).
"""

import dataclasses
import hashlib
import json
import os
import pathlib

import numpy as np

from qtarget.errors import ConfigError

FORMAT_VERSION = 1
METADATA = 'metadata.json'
KEYS = ('prior_token_ids', 'prior_log_probs', 'prior_tail_log_mass')
VALUE_DTYPES = ('float32', 'bfloat16', 'float16')


class PriorCacheError(ValueError):
  """A prior cache that is missing, incomplete, damaged or made from something else."""


def id_dtype(vocab_size: int) -> str:
  return 'uint16' if vocab_size <= 2 ** 16 else 'int32'


def _numpy_dtype(name: str):
  if name == 'bfloat16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top  # a jax dependency
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


@dataclasses.dataclass
class Metadata:
  """What ``metadata.json`` records."""
  k: int
  vocab_size: int
  value_dtype: str
  num_records: int
  records_per_shard: int
  fingerprint: dict
  complete: bool = False
  response_tokens: int = 0
  shard_bytes: int = 0
  build_seconds: float = 0.0
  format_version: int = FORMAT_VERSION

  @property
  def num_shards(self) -> int:
    return -(-self.num_records // self.records_per_shard)

  @property
  def id_dtype(self) -> str:
    return id_dtype(self.vocab_size)

  def bytes_per_token(self) -> float:
    return row_bytes(1, self.k, self.vocab_size, self.value_dtype) - 8

  def shard_path(self, directory: pathlib.Path, shard: int) -> pathlib.Path:
    return directory / f'prior-{shard:05d}-of-{self.num_shards:05d}.array_record'

  def shard_records(self, shard: int) -> range:
    start = shard * self.records_per_shard
    return range(start, min(start + self.records_per_shard, self.num_records))


def row_bytes(positions: int, k: int, vocab_size: int, value_dtype: str) -> int:
  """Bytes of one record: header, targets, ids, log-probabilities, tail masses."""
  ids = np.dtype(id_dtype(vocab_size)).itemsize
  value = _numpy_dtype(value_dtype).itemsize
  return 8 + positions * (4 + k * (ids + value) + value)


def encode_row(targets, token_ids, log_probs, tail_log_mass, metadata: Metadata) -> bytes:
  """One example's record: ``targets`` ``[n]`` and the prior's ``[n, k]``, ``[n, k]``, ``[n]``."""
  n, k = np.shape(token_ids)
  value = _numpy_dtype(metadata.value_dtype)
  return b''.join((np.asarray([n, k], np.int32).tobytes(),
                   np.asarray(targets, np.int32).tobytes(),
                   np.asarray(token_ids).astype(metadata.id_dtype).tobytes(),
                   np.asarray(log_probs, np.float32).astype(value).tobytes(),
                   np.asarray(tail_log_mass, np.float32).astype(value).tobytes()))


def decode_row(data: bytes, metadata: Metadata, where: str) -> dict:
  """The arrays of one record (float32 values, int32 ids); a damaged record raises."""
  if len(data) < 8:
    raise PriorCacheError(f'{where}: a record of {len(data)} bytes (damaged cache).')
  n, k = (int(x) for x in np.frombuffer(data[:8], np.int32))
  if k != metadata.k or n < 0 or len(data) != row_bytes(n, k, metadata.vocab_size,
                                                        metadata.value_dtype):
    raise PriorCacheError(f'{where}: a record of {len(data)} bytes does not hold {n} positions '
                          f'of k={metadata.k} (damaged cache).')
  value = _numpy_dtype(metadata.value_dtype)
  ids = np.dtype(metadata.id_dtype)
  offset = 8
  def take(count, dtype):
    nonlocal offset
    out = np.frombuffer(data, dtype, count, offset)
    offset += count * dtype.itemsize
    return out
  targets = take(n, np.dtype(np.int32))
  token_ids = take(n * k, ids).reshape(n, k).astype(np.int32)
  log_probs = take(n * k, value).reshape(n, k).astype(np.float32)
  tail = take(n, value).astype(np.float32)
  return {'targets': targets, 'token_ids': token_ids, 'log_probs': log_probs, 'tail': tail}


# --- configuration ---------------------------------------------------------------------------

def cache_directory(config) -> pathlib.Path:
  return pathlib.Path(config.prior.cache.path or pathlib.Path(config.workdir) / 'prior_cache')


def prior_source(config) -> str:
  """The prior the cache is made from."""
  return config.prior.cache.source if config.prior.source == 'cached' else config.prior.source


def build_command(config) -> str:
  del config
  return 'python -m qtarget.cache_prior --config <the same config and --config.* flags>'


def check_cache_config(config, vocab_size: int | None = None) -> None:
  """Raises ConfigError for a ``prior.cache`` field that cannot work."""
  cache = config.prior.cache
  k = cache.k
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f'prior.cache.k={k!r}: must be a positive int.')
  if vocab_size is not None and k > vocab_size:
    raise ConfigError(f'prior.cache.k={k} is larger than the vocabulary ({vocab_size} tokens).')
  if cache.dtype not in VALUE_DTYPES:
    raise ConfigError(f'prior.cache.dtype={cache.dtype!r}: must be one of {VALUE_DTYPES}.')
  if not isinstance(cache.records_per_shard, int) or cache.records_per_shard < 1:
    raise ConfigError(f'prior.cache.records_per_shard={cache.records_per_shard!r}: must be a '
                      'positive int.')
  if cache.source not in ('initial', 'gguf', 'hf', 'random'):
    raise ConfigError(f"prior.cache.source={cache.source!r}: must be 'initial', 'gguf', 'hf' or "
                      "'random' (the prior the cache is made from).")


# --- fingerprint -----------------------------------------------------------------------------

def _digest(value) -> str:
  text = value if isinstance(value, (bytes, bytearray)) else json.dumps(
      value, sort_keys=True, default=str).encode()
  return hashlib.sha256(text).hexdigest()[:16]


def file_digest(path, head_and_tail: int = 64 << 20) -> str:
  """Size and the first and last 64 MiB of a weight file (whole files under 128 MiB)."""
  path = pathlib.Path(path)
  size = path.stat().st_size
  hasher = hashlib.sha256(str(size).encode())
  with path.open('rb') as f:
    if size <= 2 * head_and_tail:
      hasher.update(f.read())
    else:
      hasher.update(f.read(head_and_tail))
      f.seek(size - head_and_tail)
      hasher.update(f.read(head_and_tail))
  return hasher.hexdigest()[:16]


def prior_identity(config) -> dict:
  """What determines the prior's distribution: its weights (file digests, or the random
  architecture and seed) and the dtype it computes in."""
  from qtarget import checkpoints  # pylint: disable=g-import-not-at-top
  source = prior_source(config)
  weights = config.model if source == 'initial' else config.prior
  kind = weights.source if source == 'initial' else source
  seed = config.seed
  identity = {'source': source, 'kind': kind, 'compute_dtype': weights.compute_dtype,
              'param_dtype': weights.param_dtype}
  if kind == 'gguf':
    path = weights.path or checkpoints.smollm2_gguf_path()
    identity['weights'] = file_digest(path)
  elif kind == 'hf':
    directory = pathlib.Path(weights.path)
    files = sorted(directory.glob('*.safetensors'))
    if not files:
      raise PriorCacheError(f'no *.safetensors under {weights.path!r} (the prior).')
    files += [directory / 'config.json'] if (directory / 'config.json').exists() else []
    identity['weights'] = _digest([(f.name, file_digest(f)) for f in files])
  elif kind == 'random':
    identity['weights'] = _digest({'architecture': dict(weights.architecture),
                                   # the trainer's seeds: the student's for 'initial', whose
                                   # LoRA adapters are drawn between its base weights
                                   'seed': seed if source == 'initial' else seed + 1,
                                   'lora_rank': weights.lora_rank if source == 'initial' else 0})
  else:
    raise PriorCacheError(f'cannot cache a prior of source {kind!r}.')
  return identity


def fingerprint(config, tokenizer, scan_report) -> dict:
  """``{'prior', 'tokenizer', 'data', 'sequences'}``: each a short digest with its inputs.

  ``scan_report``: :func:`qtarget.data.pipeline.scan` of the training split with the student's
  tokenizer, whose digest covers every example's token ids and response mask (so the chat
  template, system prompts and truncation are in it, not only the records' text).
  """
  vocab = sorted(tokenizer.backend.get_vocab().items())
  data = config.data
  return {
      'prior': prior_identity(config),
      'tokenizer': {'tokens': len(vocab), 'digest': _digest([vocab, tokenizer.chat_template])},
      'data': {'records': scan_report.examples, 'digest': scan_report.digest},
      'sequences': {'seq_len': int(data.seq_len), 'truncate': bool(data.truncate)},
  }


def differences(expected: dict, found: dict) -> list[str]:
  """Human-readable components that differ between two fingerprints."""
  out = []
  for name in sorted(set(expected) | set(found)):
    if expected.get(name) != found.get(name):
      out.append(f'{name} (the cache: {found.get(name)}; this config: {expected.get(name)})')
  return out


# --- reading and writing ---------------------------------------------------------------------

def read_metadata(directory) -> Metadata | None:
  path = pathlib.Path(directory) / METADATA
  if not path.exists():
    return None
  try:
    return Metadata(**json.loads(path.read_text()))
  except (ValueError, TypeError) as error:
    raise PriorCacheError(f'{path}: unreadable metadata ({error}).') from error


def write_metadata(directory, metadata: Metadata) -> None:
  directory = pathlib.Path(directory)
  temporary = directory / (METADATA + '.tmp')
  temporary.write_text(json.dumps(dataclasses.asdict(metadata), indent=2))
  os.replace(temporary, directory / METADATA)


def write_shard(directory, metadata: Metadata, shard: int, rows: list[bytes]) -> None:
  """Writes one whole shard under a temporary name, then renames it (atomic on POSIX)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path = metadata.shard_path(pathlib.Path(directory), shard)
  temporary = path.with_suffix('.tmp')
  writer = array_record_module.ArrayRecordWriter(str(temporary), 'group_size:1')
  for row in rows:
    writer.write(row)
  writer.close()
  os.replace(temporary, path)


def read_shard(path) -> list[bytes]:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(str(path))
  try:
    return reader.read_all()
  finally:
    reader.close()


def shard_count(path) -> int:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(str(path))
  try:
    return reader.num_records()
  finally:
    reader.close()


def open_cache(directory, expected_fingerprint: dict, *, vocab_size: int, k: int,
               value_dtype: str, build_command: str) -> 'CacheSource':
  """The cache at ``directory`` for training, after every check: it exists, is complete, was
  made from what ``expected_fingerprint`` describes, and every shard holds its records."""
  directory = pathlib.Path(directory)
  metadata = read_metadata(directory)
  if metadata is None:
    raise PriorCacheError(f'no prior cache at {directory} (no {METADATA}): build it with '
                          f'`{build_command}`.')
  if metadata.format_version != FORMAT_VERSION:
    raise PriorCacheError(f'{directory}: cache format {metadata.format_version}, this code reads '
                          f'{FORMAT_VERSION}; rebuild it.')
  differing = differences(expected_fingerprint, metadata.fingerprint)
  if differing:
    raise PriorCacheError(f'the prior cache at {directory} was made from something else: '
                          + '; '.join(differing) + '. Rebuild it or point prior.cache.path '
                          'elsewhere.')
  if (metadata.k, metadata.value_dtype) != (k, value_dtype):
    raise PriorCacheError(f'the prior cache at {directory} keeps k={metadata.k} in '
                          f'{metadata.value_dtype}; this config asks for k={k} in {value_dtype} '
                          '(prior.cache.k, prior.cache.dtype): rebuild it or change the config.')
  if metadata.vocab_size != vocab_size:
    raise PriorCacheError(f'{directory}: cache for a vocabulary of {metadata.vocab_size}, the '
                          f'model has {vocab_size}.')
  if not metadata.complete:
    present = sum(metadata.shard_path(directory, s).exists() for s in range(metadata.num_shards))
    raise PriorCacheError(f'the prior cache at {directory} is incomplete ({present} of '
                          f'{metadata.num_shards} shards): run `{build_command}` again to '
                          'finish it.')
  paths = []
  for shard in range(metadata.num_shards):
    path = metadata.shard_path(directory, shard)
    want = len(metadata.shard_records(shard))
    if not path.exists():
      raise PriorCacheError(f'{path} is missing from the prior cache (expected {want} records).')
    try:
      have = shard_count(path)
    except Exception as error:  # pylint: disable=broad-except  # array_record raises plain errors
      raise PriorCacheError(f'{path}: unreadable ({type(error).__name__}: {error}); the file is '
                            'damaged or truncated.') from error
    if have != want:
      raise PriorCacheError(f'{path} holds {have} records, expected {want} (truncated).')
    paths.append(str(path))
  return CacheSource(paths, metadata)


def open_for_training(config, tokenizer, scan_report, vocab_size: int) -> 'CacheSource':
  """:func:`open_cache` with what a run of ``config`` expects (its scan of the training split
  with the student's tokenizer, its k and dtype)."""
  return open_cache(cache_directory(config), fingerprint(config, tokenizer, scan_report),
                    vocab_size=vocab_size, k=config.prior.cache.k,
                    value_dtype=config.prior.cache.dtype, build_command=build_command(config))


class CacheSource:
  """Random access to the cache's records (picklable, for grain)."""

  def __init__(self, paths: list[str], metadata: Metadata):
    import grain  # pylint: disable=g-import-not-at-top
    self.metadata = metadata
    self._source = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self):
    return self.metadata.num_records

  def __getitem__(self, index: int) -> dict:
    return decode_row(self._source[index], self.metadata, f'prior cache record {index}')


def padding_rows(length: int, k: int) -> dict:
  """Cache arrays for positions without a response token: a valid point mass on token 0."""
  log_probs = np.full((length, k), -np.inf, np.float32)
  log_probs[:, 0] = 0.0
  return {'prior_token_ids': np.broadcast_to(np.arange(k, dtype=np.int32), (length, k)).copy(),
          'prior_log_probs': log_probs,
          'prior_tail_log_mass': np.full((length,), -np.inf, np.float32)}


def expand(example: dict, row: dict, k: int, where: str) -> dict:
  """``example`` (next-token arrays) with its cache row spread over its positions, after
  checking the row was made for these very response tokens."""
  mask = np.asarray(example['loss_mask'], bool)
  targets = np.asarray(example['targets'])[mask]
  if len(targets) != len(row['targets']) or np.any(targets != row['targets']):
    raise PriorCacheError(f'{where}: the cached response tokens differ from this example\'s '
                          f'({len(row["targets"])} cached, {len(targets)} here): the cache was '
                          'made for other data or another tokenizer.')
  arrays = padding_rows(len(mask), k)
  arrays['prior_token_ids'][mask] = row['token_ids']
  arrays['prior_log_probs'][mask] = row['log_probs']
  arrays['prior_tail_log_mass'][mask] = row['tail']
  return {**example, **arrays}


def fill_unmasked(batch: dict, k: int) -> dict:
  """Rows of a packed or padded batch outside the response (packing pads with zeros) get the
  padding distribution, so no position carries an invalid cache row into the step."""
  mask = np.asarray(batch['loss_mask'], bool)
  pad = padding_rows(1, k)
  out = dict(batch)
  for key in KEYS:
    out[key] = np.where(mask.reshape(mask.shape + (1,) * (batch[key].ndim - mask.ndim)),
                        batch[key], pad[key][0]).astype(pad[key].dtype)
  return out
