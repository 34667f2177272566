"""A method of the Q-target table as data: its trust rule, its residual's powers and the valid
ranges of its hyperparameters, and when two such descriptions are the same design.

:mod:`qtarget.targets` builds targets from these descriptions and keeps the registry
(``targets.METHODS``); ``targets.Method`` and ``targets.Range`` are these classes.
"""

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qtarget import validation

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Range:
  """The valid values of a hyperparameter; ``*_open`` excludes the bound."""
  low: float
  high: float = float('inf')
  low_open: bool = False
  high_open: bool = False

  def contains(self, value: Array) -> Array:
    """Elementwise: whether ``value`` lies in the range (False for NaN)."""
    return validation.in_range(value, self.low, self.high, self.low_open, self.high_open)


@dataclasses.dataclass(frozen=True, eq=False)  # identity: equivalence is same_design's
class Method:
  """A method of the table as data: a trust rule and the residual's powers.

  Attributes:
    name: the method's name, as configs spell it.
    trust: ``(label_log_prob, **hyperparameters) -> trust``, elementwise over tokens; with
      ``trust_reads_distribution``, ``(label_log_prob, log_probs, **hyperparameters)`` where
      ``log_probs`` is ``[..., V]`` (the student's whole distribution, e.g. EAFT's entropy).
    residual_powers: ``(**hyperparameters) -> (a, b)``: the residual is proportional to
      ``p**a * prior**b`` (uniform when both are 0). Python numbers mark constant powers.
    hyperparameters: name -> valid range, for every traced hyperparameter (a number or an
      array broadcasting to the labels; a sweep does not recompile).
    needs_prior: whether the residual uses the prior.
    static_hyperparameters: name -> valid range, for integers that set array shapes (EAFT's
      ``k``): Python ints, part of the compiled program; an upper bound of ``inf`` means the
      vocabulary size.
    trust_reads_distribution: see ``trust``.
  """
  name: str
  trust: Callable[..., Array]
  residual_powers: Callable[..., tuple]
  hyperparameters: Mapping[str, Range] = dataclasses.field(default_factory=dict)
  needs_prior: bool = False
  static_hyperparameters: Mapping[str, Range] = dataclasses.field(default_factory=dict)
  trust_reads_distribution: bool = False

  def check_hyperparameters(self, given: Mapping, labels_shape, vocab_size=None) -> None:
    """TypeError for missing or unknown names and non-integer static values; ValueError for
    shapes and concrete ranges."""
    expected = set(self.hyperparameters) | set(self.static_hyperparameters)
    if expected != set(given):
      missing, unknown = sorted(expected - set(given)), sorted(set(given) - expected)
      raise TypeError(f'method {self.name!r} takes hyperparameters {sorted(expected)}; '
                      f'missing {missing}, unknown {unknown}.')
    for name, valid in self.hyperparameters.items():
      validation.check_hyperparameter(name, given[name], labels_shape, valid.low, valid.high,
                                      valid.low_open, valid.high_open)
    for name, valid in self.static_hyperparameters.items():
      value = given[name]
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f'{self.name}: {name} must be a Python int (it sets an array shape), '
                        f'got {value!r}.')
      high = vocab_size if valid.high == float('inf') and vocab_size is not None else valid.high
      if not valid.low <= value <= high:
        raise ValueError(f'{self.name}: hyperparameter {name}={value} is outside its valid '
                         f'range [{valid.low:g}, {high:g}].')

  def trust_of(self, label_log_prob: Array, log_probs: Array, **hyperparameters) -> Array:
    """The trust per token; ``log_probs`` (``[..., V]``) reaches distribution-reading rules."""
    if self.trust_reads_distribution:
      return self.trust(label_log_prob, log_probs, **hyperparameters)
    return self.trust(label_log_prob, **hyperparameters)

  def checked_trust(self, label_log_prob: Array, log_probs: Array | None,
                    **hyperparameters) -> Array:
    """:meth:`trust_of`, NaN where the label is out of range (``label_log_prob`` is NaN there)
    or a hyperparameter lies outside its range: under ``jit`` neither can raise, and a NaN loss
    is caught where a finite loss of a wrong target would train on."""
    trust = jnp.broadcast_to(self.trust_of(label_log_prob, log_probs, **hyperparameters),
                             label_log_prob.shape)
    invalid = jnp.isnan(label_log_prob)
    for name, valid in self.hyperparameters.items():
      invalid = invalid | ~valid.contains(jnp.asarray(hyperparameters[name]))
    return jnp.where(invalid, jnp.nan, trust)

  def split_hyperparameters(self, given: Mapping) -> tuple[dict, dict]:
    """``(traced, static)`` hyperparameters of ``given``."""
    static = {k: int(v) for k, v in given.items() if k in self.static_hyperparameters}
    return {k: v for k, v in given.items() if k not in static}, static


def _same_value(a, b, depth: int) -> bool:
  if a is b:
    return True
  if callable(a) and callable(b) and hasattr(a, '__code__') and hasattr(b, '__code__'):
    return _same_function(a, b, depth + 1)  # a function of a config file loaded again
  return bool(a == b)


def _same_function(f, g, depth: int = 0) -> bool:
  if f is g:
    return True
  if depth > 3:
    return False
  code_f, code_g = getattr(f, '__code__', None), getattr(g, '__code__', None)
  if code_f is None or code_g is None or code_f != code_g:
    return False
  # The values the code reads: defaults, closure cells and the module globals it names.
  cells = lambda h: tuple(c.cell_contents for c in (h.__closure__ or ()))
  names = lambda h: tuple(h.__globals__.get(name) for name in h.__code__.co_names
                          if name in h.__globals__)
  try:
    return bool(f.__defaults__ == g.__defaults__
                and len(cells(f)) == len(cells(g))
                and all(_same_value(a, b, depth) for a, b in zip(cells(f), cells(g)))
                and all(_same_value(a, b, depth) for a, b in zip(names(f), names(g))))
  except Exception:  # pylint: disable=broad-except  # values that do not compare (arrays)
    return False


def same_design(a: Method, b: Method) -> bool:
  """The same definition: equal fields, the rules being the same code (a config file that is
  loaded twice defines new function objects with identical code)."""
  return (a is b or (a.name == b.name and dict(a.hyperparameters) == dict(b.hyperparameters)
                     and dict(a.static_hyperparameters) == dict(b.static_hyperparameters)
                     and a.needs_prior == b.needs_prior
                     and a.trust_reads_distribution == b.trust_reads_distribution
                     and _same_function(a.trust, b.trust)
                     and _same_function(a.residual_powers, b.residual_powers)))
