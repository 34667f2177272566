"""``python -m qtarget.train --config configs/NAME.py [--config.key=value ...]``."""

import ast
import sys

from absl import app
from ml_collections import config_flags

from qtarget.data import prior_cache
from qtarget.data import records
from qtarget.train import checks
from qtarget.train import loop
from qtarget.train.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'a configs/*.py file; override any field with --config.KEY=VALUE '
    '(configs/smollm2_demo.py lists them with comments)', lock_config=True)


_KEYS_DOC = ('configs/smollm2_demo.py lists every key with a comment; the README has a table '
             'of the ones most runs change.')


def _config_path(argv) -> str | None:
  path = None
  for index, arg in enumerate(argv):
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1]
    elif arg == '--config' and index + 1 < len(argv):
      path = argv[index + 1]
  return path


def _load_config(path):
  """The config a ``--config`` value names, or None where loading fails (config_flags then
  reports it)."""
  from qtarget import config_files  # pylint: disable=g-import-not-at-top
  file, _, argument = path.partition(':')
  try:
    module = config_files.load_module(file)
    config = module.get_config(argument) if argument else module.get_config()
    checks.resolve_method(config)  # a Method object in the config becomes its name (JSON)
  except Exception:  # pylint: disable=broad-except  # config_flags / the trainer report these
    return None
  return config


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a string: the hyperparameter check names it


def rewrite_hparams(argv, config) -> list[str]:
  """``argv`` with the ``--config.hparams.NAME=VALUE`` flags folded into one
  ``--config.hparams={...}``, so a method's own names can be set although the config is locked:
  on the config's hparams, or on none of them where ``--config.method`` names another method
  (the config's hparams belong to its own method)."""
  method_flags = [a.split('=', 1)[1] for a in argv if a.startswith('--config.method=')]
  whole = [a for a in argv if a.startswith('--config.hparams=')]
  named = [a for a in argv if a.startswith('--config.hparams.') and '=' in a]
  base = dict(config.hparams)
  switched = bool(method_flags) and method_flags[-1] != config.method
  if whole:  # the user's dict is the base; named flags on top of it are applied by absl
    return list(argv)
  if switched and base:
    print(f'[qtarget] --config.method={method_flags[-1]}: the config\'s hparams {base} (for '
          f'{config.method}) are dropped; set the new method\'s with --config.hparams.NAME=VALUE.')
    base = {}
  new = {a[len('--config.hparams.'):].split('=', 1)[0] for a in named}
  if not switched and new <= set(base):
    return list(argv)  # only existing names: config_flags sets them
  values = dict(base)
  for arg in named:
    name, value = arg[len('--config.hparams.'):].split('=', 1)
    values[name] = _literal(value)
  rest = [a for a in argv if a not in named]
  return rest + [f'--config.hparams={values!r}']


def _check_override_keys(argv, config, path) -> None:
  """Unknown ``--config.KEY`` overrides named in a few lines, with the nearest valid keys
  (ml_collections would raise a long traceback)."""
  valid = list(checks.flatten(config))
  prefixes = {key.rsplit('.', i)[0] for key in valid for i in range(key.count('.') + 1)}
  for arg in argv:
    if not arg.startswith('--config.') or arg.startswith(('--config.hparams=',
                                                          '--config.hparams.')):
      continue
    key = arg[len('--config.'):].split('=', 1)[0]
    if key not in prefixes:
      nearest = checks.nearest_keys(key, valid)
      sys.exit(f'[qtarget] unknown config key {key!r} in {arg!r}' +
               (f'; did you mean {", ".join(nearest)}?' if nearest else '.') +
               f' ({path} sets {len(valid)} keys; {_KEYS_DOC})')


def prepare_argv(argv) -> list[str]:
  """The command line checked (a config given, known keys) and hparams flags folded."""
  path = _config_path(argv)
  if not path and not any(a in ('--help', '--helpfull', '-h') for a in argv):
    sys.exit('[qtarget] no config: python -m qtarget.train --config configs/NAME.py '
             '[--config.KEY=VALUE ...] (configs/smollm2_demo.py is the main job; '
             f'configs/tiny.py a seconds-long smoke test). {_KEYS_DOC}')
  config = _load_config(path) if path else None
  if config is None:
    return list(argv)
  argv = rewrite_hparams(argv, config)
  _check_override_keys(argv, config, path)
  return argv


def main(argv) -> None:
  del argv
  try:
    loop.run(_CONFIG.value)
  except (ConfigError, loop.TrainingDiverged, prior_cache.PriorCacheError,
          records.RecordError) as error:
    sys.exit(f'[qtarget] {type(error).__name__}: {error}')
  except loop.TrainingInterrupted as error:
    print(f'[qtarget] {error}', file=sys.stderr)
    sys.exit(128 + error.signum)  # the shell's convention for a signal's exit status


if __name__ == '__main__':
  sys.argv[1:] = prepare_argv(sys.argv[1:])
  app.run(main)
