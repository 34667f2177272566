"""Where our CPU train step spends its time: XLA's per-operation trace, grouped.

    python benchmarks/cpu_profile.py                        # SFT, SmolLM2-135M, 4 x 128
    python benchmarks/cpu_profile.py --method target_sft --length 160
    python benchmarks/cpu_profile.py --xla-flags='--xla_cpu_use_onednn=true' --top 40

Builds the trainer's step as ``benchmarks/cpu.py`` does (same config, weights, batch), runs it
``--warmup`` times, then traces ``--steps`` steps with ``jax.profiler`` (a Perfetto trace with
one event per executed XLA operation, each iteration of the scanned layers included) and reads
the trace back: every event named after an instruction of the compiled program is attributed
to it, and each instruction to one group by its opcode, shape and the name stack jax records
in its metadata (forward or ``transpose(jvp(...))`` backward, inside or outside the layers'
scan, the optimizer after the gradient). Prints the groups' milliseconds per step, the top
instructions with their shapes, and the step's wall time (operations that overlap on the two
threads make the sum exceed it; host work is the rest). ``--hlo FILE`` keeps the optimized
HLO text.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import cpu  # pylint: disable=g-import-not-at-top,wrong-import-position

GROUPS = (
    ('buffers', 'zero-filled buffers (scan stacks, gradient accumulators)'),
    ('optimizer', 'optimizer: clipping, AdamW update, gradient norm'),
    ('head', 'head matmuls (hidden x vocabulary: forward, both gradients)'),
    ('vocab', 'loss over the vocabulary (softmax, cross-entropy, target, metrics)'),
    ('attention', 'attention (scores, mask, softmax, weighted values)'),
    ('copies', 'transposes and copies XLA inserts (with fused elementwise work)'),
    ('layer_dots', 'layer matmuls (q, k, v, o, gate, up, down; forward and backward)'),
    ('elementwise', 'other elementwise (RMSNorm, RoPE, SiLU, residuals, scan slices)'),
)
# The einsums and ops of qtarget.models.attention and jax.nn.dot_product_attention.
_ATTENTION = re.compile(r'BTNH|BSNH|BNTS|btkgd|bskd|bkgts|dot_product_attention|_attention')


def instructions(hlo_text: str) -> dict:
  """name -> (opcode, result shape text, op_name metadata) for every instruction."""
  out = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(', line)
    if not match:
      continue
    op_name = re.search(r'op_name="([^"]*)"', line)
    kind = re.search(r'"kind":"(\w+)"', line)
    out[match.group(1)] = dict(opcode=match.group(3), shape=match.group(2),
                               op_name=op_name.group(1) if op_name else '',
                               library=kind.group(1) if kind else '')
  return out


def group_of(name: str, info: dict, vocab: int) -> str:
  op_name, shape, opcode = info['op_name'], info['shape'], info['opcode']
  is_dot = opcode in ('dot', 'convolution') or (
      opcode == 'fusion' and info['library'] and op_name.endswith('dot_general'))
  if name.startswith('wrapped_broadcast') or (opcode == 'broadcast' and '/while/' not in op_name):
    return 'buffers'
  if '/while/body' not in op_name:
    return 'optimizer'
  if opcode in ('while', 'conditional', 'call'):
    return 'elementwise'  # loop control only: the bodies' operations have their own events
  vocab_sized = re.search(rf'\b{vocab}\b', shape) is not None
  if re.search(r'\.\.\.h,hv->\.\.\.v|\.\.\.v,hv->\.\.\.h|h,\w*v->hv', op_name) or (
      is_dot and vocab_sized):
    return 'head' if is_dot else 'vocab'
  if vocab_sized or op_name.count('/while/body') < 2 and '/closed_call' in op_name:
    return 'vocab'  # outside the layers' scan: the head's loss and the metrics
  if _ATTENTION.search(op_name):
    return 'attention'
  if opcode in ('copy', 'transpose') or name.startswith(('copy', 'transpose')):
    return 'copies'
  if is_dot:
    return 'layer_dots'
  return 'elementwise'


def read_trace(directory: str) -> list[dict]:
  path = glob.glob(os.path.join(directory, 'plugins/profile/*/perfetto_trace.json.gz'))[0]
  data = json.load(gzip.open(path))
  events = data['traceEvents'] if isinstance(data, dict) else data
  return [e for e in events if e.get('ph') == 'X']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='main', choices=sorted(cpu.CONFIGS))
  parser.add_argument('--method', default='sft', choices=('sft', 'target_sft'))
  parser.add_argument('--length', type=int, default=128)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument('--xla-flags', default='', help='added to XLA_FLAGS before jax starts')
  parser.add_argument('--hlo', default='', help='write the optimized HLO text here')
  parser.add_argument('--root', default=str(cpu.ROOT))
  parser.add_argument('--out', default='', help='write the groups and top operations as JSON')
  args = parser.parse_args()
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + args.xla_flags).strip()
  os.environ['QTARGET_BENCH_ROOT'] = args.root
  sys.path.insert(0, args.root)
  cpu._trainer_jax_options()  # pylint: disable=protected-access
  import jax  # pylint: disable=g-import-not-at-top
  from qtarget import train  # pylint: disable=g-import-not-at-top
  config = cpu._config(args.config, args.method, args.length)  # pylint: disable=protected-access
  mesh, rules = cpu._placement(config)  # pylint: disable=protected-access
  student, _ = train.load_model(config.model, seed=config.seed, mesh=mesh, rules=rules)
  prior = None
  if args.method == 'target_sft':
    prior, _ = train.load_model(config.model, seed=config.seed, with_lora=False, mesh=mesh,
                                rules=rules)
  vocab = student.config.vocab_size
  state = train.create_state(config, student, prior, mesh=mesh, rules=rules)
  del student, prior
  step, shardings = train.jit_train_step(jax.eval_shape(lambda: state), mesh, rules)
  state = train.place(state, shardings)
  batch = {k: jax.device_put(v, train.batch_sharding(mesh, rules)) for k, v in
           cpu._token_batch(cpu.BATCH_ROWS, args.length, vocab).items()}  # pylint: disable=protected-access
  compiled = step.lower(state, batch).compile()
  hlo = compiled.as_text()
  if args.hlo:
    pathlib.Path(args.hlo).write_text(hlo)
  table = instructions(hlo)
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
    float(metrics['loss'])
  walls = []
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(args.steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      float(metrics['loss'])
      walls.append(time.perf_counter() - start)
    jax.profiler.stop_trace()
    events = read_trace(trace_dir)
  per_op = collections.Counter()
  calls = collections.Counter()
  for event in events:
    if event['name'] in table:
      per_op[event['name']] += event.get('dur', 0) / 1e3 / args.steps  # ms per step
      calls[event['name']] += 1 / args.steps
  groups = collections.Counter()
  for name, ms in per_op.items():
    groups[group_of(name, table[name], vocab)] += ms
  wall_ms = 1e3 * sorted(walls)[len(walls) // 2]
  total = sum(per_op.values())
  print(f"{cpu._cpu_model()}, {os.cpu_count()} cores; XLA_FLAGS={os.environ['XLA_FLAGS']!r}; "  # pylint: disable=protected-access
        f'{args.method}, {cpu.BATCH_ROWS} x {args.length}; load {os.getloadavg()[0]:.2f}')
  print(f'step wall {wall_ms:.0f} ms (median of {args.steps}); operations {total:.0f} ms')
  print(f"{'group':<75} {'ms/step':>8} {'share':>6}")
  for key, label in GROUPS:
    print(f'{label:<75} {groups[key]:8.0f} {100 * groups[key] / total:5.1f}%')
  print(f'\ntop {args.top} operations (ms per step, calls per step):')
  for name, ms in per_op.most_common(args.top):
    info = table[name]
    print(f"{ms:8.1f} {calls[name]:4.0f}x {group_of(name, info, vocab):<11} {name:<34} "
          f"{info['shape'][:40]:<40} {info['op_name'][-70:]}")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps({
        'wall_ms': wall_ms, 'operations_ms': total, 'groups': dict(groups),
        'top': [(n, ms, table[n]) for n, ms in per_op.most_common(args.top)],
        'xla_flags': os.environ['XLA_FLAGS']}, indent=1))


if __name__ == '__main__':
  main()
