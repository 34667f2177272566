"""The pre-registered grid's records: a run's scores, the runs of a method, the selected value of
a tuned family, and Target-SFT paired with a baseline seed by seed (experiments/report2.py,
findings2.py, paired2.py and plots2.py build on these)."""

import functools
import json
import math

import numpy as np
from qtarget import evaluate

import stats  # pylint: disable=import-error  (experiments/stats.py)

BASELINES = ('sft', 'dft', 'distill', 'label_smoothing', 'sft_kl', 'asft')
BOOTSTRAP_RESAMPLES = 10_000
ZERO_SPREAD = 1e-9  # a standard deviation below this is rounding (accuracies are k / problems)
PRIOR_QUALITY = 'chain3_noisy_weak'  # the setting with the weaker teacher as its prior


def run_kind(grid, name: str) -> str:
  """What a run name is in the plan: 'primary', 'secondary', 'prior-quality axis', or
  'teachers and Base' (the kinds the run order and the budget's cuts go by)."""
  parts = name.split('/')
  if parts[0] in ('teacher', 'base'):
    return 'prior-quality axis' if name == 'teacher/chain3_weak' else 'teachers and Base'
  if parts[0] == PRIOR_QUALITY:
    return 'prior-quality axis'
  family = grid.family(parts[1])
  return 'primary' if parts[1] in grid.PRIMARY_FIXED or family == 'target_sft' else 'secondary'


def scores(record, label='test_greedy') -> tuple[list[str], np.ndarray]:
  """The questions of a run's predictions and whether each got full credit (1.0 or 0.0), row
  by row (the split's order; a question that occurs twice counts twice, as in the accuracy)."""
  rows = evaluate.read_predictions(stats.ROOT / record['scored'][label]['predictions'])
  return ([r['question'] for r in rows],
          np.array([evaluate.full_credit(r['score']) for r in rows], np.float64))


@functools.lru_cache(maxsize=None)
def _confidences(path, modified_ns, size) -> tuple[np.ndarray, np.ndarray]:
  del modified_ns, size  # in the cache key only: a rewritten file is read again
  rows = [r for r in evaluate.read_predictions(path, fields=('score',))
          if r.get('confidence') is not None]
  arrays = (np.array([r['confidence'] for r in rows], np.float64),
            np.array([evaluate.full_credit(r['score']) for r in rows], np.float64))
  for array in arrays:  # shared by every caller
    array.flags.writeable = False
  return arrays


def answer_confidences(record) -> tuple[np.ndarray, np.ndarray] | None:
  """A run's greedy test answers that have a confidence (the mean probability of the answer's
  own tokens): the confidences and whether each got full credit (1.0 or 0.0), read-only; None
  for a run without greedy test predictions."""
  scored = (record.get('scored') or {}).get('test_greedy') or {}
  if 'predictions' not in scored:
    return None
  path = stats.ROOT / scored['predictions']
  status = path.stat() if path.exists() else None  # a missing file: read_predictions says so
  return _confidences(path, status and status.st_mtime_ns, status and status.st_size)


def with_full_credit(records: dict) -> dict:
  """The records with every scored accuracy recomputed from its prediction file as full credit
  only (score 1), the pre-registered primary metric. reasoning-gym's scorer also gives partial
  credit (0.5 for a sign error, for instance), which the recorded ``accuracy`` (what
  ``compare.py rescore`` checks) averages in; it is kept as ``recorded_accuracy``. An entry
  without a prediction file keeps its accuracy."""
  for record in records.values():
    for label, entry in (record.get('scored') or {}).items():
      if 'predictions' in entry and 'recorded_accuracy' not in entry:
        entry['recorded_accuracy'] = entry['accuracy']
        entry['accuracy'] = float(np.mean(scores(record, label)[1]))
    if 'test_greedy' in (record.get('scored') or {}):
      record['accuracy'] = record['scored']['test_greedy']['accuracy']
  return records


def tuned_from(setting: str) -> str:
  """The setting whose selections ``setting`` uses: the weaker prior reuses chain3_noisy's
  (pre-registered), every other setting its own."""
  return 'chain3_noisy' if setting == 'chain3_noisy_weak' else setting


def selected_method(grid, setting: str, family: str) -> str | None:
  """The grid method standing for ``family`` in ``setting``: fixed methods are themselves; a
  tuned family's frozen selection (None before it exists)."""
  if family not in grid.TUNED:
    return family
  frozen = json.loads(grid.selection_file.read_text()) if grid.selection_file.exists() else {}
  entry = frozen.get(f'{tuned_from(setting)}/{family}')
  return entry['selected'] if entry else None


def baseline_setting(grid, setting: str, baseline: str) -> str:
  """The setting whose runs stand for the method ``baseline`` in ``setting``. A method that does
  not use the teacher trains the same with the weaker prior as in chain3_noisy (the two configs
  differ only in the workdir), so chain3_noisy_weak pairs with chain3_noisy's runs of it; any
  other, in its own setting."""
  return tuned_from(setting) if grid.METHODS[baseline][2] != 'teacher' else setting


def paired(records: dict, setting: str, method: str, baseline: str,
           seeds_allowed=None, baseline_setting: str | None = None) -> dict | None:
  """Target-SFT's (``method``) greedy test accuracy minus ``baseline``'s, seed by seed (the
  Student-t interval over seeds) and by a bootstrap over seeds and problems together; only
  ``seeds_allowed`` when given. The baseline's runs are those of ``baseline_setting`` (default
  ``setting``), which must share the test problems."""
  other = baseline_setting or setting
  ours = lambda seed: f'{setting}/{method}/{seed}'
  theirs = lambda seed: f'{other}/{baseline}/{seed}'
  seeds = sorted(int(n.split('/')[2]) for n in records
                 if n.startswith(f'{setting}/{method}/') and n.count('/') == 2 and
                 theirs(n.split('/')[2]) in records and
                 (seeds_allowed is None or int(n.split('/')[2]) in seeds_allowed))
  if not seeds:
    return None
  runs = [scores(records[name(s)]) for s in seeds for name in (ours, theirs)]
  questions = runs[0][0]
  if any(q != questions for q, _ in runs):
    raise ValueError(f'{setting}: {method} and {other}\'s {baseline} were not scored on the '
                     'same problems in the same order.')
  diff = np.array([runs[2 * i][1] - runs[2 * i + 1][1] for i in range(len(seeds))])
  per_seed = diff.mean(axis=1)
  mean, half = stats.mean_and_interval(list(per_seed))
  low, high = _bootstrap_interval(np.ascontiguousarray(diff, np.float64).tobytes(), diff.shape)
  verdict = ('tie' if math.isnan(half) or abs(mean) <= half else 'win' if mean > 0 else 'loss')
  return {'seeds': seeds, 'mean': mean, 'half': half, 'bootstrap': (low, high),
          'zero_spread': zero_spread(per_seed),
          'verdict': verdict if len(seeds) > 1 else 'n/a', 'problems': len(questions),
          'ahead': int(np.sum(per_seed > 0))}


@functools.lru_cache(maxsize=None)
def _bootstrap_interval(diff_bytes: bytes, shape: tuple[int, int]) -> tuple[float, float]:
  """The 95% interval of the mean paired difference, resampling seeds and problems together
  (seeded: the same differences give the same interval; cached, as the verdict table and the
  summary's counts ask for the same comparisons)."""
  diff = np.frombuffer(diff_bytes, np.float64).reshape(shape)
  rng = np.random.default_rng(0)
  seed_draw = rng.integers(0, shape[0], (BOOTSTRAP_RESAMPLES, shape[0]))
  problem_draw = rng.integers(0, shape[1], (BOOTSTRAP_RESAMPLES, shape[1]))
  means = np.array([diff[s][:, p].mean() for s, p in zip(seed_draw, problem_draw)])
  low, high = np.quantile(means, [0.025, 0.975])
  return float(low), float(high)


def zero_spread(values) -> bool:
  """Whether two or more values are all the same (up to rounding): a t interval over them has
  zero width, degenerate rather than evidence."""
  return len(values) > 1 and float(np.std(values)) < ZERO_SPREAD


def seed_differences(records, setting, method, baseline, seeds_allowed=None,
                     baseline_setting: str | None = None) -> list[float]:
  """``method``'s greedy test accuracy minus ``baseline``'s in ``setting`` (the baseline's runs
  those of ``baseline_setting`` when given), one per seed both have (only ``seeds_allowed`` when
  given), in seed order."""
  ours = seed_accuracies(records, setting, method)
  theirs = seed_accuracies(records, baseline_setting or setting, baseline)
  return [ours[s] - theirs[s] for s in sorted(set(ours) & set(theirs))
          if seeds_allowed is None or s in seeds_allowed]


def interval_cell(mean, spread, count, template='{:.1f}') -> str:
  """``mean ± half-width (count)``, or ``mean [low, high] (count)`` when ``spread`` is an
  interval's ends; '-' for no values, and no interval where it is undefined (one value)."""
  if not count:
    return '-'
  if isinstance(spread, tuple):
    low, high = spread
    interval = '' if math.isnan(low) else f' [{template.format(low)}, {template.format(high)}]'
  else:
    interval = '' if math.isnan(spread) else f' ± {template.format(spread).lstrip("+")}'
  return f'{template.format(mean)}{interval} ({count})'


def runs(records, setting, method):
  return [r for n, r in sorted(records.items())
          if n.startswith(f'{setting}/{method}/') and n.count('/') == 2]


def value(record, label, field='accuracy'):
  entry = (record.get('scored') or {}).get(label)
  return None if entry is None else entry.get(field)


def seed_accuracies(records, setting, method) -> dict[int, float]:
  return {int(r['name'].split('/')[2]): r['accuracy'] for r in runs(records, setting, method)}
