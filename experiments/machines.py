"""Which machine each grid run ran on: step times compare only within one machine.

A grid's ``machines.jsonl`` lists the machines in the order they ran the grid, each with the time
from which it did (``since``, as the records' ``finished``). Every start of the grid on a machine
begins with

    python -m experiments.machines --record experiments/grid2/machines.jsonl

which appends this machine if it differs from the last one listed. A machine changes only
between two such starts, and an interrupted run restarts on the new one, so a run belongs to
the last machine listed at or before its ``finished`` time.
"""

import argparse
import os
import pathlib
import time

from experiments import records

# The instruction-set extensions that change XLA's CPU code (and so timings and rounding).
_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16')


def describe(cpuinfo: str | None = None) -> str:
  """This machine's CPU in one line: model name, usable cores, the extensions above."""
  if cpuinfo is None:
    cpuinfo = pathlib.Path('/proc/cpuinfo').read_text()
  fields = dict(line.split(':', 1) for line in cpuinfo.splitlines() if ':' in line)
  fields = {k.strip(): v.strip() for k, v in fields.items()}
  flags = set(fields.get('flags', '').split())
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return (f"{fields.get('model name', 'unknown CPU')}, {cores} cores, "
          + (' '.join(f for f in _FLAGS if f in flags) or 'none of ' + ' '.join(_FLAGS)))


def load(path: pathlib.Path) -> list[dict]:
  """The machines listed in ``path``, oldest first ([] when there is no such file)."""
  return records.read_json_lines(path, required=('since', 'cpu'))


def record(path: pathlib.Path, now: str | None = None) -> dict:
  """Appends this machine to ``path`` unless it is the last one listed; returns the entry in
  force."""
  cpu, in_force = describe(), []

  def add_if_new(machines: list[dict]) -> list[dict] | None:
    if machines and machines[-1]['cpu'] == cpu:
      in_force.append(machines[-1])
      return None
    in_force.append({'since': now or time.strftime('%Y-%m-%d %H:%M'), 'cpu': cpu,
                     'source': 'experiments/machines.py'})
    return machines + in_force

  records.update_json_lines(path, add_if_new, required=('since', 'cpu'))
  return in_force[0]


def machine_of(run: dict, machines: list[dict]) -> str | None:
  """The ``cpu`` of the machine a record ran on (None when nothing is listed for its time)."""
  finished = run.get('finished')
  if not finished:
    return None
  chosen = None
  for machine in machines:  # in order: the last one at or before the run's end
    if machine['since'] <= finished:
      chosen = machine['cpu']
  return chosen


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--record', type=pathlib.Path,
                      help='append this machine to this machines.jsonl if it is new there')
  parser.add_argument('--since', default=None,
                      help="'YYYY-MM-DD HH:MM' the machine started (default: now; first thing "
                      'on a machine, before any run finishes)')
  args = parser.parse_args()
  if args.record:
    entry = record(args.record, args.since)
    print(f"{args.record}: runs from {entry['since']} ran on {entry['cpu']}")
  else:
    print(describe())


if __name__ == '__main__':
  main()
