"""Step-by-step demonstrations: clean ones are right (by reasoning-gym's own answer and scorer),
corrupted ones have exactly one wrong step, variants differ, held-out problems stay untouched."""

import collections
import json
import random
import re

import pytest

from qtarget import evaluate
from qtarget.data import builders
from qtarget.data import rationales
from qtarget.data import records

_STEP = re.compile(r'^(-?\d+) ([+-]) (\d+) = (-?\d+)$')
_CHAIN3 = {'min_terms': 3, 'max_terms': 4, 'min_digits': 1, 'max_digits': 2}


def _wrong_steps(response: str) -> int:
  """Lines whose arithmetic is wrong (each line checked on its own)."""
  wrong = 0
  for line in response.splitlines()[:-1]:
    a, op, b, c = _STEP.match(line).groups()
    wrong += int(a) + (int(b) if op == '+' else -int(b)) != int(c)
  return wrong


def _final(response: str) -> str:
  return records.extract_answer(response, '0')


def _problems(task, difficulty, size=300):
  return list(records.reasoning_gym_records(task, size, 5, difficulty))


def test_clean_chain_sum_rationales_reach_the_gold_answer():
  rng = random.Random(0)
  variant_counts = collections.Counter()
  for record in _problems('chain_sum', _CHAIN3):
    demos = rationales.demonstrations(record, variants=3, rng=rng)
    assert len({d.response for d in demos}) == len(demos) >= 2  # distinct orders (repeated
    # terms can leave fewer than 3 distinct rationales)
    variant_counts[len(demos)] += 1
    for demo in demos:
      assert not demo.corrupted and _wrong_steps(demo.response) == 0
      assert _final(demo.response) == record['answer']
      assert evaluate.score(record, _final(demo.response)) == 1.0
  assert variant_counts[3] > 0.9 * sum(variant_counts.values())


def test_corrupted_chain_sum_rationales_have_one_wrong_step():
  rng = random.Random(1)
  kinds = {'operator': 0, 'number': 0}
  for record in _problems('chain_sum', _CHAIN3):
    (demo,) = rationales.demonstrations(record, corrupt_fraction=1.0, rng=rng)
    assert demo.corrupted
    assert evaluate.score(record, _final(demo.response)) < 1.0  # the wrong step propagates
    wrong = _wrong_steps(demo.response)
    # A wrong number breaks its own line; a wrong operator is a consistent line that reads
    # the problem wrongly, so the final answer alone is off.
    kinds['number' if wrong else 'operator'] += 1
    assert wrong <= 1
  assert min(kinds.values()) > 50  # both kinds occur


def test_corrupt_fraction_and_one_wrong_variant_per_problem():
  rng = random.Random(2)
  problems = _problems('chain_sum', _CHAIN3, size=1000)
  demos = [rationales.demonstrations(r, variants=2, corrupt_fraction=0.3, rng=rng)
           for r in problems]
  corrupted = [sum(d.corrupted for d in pair) for pair in demos]
  assert max(corrupted) == 1
  assert 0.25 < sum(corrupted) / len(problems) < 0.35


def test_products_rationales():
  rng = random.Random(3)
  difficulty = {'min_terms': 2, 'max_terms': 2, 'min_digits': 1, 'max_digits': 2}
  for record in _problems('products', difficulty):
    (clean,) = rationales.demonstrations(record, rng=rng)
    assert evaluate.score(record, _final(clean.response)) == 1.0
    (bad,) = rationales.demonstrations(record, corrupt_fraction=1.0, rng=rng)
    assert evaluate.score(record, _final(bad.response)) < 1.0


def test_bad_options():
  record = _problems('chain_sum', _CHAIN3, size=1)[0]
  with pytest.raises(ValueError, match='no step-by-step rationales'):
    rationales.demonstrations({**record, 'task': 'leg_counting'}, rng=random.Random(0))
  with pytest.raises(ValueError, match='corrupt_fraction'):
    rationales.demonstrations(record, corrupt_fraction=1.5, rng=random.Random(0))
  with pytest.raises(ValueError, match='unknown rationale options'):
    builders.ReasoningGymConfig(task='chain_sum', train_size=4, eval_size=4, seed=0,
                                rationale={'noise': 0.1})
  with pytest.raises(ValueError, match="need rationale style 'steps'"):
    builders.ReasoningGymConfig(task='chain_sum', train_size=4, eval_size=4, seed=0,
                                rationale={'variants': 2})


def test_builder_writes_demonstrations_and_keeps_held_out_problems(tmp_path):
  common = dict(task='chain_sum', train_size=200, eval_size=16, seed=0, difficulty=_CHAIN3)
  plain = builders.prepare(builders.ReasoningGymConfig(**common), str(tmp_path))
  noisy = builders.prepare(builders.ReasoningGymConfig(
      **common, rationale={'style': 'steps', 'variants': 2, 'corrupt_fraction': 0.5}),
      str(tmp_path))
  for split in ('validation', 'test'):
    assert builders.load_split(plain, split) == builders.load_split(noisy, split)
  plain_train, noisy_train = builders.load_split(plain, 'train'), builders.load_split(noisy, 'train')
  assert len(noisy_train) == 2 * len(plain_train)
  held_out = {r['prompt'] for r in builders.load_split(noisy, 'test')}
  assert not held_out & {r['prompt'] for r in noisy_train}
  flags = [json.loads(r['metadata'])['corrupted'] for r in noisy_train]
  assert 0.15 < sum(flags) / len(flags) < 0.35  # half the problems, one of two variants
  for record, corrupted in zip(noisy_train, flags):
    assert '####' in record['response']
    assert (evaluate.score(record, _final(record['response'])) == 1.0) != corrupted
