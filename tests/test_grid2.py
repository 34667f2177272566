"""The second grid (configs/compare2_smollm2.py): the pre-registered order, the selection rule
on validation (frozen, never reading test), and experiments/measure.py end to end with a tiny
random model."""

import json
import math
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

import availability
from qtarget import config_files

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def grid(tmp_path):
  module = config_files.load_module(ROOT / 'configs' / 'compare2_smollm2.py')
  module.selection_file = tmp_path / 'selection.json'
  return module


def _record(validation, test):
  return {'accuracy': test, 'scored': {'validation': {'accuracy': validation},
                                       'test_greedy': {'accuracy': test}}}


def test_plan_starts_with_teachers_and_base_then_primaries_seed_by_seed(grid):
  plan = grid.run_plan({})
  assert plan[:4] == ['teacher/chain3', 'teacher/products2', 'base/chain3', 'base/products2']
  primaries = [n for n in plan if n.split('/')[0] in grid.MAIN_SETTINGS and n.split('/')[1] in (
      *grid.PRIMARY_FIXED, *grid.TUNED['target_sft'])]
  seeds = [int(n.split('/')[2]) for n in primaries]
  assert seeds == sorted(seeds)  # seed by seed, every setting within a seed
  early = [n for n in primaries if int(n.split('/')[2]) in (0, 1)]
  late = [n for n in primaries if int(n.split('/')[2]) >= 2]
  assert len(early) == 2 * 6 * 6  # three fixed methods and three etas, six settings
  assert len(late) == 3 * 6 * 3 and not any('target_sft' in n for n in late)  # no selection yet
  weak = plan.index('teacher/chain3_weak')  # the prior-quality axis after the primaries
  assert plan.index(primaries[-1]) < weak
  assert plan[weak:weak + 6] == ['teacher/chain3_weak'] + [f'chain3_noisy_weak/distill/{s}'
                                                            for s in range(5)]
  secondaries = plan[weak + 6:]  # then the secondaries, last
  assert secondaries[0] == 'chain3_clean/label_smoothing_lam0.05/0'
  assert len(secondaries) == 6 * 3 * 2 * 2 and all(
      n.split('/')[1].split('_lam')[0] in ('label_smoothing', 'sft_kl', 'asft')
      for n in secondaries)
  assert len(plan) == len(set(plan))
  for name in plan:  # every planned name is a config
    assert grid.get_config(name).workdir


def test_selection_reads_validation_only_breaks_ties_to_the_first_and_is_frozen(grid):
  records = {}
  etas = grid.TUNED['target_sft']
  # Validation favours eta 1; test (reversed) would favour eta 0.25.
  for index, method in enumerate(etas):
    for seed in (0, 1):
      records[f'chain3_noisy/{method}/{seed}'] = _record(0.1 * index + 0.01 * seed,
                                                         0.9 - 0.1 * index)
  assert grid.select({k: v for k, v in records.items() if not k.endswith('/1')},
                     'chain3_noisy', 'target_sft') is None  # seed 1 missing: nothing yet
  chosen = grid.select(records, 'chain3_noisy', 'target_sft')
  assert chosen['selected'] == 'target_sft_eta1'
  assert chosen['validation_accuracy']['target_sft_eta1'] == pytest.approx([0.2, 0.21])
  plan = grid.run_plan(records)
  assert 'chain3_noisy/target_sft_eta1/2' in plan
  assert not any(n.startswith('chain3_noisy/target_sft_eta0.') and n.endswith(('/2', '/3'))
                 for n in plan)
  assert 'chain3_noisy_weak/target_sft_eta1/4' in plan  # the weak prior reuses its eta
  # Frozen: later records do not move it.
  records['chain3_noisy/target_sft_eta0.25/0'] = _record(1.0, 0.0)
  assert grid.select(records, 'chain3_noisy', 'target_sft')['selected'] == 'target_sft_eta1'
  assert json.loads(grid.selection_file.read_text())['chain3_noisy/target_sft'][
      'selected'] == 'target_sft_eta1'
  # A tie goes to the value listed first.
  tied = {f'chain3_clean/{m}/{s}': _record(0.5, 0.5) for m in etas for s in (0, 1)}
  assert grid.select(tied, 'chain3_clean', 'target_sft')['selected'] == etas[0]


def test_selection_counts_full_credit_only(grid, tmp_path):
  # Validation answers scored 1, 0.5 (reasoning-gym's partial credit), 0, 1: full credit 2 of 4.
  path = tmp_path / 'validation.jsonl'
  path.write_text(''.join(json.dumps({'score': s}) + '\n' for s in (1.0, 0.5, 0.0, 1.0)))
  assert grid.full_credit_accuracy({'accuracy': 0.625, 'predictions': str(path)}) == 0.5
  # eta 0.25's recorded (partial-credit) accuracy is the higher, its full-credit one the lower.
  partial = {'accuracy': 0.625, 'predictions': str(path)}
  records = {f'chain3_clean/target_sft_eta{eta}/{seed}': {'scored': {'validation': (
      partial if eta == '0.25' else {'accuracy': 0.55})}}
             for eta in ('0.25', '0.5', '1') for seed in (0, 1)}
  assert grid.select(records, 'chain3_clean', 'target_sft')['selected'] == 'target_sft_eta0.5'
  path.write_text(json.dumps({'score': 1.0}) + '\n' + json.dumps({'question': 'q1'}) + '\n')
  with pytest.raises(ValueError, match='validation.jsonl, line 2: the prediction has no score'):
    grid.full_credit_accuracy({'accuracy': 0.5, 'predictions': str(path)})


def test_measured_runs_and_what_they_get(grid):
  assert grid.measurements('chain3_clean/sft/0') == {
      'validation': False, 'variants': True, 'sampled': True}
  assert grid.measurements('chain3_clean/target_sft_eta0.5/1')['validation']
  assert not grid.measurements('chain3_clean/target_sft_eta0.5/3')['validation']  # selected
  assert not grid.measurements('chain3_clean/target_sft_eta0.5/3')['variants']
  config = grid.get_config('products2_multi/distill/1')
  assert config.data.rationale.variants == 2 and config.prior.source == 'hf'
  assert config.prior.path.endswith('teacher/products2/hf')
  assert grid.get_config('chain3_noisy_weak/distill/0').prior.path.endswith(
      'teacher/chain3_weak/hf')
  assert grid.get_config('teacher/chain3_weak').steps == 10
  with pytest.raises(ValueError, match='config string must be'):
    grid.get_config('teacher/unknown')


def test_variant_problems_that_cannot_avoid_the_seen_ones_are_refused():
  measure = _experiments_module('measure')
  one_digit = {'min_terms': 2, 'max_terms': 2, 'min_digits': 1, 'max_digits': 1}
  # The very problems it would draw count as seen.
  seen = {r['prompt'] for r in measure.variant_records('products', one_digit, 800, set())}
  with pytest.raises(ValueError, match=r'only 0 of 800 problems are not in the training or '
                                       r'test split; 100 were asked for'):
    measure.variant_records('products', one_digit, 100, seen)


@availability.needs_smollm2("the tiny model uses SmolLM2's tokenizer")
def test_measure_end_to_end_with_a_tiny_model(grid, tmp_path):
  sys.path.insert(0, str(ROOT / 'experiments'))
  try:
    import measure  # pylint: disable=g-import-not-at-top
    import compare  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)

  def get_config(name):
    config = grid.get_config(name)
    config.model.source = 'random'
    config.model.architecture = dict(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                     num_layers=1, num_heads=2, num_kv_heads=1,
                                     tie_word_embeddings=True)
    config.data.train_size, config.data.eval_size = 60, 6
    config.data.data_dir = str(tmp_path / 'tfds')
    return config

  tasks = {family: dict(spec, max_new_tokens=4,
                        harder=(*spec['harder'][:2], 4), easier=(*spec['easier'][:2], 4))
           for family, spec in grid.TASKS.items()}
  tiny_grid = types.SimpleNamespace(
      get_config=get_config, TASKS=tasks, task_family_of=grid.task_family_of,
      measurements=grid.measurements,
      MEASURE=dict(grid.MEASURE, test_problems=6, sampled_problems=2, num_samples=2,
                   validation_problems=5, variant_problems=3, calibration_examples=4,
                   fit_examples=5, batch_size=4))
  out = tmp_path / 'out'
  out.mkdir()
  result = measure.measure(tiny_grid, 'base/chain3', 'initial', out)
  scored = result['scored']
  assert set(scored) == {'test_greedy', 'test_sampled', 'validation', 'harder', 'easier'}
  read = lambda label: [json.loads(line) for line in
                        pathlib.Path(scored[label]['predictions']).read_text().splitlines()]
  for label, entry in scored.items():  # every recorded number re-scores from its predictions
    assert compare.rescore_file(pathlib.Path(entry['predictions'])) == pytest.approx(
        entry['accuracy'], abs=1e-12)
  assert len(read('test_greedy')) == 6 and len(read('test_sampled')) == 4
  config = get_config('base/chain3')
  from qtarget import train  # pylint: disable=g-import-not-at-top
  from qtarget.data import builders  # pylint: disable=g-import-not-at-top
  builder = train.dataset_builder(config)
  test = {r['prompt'] for r in builders.load_split(builder, 'test')}
  seen = test | {r['prompt'] for r in builders.load_split(builder, 'train')}
  assert not {p['question'] for p in read('validation')} & test
  for label in ('harder', 'easier'):
    assert len(read(label)) == 3 and not {p['question'] for p in read(label)} & seen
  assert '+' in read('harder')[0]['question']
  greedy = read('test_greedy')
  answered = [p for p in greedy if p['output']]
  assert answered and all(0 < p['confidence'] <= 1 for p in answered)
  assert all(p['confidence'] is None for p in greedy if not p['output'])
  # The confidence is the mean probability of the answer's own tokens, teacher-forced.
  from qtarget import calibration as calibration_lib  # pylint: disable=g-import-not-at-top
  model, tokenizer = train.load_model(config.model, seed=config.seed, with_lora=False)
  scores = calibration_lib.response_token_scores(
      model, tokenizer, [(answered[0]['question'], answered[0]['output'], None)])[0]
  assert answered[0]['confidence'] == pytest.approx(float(np.exp(scores.log_prob).mean()),
                                                    rel=1e-5)
  calibration = result['calibration']
  assert sum(b['count'] for b in calibration['bins']) == calibration['tokens'] > 0
  assert 0 <= calibration['ece'] <= 1 and calibration['held_out_nll'] > 0
  assert result['fit']['train_nll'] > 0 and result['fit']['examples'] == 5
  assert json.loads((out / 'measure.json').read_text())['accuracy'] == result['accuracy']
  assert 0 < result['cpu_seconds'] and 0 < result['seconds']


def _experiments_module(name):
  sys.path.insert(0, str(ROOT / 'experiments'))
  try:
    return __import__(name)
  finally:
    sys.path.pop(0)


def test_report_pairs_seeds_bootstraps_and_gives_verdicts(grid, tmp_path, monkeypatch):
  report2 = _experiments_module('report2')
  records2 = _experiments_module('records2')
  compare = _experiments_module('compare')
  questions = [f'q{i}' for i in range(20)]
  records = {}

  def add(name, right, step=1.0):
    path = tmp_path / (name.replace('/', '__') + '.jsonl')
    path.write_text(''.join(json.dumps({'question': q, 'score': float(i < right),
                                        'confidence': 0.9 if i < right else 0.5}) + '\n'
                            for i, q in enumerate(questions)))
    setting, method, seed = name.split('/')
    records[name] = {
        'name': name, 'setting': setting, 'method': method, 'seed': int(seed),
        'accuracy': right / 20, 'wall_seconds': 100.0, 'cpu_seconds': 720.0, 'command': 'x',
        'mean_step_seconds': step, 'mean_step_cpu_seconds': 2 * step,
        'scored': {'test_greedy': {'accuracy': right / 20, 'predictions': str(path)},
                   'validation': {'accuracy': 0.5, 'predictions': str(path)}},
        'calibration': {'ece': 0.1, 'held_out_nll': 1.0, 'bins': [
            {'lower': 0.8, 'count': 10, 'mean_confidence': 0.85, 'accuracy': 0.8}]},
        'fit': {'train_nll': 0.5}}

  for seed in range(5):
    add(f'chain3_clean/target_sft_eta0.5/{seed}', 15 + seed % 2, step=1.3)
    add(f'chain3_clean/sft/{seed}', 8 + seed % 3)  # clearly behind: a win for Target-SFT
    add(f'chain3_clean/dft/{seed}', 15 + (seed + 1) % 2)  # level: a tie
  # Power rows: chain3_noisy adds three seeds of a wider spread against SFT (and one distill
  # seed, which pairs with nothing).
  for seed, right in enumerate((10, 14, 12)):
    add(f'chain3_noisy/target_sft_eta0.5/{seed}', right)
    add(f'chain3_noisy/sft/{seed}', 10)
  add('chain3_noisy/distill/0', 10)
  win = records2.paired(records, 'chain3_clean', 'target_sft_eta0.5', 'sft')
  assert win['verdict'] == 'win' and win['seeds'] == [0, 1, 2, 3, 4]
  want = sum((15 + s % 2) - (8 + s % 3) for s in range(5)) / 5 / 20
  assert win['mean'] == pytest.approx(want)
  low, high = win['bootstrap']
  assert low < want < high and low > 0
  tie = records2.paired(records, 'chain3_clean', 'target_sft_eta0.5', 'dft')
  assert tie['verdict'] == 'tie' and tie['bootstrap'][0] < 0 < tie['bootstrap'][1]
  assert records2.paired(records, 'chain3_clean', 'target_sft_eta0.5', 'distill') is None

  grid.selection_file.write_text(json.dumps({'chain3_clean/target_sft': {
      'selected': 'target_sft_eta0.5'}}))
  # The report reads a real runs.jsonl once: its last line of a name counts, the one it replaced
  # is listed; no reproduction kept here.
  registry = compare.Registry(tmp_path / 'results')
  replaced = {**records['chain3_clean/sft/0'], 'accuracy': 0.95, 'finished': '2026-01-01 00:00'}
  stats = _experiments_module('stats')
  stats.write_json_lines(registry.path, [replaced] + list(records.values()))
  reproduce2 = _experiments_module('reproduce2')
  monkeypatch.setattr(reproduce2, 'DIRECTORY', str(tmp_path / 'no_reproductions'))
  output = tmp_path / 'RESULTS.md'
  args = types.SimpleNamespace(config='configs/compare2_smollm2.py', results_dir='results2')
  # Two runs still to go, one measured on validation: 2 x 100 s at the wall-time medians,
  # 2 x 720 / 2 s at the CPU-second ones.
  planned = list(records) + ['chain3_clean/target_sft_eta1/0', 'chain3_clean/sft/5']
  report2.write(grid, registry, output, args, planned)
  text = output.read_text()
  assert 'Records a later record of the same name replaced' in text
  assert '| chain3_clean/sft/0 | 95.0 | 2026-01-01 00:00 |' in text
  assert '| chain3_clean/sft/0 | 95.0 |' not in text.split('Records a later record')[0]
  assert 'Runs trained again' not in text
  assert 'the 2 planned runs still to go need about 0.1 h (primary 0.1 h)' in text
  assert 'the runs still to go need about 0.2 h' in text
  assert '| chain3_clean | 0.5 | **win** +' in text and '**tie**' in text
  assert '| target_sft_eta0.5 | 1.30 / 1.30 (5) |' in text  # step time relative to SFT
  # Power, in points. Against SFT: differences 35 35 25 40 30 (chain3_clean) and 0 20 10
  # (chain3_noisy), squared deviations 130 + 200 over 4 + 2 degrees of freedom: SD 7.42; at 5
  # seeds 2.776 * 7.42 / sqrt(5) = 9.2 and (2.776 + 0.941) * 7.42 / sqrt(5) = 12.3; at 3 seeds
  # 4.303 * 7.42 / sqrt(3) = 18.4 and (4.303 + 1.061) * 7.42 / sqrt(3) = 23.0. Against DFT:
  # -5 5 -5 5 -5, 120 over 4: SD 5.48.
  power = text[text.index('## Power'):text.index('## Accuracy')]
  assert '| chain3 | sft | 7.4 | 6 | 9.2 | 12.3 | 18.4 | 23.0 |' in power, power
  assert '| chain3 | dft | 5.5 | 4 | 6.8 | 9.1 | 13.6 | 17.0 |' in power, power
  assert '| distill |' not in power  # one shared seed: no spread
  assert 'Not estimable yet' in '\n'.join(report2._power(grid, {}))
  assert (tmp_path / 'grid2_eta.png').exists() and '![grid2_eta.png]' in text
  assert (tmp_path / 'grid2_calibration.png').exists()
  assert compare.is_teacher('teacher/chain3') and not compare.is_teacher('chain3/sft/0')


def test_student_t_quantiles_against_published_values():
  stats = _experiments_module('stats')
  # Published two-sided 95% values (any t table): df 1, 4, 11, 30.
  assert stats.t_975(1) == 12.706 and stats.t_975(4) == 2.776
  assert stats.t_975(11) == pytest.approx(2.201, abs=5e-4)  # beyond the module's table
  assert stats.t_975(30) == pytest.approx(2.042, abs=5e-4)
  assert stats.t_quantile(0.8, 4) == pytest.approx(0.941, abs=5e-4)
  mean, half = stats.mean_and_interval([0.0, 1.0])
  assert mean == 0.5 and half == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2))
  with pytest.raises(ValueError, match='at least 1 degree of freedom'):
    stats.t_quantile(0.975, 0)


def test_findings_pair_the_other_measurements_and_count_verdicts(grid, tmp_path):
  findings2 = _experiments_module('findings2')
  paired2 = _experiments_module('paired2')
  questions = [f'q{i}' for i in range(10)]
  records = {}

  def predictions(name, label, right):
    path = tmp_path / f"{name.replace('/', '__')}__{label}.jsonl"
    path.write_text(''.join(json.dumps({'question': q, 'score': float(i in right)}) + '\n'
                            for i, q in enumerate(questions)))
    return {'accuracy': len(right) / 10, 'predictions': str(path)}

  def add(name, right, cpu_step, ece, held_out_nll, train_nll, harder=None, easier=None):
    parts = name.split('/')
    scored = {'test_greedy': predictions(name, 'test_greedy', range(right))}
    for label, solved in (('harder', harder), ('easier', easier)):
      if solved is not None:
        scored[label] = predictions(name, label, solved)
    records[name] = {'name': name, 'method': parts[1], 'seed': int(parts[-1]) if len(parts) > 2
                     else 0, 'accuracy': right / 10, 'mean_step_cpu_seconds': cpu_step,
                     'scored': scored, 'calibration': {'ece': ece, 'held_out_nll': held_out_nll},
                     'fit': {'train_nll': train_nll}}

  # Base answers the harder problems 0 and the easier 0-4.
  add('base/chain3', 1, None, 0.2, 2.0, 2.0, harder={0}, easier={0, 1, 2, 3, 4})
  for seed, sft_step in enumerate((2.0, 2.5, 3.0)):
    first = seed < 2  # variants are measured for seeds 0-1
    # Target-SFT: harder {0, 1, 2} (fixes 2), easier {0, 1, 2, 5} (breaks 2, fixes 1): the
    # same easier accuracy as SFT's {0, 1, 2, 3} (breaks 1), with different problems.
    add(f'chain3_clean/target_sft_eta0.5/{seed}', 8, 3.0, 0.05, 0.3 - 0.01 * seed,
        0.2 + 0.01 * seed, harder={0, 1, 2} if first else None,
        easier={0, 1, 2, 5} if first else None)
    # SFT: harder {1, 2} (breaks 1, fixes 1).
    add(f'chain3_clean/sft/{seed}', 2 + seed, sft_step, 0.10, 0.7 - 0.01 * seed,
        0.5 + 0.01 * seed, harder={1, 2} if first else None,
        easier={0, 1, 2, 3} if first else None)
  add('chain3_clean/dft/0', 1, 2.0, 0.3, 0.1, 0.1)  # lowest NLL, lowest accuracy
  grid.selection_file.write_text(json.dumps({
      'chain3_clean/target_sft': {'selected': 'target_sft_eta0.5'},
      'chain3_noisy/target_sft': {'selected': 'target_sft_eta0.5'}}))

  # Step-time ratios 1.5, 1.2, 1.0: the geometric mean is 1.8^(1/3) = 1.2164 and the interval
  # is exp(mean log +- 4.303 x SD(log) / sqrt(3)).
  logs = [math.log(1.5), math.log(1.2), 0.0]
  mean_log = sum(logs) / 3
  sd_log = math.sqrt(sum((x - mean_log) ** 2 for x in logs) / 2)
  half_log = 4.303 * sd_log / math.sqrt(3)
  mean, (low, high), n = paired2.paired_measure(records, 'chain3_clean', 'target_sft_eta0.5',
                                                  'sft', 'step CPU s (ratio)')
  assert n == 3 and mean == pytest.approx(1.8 ** (1 / 3))
  assert (low, high) == pytest.approx((math.exp(mean_log - half_log),
                                       math.exp(mean_log + half_log)))
  assert low > 0
  assert paired2.paired_measure(records, 'chain3_clean', 'target_sft_eta0.5', 'sft',
                                  'ECE') == pytest.approx((-0.05, 0.0, 3))
  mean, half, n = paired2.paired_measure(records, 'chain3_clean', 'target_sft_eta0.5', 'sft',
                                           'harder (points)')  # seeds 0-1 only
  assert (n, mean, half) == (2, pytest.approx(10.0), 0.0)
  assert paired2.paired_measure(records, 'chain3_clean', 'target_sft_eta0.5', 'distill',
                                  'ECE')[2] == 0  # no such runs
  records['chain3_clean/dft/0']['calibration']['ece'] = math.nan
  assert paired2.paired_measure(records, 'chain3_clean', 'target_sft_eta0.5', 'dft',
                                  'ECE')[2] == 0  # a NaN is not a value
  records['chain3_clean/dft/0']['calibration']['ece'] = 0.3

  details = '\n'.join(paired2.details(grid, records))
  ratio = f'1.22 [{low:.2f}, {high:.2f}] (3)'
  # Held-out NLL: 0.3 - 0.01 s against 0.7 - 0.01 s; train NLL: 0.2 + 0.01 s against 0.5 + ...
  assert (f'| chain3_clean | sft | {ratio} | -0.050 ± 0.000 (3) | -0.400 ± 0.000 (3) | '
          '-0.300 ± 0.000 (3) | - | +10.0 ± 0.0 (2) | +0.0 ± 0.0 (2) |') in details, details
  # (no answer confidences in these prediction files: no answer ECE)
  # Against Base's 10 and 50 points: SFT +10 (broke 10, fixed 20) and -10 (broke 10, fixed 0);
  # Target-SFT +20 (broke 0, fixed 20) and -10 (broke 20, fixed 10).
  assert ('| chain3_clean | harder | 10.0 | +10.0 ± 0.0 (2); broke 10.0, fixed 20.0 | - | - | '
          '+20.0 ± 0.0 (2); broke 0.0, fixed 20.0 |') in details, details
  assert ('| chain3_clean | easier | 50.0 | -10.0 ± 0.0 (2); broke 10.0, fixed 0.0 | - | - | '
          '-10.0 ± 0.0 (2); broke 20.0, fixed 10.0 |') in details, details
  # Seven runs, seed by seed Target-SFT then SFT, then DFT. Accuracy 80 20 80 30 80 40 10: ranks
  # 6 2 6 3 6 4 1, deviations from the mean rank 4: 2 -2 2 -1 2 0 -3 (squares sum to 26).
  # Train NLL 0.20 0.50 0.21 0.51 0.22 0.52 0.10: ranks 2 5 3 6 4 7 1, deviations -2 1 -1 2 0 3
  # -3 (28); products -4 -2 -2 -2 0 0 9: Pearson on the ranks -1 / sqrt(26 x 28). Held-out NLL
  # 0.30 0.70 0.29 0.69 0.28 0.68 0.10: deviations 0 3 -1 2 -2 1 -3, products summing to -5.
  # Without DFT (six runs): accuracy ranks 5 1 5 2 5 3, train NLL ranks 1 4 2 5 3 6:
  # -11.5 / sqrt(15.5 x 17.5).
  with_dft = -1 / math.sqrt(26 * 28)
  held_out = -5 / math.sqrt(26 * 28)
  without_dft = -11.5 / math.sqrt(17.5 * 15.5)
  assert (f'| chain3_clean | 7 | {with_dft:+.2f} (7) | {held_out:+.2f} (7) | '
          f'{without_dft:+.2f} (6) |') in details, details
  assert paired2._spearman([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]) == 'undefined'

  planned = list(records) + ['chain3_clean/distill/0', 'chain3_clean/asft_lam0.05/0',
                             'chain3_noisy_weak/distill/0', 'teacher/chain3_weak']
  summary = '\n'.join(findings2.summary(grid, records, planned, []))
  # 60, 50, 40 points ahead: mean 50, half-width 4.303 x 10 / sqrt(3) = 24.8: a win. Seed 2
  # alone is one seed: nothing on the post-selection seeds yet.
  assert ('- Against sft: 1 win, 0 tie, 0 loss over 1 setting(s) with two or more seeds '
          '(chain3_clean (win +50.0)); none yet on seeds 2, 3, 4 alone.') in summary, summary
  assert '- Against dft' not in summary  # one seed
  assert 'Not run yet: 1 primary run(s), 2 prior-quality axis run(s); settings' in summary, summary
  assert ('- Cut by the budget (PREREGISTRATION change 26), never run: 1 secondary run(s) of '
          'label_smoothing, sft_kl, asft') in summary, summary
  assert 'With the weaker prior' not in summary
  assert 'No comparison has two paired seeds yet' in '\n'.join(findings2.summary(grid, {}, [], []))
  assert 'training longer than 20 steps (teachers: 10 or 100)' in summary

  # A tie whose bootstrap excludes 0, and the clean / noisy margin line: chain3_noisy, where
  # Target-SFT is ahead by 50 and 90 points (seed-level half-width 12.706 x 28.28 / sqrt(2) =
  # 254: a tie; a bootstrap draw at 0 needs seed 0 twice and none of its 5 differing problems,
  # about 1 in 4000).
  for seed, (ours, theirs) in enumerate(((6, 1), (10, 1))):
    add(f'chain3_noisy/target_sft_eta0.5/{seed}', ours, 3.0, 0.05, 0.3, 0.2)
    add(f'chain3_noisy/sft/{seed}', theirs, 2.0, 0.1, 0.7, 0.5)
  summary = '\n'.join(findings2.summary(grid, records, planned, []))
  assert ('- Against sft: 1 win, 1 tie, 0 loss over 2 setting(s) with two or more seeds '
          '(chain3_clean (win +50.0)); none yet on seeds 2, 3, 4 alone. The bootstrap interval '
          'over problems and seeds excludes 0 in chain3_noisy, but with so few seeds') in summary
  half = 12.706 * math.sqrt(800) / math.sqrt(2)
  assert (f'- chain3: the margin over SFT is +70.0 ± {half:.1f} (2 seeds) with noisy '
          'demonstrations and +50.0 ± 24.8 (3 seeds) with clean ones') in summary, summary
  assert 'Noisy minus clean: +20.0 points, 95% interval [' in summary  # 70 - 50
  assert "seeds taken as independent): no difference shown." in summary  # 2 seeds, wide
  # Cost: chain3_clean's geometric mean 1.22 (above), chain3_noisy's 3.0 / 2.0 = 1.5.
  assert "takes 1.22-1.50 times SFT's CPU seconds" in summary and '2 setting(s)' in summary
  assert 'is at the floor' not in summary
  for seed in (0, 1):
    add(f'products2_clean/sft/{seed}', 0, 2.0, 0.1, 0.7, 0.5)
  add('base/products2', 1, None, 0.2, 2.0, 2.0)
  summary = '\n'.join(findings2.summary(grid, records, planned, []))
  assert ('- products2 is at the floor: every one of its 2 trained runs scores 0.0-0.0% '
          '(Base 10.0%)') in summary, summary


def test_machines_listed_in_order_and_times_compared_on_one_machine(grid, tmp_path, monkeypatch):
  machines = _experiments_module('machines')
  paired2 = _experiments_module('paired2')
  report2 = _experiments_module('report2')
  cpuinfo = ('processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f sse\n'
             'processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512f sse\n')
  monkeypatch.setattr(machines.os, 'sched_getaffinity', lambda _: {0, 1}, raising=False)
  assert machines.describe(cpuinfo) == 'Some CPU, 2 cores, avx2 avx512f'
  path = tmp_path / 'machines.jsonl'
  monkeypatch.setattr(machines, 'describe', lambda: 'A, 2 cores, avx2')
  machines.record(path, '2026-01-01 00:00')
  assert machines.record(path, '2026-01-05 00:00')['since'] == '2026-01-01 00:00'  # the same
  monkeypatch.setattr(machines, 'describe', lambda: 'B, 2 cores, avx2 avx512f')
  machines.record(path, '2026-01-02 10:00')
  listed = machines.load(path)
  assert [m['cpu'] for m in listed] == ['A, 2 cores, avx2', 'B, 2 cores, avx2 avx512f']
  assert machines.machine_of({'finished': '2026-01-02 09:59'}, listed) == 'A, 2 cores, avx2'
  assert machines.machine_of({'finished': '2026-01-02 10:00'}, listed).startswith('B')
  assert machines.machine_of({'finished': '2025-12-31 23:00'}, listed) is None
  assert machines.machine_of({}, listed) is None

  # Seed 0's two runs ran on A, seed 1's Target-SFT on B but its SFT on A: only seed 0 pairs.
  records = {}
  for seed, (ours, theirs, machine) in enumerate(((3.0, 2.0, 'A'), (1.5, 2.0, 'B'))):
    for method, step in (('target_sft_eta1', ours), ('sft', theirs)):
      records[f'chain3_clean/{method}/{seed}'] = {
          'name': f'chain3_clean/{method}/{seed}', 'method': method, 'seed': seed,
          'mean_step_seconds': step, 'mean_step_cpu_seconds': step,
          'machine': machine if method != 'sft' else 'A'}
  assert paired2.paired_measure(records, 'chain3_clean', 'target_sft_eta1', 'sft',
                                  'step CPU s (ratio)')[0::2] == (1.5, 1)
  # The Cost table: Target-SFT seed 0 against SFT's mean on A (2.0): 1.5; seed 1 on B has no
  # SFT run there and is left out.
  cost = '\n'.join(report2._cost(grid, records))
  assert '| target_sft_eta1 | 1.50 / 1.50 (1) |' in cost, cost


def test_answer_reliability_pools_runs_into_confidence_deciles(tmp_path):
  plots2 = _experiments_module('plots2')
  path = tmp_path / 'p.jsonl'
  rows = ([{'confidence': 0.95, 'score': float(i < 15)} for i in range(20)] +  # 15 of 20 right
          [{'confidence': 0.5, 'score': 1.0}] * 5 +  # too few for a point
          [{'confidence': None, 'score': 1.0}] +  # no answer tokens: left out
          [{'confidence': 1.0, 'score': 0.01}])  # the top bin; a partial score is wrong
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  run = {'scored': {'test_greedy': {'predictions': str(path)}}}
  (confidence, right, count), = plots2._answer_reliability([run, {'scored': {}}])
  assert count == 21 and right == pytest.approx(15 / 21)
  assert confidence == pytest.approx((20 * 0.95 + 1.0) / 21)


def test_budget_rates_come_from_the_machine_the_grid_runs_on_now(grid):
  ledger2 = _experiments_module('ledger2')
  records = {}
  for seed, (machine, wall, finished) in enumerate((('A', 1000.0, '2026-01-01 10:00'),
                                                    ('B', 100.0, '2026-01-02 10:00'),
                                                    ('B', 120.0, '2026-01-02 10:10'),
                                                    ('B', 80.0, '2026-01-02 10:20'))):
    name = f'chain3_clean/sft/{seed}'
    records[name] = {'name': name, 'method': 'sft', 'seed': seed, 'wall_seconds': wall,
                     'machine': machine, 'finished': finished, 'accuracy': 0.5}
  text = '\n'.join(ledger2.status(grid, records, list(records) + ['chain3_clean/sft/9']))
  assert 'median on B, the machine the latest runs ran on' in text
  assert '100 s (3 runs) for the others' in text  # A's 1000 s left out
  del records['chain3_clean/sft/3']  # two runs on B: too few, every machine's runs count
  text = '\n'.join(ledger2.status(grid, records, list(records)))
  assert 'the machine the latest runs ran on' not in text and '(3 runs) for the others' in text


def test_pooled_over_settings_by_pairs_and_by_setting_means(grid):
  findings2 = _experiments_module('findings2')
  records = {}
  # chain3_clean: Target-SFT ahead by 10 and 20 points (seeds 0, 1); chain3_noisy: by 30
  # (seed 0; its seed 1 SFT run is missing, so it does not pair).
  for setting, gains in (('chain3_clean', (0.1, 0.2)), ('chain3_noisy', (0.3, None))):
    for seed, gain in enumerate(gains):
      records[f'{setting}/target_sft_eta1/{seed}'] = {
          'name': f'{setting}/target_sft_eta1/{seed}', 'seed': seed, 'accuracy': 0.5}
      if gain is not None:
        records[f'{setting}/sft/{seed}'] = {'name': f'{setting}/sft/{seed}', 'seed': seed,
                                            'accuracy': 0.5 - gain}
  grid.selection_file.write_text(json.dumps({f'{s}/target_sft': {'selected': 'target_sft_eta1'}
                                             for s in ('chain3_clean', 'chain3_noisy')}))
  result = findings2.pooled(grid, records, 'sft', ['chain3_clean', 'chain3_noisy'])
  assert (result['settings'], result['pairs']) == (2, 3)
  # Pairs 0.1 0.2 0.3: mean 0.2, SD 0.1, half-width 4.303 x 0.1 / sqrt(3).
  assert result['over_pairs'] == pytest.approx((0.2, 4.303 * 0.1 / math.sqrt(3)))
  # Setting means 0.15 and 0.3: mean 0.225, SD 0.075 x sqrt(2), half-width 12.706 x 0.075.
  assert result['over_settings'] == pytest.approx((0.225, 12.706 * 0.075))
  assert findings2.pooled(grid, records, 'sft', ['chain3_clean'], seeds_allowed=(2,)) is None
  table = '\n'.join(findings2._pooled_table(grid, records))
  assert '| chain3 | all | sft | 2 (3) | +20.0 ± 24.8 | +22.5 ± 95.3 |' in table, table


def test_report_counts_full_credit_and_lists_replaced_records(tmp_path):
  records2 = _experiments_module('records2')
  ledger2 = _experiments_module('ledger2')
  path = tmp_path / 'greedy.jsonl'
  path.write_text(''.join(json.dumps({'question': f'q{i}', 'score': s}) + '\n'
                          for i, s in enumerate((1.0, 0.5, 0.0, 1.0))))
  records = {'chain3_clean/sft/0': {'accuracy': 0.625, 'scored': {
      'test_greedy': {'accuracy': 0.625, 'predictions': str(path)},
      'harder': {'accuracy': 0.3}}}}  # no prediction file: kept
  records2.with_full_credit(records)
  records2.with_full_credit(records)  # twice: the same
  entry = records['chain3_clean/sft/0']
  assert entry['accuracy'] == 0.5 and entry['scored']['test_greedy']['recorded_accuracy'] == 0.625
  assert entry['scored']['harder'] == {'accuracy': 0.3}
  lines = [{'name': 'teacher/chain3', 'accuracy': 0.9}, {'name': 'base/chain3', 'accuracy': 0.1},
           {'name': 'teacher/chain3', 'accuracy': 0.91}]
  assert ledger2.superseded(lines) == [{'name': 'teacher/chain3', 'accuracy': 0.9}]
  assert ledger2.superseded(lines[:2]) == [] and ledger2.superseded([]) == []


def test_one_json_lines_reader_names_the_bad_line_and_recording_is_atomic(tmp_path):
  stats = _experiments_module('stats')
  compare = _experiments_module('compare')
  path = tmp_path / 'runs.jsonl'
  assert stats.read_json_lines(path) == []  # no file yet
  path.write_text('{"name": "a"}\n\n{"name": "b"}\n')
  assert stats.read_json_lines(path) == [{'name': 'a'}, {'name': 'b'}]  # blank line skipped
  path.write_text('{"name": "a"}\n{"name": "b", "acc\n')  # a torn last line
  with pytest.raises(ValueError, match=r'runs.jsonl, line 2, column 15: not JSON \(.*\)'):
    stats.read_json_lines(path)
  path.write_text('{"name": "a"}\n[1, 2]\n')
  with pytest.raises(ValueError, match='line 2: expected a JSON object, got list'):
    stats.read_json_lines(path)
  registry = compare.Registry(tmp_path / 'results')
  assert registry.records() == {} and registry.lines() == []
  registry.add({'name': 'x/sft/0', 'accuracy': 0.1})
  registry.add({'name': 'x/sft/0', 'accuracy': 0.2})  # measured again: the last counts
  registry.add({'name': 'y/sft/0', 'accuracy': 0.3})
  assert registry.records() == {'x/sft/0': {'name': 'x/sft/0', 'accuracy': 0.2},
                                'y/sft/0': {'name': 'y/sft/0', 'accuracy': 0.3}}
  assert [r['accuracy'] for r in registry.lines()] == [0.1, 0.2, 0.3]
  assert sorted(p.name for p in registry.dir.iterdir()) == ['runs.jsonl']  # no .partial left
  registry.path.write_text(registry.path.read_text().rstrip('\n'))  # written by hand, no newline
  registry.add({'name': 'z/sft/0'})
  assert [r['name'] for r in registry.lines()] == ['x/sft/0', 'x/sft/0', 'y/sft/0', 'z/sft/0']
  registry.path.write_text('\n{"accuracy": 0.1}\n')
  with pytest.raises(ValueError,
                     match=r'runs.jsonl, line 2: the record has no name \(it has accuracy\)'):
    registry.records()


def test_recording_a_run_is_atomic_and_two_writers_keep_both_records(tmp_path, monkeypatch):
  stats = _experiments_module('stats')
  compare = _experiments_module('compare')
  registry = compare.Registry(tmp_path)
  registry.add({'name': 'a/sft/0'})
  before = registry.path.read_bytes()

  def killed(*args):
    raise KeyboardInterrupt('killed between writing and renaming')
  monkeypatch.setattr(stats.os, 'replace', killed)
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
  script = (f'import sys; sys.path.insert(0, {str(ROOT / "experiments")!r}); import compare, '
            f'pathlib; r = compare.Registry(pathlib.Path({str(tmp_path)!r}))\n'
            'for i in range(40): r.add({"name": sys.argv[1] + str(i), "pad": "x" * 5000})')
  writers = [subprocess.Popen([sys.executable, '-c', script, w]) for w in ('p', 'q')]
  assert [w.wait(timeout=120) for w in writers] == [0, 0]
  assert len(registry.lines()) == 2 + 80


def test_read_change_write_under_one_lock_loses_no_concurrent_update(tmp_path):
  stats = _experiments_module('stats')
  path = tmp_path / 'counts.jsonl'
  assert stats.update_json_lines(path, lambda lines: None) is None and not path.exists()
  stats.write_json_lines(path, [{'name': 'n', 'count': 0}])
  # Each process reads the count, waits, and writes it back one higher, 25 times: a read outside
  # the write's lock would let the two overwrite each other's increments.
  # Both start once both are ready (imports take longer than the 25 updates).
  script = (f'import pathlib, sys, time; sys.path.insert(0, {str(ROOT / "experiments")!r})\n'
            f'import stats; ready = pathlib.Path({str(tmp_path)!r})\n'
            '(ready / ("ready" + sys.argv[1])).touch()\n'
            'while len(list(ready.glob("ready*"))) < 2: time.sleep(0.005)\n'
            'def bump(lines):\n  time.sleep(0.005)\n'
            '  return [dict(lines[-1], count=lines[-1]["count"] + 1)]\n'
            f'for _ in range(25): stats.update_json_lines({str(path)!r}, bump, ("name",))')
  writers = [subprocess.Popen([sys.executable, '-c', script, str(i)]) for i in range(2)]
  assert [w.wait(timeout=120) for w in writers] == [0, 0]
  assert stats.read_json_lines(path) == [{'name': 'n', 'count': 50}]
  with pytest.raises(ValueError, match='counts.jsonl, line 1: the record has no other'):
    stats.update_json_lines(path, lambda lines: lines, required=('other',))
  # A write inside a change would wait on its own lock: it raises, and the lock is released.
  with pytest.raises(RuntimeError, match='already locked by this process'):
    stats.update_json_lines(path, lambda lines: stats.write_json_lines(
        tmp_path / 'machines.jsonl', [{}]))
  stats.write_json_lines(tmp_path / 'machines.jsonl', [{'since': 'x'}])
  assert stats.read_json_lines(path) == [{'name': 'n', 'count': 50}]


def test_answer_calibration_and_the_paired_eta_table(grid, tmp_path):
  questions2 = _experiments_module('questions2')
  path = tmp_path / 'greedy.jsonl'
  # Confidences 0.95 (right), 0.95 (wrong), 0.55 (right, scored 1), 0.55 (partial credit: wrong),
  # and one answer without a confidence.
  rows = [(0.95, 1.0), (0.95, 0.0), (0.55, 1.0), (0.55, 0.5), (None, 1.0)]
  path.write_text(''.join(json.dumps({'confidence': c, 'score': s}) + '\n' for c, s in rows))
  result = questions2.answer_calibration({'scored': {'test_greedy': {'predictions': str(path)}}})
  # Both bins are half right: |0.5 - 0.95| and |0.5 - 0.55|, two answers each: ECE 0.25.
  assert result['count'] == 4 and result['ece'] == pytest.approx(0.25)
  assert result['brier'] == pytest.approx((0.05 ** 2 + 0.95 ** 2 + 0.45 ** 2 + 0.55 ** 2) / 4)
  assert questions2.answer_calibration({'scored': {}}) is None

  records = {}
  # chain3_clean, validation / test per seed: eta 0.25 at 0.5 / 0.6 and 0.4 / 0.5; eta 0.5 at
  # 0.6 / 0.7 both seeds; eta 1 at 0.55 / 0.65 and 0.45 / 0.55. DFT test 0.1 and 0.2.
  accuracies = {'target_sft_eta0.25': ((0.5, 0.6), (0.4, 0.5)),
                'target_sft_eta0.5': ((0.6, 0.7), (0.6, 0.7)),
                'target_sft_eta1': ((0.55, 0.65), (0.45, 0.55)), 'dft': ((None, 0.1), (None, 0.2))}
  for method, per_seed in accuracies.items():
    for seed, (validation, test) in enumerate(per_seed):
      scored = {'test_greedy': {'accuracy': test}}
      if validation is not None:
        scored['validation'] = {'accuracy': validation}
      records[f'chain3_clean/{method}/{seed}'] = {'seed': seed, 'scored': scored}
  grid.selection_file.write_text(json.dumps({'chain3_clean/target_sft': {
      'selected': 'target_sft_eta1'}}))
  table = '\n'.join(questions2.eta_table(grid, records))
  # 0.25 - 1: -5 and -5 (validation), -5 and -5 (test); 0.5 - 1: +5 and +15, +5 and +15
  # (mean 10, half-width 12.706 x 7.07 / sqrt(2) = 63.5); DFT - 1 on test: -55 and -35.
  # Best on test: 0.5 (70) against the selected 1 (60): 10 points lost.
  assert ('| chain3_clean | - / -45.0 ± 127.1 (2) | -5.0 ± 0.0 (2) / -5.0 ± 0.0 (2) | '
          '+10.0 ± 63.5 (2) / +10.0 ± 63.5 (2) | 1 | 0.5 | 10.0 |') in table, table
  assert '| chain3 (pooled) | - / -45.0 ± 127.1 (2) |' in table


def test_shared_record_helpers_cells_caches_and_degenerate_intervals(grid, tmp_path):
  records2 = _experiments_module('records2')
  # Interval cells: '-' for nothing, no interval for one value, a ratio's ends.
  assert records2.interval_cell(float('nan'), float('nan'), 0) == '-'
  assert records2.interval_cell(12.34, float('nan'), 1) == '12.3 (1)'
  assert records2.interval_cell(-1.25, 2.5, 3, '{:+.1f}') == '-1.2 ± 2.5 (3)'
  assert records2.interval_cell(1.2, (0.9, 1.6), 2, '{:.2f}') == '1.20 [0.90, 1.60] (2)'
  # Signed points: a mean that rounds to zero is +0.0, never -0.0; no interval for one value.
  stats = _experiments_module('stats')
  assert stats.signed_points(-0.0004, 0.013) == '+0.0 ± 1.3'
  assert stats.signed_points(-0.0123, float('nan')) == '-1.2'
  assert stats.measured_on_validation(grid, 'chain3_clean/target_sft_eta1/0')
  assert not stats.measured_on_validation(grid, 'chain3_clean/target_sft_eta1/2')
  assert not stats.measured_on_validation(object(), 'chain3_clean/target_sft_eta1/0')
  # Per-seed differences over the seeds both have, in seed order; only the allowed seeds.
  records = {f'chain3_clean/{m}/{s}': {'name': f'chain3_clean/{m}/{s}', 'seed': s,
                                        'accuracy': a}
             for m, values in (('target_sft_eta1', {0: 0.5, 1: 0.75, 3: 0.5}),
                               ('sft', {0: 0.25, 1: 0.5, 2: 0.5})) for s, a in values.items()}
  assert records2.seed_differences(records, 'chain3_clean', 'target_sft_eta1', 'sft') == [
      0.25, 0.25]
  assert records2.seed_differences(records, 'chain3_clean', 'target_sft_eta1', 'sft', (1,)) == [
      0.25]
  assert records2.zero_spread([0.25, 0.25]) and not records2.zero_spread([0.25])
  assert records2.zero_spread([0.1 + 0.2, 0.3]) and not records2.zero_spread([0.25, 0.5])
  # The weaker prior reads chain3_noisy's selection.
  grid.selection_file.write_text(json.dumps({'chain3_noisy/target_sft': {
      'selected': 'target_sft_eta1'}}))
  assert records2.tuned_from('chain3_noisy_weak') == 'chain3_noisy'
  assert records2.selected_method(grid, 'chain3_noisy_weak', 'target_sft') == 'target_sft_eta1'
  assert records2.selected_method(grid, 'chain3_clean', 'target_sft') is None
  # Answer confidences: read-only, and a rewritten file is read again.
  path = tmp_path / 'greedy.jsonl'
  record = {'scored': {'test_greedy': {'predictions': str(path)}}}
  path.write_text(json.dumps({'question': 'q0', 'score': 1.0, 'confidence': 0.9}) + '\n')
  confidence, right = records2.answer_confidences(record)
  assert confidence.tolist() == [0.9] and right.tolist() == [1.0]
  with pytest.raises(ValueError, match='read-only'):
    confidence[0] = 0.1
  path.write_text(''.join(json.dumps({'question': f'q{i}', 'score': s, 'confidence': c}) + '\n'
                          for i, (s, c) in enumerate(((0.5, 0.8), (0.0, None), (1.0, 0.6)))))
  confidence, right = records2.answer_confidences(record)
  assert confidence.tolist() == [0.8, 0.6] and right.tolist() == [0.0, 1.0]  # 0.5 is partial
  assert records2.answer_confidences({'scored': {}}) is None
  path.write_text(json.dumps({'question': 'q0'}) + '\n')  # a prediction without its score
  with pytest.raises(ValueError, match='greedy.jsonl, line 1: the prediction has no score'):
    records2.scores({'scored': {'test_greedy': {'predictions': str(path)}}})


def test_status_says_when_the_budget_is_spent_and_the_sweep_when_empty(grid):
  ledger2 = _experiments_module('ledger2')
  report2 = _experiments_module('report2')
  run = lambda name, hours: {'name': name, 'method': name.split('/')[1], 'accuracy': 0.5,
                             'wall_seconds': 3600 * hours}
  records = {n: run(n, 5) for n in ('chain3_clean/sft/0', 'chain3_clean/dft/0')}
  replaced = [run('teacher/chain3', 1.5)]
  text = '\n'.join(ledger2.status(grid, records, list(records), replaced))
  assert 'The budget is spent' not in text  # 11.5 h: within the budget
  records['chain3_clean/distill/0'] = run('chain3_clean/distill/0', 1)
  text = '\n'.join(ledger2.status(grid, records, list(records), replaced))
  assert ('**The budget is spent.** The 4 records of `runs.jsonl` (replaced teacher records '
          'included; a run interrupted and restarted counts only its finished attempt) took '
          "12.5 h of wall time, against the budget of about 12 h.") in text
  sweep = report2._sweep(grid, records)
  assert sweep[0].startswith('## The full sweep') and not any(l.startswith('|') for l in sweep)
  assert 'None: the secondaries were cut by the budget (see above).' in sweep
  grid.CUT_FAMILIES = ()
  assert 'None yet: the secondaries run last (see the budget above).' in report2._sweep(  # pylint: disable=protected-access
      grid, records)
  records['chain3_clean/asft_lam0.05/0'] = {
      **run('chain3_clean/asft_lam0.05/0', 0.1), 'seed': 0,
      'scored': {'validation': {'accuracy': 0.4}}}
  sweep = report2._sweep(grid, records)
  rows = [l for l in sweep if l.startswith('| chain3_clean |')]
  assert len(rows) == 1 and '40.0 / 50.0' in rows[0], sweep


def test_reproductions_compare_split_by_split(tmp_path, monkeypatch):
  reproduce2 = _experiments_module('reproduce2')
  monkeypatch.setattr(reproduce2, 'DIRECTORY', str(tmp_path))

  def record(name, splits, commit, machine, loss, prior=''):
    scored = {}
    for label, (outputs, scores) in splits.items():
      path = tmp_path / f'{commit}_{label}.jsonl'
      path.write_text(''.join(json.dumps({'question': f'q{i}', 'output': o, 'score': s}) + '\n'
                              for i, (o, s) in enumerate(zip(outputs, scores))))
      scored[label] = {'predictions': str(path)}
    return {'name': name, 'code': {'commit': commit}, 'machine': machine,
            'final_metrics': {'loss': loss}, 'scored': {**scored, 'harder': {'accuracy': 0.1}},
            'config': {'prior': {'source': 'hf' if prior else 'initial',
                                 'path': f'experiments/runs2/teacher/{prior}/hf' if prior else ''}}}

  name = 'chain3_clean/target_sft_eta1/0'
  # Test: full credit 2 of 4 both times (0.5 is partial credit), yet q1 became right and q2
  # wrong; q0, q3 the same text. Validation only in the original, easier only in the reproduction.
  original = record(name, {'test_greedy': (['1', '2', '3', '4'], [1.0, 0.5, 1.0, 0.0]),
                           'validation': (['1'], [1.0])}, 'aaaaaaa1', 'cpu A', 0.25, 'chain3')
  again = record(name, {'test_greedy': (['1', '7', '8', '4'], [1.0, 1.0, 0.0, 0.0]),
                        'easier': (['1'], [1.0])}, 'bbbbbbb2', 'cpu B', 0.5, 'chain3')
  (tmp_path / 'runs.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in (
      {**again, 'final_metrics': {'loss': 9.0}}, again,  # the last of a name counts
      {**again, 'name': 'chain3_clean/dft/0'})))  # no grid record
  matched = reproduce2.comparisons({name: original})
  assert [(a['name'], o is None) for a, o, _ in matched] == [(name, False),
                                                            ('chain3_clean/dft/0', True)]
  lines = reproduce2.section(matched)
  rows = [l for l in lines if l.startswith('| chain3')]
  assert rows == [
      f'| {name} | teacher/chain3 | test_greedy | `aaaaaaa`, cpu A | `bbbbbbb`, cpu B '
      '| 50.0 / 50.0 | 2 of 4 | 1 / 1 | 0.250000 / 0.500000 |',
      f'| {name} | teacher/chain3 | validation | `aaaaaaa`, cpu A | `bbbbbbb`, cpu B '
      '| not comparable: only the original has it | - | - | as above |',
      f'| {name} | teacher/chain3 | easier | `aaaaaaa`, cpu A | `bbbbbbb`, cpu B '
      '| not comparable: only the reproduction has it | - | - | as above |']
  assert lines[-2] == ("Kept but not in the grid's records, so not compared: "
                       'chain3_clean/dft/0.')
  assert reproduce2.summary_line(matched) == [
      '- Runs trained again elsewhere (another machine, its retrained teacher and a later '
      f'commit together; the section near the end): {name} (prior: teacher/chain3): 2 of 4 '
      'answers the same text over 1 splits, full credit changed on 2.']
  other = record(name, {'test_greedy': (['1', '2', '3'], [1.0, 1.0, 0.0])}, 'ccccccc3', None, 0.5)
  assert reproduce2.compare(original, other)[0] == {
      'label': 'test_greedy', 'problem': 'not scored on the same problems in the same order'}
  # Nothing kept: no section, no bullet; nothing comparable: no empty table.
  (tmp_path / 'runs.jsonl').write_text(json.dumps({**again, 'name': 'chain3_clean/dft/0'}) + '\n')
  lines = reproduce2.section(reproduce2.comparisons({name: original}))
  assert not any(l.startswith('|') for l in lines) and 'chain3_clean/dft/0' in lines[-2]
  monkeypatch.setattr(reproduce2, 'DIRECTORY', str(tmp_path / 'none'))
  assert reproduce2.comparisons({name: original}) == []
  assert reproduce2.section([]) == [] and reproduce2.summary_line([]) == []


def test_keep_copies_a_reproduction_and_names_the_machine(tmp_path, monkeypatch):
  reproduce2 = _experiments_module('reproduce2')
  monkeypatch.setattr(reproduce2, 'DIRECTORY', str(tmp_path / 'kept'))
  source = tmp_path / 'tree' / 'experiments' / 'results_check'
  (source / 'predictions').mkdir(parents=True)
  (source / 'predictions' / 'a__test_greedy.jsonl').write_text('{"question": "q", "score": 1}\n')
  entry = 'experiments/results_check/predictions/a__test_greedy.jsonl'
  (source / 'runs.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in (
      {'name': 'teacher/chain3'},
      {'name': 'chain3_clean/sft/0', 'predictions': entry,
       'scored': {'test_greedy': {'predictions': entry}}})))
  monkeypatch.setattr(reproduce2.machines, 'describe', lambda: 'cpu X')
  assert reproduce2.keep(source) == ['chain3_clean/sft/0']
  kept = [json.loads(l) for l in (tmp_path / 'kept' / 'runs.jsonl').read_text().splitlines()]
  moved = f'{tmp_path}/kept/predictions/a__test_greedy.jsonl'
  assert kept == [{'name': 'chain3_clean/sft/0', 'predictions': moved, 'machine': 'cpu X',
                   'scored': {'test_greedy': {'predictions': moved}}}]
  assert (tmp_path / 'kept' / 'predictions' / 'a__test_greedy.jsonl').exists()


def test_zero_spread_cells_are_marked_degenerate_wherever_they_appear(grid, tmp_path):
  report2 = _experiments_module('report2')
  findings2 = _experiments_module('findings2')
  records = {}

  def add(name, right):
    path = tmp_path / (name.replace('/', '__') + '.jsonl')
    path.write_text(''.join(json.dumps({'question': f'q{i}', 'score': float(i < right)}) + '\n'
                            for i in range(10)))
    setting, method, seed = name.split('/')
    records[name] = {'name': name, 'setting': setting, 'method': method, 'seed': int(seed),
                     'accuracy': right / 10,
                     'scored': {'test_greedy': {'accuracy': right / 10, 'predictions': str(path)}}}

  for seed, right in enumerate((5, 7)):  # Target-SFT 2 answers ahead on both seeds
    add(f'chain3_clean/target_sft_eta1/{seed}', right + 2)
    add(f'chain3_clean/sft/{seed}', right)
  grid.selection_file.write_text(json.dumps({'chain3_clean/target_sft': {
      'selected': 'target_sft_eta1'}}))
  table, compared = report2._verdict_table(grid, records)
  row = next(l for l in table if l.startswith('| chain3_clean |'))
  assert compared == 1
  assert ('**win** +20.0 ± 0.0 (zero spread: the interval is degenerate, not evidence)' in row)
  lines = findings2._verdict_lines(grid, records, ['chain3_clean'], 'Against')
  assert 'chain3_clean (win +20.0, zero spread: degenerate)' in lines[0], lines


def test_code_versions_say_which_files_of_the_runs_code_changed(tmp_path):
  ledger2 = _experiments_module('ledger2')
  git = lambda *args: subprocess.run(['git', *args], cwd=tmp_path, check=True,
                                     capture_output=True, text=True).stdout.strip()
  git('init', '-q')
  git('config', 'user.email', 't@t'), git('config', 'user.name', 't')
  (tmp_path / 'qtarget').mkdir()
  (tmp_path / 'qtarget' / 'losses.py').write_text('a = 1\n')
  (tmp_path / 'notes.md').write_text('x\n')
  git('add', '.'), git('commit', '-qm', 'one')
  first = git('rev-parse', 'HEAD')
  (tmp_path / 'notes.md').write_text('y\n')  # not the runs' code
  git('commit', '-qam', 'two')
  second = git('rev-parse', 'HEAD')
  (tmp_path / 'qtarget' / 'losses.py').write_text('a = 2\n')
  git('commit', '-qam', 'three')
  third = git('rev-parse', 'HEAD')
  code = lambda commit, dirty=False: {'commit': commit, 'dirty': dirty}
  records = [  # in file order, not time order: the table orders by first use
      {'finished': '2026-01-02 00:00', 'code': code(second), 'measure_code': code(third)},
      {'finished': '2026-01-01 00:00', 'code': code(first), 'measure_code': code(first)},
      {'finished': '2026-01-01 00:01', 'method': 'base', 'code': code(first)},  # measured only
      {'finished': '2026-01-03 00:00', 'code': code('f' * 40, dirty=True)},  # not in this repo;
      # no measure_code: measured in its training process, at its code
      {'finished': '2026-01-04 00:00', 'code': code(third), 'measure_code': code(third)}]
  rows = [l for l in ledger2.code_versions(records, tmp_path) if l.startswith('| `')]
  assert rows == [
      f'| `{first[:10]}` | 2026-01-01 00:00 | 1 / 2 | the first version | - |',
      f'| `{second[:10]}` | 2026-01-02 00:00 | 1 / 0 | none | - |',
      f'| `{third[:10]}` | 2026-01-02 00:00 | 1 / 2 | `qtarget/losses.py` | `{third[:7]}` |',
      '| `ffffffffff` | 2026-01-03 00:00 | 1 / 1 (1 with uncommitted changes) | unknown: git '
      'could not compare the two here | - |']
  assert ledger2.code_versions([{'finished': '-'}], tmp_path) == []


def test_the_weaker_prior_pairs_with_the_stronger_settings_runs(grid, tmp_path):
  report2 = _experiments_module('report2')
  prior2 = _experiments_module('prior2')
  questions = [f'q{i}' for i in range(10)]
  records = {'teacher/chain3': {'name': 'teacher/chain3', 'accuracy': 0.9},
             'teacher/chain3_weak': {'name': 'teacher/chain3_weak', 'accuracy': 0.5}}
  right = {  # problems right out of 10, seeds 0, 1, 2
      'chain3_noisy/sft': (4, 5, 6), 'chain3_noisy/distill': (7, 7, 8),
      'chain3_noisy/target_sft_eta1': (7, 8, 8), 'chain3_noisy_weak/distill': (3, 4, 4),
      'chain3_noisy_weak/target_sft_eta1': (6, 8, 8)}
  for run, counts in right.items():
    for seed, count in enumerate(counts):
      name = f'{run}/{seed}'
      path = tmp_path / f"{name.replace('/', '__')}.jsonl"
      path.write_text(''.join(json.dumps({'question': q, 'score': float(i < count)}) + '\n'
                              for i, q in enumerate(questions)))
      records[name] = {'name': name, 'method': run.split('/')[1], 'seed': seed,
                       'accuracy': count / 10,
                       'scored': {'test_greedy': {'accuracy': count / 10,
                                                  'predictions': str(path)}}}
  grid.selection_file.write_text(json.dumps(
      {'chain3_noisy/target_sft': {'selected': 'target_sft_eta1'}}))
  assert [grid.METHODS[m][2] for m in ('sft', 'dft', 'distill')] == [None, None, 'teacher']
  half = 100 * 4.303 * math.sqrt(1 / 300) / math.sqrt(3)  # three differences k, k, k +- 0.1
  table = '\n'.join(report2._verdict_table(grid, records)[0])  # pylint: disable=protected-access
  # Weak Target-SFT 6, 8, 8 against chain3_noisy's SFT 4, 5, 6 (SFT uses no prior): +2, +3, +2;
  # against its own setting's distillation 3, 4, 4: +3, +4, +4. DFT has no runs here.
  row = next(line for line in table.splitlines() if line.startswith('| chain3_noisy_weak |'))
  cells = row.split(' | ')
  assert cells[1] == "1 (chain3_noisy's)"
  assert cells[2].startswith(f'**win** +23.3 ± {half:.1f} [') and cells[2].endswith('(3)'), row
  assert cells[3] == '-' and cells[4].startswith(f'**win** +36.7 ± {half:.1f} ['), row

  section = '\n'.join(prior2.section(grid, records))
  assert ('`teacher/chain3` (100 steps, greedy test 90.0%), `teacher/chain3_weak` (10 steps, '
          'greedy test 50.0%)') in section, section
  # Weaker minus stronger: distillation -4, -3, -4 (lower); Target-SFT -1, 0, 0 (a tie).
  assert (f'| distill | 73.3 ± 14.3 (3) | 36.7 ± 14.3 (3) | **lower** -36.7 ± {half:.1f} ['
          in section), section
  assert (f'| target_sft_eta1 | 76.7 ± 14.3 (3) | 73.3 ± 28.7 (3) | **no difference shown** '
          f'-3.3 ± {half:.1f} [') in section, section
  # Against distillation: 0, +1, 0 with the stronger prior, +3, +4, +4 with the weaker: the
  # margin moves +3, +3, +4.
  assert (f'- Target-SFT minus distill: +3.3 ± {half:.1f} (3 seeds) with the stronger prior, '
          f'+36.7 ± {half:.1f} (3) with the weaker; the change, paired by seed: '
          f'+33.3 ± {half:.1f} (3 seeds: above 0), on seeds 2 alone +40.0 (1 seed) '
          '(above 0: Target-SFT loses less') in section, section
  assert "Seeds 0, 1 of chain3_noisy's Target-SFT are the runs its eta was selected on" in section
  # Against SFT (no prior): +3, +3, +2 with the stronger prior, +2, +3, +2 with the weaker.
  assert (f'- Target-SFT minus sft: +26.7 ± {half:.1f} (3 seeds) with the stronger prior, '
          f"+23.3 ± {half:.1f} (3) with the weaker (SFT uses no prior: the change is Target-SFT's "
          'own, in the table).') in section, section
  del records['chain3_noisy_weak/distill/0'], records['chain3_noisy_weak/target_sft_eta1/0']
  del records['chain3_noisy_weak/distill/1'], records['chain3_noisy_weak/distill/2']
  del records['chain3_noisy_weak/target_sft_eta1/1'], records['chain3_noisy_weak/target_sft_eta1/2']
  assert 'Not run yet' in '\n'.join(prior2.section(grid, records))


def test_cut_families_are_never_run_and_reported_as_cut(grid):
  compare = _experiments_module('compare')
  findings2 = _experiments_module('findings2')
  ledger2 = _experiments_module('ledger2')
  assert grid.CUT_FAMILIES == ('label_smoothing', 'sft_kl', 'asft')
  assert grid.is_cut('chain3_clean/asft_lam0.05/0') and not grid.is_cut('chain3_clean/sft/0')
  assert not grid.is_cut('teacher/chain3') and not grid.is_cut('chain3_clean/target_sft_eta1/2')
  names, todo = compare._todo(grid, {}, None)  # pylint: disable=protected-access
  secondaries = [n for n in names if grid.family(n.split('/')[1]) in grid.CUT_FAMILIES]
  assert len(secondaries) == 72 and not set(secondaries) & set(todo)  # in the plan, never run
  assert 'chain3_noisy_weak/distill/4' in todo and len(todo) == len(names) - 72
  records = {'teacher/chain3': {'name': 'teacher/chain3', 'method': 'teacher', 'seed': 0,
                                'accuracy': 0.9, 'wall_seconds': 600.0}}
  status = '\n'.join(ledger2.status(grid, records, names))
  assert f'1 of the {len(names)} runs planned so far are recorded and 72 are cut by the budget' \
      in status, status
  summary = '\n'.join(findings2.summary(grid, records, names, []))
  assert ('- Cut by the budget (PREREGISTRATION change 26), never run: 72 secondary run(s) of '
          'label_smoothing, sft_kl, asft') in summary, summary
  assert 'secondary' not in next(l for l in summary.splitlines() if l.startswith('- Not run yet'))
  assert summary.startswith('## What held, what did not, what is untested (so far)\n')
  finished = ['teacher/chain3'] + secondaries  # every run not cut is recorded: no '(so far)'
  assert findings2.summary(grid, records, finished, [])[0] == (
      '## What held, what did not, what is untested')
  student = {'name': 'chain3_clean/sft/0', 'method': 'sft', 'seed': 0, 'accuracy': 0.5,
             'wall_seconds': 250.0}
  status = '\n'.join(ledger2.status(grid, {**records, student['name']: student},
                                    finished + [student['name']]))
  assert 'No planned run is still to go; the 72 cut ones would need about' in status, status
  assert 'still to go need' not in status, status
  grid.CUT_FAMILIES = ()  # emptied: the secondaries are planned to run again
  assert len(compare._todo(grid, {}, None)[1]) == len(names)  # pylint: disable=protected-access


def test_summary_names_where_target_sft_differs_beyond_accuracy(grid):
  findings2 = _experiments_module('findings2')
  records = {}
  # Target-SFT minus SFT by seed: train NLL +0.30, +0.32, +0.34 (mean +0.32, half-width
  # 4.303 x 0.02 / sqrt(3) = 0.050: higher); ECE -0.01, +0.01, 0 (mean 0: no); held-out NLL
  # -0.1, -0.2, -0.3 (mean -0.2, half-width 0.248: no).
  for seed, (train, ece, held_out) in enumerate(((0.30, -0.01, -0.1), (0.32, 0.01, -0.2),
                                                 (0.34, 0.0, -0.3))):
    for method, sign in (('target_sft_eta0.5', 1), ('sft', 0)):
      name = f'chain3_clean/{method}/{seed}'
      records[name] = {'name': name, 'method': method, 'seed': seed, 'accuracy': 0.5,
                       'fit': {'train_nll': 1.0 + sign * train},
                       'calibration': {'ece': 0.1 + sign * ece,
                                       'held_out_nll': 1.0 + sign * held_out}}
  grid.selection_file.write_text(json.dumps(
      {'chain3_clean/target_sft': {'selected': 'target_sft_eta0.5'}}))
  # chain3_noisy: train and held-out NLL -0.30, -0.32, -0.34 (lower, half-width 0.050); ECE 0,
  # +0.1, 0 (no).
  for seed, held_out in enumerate((-0.30, -0.32, -0.34)):
    for method, sign in (('target_sft_eta0.5', 1), ('sft', 0)):
      name = f'chain3_noisy/{method}/{seed}'
      records[name] = {'name': name, 'method': method, 'seed': seed, 'accuracy': 0.5,
                       'fit': {'train_nll': 1.0 + sign * held_out},
                       'calibration': {'ece': 0.1, 'held_out_nll': 1.0 + sign * held_out}}
  records['chain3_noisy/target_sft_eta0.5/1']['calibration']['ece'] = 0.2
  grid.selection_file.write_text(json.dumps(
      {'chain3_clean/target_sft': {'selected': 'target_sft_eta0.5'},
       'chain3_noisy/target_sft': {'selected': 'target_sft_eta0.5'}}))
  lines = findings2._where_it_differs(grid, records)  # pylint: disable=protected-access
  assert lines[0].startswith('- Where Target-SFT differs beyond accuracy')
  # 6 comparisons: about 0.3 would exclude 0 by chance.
  assert lines[1:] == ['  - against sft (6 setting-by-measure comparisons, about 0.3 by chance): '
                       'train NLL: higher in chain3_clean (+0.320) and lower in chain3_noisy '
                       '(-0.320); held-out NLL: lower in chain3_noisy (-0.320).'], lines
  records = {n: r for n, r in records.items() if n.startswith('chain3_clean/')}
  for seed in range(3):
    records[f'chain3_clean/target_sft_eta0.5/{seed}']['fit']['train_nll'] = 1.1  # +0.1 each
  assert findings2._where_it_differs(grid, records)[1:] == [  # pylint: disable=protected-access
      '  - against sft (2 setting-by-measure comparisons, about 0.1 by chance): nowhere.']


def test_the_weaker_priors_stand_ins_are_shown_and_traced(grid):
  report2 = _experiments_module('report2')
  prior2 = _experiments_module('prior2')
  questions2 = _experiments_module('questions2')
  records = {}
  xeon, amd = 'Xeon', 'EPYC'

  def add(name, accuracy, commit, machine, cpu=1.0):
    records[name] = {'name': name, 'method': name.split('/')[1], 'seed': int(name[-1]),
                     'accuracy': accuracy, 'code': {'commit': commit}, 'machine': machine,
                     'mean_step_seconds': cpu, 'mean_step_cpu_seconds': cpu}

  # Seed 0's stand-ins ran at another commit and machine, seed 1's at the weak runs' own.
  for seed, (commit, machine) in enumerate((('old', amd), ('new', xeon))):
    add(f'chain3_noisy/sft/{seed}', 0.5, commit, machine, cpu=2.0)
    add(f'chain3_noisy/dft/{seed}', 0.3, commit, machine)
    add(f'chain3_noisy_weak/distill/{seed}', 0.6, 'new', xeon, cpu=3.0)
    add(f'chain3_noisy_weak/target_sft_eta1/{seed}', 0.6, 'new', xeon, cpu=3.0)
  add('chain3_noisy/dft/1', 0.3, 'new', amd)  # one stand-in on another machine: not the same
  assert report2._stand_in_provenance(grid, records) == (  # pylint: disable=protected-access
      'seed(s) 0, 1 at earlier commits or on other machines')
  add('chain3_noisy/dft/1', 0.3, 'new', xeon)
  assert report2._stand_in_provenance(grid, records) == (  # pylint: disable=protected-access
      "seed(s) 1 trained at the commit and on the machine (CPU model) of the weaker setting's "
      'runs of the same seed; seed(s) 0 at earlier commits or on other machines')
  grid.selection_file.write_text(json.dumps(
      {'chain3_noisy/target_sft': {'selected': 'target_sft_eta1'}}))
  accuracy = '\n'.join(report2._accuracy(grid, records))  # pylint: disable=protected-access
  sft_row = next(l for l in accuracy.splitlines() if l.startswith('| sft |')).split(' | ')
  assert sft_row[2] == '50.0 ± 0.0 (2)' and sft_row[-1] == "50.0 ± 0.0 (2) (chain3_noisy's) |"
  distill_row = next(l for l in accuracy.splitlines() if l.startswith('| distill |'))
  assert distill_row.endswith('| 60.0 ± 0.0 (2) |'), distill_row  # its own setting's runs
  # Cost: the weak distill runs (3.0 s) over chain3_noisy's SFT on the same machine (seed 1's,
  # 2.0 s): 1.50, from both runs (seed 0's SFT ran elsewhere, but seed 1's is the same machine).
  cost = '\n'.join(report2._cost(grid, records))  # pylint: disable=protected-access
  assert next(l for l in cost.splitlines() if l.startswith('| distill |')).endswith(
      '| 1.50 / 1.50 (2) |'), cost
  # A margin change that is the same in every seed is degenerate, not 'above 0'.
  assert prior2._change({0: 0.1, 1: 0.1, 2: 0.1}) == (  # pylint: disable=protected-access
      '+10.0 ± 0.0 (3 seeds: zero spread, degenerate, not evidence)')
  change = prior2._change  # pylint: disable=protected-access
  assert change({0: 0.1, 1: 0.2, 2: 0.15}).endswith('(3 seeds: above 0)')
  # An eta tying the selected one on test: the selected one is the best, nothing lost.
  for method in grid.TUNED['target_sft']:
    for seed in grid.SELECTION_SEEDS:
      records[f'chain3_clean/{method}/{seed}'] = {
          'seed': seed, 'scored': {'test_greedy': {'accuracy': 0.4}}}
  grid.selection_file.write_text(json.dumps(
      {'chain3_clean/target_sft': {'selected': 'target_sft_eta1'}}))
  assert questions2.selection_cost(grid, records, 'chain3_clean') == ('1', '1', 0.0)
  records['chain3_clean/target_sft_eta0.5/0']['scored']['test_greedy']['accuracy'] = 0.5
  assert questions2.selection_cost(grid, records, 'chain3_clean') == pytest.approx(
      ('1', '0.5', 0.05))
