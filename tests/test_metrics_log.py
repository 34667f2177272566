"""The trainer's metrics log: metrics.jsonl and TensorBoard scalars, rewound on resume."""

import importlib.util
import json
import pathlib
import struct
import subprocess
import sys

import pytest

from qtarget.train import metrics_log

pytest.importorskip('tensorboardX')
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum, from its definition: CRC-32C (Castagnoli, reflected polynomial
  0x82F63B78), rotated right by 15 bits plus 0xa282ead8."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _events(event_file):
  """The Event protos of a TFRecord file, each record's CRCs checked."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  data, events, offset = event_file.read_bytes(), [], 0
  while offset < len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack('<Q', header)
    (header_crc,) = struct.unpack('<I', data[offset + 8:offset + 12])
    record = data[offset + 12:offset + 12 + length]
    (record_crc,) = struct.unpack('<I', data[offset + 12 + length:offset + 16 + length])
    assert (header_crc, record_crc) == (_masked_crc32c(header), _masked_crc32c(record))
    events.append(event_pb2.Event.FromString(record))
    offset += 16 + length  # length, its CRC, the record, its CRC
  return events


def _scalars(events):
  return [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]


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
  assert len(files) == 2, files  # the second writer did not truncate the first
  first, resumed = (_events(f) for f in files)
  assert [(s, t) for s, t, _ in _scalars(first)] == [
      (1, 'loss'), (1, 'skipped_updates'), (2, 'loss'), (2, 'skipped_updates'), (3, 'loss'),
      (3, 'skipped_updates')]
  assert _scalars(resumed)[:2] == [(3, 'loss', 0.25), (3, 'skipped_updates', 3.0)]
  # TensorBoard hides the first file's steps from 3 on: a SessionLog START at the purge step.
  starts = [e.step for e in resumed if e.session_log.status == e.session_log.START]
  assert starts == [3]


def test_resume_files_sort_by_their_start_step(tmp_path):
  for start in (9, 10):
    metrics_log.MetricsLog(tmp_path / str(start), start_step=start).close()
  names = [next((tmp_path / str(s) / 'tensorboard').glob('*')).name for s in (9, 10)]
  assert names[0].endswith('.from_step0000000009') and names == sorted(names), names


@pytest.mark.skipif(importlib.util.find_spec('torch') is None, reason='the case needs torch')
def test_the_summary_writer_is_imported_without_torch_and_writes(tmp_path):
  # In a fresh process: this test process may have imported torch for other tests.
  code = '\n'.join([
      'import sys',
      'from qtarget.train import metrics_log',
      f'log = metrics_log.MetricsLog(__import__("pathlib").Path({str(tmp_path)!r}), 0)',
      'log.write(1, {"loss": 0.5})',
      'log.close()',
      "assert 'torch' not in sys.modules, 'torch imported'",
      'import torch',  # ... and torch still imports afterwards
  ])
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          check=False, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  (event_file,) = (tmp_path / 'tensorboard').glob('events.out.tfevents.*')
  assert _scalars(_events(event_file)) == [(1, 'loss', 0.5)]
