"""experiments/compare.py end to end on the paper's grid (configs/qwen2p5_math_numina.py) with a
tiny random model and a tiny synthetic NuminaMath-CoT file: runs, records, resume, re-scoring,
the report, and the MATH-style scoring of boxed answers."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import pytest

import availability
import xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
needs_smollm2 = availability.needs_smollm2("the tiny grid uses SmolLM2's tokenizer")

_GRID = '''
from qtarget import config_files
paper = config_files.load_module({paper!r})
SETTINGS, METHODS, SEEDS, EVAL = paper.SETTINGS, paper.METHODS, (0,), dict(
    paper.EVAL, num_problems=4, num_samples=2, max_new_tokens=6, batch_size=8)

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
  config.eval.update(EVAL)
  config.progress_bar = False
  return config
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


def _compare(*args, results):
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags.with_devices(1))
  return subprocess.run([sys.executable, str(ROOT / 'experiments' / 'compare.py'), *args,
                         '--results_dir', str(results)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)


@needs_smollm2
@pytest.mark.slow  # the comparison tool end to end (90 s on 2 cores)
def test_paper_grid_runs_records_resumes_and_rescores(tmp_path):
  train = tmp_path / 'numina_cot.jsonl'
  train.write_text(''.join(json.dumps(r) + '\n' for r in _numina_rows(40)))
  held_out = tmp_path / 'math.jsonl'
  held_out.write_text(''.join(
      json.dumps({'problem': r['problem'], 'solution': r['solution'],
                  'answer': f'{i / 2:g}'}) + '\n'  # decimal gold vs \dfrac in the solutions
      for i, r in zip(range(100, 104), _numina_rows(4, offset=100))))
  grid = tmp_path / 'tiny_numina_grid.py'
  grid.write_text(_GRID.format(paper=str(ROOT / 'configs' / 'qwen2p5_math_numina.py'),
                               runs=str(tmp_path / 'runs'), train=str(train),
                               held_out=str(held_out), tfds=str(tmp_path / 'tfds')))
  results = tmp_path / 'results'
  only = ['--only', 'base/*', 'numina/sft/*', 'numina/target_sft_eta0.5/*']

  # An interrupted cell: killed after its step-1 checkpoint (the step-2 checkpoint, the export
  # and the last metrics line removed from a full run), then the grid picks it up. (A run with
  # --config.steps=1 would not do: a resume refuses a changed step count.)
  env = dict(os.environ, PYTHONPATH=str(ROOT),
             XLA_FLAGS=xla_flags.with_devices(1))
  subprocess.run([sys.executable, '-m', 'qtarget.train',
                  f'--config={grid}:numina/target_sft_eta0.5/0', '--config.eval.after=False',
                  '--config.export_hf=False'], cwd=ROOT, env=env, check=True,
                 capture_output=True, timeout=600)
  cell = tmp_path / 'runs' / 'numina_target_sft_eta0.5_0'
  shutil.rmtree(cell / 'checkpoints' / '2')
  (cell / 'summary.json').unlink()
  metrics = cell / 'metrics.jsonl'
  metrics.write_text(''.join(line + '\n' for line in metrics.read_text().splitlines()
                             if json.loads(line)['step'] <= 1))
  first = _compare('run', '--config', str(grid), *only, results=results)
  assert first.returncode == 0, first.stdout + first.stderr
  assert '0 of 3 runs recorded' in first.stdout
  log = (tmp_path / 'runs' / 'numina_target_sft_eta0.5_0' / 'log.txt').read_text()
  assert 'resumed from the checkpoint at step 1' in log

  runs = [json.loads(line) for line in (results / 'runs.jsonl').read_text().splitlines()]
  assert sorted(r['name'] for r in runs) == ['base/0', 'numina/sft/0', 'numina/target_sft_eta0.5/0']
  for record in runs:
    predictions = [json.loads(line) for line in (ROOT / record['predictions']).read_text()
                   .splitlines()]
    assert len(predictions) == 4 * 2  # problems x samples
    for p in predictions:
      assert {'task', 'question', 'gold', 'output', 'extracted', 'score', 'method', 'seed',
              'step', 'metadata', 'sample'} <= set(p)
    assert abs(sum(p['score'] for p in predictions) / 8 - record['accuracy']) < 1e-12
    assert record['wall_seconds'] > 0 and record['command']
    if record['name'] != 'base/0':  # trained in a child process: its CPU time is counted
      assert record['cpu_seconds'] > 0
  trained = next(r for r in runs if r['name'] == 'numina/target_sft_eta0.5/0')
  assert trained['config']['method'] == 'target_sft' and trained['config']['hparams'] == {'eta': 0.5}
  assert trained['final_metrics']['trust'] < 1.0  # Target-SFT's trust is p_y
  assert not (tmp_path / 'runs' / 'numina_sft_0' / 'checkpoints').exists()  # cleaned up
  assert (tmp_path / 'runs' / 'base' / 'seed0' / 'eval.json').exists()  # beside the results

  again = _compare('run', '--config', str(grid), *only, results=results)
  assert again.returncode == 0 and '3 of 3 runs recorded; 0 to go' in again.stdout

  rescored = _compare('rescore', '--config', str(grid), results=results)
  assert rescored.returncode == 0 and '0 mismatches' in rescored.stdout, rescored.stdout
  # A tampered score is caught.
  path = ROOT / runs[0]['predictions']
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  rows[0]['output'] = f"#### {rows[0]['gold']}" if rows[0]['score'] == 0 else 'no answer'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  assert _compare('rescore', '--config', str(grid), results=results).returncode == 1

  report = _compare('report', '--config', str(grid), '--output', str(tmp_path / 'R.md'),
                    results=results)
  assert report.returncode == 0, report.stderr
  text = (tmp_path / 'R.md').read_text()
  assert '| base (no training) |' in text and 'numina/sft/0' in text
  # Not the exploratory grid: plots named after the report, no exploratory discussion.
  assert (tmp_path / 'R_accuracy_vs_eta.png').exists() and '![R_accuracy_vs_eta.png]' in text
  assert 'Exploratory grid' not in text and '## Task selection' not in text


_TEACHER_GRID = '''
import ml_collections
SETTINGS, METHODS, SEEDS = {{'clean': {{}}}}, {{'sft': None}}, (0,)

def teacher_config():
  return ml_collections.ConfigDict({{'workdir': {teacher!r}}})

def get_config(name):
  if name == 'teacher':
    return teacher_config()
  return ml_collections.ConfigDict({{'workdir': {teacher!r} + '_student', 'prior': {{
      'source': 'hf', 'path': {teacher!r} + '/hf'}}}})
'''


def test_teacher_without_export_is_trained_again_before_the_students(tmp_path):
  grid = tmp_path / 'grid.py'
  grid.write_text(_TEACHER_GRID.format(teacher=str(tmp_path / 'teacher')))
  results = tmp_path / 'results'
  results.mkdir()
  (results / 'runs.jsonl').write_text(''.join(
      json.dumps({'name': name}) + '\n' for name in ('teacher', 'base/0')))

  planned = _compare('run', '--config', str(grid), '--dry_run', results=results)
  assert planned.returncode == 0, planned.stderr
  assert 'the recorded teacher has no export here; training it again' in planned.stdout
  commands = [line for line in planned.stdout.splitlines() if not line.startswith('[compare')]
  assert [c.split(':')[-1] for c in commands] == ['teacher', 'clean/sft/0']

  (tmp_path / 'teacher' / 'hf').mkdir(parents=True)  # the export is back: nothing to retrain
  planned = _compare('run', '--config', str(grid), '--dry_run', results=results)
  assert 'training it again' not in planned.stdout
  assert '2 of 3 runs recorded; 1 to go' in planned.stdout
  commands = [line for line in planned.stdout.splitlines() if not line.startswith('[compare')]
  assert [c.split(':')[-1] for c in commands] == ['clean/sft/0']

  # Every student recorded, the export gone again (a fresh checkout of a finished grid): no run
  # still to go reads the teacher, so it is not trained again.
  (tmp_path / 'teacher' / 'hf').rmdir()
  with open(results / 'runs.jsonl', 'a') as f:
    f.write(json.dumps({'name': 'clean/sft/0'}) + '\n')
  planned = _compare('run', '--config', str(grid), '--dry_run', results=results)
  assert 'no run still to go reads it, so it is not trained again' in planned.stdout
  assert '3 of 3 runs recorded; 0 to go' in planned.stdout, planned.stdout


_BASE_AND_TEACHER_GRID = '''
import ml_collections
SETTINGS, METHODS, SEEDS = {{'clean': {{}}, 'noisy': {{}}}}, {{'sft': None}}, (0,)

def teacher_config():
  return ml_collections.ConfigDict({{'workdir': {runs!r} + '/teacher'}})

def get_config(name):
  if name.startswith('base/'):
    raise ValueError('Base has no training config')  # as in the paper's grid
  return ml_collections.ConfigDict({{'workdir': {runs!r} + '/' + name.replace('/', '_')}})
'''


def test_a_results_directory_missing_beside_trained_runs_is_refused(tmp_path):
  runs = tmp_path / 'runs'
  grid = tmp_path / 'grid.py'
  grid.write_text(_BASE_AND_TEACHER_GRID.format(runs=str(runs)))
  results = tmp_path / 'moved_results'

  planned = _compare('run', '--config', str(grid), '--dry_run', results=results)
  assert planned.returncode == 0, planned.stderr  # nothing trained yet: a new grid starts
  assert 'warning' not in planned.stdout and '0 of 4 runs recorded; 4 to go' in planned.stdout

  (runs / 'noisy_sft_0').mkdir(parents=True)
  (runs / 'noisy_sft_0' / 'summary.json').write_text('{}')  # trained, recorded, cleaned up
  refused = _compare('run', '--config', str(grid), '--max_runs', '1', results=results)
  assert refused.returncode != 0 and not (results / 'runs.jsonl').exists()
  assert 'runs.jsonl does not exist, but 1 planned run(s) were already trained (e.g. ' \
         'noisy/sft/0' in refused.stderr, refused.stderr
  assert 'the 0 still exported again; the 1 whose checkpoints and export' in refused.stderr
  warned = _compare('run', '--config', str(grid), '--dry_run', results=results)
  assert warned.returncode == 0 and 'warning: ' in warned.stdout

  # Only the runs asked for count; --new_results goes on.
  elsewhere = _compare('run', '--config', str(grid), '--dry_run', '--only', 'clean/*',
                       results=results)
  assert elsewhere.returncode == 0 and 'warning' not in elsewhere.stdout
  anyway = _compare('run', '--config', str(grid), '--dry_run', '--new_results', results=results)
  assert anyway.returncode == 0 and 'warning' not in anyway.stdout

  # A grid started here whose first run was cut off after training, before its record, resumes
  # without the check: the first run creates runs.jsonl before it trains anything (here the
  # teacher's training fails at once: its config is not a training config).
  started = _compare('run', '--config', str(grid), '--new_results', '--max_runs', '1',
                     results=results)
  assert started.returncode != 0 and 'teacher' in started.stderr
  assert (results / 'runs.jsonl').read_text() == ''
  resumed = _compare('run', '--config', str(grid), '--dry_run', results=results)
  assert resumed.returncode == 0 and 'warning' not in resumed.stdout, resumed.stdout


def test_a_config_without_a_grid_is_refused(tmp_path):
  refused = _compare('run', '--config', str(ROOT / 'configs' / 'tiny.py'), '--dry_run',
                     results=tmp_path / 'results')
  assert refused.returncode != 0
  assert 'defines no SETTINGS: not a comparison grid' in refused.stderr


def test_paired_differences_match_seeds_and_count_wins():
  sys.path.insert(0, str(ROOT / 'experiments'))
  try:
    import report  # pylint: disable=g-import-not-at-top  (experiments/report.py)
  finally:
    sys.path.pop(0)
  grid = types.SimpleNamespace(
      SETTINGS={'clean': {}, 'noisy': {}}, SEEDS=(0, 1, 2),
      METHODS={'sft': ('sft', {}, None), 'distill': ('distill', {}, 'teacher'),
               'target_sft_eta0.5': ('target_sft', {'eta': 0.5}, 'teacher')})
  accuracy = {('clean', 'sft'): (0.50, 0.40, 0.60), ('clean', 'target_sft_eta0.5'): (0.55, 0.50, 0.55),
              ('clean', 'distill'): (0.70, 0.70, 0.70), ('noisy', 'sft'): (0.30, 0.30, None),
              ('noisy', 'target_sft_eta0.5'): (0.40, None, 0.90)}
  records = [{'setting': None, 'method': 'base', 'seed': 0, 'accuracy': 0.1}]
  for (setting, method), values in accuracy.items():
    records += [{'setting': setting, 'method': method, 'seed': seed, 'accuracy': value}
                for seed, value in enumerate(values) if value is not None]
  differences = report.paired_differences(grid, records)
  assert differences[('target_sft_eta0.5', 'sft', 'clean')] == pytest.approx([0.05, 0.10, -0.05])
  assert differences[('target_sft_eta0.5', 'sft', 'noisy')] == pytest.approx([0.10])  # seed 0 only
  assert differences[('target_sft_eta0.5', 'distill', 'noisy')] == []
  assert 'dft' not in {baseline for _, baseline, _ in differences}  # not in this grid
  table = '\n'.join(report._paired_table(grid, records))  # pylint: disable=protected-access
  # vs sft, clean: mean +3.3, t(2) half-width 4.303 * sd 7.64 / sqrt(3) = 19.0, ahead in 2 of 3;
  # vs distill, clean: -15, -20, -15: mean -16.7, 4.303 * 2.89 / sqrt(3) = 7.2.
  assert '| target_sft_eta0.5 | +3.3 ± 19.0 (2/3) | +10.0 (1/1) | -16.7 ± 7.2 (0/3) | - |' in table


def test_sample_shape_counts_closing_lines_steps_and_arithmetic():
  sys.path.insert(0, str(ROOT / 'experiments'))
  try:
    import report  # pylint: disable=g-import-not-at-top  (experiments/report.py)
  finally:
    sys.path.pop(0)
  chain = lambda terms: json.dumps({'metadata': {'source_dataset': 'chain_sum',
                                                 'num_terms': terms}})
  rows = [
      # 2 right steps and the closing line
      {'output': '7 + 5 = 12\n12 - 3 = 9\n#### 9', 'metadata': chain(3)},
      # 3 steps for 2 operations, one of them wrong (12 - 3 = 11), no closing line
      {'output': '7 + 5 = 12\n12 - 3 = 11\n11 + 5 = 16\n16 -', 'metadata': chain(3)},
      # prose: no steps at all
      {'output': 'The answer is 9.', 'metadata': chain(3)},
  ]
  shape = report.sample_shape(rows)
  assert shape == {'closing': pytest.approx(1 / 3), 'steps': pytest.approx(5 / 3),
                   'overlong': pytest.approx(1 / 3), 'step_accuracy': pytest.approx(4 / 5)}
  numina = [{'output': '\\boxed{2}', 'metadata': json.dumps({'metadata': {}})}]
  assert report.sample_shape(numina) is None


def test_every_grid_config_keeps_its_own_runs_records_and_report():
  from qtarget import config_files  # pylint: disable=g-import-not-at-top
  # Two grids sharing a results directory would mix their records (the second one's Base runs
  # skipped as recorded) and one report would overwrite the other's.
  grids = {}
  for path in sorted((ROOT / 'configs').glob('*.py')):
    module = config_files.load_module(path)
    if hasattr(module, 'SETTINGS') and hasattr(module, 'get_config'):
      grids[path.name] = tuple(getattr(module, k, None) for k in ('RUNS_DIR', 'RESULTS_DIR',
                                                                   'REPORT'))
  assert {'compare_smollm2.py', 'compare2_smollm2.py', 'qwen2p5_math_numina.py'} <= set(grids)
  for name, places in grids.items():
    assert None not in places, (name, places)
  for index in range(3):
    used = [places[index] for places in grids.values()]
    assert len(set(used)) == len(used), used
  qwen = config_files.load_module(ROOT / 'configs' / 'qwen2p5_math_numina.py')
  assert qwen.get_config('numina/sft/0').workdir.startswith(qwen.RUNS_DIR + '/')


def test_a_grid_naming_no_results_dir_or_report_is_refused_without_the_flag(tmp_path):
  grid = tmp_path / 'grid.py'
  grid.write_text("SETTINGS, METHODS, SEEDS = {'a': {}}, {'sft': None}, (0,)\n"
                  'def get_config(name):\n  raise AssertionError(name)\n')
  run = lambda *args: subprocess.run(
      [sys.executable, str(ROOT / 'experiments' / 'compare.py'), *args, '--config', str(grid)],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
      timeout=300)
  refused = run('rescore')
  assert refused.returncode != 0 and 'names no RESULTS_DIR: pass --results_dir' in refused.stderr
  refused = run('report', '--results_dir', str(tmp_path / 'results'))
  assert refused.returncode != 0 and 'names no REPORT: pass --output' in refused.stderr


def test_time_left_counts_student_runs_at_their_median_only():
  sys.path.insert(0, str(ROOT / 'experiments'))
  try:
    import compare  # pylint: disable=g-import-not-at-top  (experiments/compare.py)
  finally:
    sys.path.pop(0)
  todo = ['teacher/chain3', 'base/0', 'chain3_clean/sft/4', 'chain3_clean/dft/4']
  time_left = compare._time_left  # pylint: disable=protected-access
  assert 'after the first student run' in time_left(todo, {True: [], False: []})
  # Median of 200, 240 and 1000 s is 240 s; two student runs to go: 8 min, the teacher and Base
  # named apart (a mean over everything so far would be 480 s a run, 16 min).
  left = time_left(todo, {True: [], False: [200.0, 1000.0, 240.0]})
  assert left.startswith('about 8 min left for the 2 student runs planned'), left
  assert left.endswith('plus 2 teacher or Base run(s)'), left
  # Runs measured on validation go at their own median: sft/4 at 330 s, dft/4 at 240 s: 9.5 min.
  left = time_left(todo, {True: [330.0], False: [200.0, 1000.0, 240.0]},
                   on_validation=lambda name: name.endswith('sft/4'))
  assert left.startswith('about 10 min left for the 2 student runs planned'), left
  assert "at this invocation's medians of 4" in left, left
