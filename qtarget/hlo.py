"""Reading a compiled (SPMD-partitioned) XLA program: per-device array shapes and collectives.

The text of ``jax.jit(f).lower(...).compile().as_text()`` describes one device's program, so
every shape in it is a per-device shape. The functions here turn it into data that tests and
``compile_check`` can assert on and report: which collectives run, how often, on what shapes and
how many bytes their results hold.
"""

import collections
import dataclasses
import math
import re

COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
BYTES_PER_ELEMENT = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
                     's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
                     'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1, 'f8e4m3': 1, 'f8e4m3fnuz': 1,
                     'f8e5m2fnuz': 1, 'f8e4m3b11fnuz': 1, 'f8e8m0fnu': 1, 'f8e3m4': 1,
                     # sub-byte types: counted as one byte an element (an upper bound)
                     'f4e2m1fn': 1, 's4': 1, 'u4': 1, 's2': 1, 'u2': 1, 's1': 1, 'u1': 1}
_SHAPE = re.compile(r'\b(' + '|'.join(sorted(BYTES_PER_ELEMENT, key=len, reverse=True))
                    + r')\[([\d,]*)\]')
# `%name = ` at the start of an instruction line; the result type and opcode follow.
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%[\w.\-]+ = ', re.MULTILINE)
_OPCODE = re.compile(r'\s*([a-z][\w\-]*)\(')


def _split_type(rest: str) -> tuple[str, str]:
  """``(type, after)`` for the text after ``=``: a shape, or a tuple in balanced parentheses
  (TPU layouts such as ``{1,0:T(8,128)(2,1)}`` hold parentheses of their own)."""
  if not rest.startswith('('):
    head, _, after = rest.partition(' ')
    return head, after
  depth = 0
  for index, char in enumerate(rest):
    depth += {'(': 1, ')': -1}.get(char, 0)
    if depth == 0:
      return rest[:index + 1], rest[index + 1:]
  return rest, ''


# The header of a computation: `%name (params) -> type {` or `ENTRY %name ...{`.
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%([\w.\-]+) .*\{\s*$', re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Instruction:
  opcode: str
  shapes: tuple  # ((dtype, dims), ...): the result, one entry per tuple element
  line: str
  computation: str = ''  # the computation that holds it

  @property
  def results(self) -> tuple:
    """The result's shapes: an asynchronous all-gather-start (collective-permute-start) is
    typed ``(operands..., results...)``; other instructions are typed by their results."""
    if self.opcode in ('all-gather-start', 'collective-permute-start') and len(self.shapes) > 1:
      return self.shapes[len(self.shapes) // 2:]
    return self.shapes

  @property
  def bytes(self) -> int:
    return sum(BYTES_PER_ELEMENT[dtype] * math.prod(dims) for dtype, dims in self.results)


def _shapes(text: str) -> tuple:
  return tuple((dtype, tuple(int(d) for d in dims.split(',') if d))
               for dtype, dims in _SHAPE.findall(text))


def instructions(hlo_text: str) -> list[Instruction]:
  """Every instruction of every computation (fused computations included)."""
  headers = [(m.start(), m.group(1)) for m in _COMPUTATION.finditer(hlo_text)]
  found, current = [], 0
  for match in _INSTRUCTION.finditer(hlo_text):
    while current + 1 < len(headers) and headers[current + 1][0] < match.start():
      current += 1
    end = hlo_text.find('\n', match.start())
    line = hlo_text[match.start():end if end >= 0 else None]
    result_type, after = _split_type(line[match.end() - match.start():])
    opcode = _OPCODE.match(after)
    if opcode is None:
      continue
    found.append(Instruction(opcode.group(1), _shapes(result_type), line.strip(),
                             headers[current][1] if headers else ''))
  return found


def collective_kind(instruction: Instruction) -> str | None:
  """'all-gather' for all-gather and all-gather-start; None for -done halves and the rest.

  The TPU compiler writes a reduce-scatter as a fusion that calls a computation named
  ``all-reduce-scatter``: that fusion counts as a reduce-scatter, its inner all-reduce not.
  """
  if instruction.computation.startswith('all-reduce-scatter'):
    return None
  if instruction.opcode == 'fusion' and 'calls=%all-reduce-scatter' in instruction.line:
    return 'reduce-scatter'
  for kind in COLLECTIVES:
    if instruction.opcode in (kind, kind + '-start'):
      return kind
  return None


def collectives(hlo_text: str) -> list[Instruction]:
  return [i for i in instructions(hlo_text) if collective_kind(i)]


def collective_summary(hlo_text: str) -> dict:
  """``{kind: {'count': n, 'bytes': bytes of their results}}`` for the collectives present.

  Counts each instruction once as written (a collective inside a loop body runs once per trip).
  """
  summary = collections.defaultdict(lambda: {'count': 0, 'bytes': 0})
  for instruction in collectives(hlo_text):
    entry = summary[collective_kind(instruction)]
    entry['count'] += 1
    entry['bytes'] += instruction.bytes
  return dict(sorted(summary.items()))


def array_dims(hlo_text: str) -> set:
  """The dimensions of every array any instruction produces or takes as a parameter."""
  return {dims for instruction in instructions(hlo_text) for _, dims in instruction.shapes}
