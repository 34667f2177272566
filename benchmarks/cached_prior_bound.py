"""The cached prior's tail mass and target-error bound on a config's real training data.

    python benchmarks/cached_prior_bound.py --config configs/smollm2_demo.py \
        [--student runs/NAME/hf] [--examples 512] [--config.prior.cache.path=...]

Reads the cache that `python -m qtarget.cache_prior` built for the config, runs the student
(the initial model, or a fine-tuned HF export) on the first examples of the training split,
and prints, over their response tokens, the tail mass t outside the cached top k and
`qtarget.cached_prior.target_error_bound` (the total-variation bound on the target's error)
for the config's method.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from qtarget import cached_prior
from qtarget import checkpoints
from qtarget import targets
from qtarget import train
from qtarget.data import builders
from qtarget.data import pipeline
from qtarget.data import prior_cache_files

_CONFIG = config_flags.DEFINE_config_file('config', None, 'a configs/*.py file')
_STUDENT = flags.DEFINE_string('student', '', 'an HF export to use as the student (default: '
                               'the initial model)')
_EXAMPLES = flags.DEFINE_integer('examples', 512, 'training examples to measure')


def main(argv):
  del argv
  config = _CONFIG.value
  student, tokenizer = train.load_model(config.model, seed=config.seed, with_lora=False)
  if _STUDENT.value:
    student = checkpoints.load_hf(_STUDENT.value)
  builder = train.dataset_builder(config)
  records = builders.load_split(builder, 'train')
  report = pipeline.scan(records, tokenizer, max_length=config.data.seq_len,
                         truncate=config.data.truncate, vocab_size=student.config.vocab_size)
  source = prior_cache_files.open_for_training(config, tokenizer, report,
                                               student.config.vocab_size)
  method = targets.METHODS[config.method]
  hyper = dict(config.hparams)
  model_power, prior_power = method.residual_powers(**hyper)
  tails, bounds = [], []
  for index in range(min(_EXAMPLES.value, len(records))):
    example = pipeline.example_arrays(records[index], tokenizer, config.data.seq_len,
                                      config.data.truncate)
    row = source[index]
    mask = example['loss_mask']
    logits = student(jnp.asarray(example['tokens'])[None])[0][mask]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    cached = cached_prior.CachedPrior(*(jnp.asarray(row[key])
                                        for key in ('token_ids', 'log_probs', 'tail')))
    trust = method.trust_of(targets.label_log_probs(log_probs, jnp.asarray(row['targets'])),
                            log_probs, **hyper)
    bounds.append(np.asarray(cached_prior.target_error_bound(
        cached, logits, jnp.broadcast_to(trust, row['tail'].shape), model_power, prior_power)))
    tails.append(np.exp(row['tail']))
  tails, bounds = np.concatenate(tails), np.concatenate(bounds)
  describe = lambda x: (f'mean {x.mean():.4f}, median {np.median(x):.4f}, 99th percentile '
                        f'{np.percentile(x, 99):.4f}, max {x.max():.4f}')
  print(f'{len(tails)} response tokens of {min(_EXAMPLES.value, len(records))} examples, '
        f'k={source.metadata.k}, method {config.method} {hyper}, student '
        f'{_STUDENT.value or "initial"}')
  print(f'tail mass t: {describe(tails)}')
  print(f'TV bound on the target: {describe(bounds)}')


if __name__ == '__main__':
  sys.exit(app.run(main))
