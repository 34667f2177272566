"""The second, pre-registered comparison grid (experiments/PREREGISTRATION.md) on CPU.

SmolLM2-135M-Instruct on two reasoning-gym task families (chain_sum, products), each with clean,
noisy and several-valid-orders demonstrations, plus a weaker teacher as a prior-quality axis.
Run names:

  teacher/TASK                 the SFT teacher of a task family (its export is the prior)
  base/TASK                    the untouched model, measured like the runs
  SETTING/METHOD/SEED          one training run

``python -m experiments.compare run --config configs/compare2_smollm2.py`` runs ``run_plan`` in
order; each training run is then measured by ``experiments.measure`` (greedy test accuracy, the
primary metric; Average@4 and pass@4; validation accuracy for tuned methods; harder and easier
variants; calibration and fit). Tuned values are selected on validation by :func:`select`,
frozen in ``experiments/grid2/selection.json`` before any added seed runs. ``GRID`` at the end
is what the runner, the measurement and the report read (experiments.grids.Grid).
"""

import json
import pathlib

import ml_collections

from qtarget import config_files

smollm2_demo = config_files.sibling(__file__, 'smollm2_demo')

FOLDER = 'experiments/grid2'  # records, predictions, selection.json, RESULTS.md, plots
RUNS_DIR = 'experiments/runs2'  # the runs' workdirs (not in git)

_DIFFICULTY = {
    'chain3': {'min_terms': 3, 'max_terms': 3, 'min_digits': 1, 'max_digits': 1},
    # reasoning-gym's products draws one digit count per problem: 1-2 digits would mix the 100
    # one-digit problems (half the rows, mostly test copies) with two-digit ones, so the
    # family is two 2-digit factors (8100 distinct problems; base greedy 4.7% on 64).
    'products2': {'min_terms': 2, 'max_terms': 2, 'min_digits': 2, 'max_digits': 2},
}
_CHAIN2 = {'min_terms': 2, 'max_terms': 2, 'min_digits': 1, 'max_digits': 1}
TASKS = {
    # family: reasoning-gym task, difficulty, greedy tokens per answer (demonstrations are about
    # 22 tokens for chain3 and 45 for products2), and (task, difficulty, tokens) of a harder and
    # an easier variant that no run trains on.
    'chain3': {'task': 'chain_sum', 'difficulty': _DIFFICULTY['chain3'], 'max_new_tokens': 32,
               'harder': ('chain_sum', {'min_terms': 4, 'max_terms': 4, 'min_digits': 1,
                                        'max_digits': 1}, 48),
               'easier': ('chain_sum', _CHAIN2, 32)},
    'products2': {'task': 'products', 'difficulty': _DIFFICULTY['products2'],
                  'max_new_tokens': 64,
                  'harder': ('products', {'min_terms': 2, 'max_terms': 2, 'min_digits': 3,
                                          'max_digits': 3}, 96),
                  'easier': ('products', {'min_terms': 2, 'max_terms': 2, 'min_digits': 1,
                                          'max_digits': 1}, 48)},
}

_CLEAN = {'style': 'steps', 'variants': 1, 'corrupt_fraction': 0.0}
_NOISY = {'style': 'steps', 'variants': 1, 'corrupt_fraction': 0.3}
_MULTI = {'style': 'steps', 'variants': 3, 'corrupt_fraction': 0.0}
_MULTI2 = {'style': 'steps', 'variants': 2, 'corrupt_fraction': 0.0}  # two factors: two orders
SETTINGS = {
    # name: task family, demonstrations, teacher (the prior of distillation and Target-SFT).
    'chain3_clean': ('chain3', _CLEAN, 'chain3'),
    'chain3_noisy': ('chain3', _NOISY, 'chain3'),
    'chain3_multi': ('chain3', _MULTI, 'chain3'),
    'products2_clean': ('products2', _CLEAN, 'products2'),
    'products2_noisy': ('products2', _NOISY, 'products2'),
    'products2_multi': ('products2', _MULTI2, 'products2'),
    'chain3_noisy_weak': ('chain3', _NOISY, 'chain3_weak'),  # prior quality, after the primaries
}
MAIN_SETTINGS = tuple(s for s in SETTINGS if s != 'chain3_noisy_weak')
TEACHERS = {
    # name: task family, steps (100: the first grid's recipe; 10: the weaker prior).
    'chain3': ('chain3', 100),
    'products2': ('products2', 100),
    'chain3_weak': ('chain3', 10),
}

# name: (qtarget.targets method, hyperparameters, prior). 'teacher' is the setting's teacher;
# 'initial' the frozen student at step 0.
METHODS = {
    'sft': ('sft', {}, None),
    'dft': ('dft', {}, None),
    'distill': ('distill', {}, 'teacher'),
    'target_sft_eta0.25': ('target_sft', {'eta': 0.25}, 'teacher'),
    'target_sft_eta0.5': ('target_sft', {'eta': 0.5}, 'teacher'),
    'target_sft_eta1': ('target_sft', {'eta': 1.0}, 'teacher'),
    'label_smoothing_lam0.05': ('label_smoothing', {'lam': 0.05}, None),
    'label_smoothing_lam0.2': ('label_smoothing', {'lam': 0.2}, None),
    'sft_kl_lam0.05': ('sft_kl', {'lam': 0.05}, 'initial'),
    'sft_kl_lam0.2': ('sft_kl', {'lam': 0.2}, 'initial'),
    'asft_lam0.05': ('asft', {'lam': 0.05}, 'initial'),
    'asft_lam0.2': ('asft', {'lam': 0.2}, 'initial'),
}
PRIMARY_FIXED = ('sft', 'dft', 'distill')
# What Target-SFT is compared with in the verdict, each tuned one at its own selected value.
BASELINES = ('sft', 'dft', 'distill', 'label_smoothing', 'sft_kl', 'asft')
PRIOR_QUALITY = ('chain3_noisy_weak', 'chain3_noisy')  # the weaker prior, the setting it repeats
# A tuned family's values, in the order ties are broken (the first listed wins a tie).
TUNED = {
    'target_sft': ('target_sft_eta0.25', 'target_sft_eta0.5', 'target_sft_eta1'),
    'label_smoothing': ('label_smoothing_lam0.05', 'label_smoothing_lam0.2'),
    'sft_kl': ('sft_kl_lam0.05', 'sft_kl_lam0.2'),
    'asft': ('asft_lam0.05', 'asft_lam0.2'),
}
SELECTION_SEEDS = (0, 1)
PRIMARY_SEEDS = (0, 1, 2, 3, 4)
SECONDARY_SEEDS = (0, 1, 2)
SEEDS = PRIMARY_SEEDS
MEASURED_VARIANT_SEEDS = (0, 1)  # harder/easier variants for these seeds (and Base)

MEASURE = {
    'test_problems': 256,  # greedy accuracy: the primary metric
    'sampled_problems': 64, 'num_samples': 4, 'temperature': 0.7, 'top_p': 0.95,
    'validation_problems': 256,  # greedy, for the selection seeds of a tuned family (and Base)
    'variant_problems': 128,  # harder / easier variants, never trained on
    'calibration_examples': 128,  # held-out clean demonstrations, teacher-forced
    'fit_examples': 128,  # the first training examples, teacher-forced
    'batch_size': 64,
}


def family(method: str) -> str | None:
  """The tuned family a grid method belongs to (None for the fixed methods)."""
  return next((f for f, values in TUNED.items() if method in values), None)


# The budget's cut (PREREGISTRATION change 26): the grid spent twice the issue's ~12 h on its
# teachers and primaries, so the secondary families, the first cut, are not run. Their
# runs stay in the plan and are reported as cut; emptying this resumes them.
CUT_FAMILIES = ('label_smoothing', 'sft_kl', 'asft')


def is_cut(name: str) -> bool:
  """Whether a planned run is one the budget cut (the runner skips it)."""
  parts = name.split('/')
  return len(parts) == 3 and family(parts[1]) in CUT_FAMILIES


def _common(config: ml_collections.ConfigDict, task_family: str) -> None:
  spec = TASKS[task_family]
  config.data.task, config.data.difficulty = spec['task'], dict(spec['difficulty'])
  config.data.seq_len = 160  # about two demonstrations per packed row
  config.data.eval_size = MEASURE['test_problems']  # validation and test: 256 problems each
  config.batch_size = 4
  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 3
  config.eval.before = False  # measured by experiments.measure instead
  config.eval.after = False
  config.eval.max_new_tokens = spec['max_new_tokens']
  config.eval.batch_size = MEASURE['batch_size']
  config.eval.num_problems = 128  # the trainer's own evaluations (off; MEASURE's are run)
  config.progress_bar = False
  config.log_every = 5
  config.checkpoint.keep = 1
  config.export_hf = True  # the measurement reads it (deleted afterwards, except teachers')


def _clean_sft(task_family: str, workdir: str, train_size: int) -> ml_collections.ConfigDict:
  config = smollm2_demo.get_config()
  _common(config, task_family)
  config.workdir = workdir
  config.method, config.hparams = 'sft', ml_collections.ConfigDict()
  config.data.rationale.update(_CLEAN)
  config.data.train_size = train_size
  return config


def teacher_config(name: str) -> ml_collections.ConfigDict:
  task_family, steps = TEACHERS[name]
  config = _clean_sft(task_family, f'{RUNS_DIR}/teacher/{name}', 8000)
  config.steps = steps
  config.optimizer.warmup_steps = min(5, steps // 2)
  config.checkpoint.every = 25
  return config


def base_config(task_family: str) -> ml_collections.ConfigDict:
  """What Base is measured with: the task's data, the untouched model."""
  config = _clean_sft(task_family, f'{RUNS_DIR}/base/{task_family}', 2000)
  config.steps = 100  # never trained
  return config


def run_config(setting: str, method: str, seed: int) -> ml_collections.ConfigDict:
  if setting not in SETTINGS:
    raise ValueError(f'unknown setting {setting!r}; known: {sorted(SETTINGS)}')
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; known: {sorted(METHODS)}')
  task_family, rationale, teacher = SETTINGS[setting]
  config = smollm2_demo.get_config()
  _common(config, task_family)
  config.workdir = f'{RUNS_DIR}/{setting}/{method}/seed{seed}'
  config.seed = seed
  name, hparams, prior = METHODS[method]
  config.method, config.hparams = name, ml_collections.ConfigDict(hparams)
  if prior == 'teacher':
    config.prior.source, config.prior.path = 'hf', f'{RUNS_DIR}/teacher/{teacher}/hf'
  else:
    config.prior.source = 'initial'
  config.data.rationale.update(rationale)
  config.data.rationale.seed = seed  # which problems get a corrupted step, which variants
  config.data.train_size = 2000  # config.data.seed stays 0: one set of held-out problems
  config.steps = 20
  config.checkpoint.every = 10
  return config


def get_config(name: str = 'chain3_clean/target_sft_eta0.5/0') -> ml_collections.ConfigDict:
  parts = name.split('/')
  if len(parts) == 2 and parts[0] == 'teacher' and parts[1] in TEACHERS:
    return teacher_config(parts[1])
  if len(parts) == 2 and parts[0] == 'base' and parts[1] in TASKS:
    return base_config(parts[1])
  if len(parts) != 3 or not parts[2].isdigit():
    raise ValueError(f"config string must be teacher/{{{','.join(TEACHERS)}}}, "
                     f"base/{{{','.join(TASKS)}}} or SETTING/METHOD/SEED, got {name!r}")
  return run_config(parts[0], parts[1], int(parts[2]))


def task_family_of(name: str) -> str:
  """The task family whose problems a run (or teacher, or Base) is measured on."""
  parts = name.split('/')
  if parts[0] == 'teacher':
    return TEACHERS[parts[1]][0]
  if parts[0] == 'base':
    return parts[1]
  return SETTINGS[parts[0]][0]


def measurements(name: str) -> dict:
  """Which measurements a run gets beyond greedy test accuracy (every run: calibration)."""
  parts = name.split('/')
  if parts[0] == 'teacher':
    return {'validation': False, 'variants': False, 'sampled': False, 'calibration': True}
  if parts[0] == 'base':
    return {'validation': True, 'variants': True, 'sampled': True, 'calibration': True}
  seed = int(parts[2])
  return {'validation': family(parts[1]) is not None and seed in SELECTION_SEEDS,
          'variants': seed in MEASURED_VARIANT_SEEDS, 'sampled': True, 'calibration': True}


# The pre-registered selection rule and the run order.


def full_credit_accuracy(scored: dict) -> float:
  """The share of a scored split's problems answered with full credit (score 1, the
  pre-registered primary metric), from its prediction file; reasoning-gym's scorer also gives
  partial credit (0.5 for a sign error, for instance), which a recorded ``accuracy`` averages in.
  An entry without a prediction file (a test's) gives its ``accuracy``."""
  if 'predictions' not in scored:
    return scored['accuracy']
  from qtarget import evaluate  # pylint: disable=g-import-not-at-top  (loads the scorers' deps)
  path = pathlib.Path(__file__).resolve().parent.parent / scored['predictions']
  rows = evaluate.read_predictions(path, fields=('score',))
  return sum(evaluate.full_credit(row['score']) for row in rows) / len(rows)


def select(records: dict, setting: str, tuned_family: str,
           selection_file: pathlib.Path) -> dict | None:
  """The value of ``tuned_family`` with the highest mean greedy validation accuracy (full
  credit) over SELECTION_SEEDS in ``setting`` (a tie goes to the value listed first), or None
  while any of those runs is unrecorded. Test numbers are not read. The first selection is
  frozen in ``selection_file`` (the grid's ``selection.json``) with the numbers it was made
  from."""
  path = pathlib.Path(selection_file)
  frozen = json.loads(path.read_text()) if path.exists() else {}
  key = f'{setting}/{tuned_family}'
  if key in frozen:
    return frozen[key]
  table = {}
  for method in TUNED[tuned_family]:
    values = []
    for seed in SELECTION_SEEDS:
      record = records.get(f'{setting}/{method}/{seed}')
      if record is None:
        return None
      values.append(full_credit_accuracy(record['scored']['validation']))
    table[method] = values
  best = max(TUNED[tuned_family], key=lambda m: (sum(table[m]) / len(table[m]),
                                                 -TUNED[tuned_family].index(m)))
  frozen[key] = {'selected': best, 'validation_accuracy': table, 'seeds': list(SELECTION_SEEDS)}
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(frozen, indent=2, sort_keys=True) + '\n')
  return frozen[key]


def run_plan(records: dict, selection_file: pathlib.Path) -> list[str]:
  """Every run that can run now, in the pre-registered order: teachers and Base; the primaries
  of all six settings seed by seed (Target-SFT's three etas for seeds 0-1, the selected one
  after); the prior-quality axis; the secondaries setting by setting, last (PREREGISTRATION
  change 23 moved them after the prior-quality axis: they are the first cut once the budget is
  spent). Runs waiting for a selection are left out until it exists."""
  plan = [f'teacher/{t}' for t in ('chain3', 'products2')] + [f'base/{t}' for t in TASKS]
  for seed in PRIMARY_SEEDS:
    for setting in MAIN_SETTINGS:
      methods = list(PRIMARY_FIXED)
      if seed in SELECTION_SEEDS:
        methods += TUNED['target_sft']
      else:
        chosen = select(records, setting, 'target_sft', selection_file)
        methods += [chosen['selected']] if chosen else []
      plan += [f'{setting}/{m}/{seed}' for m in methods]
  plan.append('teacher/chain3_weak')
  chosen = select(records, 'chain3_noisy', 'target_sft', selection_file)  # the weak prior's eta
  for seed in PRIMARY_SEEDS:
    plan.append(f'chain3_noisy_weak/distill/{seed}')
    if chosen:
      plan.append(f'chain3_noisy_weak/{chosen["selected"]}/{seed}')
  for setting in MAIN_SETTINGS:
    for tuned_family in ('label_smoothing', 'sft_kl', 'asft'):
      plan += [f'{setting}/{m}/{s}' for s in SELECTION_SEEDS for m in TUNED[tuned_family]]
      chosen = select(records, setting, tuned_family, selection_file)
      if chosen:
        plan += [f'{setting}/{chosen["selected"]}/{s}' for s in SECONDARY_SEEDS
                 if s not in SELECTION_SEEDS]
  return plan


# The files its runs were made of when they ran (the report's code versions, from git history).
RUN_CODE = ('qtarget/', 'experiments/measure.py', 'experiments/compare.py',
            'experiments/stats.py', 'configs/compare2_smollm2.py', 'configs/smollm2_demo.py')

GRID = dict(
    folder=FOLDER, title='Method comparison: the pre-registered grid', runs_dir=RUNS_DIR,
    get_config=get_config, plan=run_plan, cut=is_cut, tasks=TASKS, task_of=task_family_of,
    measure=MEASURE, measurements=measurements, settings=SETTINGS, methods=METHODS,
    ours='target_sft', baselines=BASELINES, fixed=PRIMARY_FIXED, tuned=TUNED, seeds=PRIMARY_SEEDS,
    selection_seeds=SELECTION_SEEDS, variant_seeds=MEASURED_VARIANT_SEEDS,
    main_settings=MAIN_SETTINGS, teachers=TEACHERS, prior_quality=PRIOR_QUALITY,
    cut_families=CUT_FAMILIES, run_code=RUN_CODE,
    sections=('preregistration', 'status', 'verdicts', 'summary', 'pooled', 'power', 'accuracy',
              'prior_quality', 'eta', 'eta_paired', 'sweep', 'cost', 'calibration',
              'answer_calibration', 'open_questions', 'reproductions', 'plots', 'runs'))
