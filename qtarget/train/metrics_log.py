"""The trainer's metrics log: metrics.jsonl (rewound to the restored step on resume) and
TensorBoard scalars, written by process 0."""

import functools
import json
import logging
import pathlib
import sys

import jax
import numpy as np


def _json_number(value):
  """JSON has no NaN or infinity: such values are written as null."""
  return value if not isinstance(value, float) or np.isfinite(value) else None


@functools.cache
def import_summary_writer():
  """tensorboardX's SummaryWriter, imported without torch; None (with a warning) where
  tensorboardX is not installed.

  tensorboardX imports torch whenever it is installed (as it is beside transformers), only to
  accept torch tensors; that import adds seconds to every run's start (2.9 s against 0.5 s on
  this project's CPU machine), and the metrics are Python floats. The block is process-wide
  while it lasts, so the trainer calls this on its main thread before its data and checkpoint
  threads start.
  """
  try:
    if 'torch' in sys.modules:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      return SummaryWriter
    sys.modules['torch'] = None  # `import torch` raises ImportError while this is set
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      if e.name != 'torch':
        raise
      # A tensorboardX that needs torch: import it with torch after all.
      del sys.modules['torch']
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    finally:
      if 'torch' in sys.modules and sys.modules['torch'] is None:
        del sys.modules['torch']
    return SummaryWriter
  except ImportError as e:
    logging.warning('no TensorBoard events: tensorboardX does not import (%s); metrics.jsonl '
                    'has every metric.', e)
    return None


class MetricsLog:
  """metrics.jsonl (rewound to the restored step on resume) and TensorBoard events."""

  def __init__(self, workdir: pathlib.Path, start_step: int):
    self.path = workdir / 'metrics.jsonl'
    self.active = jax.process_index() == 0
    if not self.active:
      return
    if self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line and json.loads(line).get('step', 0) <= start_step]
      self.path.write_text(''.join(line + '\n' for line in kept))
    summary_writer = import_summary_writer()
    # The file is named by the second it opened in (tensorboardX truncates a name it reuses);
    # the resume step in the name (zero-padded, so names sort by it) keeps two writers of one
    # second apart.
    self.writer = summary_writer and summary_writer(
        str(workdir / 'tensorboard'), purge_step=start_step + 1,
        filename_suffix=f'.from_step{start_step:010d}')

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    with self.path.open('a') as f:
      f.write(json.dumps({'step': step, **{k: _json_number(v) for k, v in metrics.items()}},
                         allow_nan=False) + '\n')
    if self.writer is not None:
      for name, value in metrics.items():
        if isinstance(value, (int, float)):
          self.writer.add_scalar(name, value, step)

  def last_metrics(self, step: int) -> dict:
    """The training metrics logged for ``step`` ({} where there are none, or off process 0)."""
    if not self.active or not self.path.exists():
      return {}
    for line in reversed(self.path.read_text().splitlines()):
      entry = json.loads(line) if line else {}
      if entry.get('step') == step and 'loss' in entry:
        return {k: v for k, v in entry.items() if k != 'step'}
    return {}

  def close(self):
    if self.active and self.writer is not None:
      self.writer.close()
