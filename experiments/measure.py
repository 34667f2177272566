"""Everything a grid measures of one model, in one process (``experiments.compare`` calls it).

  python -m experiments.measure --config configs/compare2_smollm2.py --name RUN \
      --model WORKDIR/hf|initial --out DIR

What a run gets is what its grid declares (``measurements(name)``, ``measure``, ``tasks``).

Writes ``DIR/measure.json`` and one predictions file per evaluation:

- ``test_greedy``: greedy answers to the first ``test_problems`` test problems (the primary
  metric), each with its confidence: the mean probability the model gives its own answer's
  tokens, teacher-forced;
- ``test_sampled``: ``num_samples`` sampled answers to the first ``sampled_problems`` (Average@k,
  pass@k);
- ``validation`` (the selection runs of tuned methods, and Base): greedy on the validation
  split, to select on;
- ``harder`` / ``easier``: greedy on problems of a harder and an easier variant (of the same
  task, or another where it has none), none of them in the setting's training or test split;
- ``calibration`` (where the task has step-by-step demonstrations): token-level expected
  calibration error (15 bins) and mean NLL of the model on held-out clean demonstrations of the
  first test problems, teacher-forced; and fit: the mean NLL of the first training examples (as
  the trainer reads them).
"""

import argparse
import json
import pathlib
import random
import time

import numpy as np

from experiments import grids

VARIANT_SEED = 2_000_000_000  # far from every split's problem sequence (builders.split_seed)


def _log(message: str) -> None:
  print(f'[measure {time.strftime("%H:%M:%S")}] {message}', flush=True)


def variant_records(task: str, difficulty: dict, count: int, excluded: set[str]) -> list[dict]:
  """``count`` problems of another difficulty, none of whose questions is in ``excluded``."""
  from qtarget.data import records  # pylint: disable=g-import-not-at-top
  draws = 8 * count
  chosen = [r for r in records.reasoning_gym_records(task, draws, VARIANT_SEED, difficulty)
            if r['prompt'] not in excluded][:count]
  if len(chosen) < count:
    raise ValueError(f'{task} {difficulty}: only {len(chosen)} of {draws} problems are not in '
                     f'the training or test split; {count} were asked for.')
  return chosen


def _write(path: pathlib.Path, rows: list[dict]) -> None:
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))


def _greedy(model, tokenizer, records, max_new_tokens, batch_size, label, out, fields):
  from qtarget import evaluate  # pylint: disable=g-import-not-at-top
  result = evaluate.evaluate(model, tokenizer, records, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
  path = out / f'predictions_{label}.jsonl'
  _write(path, [{**p, **fields} for p in result.predictions])
  _log(f'{label}: accuracy {result.accuracy:.3f} ({len(records)} problems, '
       f'{result.seconds:.0f} s)')
  return result, {'accuracy': result.accuracy, 'problems': len(records), 'k': 1,
                  'predictions': str(path), 'seconds': round(result.seconds, 1)}


def _mean_nll(scores) -> float:
  return float(-np.concatenate([s.log_prob for s in scores]).mean())


def _test_greedy(model, tokenizer, test, spec, settings, out, fields) -> dict:
  """Greedy answers to the first test problems, each with its confidence: the mean probability
  of the answer's own tokens and its end of turn, teacher-forced (empty answers: none; an
  answer cut at max_new_tokens is scored as if it ended there)."""
  from qtarget import calibration  # pylint: disable=g-import-not-at-top
  from qtarget.data import records as records_lib  # pylint: disable=g-import-not-at-top
  records = test[:settings['test_problems']]
  greedy, scored = _greedy(model, tokenizer, records, spec['max_new_tokens'],
                           settings['batch_size'], 'test_greedy', out, fields)
  answered = [i for i, p in enumerate(greedy.predictions) if p['output']]
  token_scores = calibration.response_token_scores(
      model, tokenizer, [(records[i]['prompt'], greedy.predictions[i]['output'],
                          records_lib.system_prompt(records[i])) for i in answered],
      batch_size=settings['batch_size'])
  confidence = dict(zip(answered, (float(np.exp(s.log_prob).mean()) for s in token_scores)))
  rows = [{**p, **fields, 'confidence': confidence.get(i)}
          for i, p in enumerate(greedy.predictions)]
  _write(pathlib.Path(scored['predictions']), rows)
  return scored


def _test_sampled(model, tokenizer, test, spec, settings, seed, out, fields) -> dict:
  """``num_samples`` sampled answers to the first ``sampled_problems``: Average@k, pass@k."""
  from qtarget import evaluate  # pylint: disable=g-import-not-at-top
  records = test[:settings['sampled_problems']]
  k = settings['num_samples']
  sampled = evaluate.evaluate(model, tokenizer, records, max_new_tokens=spec['max_new_tokens'],
                              batch_size=settings['batch_size'], num_samples=k,
                              temperature=settings['temperature'], top_p=settings['top_p'],
                              seed=seed)
  path = out / 'predictions_test_sampled.jsonl'
  _write(path, [{**p, **fields} for p in sampled.predictions])
  _log(f'test_sampled: Average@{k} {sampled.accuracy:.3f}, pass@{k} {sampled.pass_at_k:.3f}')
  return {'accuracy': sampled.accuracy, f'pass_at_{k}': sampled.pass_at_k, 'k': k,
          'problems': len(records), 'predictions': str(path),
          'seconds': round(sampled.seconds, 1)}


def _calibration_and_fit(model, tokenizer, test, train_records, settings) -> tuple[dict, dict]:
  """Token-level calibration on held-out clean demonstrations of the first test problems, and
  the fit: mean NLL of the first training examples (both teacher-forced)."""
  from qtarget import calibration  # pylint: disable=g-import-not-at-top
  from qtarget.data import rationales  # pylint: disable=g-import-not-at-top
  from qtarget.data import records as records_lib  # pylint: disable=g-import-not-at-top
  batch = settings['batch_size']
  rng = random.Random(0)
  held_out = [(r['prompt'], rationales.demonstrations(r, rng=rng)[0].response,
               records_lib.system_prompt(r)) for r in test[:settings['calibration_examples']]]
  held_out_scores = calibration.response_token_scores(model, tokenizer, held_out,
                                                      batch_size=batch)
  top_prob = np.concatenate([s.top_prob for s in held_out_scores])
  top_correct = np.concatenate([s.top_correct for s in held_out_scores])
  ece, bins = calibration.expected_calibration_error(top_prob, top_correct, num_bins=15)
  fit = [(r['prompt'], r['response'], records_lib.system_prompt(r))
         for r in train_records[:settings['fit_examples']]]
  calibrated = {
      'ece': ece, 'bins': bins, 'tokens': int(top_prob.size),
      'token_accuracy': float(top_correct.mean()), 'mean_top_prob': float(top_prob.mean()),
      'held_out_nll': _mean_nll(held_out_scores), 'examples': len(held_out)}
  fitted = {'train_nll': _mean_nll(calibration.response_token_scores(
      model, tokenizer, fit, batch_size=batch)), 'examples': len(fit)}
  _log(f"calibration: ECE {ece:.4f}, held-out NLL {calibrated['held_out_nll']:.4f}, "
       f"train NLL {fitted['train_nll']:.4f}")
  return calibrated, fitted


def measure(grid, name: str, model_path: str, out: pathlib.Path) -> dict:
  """Measures ``model_path`` (an export, or 'initial' for the untouched model) as run ``name``
  of ``grid``; writes ``out/measure.json`` and the prediction files, and returns the result."""
  from qtarget import train  # pylint: disable=g-import-not-at-top
  from qtarget.data import builders  # pylint: disable=g-import-not-at-top
  started, cpu_started = time.time(), time.process_time()
  config = grid.get_config(name)
  spec = grid.tasks[grid.task_of(name)]
  plan, settings = grid.measurements(name), grid.measure
  model_config = config.model
  if model_path != 'initial':
    model_config = model_config.copy_and_resolve_references()
    model_config.source, model_config.path = 'hf', model_path
  model, tokenizer = train.load_model(model_config, seed=config.seed, with_lora=False)
  builder = train.dataset_builder(config)
  test = builders.load_split(builder, 'test')
  train_records = builders.load_split(builder, 'train')
  fields = {'run': name, 'seed': config.seed}
  batch = settings['batch_size']
  result = {'name': name, 'model': model_path}
  scored = result['scored'] = {}
  scored['test_greedy'] = _test_greedy(model, tokenizer, test, spec, settings, out, fields)
  if plan['sampled']:
    scored['test_sampled'] = _test_sampled(model, tokenizer, test, spec, settings, config.seed,
                                           out, fields)
  if plan['validation']:
    validation = builders.load_split(builder, 'validation')[:settings['validation_problems']]
    if {r['prompt'] for r in validation} & {r['prompt'] for r in test}:
      raise ValueError('the validation split shares problems with the test split.')
    _, scored['validation'] = _greedy(model, tokenizer, validation, spec['max_new_tokens'],
                                      batch, 'validation', out, fields)
  if plan['variants']:
    excluded = {r['prompt'] for r in train_records + test}
    for label in ('harder', 'easier'):
      task, difficulty, max_new_tokens = spec[label]
      records = variant_records(task, difficulty, settings['variant_problems'], excluded)
      _, scored[label] = _greedy(model, tokenizer, records, max_new_tokens, batch, label, out,
                                 fields)
      scored[label].update(task=task, difficulty=difficulty)
  result['calibration'], result['fit'] = (
      _calibration_and_fit(model, tokenizer, test, train_records, settings)
      if plan['calibration'] else (None, None))
  result['accuracy'] = scored['test_greedy']['accuracy']
  result['seconds'] = round(time.time() - started, 1)
  result['cpu_seconds'] = round(time.process_time() - cpu_started, 1)  # all threads
  (out / 'measure.json').write_text(json.dumps(result, indent=2))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='a grid config (its GRID declaration)')
  parser.add_argument('--name', required=True, help='the run: SETTING/METHOD/SEED, base/TASK')
  parser.add_argument('--model', required=True, help="an exported HF directory, or 'initial'")
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  measure(grids.load(args.config), args.name, args.model, out)


if __name__ == '__main__':
  main()
