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
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()  # called below: one compilation per variant
  compile_s = time.perf_counter() - start
  flops = (compiled.cost_analysis() or {}).get('flops')
  analysis = compiled.memory_analysis()
  temp = analysis.temp_size_in_bytes if analysis is not None else None
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return {'step_s': statistics.median(times), 'compiled_flops': flops, 'compile_s': compile_s,
          'temp_bytes': temp, 'loss': float(metrics['loss'])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--gpu', action='store_true')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--loss', default='dense',
                      help="'dense', 'fused' or both, comma-separated (e.g. 'dense,fused')")
  parser.add_argument('--out', default=None,
                      help='JSON file (default: results/train_step_<backend>_<loss>.json)')
  args = parser.parse_args()
  loss_kinds = args.loss.split(',')
  unknown = set(loss_kinds) - {'dense', 'fused'}
  if unknown:
    parser.error(f"unknown --loss {sorted(unknown)}: choose from 'dense', 'fused'")
  if args.gpu:
    arch = dict(QWEN_1P5B, compute_dtype='bfloat16', remat=True)
    batch_size, length = 4, 2048
  else:
    arch = dict(CPU_MODEL, compute_dtype='float32', remat=False)
    batch_size, length = 4, 256
  batch = _batch(batch_size, length, arch['vocab_size'])
  tokens = batch_size * length
  device = f'{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}'
  n_params = llama.LlamaConfig(**{k: v for k, v in arch.items()
                                  if k not in ('compute_dtype', 'remat')}).num_parameters()
  # 6 N T for the forward and backward matmuls of the parameters, plus attention (12 L T^2 d).
  model_flops = (6 * n_params * tokens
                 + 12 * arch['num_layers'] * batch_size * length ** 2 * arch['hidden_size'])
  on_gpu = jax.default_backend() == 'gpu'
  out = pathlib.Path(args.out or pathlib.Path(__file__).parent / 'results'
                     / f"train_step_{jax.default_backend()}_{'_'.join(loss_kinds)}.json")
  out.parent.mkdir(exist_ok=True)
  result = {'device': device, 'shape': arch, 'batch': [batch_size, length],
            'model_flops_per_step': model_flops, 'rows': {}, 'ratios': {}}
  for loss in loss_kinds:
    for name, method, hparams in (('sft', 'sft', {}), ('target_sft', 'target_sft', {'eta': 0.5})):
      row = _time_step(_config(method, hparams, loss), dict(arch), batch, args.repeats)
      row['tokens_per_s'] = tokens / row['step_s']
      if on_gpu:
        row['mfu'] = model_flops / row['step_s'] / PEAK_BF16_FLOPS
      result['rows'][f'{name}_{loss}'] = row
      mfu = f", MFU {100 * row['mfu']:.1f}%" if on_gpu else ''
      print(f"{name} ({loss} loss): {row['step_s']:.3f} s/step, {row['tokens_per_s']:,.0f} "
            f"tokens/s{mfu} (compiled in {row['compile_s']:.0f} s)", flush=True)
      out.write_text(json.dumps(result, indent=2))  # a run cut short keeps what it measured
    ratio = (result['rows'][f'target_sft_{loss}']['step_s']
             / result['rows'][f'sft_{loss}']['step_s'])
    result['ratios'][loss] = ratio
    print(f'Target-SFT / SFT step time ({loss} loss): {ratio:.2f}', flush=True)
  if on_gpu:  # MFU counts the student's model FLOPs against the bf16 peak (989 TFLOP/s)
    print(f'peak used for MFU: {PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s')
  out.write_text(json.dumps(result, indent=2))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
