"""The method comparison: a resumable grid of training runs, their held-out scores and the table.

A grid is defined by a config module (``configs/compare2_smollm2.py``, the default, and
``configs/compare_smollm2.py`` on CPU, or ``configs/qwen2p5_math_numina.py`` for the paper's
setting) with ``SETTINGS``, ``METHODS``, ``SEEDS`` and ``get_config('SETTING/METHOD/SEED')``,
and where its runs, records and report go (``RUNS_DIR``, ``RESULTS_DIR``, ``REPORT``); a module
with ``teacher_config()`` also trains its teacher first (``get_config('teacher')``). Every run
is one ``python -m qtarget.train --config MODULE:NAME`` process.

A module with ``run_plan(records)`` (``configs/compare2_smollm2.py``) gives the order itself,
from what is recorded so far (runs that wait for a hyperparameter selection appear once it is
made), may have several teachers (``teacher/NAME``), and with ``MEASURE`` each trained model
and Base are measured by ``experiments/measure.py`` in a second process; every file it scores
is recorded and re-scored.

  python experiments/compare.py run      [--config CONFIG] [--only GLOB ...]
  python experiments/compare.py report   [--config CONFIG]  # the grid's REPORT and plots
  python experiments/compare.py rescore  [--config CONFIG]  # every saved prediction re-scored

Resuming: a finished run is a line of the grid's ``RESULTS_DIR/runs.jsonl`` (config, seed,
metrics, wall time, predictions file) and is skipped; an unfinished one resumes from its last
checkpoint in its workdir. A results directory without ``runs.jsonl`` beside planned runs that
are already trained is refused (``--new_results`` goes on): it is most likely a moved or
mistyped one. Base (the untouched model) is evaluated once per seed; its held-out problems,
sampling settings and scorer are those of the runs.
"""

import argparse
import fnmatch
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import time

import stats  # pylint: disable=import-error  (experiments/stats.py)

ROOT = stats.ROOT
DEFAULT_CONFIG = 'configs/compare2_smollm2.py'


def _log(message: str) -> None:
  print(f'[compare {time.strftime("%H:%M:%S")}] {message}', flush=True)


def load_grid(config_path: str, results_dir: str | None = None):
  """The grid module; one that freezes selections keeps them beside ``results_dir``'s runs."""
  from qtarget import config_files  # pylint: disable=g-import-not-at-top
  module = config_files.load_module(ROOT / config_path)
  for name in ('SETTINGS', 'METHODS', 'SEEDS', 'get_config'):
    if not hasattr(module, name):
      raise SystemExit(f'{config_path} defines no {name}: not a comparison grid.')
  if results_dir is not None and hasattr(module, 'selection_file'):
    module.selection_file = ROOT / results_dir / 'selection.json'
  return module


def is_teacher(name: str) -> bool:
  return name == 'teacher' or name.startswith('teacher/')


def _run_config(grid, name: str):
  """A run's config; a first-grid module names its one teacher 'teacher'."""
  return grid.teacher_config() if name == 'teacher' else grid.get_config(name)


def code_version() -> dict:
  """The commit the code runs at, and whether tracked files differ from it."""
  git = lambda *args: stats.git(ROOT, *args) or ''  # '' where git cannot answer
  return {'commit': git('rev-parse', 'HEAD').strip() or None,
          'dirty': bool(git('status', '--porcelain', '--untracked-files=no').strip())}


def run_names(grid, records: dict | None = None) -> list[str]:
  """The grid's own plan, or Base then the grid seed by seed (so a partial table covers every
  cell a little)."""
  if hasattr(grid, 'run_plan'):
    return grid.run_plan(records or {})
  names = []
  for seed in grid.SEEDS:
    names.append(f'base/{seed}')
    names += [f'{s}/{m}/{seed}' for s in grid.SETTINGS for m in grid.METHODS]
  return (['teacher'] if hasattr(grid, 'teacher_config') else []) + names


class Registry:
  """A results directory: runs.jsonl, one line per finished run, and predictions/."""

  def __init__(self, results_dir: pathlib.Path):
    self.dir = results_dir
    self.path = results_dir / 'runs.jsonl'
    self.dir.mkdir(parents=True, exist_ok=True)

  def lines(self) -> list[dict]:
    """Every record in file order, replaced ones included (a run measured again, a teacher
    trained again, appends a line of the same name)."""
    return stats.read_json_lines(self.path, required=('name',))

  def records(self) -> dict[str, dict]:
    """The last record of each run name."""
    return stats.last_of_each_name(self.lines())

  def add(self, record: dict) -> None:
    stats.write_json_lines(self.path, [record], append=True)

  def predictions_path(self, name: str, label: str = '') -> pathlib.Path:
    stem = name.replace('/', '__') + (f'__{label}' if label else '')
    return self.dir / 'predictions' / (stem + '.jsonl')


def _relative(path: pathlib.Path) -> str:
  """Paths inside the repository are recorded relative to it (the results travel with it)."""
  try:
    return str(path.resolve().relative_to(ROOT))
  except ValueError:
    return str(path.resolve())


def _train_command(config_path: str, name: str) -> list[str]:
  return [sys.executable, '-m', 'qtarget.train', f'--config={config_path}:{name}']


def _subprocess(command: list[str], log_path: pathlib.Path) -> None:
  log_path.parent.mkdir(parents=True, exist_ok=True)
  env = {**os.environ, 'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', '')}
  with log_path.open('a') as log:
    log.write(f'\n$ {" ".join(command)}\n')
    log.flush()
    code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
  if code:
    tail = log_path.read_text().splitlines()[-15:]
    raise RuntimeError(f'{" ".join(command)} failed with exit code {code}; log {log_path}:\n' +
                       '\n'.join(tail))


def _children_cpu_seconds() -> float:
  """CPU seconds (user and system, all threads) of the finished child processes so far."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def _annotate_predictions(source: pathlib.Path, target: pathlib.Path, **fields) -> list[dict]:
  from qtarget import evaluate  # pylint: disable=g-import-not-at-top
  rows = [{**row, **fields} for row in evaluate.read_predictions(source, fields=())]
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return rows


def _measure(config_path: str, name: str, model: str, workdir: pathlib.Path,
             registry: Registry) -> dict:
  """experiments/measure.py on a model; its prediction files copied into the registry."""
  out = workdir / 'measure'
  command = [sys.executable, str(pathlib.Path(__file__).resolve().parent / 'measure.py'),
             '--config', config_path, '--name', name, '--model', model, '--out', str(out)]
  _subprocess(command, workdir / 'log.txt')
  result = json.loads((out / 'measure.json').read_text())
  for label, scored in result['scored'].items():
    target = registry.predictions_path(name, label)
    _annotate_predictions(pathlib.Path(scored['predictions']), target, run=name)
    scored['predictions'] = _relative(target)
  return result


def _measured_record(name: str, result: dict) -> dict:
  return {'accuracy': result['accuracy'], 'predictions': result['scored']['test_greedy'][
      'predictions'], 'scored': result['scored'], 'calibration': result['calibration'],
          'fit': result['fit'], 'measure_seconds': result['seconds'],
          'measure_cpu_seconds': result.get('cpu_seconds')}


def train_run(grid, config_path: str, name: str, registry: Registry) -> dict:
  """One training run (resuming from its checkpoint), recorded with its predictions."""
  config = _run_config(grid, name)
  workdir = ROOT / config.workdir
  started, version, cpu_started = time.time(), code_version(), _children_cpu_seconds()
  summary_path = workdir / 'summary.json'
  measured = hasattr(grid, 'MEASURE')
  # summary.json is written after the export: with it, the weights are whole.
  exported = (summary_path.exists() and (workdir / 'hf' / 'model.safetensors').exists()
              and json.loads(summary_path.read_text()).get('steps') == config.steps)
  version_path = workdir / 'code.json'  # the version that trained it (a resume keeps it)
  if not (measured and exported):  # trained and exported before an interruption: measure only
    if not version_path.exists():
      workdir.mkdir(parents=True, exist_ok=True)
      version_path.write_text(json.dumps(version))
    _subprocess(_train_command(config_path, name), workdir / 'log.txt')
  trained_by = json.loads(version_path.read_text()) if version_path.exists() else version
  summary = json.loads(summary_path.read_text())
  if is_teacher(name):
    setting, method, seed = None, 'teacher', config.seed
  else:
    setting, method, seed = name.split('/')
  record = {
      'name': name, 'setting': setting, 'method': method, 'seed': int(seed),
      'command': ' '.join(['python', '-m', 'qtarget.train', f'--config={config_path}:{name}']),
      'config': json.loads(config.to_json_best_effort()), 'code': trained_by,
      'measure_code': version if measured else None,
      'final_metrics': summary.get('final_metrics'), 'train_data': summary.get('train_data'),
      'mean_step_seconds': summary.get('mean_step_seconds'),
      'mean_step_cpu_seconds': summary.get('mean_step_cpu_seconds'),
      'run_wall_seconds': summary.get('wall_seconds'),
  }
  if measured:
    record.update(_measured_record(name, _measure(config_path, name, str(workdir / 'hf'),
                                                  workdir, registry)))
    # CPU seconds of this invocation's training and measuring (contention moves them far less
    # than wall time; a run resumed from its export counts the measuring only).
    record.update(wall_seconds=round(time.time() - started, 1),
                  cpu_seconds=round(_children_cpu_seconds() - cpu_started, 1),
                  finished=time.strftime('%Y-%m-%d %H:%M'))
    return record
  predictions = registry.predictions_path(name)
  _annotate_predictions(workdir / 'predictions_after.jsonl', predictions, run=name,
                        setting=setting, method_name=method)
  record.update({
      'eval': summary.get('eval_after'), 'accuracy': summary.get('accuracy_after'),
      'wall_seconds': round(time.time() - started, 1),
      'cpu_seconds': round(_children_cpu_seconds() - cpu_started, 1),
      'predictions': _relative(predictions), 'finished': time.strftime('%Y-%m-%d %H:%M'),
  })
  return record


def clean_up(grid, name: str) -> None:
  """A recorded training run's checkpoints (~1.6 GB) and export go; a teacher's export is the
  students' prior and stays. Called only after the run is recorded."""
  if is_teacher(name) or name.startswith('base/'):
    return
  workdir = ROOT / grid.get_config(name).workdir
  shutil.rmtree(workdir / 'checkpoints', ignore_errors=True)
  if hasattr(grid, 'MEASURE'):  # measured: the export was only for measure.py
    shutil.rmtree(workdir / 'hf', ignore_errors=True)


def base_run(grid, config_path: str, name: str, registry: Registry) -> dict:
  """The untouched model's held-out score, with the runs' evaluation settings."""
  started, version = time.time(), code_version()
  if hasattr(grid, 'MEASURE'):  # base/TASK: measured like the runs
    config = grid.get_config(name)
    result = _measure(config_path, name, 'initial', ROOT / config.workdir, registry)
    return {'name': name, 'setting': None, 'method': 'base', 'seed': config.seed,
            'command': f'python experiments/measure.py --config {config_path} --name {name} '
                       '--model initial --out DIR', 'config': None, 'code': version,
            **_measured_record(name, result), 'wall_seconds': round(time.time() - started, 1),
            'finished': time.strftime('%Y-%m-%d %H:%M')}
  seed = int(name.split('/')[1])
  # The grid's own runs directory; without one, beside the results directory (a test's grid).
  runs_dir = ROOT / grid.RUNS_DIR if hasattr(grid, 'RUNS_DIR') else registry.dir.parent / 'runs'
  workdir = runs_dir / 'base' / f'seed{seed}'
  command = [sys.executable, str(pathlib.Path(__file__).resolve()), '_base', '--config',
             config_path, '--seed', str(seed), '--workdir', str(workdir)]
  _subprocess(command, workdir / 'log.txt')
  result = json.loads((workdir / 'eval.json').read_text())
  predictions = registry.predictions_path(name)
  _annotate_predictions(workdir / 'predictions.jsonl', predictions, run=name, setting=None,
                        method_name='base')
  return {'name': name, 'setting': None, 'method': 'base', 'seed': seed,
          'command': f'python experiments/compare.py _base --config {config_path} --seed {seed}',
          'config': None, 'code': version, 'eval': result, 'accuracy': result['accuracy'],
          'wall_seconds': round(time.time() - started, 1),
          'predictions': _relative(predictions),
          'finished': time.strftime('%Y-%m-%d %H:%M')}


def _base_eval(args) -> None:
  """Subprocess body of a Base run (loads the model once, evaluates, writes eval.json)."""
  from qtarget import evaluate, train  # pylint: disable=g-import-not-at-top
  grid = load_grid(args.config)
  first = f'{next(iter(grid.SETTINGS))}/{next(iter(grid.METHODS))}/{args.seed}'
  config = grid.get_config(first)
  model, tokenizer = train.load_model(config.model, seed=args.seed, with_lora=False)
  records = train.held_out_records(config)[:config.eval.num_problems]
  result = evaluate.evaluate(model, tokenizer, records,
                             max_new_tokens=config.eval.max_new_tokens,
                             batch_size=config.eval.batch_size,
                             num_samples=config.eval.num_samples,
                             temperature=config.eval.temperature, top_p=config.eval.top_p,
                             seed=config.eval.seed)
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'predictions.jsonl').write_text(''.join(
      json.dumps({**p, 'method': 'base', 'seed': args.seed, 'step': 0}) + '\n'
      for p in result.predictions))
  k = config.eval.num_samples
  (workdir / 'eval.json').write_text(json.dumps(
      {'accuracy': result.accuracy, f'pass_at_{k}': result.pass_at_k, 'k': k,
       'problems': len(records), 'step': 0, 'seconds': round(result.seconds, 1)}))
  print(f'base seed {args.seed}: accuracy {result.accuracy:.3f}', flush=True)


def _todo(grid, done: dict, patterns) -> tuple[list[str], list[str]]:
  """The plan's names (filtered by ``--only`` patterns) and those not yet recorded."""
  names = run_names(grid, done)
  if patterns:
    names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
  cut = getattr(grid, 'is_cut', lambda name: False)  # runs the grid's budget cut: never run
  todo = [n for n in names if n not in done and not cut(n)]
  if 'teacher' in todo:  # a grid with teacher_config(): every student may need it
    todo = ['teacher'] + [n for n in todo if n != 'teacher']
  return names, todo


def _teachers_needed(grid, done: dict, patterns) -> set[str]:
  """The recorded teachers whose export a run still to go reads as its prior."""
  exports = {(ROOT / _run_config(grid, n).workdir / 'hf').resolve(): n
             for n in done if is_teacher(n)}
  needed = set()
  for name in _todo(grid, done, patterns)[1]:
    if is_teacher(name) or name.startswith('base/'):
      continue
    prior = _run_config(grid, name).get('prior')
    if prior is not None and prior.get('source') == 'hf' and prior.get('path'):
      teacher = exports.get((ROOT / prior.path).resolve())
      if teacher:
        needed.add(teacher)
  return needed


def use_compilation_cache(grid) -> str:
  """Points the runs' processes at one persistent compilation cache (unless the environment
  already names one): every run compiles the same train step and generation programs, and a
  cached executable is the compiled program itself, so the numbers are the same."""
  runs_dir = getattr(grid, 'RUNS_DIR', 'experiments/runs')
  cache = os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(ROOT / runs_dir / 'jax_cache'))
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')
  return cache


def _check_no_trained_runs(grid, names: list[str], registry: Registry, dry_run: bool) -> None:
  """A grid starting a results directory beside planned runs that are already trained is almost
  always a moved or mistyped results directory: refused (a dry run warns), since going on would
  record them again here."""
  exported, cleaned = [], []
  for name in names:
    if name.startswith('base/'):  # Base trains nothing
      continue
    try:
      workdir = ROOT / _run_config(grid, name).workdir
    except (KeyError, ValueError):  # a name the grid gives no config cannot have been trained
      continue
    if (workdir / 'summary.json').exists():
      (exported if (workdir / 'hf').exists() else cleaned).append((name, workdir))
  if not exported and not cleaned:
    return
  name, workdir = (exported + cleaned)[0]
  message = (
      f'{_relative(registry.path)} does not exist, but {len(exported) + len(cleaned)} planned '
      f'run(s) were already trained (e.g. {name}: {_relative(workdir)}); check --results_dir '
      "(or the grid's RESULTS_DIR). Recording them here instead would measure the "
      f'{len(exported)} still exported again; the {len(cleaned)} whose checkpoints and export '
      'were cleaned up once recorded elsewhere cannot resume (move their workdirs aside to '
      'train them again). Pass --new_results to go on.')
  if dry_run:
    _log('warning: ' + message)
  else:
    raise SystemExit(message)


def run(args) -> None:
  grid = load_grid(args.config, args.results_dir)
  if not args.dry_run:
    _log(f'compilation cache: {use_compilation_cache(grid)}')
  registry = Registry(ROOT / args.results_dir)
  done = registry.records()
  # A teacher's export is the students' prior and lives outside git (0.5 GB): a fresh checkout
  # retrains it with the same config and seed before any run still to go that reads it.
  unexported = [n for n in done
                if is_teacher(n) and not (ROOT / _run_config(grid, n).workdir / 'hf').exists()]
  needed = _teachers_needed(grid, done, args.only) if unexported else set()
  for name in unexported:
    if name in needed:
      _log(f'the recorded {name} has no export here; training it again')
      del done[name]
    else:
      _log(f'the recorded {name} has no export here; no run still to go reads it, so it is '
           'not trained again')
  names, todo = _todo(grid, done, args.only)
  if args.only and not names:
    raise SystemExit(f'--only {" ".join(args.only)} matches no run of {args.config}; run '
                     'names look like SETTING/METHOD/SEED (list them with --dry_run).')
  if not registry.path.exists() and not args.new_results:  # a grid's first invocation here
    _check_no_trained_runs(grid, names, registry, args.dry_run)
  cut = [n for n in names if n not in done and getattr(grid, 'is_cut', lambda n: False)(n)]
  _log(f'{len(names) - len(todo) - len(cut)} of {len(names)} runs recorded; {len(todo)} to go' +
       (f'; {len(cut)} cut by the grid (is_cut), not run' if cut else '') + (
      ' (more appear as hyperparameters are selected)' if hasattr(grid, 'run_plan') else ''))
  if args.dry_run:
    for name in todo[:args.max_runs] if args.max_runs else todo:
      print(' '.join(_train_command(args.config, name)) if not name.startswith('base/')
            else f'(base evaluation) {name}')
    return
  registry.path.touch()  # started here: an interrupted first run resumes without the check
  started, count, student_seconds = time.time(), 0, {True: [], False: []}
  while todo and not (args.max_runs and count >= args.max_runs):
    name, count = todo[0], count + 1
    _log(f'[{count}/{count + len(todo) - 1}] {name} ...')
    body = base_run if name.startswith('base/') else train_run
    record = body(grid, args.config, name, registry)
    registry.add(record)
    clean_up(grid, name)  # after the record: a kill in between leaves files, not a hole
    done[name] = record
    names, todo = _todo(grid, done, args.only)  # a selection may have added runs
    if not (is_teacher(name) or name.startswith('base/')):
      student_seconds[stats.measured_on_validation(grid, name)].append(record['wall_seconds'])
    _log(f'{name}: accuracy {record["accuracy"]:.3f} in {record["wall_seconds"]:.0f} s '
         f'(this invocation so far {(time.time() - started) / 60:.1f} min; '
         f'{_time_left(todo, student_seconds, lambda n: stats.measured_on_validation(grid, n))})')


def _time_left(todo: list[str], student_seconds: dict[bool, list[float]],
               on_validation=lambda name: False) -> str:
  """The time the planned runs still need, each at this invocation's median student run of its
  kind (measured on validation or not; the other kind's median until one has run): teachers
  (minutes each) and Base would skew a mean of every run so far."""
  students = [n for n in todo if not (is_teacher(n) or n.startswith('base/'))]
  others = len(todo) - len(students)
  seen = sum(len(v) for v in student_seconds.values())
  if not seen:
    return f'{len(todo)} runs planned; a time estimate after the first student run'
  median = lambda kind: statistics.median(student_seconds[kind] or student_seconds[not kind])
  minutes = sum(median(on_validation(n)) for n in students) / 60
  return (f'about {minutes:.0f} min left for the {len(students)} student runs planned, at this '
          f'invocation\'s medians of {seen}' +
          (f', plus {others} teacher or Base run(s)' if others else ''))


# Statistics and the report.

mean_and_interval = stats.mean_and_interval  # re-exported: the report's and the CLI's


def rescore_file(path: pathlib.Path) -> float:
  """Average score of a predictions file, re-extracted and re-scored with the task's scorer."""
  from qtarget import evaluate  # pylint: disable=g-import-not-at-top
  from qtarget.data import records  # pylint: disable=g-import-not-at-top
  scores = []
  for row in evaluate.read_predictions(path, fields=('task', 'gold', 'output')):
    record = {'task': row['task'], 'answer': row['gold'], 'metadata': row.get('metadata', '')}
    scores.append(evaluate.score(record, records.extract_answer(row['output'], row['gold'])))
  return sum(scores) / len(scores)


def rescore(args) -> int:
  registry = Registry(ROOT / args.results_dir)
  mismatches = 0
  for name, record in sorted(registry.records().items()):
    scored = record.get('scored') or {'': {'accuracy': record['accuracy'],
                                           'predictions': record['predictions']}}
    for label, entry in scored.items():
      again = rescore_file(ROOT / entry['predictions'])
      ok = abs(again - entry['accuracy']) < 1e-9
      mismatches += not ok
      print(f'{name + (" " + label if label else ""):60s} recorded {entry["accuracy"]:.4f} '
            f're-scored {again:.4f} {"ok" if ok else "MISMATCH"}')
  print(f'{mismatches} mismatches')
  return 1 if mismatches else 0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  for command in ('run', 'report', 'rescore', '_base'):
    p = sub.add_parser(command)
    p.add_argument('--config', default=DEFAULT_CONFIG, help='a grid config module')
    p.add_argument('--results_dir', default=None,
                   help="default: the grid's RESULTS_DIR (required without one)")
    if command == 'run':
      p.add_argument('--only', nargs='*', help='glob patterns of run names (SETTING/METHOD/SEED)')
      p.add_argument('--max_runs', type=int, default=0, help='stop after this many runs')
      p.add_argument('--dry_run', action='store_true', help='print the commands only')
      p.add_argument('--new_results', action='store_true',
                     help='start a results directory although planned runs are already trained')
    if command == 'report':
      p.add_argument('--output', default=None,
                     help="default: the grid's REPORT (required without one)")
    if command == '_base':
      p.add_argument('--seed', type=int, required=True)
      p.add_argument('--workdir', required=True)
  args = parser.parse_args()
  if args.results_dir is None and args.command != '_base':
    # No shared default: a grid recording into another grid's directory would mix their
    # records (its Base skipped as already recorded) and overwrite the other's report.
    args.results_dir = getattr(load_grid(args.config), 'RESULTS_DIR', None)
    if args.results_dir is None:
      raise SystemExit(f'{args.config} names no RESULTS_DIR: pass --results_dir.')
  if args.command == 'run':
    run(args)
  elif args.command == 'rescore':
    sys.exit(rescore(args))
  elif args.command == 'report':
    grid = load_grid(args.config, args.results_dir)
    if not (args.output or hasattr(grid, 'REPORT')):
      raise SystemExit(f'{args.config} names no REPORT: pass --output.')
    output = ROOT / (args.output or grid.REPORT)
    registry = Registry(ROOT / args.results_dir)
    if hasattr(grid, 'run_plan'):  # the pre-registered grid
      import report2  # pylint: disable=g-import-not-at-top  (experiments/report2.py)
      report2.write(grid, registry, output, args, run_names(grid, registry.records()))
    else:
      import report  # pylint: disable=g-import-not-at-top  (experiments/report.py)
      report.write(grid, registry, output, args, run_names(grid))
  else:
    _base_eval(args)


if __name__ == '__main__':
  main()
