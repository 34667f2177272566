"""The import graph of the qtarget and experiments packages has no cycles (lazy imports inside
functions count: a cycle is a cycle whenever it closes), and the experiments modules import each
other as a package."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _modules():
  """Module name -> path, for the qtarget and experiments packages (the first grid's archived
  script, experiments/grid1/select_tasks.py, included)."""
  modules = {}
  for package in ('qtarget', 'experiments'):
    for path in (ROOT / package).rglob('*.py'):
      parts = path.relative_to(ROOT).with_suffix('').parts
      name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
      modules[name] = path
  return modules


def _imports(name, path, modules):
  """The project modules ``name`` imports, anywhere in its file."""
  found = set()
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
        found.add(candidate)
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
