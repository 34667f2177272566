"""The input pipeline: tokenize with the chat template, mask the prompt, pack, batch (grain).

Before training, :func:`scan` tokenizes every record once to stop on bad data (an empty
response, token ids the model cannot embed, a sequence longer than the maximum with truncation
off) with an error naming the record, and to report truncation. The grain pipeline then shuffles,
repeats and shards deterministically for a seed; its iterator state is saved with checkpoints.

A batch is a dict of ``[B, T]`` arrays: ``tokens`` (inputs), ``targets`` (the next tokens),
``loss_mask`` (True where the target is a response token), ``segment_ids`` (1, 2, ... per packed
example, 0 for padding) and ``positions`` (restarting at each segment).
"""

import dataclasses
import hashlib
from typing import Sequence

import grain
import numpy as np

from qtarget.data import builders
from qtarget.data import prior_cache_files
from qtarget.data import records as records_lib


class DataError(ValueError):
  """Bad training data; the message names the record."""


@dataclasses.dataclass
class ScanReport:
  """What :func:`scan` found: counts for the log."""
  examples: int
  tokens: int
  response_tokens: int
  truncated: int
  longest: int
  # sha256 of every example's token ids and response mask, in order: what a cache of
  # per-example prior rows must have been made from (chat template and system prompts included)
  digest: str = ''

  def __str__(self):
    return (f'{self.examples} examples, {self.tokens} tokens ({self.response_tokens} in '
            f'responses), longest {self.longest}, truncated {self.truncated}')


def example_arrays(record: dict, tokenizer, max_length: int, truncate: bool) -> dict:
  """Next-token arrays of one record: inputs, targets and the response mask, at most
  ``max_length`` long (cut at the end when ``truncate``)."""
  encoded = tokenizer.encode_example(record['prompt'], record['response'],
                                     system=records_lib.system_prompt(record))
  ids, mask = encoded.token_ids, encoded.loss_mask
  if len(ids) - 1 > max_length:
    if not truncate:
      raise DataError(f'sequence of {len(ids) - 1} tokens exceeds the maximum {max_length} and '
                      'truncation is off')
    ids, mask = ids[:max_length + 1], mask[:max_length + 1]
  return {'tokens': ids[:-1].astype(np.int32), 'targets': ids[1:].astype(np.int32),
          'loss_mask': mask[1:]}


def scan(records: Sequence[dict], tokenizer, *, max_length: int, truncate: bool,
         vocab_size: int, name: str = 'data') -> ScanReport:
  """Tokenizes every record once; raises :class:`DataError` naming the first bad one."""
  if len(records) == 0:
    raise DataError(f'{name}: the data set is empty.')
  tokens = response = truncated = longest = 0
  hasher = hashlib.sha256()
  for index, record in enumerate(records):
    where = f'{name} record {index} ({record.get("metadata", "")[:80]}...)'
    if not record.get('response'):
      raise DataError(f'{where}: record without a response.')
    try:
      full = tokenizer.encode_example(record['prompt'], record['response'])
      arrays = example_arrays(record, tokenizer, max_length, truncate)
    except (ValueError, DataError) as error:
      raise DataError(f'{where}: {error}') from error
    top = int(full.token_ids.max())
    if top >= vocab_size or int(full.token_ids.min()) < 0:
      raise DataError(f'{where}: token id {top} is out of range for the model vocabulary '
                      f'{vocab_size}.')
    if not arrays['loss_mask'].any():
      raise DataError(f'{where}: no response token is left after truncation to {max_length}.')
    truncated += len(full.token_ids) - 1 > max_length
    longest = max(longest, len(full.token_ids) - 1)
    tokens += len(arrays['tokens'])
    response += int(arrays['loss_mask'].sum())
    hasher.update(np.int64(len(arrays['tokens'])).tobytes() + arrays['tokens'].tobytes()
                  + arrays['targets'].tobytes() + np.asarray(arrays['loss_mask'], bool).tobytes())
  return ScanReport(len(records), tokens, response, truncated, longest, hasher.hexdigest()[:16])


def _pad(example: dict, length: int, k: int | None = None) -> dict:
  n = len(example['tokens'])
  pad = lambda x: np.pad(x, [(0, length - n)] + [(0, 0)] * (np.ndim(x) - 1))
  out = {'tokens': pad(example['tokens']), 'targets': pad(example['targets']),
         'loss_mask': pad(example['loss_mask']),
         'segment_ids': pad(np.ones(n, np.int32)), 'positions': pad(np.arange(n, dtype=np.int32))}
  if k is not None:
    cache_rows = {key: pad(example[key]) for key in prior_cache_files.KEYS}
    out = prior_cache_files.fill_unmasked({**out, **cache_rows}, k)
  return out


def _from_packed(packed: dict, k: int | None = None) -> dict:
  out = {'tokens': packed['tokens'], 'targets': packed['targets'],
         'loss_mask': packed['loss_mask'].astype(bool),
         'segment_ids': packed['tokens_segment_ids'].astype(np.int32),
         'positions': packed['tokens_positions'].astype(np.int32)}
  if k is not None:
    cache_rows = {key: packed[key] for key in prior_cache_files.KEYS}
    out = prior_cache_files.fill_unmasked({**out, **cache_rows}, k)
  return out


class _WithCache:
  """A split's records, each with its prior-cache record (the same index)."""

  def __init__(self, source, cache):
    self._source, self._cache = source, cache

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return builders.decode(self._source[index]), self._cache[index], index


def train_dataset(builder, tokenizer, *, split: str = 'train', seq_len: int,
                  batch_size: int, seed: int, num_epochs: int | None, pack: bool,
                  truncate: bool, process_index: int = 0, process_count: int = 1,
                  packing_bins: int = 16, prefetch_batches: int = 0,
                  prior_cache_source: 'prior_cache_files.CacheSource | None' = None
                  ) -> grain.IterDataset:
  """This host's rows of each global batch (``batch_size`` rows across all hosts).

  Records are read and tokenized by grain's reader threads; with ``prefetch_batches`` > 0,
  packing and batching run in a background thread too, that many batches ahead, so the host
  prepares the next batch while the device runs the step. The stream, and the iterator state
  that checkpoints save, are the same either way.

  Every host builds the same global stream (shuffle, packing and batching depend on the seed
  only) and keeps its contiguous block of rows, so the global batch, and so training, is the same
  whatever the number of hosts.

  With ``prior_cache_source`` (:func:`qtarget.data.prior_cache_files.open_cache`), every
  example carries its cached prior rows (:data:`qtarget.data.prior_cache_files.KEYS`, ``[T, k]``
  and ``[T]``), packed and batched with it.
  """
  if batch_size % process_count:
    raise DataError(f'batch size {batch_size} is not divisible by {process_count} processes.')
  rows = batch_size // process_count
  source = builder.as_data_source(split)
  k = None
  if prior_cache_source is None:
    dataset = grain.MapDataset.source(source).shuffle(seed=seed).map(builders.decode)
    to_arrays = lambda r: example_arrays(r, tokenizer, seq_len, truncate)
  else:
    k = prior_cache_source.metadata.k
    if len(prior_cache_source) != len(source):
      raise prior_cache_files.PriorCacheError(
          f'the prior cache holds {len(prior_cache_source)} records, the {split} split '
          f'{len(source)}: it was made for other data.')
    dataset = grain.MapDataset.source(_WithCache(source, prior_cache_source)).shuffle(seed=seed)
    to_arrays = lambda rci: prior_cache_files.expand(
        example_arrays(rci[0], tokenizer, seq_len, truncate), rci[1], k,
        f'{split} record {rci[2]}')
  dataset = dataset.repeat(num_epochs) if num_epochs != 1 else dataset
  dataset = dataset.map(to_arrays)
  iterable = dataset.to_iter_dataset()
  if pack:
    lengths = {'tokens': seq_len, 'targets': seq_len, 'loss_mask': seq_len}
    if k is not None:
      lengths.update({key: seq_len for key in prior_cache_files.KEYS})
    iterable = grain.experimental.FirstFitPackIterDataset(
        iterable, length_struct=lengths, num_packing_bins=packing_bins, seed=seed)
    iterable = iterable.map(lambda p: _from_packed(p, k))
  else:
    iterable = iterable.map(lambda e: _pad(e, seq_len, k))
  batches = iterable.batch(batch_size, drop_remainder=True)
  if process_count > 1:
    batches = batches.map(lambda b: {k: v[process_index * rows:(process_index + 1) * rows]
                                     for k, v in b.items()})
  if prefetch_batches:
    batches = grain.experimental.ThreadPrefetchIterDataset(
        batches, prefetch_buffer_size=prefetch_batches)
  return batches
