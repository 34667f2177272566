"""The demo shrunk for tests: a random two-layer model with SmolLM2's tokenizer, a few steps."""

from qtarget import config_files

smollm2_demo = config_files.sibling(__file__, 'smollm2_demo')


def get_config():
  config = smollm2_demo.get_config()
  config.workdir = 'runs/tiny'
  config.model.source = 'random'
  config.model.architecture.update(dict(
      vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
      num_kv_heads=2, rope_theta=10000.0, tie_word_embeddings=True))
  # Answer-only sums of two terms (at most 52 tokens an example), not the demo's worked steps.
  config.data.difficulty.update(dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2))
  config.data.rationale.style = ''
  config.data.train_size = 200
  config.data.eval_size = 8
  config.data.seq_len = 128
  config.steps = 6
  config.batch_size = 4
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2
  config.checkpoint.every = 2
  config.eval.num_problems = 8
  config.eval.max_new_tokens = 8
  config.eval.batch_size = 8
  config.progress_bar = False
  return config
