"""Base accuracy of SmolLM2-135M-Instruct on candidate reasoning-gym tasks, before any comparison.

The comparison needs tasks at the edge of the model: held-out accuracy of the untouched model
between about 5% and 50%. Each candidate is scored by the same harness as the comparison (chat
prompt, greedy and sampled decoding, reasoning-gym's scorer) on its held-out test split; results
are appended to ``task_selection.jsonl`` beside this script (the first grid's archive) and
candidates already there are skipped, so the script resumes.

  python experiments/grid1/select_tasks.py [--num_problems 64] [--num_samples 4]
"""

import argparse
import json
import pathlib

import tensorflow_datasets as tfds

from qtarget import checkpoints, evaluate
from qtarget.data import builders

CANDIDATES = (
    ('chain_sum', {'min_terms': 2, 'max_terms': 2, 'min_digits': 1, 'max_digits': 1}),
    ('chain_sum', {'min_terms': 2, 'max_terms': 2, 'min_digits': 1, 'max_digits': 2}),
    ('chain_sum', {'min_terms': 3, 'max_terms': 3, 'min_digits': 1, 'max_digits': 1}),
    ('chain_sum', {'min_terms': 2, 'max_terms': 2, 'min_digits': 2, 'max_digits': 2}),
    ('chain_sum', {'min_terms': 3, 'max_terms': 3, 'min_digits': 2, 'max_digits': 2}),
    ('products', {'min_terms': 2, 'max_terms': 2, 'min_digits': 1, 'max_digits': 1}),
    ('products', {'min_terms': 2, 'max_terms': 2, 'min_digits': 1, 'max_digits': 2}),
)
OUT = pathlib.Path(__file__).parent / 'task_selection.jsonl'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_problems', type=int, default=64)
  parser.add_argument('--num_samples', type=int, default=4)
  parser.add_argument('--temperature', type=float, default=0.7)
  parser.add_argument('--max_new_tokens', type=int, default=48)
  args = parser.parse_args()
  tfds.disable_progress_bar()
  done = set()
  if OUT.exists():
    done = {json.dumps([r['task'], r['difficulty']], sort_keys=True)
            for r in map(json.loads, OUT.read_text().splitlines())}
  model, tokenizer = checkpoints.load_gguf()
  for task, difficulty in CANDIDATES:
    key = json.dumps([task, difficulty], sort_keys=True)
    if key in done:
      print(f'{task} {difficulty}: done already')
      continue
    try:
      builder = builders.prepare(builders.ReasoningGymConfig(
          task=task, train_size=16, eval_size=args.num_problems, seed=0, difficulty=difficulty))
    except ValueError as error:  # e.g. fewer distinct problems than the held-out splits need
      row = {'task': task, 'difficulty': difficulty, 'error': str(error)}
      print(json.dumps(row), flush=True)
      with OUT.open('a') as f:
        f.write(json.dumps(row) + '\n')
      continue
    problems = builders.load_split(builder, 'test')
    greedy = evaluate.evaluate(model, tokenizer, problems, max_new_tokens=args.max_new_tokens,
                               batch_size=32)
    sampled = evaluate.evaluate(model, tokenizer, problems, max_new_tokens=args.max_new_tokens,
                                batch_size=64, num_samples=args.num_samples,
                                temperature=args.temperature, top_p=0.95)
    row = {'task': task, 'difficulty': difficulty, 'num_problems': len(problems),
           'greedy_accuracy': greedy.accuracy, 'greedy_seconds': round(greedy.seconds, 1),
           f'average_at_{args.num_samples}': sampled.accuracy,
           f'pass_at_{args.num_samples}': sampled.pass_at_k, 'temperature': args.temperature,
           'sampled_seconds': round(sampled.seconds, 1),
           'example_output': greedy.predictions[0]['output'][:200]}
    print(json.dumps(row), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open('a') as f:
      f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
  main()
