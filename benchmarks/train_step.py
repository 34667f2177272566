"""Train-step benchmark: variants of the real `qtarget.train.train_step`, side by side.

    python benchmarks/train_step.py                       # CPU: a scaled-down decoder
    python benchmarks/train_step.py --gpu                 # Qwen2.5-1.5B shape, 4 x 2048
    python benchmarks/train_step.py --shape smollm2_28 --compile-only \
        --variants sft/dense/xla/loop/none/4,sft/dense/xla/scan/none/4

A variant is ``method/loss/attention/layers/remat/batch``: method 'sft', 'target_sft'
(eta 0.5, a prior of the student's shape computed in the same step) or 'target_sft_cached'
(the same prior's top-k rows, ``--cache-k``, read with the batch), loss 'dense' or 'fused',
attention a `model.attention` name, layers 'scan' or 'loop', remat 'none'/'full'/'save_dots',
batch the rows per step. Random weights at the given shape; the prior's weights are held in the
compute dtype (`frozen_weights`). Prints compile time, median step time, tokens per second, the
compiled temporaries and, on a GPU, model FLOPs utilization against the bf16 peak (989 TFLOP/s,
H100/H200); each ratio is against the first variant, measured in the same process.
"""

import argparse
import json
import pathlib
import statistics
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from qtarget import train
from qtarget.models import llama

SHAPES = {
    'qwen2p5_1p5b': dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_layers=28, num_heads=12, num_kv_heads=2, rope_theta=1e6,
                         tie_word_embeddings=True, attention_bias=True, architecture='qwen2'),
    # SmolLM2-135M's width at 28 layers (it has 30), for compile times.
    'smollm2_28': dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=28,
                       num_heads=9, num_kv_heads=3, tie_word_embeddings=True),
    # The README's main job: SmolLM2-135M itself.
    'smollm2': dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, tie_word_embeddings=True),
    'cpu': dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4,
                num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
}
PEAK_BF16_FLOPS = 989e12
GPU_VARIANTS = ('sft/dense/reference/loop/full/4,sft/dense/cudnn/scan/full/4,'
                'sft/dense/cudnn/scan/save_dots/4,sft/fused/cudnn/scan/full/4,'
                'target_sft/dense/cudnn/scan/full/4,target_sft/fused/cudnn/scan/full/4,'
                'sft/fused/cudnn/scan/save_dots/8')
CPU_VARIANTS = 'sft/dense/reference/loop/none/4,sft/dense/xla/scan/none/4'
# Issue 17: the cached prior against SFT and the online prior (--shape smollm2).
CACHED_VARIANTS = ('sft/dense/xla/scan/none/4,target_sft/dense/xla/scan/none/4,'
                   'target_sft_cached/dense/xla/scan/none/4,sft/fused/xla/scan/none/4,'
                   'target_sft/fused/xla/scan/none/4,target_sft_cached/fused/xla/scan/none/4')


def parse_variant(text: str) -> dict:
  fields = text.split('/')
  if len(fields) != 6:
    raise SystemExit(f'variant {text!r}: expected method/loss/attention/layers/remat/batch')
  method, loss, attention, layers, remat, batch = fields
  if layers not in ('scan', 'loop'):
    raise SystemExit(f"variant {text!r}: layers must be 'scan' or 'loop'")
  return dict(name=text, method=method, loss=loss, attention=attention,
              scan_layers=layers == 'scan', remat=remat, batch=int(batch))


def _config(variant, steps=100):
  config = ml_collections.ConfigDict()
  config.method, config.loss, config.loss_chunk_size = variant['method'], variant['loss'], 1024
  config.hparams = {'eta': 0.5} if variant['method'] != 'sft' else {}
  if variant['method'] == 'target_sft_cached':
    config.method = 'target_sft'
    config.prior = ml_collections.ConfigDict({'source': 'cached'})
  config.model = ml_collections.ConfigDict({'lora_rank': 0})
  config.batch_size, config.accum_steps, config.steps = variant['batch'], 1, steps
  config.frozen_weights = 'compute_dtype'
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-5, warmup_steps=10, end_learning_rate_ratio=0.1, weight_decay=0.0,
      b1=0.9, b2=0.95, clip_norm=1.0))
  return config


def _batch(batch, length, vocab):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  segment_ids = np.ones((batch, length), np.int32)
  segment_ids[:, length // 2:] = 2  # two packed examples per row
  positions = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
  positions[:, length // 2:] -= length // 2
  return {'tokens': tokens, 'targets': np.roll(tokens, -1, 1),
          'loss_mask': np.ones((batch, length), bool), 'segment_ids': segment_ids,
          'positions': positions}


def _cache(batch, length, vocab, k):
  """Cache rows of a random prior: the top k of random logits, as cache_prior stores them."""
  from qtarget import cached_prior  # pylint: disable=g-import-not-at-top
  # 256 positions at a time: the whole [B, T, V] would need tens of GiB at Qwen's vocabulary.
  rows = jax.jit(lambda key: cached_prior.from_logits(
      3 * jax.random.normal(key, (256, vocab)), k))
  keys = jax.random.split(jax.random.key(2), batch * length // 256)
  parts = [jax.device_get(rows(key)) for key in keys]
  return {name: np.concatenate([p[i] for p in parts]).reshape((batch, length) + parts[0][i].shape[1:])
          for i, name in enumerate(train.CACHED_PRIOR_KEYS)}


def _run(variant, arch, compute_dtype, length, repeats, compile_only, cache_k=64):
  model_config = llama.LlamaConfig(**arch, param_dtype='float32', compute_dtype=compute_dtype,
                                   remat=variant['remat'], attention=variant['attention'],
                                   scan_layers=variant['scan_layers'])
  config = _config(variant)
  student = llama.Llama(model_config, rngs=nnx.Rngs(0))
  prior = (llama.Llama(model_config, rngs=nnx.Rngs(1)) if variant['method'] == 'target_sft'
           else None)
  state = train.create_state(config, student, prior)
  del student, prior
  mesh = train.build_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': -1, 'tensor': 1}))
  step, shardings = train.jit_train_step(jax.eval_shape(lambda: state), mesh,
                                         {'embed': 'fsdp', 'vocab': None})
  state = train.place(state, shardings)
  arrays = _batch(variant['batch'], length, arch['vocab_size'])
  if variant['method'] == 'target_sft_cached':
    arrays.update(_cache(variant['batch'], length, arch['vocab_size'], cache_k))
  batch = {k: jax.device_put(v, train.batch_sharding(mesh)) for k, v in arrays.items()}
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  row = {'compile_s': time.perf_counter() - start}
  row['compiled_flops'] = (compiled.cost_analysis() or {}).get('flops')
  analysis = compiled.memory_analysis()
  row['temp_bytes'] = analysis.temp_size_in_bytes if analysis is not None else None
  if compile_only:
    return row
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  row.update(step_s=statistics.median(times), loss=float(metrics['loss']))
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--gpu', action='store_true',
                      help='the Qwen2.5-1.5B shape, bfloat16, length 2048, GPU variants')
  parser.add_argument('--shape', choices=sorted(SHAPES), default=None)
  parser.add_argument('--length', type=int, default=None)
  parser.add_argument('--variants', default=None, help=__doc__.split('\n\n')[1])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--compile-only', action='store_true')
  parser.add_argument('--cache-k', type=int, default=64,
                      help="top-k of the 'target_sft_cached' variants")
  parser.add_argument('--cached', action='store_true',
                      help='the cached-prior variants (CACHED_VARIANTS) unless --variants')
  parser.add_argument('--out', default=None, help='JSON file (default: results/...)')
  args = parser.parse_args()
  shape = args.shape or ('qwen2p5_1p5b' if args.gpu else 'cpu')
  arch = SHAPES[shape]
  compute_dtype = 'bfloat16' if args.gpu else 'float32'
  length = args.length or (2048 if args.gpu else 256)
  variants = [parse_variant(v) for v in
              (args.variants or (CACHED_VARIANTS if args.cached else GPU_VARIANTS if args.gpu
                                 else CPU_VARIANTS)).split(',')]
  device = f'{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}'
  n_params = llama.LlamaConfig(**arch).num_parameters()
  on_gpu = jax.default_backend() == 'gpu'
  out = pathlib.Path(args.out or pathlib.Path(__file__).parent / 'results'
                     / f'train_step_{jax.default_backend()}_{shape}.json')
  out.parent.mkdir(exist_ok=True)
  result = {'device': device, 'shape': shape, 'arch': arch, 'length': length,
            'compute_dtype': compute_dtype, 'rows': {}}
  first = None
  for variant in variants:
    try:
      row = _run(variant, dict(arch), compute_dtype, length, args.repeats, args.compile_only,
                 args.cache_k)
    except Exception as error:  # pylint: disable=broad-except
      result['rows'][variant['name']] = {'error': f'{type(error).__name__}: {error}'[:2000]}
      print(f"{variant['name']}: failed: {type(error).__name__}: {str(error)[:400]}", flush=True)
      out.write_text(json.dumps(result, indent=2))
      continue
    tokens = variant['batch'] * length
    # 6 N T for the student's parameter matmuls (forward and backward) plus 12 L B T^2 H for
    # attention counted without the causal half, as in the earlier results (comparable MFU).
    model_flops = (6 * n_params * tokens
                   + 12 * arch['num_layers'] * variant['batch'] * length ** 2 * arch['hidden_size'])
    text = f"{variant['name']}: compiled in {row['compile_s']:.1f} s"
    if row['temp_bytes'] is not None:
      text += f", temporaries {row['temp_bytes'] / 2**30:.2f} GiB"
    if 'step_s' in row:
      row['tokens_per_s'] = tokens / row['step_s']
      text += f", {row['step_s']:.3f} s/step, {row['tokens_per_s']:,.0f} tokens/s"
      if on_gpu:
        row['mfu'] = model_flops / row['step_s'] / PEAK_BF16_FLOPS
        text += f", MFU {100 * row['mfu']:.1f}%"
    first = first or row
    key = 'step_s' if 'step_s' in row else 'compile_s'
    row[f'{key}_ratio_to_first'] = row[key] / first[key]
    text += f" ({row[f'{key}_ratio_to_first']:.2f}x the first variant's {key})"
    result['rows'][variant['name']] = row
    print(text, flush=True)
    out.write_text(json.dumps(result, indent=2))  # a run cut short keeps what it measured
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
