"""tensorflow-datasets builders that write array_record files (no TensorFlow) for grain.

Two builders, each configured at run time: :class:`ReasoningGym` (a task, sizes, difficulty
and seed; train, validation and test drawn from seeds whose problem sequences do not overlap,
test questions removed from validation and both removed from train) and :class:`LocalFiles`
(jsonl/parquet files with prompt/response fields or chat messages). Both store text records (see :mod:`qtarget.data.records`); tokenization happens in
the input pipeline, so one prepared dataset serves any tokenizer.
"""

import hashlib
import json
import os
import pathlib
import random

import numpy as np
import tensorflow_datasets as tfds

from qtarget.data import rationales
from qtarget.data import records

_FEATURES = {name: tfds.features.Text() for name in records.RECORD_FIELDS}
# Validation's first seed sits this far from train's and test's (see ReasoningGymConfig), and
# draws up to this many times eval_size problems to find eval_size that are not test questions.
_VALIDATION_OFFSET = 1_000_000_000
_VALIDATION_DRAWS = 4
DEFAULT_DATA_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'qtarget', 'tfds')


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo of a dataset that is never in TFDS's GCS bucket: a builder of a dataset not
  yet prepared skips the bucket lookup, which makes an empty temporary directory every time
  (hundreds a day in /tmp from training runs and tests) and finds nothing."""

  def initialize_from_bucket(self) -> None:
    pass


def _digest(payload) -> str:
  return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


def _rationale_options(rationale: dict | None) -> dict:
  """Training demonstrations: style '' (the task's own rationale or answer) or 'steps'
  (:mod:`qtarget.data.rationales`, with ``variants`` per problem, ``corrupt_fraction`` and the
  ``seed`` of the corruption and variant draws; the problems themselves follow the dataset seed)."""
  options = {'style': '', 'variants': 1, 'corrupt_fraction': 0.0, 'seed': 0}
  unknown = set(rationale or {}) - set(options)
  if unknown:
    raise ValueError(f'unknown rationale options {sorted(unknown)}; known: {sorted(options)}.')
  options.update(rationale or {})
  if options['style'] not in ('', 'steps'):
    raise ValueError(f"rationale style must be '' or 'steps', got {options['style']!r}.")
  if options['style'] == '' and (options['variants'] != 1 or options['corrupt_fraction']):
    raise ValueError("variants and corrupt_fraction need rationale style 'steps'.")
  options['variants'] = int(options['variants'])
  options['corrupt_fraction'] = float(options['corrupt_fraction'])
  options['seed'] = int(options['seed'])
  return options


class ReasoningGymConfig(tfds.core.BuilderConfig):
  """A reasoning-gym task: ``difficulty`` holds the generator's own keyword arguments."""

  def __init__(self, *, task: str, train_size: int, eval_size: int, seed: int,
               difficulty: dict | None = None, rationale: dict | None = None):
    self.task, self.seed = task, seed
    self.train_size, self.eval_size = train_size, eval_size
    self.difficulty = dict(difficulty or {})
    self.rationale = _rationale_options(rationale)
    payload = [task, train_size, eval_size, seed, self.difficulty]
    if self.rationale['style']:  # names of datasets prepared before rationales stay the same
      payload.append(self.rationale)
    super().__init__(name=f'{task}-{_digest(payload)}', version=ReasoningGym.VERSION,
                     description=f'{task}: {train_size} train, {eval_size} validation and test '
                     f'problems, seed {seed}, {self.difficulty}, demonstrations {self.rationale}')

  def split_seed(self, split: str) -> int:
    """The reasoning-gym seed of a split's first problem.

    reasoning-gym draws problem i of seed s with seed s + i, so neighbouring seeds give shifted
    copies of one sequence: train (s) and test (s + 2) share it (train drops test's problems),
    and validation starts a billion seeds away so that it is not test shifted by one problem
    (builder 1.0.0 used s + 1).
    """
    base = self.seed * 1000
    return {'train': base, 'validation': _VALIDATION_OFFSET + base, 'test': base + 2}[split]


class ReasoningGym(tfds.core.GeneratorBasedBuilder):
  """Problems of one reasoning-gym task with their rationale (where the task has one)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.1.0': 'validation drawn far from the train/test sequence, without copies of test '
               'questions; train drops validation and test questions.',
      '1.0.0': 'validation seeded one below test: test shifted by one problem.',
  }

  def _info(self):
    return _LocalDatasetInfo(builder=self, features=tfds.features.FeaturesDict(_FEATURES))

  def _records(self, split, size=None):
    config = self.builder_config
    if size is None:
      size = config.train_size if split == 'train' else config.eval_size
    return records.reasoning_gym_records(config.task, size, config.split_seed(split),
                                         config.difficulty)

  def _validation(self, test_records):
    """The first eval_size problems of validation's own sequence that are not test questions
    (small tasks repeat questions), so choosing on validation never reads a test problem."""
    config = self.builder_config
    test = {r['prompt'] for r in test_records}
    candidates = self._records('validation', _VALIDATION_DRAWS * config.eval_size)
    chosen = [r for r in candidates if r['prompt'] not in test][:config.eval_size]
    if len(chosen) < config.eval_size:
      raise ValueError(
          f'{config.task}: only {len(chosen)} of {_VALIDATION_DRAWS * config.eval_size} drawn '
          f'validation problems are not test questions; eval_size={config.eval_size} needs '
          'a task with more distinct problems.')
    return chosen

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in ('train', 'validation', 'test')}

  def _generate_examples(self, split):
    test = list(self._records('test'))
    if split == 'test':
      recs = test
    elif split == 'validation':
      recs = self._validation(test)
    else:
      # Train starts test's sequence and small tasks repeat questions: drop held-out ones.
      held_out = {r['prompt'] for r in test + self._validation(test)}
      recs = (r for r in self._records('train') if r['prompt'] not in held_out)
      if self.builder_config.rationale['style'] == 'steps':
        recs = self._with_demonstrations(recs)
    count = 0
    for count, record in enumerate(recs, start=1):
      yield count - 1, record
    if count == 0:
      raise ValueError(
          f'{self.builder_config.task}: no {split} problems left (every train problem is a copy '
          'of a held-out one): the task has too few distinct problems for these sizes.')

  def _with_demonstrations(self, recs):
    options = self.builder_config.rationale
    rng = random.Random(f"{self.builder_config.split_seed('train')}/{options['seed']}")
    for record in recs:
      for demo in rationales.demonstrations(record, variants=options['variants'],
                                            corrupt_fraction=options['corrupt_fraction'],
                                            rng=rng):
        metadata = json.loads(record['metadata'])
        metadata.update(corrupted=demo.corrupted, variant=demo.variant)
        yield {**record, 'response': demo.response, 'metadata': json.dumps(metadata)}


class LocalFilesConfig(tfds.core.BuilderConfig):
  """jsonl/parquet files; the name changes with the files' paths, sizes and times."""

  def __init__(self, *, train_path: str, eval_path: str | None = None, task: str = 'file',
               prompt_field: str | None = None, response_field: str | None = None):
    self.paths = {'train': train_path}
    if eval_path:
      self.paths['test'] = eval_path
    self.task, self.prompt_field, self.response_field = task, prompt_field, response_field
    stamp = []
    for split, path in self.paths.items():
      path = pathlib.Path(path)
      if not path.exists():
        raise FileNotFoundError(f'{split} data file {path} does not exist.')
      stat = path.stat()
      stamp.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    key = _digest([stamp, task, prompt_field, response_field])
    super().__init__(name=f'{pathlib.Path(train_path).stem}-{key}', version='1.0.0',
                     description=f'local files {self.paths}')


class LocalFiles(tfds.core.GeneratorBasedBuilder):
  """A user's own demonstrations: prompt/response fields or chat messages."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return _LocalDatasetInfo(builder=self, features=tfds.features.FeaturesDict(_FEATURES))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self.builder_config.paths}

  def _generate_examples(self, split):
    config = self.builder_config
    for index, record in enumerate(records.file_records(
        config.paths[split], config.task, config.prompt_field, config.response_field)):
      yield index, record


def prepare(builder_config: tfds.core.BuilderConfig, data_dir: str | None = None):
  """Builds (once) and returns the builder; later calls reuse the array_record files."""
  builder_class = ReasoningGym if isinstance(builder_config, ReasoningGymConfig) else LocalFiles
  builder = builder_class(config=builder_config, data_dir=data_dir or DEFAULT_DATA_DIR,
                          file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      verify_ssl=False, try_download_gcs=False))
  return builder


def decode(record: dict) -> dict:
  """A record read from array_record (bytes) as strings."""
  return {key: value.decode() if isinstance(value, (bytes, np.bytes_)) else str(value)
          for key, value in record.items()}


def load_split(builder, split: str) -> list[dict]:
  """All records of a split as string dicts (for evaluation sets)."""
  source = builder.as_data_source(split)
  return [decode(source[i]) for i in range(len(source))]
