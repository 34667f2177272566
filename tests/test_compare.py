"""The grids' runner (experiments.compare) and their records (experiments.records): the plan run
in order and resumed, teachers trained again when their export is gone, a moved folder refused,
every saved prediction re-scored, records written whole under a lock; and the paper's grid
(configs/qwen2p5_math_numina.py) end to end with a tiny random model."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

import availability
import xla_flags
from experiments import ROOT
from experiments import compare
from experiments import grids
from experiments import records
from experiments import report
from qtarget import config_files

needs_smollm2 = availability.needs_smollm2("the tiny grid uses SmolLM2's tokenizer")


def _run(capsys, *argv) -> list[str]:
  """``python -m experiments.compare ARGV`` in this process: its output lines."""
  compare.main([str(a) for a in argv])
  return capsys.readouterr().out.splitlines()


def _commands(lines) -> list[str]:
  """The run names a dry run prints (a training command's config string ends with the name)."""
  return [line.split(':')[-1] for line in lines if not line.startswith('[compare')]


_TEACHER_GRID = '''
import ml_collections

def get_config(name):
  if name.startswith('teacher/'):
    return ml_collections.ConfigDict({{'workdir': {teacher!r}}})
  return ml_collections.ConfigDict({{'workdir': {teacher!r} + '_student', 'prior': {{
      'source': 'hf', 'path': {teacher!r} + '/hf'}}}})

GRID = dict(folder={folder!r}, get_config=get_config,
            plan=lambda records, selection_file: ['teacher/t', 'base/t', 'clean/sft/0'],
            task_of=lambda name: 't', measurements=lambda name: {{'validation': False}})
'''


def test_teacher_without_export_is_trained_again_before_the_students(tmp_path, capsys):
  results = tmp_path / 'results'
  grid = tmp_path / 'grid.py'
  grid.write_text(_TEACHER_GRID.format(teacher=str(tmp_path / 'teacher'), folder=str(results)))
  results.mkdir()
  (results / 'runs.jsonl').write_text(''.join(
      json.dumps({'name': name}) + '\n' for name in ('teacher/t', 'base/t')))

  lines = _run(capsys, 'run', '--config', grid, '--dry_run')
  assert any('teacher/t has no export here; training it again' in line for line in lines)
  assert _commands(lines) == ['teacher/t', 'clean/sft/0']

  (tmp_path / 'teacher' / 'hf').mkdir(parents=True)  # the export is back: nothing to retrain
  lines = _run(capsys, 'run', '--config', grid, '--dry_run')
  assert not any('training it again' in line for line in lines)
  assert _commands(lines) == ['clean/sft/0']

  # Every student recorded, the export gone again (a fresh checkout of a finished grid): no run
  # still to go reads the teacher, so it is not trained again.
  (tmp_path / 'teacher' / 'hf').rmdir()
  records.write_json_lines(results / 'runs.jsonl', [{'name': 'clean/sft/0'}], append=True)
  lines = _run(capsys, 'run', '--config', grid, '--dry_run')
  assert any('no run still to go reads it, so it is not trained again' in line for line in lines)
  assert _commands(lines) == []


_BASE_AND_TEACHER_GRID = '''
import ml_collections

def get_config(name):
  if name.startswith('base/'):
    raise ValueError('Base has no training config here')
  return ml_collections.ConfigDict({{'workdir': {runs!r} + '/' + name.replace('/', '_')}})

GRID = dict(folder='unused', get_config=get_config,
            plan=lambda records, selection_file: ['teacher/t', 'base/t', 'clean/sft/0',
                                                  'noisy/sft/0'],
            task_of=lambda name: 't', measurements=lambda name: {{'validation': False}})
'''


def test_a_folder_missing_beside_trained_runs_is_refused(tmp_path, capsys):
  runs = tmp_path / 'runs'
  grid = tmp_path / 'grid.py'
  grid.write_text(_BASE_AND_TEACHER_GRID.format(runs=str(runs)))
  results = tmp_path / 'moved_results'
  run = lambda *argv: _run(capsys, 'run', '--config', grid, '--results_dir', results, *argv)
  warned = lambda lines: any('warning' in line for line in lines)

  assert not warned(run('--dry_run'))  # nothing trained yet: a new grid starts

  (runs / 'noisy_sft_0').mkdir(parents=True)
  (runs / 'noisy_sft_0' / 'summary.json').write_text('{}')  # trained, recorded, cleaned up
  with pytest.raises(SystemExit, match=r'1 planned run\(s\) were already trained \(e.g. '
                                       r'noisy/sft/0.*the 0 still exported.*the 1 whose'):
    run('--max_runs', '1')
  assert not (results / 'runs.jsonl').exists()
  assert warned(run('--dry_run'))
  assert not warned(run('--dry_run', '--only', 'clean/*'))  # only the runs asked for count
  assert not warned(run('--dry_run', '--new_results'))

  # A grid started here whose first run was cut off after training, before its record, resumes
  # without the check: runs.jsonl is created before anything trains (here the teacher's
  # training fails at once: its config is not a training config).
  with pytest.raises(RuntimeError, match='teacher/t failed'):
    run('--new_results', '--max_runs', '1')
  assert (results / 'runs.jsonl').read_text() == ''
  assert not warned(run('--dry_run'))


def test_configs_without_a_grid_or_archived_are_refused(tmp_path, capsys):
  with pytest.raises(SystemExit, match='declares no GRID: not a comparison grid'):
    _run(capsys, 'run', '--config', 'configs/tiny.py', '--dry_run')
  # The first grid's records are kept and re-scored; it is never run or reported again.
  with pytest.raises(SystemExit, match='is archived'):
    _run(capsys, 'run', '--config', 'configs/compare_smollm2.py', '--dry_run')
  with pytest.raises(SystemExit, match='RESULTS.md is kept as written'):
    _run(capsys, 'report', '--config', 'configs/compare_smollm2.py')
  bad = tmp_path / 'bad.py'
  bad.write_text("GRID = dict(folder='x', setings={})\n")
  with pytest.raises(SystemExit, match="unexpected keyword argument 'setings'"):
    grids.load(str(bad))
  bad.write_text("GRID = dict(folder='x', plan=list)\n")  # neither archived nor runnable
  with pytest.raises(SystemExit, match='lacks get_config, task_of, measurements'):
    grids.load(str(bad))


def test_every_grid_declares_its_own_folder_and_a_plan_the_trainer_can_run(tmp_path):
  declared = {}
  for path in sorted((ROOT / 'configs').glob('*.py')):
    if 'GRID' in vars(config_files.load_module(path)):
      declared[path.name] = grids.load(str(path.relative_to(ROOT)))
  assert set(declared) == {'compare_smollm2.py', 'compare2_smollm2.py', 'qwen2p5_math_numina.py'}
  # Two grids sharing a folder would mix their records and overwrite each other's report.
  folders = [grid.folder for grid in declared.values()]
  assert len(set(folders)) == len(folders) and all(f.startswith('experiments/') for f in folders)
  assert declared['compare_smollm2.py'].archived
  live = {name: grids.load(f'configs/{name}', tmp_path) for name, grid in declared.items()
          if not grid.archived}
  assert len({grid.runs_dir for grid in live.values()}) == len(live)
  for name, grid in live.items():
    assert set(grid.sections) <= set(report.SECTIONS), name
    plan = grid.plan({}, grid.selection_file)
    for run in plan:  # every planned run is a config in the grid's own runs directory
      assert grid.get_config(run).workdir.startswith(grid.runs_dir + '/'), run
      assert set(grid.measurements(run)) == {'validation', 'variants', 'sampled', 'calibration'}
      assert grid.task_of(run) in grid.tasks
  qwen = live['qwen2p5_math_numina.py']
  assert qwen.methods is not config_files.load_module(
      ROOT / 'configs' / 'compare_smollm2.py').METHODS
  assert {'sft', 'dft', 'distill', 'target_sft_eta0.5'} <= set(qwen.methods)


def test_time_left_counts_student_runs_at_their_median_only():
  todo = ['teacher/chain3', 'base/0', 'chain3_clean/sft/4', 'chain3_clean/dft/4']
  time_left = compare._time_left  # pylint: disable=protected-access
  assert 'after the first student run' in time_left(todo, {True: [], False: []})
  # Median of 200, 240 and 1000 s is 240 s; two student runs to go: 8 min, the teacher and Base
  # named apart (a mean over everything so far would be 480 s a run, 16 min).
  left = time_left(todo, {True: [], False: [200.0, 1000.0, 240.0]})
  assert left.startswith('about 8 min left for the 2 student runs')
  assert left.endswith('plus 2 teacher or Base run(s)')
  # Runs measured on validation go at their own median: sft/4 at 330 s, dft/4 at 240 s: 9.5 min.
  left = time_left(todo, {True: [330.0], False: [200.0, 1000.0, 240.0]},
                   on_validation=lambda name: name.endswith('sft/4'))
  assert left.startswith('about 10 min left for the 2 student runs')


def test_rescore_checks_every_scored_file_and_catches_a_changed_answer(tmp_path, capsys):
  # Real greedy answers of the pre-registered grid (chain_sum, scored with partial credit).
  source = ROOT / 'experiments' / 'grid2' / 'predictions' / 'base__chain3__test_greedy.jsonl'
  rows = [json.loads(line) for line in source.read_text().splitlines()[:12]]
  path = tmp_path / 'predictions' / 'a.jsonl'
  path.parent.mkdir()
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  accuracy = sum(r['score'] for r in rows) / len(rows)
  registry = records.Registry(tmp_path)
  registry.add({'name': 'chain3_clean/sft/0', 'scored': {'test_greedy': {
      'accuracy': accuracy, 'predictions': str(path)}}})
  registry.add({'name': 'teacher', 'accuracy': accuracy, 'predictions': str(path)})  # no scored
  args = argparse.Namespace(config='configs/compare2_smollm2.py', results_dir=str(tmp_path))
  assert compare.rescore(args) == 0
  assert capsys.readouterr().out.splitlines()[-1] == '0 mismatches'
  wrong = next(i for i, r in enumerate(rows) if r['score'] == 0)
  rows[wrong]['output'] = f"#### {rows[wrong]['gold']}"  # now right: the recorded score is not
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  assert compare.rescore(args) == 1
  assert capsys.readouterr().out.splitlines()[-1] == '2 mismatches'  # both records read it


def test_one_json_lines_reader_names_the_bad_line_and_recording_is_atomic(tmp_path):
  path = tmp_path / 'runs.jsonl'
  assert records.read_json_lines(path) == []  # no file yet
  path.write_text('{"name": "a"}\n\n{"name": "b"}\n')
  assert records.read_json_lines(path) == [{'name': 'a'}, {'name': 'b'}]  # blank line skipped
  path.write_text('{"name": "a"}\n{"name": "b", "acc\n')  # a torn last line
  with pytest.raises(ValueError, match=r'runs.jsonl, line 2, column 15: not JSON \(.*\)'):
    records.read_json_lines(path)
  path.write_text('{"name": "a"}\n[1, 2]\n')
  with pytest.raises(ValueError, match='line 2: expected a JSON object, got list'):
    records.read_json_lines(path)
  registry = records.Registry(tmp_path / 'results')
  assert registry.records() == {} and registry.lines() == []
  registry.add({'name': 'x/sft/0', 'accuracy': 0.1})
  registry.add({'name': 'x/sft/0', 'accuracy': 0.2})  # measured again: the last counts
  registry.add({'name': 'y/sft/0', 'accuracy': 0.3})
  assert registry.records() == {'x/sft/0': {'name': 'x/sft/0', 'accuracy': 0.2},
                                'y/sft/0': {'name': 'y/sft/0', 'accuracy': 0.3}}
  assert [r['accuracy'] for r in registry.lines()] == [0.1, 0.2, 0.3]
  assert records.superseded(registry.lines()) == [{'name': 'x/sft/0', 'accuracy': 0.1}]
  assert sorted(p.name for p in registry.dir.iterdir()) == ['runs.jsonl']  # no .partial left
  registry.path.write_text(registry.path.read_text().rstrip('\n'))  # written by hand, no newline
  registry.add({'name': 'z/sft/0'})
  assert [r['name'] for r in registry.lines()] == ['x/sft/0', 'x/sft/0', 'y/sft/0', 'z/sft/0']
  registry.path.write_text('\n{"accuracy": 0.1}\n')
  with pytest.raises(ValueError,
                     match=r'runs.jsonl, line 2: the record has no name \(it has accuracy\)'):
    registry.records()


def _python(script: str, *args) -> subprocess.Popen:
  """A Python process in the repository root (where ``experiments`` is importable)."""
  return subprocess.Popen([sys.executable, '-c', script, *args], cwd=ROOT)


def test_recording_a_run_is_atomic_and_two_writers_keep_both_records(tmp_path, monkeypatch):
  registry = records.Registry(tmp_path)
  registry.add({'name': 'a/sft/0'})
  before = registry.path.read_bytes()

  def killed(*args):
    raise KeyboardInterrupt('killed between writing and renaming')
  monkeypatch.setattr(records.os, 'replace', killed)
  with pytest.raises(KeyboardInterrupt):
    registry.add({'name': 'b/sft/0'})
  assert registry.path.read_bytes() == before  # the previous file, whole
  assert sorted(p.name for p in tmp_path.iterdir()) == ['runs.jsonl']  # its temporary removed
  monkeypatch.undo()
  stale = tmp_path / 'runs.jsonl.x.partial'  # left by a process killed outright
  stale.write_text('{"name": "torn')
  registry.add({'name': 'b/sft/0'})
  assert list(registry.records()) == ['a/sft/0', 'b/sft/0'] and stale.exists()
  assert oct(registry.path.stat().st_mode & 0o777) == '0o644'
  # Two processes recording at once into one directory both keep their records.
  script = ('import pathlib, sys; from experiments import records\n'
            f'r = records.Registry(pathlib.Path({str(tmp_path)!r}))\n'
            'for i in range(40): r.add({"name": sys.argv[1] + str(i), "pad": "x" * 5000})')
  writers = [_python(script, w) for w in ('p', 'q')]
  assert [w.wait(timeout=120) for w in writers] == [0, 0]
  assert len(registry.lines()) == 2 + 80


def test_read_change_write_under_one_lock_loses_no_concurrent_update(tmp_path):
  path = tmp_path / 'counts.jsonl'
  assert records.update_json_lines(path, lambda lines: None) is None and not path.exists()
  records.write_json_lines(path, [{'name': 'n', 'count': 0}])
  # Each process reads the count, waits, and writes it back one higher, 25 times: a read outside
  # the write's lock would let the two overwrite each other's increments. Both start once both
  # are ready (imports take longer than the 25 updates).
  script = ('import pathlib, sys, time; from experiments import records\n'
            f'ready = pathlib.Path({str(tmp_path)!r})\n'
            '(ready / ("ready" + sys.argv[1])).touch()\n'
            'while len(list(ready.glob("ready*"))) < 2: time.sleep(0.005)\n'
            'def bump(lines):\n  time.sleep(0.005)\n'
            '  return [dict(lines[-1], count=lines[-1]["count"] + 1)]\n'
            f'for _ in range(25): records.update_json_lines({str(path)!r}, bump, ("name",))')
  writers = [_python(script, str(i)) for i in range(2)]
  assert [w.wait(timeout=120) for w in writers] == [0, 0]
  assert records.read_json_lines(path) == [{'name': 'n', 'count': 50}]
  with pytest.raises(ValueError, match='counts.jsonl, line 1: the record has no other'):
    records.update_json_lines(path, lambda lines: lines, required=('other',))
  # A write inside a change would wait on its own lock: it raises, and the lock is released.
  with pytest.raises(RuntimeError, match='already locked by this process'):
    records.update_json_lines(path, lambda lines: records.write_json_lines(
        tmp_path / 'machines.jsonl', [{}]))
  records.write_json_lines(tmp_path / 'machines.jsonl', [{'since': 'x'}])
  assert records.read_json_lines(path) == [{'name': 'n', 'count': 50}]


_PAPER_GRID = '''
import dataclasses
from qtarget import config_files
paper = config_files.load_module({paper!r})

def get_config(name):
  config = paper.get_config(name)
  config.workdir = {runs!r} + '/' + name.replace('/', '_')
  tiny = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=1,
              num_heads=2, num_kv_heads=1, tie_word_embeddings=True)
  for model in (config.model, config.prior):
    model.path, model.architecture = '', dict(tiny)
    model.param_dtype = model.compute_dtype = 'float32'  # remat stays as the paper config sets it
  config.model.source = 'random'
  if config.prior.source != 'initial':
    config.prior.source = 'random'
  config.data.train_path, config.data.eval_path = {train!r}, {held_out!r}
  config.data.seq_len, config.data.data_dir = 256, {tfds!r}
  config.steps, config.batch_size, config.accum_steps = 2, 2, 1
  config.checkpoint.every, config.log_every = 1, 1
  config.optimizer.warmup_steps = 1
  config.loss_chunk_size = 64
  config.progress_bar = False
  return config

GRID = dict(paper.GRID, folder={folder!r}, runs_dir={runs!r}, get_config=get_config,
            tasks={{'numina': {{'max_new_tokens': 6}}}},
            measure=dict(paper.MEASURE, test_problems=4, sampled_problems=4, num_samples=2,
                         batch_size=8))
'''


def _numina_rows(count, offset=0):
  rows = []
  for i in range(offset, offset + count):
    solution = f'We add: {i} + {i} = {2 * i}. Halving gives $\\\\frac{{{2 * i}}}{{4}}$, so the '
    solution += f'answer is $\\\\boxed{{\\\\dfrac{{{i}}}{{2}}}}$.'
    rows.append({'source': 'synthetic', 'problem': f'What is half of {i}?',
                 'solution': solution,
                 'messages': [{'role': 'user', 'content': f'What is half of {i}?'},
                              {'role': 'assistant', 'content': solution}]})
  return rows


def _compare(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags.with_devices(1))
  return subprocess.run([sys.executable, '-m', 'experiments.compare', *map(str, args)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=900)


@needs_smollm2
@pytest.mark.slow  # the runner and the measurement end to end (a few minutes on 2 cores)
def test_paper_grid_runs_records_resumes_and_rescores(tmp_path):
  train = tmp_path / 'numina_cot.jsonl'
  train.write_text(''.join(json.dumps(r) + '\n' for r in _numina_rows(40)))
  held_out = tmp_path / 'math.jsonl'
  held_out.write_text(''.join(
      json.dumps({'problem': r['problem'], 'solution': r['solution'],
                  'answer': f'{i / 2:g}'}) + '\n'  # decimal gold vs \dfrac in the solutions
      for i, r in zip(range(100, 104), _numina_rows(4, offset=100))))
  results = tmp_path / 'results'
  grid = tmp_path / 'tiny_numina_grid.py'
  grid.write_text(_PAPER_GRID.format(paper=str(ROOT / 'configs' / 'qwen2p5_math_numina.py'),
                                     runs=str(tmp_path / 'runs'), train=str(train),
                                     held_out=str(held_out), tfds=str(tmp_path / 'tfds'),
                                     folder=str(results)))
  only = ['--only', 'base/*', 'numina/sft/0', 'numina/target_sft_eta0.5/0']

  # An interrupted cell: killed after its step-1 checkpoint (the step-2 checkpoint, the export
  # and the last metrics line removed from a full run), then the grid picks it up. (A run with
  # --config.steps=1 would not do: a resume refuses a changed step count.)
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags.with_devices(1))
  subprocess.run([sys.executable, '-m', 'qtarget.train',
                  f'--config={grid}:numina/target_sft_eta0.5/0', '--config.export_hf=False'],
                 cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
  cell = tmp_path / 'runs' / 'numina_target_sft_eta0.5_0'
  shutil.rmtree(cell / 'checkpoints' / '2')
  (cell / 'summary.json').unlink()
  metrics = cell / 'metrics.jsonl'
  metrics.write_text(''.join(line + '\n' for line in metrics.read_text().splitlines()
                             if json.loads(line)['step'] <= 1))
  first = _compare('run', '--config', grid, *only)
  assert first.returncode == 0, first.stdout + first.stderr
  assert '0 of 3 runs recorded' in first.stdout
  assert 'resumed from the checkpoint at step 1' in (cell / 'log.txt').read_text()

  runs = records.Registry(results).records()
  assert sorted(runs) == ['base/numina', 'numina/sft/0', 'numina/target_sft_eta0.5/0']
  for record in runs.values():
    assert set(record['scored']) == {'test_greedy', 'test_sampled'}
    assert record['calibration'] is None and record['fit'] is None  # no demonstrations to score
    sampled = [json.loads(line) for line in (ROOT / record['scored']['test_sampled'][
        'predictions']).read_text().splitlines()]
    assert len(sampled) == 4 * 2  # problems x samples
    assert all(p['run'] == record['name'] for p in sampled)
    assert sum(p['score'] for p in sampled) / 8 == pytest.approx(
        record['scored']['test_sampled']['accuracy'], abs=1e-12)
    assert record['wall_seconds'] > 0 and record['command']
  trained = runs['numina/target_sft_eta0.5/0']
  assert trained['config']['method'] == 'target_sft' and trained['config']['hparams'] == {
      'eta': 0.5}
  assert trained['final_metrics']['trust'] < 1.0  # Target-SFT's trust is p_y
  assert trained['cpu_seconds'] > 0  # trained and measured in child processes
  assert not (tmp_path / 'runs' / 'numina_sft_0' / 'checkpoints').exists()  # cleaned up
  assert not (tmp_path / 'runs' / 'numina_sft_0' / 'hf').exists()

  again = _compare('run', '--config', grid, *only)
  assert again.returncode == 0 and '3 of 3 runs recorded; 0 to go' in again.stdout
  rescored = _compare('rescore', '--config', grid)
  assert rescored.returncode == 0 and '0 mismatches' in rescored.stdout, rescored.stdout
  written = _compare('report', '--config', grid)
  assert written.returncode == 0, written.stderr
  text = (results / 'RESULTS.md').read_text()
  assert [line for line in text.splitlines() if line.startswith('## ')] == [
      '## Accuracy', '## Verdict: Target-SFT (target_sft_eta0.5) against each baseline',
      '## Runs']
  assert '| base (no training) |' in text and '| numina/sft/0 |' in text
