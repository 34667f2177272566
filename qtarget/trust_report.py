r"""Which training demonstrations the target distrusts, as one HTML page.

    python -m qtarget.trust_report --config configs/NAME.py [--config.KEY=VALUE ...] \
        [--model HF_DIR] [--prior config|initial|HF_DIR] [--max_examples N] \
        --output report.html

Scores the config's training demonstrations (reasoning-gym or the user's JSONL/parquet files,
read as the trainer reads them) with a model (``--model``: a Hugging Face directory such as a
run's ``WORKDIR/hf`` export; default: the config's model as loaded for training) and a prior
(``config``: the config's prior; ``initial``: the config's model before training; or a Hugging
Face directory), and writes one self-contained HTML file: every demonstration token by token,
coloured by its trust :math:`p_y` (Target-SFT's and DFT's trust), the prior's top token and
disagreement (TV, KL) on hover, sortable and filterable, with the distribution of trust and,
where the data marks corrupted demonstrations (``data.rationale.corrupt_fraction``), the ROC of
finding them by low trust (:mod:`qtarget.trust_scores`).
"""

import json
import pathlib
import sys
import time

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command's flags (defined when it runs: importing the module defines none, so it can be
  imported beside the trainer's command)."""
  config_flags.DEFINE_config_file(
      'config', None, 'a configs/*.py file (its data and models); override with '
      '--config.KEY=VALUE', lock_config=True)
  flags.DEFINE_string('model', '', "a Hugging Face directory to score with (a run's WORKDIR/hf "
                      "export); empty: the config's model")
  flags.DEFINE_string('prior', 'config', "'config' (the config's prior), 'initial' (the "
                      "config's model before training) or a Hugging Face directory")
  flags.DEFINE_string('output', 'trust_report.html', 'the HTML file to write')
  flags.DEFINE_integer('max_examples', 0, 'score the first N demonstrations (0: all)')
  flags.DEFINE_integer('batch_size', 32, 'demonstrations per compiled call')


class ReportError(ValueError):
  """Bad input to the report: the message says what and how to fix it."""


def _hf(model_config, path: str, what: str):
  directory = pathlib.Path(path)
  if not (directory / 'config.json').is_file():
    raise ReportError(f'--{what}={path}: not a Hugging Face model directory (no config.json); '
                      "give a run's WORKDIR/hf export or another HF checkpoint directory.")
  resolved = model_config.copy_and_resolve_references()
  with resolved.unlocked():
    resolved.source, resolved.path, resolved.lora_rank = 'hf', str(directory), 0
  return resolved


def load_models(config, model_path: str = '', prior: str = 'config'):
  """``(model, prior or None, tokenizer)``; ``None`` for the prior means the model itself
  with any LoRA adapters off (the config's initial model when no ``model_path`` is given)."""
  from qtarget.train import loading  # pylint: disable=g-import-not-at-top
  model_config = _hf(config.model, model_path, 'model') if model_path else config.model
  model, tokenizer = loading.load_model(model_config, seed=config.seed)
  if prior == 'initial' or (prior == 'config' and config.prior.source == 'initial'):
    if not model_path:
      return model, None, tokenizer
    prior_model, prior_tokenizer = loading.load_model(config.model, seed=config.seed,
                                                      with_lora=False)
  elif prior == 'config':
    if config.prior.source == 'cached':
      raise ReportError("the config's prior is a top-k cache, which has no full distribution "
                        'to compare with: pass --prior initial or --prior HF_DIR.')
    prior_model, prior_tokenizer = loading.load_model(config.prior, seed=config.seed + 1,
                                                      with_lora=False)
  else:
    prior_model, prior_tokenizer = loading.load_model(_hf(config.prior, prior, 'prior'),
                                                      seed=config.seed + 1, with_lora=False)
  loading.check_same_vocabulary(tokenizer, prior_tokenizer)
  return model, prior_model, tokenizer


def training_records(config, max_examples: int = 0) -> list[dict]:
  """The config's training demonstrations, as the trainer reads them."""
  from qtarget.data import builders, splits  # pylint: disable=g-import-not-at-top
  records = builders.load_split(splits.dataset_builder(config), 'train')
  if max_examples < 0:
    raise ReportError(f'--max_examples={max_examples}: must be >= 0 (0: all).')
  records = records[:max_examples] if max_examples else records
  if not records:
    raise ReportError('the training split holds no demonstrations.')
  return records


def build(config, model, prior, tokenizer, records: list[dict], *, batch_size: int = 32,
          progress=None) -> tuple[str, dict | None]:
  """The page's text and the detector's metrics (None without corruption labels)."""
  from qtarget import trust_html  # pylint: disable=g-import-not-at-top
  from qtarget import trust_scores  # pylint: disable=g-import-not-at-top
  from qtarget.data import records as records_lib  # pylint: disable=g-import-not-at-top
  examples = [(r['prompt'], r['response'], records_lib.system_prompt(r)) for r in records]
  scores = trust_scores.score_demonstrations(model, prior, tokenizer, examples,
                                             batch_size=batch_size, progress=progress)
  metadata = [json.loads(r.get('metadata') or '{}') for r in records]
  labelled = all('corrupted' in m for m in metadata)
  corrupted = np.array([bool(m.get('corrupted')) for m in metadata])
  text = lambda i: tokenizer.decode([int(i)], skip_special_tokens=False)
  rows, wrong_tokens = [], []
  for index, (record, score) in enumerate(zip(records, scores)):
    wrong = None
    if labelled and corrupted[index]:
      expression = metadata[index].get('metadata', {}).get('expression', '')
      lines = trust_scores.corrupted_step_lines(record['response'],
                                                trust_scores.chain_terms(expression))
      if lines:
        wrong = trust_scores.token_lines(tokenizer, score.token_ids,
                                         record['response']) == lines[0]
    wrong_tokens.append(wrong)
    rows.append(trust_html.example_row(
        index, record['prompt'], [text(i) for i in score.token_ids], score,
        [text(i) for i in score.prior_top], bool(corrupted[index]) if labelled else None,
        wrong))
  metrics = roc = None
  # The model with LoRA off is the model itself where it has no adapters: no disagreement.
  with_prior = prior is not None or bool(model.config.lora_rank)
  if labelled and 0 < corrupted.sum() < len(corrupted):
    metrics = trust_scores.detector_metrics(scores, corrupted, wrong_tokens,
                                            with_prior=with_prior)
    roc = {}
    rankers = [('lowest trust', [-s.trust.min() for s in scores]),
               ('mean NLL', [row['mean_nll'] for row in rows])]
    if with_prior:
      rankers.append(('largest TV to prior', [s.total_variation.max() for s in scores]))
    for name, values in rankers:
      fpr, tpr = trust_scores.roc_curve(np.asarray(values), corrupted)
      roc[name] = (fpr, tpr, trust_scores.auroc(np.asarray(values), corrupted))
  title = f'Token trust of {len(rows)} demonstrations of {config.data.task}'
  prior_text = ('a separate model' if prior is not None else 'the model with its adapters off'
                if with_prior else 'the model itself (no disagreement to show)')
  description = (f'Trust p_y of each demonstrated token under the scoring model; the prior is '
                 f'{prior_text}.'
                 ' Red: the model finds the token implausible, so a Target-SFT target moves '
                 'mass from it to the prior.')
  return trust_html.render(title, description, rows, metrics, roc), metrics


def main(argv) -> None:
  del argv
  from qtarget.train import checks  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  if config is None:
    raise ReportError('no config: python -m qtarget.trust_report --config configs/NAME.py '
                      '--output report.html')
  checks.check_config(config)
  output = pathlib.Path(FLAGS.output)
  if not output.parent.is_dir():
    raise ReportError(f'--output={output}: the directory {output.parent} does not exist.')
  if FLAGS.batch_size < 1:
    raise ReportError(f'--batch_size={FLAGS.batch_size}: must be >= 1.')
  records = training_records(config, FLAGS.max_examples)
  model, prior, tokenizer = load_models(config, FLAGS.model, FLAGS.prior)
  started = time.time()

  def progress(done, total):
    print(f'\r[qtarget] scored {done} of {total} demonstrations '
          f'({done / max(time.time() - started, 1e-9):.0f}/s)', end='', flush=True)

  page, metrics = build(config, model, prior, tokenizer, records,
                        batch_size=FLAGS.batch_size, progress=progress)
  print()
  output.write_text(page)
  print(f'[qtarget] wrote {output} ({output.stat().st_size / 1e6:.1f} MB, {len(records)} '
        f'demonstrations, {time.time() - started:.0f} s)')
  if metrics:
    for name, m in metrics['rankers'].items():
      print(f'[qtarget] {name}: AUROC {m["auroc"]:.3f} [{m["auroc_interval"][0]:.3f}, '
            f'{m["auroc_interval"][1]:.3f}], precision at the corruption rate '
            f'{m["precision"]:.3f}')


def run() -> None:
  _define_flags()
  try:
    app.run(main)
  except ReportError as error:
    sys.exit(f'[qtarget] {error}')


if __name__ == '__main__':
  run()
