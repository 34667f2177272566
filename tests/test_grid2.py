"""The pre-registered grid (configs/compare2_smollm2.py) and the numbers of its report: the plan
and its order, the selection rule (validation only, frozen), what experiments.measure records
with a tiny random model, and the tables of RESULTS.md computed from small synthetic records (the
numbers, verdicts and sections, not the wording)."""

import dataclasses
import json
import math
import pathlib
import subprocess

import numpy as np
import pytest

import availability
from experiments import compare
from experiments import findings
from experiments import grids
from experiments import ledger
from experiments import machines
from experiments import measure
from experiments import paired
from experiments import plots
from experiments import records
from experiments import report
from experiments import reproduce
from experiments import stats
from qtarget import config_files

ROOT = pathlib.Path(__file__).resolve().parent.parent
T4 = 4.303  # Student-t 97.5% quantiles at 2 and 1 degrees of freedom
T1 = 12.706


@pytest.fixture
def config():
  return config_files.load_module(ROOT / 'configs' / 'compare2_smollm2.py')


@pytest.fixture
def grid(tmp_path):
  """The pre-registered grid with its folder (selections, records) in tmp_path."""
  return grids.load('configs/compare2_smollm2.py', tmp_path)


def _select(grid, **chosen):
  """Freezes Target-SFT's selection in the given settings (setting=method)."""
  grid.selection_file.write_text(json.dumps(
      {f'{setting}/target_sft': {'selected': method} for setting, method in chosen.items()}))


def _write(path: pathlib.Path, right, problems=20, confidence=None, outputs=None) -> str:
  """A predictions file: question i is right (score 1) when i < right (an int) or i in right
  (a set); ``confidence(i, is_right)`` when given."""
  correct = (lambda i: i < right) if isinstance(right, int) else (lambda i: i in right)
  rows = []
  for i in range(problems):
    row = {'question': f'q{i}', 'score': float(correct(i))}
    if confidence:
      row['confidence'] = confidence(i, correct(i))
    if outputs:
      row['output'] = outputs[i]
    rows.append(row)
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


class Runs:
  """Synthetic records, their greedy test answers in prediction files under ``directory``."""

  def __init__(self, directory: pathlib.Path, problems=20):
    self.dir, self.problems, self.records = directory, problems, {}

  def add(self, name, right, confidence=None, variants=None, **fields):
    parts = name.split('/')
    stem = name.replace('/', '__')
    scored = {'test_greedy': {
        'accuracy': (right if isinstance(right, int) else len(right)) / self.problems,
        'predictions': _write(self.dir / f'{stem}.jsonl', right, self.problems, confidence)}}
    for label, solved in (variants or {}).items():
      scored[label] = {'accuracy': len(solved) / self.problems,
                       'predictions': _write(self.dir / f'{stem}__{label}.jsonl', solved,
                                             self.problems)}
    self.records[name] = {
        'name': name, 'setting': parts[0] if len(parts) == 3 else None, 'method': parts[1],
        'seed': int(parts[2]) if len(parts) == 3 else 0,
        'accuracy': scored['test_greedy']['accuracy'], 'scored': scored, **fields}
    return self.records[name]


def _rows(lines) -> list[list[str]]:
  """The cells of a markdown table's rows (header included, the separator left out)."""
  return [[cell.strip() for cell in line.strip().strip('|').split(' | ')] for line in lines
          if line.startswith('|') and not line.startswith('|---')]


def _row(lines, *first) -> list[str]:
  """The cells after ``first`` of the one row that starts with ``first``."""
  found = [r[len(first):] for r in _rows(lines) if tuple(r[:len(first)]) == first]
  assert len(found) == 1, (first, found)
  return found[0]


def _headings(lines) -> list[str]:
  return [line for line in lines if line.startswith('## ') or line.startswith('### ')]


def test_plan_starts_with_teachers_and_base_then_primaries_seed_by_seed(grid):
  plan = grid.plan({}, grid.selection_file)
  assert plan[:4] == ['teacher/chain3', 'teacher/products2', 'base/chain3', 'base/products2']
  primaries = [n for n in plan if n.split('/')[0] in grid.main_settings and n.split('/')[1] in (
      *grid.fixed, *grid.tuned['target_sft'])]
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
      grid.family(n.split('/')[1]) in ('label_smoothing', 'sft_kl', 'asft') for n in secondaries)
  assert len(plan) == len(set(plan))
  assert {grid.kind(n) for n in plan} == {'teachers and Base', 'primary', 'prior-quality axis',
                                          'secondary'}
  assert grid.kind('teacher/chain3_weak') == 'prior-quality axis'


def _validation_record(validation, test):
  return {'accuracy': test, 'scored': {'validation': {'accuracy': validation},
                                       'test_greedy': {'accuracy': test}}}


def test_selection_reads_validation_only_breaks_ties_to_the_first_and_is_frozen(grid, config):
  records_ = {}
  etas = grid.tuned['target_sft']
  # Validation favours eta 1; test (reversed) would favour eta 0.25.
  for index, method in enumerate(etas):
    for seed in (0, 1):
      records_[f'chain3_noisy/{method}/{seed}'] = _validation_record(0.1 * index + 0.01 * seed,
                                                                     0.9 - 0.1 * index)
  frozen = grid.selection_file
  assert config.select({k: v for k, v in records_.items() if not k.endswith('/1')},
                       'chain3_noisy', 'target_sft', frozen) is None  # seed 1 missing
  chosen = config.select(records_, 'chain3_noisy', 'target_sft', frozen)
  assert chosen['selected'] == 'target_sft_eta1'
  assert chosen['validation_accuracy']['target_sft_eta1'] == pytest.approx([0.2, 0.21])
  plan = grid.plan(records_, frozen)
  assert 'chain3_noisy/target_sft_eta1/2' in plan
  assert not any(n.startswith('chain3_noisy/target_sft_eta0.') and n.endswith(('/2', '/3'))
                 for n in plan)
  assert 'chain3_noisy_weak/target_sft_eta1/4' in plan  # the weak prior reuses its eta
  assert grid.selected('chain3_noisy_weak', 'target_sft') == 'target_sft_eta1'
  # Frozen: later records do not move it.
  records_['chain3_noisy/target_sft_eta0.25/0'] = _validation_record(1.0, 0.0)
  assert config.select(records_, 'chain3_noisy', 'target_sft', frozen)['selected'] == (
      'target_sft_eta1')
  assert json.loads(frozen.read_text())['chain3_noisy/target_sft']['selected'] == (
      'target_sft_eta1')
  # A tie goes to the value listed first.
  tied = {f'chain3_clean/{m}/{s}': _validation_record(0.5, 0.5) for m in etas for s in (0, 1)}
  assert config.select(tied, 'chain3_clean', 'target_sft', frozen)['selected'] == etas[0]


def test_selection_counts_full_credit_only(config, tmp_path):
  # Validation answers scored 1, 0.5 (reasoning-gym's partial credit), 0, 1: full credit 2 of 4.
  path = tmp_path / 'validation.jsonl'
  path.write_text(''.join(json.dumps({'score': s}) + '\n' for s in (1.0, 0.5, 0.0, 1.0)))
  assert config.full_credit_accuracy({'accuracy': 0.625, 'predictions': str(path)}) == 0.5
  # eta 0.25's recorded (partial-credit) accuracy is the higher, its full-credit one the lower.
  partial = {'accuracy': 0.625, 'predictions': str(path)}
  records_ = {f'chain3_clean/target_sft_eta{eta}/{seed}': {'scored': {'validation': (
      partial if eta == '0.25' else {'accuracy': 0.55})}}
              for eta in ('0.25', '0.5', '1') for seed in (0, 1)}
  chosen = config.select(records_, 'chain3_clean', 'target_sft', tmp_path / 'selection.json')
  assert chosen['selected'] == 'target_sft_eta0.5'
  path.write_text(json.dumps({'score': 1.0}) + '\n' + json.dumps({'question': 'q1'}) + '\n')
  with pytest.raises(ValueError, match='validation.jsonl, line 2: the prediction has no score'):
    config.full_credit_accuracy({'accuracy': 0.5, 'predictions': str(path)})


def test_measured_runs_and_what_they_get(grid):
  assert grid.measurements('chain3_clean/sft/0') == {
      'validation': False, 'variants': True, 'sampled': True, 'calibration': True}
  assert grid.on_validation('chain3_clean/target_sft_eta0.5/1')
  assert not grid.on_validation('chain3_clean/target_sft_eta0.5/3')  # after the selection
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
  one_digit = {'min_terms': 2, 'max_terms': 2, 'min_digits': 1, 'max_digits': 1}
  # The very problems it would draw count as seen.
  seen = {r['prompt'] for r in measure.variant_records('products', one_digit, 800, set())}
  with pytest.raises(ValueError, match=r'only 0 of 800 problems are not in the training or '
                                       r'test split; 100 were asked for'):
    measure.variant_records('products', one_digit, 100, seen)


@availability.needs_smollm2("the tiny model uses SmolLM2's tokenizer")
def test_measure_end_to_end_with_a_tiny_model(grid, tmp_path):
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
           for family, spec in grid.tasks.items()}
  tiny = dataclasses.replace(
      grid, get_config=get_config, tasks=tasks,
      measure=dict(grid.measure, test_problems=6, sampled_problems=2, num_samples=2,
                   validation_problems=5, variant_problems=3, calibration_examples=4,
                   fit_examples=5, batch_size=4))
  out = tmp_path / 'out'
  out.mkdir()
  result = measure.measure(tiny, 'base/chain3', 'initial', out)
  scored = result['scored']
  assert set(scored) == {'test_greedy', 'test_sampled', 'validation', 'harder', 'easier'}
  read = lambda label: [json.loads(line) for line in
                        pathlib.Path(scored[label]['predictions']).read_text().splitlines()]
  for entry in scored.values():  # every recorded number re-scores from its predictions
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


def _verdict_runs(tmp_path) -> Runs:
  """chain3_clean: Target-SFT (eta 0.5) 15-16 of 20 right, SFT 8-10 (behind: a win), DFT 15-16
  (level: a tie), five seeds; chain3_noisy: three seeds of a wider spread against SFT and one
  distillation seed that pairs with nothing."""
  runs = Runs(tmp_path)
  fields = lambda step: dict(wall_seconds=100.0, cpu_seconds=720.0, command='x',
                             mean_step_seconds=step, mean_step_cpu_seconds=2 * step,
                             calibration={'ece': 0.1, 'held_out_nll': 1.0, 'bins': [
                                 {'lower': 0.8, 'count': 10, 'mean_confidence': 0.85,
                                  'accuracy': 0.8}]}, fit={'train_nll': 0.5})
  confident = lambda i, right: 0.9 if right else 0.5
  for seed in range(5):
    for method, right, step in (('target_sft_eta0.5', 15 + seed % 2, 1.3),
                                ('sft', 8 + seed % 3, 1.0), ('dft', 15 + (seed + 1) % 2, 1.0)):
      record = runs.add(f'chain3_clean/{method}/{seed}', right, confident, **fields(step))
      record['scored']['validation'] = dict(record['scored']['test_greedy'], accuracy=0.5)
  for seed, right in enumerate((10, 14, 12)):
    runs.add(f'chain3_noisy/target_sft_eta0.5/{seed}', right, confident, **fields(1.0))
    runs.add(f'chain3_noisy/sft/{seed}', 10, confident, **fields(1.0))
  runs.add('chain3_noisy/distill/0', 10, confident, **fields(1.0))
  return runs


def test_verdicts_pair_seeds_and_bootstrap_over_seeds_and_problems(tmp_path):
  found = _verdict_runs(tmp_path).records
  win = paired.paired(found, 'chain3_clean', 'target_sft_eta0.5', 'sft')
  assert win['verdict'] == 'win' and win['seeds'] == [0, 1, 2, 3, 4] and win['ahead'] == 5
  want = sum((15 + s % 2) - (8 + s % 3) for s in range(5)) / 5 / 20
  assert win['mean'] == pytest.approx(want) and win['problems'] == 20
  low, high = win['bootstrap']
  assert 0 < low < want < high
  assert paired.paired(found, 'chain3_clean', 'target_sft_eta0.5', 'sft')['bootstrap'] == (
      low, high)  # seeded: the same differences give the same interval
  tie = paired.paired(found, 'chain3_clean', 'target_sft_eta0.5', 'dft')
  assert tie['verdict'] == 'tie' and tie['bootstrap'][0] < 0 < tie['bootstrap'][1]
  assert paired.paired(found, 'chain3_clean', 'target_sft_eta0.5', 'distill') is None
  one = paired.paired(found, 'chain3_noisy', 'target_sft_eta0.5', 'sft', seeds_allowed=(1,))
  assert one['verdict'] == 'n/a' and math.isnan(one['half'])


def test_report_has_its_declared_sections_and_their_numbers(grid, tmp_path, capsys):
  runs = _verdict_runs(tmp_path)
  _select(grid, chain3_clean='target_sft_eta0.5')
  # The report reads runs.jsonl once: the last line of a name counts, the one it replaced is
  # listed apart.
  registry = records.Registry(tmp_path / 'results')
  replaced = {**runs.records['chain3_clean/sft/0'], 'accuracy': 0.95,
              'finished': '2026-01-01 00:00'}
  records.write_json_lines(registry.path, [replaced] + list(runs.records.values()))
  # Two runs still to go, one measured on validation.
  planned = list(runs.records) + ['chain3_clean/target_sft_eta1/0', 'chain3_clean/sft/5']
  output = tmp_path / 'out' / 'RESULTS.md'
  report.write(grid, registry, output, 'configs/compare2_smollm2.py', planned)
  lines = output.read_text().splitlines()
  headings = _headings(lines)
  # Every declared section that has something to say, in the declared order; no reproduction
  # is kept in this folder, so that section is left out.
  assert [h.split(':')[0].split(' (')[0] for h in headings if h.startswith('## ')] == [
      '## Status and budget', '## Verdict', '## What held, what did not, what is untested',
      '## Pooled over settings', '## Power', '## Accuracy', '## The prior-quality axis',
      '## Sensitivity to eta', '## The full sweep of every tuned family', '## Cost',
      '## Calibration, fit and generalisation',
      '## The open questions', '## Plots', '## Runs']
  assert lines[0] == '# Method comparison: the pre-registered grid'
  verdicts = lines[lines.index(headings[1]):lines.index(headings[2])]
  sft, dft = _row(verdicts, 'chain3_clean', '0.5')[:2]
  # Target-SFT ahead by 35 35 25 40 30 points: mean 33, half-width 2.776 x sqrt(130 / 4) / sqrt(5).
  assert sft.startswith(f'**win** +33.0 ± {2.776 * math.sqrt(130 / 4) / math.sqrt(5):.1f} [')
  assert sft.endswith('(5)')
  assert dft.startswith('**tie** ') and dft.endswith('(5)')
  assert _row(verdicts, 'chain3_noisy', '(not selected yet)') == ['-'] * 6
  cost = report.cost(grid, runs.records)
  assert _row(cost, 'target_sft_eta0.5')[0] == '1.30 / 1.30 (5)'  # step time relative to SFT
  assert _row(lines, 'chain3_clean/sft/0', '95.0') == ['2026-01-01 00:00', '?', '-']  # replaced
  assert _row(lines, 'chain3_clean/sft/0', '40.0')[0] == '40.0'  # the record in force
  assert (output.parent / plots.ETA).exists() and (output.parent / plots.CALIBRATION).exists()
  # The status: 2 x 100 s to go at the wall-time medians, 2 x 720 / 2 s at the CPU ones.
  trained = list(runs.records.values())
  walls, cpus, machine = ledger.rates(grid, trained)
  assert machine is None and walls[True] == [100.0] * 4 and len(walls[False]) == 18
  missing = planned[-2:]
  assert ledger.hours_left(grid, walls, missing) == pytest.approx((200 / 3600,
                                                                   {'primary': 200 / 3600}))
  assert ledger.hours_left(grid, cpus, missing, per_run=2)[0] == pytest.approx(720 / 3600)
  assert 'wrote' in capsys.readouterr().out


def test_power_pools_the_seed_spread_of_a_task(grid, tmp_path):
  found = _verdict_runs(tmp_path).records
  # Against SFT: differences 35 35 25 40 30 (chain3_clean) and 0 20 10 (chain3_noisy), squared
  # deviations 130 + 200 over 4 + 2 degrees of freedom: SD 7.42 points. Against DFT: -5 5 -5 5
  # -5, 120 over 4: SD 5.48. Distillation shares one seed: no spread.
  rows = report.power_rows(grid, found)
  assert set(rows) == {('chain3', 'sft'), ('chain3', 'dft')}
  assert rows['chain3', 'sft'] == pytest.approx((math.sqrt(0.0330 / 6), 6))
  assert rows['chain3', 'dft'] == pytest.approx((math.sqrt(0.0120 / 4), 4))
  cells = _row(report.power(grid, found), 'chain3', 'sft')
  # At 5 seeds 2.776 x 7.42 / sqrt(5) = 9.2 and (2.776 + 0.941) x 7.42 / sqrt(5) = 12.3; at 3
  # seeds 4.303 x 7.42 / sqrt(3) = 18.4 and (4.303 + 1.061) x 7.42 / sqrt(3) = 23.0.
  assert cells == ['7.4', '6', '9.2', '12.3', '18.4', '23.0']
  assert not report.power_rows(grid, {})


def test_student_t_quantiles_against_published_values():
  # Published two-sided 95% values (any t table): df 1, 4, 11, 30.
  assert stats.t_975(1) == 12.706 and stats.t_975(4) == 2.776
  assert stats.t_975(11) == pytest.approx(2.201, abs=5e-4)  # beyond the module's table
  assert stats.t_975(30) == pytest.approx(2.042, abs=5e-4)
  assert stats.t_quantile(0.8, 4) == pytest.approx(0.941, abs=5e-4)
  mean, half = stats.mean_and_interval([0.0, 1.0])
  assert mean == 0.5 and half == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2))
  with pytest.raises(ValueError, match='at least 1 degree of freedom'):
    stats.t_quantile(0.975, 0)


def _measure_runs(tmp_path) -> Runs:
  """Base and three seeds of Target-SFT and SFT in chain3_clean on 10 problems, with step
  times, calibration, fit and (seeds 0-1) the variants; one DFT run."""
  runs = Runs(tmp_path, problems=10)

  def add(name, right, cpu_step, ece, held_out_nll, train_nll, harder=None, easier=None):
    variants = {k: v for k, v in (('harder', harder), ('easier', easier)) if v is not None}
    runs.add(name, right, variants=variants, mean_step_cpu_seconds=cpu_step,
             calibration={'ece': ece, 'held_out_nll': held_out_nll},
             fit={'train_nll': train_nll})

  # Base answers the harder problems {0} and the easier {0, ..., 4}.
  add('base/chain3', 1, None, 0.2, 2.0, 2.0, harder={0}, easier={0, 1, 2, 3, 4})
  for seed, sft_step in enumerate((2.0, 2.5, 3.0)):
    first = seed < 2  # variants are measured for seeds 0-1
    # Target-SFT: harder {0, 1, 2} (fixes 2), easier {0, 1, 2, 5} (breaks 2, fixes 1).
    add(f'chain3_clean/target_sft_eta0.5/{seed}', 8, 3.0, 0.05, 0.3 - 0.01 * seed,
        0.2 + 0.01 * seed, harder={0, 1, 2} if first else None,
        easier={0, 1, 2, 5} if first else None)
    # SFT: harder {1, 2} (breaks 1, fixes 1), easier {0, 1, 2, 3} (breaks 1).
    add(f'chain3_clean/sft/{seed}', 2 + seed, sft_step, 0.10, 0.7 - 0.01 * seed,
        0.5 + 0.01 * seed, harder={1, 2} if first else None,
        easier={0, 1, 2, 3} if first else None)
  add('chain3_clean/dft/0', 1, 2.0, 0.3, 0.1, 0.1)  # lowest NLL, lowest accuracy
  return runs


def test_the_other_measurements_are_paired_by_seed(grid, tmp_path):
  found = _measure_runs(tmp_path).records
  _select(grid, chain3_clean='target_sft_eta0.5', chain3_noisy='target_sft_eta0.5')
  measured = lambda baseline, measure_: paired.paired_measure(
      found, 'chain3_clean', 'target_sft_eta0.5', baseline, measure_)
  # Step-time ratios 1.5, 1.2, 1.0: the geometric mean is 1.8^(1/3) and the interval is
  # exp(mean log ± 4.303 x SD(log) / sqrt(3)), never below 0.
  logs = [math.log(1.5), math.log(1.2), 0.0]
  mean_log = sum(logs) / 3
  half_log = T4 * math.sqrt(sum((x - mean_log) ** 2 for x in logs) / 2) / math.sqrt(3)
  mean, (low, high), n = measured('sft', 'step CPU s (ratio)')
  assert n == 3 and mean == pytest.approx(1.8 ** (1 / 3))
  assert (low, high) == pytest.approx((math.exp(mean_log - half_log),
                                       math.exp(mean_log + half_log)))
  assert measured('sft', 'ECE') == pytest.approx((-0.05, 0.0, 3))
  assert measured('sft', 'held-out NLL') == pytest.approx((-0.4, 0.0, 3))
  assert measured('sft', 'harder (points)') == pytest.approx((10.0, 0.0, 2))  # seeds 0-1 only
  assert measured('distill', 'ECE')[2] == 0  # no such runs
  found['chain3_clean/dft/0']['calibration']['ece'] = math.nan
  assert measured('dft', 'ECE')[2] == 0  # a NaN is not a value
  # Against Base on the variants: SFT's harder {1, 2} broke 1 of 10 and fixed 2; Target-SFT's
  # easier {0, 1, 2, 5} broke 2 and fixed 1.
  base = found['base/chain3']
  assert paired.broken_and_fixed(base, found['chain3_clean/sft/0'], 'harder') == (0.1, 0.2)
  assert paired.broken_and_fixed(
      base, found['chain3_clean/target_sft_eta0.5/1'], 'easier') == (0.2, 0.1)
  lines = paired.open_questions(grid, found)
  assert _row(lines, 'chain3_clean', 'sft')[0] == f'1.22 [{low:.2f}, {high:.2f}] (3)'
  assert _row(lines, 'chain3_clean', 'sft')[5:] == ['+10.0 ± 0.0 (2)', '+0.0 ± 0.0 (2)']
  harder = _row(lines, 'chain3_clean', 'harder')
  assert harder[0] == '10.0'  # Base's
  assert harder[1] == '+10.0 ± 0.0 (2); broke 10.0, fixed 20.0'  # SFT
  assert harder[4] == '+20.0 ± 0.0 (2); broke 0.0, fixed 20.0'  # Target-SFT
  assert _row(lines, 'chain3_clean', 'easier')[4] == '-10.0 ± 0.0 (2); broke 20.0, fixed 10.0'
  # Seven runs, seed by seed Target-SFT then SFT, then DFT: accuracy ranks 6 2 6 3 6 4 1 against
  # train NLL ranks 2 5 3 6 4 7 1 (Pearson on the ranks -1 / sqrt(26 x 28)) and held-out NLL
  # (-5 / sqrt(26 x 28)); without DFT -11.5 / sqrt(15.5 x 17.5).
  assert _row(lines, 'chain3_clean', '7') == [
      f'{-1 / math.sqrt(26 * 28):+.2f} (7)', f'{-5 / math.sqrt(26 * 28):+.2f} (7)',
      f'{-11.5 / math.sqrt(15.5 * 17.5):+.2f} (6)']
  assert stats.spearman([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]) == 'undefined'
  assert stats.spearman([1.0, 2.0], [0.1, 0.2]) == '-'


def test_the_summary_counts_verdicts_margins_and_what_is_not_run(grid, tmp_path):
  runs = _measure_runs(tmp_path)
  found = runs.records
  _select(grid, chain3_clean='target_sft_eta0.5', chain3_noisy='target_sft_eta0.5')
  # chain3_clean: 60, 50, 40 points ahead of SFT: a win; DFT shares one seed: not counted.
  counts = findings.verdict_counts(grid, found, ['chain3_clean'])
  assert list(counts) == ['sft'] and list(counts['sft']) == ['win']
  assert counts['sft']['win'][0][1]['mean'] == pytest.approx(0.5)
  assert not findings.verdict_counts(grid, found, ['chain3_clean'], seeds_allowed=(2, 3, 4))
  planned = list(found) + ['chain3_clean/distill/0', 'chain3_clean/asft_lam0.05/0',
                           'chain3_noisy_weak/distill/0', 'teacher/chain3_weak']
  missing, cut = findings.not_run(grid, found, planned)
  assert missing == {'primary': 1, 'prior-quality axis': 2} and cut == {'secondary': 1}
  assert findings.noise_margins(grid, found, 'chain3') is None  # no noisy runs yet
  # chain3_noisy: Target-SFT ahead by 50 and 90 points: a tie at seed level (half-width
  # 12.706 x 28.28 / sqrt(2) = 254) whose bootstrap interval excludes 0.
  for seed, (ours, theirs) in enumerate(((6, 1), (10, 1))):
    runs.add(f'chain3_noisy/target_sft_eta0.5/{seed}', ours, mean_step_cpu_seconds=3.0)
    runs.add(f'chain3_noisy/sft/{seed}', theirs, mean_step_cpu_seconds=2.0)
  counts = findings.verdict_counts(grid, found, ['chain3_clean', 'chain3_noisy'])
  (setting, tie), = counts['sft']['tie']
  assert setting == 'chain3_noisy' and tie['bootstrap'][0] > 0
  margins = findings.noise_margins(grid, found, 'chain3')
  assert margins['noisy']['mean'] == pytest.approx(0.7)
  assert margins['noisy']['half'] == pytest.approx(T1 * math.sqrt(0.08) / math.sqrt(2))
  assert margins['clean']['mean'] == pytest.approx(0.5)
  assert margins['difference'] == pytest.approx(0.2)
  assert margins['welch'][0] < 0 < margins['welch'][1]  # two seeds: no difference shown
  assert not findings.at_the_floor(grid, found)
  for seed in (0, 1):
    runs.add(f'products2_clean/sft/{seed}', 0)
  assert findings.at_the_floor(grid, found) == {'products2': [0.0, 0.0]}
  summary = findings.summary(grid, found, planned, [])
  assert summary[0].endswith('(so far)') and summary[-1] == ''
  assert findings.summary(grid, {}, [], [])[0].startswith('## What held')


def test_differences_beyond_accuracy_are_named_where_the_interval_excludes_zero(grid):
  found = {}

  def add(setting, seed, train, ece, held_out):
    for method, sign in (('target_sft_eta0.5', 1), ('sft', 0)):
      name = f'{setting}/{method}/{seed}'
      found[name] = {'name': name, 'method': method, 'seed': seed, 'accuracy': 0.5,
                     'fit': {'train_nll': 1.0 + sign * train},
                     'calibration': {'ece': 0.1 + sign * ece,
                                     'held_out_nll': 1.0 + sign * held_out}}

  # chain3_clean, Target-SFT minus SFT by seed: train NLL +0.30, +0.32, +0.34 (half-width
  # 4.303 x 0.02 / sqrt(3) = 0.050: higher); ECE -0.01, +0.01, 0 and held-out NLL -0.1, -0.2,
  # -0.3 (half-width 0.248): no.
  for seed, values in enumerate(((0.30, -0.01, -0.1), (0.32, 0.01, -0.2), (0.34, 0.0, -0.3))):
    add('chain3_clean', seed, *values)
  # chain3_noisy: train and held-out NLL -0.30, -0.32, -0.34 (lower); ECE 0, +0.1, 0: no.
  for seed, value in enumerate((-0.30, -0.32, -0.34)):
    add('chain3_noisy', seed, value, 0.1 if seed == 1 else 0.0, value)
  _select(grid, chain3_clean='target_sft_eta0.5', chain3_noisy='target_sft_eta0.5')
  (compared, by_measure), = [findings.beyond_accuracy(grid, found)['sft']]
  assert compared == 6  # 3 measurements with spread (train and held-out NLL, ECE) x 2 settings
  assert list(by_measure) == ['train NLL', 'held-out NLL']
  (higher, lower) = by_measure['train NLL']
  assert [(s, round(m, 6)) for s, m in higher] == [('chain3_clean', 0.32)]
  assert [(s, round(m, 6)) for s, m in lower] == [('chain3_noisy', -0.32)]
  assert by_measure['held-out NLL'][0] == []
  assert [s for s, _ in by_measure['held-out NLL'][1]] == ['chain3_noisy']
  found = {n: r for n, r in found.items() if n.startswith('chain3_clean/')}
  for seed in range(3):
    found[f'chain3_clean/target_sft_eta0.5/{seed}']['fit']['train_nll'] = 1.1  # +0.1 each
  assert findings.beyond_accuracy(grid, found) == {'sft': (2, {})}  # zero spread: no interval


def test_machines_listed_in_order_and_times_compared_on_one_machine(grid, tmp_path, monkeypatch):
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
  found = {}
  for seed, (ours, theirs, machine) in enumerate(((3.0, 2.0, 'A'), (1.5, 2.0, 'B'))):
    for method, step in (('target_sft_eta1', ours), ('sft', theirs)):
      found[f'chain3_clean/{method}/{seed}'] = {
          'name': f'chain3_clean/{method}/{seed}', 'method': method, 'seed': seed,
          'mean_step_seconds': step, 'mean_step_cpu_seconds': step,
          'machine': machine if method != 'sft' else 'A'}
  assert paired.paired_measure(found, 'chain3_clean', 'target_sft_eta1', 'sft',
                               'step CPU s (ratio)')[0::2] == (1.5, 1)
  # The Cost table: Target-SFT seed 0 against SFT's mean on A (2.0): 1.5; seed 1 on B has no
  # SFT run there and is left out.
  assert _row(report.cost(grid, found), 'target_sft_eta1')[0] == '1.50 / 1.50 (1)'


def test_answer_reliability_pools_runs_into_confidence_deciles(tmp_path):
  path = tmp_path / 'p.jsonl'
  rows = ([{'confidence': 0.95, 'score': float(i < 15)} for i in range(20)] +  # 15 of 20 right
          [{'confidence': 0.5, 'score': 1.0}] * 5 +  # too few for a point
          [{'confidence': None, 'score': 1.0}] +  # no answer tokens: left out
          [{'confidence': 1.0, 'score': 0.01}])  # the top bin; a partial score is wrong
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  run = {'scored': {'test_greedy': {'predictions': str(path)}}}
  (confidence, right, count), = plots._answer_reliability([run, {'scored': {}}])  # pylint: disable=protected-access
  assert count == 21 and right == pytest.approx(15 / 21)
  assert confidence == pytest.approx((20 * 0.95 + 1.0) / 21)


def test_budget_rates_come_from_the_machine_the_grid_runs_on_now(grid):
  trained = []
  for seed, (machine, wall, finished) in enumerate((('A', 1000.0, '2026-01-01 10:00'),
                                                    ('B', 100.0, '2026-01-02 10:00'),
                                                    ('B', 120.0, '2026-01-02 10:10'),
                                                    ('B', 80.0, '2026-01-02 10:20'))):
    trained.append({'name': f'chain3_clean/sft/{seed}', 'method': 'sft', 'seed': seed,
                    'wall_seconds': wall, 'machine': machine, 'finished': finished})
  walls, _, machine = ledger.rates(grid, trained)
  assert machine == 'B' and walls[False] == [100.0, 120.0, 80.0]  # A's 1000 s left out
  walls, _, machine = ledger.rates(grid, trained[:3])  # two runs on B: too few, all count
  assert machine is None and walls[False] == [1000.0, 100.0, 120.0]
  # The budget is spent past 12 h of wall time, replaced records included.
  assert ledger.hours_spent([{'wall_seconds': 3600 * 11.5}, {}]) == 11.5
  status = ledger.status(grid, {}, [], [{'name': 'x', 'wall_seconds': 3600 * 12.5}])
  assert any(line.startswith('**The budget is spent.**') for line in status)
  assert not any('budget is spent' in line for line in ledger.status(grid, {}, []))


def test_pooled_over_settings_by_pairs_and_by_setting_means(grid):
  found = {}
  # chain3_clean: Target-SFT ahead by 10 and 20 points (seeds 0, 1); chain3_noisy: by 30
  # (seed 0; its seed 1 SFT run is missing, so it does not pair).
  for setting, gains in (('chain3_clean', (0.1, 0.2)), ('chain3_noisy', (0.3, None))):
    for seed, gain in enumerate(gains):
      found[f'{setting}/target_sft_eta1/{seed}'] = {
          'name': f'{setting}/target_sft_eta1/{seed}', 'seed': seed, 'accuracy': 0.5}
      if gain is not None:
        found[f'{setting}/sft/{seed}'] = {'name': f'{setting}/sft/{seed}', 'seed': seed,
                                          'accuracy': 0.5 - gain}
  _select(grid, chain3_clean='target_sft_eta1', chain3_noisy='target_sft_eta1')
  result = paired.pooled(grid, found, 'sft', ['chain3_clean', 'chain3_noisy'])
  assert (result['settings'], result['pairs']) == (2, 3)
  # Pairs 0.1 0.2 0.3: mean 0.2, SD 0.1, half-width 4.303 x 0.1 / sqrt(3).
  assert result['over_pairs'] == pytest.approx((0.2, T4 * 0.1 / math.sqrt(3)))
  # Setting means 0.15 and 0.3: mean 0.225, SD 0.075 x sqrt(2), half-width 12.706 x 0.075.
  assert result['over_settings'] == pytest.approx((0.225, T1 * 0.075))
  assert paired.pooled(grid, found, 'sft', ['chain3_clean'], seeds_allowed=(2,)) is None
  assert _row(findings.pooled_table(grid, found), 'chain3', 'all', 'sft') == [
      '2 (3)', '+20.0 ± 24.8', '+22.5 ± 95.3']


def test_accuracies_are_full_credit_and_replaced_records_are_found(tmp_path):
  path = tmp_path / 'greedy.jsonl'
  path.write_text(''.join(json.dumps({'question': f'q{i}', 'score': s}) + '\n'
                          for i, s in enumerate((1.0, 0.5, 0.0, 1.0))))
  found = {'chain3_clean/sft/0': {'accuracy': 0.625, 'scored': {
      'test_greedy': {'accuracy': 0.625, 'predictions': str(path)},
      'harder': {'accuracy': 0.3}}}}  # no prediction file: kept
  records.with_full_credit(found)
  records.with_full_credit(found)  # twice: the same
  entry = found['chain3_clean/sft/0']
  assert entry['accuracy'] == 0.5 and entry['scored']['test_greedy']['recorded_accuracy'] == 0.625
  assert entry['scored']['harder'] == {'accuracy': 0.3}
  lines = [{'name': 'teacher/chain3', 'accuracy': 0.9}, {'name': 'base/chain3', 'accuracy': 0.1},
           {'name': 'teacher/chain3', 'accuracy': 0.91}]
  assert records.superseded(lines) == [{'name': 'teacher/chain3', 'accuracy': 0.9}]
  assert records.superseded(lines[:2]) == [] and records.superseded([]) == []


def test_answer_calibration_and_the_paired_eta_table(grid, tmp_path):
  path = tmp_path / 'greedy.jsonl'
  # Confidences 0.95 (right), 0.95 (wrong), 0.55 (right, scored 1), 0.55 (partial credit: wrong),
  # and one answer without a confidence.
  rows = [(0.95, 1.0), (0.95, 0.0), (0.55, 1.0), (0.55, 0.5), (None, 1.0)]
  path.write_text(''.join(json.dumps({'confidence': c, 'score': s}) + '\n' for c, s in rows))
  result = paired.answer_calibration({'scored': {'test_greedy': {'predictions': str(path)}}})
  # Both bins are half right: |0.5 - 0.95| and |0.5 - 0.55|, two answers each: ECE 0.25.
  assert result['count'] == 4 and result['ece'] == pytest.approx(0.25)
  assert result['brier'] == pytest.approx((0.05 ** 2 + 0.95 ** 2 + 0.45 ** 2 + 0.55 ** 2) / 4)
  assert paired.answer_calibration({'scored': {}}) is None

  found = {}
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
      found[f'chain3_clean/{method}/{seed}'] = {'seed': seed, 'scored': scored}
  _select(grid, chain3_clean='target_sft_eta1')
  # Best on test: 0.5 (70) against the selected 1 (60): 10 points lost.
  assert paired.selection_cost(grid, found, 'chain3_clean') == pytest.approx(('1', '0.5', 0.1))
  table = report.eta_paired(grid, found)
  # 0.25 - 1: -5 and -5 on both splits; 0.5 - 1: +5 and +15 (mean 10, half-width 12.706 x 7.07
  # / sqrt(2) = 63.5); DFT - 1 on test: -55 and -35.
  assert _row(table, 'chain3_clean') == [
      '- / -45.0 ± 127.1 (2)', '-5.0 ± 0.0 (2) / -5.0 ± 0.0 (2)',
      '+10.0 ± 63.5 (2) / +10.0 ± 63.5 (2)', '1', '0.5', '10.0']
  assert _row(table, 'chain3 (pooled)')[0] == '- / -45.0 ± 127.1 (2)'
  # An eta tying the selected one on test: the selected one is the best, nothing lost.
  for method in grid.tuned['target_sft']:
    for seed in grid.selection_seeds:
      found[f'chain3_clean/{method}/{seed}']['scored']['test_greedy']['accuracy'] = 0.4
  assert paired.selection_cost(grid, found, 'chain3_clean') == ('1', '1', 0.0)


def test_record_lookups_cells_caches_and_degenerate_intervals(grid, tmp_path):
  # Interval cells: '-' for nothing, no interval for one value, a ratio's ends.
  assert stats.interval_cell(float('nan'), float('nan'), 0) == '-'
  assert stats.interval_cell(12.34, float('nan'), 1) == '12.3 (1)'
  assert stats.interval_cell(-1.25, 2.5, 3, '{:+.1f}') == '-1.2 ± 2.5 (3)'
  assert stats.interval_cell(1.2, (0.9, 1.6), 2, '{:.2f}') == '1.20 [0.90, 1.60] (2)'
  # Signed points: a mean that rounds to zero is +0.0, never -0.0; no interval for one value.
  assert stats.signed_points(-0.0004, 0.013) == '+0.0 ± 1.3'
  assert stats.signed_points(-0.0123, float('nan')) == '-1.2'
  # Per-seed differences over the seeds both have, in seed order; only the allowed seeds.
  found = {f'chain3_clean/{m}/{s}': {'name': f'chain3_clean/{m}/{s}', 'seed': s, 'accuracy': a}
           for m, values in (('target_sft_eta1', {0: 0.5, 1: 0.75, 3: 0.5}),
                             ('sft', {0: 0.25, 1: 0.5, 2: 0.5})) for s, a in values.items()}
  assert paired.seed_differences(found, 'chain3_clean', 'target_sft_eta1', 'sft') == [0.25, 0.25]
  assert paired.seed_differences(found, 'chain3_clean', 'target_sft_eta1', 'sft', (1,)) == [0.25]
  assert stats.zero_spread([0.25, 0.25]) and not stats.zero_spread([0.25])
  assert stats.zero_spread([0.1 + 0.2, 0.3]) and not stats.zero_spread([0.25, 0.5])
  # The weaker prior reads chain3_noisy's selection; a method without the teacher stands in
  # for it by chain3_noisy's runs.
  _select(grid, chain3_noisy='target_sft_eta1')
  assert grid.tuned_from('chain3_noisy_weak') == 'chain3_noisy'
  assert grid.selected('chain3_noisy_weak', 'target_sft') == 'target_sft_eta1'
  assert grid.selected('chain3_clean', 'target_sft') is None
  assert grid.selected('chain3_clean', 'sft') == 'sft'
  assert [grid.stands_in('chain3_noisy_weak', m) for m in ('sft', 'dft', 'distill')] == [
      'chain3_noisy', 'chain3_noisy', 'chain3_noisy_weak']
  # Answer confidences: read-only, and a rewritten file is read again.
  path = tmp_path / 'greedy.jsonl'
  record = {'scored': {'test_greedy': {'predictions': str(path)}}}
  path.write_text(json.dumps({'question': 'q0', 'score': 1.0, 'confidence': 0.9}) + '\n')
  confidence, right = records.answer_confidences(record)
  assert confidence.tolist() == [0.9] and right.tolist() == [1.0]
  with pytest.raises(ValueError, match='read-only'):
    confidence[0] = 0.1
  path.write_text(''.join(json.dumps({'question': f'q{i}', 'score': s, 'confidence': c}) + '\n'
                          for i, (s, c) in enumerate(((0.5, 0.8), (0.0, None), (1.0, 0.6)))))
  confidence, right = records.answer_confidences(record)
  assert confidence.tolist() == [0.8, 0.6] and right.tolist() == [0.0, 1.0]  # 0.5 is partial
  assert records.answer_confidences({'scored': {}}) is None
  path.write_text(json.dumps({'question': 'q0'}) + '\n')  # a prediction without its score
  with pytest.raises(ValueError, match='greedy.jsonl, line 1: the prediction has no score'):
    records.scores({'scored': {'test_greedy': {'predictions': str(path)}}})


def test_the_sweep_of_the_other_tuned_families(grid):
  found = {'chain3_clean/sft/0': {'name': 'chain3_clean/sft/0', 'seed': 0, 'accuracy': 0.5}}
  sweep = report.sweep(grid, found)
  assert not _rows(sweep) and len(sweep) == 4  # the heading and why it is empty: cut
  assert sweep[2] != report.sweep(dataclasses.replace(grid, cut_families=()), found)[2]
  found['chain3_clean/asft_lam0.05/0'] = {
      'name': 'chain3_clean/asft_lam0.05/0', 'seed': 0, 'accuracy': 0.5,
      'scored': {'validation': {'accuracy': 0.4}}}
  cells = _row(report.sweep(grid, found), 'chain3_clean')
  assert len(cells) == 6 and cells[4] == '40.0 / 50.0' and cells.count('-') == 5


def _reproduction(tmp_path, name, splits, commit, machine, loss, prior=''):
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


def test_reproductions_compare_split_by_split(tmp_path):
  name = 'chain3_clean/target_sft_eta1/0'
  # Test: full credit 2 of 4 both times (0.5 is partial credit), yet q1 became right and q2
  # wrong; q0, q3 the same text. Validation only in the original, easier only in the reproduction.
  original = _reproduction(tmp_path, name, {
      'test_greedy': (['1', '2', '3', '4'], [1.0, 0.5, 1.0, 0.0]), 'validation': (['1'], [1.0])},
                           'aaaaaaa1', 'cpu A', 0.25, 'chain3')
  again = _reproduction(tmp_path, name, {
      'test_greedy': (['1', '7', '8', '4'], [1.0, 1.0, 0.0, 0.0]), 'easier': (['1'], [1.0])},
                        'bbbbbbb2', 'cpu B', 0.5, 'chain3')
  kept = tmp_path / 'reproduced'
  kept.mkdir()
  records.write_json_lines(kept / 'runs.jsonl', [
      {**again, 'final_metrics': {'loss': 9.0}}, again,  # the last of a name counts
      {**again, 'name': 'chain3_clean/dft/0'}])  # no grid record of it
  matched = reproduce.comparisons({name: original}, kept)
  assert [(a['name'], o is None) for a, o, _ in matched] == [(name, False),
                                                            ('chain3_clean/dft/0', True)]
  assert matched[0][0]['final_metrics']['loss'] == 0.5
  assert matched[0][2] == [
      {'label': 'test_greedy', 'answers': 4, 'original': 0.5, 'again': 0.5, 'same_text': 2,
       'now_right': 1, 'now_wrong': 1},
      {'label': 'validation', 'problem': 'only the original has it'},
      {'label': 'easier', 'problem': 'only the reproduction has it'}]
  section = reproduce.section(matched, 'kept')
  assert _rows(section)[1:] == [
      [name, 'teacher/chain3', 'test_greedy', '`aaaaaaa`, cpu A', '`bbbbbbb`, cpu B',
       '50.0 / 50.0', '2 of 4', '1 / 1', '0.250000 / 0.500000'],
      [name, 'teacher/chain3', 'validation', '`aaaaaaa`, cpu A', '`bbbbbbb`, cpu B',
       'not comparable: only the original has it', '-', '-', 'as above'],
      [name, 'teacher/chain3', 'easier', '`aaaaaaa`, cpu A', '`bbbbbbb`, cpu B',
       'not comparable: only the reproduction has it', '-', '-', 'as above']]
  assert 'chain3_clean/dft/0' in section[-2]  # kept, with no grid record to compare with
  assert len(reproduce.summary_line(matched)) == 1
  other = _reproduction(tmp_path, name, {'test_greedy': (['1', '2', '3'], [1.0, 1.0, 0.0])},
                        'ccccccc3', None, 0.5)
  assert reproduce.compare(original, other)[0] == {
      'label': 'test_greedy', 'problem': 'not scored on the same problems in the same order'}
  # Nothing comparable: no table; nothing kept: no section and no summary line.
  records.write_json_lines(kept / 'runs.jsonl', [{**again, 'name': 'chain3_clean/dft/0'}])
  assert not _rows(reproduce.section(reproduce.comparisons({name: original}, kept), 'kept'))
  assert reproduce.comparisons({name: original}, tmp_path / 'none') == []
  assert reproduce.section([], 'kept') == [] and reproduce.summary_line([]) == []


def test_keep_copies_a_reproduction_and_names_the_machine(tmp_path, monkeypatch):
  source = tmp_path / 'tree' / 'experiments' / 'machine_check'
  (source / 'predictions').mkdir(parents=True)
  (source / 'predictions' / 'a__test_greedy.jsonl').write_text('{"question": "q", "score": 1}\n')
  entry = 'experiments/machine_check/predictions/a__test_greedy.jsonl'
  (source / 'runs.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in (
      {'name': 'teacher/chain3'},
      {'name': 'chain3_clean/sft/0', 'predictions': entry,
       'scored': {'test_greedy': {'predictions': entry}}})))
  monkeypatch.setattr(reproduce.machines, 'describe', lambda: 'cpu X')
  target = tmp_path / 'kept'
  assert reproduce.keep(source, target) == ['chain3_clean/sft/0']
  moved = f'{target.resolve()}/predictions/a__test_greedy.jsonl'
  assert records.read_json_lines(target / 'runs.jsonl') == [
      {'name': 'chain3_clean/sft/0', 'predictions': moved, 'machine': 'cpu X',
       'scored': {'test_greedy': {'predictions': moved}}}]
  assert (target / 'predictions' / 'a__test_greedy.jsonl').exists()


def test_zero_spread_comparisons_are_marked_degenerate(grid, tmp_path):
  runs = Runs(tmp_path, problems=10)
  for seed, right in enumerate((5, 7)):  # Target-SFT 2 answers ahead on both seeds
    runs.add(f'chain3_clean/target_sft_eta1/{seed}', right + 2)
    runs.add(f'chain3_clean/sft/{seed}', right)
  _select(grid, chain3_clean='target_sft_eta1')
  result = paired.paired(runs.records, 'chain3_clean', 'target_sft_eta1', 'sft')
  assert result['zero_spread'] and result['verdict'] == 'win' and result['half'] == 0
  table, compared = report.verdict_table(grid, runs.records)
  assert compared == 1
  assert 'zero spread' in _row(table, 'chain3_clean', '1')[0]
  (line,) = findings.verdict_lines(grid, runs.records, ['chain3_clean'], 'Against')
  assert 'zero spread' in line
  assert report.margin_change({0: 0.1, 1: 0.1, 2: 0.1}).endswith('degenerate, not evidence)')
  assert report.margin_change({0: 0.1, 1: 0.2, 2: 0.15}).endswith('(3 seeds: above 0)')
  assert report.margin_change({0: 0.1}) == '+10.0 (1 seed)'


def test_code_versions_say_which_files_of_the_runs_code_changed(tmp_path):
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
  found = [  # in file order, not time order: the table orders by first use
      {'finished': '2026-01-02 00:00', 'code': code(second), 'measure_code': code(third)},
      {'finished': '2026-01-01 00:00', 'code': code(first), 'measure_code': code(first)},
      {'finished': '2026-01-01 00:01', 'method': 'base', 'code': code(first)},  # measured only
      {'finished': '2026-01-03 00:00', 'code': code('f' * 40, dirty=True)},  # not in this repo;
      # no measure_code: measured in its training process, at its code
      {'finished': '2026-01-04 00:00', 'code': code(third), 'measure_code': code(third)}]
  rows = _rows(ledger.code_versions(found, ('qtarget/',), tmp_path))[1:]
  assert [r[:3] for r in rows] == [
      [f'`{first[:10]}`', '2026-01-01 00:00', '1 / 2'],
      [f'`{second[:10]}`', '2026-01-02 00:00', '1 / 0'],
      [f'`{third[:10]}`', '2026-01-02 00:00', '1 / 2'],
      ['`ffffffffff`', '2026-01-03 00:00', '1 / 1 (1 with uncommitted changes)']]
  assert [r[3:] for r in rows[1:3]] == [['none', '-'], ['`qtarget/losses.py`', f'`{third[:7]}`']]
  assert rows[3][3].startswith('unknown')  # a commit this checkout lacks
  assert ledger.code_versions([{'finished': '-'}], ('qtarget/',), tmp_path) == []


def test_the_weaker_prior_pairs_with_the_stronger_settings_runs(grid, tmp_path):
  runs = Runs(tmp_path, problems=10)
  runs.records.update({'teacher/chain3': {'name': 'teacher/chain3', 'accuracy': 0.9},
                       'teacher/chain3_weak': {'name': 'teacher/chain3_weak', 'accuracy': 0.5}})
  right = {  # problems right out of 10, seeds 0, 1, 2
      'chain3_noisy/sft': (4, 5, 6), 'chain3_noisy/distill': (7, 7, 8),
      'chain3_noisy/target_sft_eta1': (7, 8, 8), 'chain3_noisy_weak/distill': (3, 4, 4),
      'chain3_noisy_weak/target_sft_eta1': (6, 8, 8)}
  for run, counts in right.items():
    for seed, count in enumerate(counts):
      runs.add(f'{run}/{seed}', count)
  found = runs.records
  _select(grid, chain3_noisy='target_sft_eta1')
  half = 100 * T4 * math.sqrt(1 / 300) / math.sqrt(3)  # three differences k, k, k ± 0.1
  # Weak Target-SFT 6, 8, 8 against chain3_noisy's SFT 4, 5, 6 (SFT uses no prior): +2, +3, +2;
  # against its own setting's distillation 3, 4, 4: +3, +4, +4. DFT has no runs here.
  cells = _row(report.verdict_table(grid, found)[0], 'chain3_noisy_weak', "1 (chain3_noisy's)")
  assert cells[0].startswith(f'**win** +23.3 ± {half:.1f} [') and cells[0].endswith('(3)')
  assert cells[1] == '-' and cells[2].startswith(f'**win** +36.7 ± {half:.1f} [')
  section = report.prior_quality(grid, found)
  # Weaker minus stronger: distillation -4, -3, -4 (lower); Target-SFT -1, 0, 0 (no difference).
  assert _row(section, 'distill')[:2] == ['73.3 ± 14.3 (3)', '36.7 ± 14.3 (3)']
  assert _row(section, 'distill')[2].startswith(f'**lower** -36.7 ± {half:.1f} [')
  assert _row(section, 'target_sft_eta1')[2].startswith(
      f'**no difference shown** -3.3 ± {half:.1f} [')
  # The margin over distillation: 0, +1, 0 with the stronger prior, +3, +4, +4 with the weaker:
  # it moves +3, +3, +4; over SFT: +3, +3, +2 and +2, +3, +2.
  strong = paired.margins(found, 'chain3_noisy', 'target_sft_eta1', 'chain3_noisy', 'distill')
  weak = paired.margins(found, 'chain3_noisy_weak', 'target_sft_eta1', 'chain3_noisy_weak',
                        'distill')
  assert strong == pytest.approx({0: 0.0, 1: 0.1, 2: 0.0})
  assert weak == pytest.approx({0: 0.3, 1: 0.4, 2: 0.4})
  assert report.margin_change({s: weak[s] - strong[s] for s in weak}).endswith('above 0)')
  assert sum(line.startswith('- Target-SFT minus ') for line in section) == 2
  for name in [n for n in found if n.startswith('chain3_noisy_weak/')]:
    del found[name]
  assert not _rows(report.prior_quality(grid, found))  # not run yet


def test_cut_families_are_never_run_and_counted_as_cut(grid):
  assert grid.cut_families == ('label_smoothing', 'sft_kl', 'asft')
  assert grid.cut('chain3_clean/asft_lam0.05/0') and not grid.cut('chain3_clean/sft/0')
  assert not grid.cut('teacher/chain3') and not grid.cut('chain3_clean/target_sft_eta1/2')
  names, todo = compare._todo(grid, {}, None)  # pylint: disable=protected-access
  secondaries = [n for n in names if grid.family(n.split('/')[1]) in grid.cut_families]
  assert len(secondaries) == 72 and not set(secondaries) & set(todo)  # in the plan, never run
  assert 'chain3_noisy_weak/distill/4' in todo and len(todo) == len(names) - 72
  teacher = {'teacher/chain3': {'name': 'teacher/chain3', 'method': 'teacher', 'seed': 0,
                                'accuracy': 0.9, 'wall_seconds': 600.0}}
  missing, cut = findings.not_run(grid, teacher, names)
  assert cut == {'secondary': 72} and 'secondary' not in missing
  assert sum(missing.values()) == len(names) - 72 - 1
  student = {'name': 'chain3_clean/sft/0', 'method': 'sft', 'seed': 0, 'accuracy': 0.5,
             'wall_seconds': 250.0}
  walls = ledger.rates(grid, [student])[0]
  assert ledger.hours_left(grid, walls, secondaries)[0] == pytest.approx(72 * 250 / 3600)
  # Every run not cut recorded: the summary is no longer 'so far'.
  assert findings.summary(grid, teacher, names, [])[0].endswith('(so far)')
  assert not findings.summary(grid, teacher, ['teacher/chain3'] + secondaries,
                              [])[0].endswith('(so far)')
  emptied = dataclasses.replace(grid, cut=lambda name: False)  # CUT_FAMILIES emptied
  assert len(compare._todo(emptied, {}, None)[1]) == len(names)  # pylint: disable=protected-access


def test_the_weaker_priors_stand_ins_are_traced_and_shown(grid):
  found = {}
  xeon, amd = 'Xeon', 'EPYC'

  def add(name, accuracy, commit, machine, cpu=1.0):
    found[name] = {'name': name, 'method': name.split('/')[1], 'seed': int(name[-1]),
                   'accuracy': accuracy, 'code': {'commit': commit}, 'machine': machine,
                   'mean_step_seconds': cpu, 'mean_step_cpu_seconds': cpu}

  # Seed 0's stand-ins ran at another commit and machine, seed 1's at the weak runs' own.
  for seed, (commit, machine) in enumerate((('old', amd), ('new', xeon))):
    add(f'chain3_noisy/sft/{seed}', 0.5, commit, machine, cpu=2.0)
    add(f'chain3_noisy/dft/{seed}', 0.3, commit, machine)
    add(f'chain3_noisy_weak/distill/{seed}', 0.6, 'new', xeon, cpu=3.0)
    add(f'chain3_noisy_weak/target_sft_eta1/{seed}', 0.6, 'new', xeon, cpu=3.0)
  add('chain3_noisy/dft/1', 0.3, 'new', amd)  # one stand-in on another machine: not the same
  assert report.stand_in_seeds(grid, found) == ([], [0, 1])
  add('chain3_noisy/dft/1', 0.3, 'new', xeon)
  assert report.stand_in_seeds(grid, found) == ([1], [0])
  _select(grid, chain3_noisy='target_sft_eta1')
  accuracy = report.accuracy(grid, found)
  sft = _row(accuracy, 'sft')
  assert sft[1] == '50.0 ± 0.0 (2)' and sft[-1] == "50.0 ± 0.0 (2) (chain3_noisy's)"
  assert _row(accuracy, 'distill')[-1] == '60.0 ± 0.0 (2)'  # its own setting's runs
  # Cost: the weak distill runs (3.0 s) over chain3_noisy's SFT on the same machine (seed 1's,
  # 2.0 s): 1.50, from both runs.
  assert _row(report.cost(grid, found), 'distill')[-1] == '1.50 / 1.50 (2)'
