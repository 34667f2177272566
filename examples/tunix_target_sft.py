"""Target-SFT trained by Tunix's SFT trainer: a tiny random decoder, the initial model as prior.

Needs the tunix extra (see setup.cfg). Runs on a CPU in well under a minute::

  python examples/tunix_target_sft.py

The task is counting: each row is ``s, s+1, s+2, ...`` (mod the vocabulary), the second half is
the response. Tunix's ``PeftTrainer`` compiles one step holding the student's forward, the
frozen prior's forward, the Target-SFT loss and the AdamW update, and prints the loss per step.
"""

import jax
import numpy as np
import optax
from flax import nnx
from tunix.sft import hooks
from tunix.sft import peft_trainer

from qtarget.integrations import tunix as qtunix
from qtarget.models import llama

VOCAB, SEQ, ROWS, STEPS = 64, 16, 8, 8


def counting_batches(seed: int = 0):
  """Dicts of ``[ROWS, SEQ]`` arrays (qtarget.train's batch layout), one per step."""
  rng = np.random.default_rng(seed)
  for _ in range(STEPS):
    tokens = (rng.integers(0, VOCAB, (ROWS, 1)) + np.arange(SEQ)) % VOCAB
    loss_mask = np.broadcast_to(np.arange(SEQ) >= SEQ // 2, (ROWS, SEQ)).copy()
    loss_mask[:, -1] = False  # the last token has no next token in the row
    yield {'tokens': tokens.astype(np.int32),
           'targets': np.roll(tokens, -1, axis=1).astype(np.int32),
           'loss_mask': loss_mask}


class PrintLoss(hooks.TrainingHooks):
  """Prints Tunix's training loss after each step."""

  def on_train_step_end(self, train_ctx, train_step, train_loss, *step_time):
    # (Tunix 0.1.5 also passes the step's time; 0.1.7 does not.)
    print(f'step {train_step}: loss {float(train_loss):.4f}', flush=True)

  def on_train_start(self, train_ctx):
    pass

  def on_train_end(self, train_ctx):
    pass

  def on_train_step_start(self, train_ctx):
    pass

  def on_eval_step_start(self, train_ctx):
    pass

  def on_eval_step_end(self, train_ctx, eval_loss):
    pass


def main():
  config = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                             num_layers=2, num_heads=4, num_kv_heads=2)
  student = llama.Llama(config, rngs=nnx.Rngs(0))
  # No prior given: a frozen copy of the student as it is now (the initial model).
  model = qtunix.StudentAndPrior(student, 'target_sft', eta=0.5)
  trainer = qtunix.make_trainer(model, optax.adamw(3e-3), peft_trainer.TrainingConfig(
      eval_every_n_steps=STEPS, max_steps=STEPS))
  trainer.with_training_hooks(PrintLoss())
  trainer.train(counting_batches())
  trained = model.student  # the trained decoder; model.prior is still the initial one
  moved = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(nnx.state(trained, nnx.Param)),
      jax.tree.leaves(nnx.state(model.prior, qtunix.PriorWeight))))
  print(f'largest weight change from the prior: {moved:.4f}')


if __name__ == '__main__':
  main()
