"""Entry checks shared by the loss library: shapes, dtypes, ranges.

Checks on values (label and hyperparameter ranges) run only on concrete inputs; under
`jax.jit` the inputs are tracers and the functions document what happens instead.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """True for Python numbers and arrays whose values are known (not under tracing)."""
  return not isinstance(x, jax.core.Tracer)


def compute_dtype(dtype) -> jnp.dtype:
  """float32, or wider if the input is wider: the loss is never computed in bfloat16."""
  return jnp.promote_types(dtype, jnp.float32)


def check_logits(logits, name: str = 'logits') -> None:
  if jnp.ndim(logits) < 1:
    raise ValueError(f'{name} must have a trailing vocabulary axis, got a scalar.')
  dtype = jnp.result_type(logits)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f'{name} must be a floating-point array, got dtype {dtype}.')
  if jnp.shape(logits)[-1] < 1:
    raise ValueError(f'{name} has an empty vocabulary axis: shape {jnp.shape(logits)}.')


def check_labels(logits, labels) -> None:
  """Dtype and shape of labels against logits (values are checked in `check_label_range`)."""
  check_logits(logits)
  dtype = jnp.result_type(labels)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f'labels must be an integer array, got dtype {dtype}.')
  if jnp.shape(logits)[:-1] != jnp.shape(labels):
    raise ValueError(
        f'logits of shape {jnp.shape(logits)} and labels of shape {jnp.shape(labels)} do not '
        'match: logits must have the shape of labels plus a trailing vocabulary axis.')


def check_prior(logits, prior_logits) -> None:
  check_logits(prior_logits, 'prior_logits')
  student_shape, prior_shape = jnp.shape(logits), jnp.shape(prior_logits)
  if student_shape[-1] != prior_shape[-1]:
    raise ValueError(
        f"prior_logits vocabulary size {prior_shape[-1]} differs from the student's "
        f'{student_shape[-1]}: the prior must share the student\'s tokenizer and vocabulary.')
  if student_shape != prior_shape:
    raise ValueError(
        f'prior_logits of shape {prior_shape} do not match the student logits of shape '
        f'{student_shape}.')


def check_cached_prior(positions: tuple, vocab_size: int, cached) -> None:
  """A :class:`qtarget.cached_prior.CachedPrior` for student logits ``positions + (V,)``."""
  positions = tuple(positions)
  k = jnp.shape(cached.token_ids)[-1]
  if jnp.shape(cached.token_ids)[:-1] != positions or jnp.shape(cached.log_probs) != jnp.shape(
      cached.token_ids) or jnp.shape(cached.tail_log_mass) != positions:
    raise ValueError(f'the cached prior (token_ids {jnp.shape(cached.token_ids)}, log_probs '
                     f'{jnp.shape(cached.log_probs)}, tail_log_mass '
                     f'{jnp.shape(cached.tail_log_mass)}) does not match the student logits '
                     f'{positions + (vocab_size,)}: expected [..., k] and [...] with ... = '
                     f'{positions}.')
  if not 1 <= k <= vocab_size:
    raise ValueError(f'the cached prior keeps k={k} tokens, outside [1, {vocab_size}] (the '
                     'vocabulary size).')
  if is_concrete(cached.token_ids):
    ids = np.asarray(cached.token_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
      raise ValueError(f'the cached prior holds token ids outside [0, {vocab_size}): '
                       f'{int(ids.min())}..{int(ids.max())} (built for another vocabulary?).')


def _unmasked_failures(bad: np.ndarray, where) -> tuple[int, tuple] | None:
  """``(count, first index)`` of the failing positions that ``where`` (None: all) keeps."""
  if where is not None:
    bad = bad & np.broadcast_to(np.asarray(where, bool), bad.shape)
  if not bad.any():
    return None
  return int(bad.sum()), tuple(int(i) for i in np.argwhere(bad)[0])


def check_label_range(labels, vocab_size: int, where=None,
                      mask_hint: str = 'Mask padding positions with `where=`.') -> None:
  """Raises if a concrete label (at an unmasked position) lies outside [0, vocab_size)."""
  if not (is_concrete(labels) and (where is None or is_concrete(where))):
    return
  labels_np = np.asarray(labels)
  failures = _unmasked_failures((labels_np < 0) | (labels_np >= vocab_size), where)
  if failures:
    count, index = failures
    raise ValueError(
        f'{count} label(s) outside [0, {vocab_size}) at unmasked positions; the first '
        f'is {int(labels_np[index])} at index {index}. {mask_hint}')


def check_not_nan(x, name: str, where=None, cause: str = '', vocab_axis: bool = False,
                  positive_inf: bool = False) -> None:
  """Raises if a concrete ``x`` (``[...]``, or ``[..., V]`` with ``vocab_axis``) holds NaN (or,
  with ``positive_inf``, +inf) at a position the ``[...]`` mask ``where`` keeps; ``cause`` says
  where such a value comes from. Reduced on the device: only a per-position mask is copied."""
  if not (is_concrete(x) and (where is None or is_concrete(where))):
    return
  with jax.ensure_compile_time_eval():  # concrete inputs inside a jit trace are evaluated here
    bad = jnp.isnan(x) | (jnp.isposinf(x) if positive_inf else False)
    bad = np.asarray(bad.any(axis=-1) if vocab_axis else bad)
  failures = _unmasked_failures(bad, where)
  if failures:
    count, index = failures
    what = 'NaN or +inf' if positive_inf else 'NaN'
    raise ValueError(f'{name} holds {what} at {count} unmasked position(s), the first at index '
                     f'{index}.{" " + cause if cause else ""}')


def check_where(where, labels) -> None:
  if where is None:
    return
  if jnp.result_type(where) != jnp.bool_:
    raise TypeError(f'where must be a boolean mask, got dtype {jnp.result_type(where)}.')
  if jnp.shape(where) != jnp.shape(labels):
    raise ValueError(
        f'where of shape {jnp.shape(where)} must have the shape of labels {jnp.shape(labels)}.')


def in_range(values, low: float, high: float, low_open: bool = False, high_open: bool = False):
  """Elementwise: whether ``values`` (NumPy or JAX) lie in the interval (False for NaN)."""
  above_low = values > low if low_open else values >= low
  below_high = values < high if high_open else values <= high
  return above_low & below_high


def check_hyperparameter(name: str, value, labels_shape, low: float, high: float,
                         low_open: bool = False, high_open: bool = False) -> None:
  """Shape (scalar or broadcastable to labels) and, for concrete values, the range."""
  if isinstance(value, (str, bytes)):
    raise TypeError(f'hyperparameter {name} must be a number or an array of numbers, got the '
                    f'string {value!r}.')
  shape = jnp.shape(value)
  try:
    broadcast = np.broadcast_shapes(shape, labels_shape)
  except ValueError:
    broadcast = None
  if broadcast != tuple(labels_shape):
    raise ValueError(
        f'hyperparameter {name} of shape {shape} must be a scalar or broadcast to the labels '
        f'shape {tuple(labels_shape)}.')
  if not jnp.issubdtype(jnp.result_type(value), jnp.number):
    raise TypeError(f'hyperparameter {name} must be a number, got {jnp.result_type(value)}.')
  if not is_concrete(value):
    return
  values = np.asarray(value, np.float64)
  outside = ~in_range(values, low, high, low_open, high_open)
  if outside.any():
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    offending = values[outside].ravel()[0]
    raise ValueError(f'hyperparameter {name}={offending} is outside its valid range {interval}.')


def check_residual_normalized(trust, log_residual, where=None, tolerance: float = 1e-3) -> None:
  """Raises if a concrete residual does not sum to one where it carries mass (trust < 1, at an
  unmasked position).

  The loss's custom derivative is p - Q, which is the loss's true gradient only when Q sums to
  one; an unnormalized hand-built residual would train on a gradient that is not the loss's.
  """
  if not all(is_concrete(x) for x in (trust, log_residual, where)):
    return
  if jnp.size(log_residual) == 0:
    return
  sums = np.asarray(jnp.exp(jax.nn.logsumexp(jnp.asarray(log_residual, jnp.float32), axis=-1)))
  bad = ~(np.abs(sums - 1.0) <= tolerance)  # NaN counts as bad
  failures = _unmasked_failures(bad & np.broadcast_to(np.asarray(trust) != 1, bad.shape), where)
  if failures:
    count, index = failures
    raise ValueError(
        f'target.log_residual does not sum to one at {count} position(s) where the '
        f'trust is below 1; at index {index} exp(log_residual) sums to {sums[index]:.6g}. Build '
        'targets with qtarget.targets (or normalize the residual with jax.nn.log_softmax): the '
        "loss's gradient p - Q assumes sum(Q) = 1.")
