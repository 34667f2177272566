"""Step-by-step demonstrations for arithmetic tasks, clean, corrupted or several per problem.

reasoning-gym's arithmetic tasks come with the final answer only. For the method comparison the
demonstrations are written out step by step, so that their noise can be controlled:

* ``corrupt_fraction``: that fraction of the training problems get one corrupted step: either a
  wrong intermediate number (the result of the step is off by a small amount) or a wrong operator
  (the step adds where it should subtract, or the reverse). Later steps continue from the wrong
  value, as a careless demonstrator would, so the stated final answer is wrong too.
* ``variants``: each problem appears this many times, with as many different valid rationales
  (different orders of accumulating the terms), so the next token of a demonstration is not
  unique given the prefix.

A rationale ends with ``#### <answer>``, the format :func:`qtarget.data.records.extract_answer`
reads first. Held-out problems never go through here: they are scored on their answer.
"""

import dataclasses
import itertools
import json
import random


@dataclasses.dataclass(frozen=True)
class Demonstration:
  response: str
  corrupted: bool
  variant: int


def _signed_terms(expression: str) -> list[int]:
  """'4 - 1 + 7' -> [4, -1, 7]; raises on anything but integers joined by + and -."""
  parts = expression.split()
  if len(parts) % 2 == 0:
    raise ValueError(f'not a chain of + and - between integers: {expression!r}')
  terms = [int(parts[0])]
  for operator, number in zip(parts[1::2], parts[2::2]):
    if operator not in '+-' or len(operator) != 1:
      raise ValueError(f'unsupported operator {operator!r} in {expression!r}')
    terms.append(int(number) if operator == '+' else -int(number))
  return terms


def _orders(count: int, variants: int, rng: random.Random, render) -> list[tuple[int, ...]]:
  """Up to ``variants`` accumulation orders with distinct rationales (``render(order)``), left
  to right first; repeated terms make some orders read the same, and those are skipped."""
  canonical = tuple(range(count))
  others = [p for p in itertools.permutations(range(count)) if p != canonical]
  rng.shuffle(others)
  chosen, seen = [], set()
  for order in [canonical] + others:
    text = render(order)
    if text not in seen:
      seen.add(text)
      chosen.append(order)
    if len(chosen) == variants:
      break
  return chosen


def _corruption(rng: random.Random) -> tuple[str, int]:
  if rng.random() < 0.5:
    return 'operator', 0
  return 'number', rng.choice((-10, -2, -1, 1, 2, 10))


def chain_sum(expression: str, *, order: tuple[int, ...] | None = None,
              corrupt_step: int | None = None, corruption: tuple[str, int] = ('number', 1)) -> str:
  """A rationale for a chain of additions and subtractions, one step per line.

  ``order`` is the order in which the signed terms are accumulated; ``corrupt_step`` (0-based,
  over the ``len(terms) - 1`` steps) is the step made wrong by ``corruption``.
  """
  terms = _signed_terms(expression)
  order = order or tuple(range(len(terms)))
  total = terms[order[0]]
  lines = []
  for step, index in enumerate(order[1:]):
    term = terms[index]
    result = total + term
    if corrupt_step == step:
      if corruption[0] == 'operator' and term != 0:
        term = -term
        result = total + term
      else:  # a wrong number (also when flipping the operator of a 0 would change nothing)
        result += corruption[1] or 1
    lines.append(f"{total} {'+' if term >= 0 else '-'} {abs(term)} = {result}")
    total = result
  return '\n'.join(lines) + f'\n#### {total}'


def products(expression: str, *, order: tuple[int, ...] | None = None,
             corrupt_step: int | None = None, corruption: tuple[str, int] = ('number', 1)) -> str:
  """A rationale for a product of two integers: the larger factor split into tens and ones.

  ``order`` (0, 1) or (1, 0) picks which factor is split; a corrupted step gets a wrong partial
  product (or, for 'operator', subtracts the ones' partial product instead of adding it).
  """
  parts = expression.split()
  if len(parts) != 3 or parts[1] != '*':
    raise ValueError(f'products rationales need two factors: {expression!r}')
  factors = [int(parts[0]), int(parts[2])]
  order = order or (0, 1)
  split, other = factors[order[1]], factors[order[0]]
  tens, ones = split - split % 10, split % 10
  if tens == 0 or ones == 0:  # nothing to split: one line
    result = other * split
    if corrupt_step is not None:
      result += corruption[1] if corruption[0] == 'number' else 1
    return f'{other} * {split} = {result}\n#### {result}'
  first, second = other * tens, other * ones
  if corrupt_step == 0:
    first += corruption[1] if corruption[0] == 'number' else 0
    second = -second if corruption[0] == 'operator' else second
  total = first + second
  sign = '+' if second >= 0 else '-'
  return (f'{other} * {split} = {other} * {tens} {sign} {other} * {ones}\n'
          f'= {first} {sign} {abs(second)}\n= {total}\n#### {total}')


GENERATORS = {'chain_sum': chain_sum, 'products': products}


def _steps(task: str, expression: str) -> int:
  if task == 'chain_sum':
    return len(_signed_terms(expression)) - 1
  return 1


def _num_factors(task: str, expression: str) -> int:
  if task == 'chain_sum':
    return len(_signed_terms(expression))
  return 2


def demonstrations(record: dict, *, variants: int = 1, corrupt_fraction: float = 0.0,
                   rng: random.Random) -> list[Demonstration]:
  """The training demonstrations of one reasoning-gym record (a single corruption draw per
  problem: a corrupted problem has one wrong variant, the others stay valid)."""
  task = record['task']
  if task not in GENERATORS:
    raise ValueError(f'no step-by-step rationales for task {task!r}; known: {sorted(GENERATORS)}.')
  if variants < 1 or not 0.0 <= corrupt_fraction <= 1.0:
    raise ValueError(f'variants must be >= 1 and corrupt_fraction in [0, 1]; got {variants}, '
                     f'{corrupt_fraction}.')
  expression = json.loads(record['metadata'])['metadata']['expression']
  generator = GENERATORS[task]
  orders = _orders(_num_factors(task, expression), variants, rng,
                   lambda order: generator(expression, order=order))
  corrupted_variant = rng.randrange(len(orders)) if rng.random() < corrupt_fraction else None
  out = []
  for variant, order in enumerate(orders):
    if variant == corrupted_variant:
      step = rng.randrange(_steps(task, expression))
      response = generator(expression, order=order, corrupt_step=step,
                           corruption=_corruption(rng))
    else:
      response = generator(expression, order=order)
    out.append(Demonstration(response, variant == corrupted_variant, variant))
  return out
