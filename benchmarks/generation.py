"""Batched generation (KV cache) on CPU at the grid's shapes, against a forward pass in the same
process.

  python benchmarks/generation.py [--model HF_DIR] [--root CHECKOUT] [--out outputs.json]

SmolLM2-135M (or an exported HF directory) answers the first test problems of the grid's
chain3 setting: greedy (the grid's primary metric) and sampled (temperature 0.7, top-p 0.95,
4 samples), batch 64, 32 new tokens at most. The baseline is a plain forward of the same
number of rows (logits at every position), timed in the same process, so the ratios
compare checkouts (``--root``: which ``qtarget`` to import) and machines. The teacher-forced
scores of the greedy answers (``calibration.response_token_scores``, the grid's confidence and
calibration) are timed against it too. ``--out`` keeps every generated text, to check that two
checkouts generate the same answers.
"""

import argparse
import hashlib
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='initial', help="an exported HF directory or 'initial'")
  parser.add_argument('--root', default=str(ROOT), help='the checkout whose qtarget to time')
  parser.add_argument('--problems', type=int, default=128)
  parser.add_argument('--out', default='', help='write the generated texts here (JSON)')
  args = parser.parse_args()
  sys.path.insert(0, args.root)
  # pylint: disable=g-import-not-at-top
  import qtarget
  from qtarget import calibration, config_files, evaluate, train
  from qtarget.data import builders
  from qtarget.data import records as records_lib
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  # pylint: enable=g-import-not-at-top
  if not pathlib.Path(qtarget.__file__).resolve().is_relative_to(pathlib.Path(args.root).resolve()):
    raise SystemExit(f'qtarget was imported from {qtarget.__file__}, not from {args.root}.')
  grid = config_files.load_module(ROOT / 'configs/compare2_smollm2.py')
  config = grid.get_config('base/chain3')
  model_config = config.model
  if args.model != 'initial':
    model_config = model_config.copy_and_resolve_references()
    model_config.source, model_config.path = 'hf', args.model
  model, tokenizer = train.load_model(model_config, seed=0, with_lora=False)
  test = builders.load_split(train.dataset_builder(config), 'test')[:args.problems]
  kwargs = dict(max_new_tokens=32, batch_size=64)
  evaluate.evaluate(model, tokenizer, test[:64], **kwargs)  # compiles the greedy program

  def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start

  greedy, greedy_s = timed(lambda: evaluate.evaluate(model, tokenizer, test, **kwargs))
  sampled, sampled_s = timed(lambda: evaluate.evaluate(
      model, tokenizer, test[:args.problems // 4], num_samples=4, temperature=0.7, top_p=0.95,
      seed=0, **kwargs))
  examples = [(r['prompt'], p['output'] or '.', records_lib.system_prompt(r))
              for r, p in zip(test, greedy.predictions)]
  calibration.response_token_scores(model, tokenizer, examples[:64], batch_size=64)  # compiles
  scores, scores_s = timed(lambda: calibration.response_token_scores(model, tokenizer, examples,
                                                                     batch_size=64))
  # The baseline: a plain forward (logits at every position) of the same number of rows, the
  # whole examples padded to a multiple of 32: fixed, the same code in every checkout.
  width = -(-max(len(tokenizer.encode_example(*e).token_ids) - 1 for e in examples) // 32) * 32
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  tokens = jnp.ones((64, width), jnp.int32)
  jax.block_until_ready(forward(state, tokens))
  _, forward_s = timed(lambda: [jax.block_until_ready(forward(state, tokens))
                                for _ in range(-(-len(examples) // 64))])
  outputs = {'greedy': [p['output'] for p in greedy.predictions],
             'sampled': [p['output'] for p in sampled.predictions]}
  digest = hashlib.sha256(json.dumps(outputs).encode()).hexdigest()[:12]
  print(f'qtarget from {qtarget.__file__}; model {args.model}; {len(test)} problems')
  print(f'greedy:  {greedy_s:6.1f} s  ({greedy_s / forward_s:.2f}x the forward), accuracy '
        f'{greedy.accuracy:.3f}')
  print(f'sampled: {sampled_s:6.1f} s  ({sampled_s / forward_s:.2f}x the forward; '
        f'{len(sampled.predictions)} samples), Average@4 {sampled.accuracy:.3f}')
  print(f'scores:  {scores_s:6.1f} s  ({scores_s / forward_s:.2f}x the forward; teacher-forced '
        f'on the greedy answers, mean log-probability {np.mean(np.concatenate([s.log_prob for s in scores])):.6f})')
  print(f'forward: {forward_s:6.1f} s  ({len(examples)} rows of {width} tokens, batch 64)')
  print(f'outputs sha256 {digest}')
  if args.out:
    log_probs = [s.log_prob.tolist() for s in scores]
    pathlib.Path(args.out).write_text(json.dumps({**outputs, 'log_probs': log_probs}))


if __name__ == '__main__':
  main()
