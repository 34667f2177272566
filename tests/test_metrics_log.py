"""The trainer's metrics log: metrics.jsonl and TensorBoard scalars, rewound on resume."""

import json
import struct
import subprocess
import sys

import pytest

from qtarget.train import metrics_log

tensorboardX = pytest.importorskip('tensorboardX')
from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top,g-bad-import-order


def _scalars(event_file):
  """(step, tag, value) of every scalar in a TFRecord file of Event protos."""
  data, found, offset = event_file.read_bytes(), [], 0
  while offset < len(data):
    (length,) = struct.unpack('<Q', data[offset:offset + 8])
    event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4  # length, its CRC, the record, its CRC
    found += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return found


def test_metrics_reach_jsonl_and_tensorboard_and_resume_rewinds_them(tmp_path):
  log = metrics_log.MetricsLog(tmp_path, start_step=0)
  for step in (1, 2, 3):
    log.write(step, {'loss': 1.0 / step, 'skipped_updates': step, 'note': 'not a number'})
  log.close()
  # A resume from the checkpoint at step 2 drops step 3 and writes it again.
  log = metrics_log.MetricsLog(tmp_path, start_step=2)
  log.write(3, {'loss': 0.25, 'skipped_updates': 3, 'note': 'again'})
  log.write(4, {'loss': float('nan'), 'skipped_updates': 3, 'note': ''})
  log.close()
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [line['step'] for line in lines] == [1, 2, 3, 4]
  assert lines[2]['loss'] == 0.25 and lines[3]['loss'] is None  # JSON has no NaN
  files = sorted((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  assert len(files) == 2, files
  first, resumed = (_scalars(f) for f in files)
  assert [(s, t) for s, t, _ in first] == [(1, 'loss'), (1, 'skipped_updates'), (2, 'loss'),
                                           (2, 'skipped_updates'), (3, 'loss'),
                                           (3, 'skipped_updates')]
  assert resumed[0] == (3, 'loss', 0.25) and resumed[1] == (3, 'skipped_updates', 3.0)


def test_the_summary_writer_is_imported_without_torch():
  # In a fresh process: this test process may have imported torch for other tests.
  pytest.importorskip('torch')  # the case to test: torch installed
  code = ('import sys; from qtarget.train import metrics_log; '
          'metrics_log.import_summary_writer(); import tensorboardX.writer; '
          "assert 'torch' not in sys.modules, 'torch imported'; "
          'import torch')  # ... and torch still imports afterwards
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]
