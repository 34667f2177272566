"""``python -m qtarget.train --config configs/NAME.py [--config.key=value ...]``."""

import sys

from absl import app
from ml_collections import config_flags

from qtarget.data import prior_cache
from qtarget.train import checks
from qtarget.train import loop
from qtarget.train.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'a configs/*.py file',
                                          lock_config=True)


def _check_override_keys(argv) -> None:
  """Unknown ``--config.KEY`` overrides named in a few lines, with the nearest valid keys
  (ml_collections would raise a long traceback)."""
  from qtarget import config_files  # pylint: disable=g-import-not-at-top
  path = None
  for index, arg in enumerate(argv):
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1]
    elif arg == '--config' and index + 1 < len(argv):
      path = argv[index + 1]
  if not path:
    return
  file, _, argument = path.partition(':')
  try:
    module = config_files.load_module(file)
    config = module.get_config(argument) if argument else module.get_config()
    checks.resolve_method(config)  # a Method object in the config becomes its name (JSON)
  except Exception:  # pylint: disable=broad-except  # config_flags / the trainer report these
    return
  valid = list(checks.flatten(config))
  prefixes = {key.rsplit('.', i)[0] for key in valid for i in range(key.count('.') + 1)}
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    key = arg[len('--config.'):].split('=', 1)[0]
    if key not in prefixes:
      nearest = checks.nearest_keys(key, valid)
      sys.exit(f'[qtarget] unknown config key {key!r} in {arg!r}' +
               (f'; did you mean {", ".join(nearest)}?' if nearest else '.') +
               f' The keys are listed in {file}.')


def main(argv) -> None:
  del argv
  try:
    loop.run(_CONFIG.value)
  except (ConfigError, loop.TrainingDiverged, prior_cache.PriorCacheError) as error:
    sys.exit(f'[qtarget] {type(error).__name__}: {error}')


if __name__ == '__main__':
  _check_override_keys(sys.argv[1:])
  app.run(main)
