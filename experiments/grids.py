"""What a comparison grid is: the declarations its config makes (``GRID``) and the questions
the runner, the measurement and the report ask of them."""

import dataclasses
import json
import pathlib
from typing import Callable

from experiments import ROOT


def _nothing_cut(name: str) -> bool:
  del name  # a grid whose budget cut nothing
  return False


@dataclasses.dataclass(frozen=True)
class Grid:
  """A grid as its config declares it: ``GRID = dict(folder=..., ...)``, the keys these fields.

  The folder holds ``runs.jsonl`` (one record per finished run), ``predictions/``,
  ``selection.json`` (the frozen selections), ``machines.jsonl``, ``reproduced/`` (recorded runs
  trained again elsewhere), ``RESULTS.md`` and its plots. An archived grid declares its folder
  only: its records are re-scored, never run or reported again.
  """
  folder: str  # experiments/<grid>, relative to the repository
  archived: bool = False
  title: str = ''  # the first heading of RESULTS.md
  runs_dir: str = ''  # the runs' workdirs (not in git) and their compilation cache
  get_config: Callable | None = None  # run name -> its training (or measuring) config
  plan: Callable | None = None  # (records, selection file) -> the runs that can run now, in order
  cut: Callable[[str], bool] = _nothing_cut  # planned runs the budget cut: reported, never run
  tasks: dict = dataclasses.field(default_factory=dict)  # task family -> what measure.py needs
  task_of: Callable | None = None  # run name -> the task family it is measured on
  measure: dict = dataclasses.field(default_factory=dict)  # problems, samples, examples, batch
  measurements: Callable | None = None  # run name -> which measurements beyond greedy test
  settings: dict = dataclasses.field(default_factory=dict)  # name -> (task family, demos, teacher)
  methods: dict = dataclasses.field(default_factory=dict)  # name -> (method, hparams, prior)
  ours: str = 'target_sft'  # the method, or tuned family, compared with every baseline
  baselines: tuple = ()  # what it is compared with: the verdict's columns
  fixed: tuple = ()  # the methods run as they are, no value selected (the primary baselines)
  tuned: dict = dataclasses.field(default_factory=dict)  # family -> its methods, ties to the first
  seeds: tuple = ()  # the seeds of the primary comparison
  selection_seeds: tuple = ()  # the seeds a tuned family's value is selected on
  variant_seeds: tuple = ()  # the seeds measured on the harder and easier variants
  main_settings: tuple = ()  # the settings of the primary comparison
  teachers: dict = dataclasses.field(default_factory=dict)  # name -> (task family, steps)
  prior_quality: tuple | None = None  # (a setting with a weaker prior, the setting it repeats)
  cut_families: tuple = ()  # the tuned families the budget cut
  run_code: tuple = ()  # the files a run is made of (the report's code versions)
  sections: tuple = ()  # RESULTS.md's sections in order (names of experiments.report.SECTIONS)

  def __post_init__(self):
    needed = {'get_config': self.get_config, 'plan': self.plan, 'task_of': self.task_of,
              'measurements': self.measurements}
    missing = [name for name, value in needed.items() if value is None]
    if missing and not self.archived:
      raise ValueError(f'a grid that runs declares {", ".join(needed)}; this one lacks '
                       f'{", ".join(missing)} (or is archived=True).')

  @property
  def directory(self) -> pathlib.Path:
    return ROOT / self.folder

  @property
  def selection_file(self) -> pathlib.Path:
    return self.directory / 'selection.json'

  def family(self, method: str) -> str | None:
    """The tuned family ``method`` is a value of (None for a fixed method)."""
    return next((f for f, values in self.tuned.items() if method in values), None)

  def tuned_from(self, setting: str) -> str:
    """The setting whose selections ``setting`` uses: the weaker prior's setting reuses the
    setting it repeats, every other setting its own."""
    if self.prior_quality and setting == self.prior_quality[0]:
      return self.prior_quality[1]
    return setting

  def selected(self, setting: str, family: str) -> str | None:
    """The method standing for ``family`` in ``setting``: a fixed method is itself; a tuned
    family its frozen selection (None before it is made)."""
    if family not in self.tuned:
      return family
    path = self.selection_file
    frozen = json.loads(path.read_text()) if path.exists() else {}
    entry = frozen.get(f'{self.tuned_from(setting)}/{family}')
    return entry['selected'] if entry else None

  def stands_in(self, setting: str, method: str) -> str:
    """The setting whose runs stand for ``method`` in ``setting``. A method that does not use the
    teacher trains the same with the weaker prior as in the setting it repeats (the two configs
    differ in the workdir only), so those runs stand for it; any other, its own setting's."""
    return self.tuned_from(setting) if self.methods[method][2] != 'teacher' else setting

  def kind(self, name: str) -> str:
    """What a run is in the plan: 'primary', 'secondary', 'prior-quality axis' or 'teachers and
    Base' (the kinds the run order and the budget's cuts go by)."""
    parts = name.split('/')
    weak = self.prior_quality[0] if self.prior_quality else None
    if parts[0] in ('teacher', 'base'):
      weak_teacher = weak and f'teacher/{self.settings[weak][2]}'
      return 'prior-quality axis' if name == weak_teacher else 'teachers and Base'
    if parts[0] == weak:
      return 'prior-quality axis'
    primary = parts[1] in self.fixed or self.family(parts[1]) == self.ours
    return 'primary' if primary else 'secondary'

  def on_validation(self, name: str) -> bool:
    """Whether a run is measured on validation too (a selection run: about 1.3x as long)."""
    return bool(self.measurements(name)['validation'])


def load(config_path: str, folder: str | None = None) -> Grid:
  """The grid ``config_path`` declares; ``folder`` (when given) holds its records instead."""
  from qtarget import config_files  # pylint: disable=g-import-not-at-top
  module = config_files.load_module(ROOT / config_path)
  declared = vars(module).get('GRID')
  if not isinstance(declared, dict):
    raise SystemExit(f'{config_path} declares no GRID: not a comparison grid.')
  try:
    grid = Grid(**declared)
  except (TypeError, ValueError) as error:
    raise SystemExit(f'{config_path}: its GRID is not a grid: {error}') from None
  return dataclasses.replace(grid, folder=str(folder)) if folder else grid
