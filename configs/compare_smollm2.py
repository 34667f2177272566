"""The first, exploratory comparison on CPU: SmolLM2-135M-Instruct on reasoning-gym arithmetic.

Archived: its records, predictions, report and plots are in ``experiments/grid1/`` (eta was read
off the test results; the pre-registered grid, ``configs/compare2_smollm2.py``, replaced it).
``python -m experiments.compare rescore --config configs/compare_smollm2.py`` re-scores its
predictions; each recorded run is still its training command, named by its config string,
``SETTING/METHOD/SEED`` or ``teacher``:

  python -m qtarget.train --config configs/compare_smollm2.py:chain3_noisy/target_sft_eta0.5/1

Its Base runs and held-out evaluations were the trainer's own (``config.eval``).
"""

import ml_collections

from qtarget import config_files

smollm2_demo = config_files.sibling(__file__, 'smollm2_demo')

RUNS_DIR = 'experiments/runs'  # the runs' workdirs (not in git)
GRID = dict(folder='experiments/grid1', archived=True)  # experiments.grids.Grid
TEACHER_DIR = f'{RUNS_DIR}/teacher'

# Task: chain_sum with 3 one-digit terms (+ and -), two steps per rationale. Base greedy accuracy
# 0.14, Average@4 0.10 on 64 held-out problems (experiments/grid1/task_selection.jsonl).
_CHAIN3 = {'task': 'chain_sum',
           'difficulty': {'min_terms': 3, 'max_terms': 3, 'min_digits': 1, 'max_digits': 1}}

SETTINGS = {
    # name: task, difficulty and the training demonstrations (qtarget.data.rationales).
    'chain3_clean': {**_CHAIN3, 'rationale': {'style': 'steps', 'variants': 1,
                                              'corrupt_fraction': 0.0}},
    'chain3_noisy': {**_CHAIN3, 'rationale': {'style': 'steps', 'variants': 1,
                                              'corrupt_fraction': 0.3}},
    'chain3_multi': {**_CHAIN3, 'rationale': {'style': 'steps', 'variants': 3,
                                              'corrupt_fraction': 0.0}},
}

# name: (qtarget.targets method, hyperparameters, prior). 'teacher' is the SFT model trained by
# the 'teacher' run; 'initial' is the frozen student at step 0. DFT is Target-SFT at eta = 0.
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

# Held-out evaluation of every run (and of Base): Average@k and pass@k of sampled answers.
EVAL = {'num_problems': 64, 'num_samples': 4, 'temperature': 0.7, 'top_p': 0.95,
        'max_new_tokens': 32, 'batch_size': 64}  # demonstrations are ~22 tokens


def _common(config: ml_collections.ConfigDict) -> None:
  config.data.seq_len = 160  # two demonstrations (about 70 tokens each with the chat template)
  config.data.eval_size = EVAL['num_problems']
  config.batch_size = 4
  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 3
  config.eval.update(EVAL)
  config.eval.before = False  # Base was evaluated once per seed, apart from the runs
  config.progress_bar = False
  config.log_every = 5
  config.checkpoint.keep = 1


def teacher_config() -> ml_collections.ConfigDict:
  """The prior for 'teacher' runs: SFT on many clean demonstrations of the same task family."""
  config = smollm2_demo.get_config()
  _common(config)
  config.workdir = TEACHER_DIR
  config.method, config.hparams = 'sft', ml_collections.ConfigDict()
  config.data.task, config.data.difficulty = _CHAIN3['task'], _CHAIN3['difficulty']
  config.data.rationale.update(SETTINGS['chain3_clean']['rationale'])
  config.data.train_size = 8000
  config.steps = 100  # 800 demonstrations; token accuracy passes 0.9 within 10 steps
  config.optimizer.warmup_steps = 5
  config.checkpoint.every = 25
  config.export_hf = True  # the students load it from TEACHER_DIR/hf
  config.eval.max_new_tokens = 40  # its recorded evaluation ran with 40 (students: 32)
  return config


def run_config(setting: str, method: str, seed: int) -> ml_collections.ConfigDict:
  """One cell of the grid."""
  if setting not in SETTINGS:
    raise ValueError(f'unknown setting {setting!r}; known: {sorted(SETTINGS)}')
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; known: {sorted(METHODS)}')
  config = smollm2_demo.get_config()
  _common(config)
  config.workdir = f'{RUNS_DIR}/{setting}/{method}/seed{seed}'
  config.seed = seed
  name, hparams, prior = METHODS[method]
  config.method, config.hparams = name, ml_collections.ConfigDict(hparams)
  if prior == 'teacher':
    config.prior.source, config.prior.path = 'hf', f'{TEACHER_DIR}/hf'
  else:
    config.prior.source = 'initial'
  spec = SETTINGS[setting]
  config.data.task, config.data.difficulty = spec['task'], dict(spec['difficulty'])
  config.data.rationale.update(spec['rationale'])
  config.data.train_size = 2000
  config.data.rationale.seed = seed  # which problems get a corrupted step, which variants
  # config.data.seed stays 0: every run is scored on the same held-out problems, and those are
  # removed from the teacher's and every student's training problems.
  config.eval.seed = seed
  config.steps = 20  # 160 demonstrations: the CPU budget (see experiments/grid1/RESULTS.md)
  config.checkpoint.every = 10
  config.export_hf = False
  return config


def get_config(name: str = 'chain3_clean/target_sft_eta0.5/0') -> ml_collections.ConfigDict:
  if name == 'teacher':
    return teacher_config()
  parts = name.split('/')
  if len(parts) != 3 or not parts[2].isdigit():
    raise ValueError(f"config string must be 'teacher' or SETTING/METHOD/SEED, got {name!r}")
  return run_config(parts[0], parts[1], int(parts[2]))
