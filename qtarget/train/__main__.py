"""``python -m qtarget.train --config configs/NAME.py [--config.key=value ...]``."""

import ast
import importlib.metadata
import importlib.util
import os
import re
import sys

import jax
from absl import app
from ml_collections import config_flags

from qtarget.data import prior_cache_files
from qtarget.data import records
from qtarget.train import checks
from qtarget.train import loop
from qtarget.train.errors import ConfigError, DiskFull, WorkdirLocked

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'a configs/*.py file; override any field with --config.KEY=VALUE '
    '(configs/smollm2_demo.py lists them with comments)', lock_config=True)


_KEYS_DOC = ('configs/smollm2_demo.py lists every key with a comment; the README has a table '
             'of the ones most runs change.')


_CONFIG_FLAG = re.compile(r'^-{1,2}config(=|$)')


def _config_path(argv) -> str | None:
  path = None
  for index, arg in enumerate(argv):
    if arg == '--':
      break
    if _CONFIG_FLAG.match(arg):
      path = (arg.split('=', 1)[1] if '=' in arg else
              argv[index + 1] if index + 1 < len(argv) else None)
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


def _typed(value: str, like):
  """A flag's text as the type of the config's value (as config_flags parses it), else a
  Python literal."""
  if isinstance(like, float) or (isinstance(like, int) and not isinstance(like, bool)):
    try:
      return type(like)(value)
    except ValueError:
      return value  # the hyperparameter check names it
  return _literal(value)


def rewrite_hparams(argv, config) -> list[str]:
  """``argv`` with the ``--config.hparams.NAME=VALUE`` flags folded into one
  ``--config.hparams={...}`` at the first one's place, so a method's own names can be set
  although the config is locked: on the config's hparams (or the user's
  ``--config.hparams={...}``), or on none of them where ``--config.method`` names another method
  (the config's hparams belong to its own method). Forms it does not read (``--config.method
  dft``, ``-config.hparams.lam=0.1``) leave the command line as it is, for config_flags."""
  end = argv.index('--') if '--' in argv else len(argv)
  flags_part, rest = list(argv[:end]), list(argv[end:])
  related = [a for a in flags_part
             if re.match(r'^-{1,2}config\.(method|hparams)(\.|=|$)', a)]
  if any(not a.startswith('--') or '=' not in a for a in related):
    return list(argv)
  method_flags = [a.split('=', 1)[1] for a in related if a.startswith('--config.method=')]
  whole = [a for a in related if a.startswith('--config.hparams=')]
  named = [a for a in related if a.startswith('--config.hparams.')]
  base = dict(config.hparams)
  switched = bool(method_flags) and method_flags[-1] != config.method
  if whole:
    base = _literal(whole[-1].split('=', 1)[1])
    if not isinstance(base, dict):
      return list(argv)  # config_flags names the bad value
  elif switched and base:
    print(f'[qtarget] --config.method={method_flags[-1]}: the config\'s hparams {base} (for '
          f'{config.method}) are dropped; set the new method\'s with --config.hparams.NAME=VALUE.')
    base = {}
  new = {a[len('--config.hparams.'):].split('=', 1)[0] for a in named}
  if not whole and not switched and new <= set(base):
    return list(argv)  # only existing names: config_flags sets them
  values = dict(base)
  for arg in named:
    name, value = arg[len('--config.hparams.'):].split('=', 1)
    values[name] = _typed(value, base.get(name))
  # Nothing before the first hparams flag is one, so its index is the folded flag's place.
  first = min((flags_part.index(a) for a in named + whole), default=len(flags_part))
  folded = [a for a in flags_part if a not in named and a not in whole]
  folded.insert(first, f'--config.hparams={values!r}')
  return folded + rest


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
  if not path and not any(a.startswith(('--help', '-help', '-h', '--flagfile', '-flagfile'))
                          for a in argv):
    sys.exit('[qtarget] no config: python -m qtarget.train --config configs/NAME.py '
             '[--config.KEY=VALUE ...] (configs/smollm2_demo.py is the main job; '
             f'configs/tiny.py a seconds-long smoke test). {_KEYS_DOC}')
  config = _load_config(path) if path else None
  if config is None:
    return list(argv)
  argv = rewrite_hparams(argv, config)
  _check_override_keys(argv, config, path)
  return argv


def choose_cpu_without_accelerators() -> None:
  """Runs on the CPU outright where it is the only backend there is (before any backend starts).

  jax's automatic choice tries every backend it knows, the TPU's included: where libtpu is
  installed (the ``tpu`` extra, which ``python -m qtarget.compile_check`` uses to describe TPU
  topologies) but no TPU is attached, libtpu prints initialization errors (``INVALID_ARGUMENT
  ... TPU_WORKER_HOSTNAMES``) before jax falls back to the CPU. On a TPU VM, ``import jax``
  has already chosen ``'tpu,cpu'`` (it finds the chips on the PCI bus); a GPU comes with a jax
  plugin package. With neither, and no platform set by the user (``JAX_PLATFORMS``, even
  empty), this sets ``jax_platforms='cpu'``.
  """
  if 'JAX_PLATFORMS' in os.environ or jax.config.jax_platforms:
    return
  if (importlib.util.find_spec('jax_plugins') is not None or
      importlib.metadata.entry_points(group='jax_plugins')):
    return  # a GPU (or other) plugin: jax's own choice
  jax.config.update('jax_platforms', 'cpu')


def main(argv) -> None:
  del argv
  try:
    loop.run(_CONFIG.value)
  except (ConfigError, loop.TrainingDiverged, prior_cache_files.PriorCacheError,
          records.RecordError, WorkdirLocked, DiskFull) as error:
    sys.exit(f'[qtarget] {type(error).__name__}: {error}')
  except loop.TrainingInterrupted as error:
    print(f'[qtarget] {error}', file=sys.stderr)
    sys.exit(128 + error.signum)  # the shell's convention for a signal's exit status


if __name__ == '__main__':
  choose_cpu_without_accelerators()
  sys.argv[1:] = prepare_argv(sys.argv[1:])
  app.run(main)
