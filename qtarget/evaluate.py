"""Greedy generation with the KV cache, answer extraction and the task's own scorer.

``evaluate`` turns held-out records into accuracy: prompts through the chat template, batched
greedy decoding (left padding, one compiled program per prompt-length bucket), the final answer
extracted (after ``####``, else the last ``\\boxed{}``, else the last number for numeric answers)
and scored by reasoning-gym's ``score_answer`` for reasoning-gym tasks, or by exact match of the
normalized answer otherwise.
"""

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtarget.data import records as records_lib

_BUCKET = 32  # prompt lengths are padded up to a multiple of this, to limit recompiles


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'eos_id', 'lora'))
def _generate(graphdef, state, tokens_BxP, valid_BxP, *, max_new_tokens, eos_id, lora):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = tokens_BxP.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  positions = jnp.maximum(jnp.cumsum(valid_BxP, axis=1) - 1, 0)
  hidden, cache = model.decode(tokens_BxP, cache, positions_BxT=positions, valid_BxT=valid_BxP,
                               lora=lora)
  first = jnp.argmax(model.logits(hidden[:, -1]), axis=-1).astype(jnp.int32)
  next_position = jnp.sum(valid_BxP, axis=1)

  def step(carry, _):
    token, position, cache, done = carry
    hidden, cache = model.decode(token[:, None], cache, positions_BxT=position[:, None],
                                 lora=lora)
    new_token = jnp.argmax(model.logits(hidden[:, 0]), axis=-1).astype(jnp.int32)
    done = done | (token == eos_id)
    return (jnp.where(done, eos_id, new_token), position + 1, cache, done), token

  init = (first, next_position, cache, jnp.zeros((batch,), bool))
  _, generated = jax.lax.scan(step, init, None, length=max_new_tokens)
  return generated.T  # [B, max_new_tokens]


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
             lora: bool = True, progress=None) -> list[str]:
  """Greedy completions of chat prompts (text up to the end-of-turn token)."""
  graphdef, state = nnx.split(model)
  outputs = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    encoded = [tokenizer.encode_prompt(p) for p in chunk]
    width = -(-max(len(e) for e in encoded) // _BUCKET) * _BUCKET
    rows = len(chunk)
    padded_rows = batch_size  # fixed batch shape: one program per bucket
    tokens = np.zeros((padded_rows, width), np.int32)
    valid = np.zeros((padded_rows, width), bool)
    for i, ids in enumerate(encoded):
      tokens[i, width - len(ids):] = ids
      valid[i, width - len(ids):] = True
    valid[rows:, -1] = True  # filler rows decode one dummy token
    generated = np.asarray(_generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(valid),
                                     max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                                     lora=lora))
    for row in generated[:rows]:
      row = list(row)
      if tokenizer.eos_id in row:
        row = row[:row.index(tokenizer.eos_id)]
      outputs.append(tokenizer.decode(row))
    if progress is not None:
      progress(len(outputs), len(prompts))
  return outputs


@functools.lru_cache(maxsize=None)
def _reasoning_gym_dataset(task: str):
  import reasoning_gym  # pylint: disable=g-import-not-at-top
  return reasoning_gym.create_dataset(task, size=1, seed=0)


def _normalize(answer: str) -> str:
  return answer.strip().rstrip('.').replace(',', '').replace(' ', '')


def score(record: dict, extracted: str) -> float:
  """The task's own score of an extracted answer: reasoning-gym's scorer, or exact match."""
  metadata = json.loads(record.get('metadata') or '{}')
  if record.get('task') not in (None, '', 'file') and 'question' in metadata:
    entry = {'question': metadata['question'], 'answer': metadata['answer'],
             'metadata': metadata['metadata']}
    return float(_reasoning_gym_dataset(record['task']).score_answer(extracted, entry))
  return float(_normalize(extracted) == _normalize(record['answer']))


@dataclasses.dataclass
class EvalResult:
  accuracy: float
  predictions: list[dict]
  seconds: float


def evaluate(model, tokenizer, records: list[dict], *, max_new_tokens: int = 64,
             batch_size: int = 16, lora: bool = True, progress=None) -> EvalResult:
  """Greedy accuracy on records; every prediction kept for re-scoring."""
  start = time.time()
  outputs = generate(model, tokenizer, [r['prompt'] for r in records],
                     max_new_tokens=max_new_tokens, batch_size=batch_size, lora=lora,
                     progress=progress)
  predictions = []
  for record, output in zip(records, outputs):
    extracted = records_lib.extract_answer(output, record['answer'])
    predictions.append({'task': record['task'], 'question': record['prompt'],
                        'gold': record['answer'], 'output': output, 'extracted': extracted,
                        'score': score(record, extracted)})
  accuracy = float(np.mean([p['score'] for p in predictions])) if predictions else 0.0
  return EvalResult(accuracy, predictions, time.time() - start)
