"""qtarget.gguf_file against gguf-py's GGUFReader: the same metadata, tensors and errors."""

import numpy as np
import pytest

from qtarget import gguf_file

import availability

gguf = pytest.importorskip('gguf')


def _assert_same_as_gguf_py(path):
  ours, theirs = gguf_file.GGUFFile(path), gguf.GGUFReader(path)
  keys = [key for key in theirs.fields if not key.startswith('GGUF.')]  # its header pseudo-keys
  assert list(ours.metadata) == keys
  for key in keys:
    expected = theirs.fields[key].contents()
    assert ours.metadata[key] == expected, key
    assert type(ours.metadata[key]) is type(expected), key
  assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
  for mine, reference in zip(ours.tensors, theirs.tensors):
    assert mine.tensor_type == reference.tensor_type, mine.name
    assert mine.shape == tuple(reference.shape.tolist()), mine.name
    assert mine.data.dtype == reference.data.dtype, mine.name
    assert mine.data.shape == reference.data.shape, mine.name
    np.testing.assert_array_equal(mine.data, reference.data, err_msg=mine.name)
  return ours


def _write(path, tensors=(), **writers):
  writer = gguf.GGUFWriter(str(path), 'llama')
  for key, (method, value) in writers.items():
    getattr(writer, f'add_{method}')(key, value)
  for name, array, raw_dtype in tensors:
    writer.add_tensor(name, array, raw_dtype=raw_dtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_every_value_type_and_tensor_layout_reads_as_gguf_py_reads_it(tmp_path):
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(3, 64)).astype(np.float32)
  q8 = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
  bf16 = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.BF16)
  path = tmp_path / 'all.gguf'
  _write(path, tensors=[
      ('f32', weights, None), ('f16', weights[:2, :5].astype(np.float16), None),
      ('i32', np.arange(7, dtype=np.int32), None),
      ('q8_0', q8, gguf.GGMLQuantizationType.Q8_0),
      ('bf16', bf16, gguf.GGMLQuantizationType.BF16)],
      **{'v.u8': ('uint8', 200), 'v.i8': ('int8', -3), 'v.u16': ('uint16', 60000),
         'v.i16': ('int16', -30000), 'v.u32': ('uint32', 4_000_000_000),
         'v.i32': ('int32', -2_000_000_000), 'v.f32': ('float32', 0.1),
         'v.u64': ('uint64', 2**63 + 5), 'v.i64': ('int64', -(2**62)),
         'v.f64': ('float64', 1e-300), 'v.bool': ('bool', True),
         'v.str': ('string', 'héllo ▁world'), 'v.empty': ('string', ''),
         'v.strings': ('array', ['a', 'Ġb', '', '<|im_end|>']),
         'v.ints': ('array', [1, -2, 3]), 'v.floats': ('array', [0.5, 1.25])})
  ours = _assert_same_as_gguf_py(path)
  assert ours.metadata['v.f32'] == float(np.float32(0.1)) and ours.metadata['v.bool'] is True
  assert ours.metadata['v.strings'] == ['a', 'Ġb', '', '<|im_end|>']
  by_name = {t.name: t for t in ours.tensors}
  # The quantized views dequantize to what was written (Q8_0 to its own rounding).
  for name, atol in (('q8_0', 0.03), ('bf16', 0.02)):
    tensor = by_name[name]
    back = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    np.testing.assert_allclose(back, weights, atol=atol, err_msg=name)
  assert by_name['f32'].shape == (64, 3) and not by_name['f32'].data.flags.writeable


@availability.needs_smollm2('the file compared')
def test_smollm2_reads_as_gguf_py_reads_it():
  from qtarget import checkpoints  # pylint: disable=g-import-not-at-top
  ours = _assert_same_as_gguf_py(checkpoints.smollm2_gguf_path())
  assert len(ours.metadata['tokenizer.ggml.tokens']) == 49152
  assert ours.metadata['tokenizer.ggml.model'] == 'gpt2'


def test_a_file_that_is_not_gguf_is_refused_with_its_name(tmp_path):
  path = tmp_path / 'weights.bin'
  path.write_bytes(b'PK\x03\x04' + bytes(64))
  with pytest.raises(gguf_file.GGUFFormatError, match=r'weights\.bin: not a GGUF file'):
    gguf_file.GGUFFile(path)


def test_an_unsupported_version_is_refused(tmp_path):
  path = tmp_path / 'future.gguf'
  path.write_bytes(b'GGUF' + (7).to_bytes(4, 'little') + bytes(16))
  with pytest.raises(gguf_file.GGUFFormatError, match='version 7 is not supported'):
    gguf_file.GGUFFile(path)


@pytest.mark.parametrize('keep', [30, 0.5, -1])
def test_a_truncated_file_is_refused_not_misread(tmp_path, keep):
  whole = tmp_path / 'whole.gguf'
  _write(whole, tensors=[('w', np.ones((4, 8), np.float32), None)],
         **{'v.strings': ('array', ['x' * 40] * 4)})
  data = whole.read_bytes()
  cut = int(len(data) * keep) if isinstance(keep, float) else (keep if keep > 0 else len(data) - 4)
  path = tmp_path / 'cut.gguf'
  path.write_bytes(data[:cut])
  with pytest.raises(gguf_file.GGUFFormatError, match=r'cut\.gguf'):
    gguf_file.GGUFFile(path)
