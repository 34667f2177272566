"""The grids' runner: a resumable grid of training runs, each measured in its own process and
recorded in the grid's folder; its report; and every saved prediction re-scored.

  python -m experiments.compare run      [--config CONFIG] [--only GLOB ...]
  python -m experiments.compare report   [--config CONFIG]   # the grid's RESULTS.md and plots
  python -m experiments.compare rescore  [--config CONFIG]   # every saved prediction re-scored

(``python experiments/compare.py ...`` is the same command.) A grid is a config module that
declares ``GRID`` (:class:`experiments.grids.Grid`): its folder, its plan (in order, from what
is recorded so far: runs that wait for a hyperparameter selection appear once it is made), what
each run is measured on and the report's sections. Every run is one ``python -m qtarget.train
--config CONFIG:NAME`` process, then one ``python -m experiments.measure`` process on its
export (Base: on the untouched model; teachers, ``teacher/NAME``, keep their export, the
students' prior).

Resuming: a finished run is a line of the folder's ``runs.jsonl`` (config, seed, every scored
file, times, the commits that trained and measured it, command) and is skipped; an unfinished
one resumes from its last checkpoint in its workdir, and one trained and exported but not
measured is only measured. A folder without ``runs.jsonl`` beside planned runs that are already
trained is refused (``--new_results`` goes on): it is most likely a moved or mistyped one.

One process writes a workdir at a time (``qtarget.train.workdir_lock``): the runner holds a
workdir's lock while it writes there itself (the code version, the measurements, the clean-up)
and the trainer it starts takes it on its own, so a second runner on the same grid, or a run
started by hand in one of its workdirs, stops it with the holder named.
"""

import os
import pathlib
import sys

if __name__ == '__main__' and not __package__:  # python experiments/compare.py: as -m would
  _ROOT = str(pathlib.Path(__file__).resolve().parent.parent)
  os.execve(sys.executable, [sys.executable, '-m', 'experiments.compare', *sys.argv[1:]],
            {**os.environ, 'PYTHONPATH': os.pathsep.join(
                filter(None, [_ROOT, os.environ.get('PYTHONPATH')]))})

# pylint: disable=g-import-not-at-top,wrong-import-position  (after the script's hand-over)
import argparse
import fnmatch
import json
import resource
import shutil
import statistics
import subprocess
import time

from experiments import ROOT
from experiments import grids
from experiments import ledger
from experiments import records as records_lib
from experiments import report

DEFAULT_CONFIG = 'configs/compare2_smollm2.py'
Registry = records_lib.Registry


def _log(message: str) -> None:
  print(f'[compare {time.strftime("%H:%M:%S")}] {message}', flush=True)


def is_teacher(name: str) -> bool:
  return name.startswith('teacher/')


def is_base(name: str) -> bool:
  return name.startswith('base/')


def _relative(path: pathlib.Path) -> str:
  """Paths inside the repository are recorded relative to it (the records travel with it)."""
  try:
    return str(path.resolve().relative_to(ROOT))
  except ValueError:
    return str(path.resolve())


def _holding(workdir: pathlib.Path):
  """The workdir's lock (``qtarget.train.workdir_lock``) while this runner writes there itself;
  the trainer it starts takes the lock on its own. A workdir that another live process holds
  (a run still training there, another runner) stops this runner with the holder named."""
  from qtarget.train import workdir_lock  # pylint: disable=g-import-not-at-top
  return workdir_lock.WorkdirLock(workdir, purpose='experiments/compare.py')


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


def _measure(config_path: str, name: str, model: str, workdir: pathlib.Path,
             registry: Registry) -> dict:
  """experiments.measure on a model; its prediction files copied into the grid's folder, each
  row naming the run."""
  from qtarget import evaluate  # pylint: disable=g-import-not-at-top
  out = workdir / 'measure'
  command = [sys.executable, '-m', 'experiments.measure', '--config', config_path,
             '--name', name, '--model', model, '--out', str(out)]
  _subprocess(command, workdir / 'log.txt')
  result = json.loads((out / 'measure.json').read_text())
  for label, scored in result['scored'].items():
    target = registry.predictions_path(name, label)
    rows = evaluate.read_predictions(pathlib.Path(scored['predictions']), fields=())
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(''.join(json.dumps({**row, 'run': name}) + '\n' for row in rows))
    scored['predictions'] = _relative(target)
  return {'accuracy': result['accuracy'],
          'predictions': result['scored']['test_greedy']['predictions'],
          'scored': result['scored'], 'calibration': result['calibration'],
          'fit': result['fit'], 'measure_seconds': result['seconds'],
          'measure_cpu_seconds': result.get('cpu_seconds')}


def train_run(grid, config_path: str, name: str, registry: Registry) -> dict:
  """One training run (resuming from its checkpoint), measured and recorded."""
  config = grid.get_config(name)
  workdir = ROOT / config.workdir
  started, version, cpu_started = time.time(), ledger.code_version(), _children_cpu_seconds()
  summary_path = workdir / 'summary.json'
  # summary.json is written after the export: with it, the weights are whole.
  exported = (summary_path.exists() and (workdir / 'hf' / 'model.safetensors').exists()
              and json.loads(summary_path.read_text()).get('steps') == config.steps)
  version_path = workdir / 'code.json'  # the version that trained it (a resume keeps it)
  if not exported:  # trained and exported before an interruption: measured only
    with _holding(workdir):
      if not version_path.exists():
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
      'measure_code': version,
      'final_metrics': summary.get('final_metrics'), 'train_data': summary.get('train_data'),
      'mean_step_seconds': summary.get('mean_step_seconds'),
      'mean_step_cpu_seconds': summary.get('mean_step_cpu_seconds'),
      'run_wall_seconds': summary.get('wall_seconds'),
  }
  with _holding(workdir):
    record.update(_measure(config_path, name, str(workdir / 'hf'), workdir, registry))
  # CPU seconds of this invocation's training and measuring (contention moves them far less
  # than wall time; a run resumed from its export counts the measuring only).
  record.update(wall_seconds=round(time.time() - started, 1),
                cpu_seconds=round(_children_cpu_seconds() - cpu_started, 1),
                finished=time.strftime('%Y-%m-%d %H:%M'))
  return record


def base_run(grid, config_path: str, name: str, registry: Registry) -> dict:
  """The untouched model (``base/TASK``), measured as the runs are."""
  started, version = time.time(), ledger.code_version()
  config = grid.get_config(name)
  with _holding(ROOT / config.workdir):
    result = _measure(config_path, name, 'initial', ROOT / config.workdir, registry)
  return {'name': name, 'setting': None, 'method': 'base', 'seed': config.seed,
          'command': f'python -m experiments.measure --config {config_path} --name {name} '
                     '--model initial --out DIR', 'config': None, 'code': version,
          **result, 'wall_seconds': round(time.time() - started, 1),
          'finished': time.strftime('%Y-%m-%d %H:%M')}


def clean_up(grid, name: str) -> None:
  """A recorded training run's checkpoints (~1.6 GB) and export (read by the measurement only)
  go; a teacher's export is the students' prior and stays. Called only after the run is
  recorded."""
  if is_teacher(name) or is_base(name):
    return
  workdir = ROOT / grid.get_config(name).workdir
  with _holding(workdir):
    shutil.rmtree(workdir / 'checkpoints', ignore_errors=True)
    shutil.rmtree(workdir / 'hf', ignore_errors=True)


def _todo(grid, done: dict, patterns) -> tuple[list[str], list[str]]:
  """The plan's names (filtered by ``--only`` patterns) and those not yet recorded and not cut
  by the grid's budget."""
  names = grid.plan(done, grid.selection_file)
  if patterns:
    names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
  return names, [n for n in names if n not in done and not grid.cut(n)]


def _teachers_needed(grid, done: dict, patterns) -> set[str]:
  """The recorded teachers whose export a run still to go reads as its prior."""
  exports = {(ROOT / grid.get_config(n).workdir / 'hf').resolve(): n
             for n in done if is_teacher(n)}
  needed = set()
  for name in _todo(grid, done, patterns)[1]:
    if is_teacher(name) or is_base(name):
      continue
    prior = grid.get_config(name).get('prior')
    if prior is not None and prior.get('source') == 'hf' and prior.get('path'):
      teacher = exports.get((ROOT / prior.path).resolve())
      if teacher:
        needed.add(teacher)
  return needed


def use_compilation_cache(grid) -> str:
  """Points the runs' processes at one persistent compilation cache (unless the environment
  already names one): every run compiles the same train step and generation programs, and a
  cached executable is the compiled program itself, so the numbers are the same."""
  cache = os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                                str(ROOT / grid.runs_dir / 'jax_cache'))
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')
  return cache


def _check_no_trained_runs(grid, names: list[str], registry: Registry, dry_run: bool) -> None:
  """A grid starting a folder beside planned runs that are already trained is almost always a
  moved or mistyped folder: refused (a dry run warns), since going on would record them again
  here."""
  exported, cleaned = [], []
  for name in names:
    if is_base(name):  # Base trains nothing
      continue
    try:
      workdir = ROOT / grid.get_config(name).workdir
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
      "(or the grid's folder). Recording them here instead would measure the "
      f'{len(exported)} still exported again; the {len(cleaned)} whose checkpoints and export '
      'were cleaned up once recorded elsewhere cannot resume (move their workdirs aside to '
      'train them again). Pass --new_results to go on.')
  if dry_run:
    _log('warning: ' + message)
  else:
    raise SystemExit(message)


def _retrain_unexported_teachers(grid, done: dict, patterns) -> None:
  """A teacher's export is the students' prior and lives outside git (0.5 GB): a fresh checkout
  trains it again, with the same config and seed, before any run still to go that reads it."""
  unexported = [n for n in done
                if is_teacher(n) and not (ROOT / grid.get_config(n).workdir / 'hf').exists()]
  needed = _teachers_needed(grid, done, patterns) if unexported else set()
  for name in unexported:
    if name in needed:
      _log(f'the recorded {name} has no export here; training it again')
      del done[name]
    else:
      _log(f'the recorded {name} has no export here; no run still to go reads it, so it is '
           'not trained again')


def _time_left(todo: list[str], student_seconds: dict[bool, list[float]],
               on_validation=lambda name: False) -> str:
  """The time the planned runs still need, each at this invocation's median student run of its
  kind (measured on validation or not; the other kind's median until one has run): teachers
  (minutes each) and Base would skew a mean of every run so far."""
  students = [n for n in todo if not (is_teacher(n) or is_base(n))]
  others = len(todo) - len(students)
  seen = sum(len(v) for v in student_seconds.values())
  if not seen:
    return f'{len(todo)} runs planned; a time estimate after the first student run'
  median = lambda kind: statistics.median(student_seconds[kind] or student_seconds[not kind])
  minutes = sum(median(on_validation(n)) for n in students) / 60
  return (f'about {minutes:.0f} min left for the {len(students)} student runs planned, at this '
          f'invocation\'s medians of {seen}' +
          (f', plus {others} teacher or Base run(s)' if others else ''))


def _run_all(grid, args, registry, done, todo) -> None:
  """Runs ``todo`` in order, recording each run before cleaning it up, until done or
  ``--max_runs``; a selection made on the way adds runs."""
  registry.path.touch()  # started here: an interrupted first run resumes without the check
  started, count, student_seconds = time.time(), 0, {True: [], False: []}
  while todo and not (args.max_runs and count >= args.max_runs):
    name, count = todo[0], count + 1
    _log(f'[{count}/{count + len(todo) - 1}] {name} ...')
    body = base_run if is_base(name) else train_run
    record = body(grid, args.config, name, registry)
    registry.add(record)
    clean_up(grid, name)  # after the record: a kill in between leaves files, not a hole
    done[name] = record
    todo = _todo(grid, done, args.only)[1]  # a selection may have added runs
    if not (is_teacher(name) or is_base(name)):
      student_seconds[grid.on_validation(name)].append(record['wall_seconds'])
    _log(f'{name}: accuracy {record["accuracy"]:.3f} in {record["wall_seconds"]:.0f} s '
         f'(this invocation so far {(time.time() - started) / 60:.1f} min; '
         f'{_time_left(todo, student_seconds, grid.on_validation)})')


def run(args) -> None:
  grid = _grid(args)
  if grid.archived:
    raise SystemExit(f'{args.config} is archived: its records in {grid.folder} are re-scored '
                     '(rescore), never run again.')
  if not args.dry_run:
    _log(f'compilation cache: {use_compilation_cache(grid)}')
  registry = Registry(grid.directory)
  done = registry.records()
  _retrain_unexported_teachers(grid, done, args.only)
  names, todo = _todo(grid, done, args.only)
  if args.only and not names:
    raise SystemExit(f'--only {" ".join(args.only)} matches no run of {args.config}; run '
                     'names look like SETTING/METHOD/SEED (list them with --dry_run).')
  if not registry.path.exists() and not args.new_results:  # a grid's first invocation here
    _check_no_trained_runs(grid, names, registry, args.dry_run)
  cut = [n for n in names if n not in done and grid.cut(n)]
  _log(f'{len(names) - len(todo) - len(cut)} of {len(names)} runs recorded; {len(todo)} to go' +
       (f'; {len(cut)} cut by the grid, not run' if cut else '') + (
           ' (more appear as hyperparameters are selected)' if grid.tuned else ''))
  if args.dry_run:
    for name in todo[:args.max_runs] if args.max_runs else todo:
      print(' '.join(_train_command(args.config, name)) if not is_base(name)
            else f'(base evaluation) {name}')
    return
  _run_all(grid, args, registry, done, todo)


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
  """Every scored file of every record (a record without ``scored`` is one file: its
  ``predictions``) re-scored against its recorded accuracy."""
  registry = Registry(_grid(args).directory)
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


def write_report(args) -> None:
  grid = _grid(args)
  if grid.archived:
    raise SystemExit(f'{args.config} is archived: {grid.folder}/RESULTS.md is kept as written.')
  registry = Registry(grid.directory)
  output = pathlib.Path(args.output) if args.output else grid.directory / 'RESULTS.md'
  report.write(grid, registry, output, args.config, _todo(grid, registry.records(), None)[0])


def _grid(args) -> grids.Grid:
  return grids.load(args.config, args.results_dir)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  for command in ('run', 'report', 'rescore'):
    p = sub.add_parser(command)
    p.add_argument('--config', default=DEFAULT_CONFIG, help='a grid config (its GRID)')
    p.add_argument('--results_dir', default=None,
                   help="the folder of runs.jsonl, predictions/ and selection.json (default: "
                   "the grid's folder)")
    if command == 'run':
      p.add_argument('--only', nargs='*', help='glob patterns of run names (SETTING/METHOD/SEED)')
      p.add_argument('--max_runs', type=int, default=0, help='stop after this many runs')
      p.add_argument('--dry_run', action='store_true', help='print the commands only')
      p.add_argument('--new_results', action='store_true',
                     help='start a folder although planned runs are already trained')
    if command == 'report':
      p.add_argument('--output', default=None, help="default: the grid folder's RESULTS.md")
  args = parser.parse_args(argv)
  if args.command == 'run':
    from qtarget.train.errors import WorkdirLocked  # pylint: disable=g-import-not-at-top
    try:
      run(args)
    except WorkdirLocked as error:  # another runner, or a run it would write beside
      raise SystemExit(f'[compare] WorkdirLocked: {error}') from None
  elif args.command == 'rescore':
    sys.exit(rescore(args))
  else:
    write_report(args)


if __name__ == '__main__':
  main()
