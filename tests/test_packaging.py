"""The package as a dependency: a wheel built from this checkout, installed in a fresh virtual
environment, holds and imports every module, and the trainer's command starts outside the
repository."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Modules that import an optional extra (tunix) are imported only where it is installed.
IMPORT_EVERY_MODULE = r'''
import importlib, pathlib, pkgutil, sys
import qtarget
location = pathlib.Path(qtarget.__file__).resolve()
assert str(location).startswith(sys.prefix), (location, sys.prefix)
failures = []
for module in pkgutil.walk_packages(qtarget.__path__, 'qtarget.'):
  try:
    importlib.import_module(module.name)
  except ModuleNotFoundError as error:
    if (error.name or '').split('.')[0] == 'qtarget':
      failures.append(f'{module.name}: {error}')
  except Exception as error:  # pylint: disable=broad-except
    failures.append(f'{module.name}: {type(error).__name__}: {error}')
print('imported', len(list(pkgutil.walk_packages(qtarget.__path__, 'qtarget.'))))
assert not failures, failures
'''


def _source_modules() -> set[str]:
  return {str(path.relative_to(ROOT)) for path in (ROOT / 'qtarget').rglob('*.py')}


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> pathlib.Path:
  # Built from a copy of the sources: a build/ directory left in the checkout would otherwise
  # lend the wheel modules that the package's own metadata no longer finds.
  source, out = tmp_path_factory.mktemp('source'), tmp_path_factory.mktemp('wheel')
  for name in ('setup.cfg', 'pyproject.toml', 'README.md'):
    shutil.copy(ROOT / name, source / name)
  shutil.copytree(ROOT / 'qtarget', source / 'qtarget',
                  ignore=shutil.ignore_patterns('__pycache__'))
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                  '-q', '-w', str(out), str(source)], check=True, capture_output=True, cwd=out)
  (built,) = out.glob('qtarget-*.whl')
  return built


def test_the_wheel_holds_every_module(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  missing = sorted(_source_modules() - names)
  assert not missing, f'the wheel lacks {missing} (a package directory without __init__.py?)'


def test_installed_in_a_fresh_environment_every_module_imports_and_train_starts(wheel,
                                                                               tmp_path):
  venv = tmp_path / 'venv'
  # The environment sees the installed dependencies (jax, flax, ...) but not this checkout:
  # their directory is a plain path entry, so its .pth files (an editable install's import
  # hook among them) are not run; qtarget comes from the wheel, and the commands run outside
  # the repository.
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  venv_site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
                             check=True, capture_output=True, text=True).stdout.strip()
  dependencies = [path for path in sys.path if path.endswith('site-packages')]
  pathlib.Path(venv_site, 'dependencies.pth').write_text('\n'.join(dependencies) + '\n')
  subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index', '-q',
                  '--target', venv_site, str(wheel)], check=True, capture_output=True)
  env = {key: value for key, value in os.environ.items() if key != 'PYTHONPATH'}
  env['JAX_PLATFORMS'] = 'cpu'
  imported = subprocess.run([python, '-c', IMPORT_EVERY_MODULE], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
  assert imported.returncode == 0, imported.stderr[-3000:]
  started = subprocess.run([python, '-m', 'qtarget.train', '--help'], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
  output = started.stdout + started.stderr
  # absl's --help prints the flags and exits with status 1 (its convention).
  assert started.returncode in (0, 1) and 'Traceback' not in output, output[-3000:]
  assert '--config: a configs/*.py file' in output, output[-3000:]
