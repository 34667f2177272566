"""Train-step benchmark: SFT vs Target-SFT with an online prior of the student's size.

    python benchmarks/train_step.py          # CPU: a scaled-down decoder
    python benchmarks/train_step.py --gpu    # Qwen2.5-1.5B shape, batch 4 x 2048, remat

Both steps are the real `qtarget.train.train_step` (random weights at the given shape); the
Target-SFT step also runs the prior forward (a second model of the same shape) inside the same
compiled program. Prints median step time, tokens per second, the ratio Target-SFT / SFT and,
on a GPU, model FLOPs utilization of the SFT step against the bf16 peak (989 TFLOP/s, H100/H200).
"""

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from qtarget import train
from qtarget.models import llama

QWEN_1P5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                 num_heads=12, num_kv_heads=2, rope_theta=1e6, tie_word_embeddings=True,
                 attention_bias=True, architecture='qwen2')
CPU_MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4,
                 num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
PEAK_BF16_FLOPS = 989e12


def _config(method, hparams, loss, steps=100):
  config = ml_collections.ConfigDict()
  config.method, config.hparams, config.loss, config.loss_chunk_size = method, hparams, loss, 1024
  config.model = ml_collections.ConfigDict({'lora_rank': 0})
  config.batch_size, config.accum_steps, config.steps = 1, 1, steps
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-5, warmup_steps=10, end_learning_rate_ratio=0.1, weight_decay=0.0,
      b1=0.9, b2=0.95, clip_norm=1.0))
  return config


def _batch(batch, length, vocab):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  return {'tokens': tokens, 'targets': np.roll(tokens, -1, 1),
          'loss_mask': np.ones((batch, length), bool),
          'segment_ids': np.ones((batch, length), np.int32),
          'positions': np.tile(np.arange(length, dtype=np.int32), (batch, 1))}


def _time_step(config, arch, batch, repeats):
  dtype_fields = dict(param_dtype='float32', compute_dtype=arch.pop('compute_dtype'),
                      remat=arch.pop('remat'))
  model_config = llama.LlamaConfig(**arch, **dtype_fields)
  student = llama.Llama(model_config, rngs=nnx.Rngs(0))
  prior = None
  if config.method != 'sft':
    prior = llama.Llama(llama.LlamaConfig(**{**arch, **dtype_fields,
                                             'param_dtype': model_config.compute_dtype}),
                        rngs=nnx.Rngs(1))
  config.batch_size = batch['tokens'].shape[0]
  state = train.create_state(config, student, prior)
  del student, prior
  mesh = train.build_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': -1, 'tensor': 1}))
  step, shardings = train.jit_train_step(jax.eval_shape(lambda: state), mesh,
                                         {'embed': 'fsdp', 'vocab': None})
  state = train.place(state, shardings)
  batch = {k: jax.device_put(v, train.batch_sharding(mesh)) for k, v in batch.items()}
  compiled = step.lower(state, batch).compile()
  flops = (compiled.cost_analysis() or {}).get('flops')
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times), flops


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--gpu', action='store_true')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--loss', default='dense', choices=['dense', 'fused'])
  args = parser.parse_args()
  if args.gpu:
    arch = dict(QWEN_1P5B, compute_dtype='bfloat16', remat=True)
    batch_size, length = 4, 2048
  else:
    arch = dict(CPU_MODEL, compute_dtype='float32', remat=False)
    batch_size, length = 4, 256
  batch = _batch(batch_size, length, arch['vocab_size'])
  tokens = batch_size * length
  device = f'{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}'
  rows = {}
  for name, method, hparams in (('sft', 'sft', {}), ('target_sft', 'target_sft', {'eta': 0.5})):
    seconds, flops = _time_step(_config(method, hparams, args.loss), dict(arch), batch,
                                args.repeats)
    rows[name] = {'step_s': seconds, 'tokens_per_s': tokens / seconds, 'compiled_flops': flops}
    print(f'{name}: {seconds:.3f} s/step, {tokens / seconds:,.0f} tokens/s', flush=True)
  ratio = rows['target_sft']['step_s'] / rows['sft']['step_s']
  print(f'Target-SFT / SFT step time: {ratio:.2f}')
  n_params = llama.LlamaConfig(**{k: v for k, v in arch.items()
                                  if k not in ('compute_dtype', 'remat')}).num_parameters()
  # 6 N T for the forward and backward matmuls of the parameters, plus attention (12 L T^2 d).
  model_flops = (6 * n_params * tokens
                 + 12 * arch['num_layers'] * batch_size * length ** 2 * arch['hidden_size'])
  if jax.default_backend() == 'gpu':
    mfu = model_flops / rows['sft']['step_s'] / PEAK_BF16_FLOPS
    print(f'SFT model FLOPs utilization: {100 * mfu:.1f}% of {PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s')
    rows['sft']['mfu'] = mfu
  out = (pathlib.Path(__file__).parent / 'results'
         / f'train_step_{jax.default_backend()}_{args.loss}.json')
  out.parent.mkdir(exist_ok=True)
  out.write_text(json.dumps({'device': device, 'shape': arch, 'batch': [batch_size, length],
                             'loss': args.loss, 'rows': rows, 'ratio': ratio,
                             'model_flops_per_step': model_flops}, indent=2))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
