"""Ahead-of-time compilation of the real train step for TPU slices (marked `tpu`)."""

import importlib.util

import pytest

import test_train_step
from qtarget import compile_check

if importlib.util.find_spec('libtpu') is None:
  pytest.skip('needs the tpu extra: pip install -e ".[tpu]"', allow_module_level=True)
pytestmark = pytest.mark.tpu


@pytest.fixture(scope='module')
def small_slice_report():
  """The tiny config at SmolLM2's vocabulary on a v5e 2x2 slice (compiled once, ~25 s)."""
  config = test_train_step.tiny_config(**{'model.architecture.vocab_size': 49152,
                                          'batch_size': 4, 'data.seq_len': 128})
  return compile_check.check(config, 'v5e:2x2')


def test_tiny_config_fits_a_small_slice(small_slice_report):
  report = small_slice_report
  assert report.num_devices == 4 and report.device_kind == 'TPU v5 lite'
  assert report.mesh == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert report.hbm == 16 * 2 ** 30
  assert 0 < report.arguments < 2 ** 30 and report.temporaries > 0 and report.flops > 0
  assert report.fits
  assert 'fits: yes' in report.table()


def test_a_config_that_cannot_fit_is_reported_with_numbers():
  # An 8B-class width (4 layers), full fine-tuning and a same-size prior, replicated (no fsdp)
  # on each v5e chip.
  config = test_train_step.tiny_config(**{
      'model.architecture.hidden_size': 4096, 'model.architecture.intermediate_size': 14336,
      'model.architecture.num_layers': 4, 'model.architecture.num_heads': 32,
      'model.architecture.num_kv_heads': 8, 'model.architecture.vocab_size': 128256,
      'batch_size': 8, 'data.seq_len': 1024, 'mesh.data': 4, 'mesh.fsdp': 1})
  report = compile_check.check(config, 'v5e:2x2')
  assert report.fits is False
  assert report.total > report.hbm
  # Parameters (1.8B) in float32 with AdamW's two moments already exceed 16 GiB.
  assert report.arguments > 16 * 2 ** 30
  table = report.table()
  assert 'fits: NO, over by' in table and 'x the HBM' in table
  # The TPU compiler itself refuses such a plan (libtpu 0.0.42); its words are in the report.
  assert 'Ran out of memory on HBM' in report.compiler_message
  assert report.temporaries > 16 * 2 ** 30
  assert 'larger fsdp axis' in table and 'rematerialization' in table and 'fused loss' in table


def test_unknown_topology_is_a_clear_error():
  config = test_train_step.tiny_config()
  with pytest.raises(Exception, match="cannot describe TPU topology 'v9z:9x9'"):
    compile_check.check(config, 'v9z:9x9')


def test_tpu_plan_reduce_scatters_gradients_and_gathers_only_weights(small_slice_report):
  # On the CPU the partitioner writes a gradient reduction as all-reduce + slice; the TPU
  # compiler turns it into reduce-scatters, which is what ZeRO-3 promises.
  report = small_slice_report
  assert report.mesh['fsdp'] == 4
  assert report.collectives['reduce-scatter']['count'] >= 1
  from qtarget import hlo  # pylint: disable=g-import-not-at-top
  gathered = [i.results[0][1] for i in hlo.collectives(report.hlo_text)
              if hlo.collective_kind(i) == 'all-gather']
  # Every gathered array is a weight: no dimension is the 128-token sequence or 4 x 128 tokens.
  assert gathered and not [dims for dims in gathered if 128 * 4 in dims or
                           any(dims[i:i + 2] == (4, 128) for i in range(len(dims) - 1))]


def test_auto_attention_on_a_tpu_slice_is_the_splash_kernel():
  """For a TPU mesh 'auto' picks splash attention (from the mesh's devices, though the host is a
  CPU), and the TPU compiler builds its Mosaic kernels: the forward and the two backward
  kernels of the student, and the prior's forward."""
  # Splash needs 128-wide heads and 128-token blocks; the vocabulary only costs compile time.
  overrides = {'model.architecture.vocab_size': 2048, 'batch_size': 4, 'data.seq_len': 256,
               'model.architecture.hidden_size': 256, 'model.architecture.num_heads': 2,
               'model.architecture.num_kv_heads': 1}
  splash = compile_check.check(test_train_step.tiny_config(**overrides), 'v5e:2x2')
  assert splash.hlo_text.count('tpu_custom_call') >= 4
  assert splash.fits
  config = test_train_step.tiny_config(**overrides, **{'model.attention': 'xla',
                                                      'prior.attention': 'xla'})
  assert 'tpu_custom_call' not in compile_check.check(config, 'v5e:2x2').hlo_text
