"""The paper's setting: Qwen2.5-Math-1.5B fine-tuned with Target-SFT on NuminaMath-CoT.

For a GPU or TPU mesh. Set the local paths (no hub downloads happen at run time):
  --config.model.path=/data/Qwen2.5-Math-1.5B        (a Hugging Face directory)
  --config.prior.path=/data/Qwen2.5-Math-7B          (the teacher: same tokenizer)
  --config.data.train_path=/data/numina_cot.jsonl    (NuminaMath-CoT: problem/solution/messages)
  --config.data.eval_path=/data/math500.jsonl        (held-out problems with an answer field)
Use --config.prior.source=initial for the frozen initial model as the prior instead of a teacher.
The paper's training hyperparameters (its appendix) are not recovered: these are ordinary SFT values
for a 1.5B model; sweep eta.

The paper's comparison is the grid below (``GRID``, experiments.grids.Grid), run by the grids'
runner (each cell is the config string SETTING/METHOD/SEED, Base is base/numina; edit the paths
above in this file, since the grid runs one process per cell with no extra flags):
  python -m experiments.compare run --config configs/qwen2p5_math_numina.py
into experiments/qwen/ (its records, predictions and RESULTS.md).
"""

import ml_collections

from qtarget import config_files

smollm2_demo = config_files.sibling(__file__, 'smollm2_demo')


# Its own folder and runs: nothing shared with the CPU grids'.
FOLDER = 'experiments/qwen'
RUNS_DIR = 'experiments/runs_qwen'

# name: (task family, demonstrations, teacher): the file's own solutions; the prior is
# config.prior (Qwen2.5-Math-7B), not trained by the grid.
SETTINGS = {'numina': ('numina', None, None)}
# name: (qtarget.targets method, hyperparameters, prior): 'teacher' is config.prior and
# 'initial' the frozen student. The paper's baselines are SFT, DFT and distillation.
METHODS = {
    'sft': ('sft', {}, None),
    'dft': ('dft', {}, None),
    'label_smoothing': ('label_smoothing', {'lam': 0.1}, None),
    'sft_kl': ('sft_kl', {'lam': 0.1}, 'initial'),
    'asft': ('asft', {'lam': 0.1}, 'initial'),
    'distill': ('distill', {}, 'teacher'),
    'target_sft_eta0.25': ('target_sft', {'eta': 0.25}, 'teacher'),
    'target_sft_eta0.5': ('target_sft', {'eta': 0.5}, 'teacher'),
    'target_sft_eta1': ('target_sft', {'eta': 1.0}, 'teacher'),
    'target_sft_eta0.5_initial': ('target_sft', {'eta': 0.5}, 'initial'),
}
SEEDS = (0, 1, 2)
TASKS = {'numina': {'max_new_tokens': 2048}}  # greedy and sampled answers
# What experiments.measure measures of every run and of Base: greedy accuracy on the held-out
# problems, and Average@16 / pass@16 (the paper's metric) on the same problems.
MEASURE = {'test_problems': 500, 'sampled_problems': 500, 'num_samples': 16,
           'temperature': 0.6, 'top_p': 0.95, 'batch_size': 64}


def get_config(name: str = ''):
  """The single run above; with ``name`` = 'SETTING/METHOD/SEED' one cell of the grid, with
  'base/numina' the untouched model the grid measures as Base."""
  config = _paper_config()
  if not name:
    return config
  parts = name.split('/')
  if parts == ['base', 'numina']:
    config.workdir = f'{RUNS_DIR}/base/numina'
    return config
  if len(parts) != 3 or parts[0] not in SETTINGS or parts[1] not in METHODS:
    raise ValueError(f'expected base/numina or SETTING/METHOD/SEED with a setting in '
                     f'{sorted(SETTINGS)} and a method in {sorted(METHODS)}; got {name!r}')
  setting, method, seed = parts[0], parts[1], int(parts[2])
  method_name, hparams, prior = METHODS[method]
  config.workdir = f'{RUNS_DIR}/{setting}/{method}/seed{seed}'
  config.seed = config.eval.seed = seed
  config.method = method_name
  config.hparams = ml_collections.ConfigDict(hparams)
  if prior == 'initial':
    config.prior.source = 'initial'
  config.eval.after = False  # measured by experiments.measure instead
  config.export_hf = True  # the measurement reads it (deleted once recorded)
  return config


def run_plan(records: dict, selection_file) -> list[str]:
  """Base, then every cell seed by seed (a partial grid covers every cell a little); nothing
  is selected."""
  del records, selection_file
  return ['base/numina'] + [f'{setting}/{method}/{seed}' for seed in SEEDS
                            for setting in SETTINGS for method in METHODS]


def measurements(name: str) -> dict:
  """Greedy and sampled answers on the held-out problems; no validation split, variants or
  step-by-step demonstrations in these files."""
  del name
  return {'validation': False, 'variants': False, 'sampled': True, 'calibration': False}


def _paper_config():
  config = smollm2_demo.get_config()
  config.workdir = 'runs/qwen2p5_math_numina'
  config.hparams.eta = 0.5

  config.model.source = 'hf'
  config.model.path = '/data/Qwen2.5-Math-1.5B'
  # The shapes (from the checkpoint's config.json), for compile_check before the weights exist.
  config.model.architecture.update(dict(
      vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
      num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
      attention_bias=True, max_position_embeddings=4096, architecture='qwen2'))
  config.model.compute_dtype = 'bfloat16'  # float32 master weights, bfloat16 matmuls
  config.model.remat = 'full'  # per-layer rematerialization for 2k-token sequences

  config.prior.source = 'hf'
  config.prior.path = '/data/Qwen2.5-Math-7B'
  config.prior.architecture.update(dict(
      vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
      num_kv_heads=4, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
      attention_bias=True, max_position_embeddings=4096, architecture='qwen2'))
  config.prior.param_dtype = 'bfloat16'  # frozen: no master copy needed
  config.prior.compute_dtype = 'bfloat16'

  config.data.kind = 'files'
  config.data.task = 'numina_math'
  config.data.train_path = '/data/numina_cot.jsonl'
  config.data.eval_path = '/data/math500.jsonl'
  config.data.seq_len = 2048
  config.data.truncate = True  # long solutions are cut (and counted) rather than stopping
  config.data.difficulty = {}
  config.data.rationale.style = ''  # the file's own solutions
  # reasoning-gym's sizes, unused by files; fixed here, as a resume compares every field
  config.data.train_size, config.data.eval_size = 4000, 128

  config.loss = 'fused'  # the dense one needs 22 GiB of temporaries per v5e chip (16 GiB HBM)
  config.steps = 2000
  config.batch_size = 64  # rows of 2048 tokens per step, across all devices
  config.accum_steps = 2  # fits a v5e:4x4 slice (docs/pods.md)
  config.optimizer.learning_rate = 1e-5
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.01

  config.mesh.update({'data': 1, 'fsdp': -1, 'tensor': 1})
  config.checkpoint.every = 200
  config.checkpoint.keep = 3

  config.eval.before = False  # evaluate the base model separately (it is the same every run)
  config.eval.num_problems = 500
  config.eval.max_new_tokens = 1024
  config.eval.batch_size = 64
  config.log_every = 10
  return config


GRID = dict(
    folder=FOLDER, title='Method comparison: Qwen2.5-Math-1.5B on NuminaMath-CoT',
    runs_dir=RUNS_DIR, get_config=get_config, plan=run_plan, tasks=TASKS,
    task_of=lambda name: 'numina', measure=MEASURE, measurements=measurements,
    settings=SETTINGS, methods=METHODS, ours='target_sft_eta0.5',
    baselines=('sft', 'dft', 'distill'), fixed=tuple(METHODS), seeds=SEEDS,
    main_settings=tuple(SETTINGS),
    run_code=('qtarget/', 'experiments/', 'configs/qwen2p5_math_numina.py',
              'configs/smollm2_demo.py'),
    sections=('accuracy', 'verdicts', 'runs'))
