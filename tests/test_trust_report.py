"""The trust report: scores against a plain forward of each example, the corrupted step against
the generator that corrupted it, the detector's statistics against their definitions, the
page's structure and numbers, and the page in a real browser (slow)."""

import itertools
import json
import pathlib
import random
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from qtarget import trust_report
from qtarget import trust_scores
from qtarget.data import rationales
from qtarget.models import llama

import availability
import cases

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _model(seed, scale=8.0):
  model = llama.Llama(llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_layers=2, num_heads=4, num_kv_heads=2),
                      rngs=nnx.Rngs(seed))
  for _, variable in nnx.iter_graph(model):  # sharpened: a wrong position or mask shows
    if isinstance(variable, nnx.Param) and variable.get_value().ndim == 2:
      variable.set_value(variable.get_value() * scale)
  return model


def test_scores_match_a_plain_forward_of_model_and_prior():
  model, prior = _model(1), _model(2)
  examples = [('12 13', '20 21 22', '5 9 3'), ('12 13', '20 21 30 31 32', '5 9 3'),
              ('12 14', '20 25', '5 9 3'), ('12 13', '20 34 35 36 37 38 39', '5 9 3')]
  tokenizer = cases.DigitsTokenizer()
  seen = []
  scores = trust_scores.score_demonstrations(model, prior, tokenizer, examples, batch_size=3,
                                             progress=lambda done, total: seen.append(done))
  assert seen == [3, 4]
  for (prompt, response, system), got in zip(examples, scores):
    encoded = tokenizer.encode_example(prompt, response, system=system)
    ids, mask = encoded.token_ids, np.asarray(encoded.loss_mask[1:], bool)
    log_p = np.asarray(jax.nn.log_softmax(model(ids[None, :-1])[0], axis=-1), np.float64)[mask]
    log_q = np.asarray(jax.nn.log_softmax(prior(ids[None, :-1])[0], axis=-1), np.float64)[mask]
    targets = ids[1:][mask]
    p, q = np.exp(log_p), np.exp(log_q)
    np.testing.assert_array_equal(got.token_ids, targets)
    np.testing.assert_allclose(got.trust, p[np.arange(len(targets)), targets], atol=2e-5)
    np.testing.assert_allclose(got.prior_prob, q[np.arange(len(targets)), targets], atol=2e-5)
    np.testing.assert_array_equal(got.prior_top, q.argmax(-1))
    np.testing.assert_allclose(got.total_variation, 0.5 * np.abs(p - q).sum(-1), atol=2e-5)
    np.testing.assert_allclose(got.kl, (p * (log_p - log_q)).sum(-1), atol=5e-4, rtol=1e-4)
  assert min(s.total_variation.max() for s in scores) > 0.05  # two different models


def test_a_model_without_adapters_is_its_own_prior():
  model = _model(3)
  (score,) = trust_scores.score_demonstrations(model, None, cases.DigitsTokenizer(),
                                               [('12 13', '20 21 22', None)])
  np.testing.assert_allclose(score.total_variation, 0.0, atol=1e-6)
  np.testing.assert_allclose(score.trust, score.prior_prob, atol=1e-6)


def test_the_corrupted_step_is_the_line_the_generator_corrupted():
  rng = random.Random(0)
  for _ in range(500):
    terms = [rng.randint(0, 9) for _ in range(3)]
    expression = f'{terms[0]} ' + ' '.join(f'{rng.choice("+-")} {t}' for t in terms[1:])
    signed = trust_scores.chain_terms(expression)
    order, step = tuple(rng.sample(range(3), 3)), rng.randrange(2)
    corruption = rng.choice([('operator', 0), ('number', 2), ('number', -10)])
    clean = rationales.chain_sum(expression, order=order)
    corrupted = rationales.chain_sum(expression, order=order, corrupt_step=step,
                                     corruption=corruption)
    assert trust_scores.corrupted_step_lines(clean, signed) == []
    found = trust_scores.corrupted_step_lines(corrupted, signed)
    if found[0] != step:
      # Ambiguous: the flipped operator gives a term the problem has too, so the first line
      # reads as a valid step of another order and the wrong term shows on the next line.
      first_term = signed[order[step + 1]]
      assert corruption[0] == 'operator' and -first_term in signed and found[0] == step + 1
  for a, b in itertools.product((13, 40, 57), (21, 30, 98)):
    for corruption in (('operator', 0), ('number', 1), ('number', -10)):
      clean = rationales.products(f'{a} * {b}')
      corrupted = rationales.products(f'{a} * {b}', corrupt_step=0, corruption=corruption)
      first_difference = next(i for i, (x, y) in enumerate(zip(clean.split('\n'),
                                                               corrupted.split('\n'))) if x != y)
      assert trust_scores.corrupted_step_lines(clean) == []
      assert trust_scores.corrupted_step_lines(corrupted)[0] == first_difference


def test_auroc_roc_and_precision_by_their_definitions():
  rng = np.random.default_rng(0)
  scores = np.round(rng.normal(size=200), 1)  # ties
  positive = rng.uniform(size=200) < 0.3
  pairs = [(s_p > s_n) + 0.5 * (s_p == s_n) for s_p in scores[positive]
           for s_n in scores[~positive]]
  assert trust_scores.auroc(scores, positive) == pytest.approx(np.mean(pairs), abs=1e-12)
  fpr, tpr = trust_scores.roc_curve(scores, positive)
  assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
  assert np.trapezoid(tpr, fpr) == pytest.approx(np.mean(pairs), abs=1e-12)
  top = np.argsort(-scores, kind='mergesort')[:20]
  assert trust_scores.precision_at(scores, positive, 20) == positive[top].mean()
  with pytest.raises(ValueError, match='both positive and negative'):
    trust_scores.auroc(scores, np.ones(200, bool))


def test_detector_metrics_find_planted_low_trust():
  """Corrupted examples get one very low-trust token inside their wrong step."""
  rng = np.random.default_rng(1)
  scores, corrupted, wrong = [], [], []
  for i in range(200):
    trust = rng.uniform(0.6, 1.0, size=12)
    is_corrupted = i % 4 == 0
    mask = None
    if is_corrupted:
      mask = np.zeros(12, bool)
      mask[4:7] = True
      trust[5] = 0.01
    zeros = np.zeros(12)
    scores.append(trust_scores.TokenTrust(np.zeros(12, np.int32), trust, trust,
                                          np.zeros(12, np.int32), zeros, zeros))
    corrupted.append(is_corrupted)
    wrong.append(mask)
  metrics = trust_scores.detector_metrics(scores, np.array(corrupted), wrong, samples=200,
                                          with_prior=False)
  assert metrics['rankers']['lowest_trust']['auroc'] == 1.0
  assert metrics['rankers']['lowest_trust']['precision'] == 1.0
  assert 'prior_disagreement' not in metrics['rankers']
  assert metrics['locate']['lowest_trust']['accuracy'] == 1.0
  assert metrics['locate']['chance']['accuracy'] == pytest.approx(3 / 12)
  low, high = metrics['rankers']['mean_nll']['auroc_interval']
  assert low <= metrics['rankers']['mean_nll']['auroc'] <= high


def _page_data(page: str) -> dict:
  match = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
  return json.loads(match.group(1).replace('<\\/', '</'))


@availability.needs_smollm2("SmolLM2's tokenizer")
def test_the_page_on_a_config_with_corrupted_demonstrations(tmp_path):
  config = _tiny_config(tmp_path)
  records = trust_report.training_records(config, max_examples=40)
  model, prior, tokenizer = trust_report.load_models(config)
  page, metrics = trust_report.build(config, model, prior, tokenizer, records, batch_size=16)
  data = _page_data(page)['examples']
  assert len(data) == 40
  assert 'src=' not in page and 'http' not in page.replace('http-equiv', '')  # self-contained
  for row, record in zip(data, records):
    assert 0 <= row['min_trust'] <= row['mean_trust'] <= 1
    assert row['min_trust'] == pytest.approx(min(row['trust']), abs=1e-4)
    assert ''.join(row['tokens']).startswith(record['response'])
    assert row['corrupted'] == json.loads(record['metadata'])['corrupted']
    if row['corrupted']:
      assert row['wrong'] is not None and any(row['wrong'])
  assert metrics is not None and 0 < metrics['corrupted'] < 40
  assert '<table id="detector">' in page and 'finding corrupted demonstrations (ROC)' in page
  # The tiny model has no adapters: it is its own prior, and no disagreement is claimed.
  assert 'prior_disagreement' not in metrics['rankers']


def _tiny_config(tmp_path):
  from qtarget import config_files  # pylint: disable=import-outside-toplevel
  config = config_files.load_module(str(ROOT / 'configs' / 'tiny.py')).get_config()
  config.workdir = str(tmp_path / 'run')
  config.data.rationale.style = 'steps'
  config.data.rationale.corrupt_fraction = 0.3
  return config


@availability.needs_smollm2("SmolLM2's tokenizer")
def test_the_command_names_bad_input(tmp_path):
  base = [sys.executable, '-m', 'qtarget.trust_report', '--config', str(ROOT / 'configs/tiny.py'),
          '--max_examples', '4']
  missing = subprocess.run(base + ['--output', str(tmp_path / 'no' / 'r.html')],
                           capture_output=True, text=True, cwd=tmp_path)
  assert missing.returncode != 0 and 'does not exist' in missing.stderr, missing.stderr[-2000:]
  not_a_model = subprocess.run(base + ['--model', str(tmp_path), '--output',
                                       str(tmp_path / 'r.html')],
                               capture_output=True, text=True, cwd=tmp_path)
  assert not_a_model.returncode != 0, not_a_model.stderr[-2000:]
  assert 'not a Hugging Face model directory' in not_a_model.stderr, not_a_model.stderr[-2000:]


def _chromium():
  return shutil.which('chromium') and shutil.which('chromedriver')


@pytest.mark.slow
@pytest.mark.skipif(not _chromium(), reason='needs Debian chromium and chromium-driver')
@availability.needs_smollm2("SmolLM2's tokenizer")
def test_the_page_in_a_browser(tmp_path):
  """Headless Chromium opens the file: no console errors, sorting and filtering change the
  rows shown; a screenshot lands in docs/ (the README shows it)."""
  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  config = _tiny_config(tmp_path)
  records = trust_report.training_records(config, max_examples=120)
  model, prior, tokenizer = trust_report.load_models(config)
  page, _ = trust_report.build(config, model, prior, tokenizer, records)
  path = tmp_path / 'report.html'
  path.write_text(page)
  options = webdriver.ChromeOptions()
  for argument in ('--headless=new', '--no-sandbox', '--disable-gpu', '--window-size=1400,1000'):
    options.add_argument(argument)
  options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
  driver = webdriver.Chrome(service=Service(shutil.which('chromedriver')), options=options)
  try:
    driver.get(path.as_uri())
    ids = lambda: [row.get_attribute('data-id') for row in
                   driver.find_elements(By.CSS_SELECTOR, '#rows tr')]
    first = ids()
    assert len(first) == 100  # a page of 100 of the 120
    driver.find_element(By.CSS_SELECTOR, 'th[data-key="mean_nll"]').click()
    assert ids() != first
    driver.find_element(By.ID, 'only').send_keys('corrupted')
    corrupted = ids()
    assert 0 < len(corrupted) < 100
    assert all(driver.find_elements(By.CSS_SELECTOR, f'#rows tr[data-id="{i}"] .flag')
               for i in corrupted)
    driver.save_screenshot(str(tmp_path / 'trust_report.png'))
    errors = [entry for entry in driver.get_log('browser') if entry['level'] == 'SEVERE']
    assert not errors, errors
  finally:
    driver.quit()
