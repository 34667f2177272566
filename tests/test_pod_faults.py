"""Two processes under ``jax.distributed`` on localhost (CPU devices, gloo collectives), as the
processes of a pod: the workdir's lock decided by process 0 for both, a preemption (SIGTERM to
one process) saved by both at one agreed step and resumed exactly, and a checkpoint that one
process cannot read, from which both fall back to the same step. The two-process runs are slow;
one process standing in for two checks the same decisions in the default run."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtarget.train import checkpointing
from qtarget.train import loop
from qtarget.train import workdir_lock

import availability
import test_train_cli
import test_train_step

needs_smollm2 = availability.needs_smollm2("the tiny config uses SmolLM2's tokenizer")
STEPS = 6


# One process standing in for two.

def test_a_multi_process_run_stops_at_the_step_jax_agreed_on(monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  asked = []

  def reached_preemption(step):  # JAX's preemption sync point settled on step 3
    asked.append(step)
    return step == 3

  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with loop._StopSignals(reached_preemption) as stop:  # pylint: disable=protected-access
    # JAX's preemption service owns SIGTERM in a multi-process run: no handler of ours.
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert [stop.pending(step) for step in (1, 2, 3)] == [False, False, True]
  assert asked == [1, 2, 3] and stop.received == signal.SIGTERM


def _checkpoints(workdir):
  """Checkpoints of small trees at steps 2 and 4."""
  import grain  # pylint: disable=g-import-not-at-top
  config = test_train_step.tiny_config(**{'workdir': str(workdir), 'steps': 4,
                                          'checkpoint.every': 2, 'checkpoint.keep': 2})
  iterator = iter(grain.MapDataset.range(8).to_iter_dataset())
  tree = lambda step: {'step': jnp.int32(step), 'params': jnp.full((64,), float(step))}
  run_checkpoints = checkpointing.RunCheckpoints(workdir, config)
  for step in (2, 4):
    run_checkpoints.save(step, tree(step), iterator)
  run_checkpoints.wait()
  return checkpointing.RunCheckpoints(workdir, config), jax.eval_shape(lambda: tree(0)), iterator


def test_a_checkpoint_another_process_cannot_read_is_set_aside_by_all(tmp_path, monkeypatch,
                                                                      capsys):
  run_checkpoints, abstract, iterator = _checkpoints(tmp_path / 'run')
  # This process reads step 4; process 1 of 2 cannot, then both read step 2.
  verdicts = iter([[True, False], [True, True]])
  monkeypatch.setattr(checkpointing, '_all_processes', lambda ok: next(verdicts))
  restored, step = run_checkpoints.restore(abstract, iterator)
  assert step == 2 and float(restored['params'][0]) == 2.0
  out = capsys.readouterr().out
  assert (f'the checkpoint at step 4 ({(tmp_path / "run" / "checkpoints" / "4").resolve()}) '
          'cannot be read by process 1 of 2. Falling back to the checkpoint at step 2.') in out
  assert [p.name.split('_')[0] for p in (tmp_path / 'run' / 'damaged_checkpoints').iterdir()
          ] == ['4']


# Two processes.


def _launch(workdir, *flags):
  """Both processes of a two-process run of the tiny config (two CPU devices each), their
  output in files beside the workdir (a pipe left unread could stall a process)."""
  port = test_train_cli._free_port()
  processes = []
  for i in range(2):
    logs = [open(workdir.parent / f'{workdir.name}.{time.time_ns()}.p{i}.{stream}', 'w+')
            for stream in ('out', 'err')]
    process = subprocess.Popen(
        test_train_cli._command(
            workdir, f'--config.steps={STEPS}', '--config.distributed.enabled=True',
            f'--config.distributed.coordinator_address=127.0.0.1:{port}',
            '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}',
            '--config.distributed.cpu_collectives=gloo', *flags),
        env=test_train_cli._env(devices=2), stdout=logs[0], stderr=logs[1], text=True)
    process.logs = logs
    processes.append(process)
  return processes


def _read(process) -> tuple[str, str]:
  texts = []
  for log in process.logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  return texts[0], texts[1]


def _finish(processes, timeout=600):
  """``[(exit status, stdout, stderr)]`` of each process; both killed past ``timeout``."""
  deadline = time.time() + timeout
  for process in processes:
    try:
      process.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for other in processes:
        other.kill()
        other.wait()
      tails = [_read(other)[1][-1500:] for other in processes]
      raise AssertionError(f'the two processes did not finish in {timeout} s: {tails}') from None
  return [(process.returncode, *_read(process)) for process in processes]


def _exported(workdir):
  return test_train_cli._exported(workdir)


def _logged(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _assert_same_training(workdir, reference):
  got, want = _exported(workdir), _exported(reference)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  logged, expected = _logged(workdir), _logged(reference)
  assert [line['step'] for line in logged] == list(range(1, STEPS + 1))
  np.testing.assert_array_equal([line['loss'] for line in logged],
                                [line['loss'] for line in expected])


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """The workdirs' parent: they share its tfds/, the data prepared here once (two processes
  preparing it at the same moment would race)."""
  from qtarget import config_files  # pylint: disable=g-import-not-at-top
  from qtarget import train  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp('pod')
  config = config_files.load_module(test_train_cli.ROOT / 'configs' / 'tiny.py').get_config()
  config.data.data_dir = str(directory / 'tfds')
  train.dataset_builder(config)
  return directory


@pytest.fixture(scope='module')
def reference(base):
  """An uninterrupted two-process run: checkpoints at steps 4 and 6, and its export."""
  workdir = base / 'reference'
  for status, _, err in _finish(_launch(workdir, '--config.checkpoint.every=2')):
    assert status == 0, err[-3000:]
  return workdir


@needs_smollm2
def test_both_processes_stop_at_once_on_a_locked_workdir(base):
  workdir = base / 'locked'
  with workdir_lock.WorkdirLock(workdir, purpose='training'):  # this test's process holds it
    results = _finish(_launch(workdir), timeout=300)
  holder = f'training process {os.getpid()} on host'
  (status0, _, err0), (status1, _, err1) = results
  assert status0 == 1 and status1 == 1, (err0[-2000:], err1[-2000:])
  assert f'[qtarget] WorkdirLocked: {workdir} is in use by {holder}' in err0, err0[-2000:]
  assert 'another --config.workdir' in err0
  assert (f'[qtarget] WorkdirLocked: {workdir}: process 0 could not take the lock of this '
          f'workdir, held by {holder}') in err1, err1[-2000:]
  assert sorted(p.name for p in workdir.iterdir()) == [workdir_lock.LOCK_FILE]


@needs_smollm2
@pytest.mark.slow  # three two-process runs (60 s on 2 cores; one process stands in above)
def test_sigterm_to_one_process_saves_one_agreed_step_on_both_and_resumes_exactly(base,
                                                                                   reference):
  workdir = base / 'preempted'
  # No regular checkpoint before the last step: the preemption's is the only one.
  processes = _launch(workdir, '--config.checkpoint.every=100')
  metrics, deadline = workdir / 'metrics.jsonl', time.time() + 600
  while time.time() < deadline and all(p.poll() is None for p in processes) and not (
      metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
    time.sleep(0.05)
  processes[1].send_signal(signal.SIGTERM)  # not the coordinator: the notice must travel
  results = _finish(processes)
  saved = []
  for index, (status, _, err) in enumerate(results):
    assert status == 128 + signal.SIGTERM, (index, status, err[-3000:])
    found = re.search(r'\[qtarget\] SIGTERM at step (\d+): its checkpoint is saved in', err)
    assert found, (index, err[-3000:])
    saved.append(int(found.group(1)))
  step = saved[0]
  assert saved == [step, step] and 2 <= step < STEPS, saved
  assert (f'a preemption notice (SIGTERM) reached the run: every process saves step {step}, '
          'then stops') in results[0][1]
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == [str(step)]
  assert not (workdir / 'hf').exists()

  resumed = _finish(_launch(workdir, '--config.checkpoint.every=100'))
  for status, _, err in resumed:
    assert status == 0, err[-3000:]
  assert f'resumed from the checkpoint at step {step}' in resumed[0][1]
  _assert_same_training(workdir, reference)


@needs_smollm2
@pytest.mark.slow  # two two-process runs (50 s on 2 cores; one process stands in above)
def test_a_checkpoint_one_process_cannot_read_makes_both_fall_back(base, reference):
  workdir = base / 'damaged'
  shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns('hf', 'summary.json'))
  # Process 1 reads its shards from the files it wrote: only it finds this one truncated.
  files = sorted((p for p in (workdir / 'checkpoints' / str(STEPS) / 'state' /
                              'ocdbt.process_1').rglob('*') if p.is_file()),
                 key=lambda p: p.stat().st_size)
  files[-1].write_bytes(files[-1].read_bytes()[:10])
  results = _finish(_launch(workdir, '--config.checkpoint.every=2'))
  for status, _, err in results:
    assert status == 0, err[-3000:]
  (_, out0, _), (_, out1, _) = results
  damaged = f'the checkpoint at step {STEPS} ({workdir.resolve() / "checkpoints" / str(STEPS)}) '
  assert (damaged + 'cannot be read by process 1 of 2. Falling back to the checkpoint at step '
          f'{STEPS - 2}.') in out0, out0[-3000:]
  assert damaged + 'cannot be read by process 1 of 2: ' in out1, out1[-3000:]
  assert f'resumed from the checkpoint at step {STEPS - 2}' in out0
  assert [p.name.split('_')[0] for p in (workdir / 'damaged_checkpoints').iterdir()] == [
      str(STEPS)]
  _assert_same_training(workdir, reference)
