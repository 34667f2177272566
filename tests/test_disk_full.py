"""A full disk during a checkpoint or an export: a named error with the sizes, the previous
checkpoint intact, and an exact resume once there is room. The disk is a small tmpfs the tests
mount (root only; skipped with the reason elsewhere)."""

import errno
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtarget import checkpoints
from qtarget.models import llama
from qtarget.train import checkpointing
from qtarget.train.errors import DiskFull

import availability

needs_smollm2 = availability.needs_smollm2("the tiny config uses SmolLM2's tokenizer")


class _SmallDisk:
  """A tmpfs of a given size at ``path``, resizable, unmounted at the end."""

  def __init__(self, path: pathlib.Path, size_mib: int):
    self.path = path
    path.mkdir(parents=True)
    if os.geteuid() != 0:
      pytest.skip('mounting a small tmpfs needs root')
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size_mib}m', 'tmpfs',
                              str(path)], capture_output=True, text=True)
    if mounted.returncode:
      pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.strip()}')

  def resize(self, size_mib: int) -> None:
    subprocess.run(['mount', '-o', f'remount,size={size_mib}m', str(self.path)], check=True)

  def unmount(self) -> None:
    # Lazily where a run stopped by the error still holds a file open there (its TensorBoard
    # writer, referenced from the traceback pytest keeps): detached now, freed when closed.
    if subprocess.run(['umount', str(self.path)], capture_output=True).returncode:
      subprocess.run(['umount', '--lazy', str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
  disks = []

  def mount(size_mib):
    disks.append(_SmallDisk(tmp_path / f'disk{len(disks)}', size_mib))
    return disks[-1]

  yield mount
  for disk in disks:
    disk.unmount()


@pytest.mark.parametrize('error', [
    OSError(errno.ENOSPC, 'No space left on device'),
    OSError(errno.EDQUOT, 'Disk quota exceeded'),
    # orbax's arrays (tensorstore), safetensors, and one wrapped in another
    ValueError('RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database at local file "/x/": '
               "Failed to write 489834 bytes to file 7: No space left on device "
               "[os_error_code='28']"),
    RuntimeError('Error while serializing: I/O error: No space left on device (os error 28)'),
])
def test_a_full_disk_is_recognised_however_it_is_wrapped(error):
  assert checkpointing.is_disk_full(error)
  try:
    try:
      raise error
    except Exception as inner:
      raise RuntimeError('Checkpointer failed') from inner
  except RuntimeError as outer:
    assert checkpointing.is_disk_full(outer)
  assert checkpointing.is_disk_full(ExceptionGroup('writers', [ValueError('x'), error]))


def test_other_errors_are_not_a_full_disk():
  assert not checkpointing.is_disk_full(OSError(errno.EACCES, 'Permission denied'))
  assert not checkpointing.is_disk_full(ValueError('DATA_LOSS: truncated file'))


def _small_model():
  config = llama.LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128,
                             num_layers=1, num_heads=4, num_kv_heads=2,
                             tie_word_embeddings=True)  # 2.2 MiB of float32 weights
  return llama.Llama(config, rngs=nnx.Rngs(0))


def test_an_export_without_room_leaves_no_partial_export(small_disk):
  disk = small_disk(1)
  model = _small_model()
  with pytest.raises(DiskFull, match=rf'no space left on the file system of {disk.path} while '
                                     rf'exporting the model to {disk.path / "hf"}: it needs about '
                                     r'2\.\d MiB \(the weights in float32\) and 1\.0 MiB is '
                                     r'free there \(the partial export was removed\). The '
                                     r'checkpoints are untouched'):
    checkpointing.export_hf(model, disk.path / 'hf')
  assert sorted(p.name for p in disk.path.iterdir()) == []  # no hf/, no hf.partial/
  disk.resize(8)
  checkpointing.export_hf(model, disk.path / 'hf')
  again = checkpoints.load_hf(disk.path / 'hf')
  np.testing.assert_array_equal(again.embed[...], model.embed[...])


def _config(workdir, **overrides):
  import test_train_step  # pylint: disable=g-import-not-at-top
  return test_train_step.tiny_config(**{'workdir': str(workdir), 'steps': 4,
                                        'checkpoint.every': 2, 'checkpoint.keep': 2,
                                        **overrides})


def test_a_checkpoint_without_room_keeps_the_previous_one_and_names_the_sizes(small_disk):
  import grain  # pylint: disable=g-import-not-at-top
  disk = small_disk(4)
  workdir = disk.path / 'run'
  run_checkpoints = checkpointing.RunCheckpoints(workdir, _config(workdir))
  iterator = iter(grain.MapDataset.range(8).to_iter_dataset())
  tree = lambda step: {'step': jnp.int32(step), 'params': jax.random.normal(
      jax.random.key(step), (600_000,))}  # 2.3 MiB each, not compressible
  run_checkpoints.save(2, tree(2), iterator)  # the first is waited for
  with pytest.raises(DiskFull, match=r'while writing the checkpoint of step 4: it needs about '
                                     r'2\.3 MiB \(the parameters and the optimizer state\) and '
                                     r'\d\.\d MiB is free there \(the partial write was '
                                     r'removed\). The checkpoint at step 2 is intact, and the '
                                     r'same command resumes from it once there is room'):
    run_checkpoints.save(4, tree(4), iterator)
    run_checkpoints.wait()  # an asynchronous write fails here
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2']
  disk.resize(16)
  restored, step = checkpointing.RunCheckpoints(workdir, _config(workdir)).restore(
      jax.eval_shape(lambda: tree(2)), iterator)
  assert step == 2
  np.testing.assert_array_equal(restored['params'], tree(2)['params'])


@needs_smollm2
@pytest.mark.slow  # three training runs; the two tests above cover the write and the message
def test_a_run_out_of_room_stops_and_resumes_exactly_once_there_is_room(small_disk, tmp_path):
  from qtarget import train  # pylint: disable=g-import-not-at-top
  overrides = {'data.data_dir': str(tmp_path / 'tfds'), 'model.architecture.vocab_size': 49152,
               'eval.before': False, 'eval.after': False, 'export_hf': True}
  reference = tmp_path / 'reference'
  train.run(_config(reference, **overrides))
  # A checkpoint of the tiny model (parameters and Adam's two moments) takes 34 MiB: room for
  # the one at step 2, not for step 4's beside it.
  disk = small_disk(52)
  workdir = disk.path / 'run'
  with pytest.raises(DiskFull, match=r'checkpoint of step 4: it needs about 3\d\.\d MiB .* The '
                                     r'checkpoint at step 2 is intact'):
    train.run(_config(workdir, **overrides))
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2']
  assert not (workdir / 'hf').exists() and not (workdir / 'summary.json').exists()
  disk.resize(160)
  summary = train.run(_config(workdir, **overrides))
  assert summary['resumed_at_step'] == 2
  expected, got = checkpoints.load_hf(reference / 'hf'), checkpoints.load_hf(workdir / 'hf')
  for want, have in zip(jax.tree.leaves(nnx.state(expected)), jax.tree.leaves(nnx.state(got))):
    np.testing.assert_array_equal(have, want)
