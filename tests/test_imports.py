"""The import graph of the qtarget and experiments packages and the benchmarks' scripts has no
cycles, and every import in it points down the layers declared below (lazy imports inside
functions count: a cycle closes, and a layer is crossed, whenever the import runs); the
experiments modules import each other as a package."""

import ast
import fnmatch
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The layers, lowest first. A module imports its own layer and the layers below it, never one
# above. Each module is named here (a pattern ending in '.*' names a package's modules), so a
# new module is placed by what it is when it is added.
LAYERS = (
    # The losses and targets, pure jax and numpy, and small modules that import nothing of qtarget:
    # another JAX project takes the losses without the rest. ``qtarget`` is the package's
    # __init__, which re-exports the loss calls; qtarget.experimental holds a Pallas kernel of
    # the fused loss.
    ('core', ('qtarget', 'qtarget.targets', 'qtarget.losses', 'qtarget.method',
              'qtarget.validation', 'qtarget.native', 'qtarget.fused', 'qtarget.cached_prior',
              'qtarget.loss_calls', 'qtarget.errors', 'qtarget.jsonl', 'qtarget.hlo',
              'qtarget.config_files', 'qtarget.experimental', 'qtarget.experimental.*')),
    # The decoder and the files it is read from and written to.
    ('models', ('qtarget.models', 'qtarget.models.*', 'qtarget.checkpoints', 'qtarget.gguf_file',
                'qtarget.tokenizer')),
    # Records, builders, the input pipeline, the prior cache's files.
    ('data', ('qtarget.data', 'qtarget.data.*')),
    # Generation and scoring of any model on held-out problems, and its calibration: the
    # trainer's evaluations and the experiments' measurements alike (it never needs a trainer).
    ('evaluation', ('qtarget.evaluate', 'qtarget.calibration')),
    # Trainers: ours, and the drop-in loss for Tunix's.
    ('trainer', ('qtarget.train', 'qtarget.train.*', 'qtarget.integrations',
                 'qtarget.integrations.*')),
    # Commands beside the trainer, and the modules only they use.
    ('tools', ('qtarget.compile_check', 'qtarget.cache_prior', 'qtarget.trust_report',
               'qtarget.trust_scores', 'qtarget.trust_html')),
    ('experiments and benchmarks', ('experiments', 'experiments.*', 'benchmarks.*')),
)


def _modules():
  """Module name -> path, for the qtarget and experiments packages (the first grid's archived
  script, experiments/grid1/select_tasks.py, included) and the benchmarks' scripts."""
  modules = {}
  for package in ('qtarget', 'experiments', 'benchmarks'):
    for path in (ROOT / package).rglob('*.py'):
      parts = path.relative_to(ROOT).with_suffix('').parts
      name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
      modules[name] = path
  return modules


def _imports(name, path, modules):
  """The project modules ``name`` imports, anywhere in its file."""
  return set(_import_lines(name, path, modules))


def _import_lines(name, path, modules):
  """The project modules ``name`` imports, anywhere in its file, each with its first line."""
  found = {}
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      candidates = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1]
                        + ([base] if base else []))
      candidates = [base] + [f'{base}.{alias.name}' for alias in node.names]
    else:
      continue
    for candidate in candidates:
      if candidate in modules and candidate != name:
        found[candidate] = min(found.get(candidate, node.lineno), node.lineno)
  return found


def _cycle(graph):
  """One cycle as a list of modules, or None."""
  state = {}

  def visit(node, stack):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt, stack)
        if found:
          return found
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node, [])
      if found:
        return found
  return None


def _graph():
  modules = _modules()
  graph = {name: _imports(name, path, modules) for name, path in modules.items()}
  # A package's __init__ re-exporting its submodules is not a cycle with them.
  for name in graph:
    graph[name] = {m for m in graph[name] if not name.startswith(m + '.')}
  return graph


def test_no_import_cycles():
  graph = _graph()
  assert 'qtarget.fused' in graph and 'experiments.grid1.select_tasks' in graph
  # The report's modules are found through the package's imports.
  assert {'experiments.findings', 'experiments.ledger', 'experiments.paired',
          'experiments.plots', 'experiments.reproduce'} <= graph['experiments.report']
  assert {'experiments.grids', 'experiments.records', 'experiments.report'} <= graph[
      'experiments.compare']
  assert _cycle(graph) is None, ' -> '.join(_cycle(graph))


def test_experiments_modules_import_each_other_as_a_package():
  """``import stats`` beside ``experiments/stats.py`` works only with experiments/ on sys.path:
  every module of the package names the package (``from experiments import stats``)."""
  stems = {path.stem for path in (ROOT / 'experiments').glob('*.py')}
  bare = []
  for path in sorted((ROOT / 'experiments').rglob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
               [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
      bare += [f'{path.relative_to(ROOT)}: {n}' for n in names if n and n.split('.')[0] in stems]
  assert not bare, bare


def test_the_cycle_finder_finds_cycles():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None


def _layer(module):
  """The index and name of the layer that names ``module`` (None where none does)."""
  for index, (layer, patterns) in enumerate(LAYERS):
    if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
      return index, layer
  return None


def _shown(path):
  return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _upward_imports(modules):
  """``file:line: importer (layer) imports imported (layer)`` for each import that points up."""
  found = []
  for name, path in sorted(modules.items()):
    here = _layer(name)
    for imported, line in sorted(_import_lines(name, path, modules).items()):
      there = _layer(imported)
      if here and there and there[0] > here[0]:
        found.append(f'{_shown(path)}:{line}: {name} (layer {here[1]}) imports {imported} '
                     f'(layer {there[1]}, above it)')
  return found


def test_every_module_has_a_layer():
  unplaced = sorted(name for name in _modules() if _layer(name) is None)
  assert not unplaced, ('modules in no layer of LAYERS (tests/test_imports.py): place each by '
                        f'what it is: {", ".join(unplaced)}')


def test_imports_point_down_the_layers():
  """Lazy imports inside functions included: an import that points up closes a loop between
  the layers as soon as it runs. Fix one by moving the code it needs down, or by passing it in."""
  upward = _upward_imports(_modules())
  layers = ' < '.join(layer for layer, _ in LAYERS)
  assert not upward, f'imports that point up the layers ({layers}):\n' + '\n'.join(upward)


def test_the_layer_check_finds_upward_imports(tmp_path):
  """A lazy import of the trainer inside a data module is found, and named with its line."""
  leaf = tmp_path / 'leaf.py'
  leaf.write_text('import json\n\n\ndef f():\n  from qtarget.train import loop\n  return loop\n')
  loop = ROOT / 'qtarget' / 'train' / 'loop.py'
  upward = _upward_imports({'qtarget.data.leaf': leaf, 'qtarget.train.loop': loop})
  assert upward == [f'{leaf}:5: qtarget.data.leaf (layer data) imports qtarget.train.loop '
                    '(layer trainer, above it)'], upward
  down = tmp_path / 'down.py'
  down.write_text('from qtarget.data import leaf\n')
  assert not _upward_imports({'qtarget.train.down': down, 'qtarget.data.leaf': leaf})
