"""Shared test data: one case per method of the table, with its hyperparameters."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qtarget import native
from qtarget import targets

BATCH, LENGTH, VOCAB = 2, 5, 11


class Case(NamedTuple):
  name: str
  hyperparameters: dict
  needs_prior: bool
  nonnegative: bool  # whether the method guarantees Q >= 0 for these hyperparameters
  native_loss: object  # the loss as its authors write it, from qtarget.native


CASES = [
    Case('sft', {}, False, True, native.nll),
    Case('label_smoothing', {'lam': 0.1}, False, True, native.label_smoothing),
    Case('dft', {}, False, True, native.dft),
    Case('beyond_log', {'alpha': 0.5}, False, True, native.beyond_log),
    Case('profit', {'tau': 0.3}, False, True, native.profit),
    Case('eaft', {'k': 4}, False, True, native.eaft),
    Case('sft_kl', {'lam': 0.7}, True, True, native.sft_kl),
    Case('asft', {'lam': 0.3}, True, True, native.asft),
    Case('distill', {}, True, True, native.distill),
    Case('hybrid_distill', {'lam': 0.4}, True, True, native.hybrid_distill),
    # Target-SFT is defined by its target: CE(Q, p) is its native form.
    Case('target_sft', {'eta': 0.3}, True, True, None),
    # iw-SFT: one weight per sequence, one of them above 1 (Q then has negative mass).
    Case('weighted', {'weights': np.array([[0.4], [1.5]], np.float32)}, False, False,
         native.weighted),
]
CASE_IDS = [case.name for case in CASES]


def make_batch(seed=0, scale=3.0, shape=(BATCH, LENGTH), vocab=VOCAB, dtype=jnp.float32):
  """Student logits, prior logits and labels; labels avoid nothing: any token may be observed."""
  key_z, key_prior, key_y = jax.random.split(jax.random.key(seed), 3)
  logits = (scale * jax.random.normal(key_z, shape + (vocab,))).astype(dtype)
  prior_logits = (scale * jax.random.normal(key_prior, shape + (vocab,))).astype(dtype)
  labels = jax.random.randint(key_y, shape, 0, vocab)
  return logits, prior_logits, labels


def make_target(case: Case, logits, labels, prior_logits, **override):
  hyper = {**case.hyperparameters, **override}
  prior = prior_logits if case.needs_prior else None
  return targets.get(case.name)(logits, labels, prior_logits=prior, **hyper)


def native_loss(case: Case, prior_logits):
  """The method's native per-token loss with everything but (logits, labels) bound."""
  kwargs = dict(case.hyperparameters)
  if case.needs_prior:
    kwargs['prior_logits'] = prior_logits
  return functools.partial(case.native_loss, **kwargs)


class DigitsTokenizer:
  """A tokenizer for teacher-forced tests: prompts and responses are space-separated ids, the
  system prompt (ids too) goes first, and 1 ends the turn."""

  def encode_example(self, prompt, response, system=None):
    from qtarget import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
    prompt_ids = [int(t) for t in f'{system or ""} {prompt}'.split()]
    response_ids = [int(t) for t in response.split()] + [1]  # 1: the end of turn
    mask = np.zeros(len(prompt_ids) + len(response_ids), bool)
    mask[len(prompt_ids):] = True
    return tokenizer_lib.EncodedExample(np.asarray(prompt_ids + response_ids, np.int32), mask)
