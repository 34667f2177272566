"""What both compare.py and report.py need: the repository root, the one reader of the grids'
JSON-lines files and seed-level intervals."""

import json
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def read_json_lines(path: pathlib.Path) -> list[dict]:
  """The objects of a JSON-lines file (runs.jsonl, machines.jsonl) in file order, blank lines
  skipped; [] when the file does not exist. A line that is not a JSON object is a ValueError
  naming the file and the line."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  objects = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      value = json.loads(line)
    except json.JSONDecodeError as error:
      raise ValueError(f'{path}, line {number}: not JSON ({error.msg} at column '
                       f'{error.colno}).') from None
    if not isinstance(value, dict):
      raise ValueError(f'{path}, line {number}: a JSON {type(value).__name__}, not an object.')
    objects.append(value)
  return objects


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
  as both grids' reports have always printed)."""
  return _T_975[df] if df in _T_975 else t_quantile(0.975, df)


def mean_and_interval(values: list[float]) -> tuple[float, float]:
  """Mean and half-width of the 95% Student-t interval over seeds (nan with one value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, math.nan
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return mean, t_975(n - 1) * sd / math.sqrt(n)
