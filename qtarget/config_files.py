"""Loading ``configs/*.py`` files by path (they are plain files, not a package)."""

import importlib.util
import pathlib
import types


def load_module(path) -> types.ModuleType:
  """Executes a config file and returns it as a module (its ``get_config`` builds the config)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'config file {path} does not exist.')
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(config_file, name: str) -> types.ModuleType:
  """The config file ``name``.py next to ``config_file`` (for configs derived from another)."""
  return load_module(pathlib.Path(config_file).with_name(f'{name}.py'))
