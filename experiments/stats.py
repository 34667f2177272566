"""The numbers the reports print: Student-t intervals over seeds, a bootstrap over seeds and
problems, rank correlations, and the cells they are written in."""

import functools
import math

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
ZERO_SPREAD = 1e-9  # a standard deviation below this is rounding (accuracies are k / problems)

# Student-t 97.5% quantiles by degrees of freedom, to three decimals.
_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
          9: 2.262, 10: 2.228}


def t_quantile(probability: float, df: int) -> float:
  """The Student-t quantile at ``df`` (at least 1) degrees of freedom."""
  if df < 1:
    raise ValueError(f'a Student-t quantile needs at least 1 degree of freedom, got {df}.')
  import scipy.stats  # pylint: disable=g-import-not-at-top  (a JAX dependency)
  return float(scipy.stats.t.ppf(probability, df))


def t_975(df: int) -> float:
  """The Student-t 97.5% quantile at ``df`` degrees of freedom (the table's rounding up to 10,
  as the reports have always printed)."""
  return _T_975[df] if df in _T_975 else t_quantile(0.975, df)


def mean_and_interval(values: list[float]) -> tuple[float, float]:
  """Mean and half-width of the 95% Student-t interval over seeds (nan with one value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, math.nan
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return mean, t_975(n - 1) * sd / math.sqrt(n)


def zero_spread(values) -> bool:
  """Whether two or more values are all the same (up to rounding): a t interval over them has
  zero width, degenerate rather than evidence."""
  return len(values) > 1 and float(np.std(values)) < ZERO_SPREAD


def bootstrap_interval(diff: np.ndarray) -> tuple[float, float]:
  """The 95% interval of the mean of ``diff`` (seeds x problems), resampling seeds and problems
  together (seeded: the same differences give the same interval)."""
  diff = np.ascontiguousarray(diff, np.float64)
  return _bootstrap(diff.tobytes(), diff.shape)


@functools.lru_cache(maxsize=None)  # the verdict table and the summary ask for the same ones
def _bootstrap(diff_bytes: bytes, shape: tuple[int, int]) -> tuple[float, float]:
  diff = np.frombuffer(diff_bytes, np.float64).reshape(shape)
  rng = np.random.default_rng(0)
  seed_draw = rng.integers(0, shape[0], (BOOTSTRAP_RESAMPLES, shape[0]))
  problem_draw = rng.integers(0, shape[1], (BOOTSTRAP_RESAMPLES, shape[1]))
  means = np.array([diff[s][:, p].mean() for s, p in zip(seed_draw, problem_draw)])
  low, high = np.quantile(means, [0.025, 0.975])
  return float(low), float(high)


def geometric_mean(values) -> float:
  return float(np.exp(np.mean(np.log(values))))


def spearman(xs, ys) -> str:
  """Spearman's rank correlation of the finite pairs and their count; 'undefined' when one
  side is constant, '-' with fewer than three pairs."""
  import scipy.stats  # pylint: disable=g-import-not-at-top
  pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
  if len(pairs) < 3 or len({x for x, _ in pairs}) < 2 or len({y for _, y in pairs}) < 2:
    return 'undefined' if len(pairs) >= 3 else '-'
  rho = scipy.stats.spearmanr(*zip(*pairs)).statistic
  return f'{rho:+.2f} ({len(pairs)})'


def signed_points(mean: float, half: float) -> str:
  """A fraction's mean in signed points, ± its half-width unless undefined (NaN); a mean that
  rounds to zero prints +0.0, never -0.0."""
  shown = f'{round(100 * mean, 1) + 0.0:+.1f}'  # adding 0.0 turns a rounded -0.0 into 0.0
  return shown + ('' if math.isnan(half) else f' ± {100 * half:.1f}')


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


def cell(values, scale=100.0, digits=1) -> str:
  """Mean ± 95% half-width over ``values`` (scaled, to points by default) and their count."""
  if not values:
    return '-'
  mean, half = mean_and_interval(values)
  return interval_cell(scale * mean, scale * half, len(values), f'{{:.{digits}f}}')
