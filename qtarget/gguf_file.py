"""GGUF files read quickly: metadata as Python values, tensors as views of the mapped file.

gguf-py's ``GGUFReader`` makes a NumPy view of every part of every metadata value, which for
SmolLM2's 49k tokens and 49k merges takes 4-6 s per process on this project's CPU machine.
Most of our processes (each training run, each grid measurement, each CLI test) only need
those values and views of the tensors, so this module decodes the same file format directly.
Tensors come out as gguf-py lays them out, so ``gguf.quants.dequantize`` reads them unchanged;
``tests/test_gguf_file.py`` checks both against ``GGUFReader``. Two differences: an array of
arrays stays nested (gguf-py flattens it), and big-endian files are refused (gguf-py reads
them). A file that is cut short or inconsistent raises :class:`GGUFFormatError` naming it.

Format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic, version, tensor and
key-value counts; the key-values (a string key, a type, a value); the tensor infos (name, dims
fastest first, type, offset); then the tensor data, aligned to ``general.alignment``.
"""

import dataclasses
import math
import mmap
import os
import struct
from typing import Any

import numpy as np

_MAGIC = b'GGUF'
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_UINT32, _STRING, _ARRAY = 4, 8, 9
_HEADER_BYTES = 24  # magic, version, tensor count, key-value count
_MAX_DIMS = 4  # as llama.cpp
# Value types with a fixed width: GGUF type id -> NumPy dtype (little-endian).
_SCALARS = {0: '<u1', 1: '<i1', 2: '<u2', 3: '<i2', 4: '<u4', 5: '<i4', 6: '<f4', 7: '?',
            10: '<u8', 11: '<i8', 12: '<f8'}
# Tensor types whose data is a plain NumPy array (as gguf-py reads them); the rest are bytes.
_NATIVE_TYPES = {'F16': np.float16, 'F32': np.float32, 'F64': np.float64, 'I8': np.int8,
                 'I16': np.int16, 'I32': np.int32, 'I64': np.int64}
_U32 = struct.Struct('<I')
_U64 = struct.Struct('<Q')


class GGUFFormatError(ValueError):
  """The file is not a GGUF file this reader understands; the message says why."""


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One tensor: ``shape`` in GGUF order (fastest dimension first, as gguf-py's), ``data`` a
  read-only view in NumPy order (bytes per row for quantized types, as gguf-py's)."""
  name: str
  tensor_type: Any  # gguf.GGMLQuantizationType
  shape: tuple[int, ...]
  data: np.ndarray


class GGUFFile:
  """A GGUF file mapped read-only: ``metadata`` (key -> int, float, bool, str or list) and
  ``tensors`` (in file order)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    with open(self.path, 'rb') as f:
      size = os.fstat(f.fileno()).st_size
      if size < _HEADER_BYTES:
        raise GGUFFormatError(f'{self.path}: {size} bytes, too short for a GGUF header '
                              '(an interrupted download?)')
      # Mapped for as long as the tensors (views of it) live.
      self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    self.metadata: dict[str, Any] = {}
    self.tensors: list[Tensor] = []
    try:
      self._read()
    except (struct.error, UnicodeDecodeError, IndexError, OverflowError,
            RecursionError) as error:
      self._release()
      raise GGUFFormatError(f'{self.path}: truncated or corrupt GGUF file ({error})') from error
    except GGUFFormatError:
      self._release()
      raise

  def _release(self):
    """Unmaps a file that failed to parse, unless a view of it is still referenced."""
    self.tensors = []
    try:
      self._map.close()
    except BufferError:
      pass

  def _read(self):
    buffer = self._map
    if buffer[:4] != _MAGIC:
      raise GGUFFormatError(f'{self.path}: not a GGUF file (magic {bytes(buffer[:4])!r})')
    (version,) = _U32.unpack_from(buffer, 4)
    if version not in _VERSIONS:
      swapped = int.from_bytes(version.to_bytes(4, 'little'), 'big')
      if version and swapped in _VERSIONS:
        raise GGUFFormatError(f'{self.path}: a big-endian GGUF file (version {swapped}); this '
                              'reader reads little-endian files only.')
      raise GGUFFormatError(f'{self.path}: GGUF version {version} is not supported; this '
                            f'reader reads versions {_VERSIONS}.')
    tensor_count, kv_count = struct.unpack_from('<QQ', buffer, 8)
    offset = _HEADER_BYTES
    for _ in range(kv_count):
      key, offset = self._string(offset)
      (value_type,) = _U32.unpack_from(buffer, offset)
      value, offset = self._value(value_type, offset + 4)
      if key in self.metadata:
        raise GGUFFormatError(f'{self.path}: metadata key {key!r} appears twice')
      if key == 'general.alignment' and value_type != _UINT32:
        raise GGUFFormatError(f'{self.path}: general.alignment must be a uint32, not value '
                              f'type {value_type}')
      self.metadata[key] = value
    infos = []
    for _ in range(tensor_count):
      name, offset = self._string(offset)
      (ndims,) = _U32.unpack_from(buffer, offset)
      if ndims > _MAX_DIMS:
        raise GGUFFormatError(f'{self.path}: tensor {name!r} has {ndims} dimensions '
                              f'(at most {_MAX_DIMS})')
      dims = struct.unpack_from(f'<{ndims}Q', buffer, offset + 4)
      offset += 4 + 8 * ndims
      type_id, data_offset = struct.unpack_from('<IQ', buffer, offset)
      offset += 12
      infos.append((name, dims, type_id, data_offset))
    alignment = self.metadata.get('general.alignment', _DEFAULT_ALIGNMENT)
    if alignment <= 0 or alignment & (alignment - 1):
      raise GGUFFormatError(f'{self.path}: general.alignment {alignment} is not a power of 2')
    start = -(-offset // alignment) * alignment
    names = set()
    for name, dims, type_id, data_offset in infos:
      if name in names:
        raise GGUFFormatError(f'{self.path}: tensor {name!r} appears twice')
      if data_offset % alignment:
        raise GGUFFormatError(f'{self.path}: tensor {name!r} starts at {data_offset}, not a '
                              f'multiple of the alignment {alignment}')
      names.add(name)
      self.tensors.append(self._tensor(name, dims, type_id, start + data_offset))

  def _need(self, offset: int, size: int):
    if offset + size > len(self._map):
      raise IndexError(f'{size} bytes at offset {offset} run past the end '
                       f'({len(self._map)} bytes)')

  def _string(self, offset: int) -> tuple[str, int]:
    (length,) = _U64.unpack_from(self._map, offset)
    self._need(offset + 8, length)
    return self._map[offset + 8:offset + 8 + length].decode('utf-8'), offset + 8 + length

  def _value(self, value_type: int, offset: int) -> tuple[Any, int]:
    if value_type == _STRING:
      return self._string(offset)
    if value_type in _SCALARS:
      dtype = np.dtype(_SCALARS[value_type])
      self._need(offset, dtype.itemsize)
      return np.frombuffer(self._map, dtype, 1, offset)[0].item(), offset + dtype.itemsize
    if value_type != _ARRAY:
      raise GGUFFormatError(f'{self.path}: unknown value type {value_type} at offset {offset}')
    item_type, count = struct.unpack_from('<IQ', self._map, offset)
    offset += 12
    if item_type in _SCALARS:  # one vectorized read (e.g. 49k token types)
      dtype = np.dtype(_SCALARS[item_type])
      self._need(offset, count * dtype.itemsize)
      values = np.frombuffer(self._map, dtype, count, offset).tolist()
      return values, offset + count * dtype.itemsize
    self._need(offset, count)  # every item takes at least a byte: a corrupt count stops here
    values = []
    for _ in range(count):  # strings, or arrays of arrays (kept nested)
      value, offset = self._value(item_type, offset)
      values.append(value)
    return values, offset

  def _tensor(self, name: str, dims: tuple[int, ...], type_id: int, offset: int) -> Tensor:
    import gguf  # pylint: disable=g-import-not-at-top
    try:
      tensor_type = gguf.GGMLQuantizationType(type_id)
    except ValueError as error:
      raise GGUFFormatError(f'{self.path}: tensor {name!r} has unknown type {type_id}') from error
    numpy_shape = tuple(reversed(dims))
    dtype = _NATIVE_TYPES.get(tensor_type.name)
    if dtype is None:  # quantized (and bfloat16): the raw bytes, one row of blocks per row
      try:
        numpy_shape = gguf.quants.quant_shape_to_byte_shape(numpy_shape, tensor_type)
      except ValueError as error:
        raise GGUFFormatError(f'{self.path}: tensor {name!r}: {error}') from error
      dtype = np.uint8
    count = math.prod(numpy_shape)  # Python ints: corrupt dimensions cannot wrap around
    if offset + count * np.dtype(dtype).itemsize > len(self._map):
      raise GGUFFormatError(f'{self.path}: tensor {name!r} runs past the end of the file')
    data = np.frombuffer(self._map, dtype, count, offset).reshape(numpy_shape)
    return Tensor(name, tensor_type, tuple(int(d) for d in dims), data)


def metadata_value(reader, key: str, default=None):
  """``key``'s value in a :class:`GGUFFile` or a ``gguf.GGUFReader`` (``default`` if absent),
  for functions that take either."""
  if isinstance(reader, GGUFFile):
    return reader.metadata.get(key, default)
  field = reader.fields.get(key)
  return default if field is None else field.contents()

