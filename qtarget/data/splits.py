"""The splits a run's config reads: its prepared dataset, the held-out split its evaluations
read, and the validation problems that choose hyperparameters.

The trainer, ``python -m qtarget.cache_prior``, the trust report, the experiments and the
benchmarks read a config's data through this module, so they see the same records in the same
order.
"""

from qtarget.errors import ConfigError

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


def prepared(config):
  """``(builder, eval_split)``: the tfds builder of ``config.data`` (prepared) and the name of
  the held-out split its evaluations read (``eval.split``), or None where the data has none."""
  from qtarget.data import builders  # pylint: disable=g-import-not-at-top  # tensorflow_datasets
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
  return prepared(config)[0]


def held_out_records(config) -> list[dict]:
  """The held-out problems a run with ``config`` evaluates on (the training split is not read)."""
  from qtarget.data import builders  # pylint: disable=g-import-not-at-top
  builder, eval_split = prepared(config)
  return builders.load_split(builder, eval_split) if eval_split else []


def validation_records(config, test_records: list[dict]) -> list[dict]:
  """The validation split's problems when ``eval.validation_problems`` asks for them
  (``test_records``: the held-out split the run is scored on, which they must not share)."""
  if not config.eval.get('validation_problems', 0):
    return []
  if config.data.kind != 'reasoning_gym':
    raise ConfigError(f'eval.validation_problems={config.eval.validation_problems}: '
                      f"data.kind={config.data.kind!r} has no validation split.")
  from qtarget.data import builders  # pylint: disable=g-import-not-at-top
  records = builders.load_split(dataset_builder(config), 'validation')
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
