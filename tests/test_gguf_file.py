"""qtarget.gguf_file against gguf-py's GGUFReader (the same metadata and tensors), and the files
it must refuse."""

import struct

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
    # repr shows each element's type too (np.int32(1) is not 1).
    assert repr(ours.metadata[key]) == repr(expected), key
  assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
  for mine, reference in zip(ours.tensors, theirs.tensors):
    assert mine.tensor_type == reference.tensor_type, mine.name
    assert mine.shape == tuple(reference.shape.tolist()), mine.name
    assert mine.data.dtype == reference.data.dtype, mine.name
    assert mine.data.shape == reference.data.shape, mine.name
    np.testing.assert_array_equal(mine.data, reference.data, err_msg=mine.name)
  return ours, theirs


def _write(path, tensors=(), alignment=None, typed_arrays=None, **writers):
  """A GGUF file from gguf-py's writer: ``writers`` key -> (add_<method>, value);
  ``typed_arrays`` key -> (values, element type name), for types add_array does not infer."""
  writer = gguf.GGUFWriter(str(path), 'llama')
  if alignment is not None:
    writer.add_custom_alignment(alignment)
  for key, (method, value) in writers.items():
    getattr(writer, f'add_{method}')(key, value)
  for key, (values, type_name) in (typed_arrays or {}).items():
    writer.add_key_value(key, values, gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType[type_name])
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
      ('i32', np.arange(7, dtype=np.int32), None), ('f64', weights[:1, :3].astype(np.float64), None),
      ('i8', np.arange(-3, 3, dtype=np.int8).reshape(2, 3), None),
      ('i16', np.arange(5, dtype=np.int16), None), ('i64', np.arange(3, dtype=np.int64), None),
      ('q8_0', q8, gguf.GGMLQuantizationType.Q8_0),
      ('bf16', bf16, gguf.GGMLQuantizationType.BF16)],
      **{'v.u8': ('uint8', 200), 'v.i8': ('int8', -3), 'v.u16': ('uint16', 60000),
         'v.i16': ('int16', -30000), 'v.u32': ('uint32', 4_000_000_000),
         'v.i32': ('int32', -2_000_000_000), 'v.f32': ('float32', 0.1),
         'v.u64': ('uint64', 2**63 + 5), 'v.i64': ('int64', -(2**62)),
         'v.f64': ('float64', 1e-300), 'v.bool': ('bool', True),
         'v.str': ('string', 'héllo ▁world'), 'v.empty': ('string', ''),
         'v.strings': ('array', ['a', 'Ġb', '', '<|im_end|>']),
         'v.ints': ('array', [1, -2, 3]), 'v.floats': ('array', [0.5, 1.25]),
         'v.bools': ('array', [True, False]), 'v.empty_array': ('array', [])},
      typed_arrays={'v.u64s': ([2**40, 3], 'UINT64'), 'v.i8s': ([-1, 2], 'INT8'),
                    'v.f64s': ([0.1, -2.0], 'FLOAT64')})
  ours, _ = _assert_same_as_gguf_py(path)
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
  from qtarget import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = checkpoints.smollm2_gguf_path()
  ours, theirs = _assert_same_as_gguf_py(path)
  assert len(ours.metadata['tokenizer.ggml.tokens']) == 49152
  assert ours.metadata['tokenizer.ggml.model'] == 'gpt2'
  # Tokenizer.from_gguf takes either reader and builds the same tokenizer.
  mine, reference = (tokenizer_lib.Tokenizer.from_gguf(r) for r in (ours, theirs))
  text = 'What is 12 * 34? <|im_end|> Ünïcödé'
  assert mine.encode(text) == reference.encode(text)
  assert (mine.chat_template, mine.eos_token) == (reference.chat_template, reference.eos_token)
  # So does the model config.
  assert checkpoints.config_from_gguf(ours) == checkpoints.config_from_gguf(theirs)


def test_a_custom_alignment_places_every_tensor(tmp_path):
  path = tmp_path / 'aligned.gguf'
  arrays = [np.full((3,), i, np.float32) for i in range(1, 4)]  # 12 bytes each: padding between
  _write(path, tensors=[(f't{i}', a, None) for i, a in enumerate(arrays)], alignment=64)
  ours, _ = _assert_same_as_gguf_py(path)
  assert ours.metadata['general.alignment'] == 64
  for tensor, array in zip(ours.tensors, arrays):
    np.testing.assert_array_equal(tensor.data, array)


def test_nested_arrays_stay_nested(tmp_path):
  path = tmp_path / 'nested.gguf'
  _write(path, **{'v.nested': ('array', [[1, 2], [3]]), 'v.words': ('array', [['a'], ['b', 'c']])})
  ours = gguf_file.GGUFFile(path)
  assert ours.metadata['v.nested'] == [[1, 2], [3]]  # gguf-py's contents() gives [1, 2, 3]
  assert ours.metadata['v.words'] == [['a'], ['b', 'c']]


def _header(version=3, tensors=0, kvs=0, order='little'):
  return b'GGUF' + version.to_bytes(4, order) + struct.pack('<QQ', tensors, kvs)


def _kv_uint32(key, value, value_type=4):
  return struct.pack('<Q', len(key)) + key.encode() + struct.pack('<II', value_type, value)


_BAD_FILES = {  # id: (contents, what the message says)
    'empty': (b'', '0 bytes, too short'),
    'zip': (b'PK\x03\x04' + bytes(64), 'not a GGUF file'),
    'version1': (_header(version=1), 'version 1 is not supported'),
    'version7': (_header(version=7), 'version 7 is not supported'),
    'big_endian': (_header(order='big'), 'a big-endian GGUF file'),
    'duplicate_key': (_header(kvs=2) + _kv_uint32('v.x', 1) + _kv_uint32('v.x', 2),
                      "'v.x' appears twice"),
    # general.alignment as a bool (type 7) that reads as 1: refused, not used.
    'bool_alignment': (_header(kvs=1) + _kv_uint32('general.alignment', 1, value_type=7)[:-3],
                       'general.alignment must be a uint32'),
    'alignment48': (_header(kvs=1) + _kv_uint32('general.alignment', 48),
                    'alignment 48 is not a power of 2'),
    'huge_array': (_header(kvs=1) + struct.pack('<Q', 3) + b'v.a'
                   + struct.pack('<IIQ', 9, 4, 2**63 + 1), 'truncated or corrupt'),
}


@pytest.mark.parametrize('contents, message', _BAD_FILES.values(), ids=_BAD_FILES.keys())
def test_bad_files_are_refused_with_their_name(tmp_path, contents, message):
  path = tmp_path / 'bad.gguf'
  path.write_bytes(contents)
  with pytest.raises(gguf_file.GGUFFormatError, match=r'bad\.gguf') as error:
    gguf_file.GGUFFile(path)
  assert message in str(error.value)


def _tensors_and_values(path):
  q8 = gguf.quants.quantize(np.ones((2, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
  _write(path, tensors=[('w', np.ones((4, 8), np.float32), None),
                        ('q', q8, gguf.GGMLQuantizationType.Q8_0)],
         **{'v.u32': ('uint32', 7), 'v.f64': ('float64', 1.5), 'v.ints': ('array', [1, 2, 3]),
            'v.words': ('array', ['ab', 'cd']), 'v.bool': ('bool', True),
            'v.last': ('uint64', 9)})


def _values_ending_in_strings(path):  # no tensor infos after the strings to trip over
  _write(path, **{'v.u32': ('uint32', 7), 'v.words': ('array', ['abc', 'Ġdéf', 'ghij'])})


@pytest.mark.parametrize('make', [_tensors_and_values, _values_ending_in_strings])
def test_every_cut_of_a_file_is_refused_not_misread(tmp_path, make):
  whole = tmp_path / 'whole.gguf'
  make(whole)
  data = whole.read_bytes()
  reference = gguf.GGUFReader(whole)
  if reference.tensors:
    end = max(t.data_offset + t.n_bytes for t in reference.tensors)  # after it: padding only
  else:
    last = list(reference.fields.values())[-1]
    end = last.offset + sum(int(part.nbytes) for part in last.parts)
  path = tmp_path / 'cut.gguf'
  for cut in range(end):
    path.write_bytes(data[:cut])
    with pytest.raises(gguf_file.GGUFFormatError, match=r'cut\.gguf'):
      gguf_file.GGUFFile(path)
