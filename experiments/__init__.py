"""The method comparisons. A grid is one config (``configs/*.py`` with a ``GRID`` declaration,
:class:`experiments.grids.Grid`) and one folder ``experiments/<grid>/`` holding its records,
predictions, selection, ``RESULTS.md`` and plots; ``python -m experiments.compare`` runs,
reports and re-scores any of them.
"""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the paths in the records start here
