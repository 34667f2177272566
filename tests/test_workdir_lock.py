"""One run per workdir: a second launch stops at once and names the holder, a lock left by a
dead process is taken over, and the grid runner and cache_prior respect the lock."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import types

import pytest

from qtarget.train import workdir_lock

import availability
import test_train_cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
needs_smollm2 = availability.needs_smollm2("the tiny config uses SmolLM2's tokenizer")


def _holder_process(directory, purpose='training'):
  """A process that holds ``directory``'s lock until it is killed."""
  code = ('import sys, time; from qtarget.train import workdir_lock; '
          f'workdir_lock.WorkdirLock({str(directory)!r}, purpose={purpose!r}).acquire(); '
          'print("held", flush=True); time.sleep(600)')
  process = subprocess.Popen([sys.executable, '-c', code], env=test_train_cli._env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  line = process.stdout.readline()
  if line.strip() != 'held':
    process.kill()
    raise AssertionError(f'the holder did not start: {line}{process.stderr.read()[-2000:]}')
  return process


@pytest.fixture
def holder(tmp_path):
  processes = []

  def start(directory, purpose='training'):
    processes.append(_holder_process(directory, purpose))
    return processes[-1]

  yield start
  for process in processes:
    if process.poll() is None:
      process.kill()
      process.wait()


def _record(directory, **fields):
  """Writes a lock record as a holder would have left it."""
  now = time.time()
  holder = workdir_lock.Holder(**{
      'host': socket.gethostname(), 'boot_id': workdir_lock._boot_id(), 'pid': os.getpid(),
      'process_start': workdir_lock.process_start_ticks(os.getpid()), 'started': now - 60,
      'heartbeat': now, 'purpose': 'training', 'command': 'python -m qtarget.train', 'token': 't',
      **fields})
  directory.mkdir(parents=True, exist_ok=True)
  (directory / workdir_lock.LOCK_FILE).write_bytes(workdir_lock._encode(holder))


def test_a_second_holder_is_refused_with_the_holder_and_what_to_do(tmp_path):
  with workdir_lock.WorkdirLock(tmp_path / 'run', purpose='training'):
    with pytest.raises(workdir_lock.WorkdirLocked) as refused:
      workdir_lock.WorkdirLock(tmp_path / 'run', purpose='training').acquire()
  message = str(refused.value)
  for part in (str(tmp_path / 'run'), f'process {os.getpid()} on host {socket.gethostname()}',
               'Wait for that run to finish', f'kill {os.getpid()}', 'another --config.workdir',
               'do not delete'):
    assert part in message, (part, message)
  # Released: free for the next run, and the file stays (emptied).
  with workdir_lock.WorkdirLock(tmp_path / 'run', purpose='training'):
    pass
  assert (tmp_path / 'run' / workdir_lock.LOCK_FILE).read_text() == ''


def test_the_holder_refreshes_its_heartbeat(tmp_path):
  with workdir_lock.WorkdirLock(tmp_path, purpose='training', heartbeat_seconds=0.05):
    first = workdir_lock.read_holder(tmp_path).heartbeat
    time.sleep(0.3)
    assert workdir_lock.read_holder(tmp_path).heartbeat > first
  assert workdir_lock.read_holder(tmp_path) is None


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_log_line(tmp_path, holder, capsys):
  process = holder(tmp_path / 'run')
  with pytest.raises(workdir_lock.WorkdirLocked, match=f'process {process.pid} on host'):
    workdir_lock.WorkdirLock(tmp_path / 'run', purpose='training').acquire()
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert workdir_lock.read_holder(tmp_path / 'run').pid == process.pid  # left behind
  with workdir_lock.WorkdirLock(tmp_path / 'run', purpose='training'):
    assert workdir_lock.read_holder(tmp_path / 'run').pid == os.getpid()
  out = capsys.readouterr().out
  assert (f'taking over the lock of {tmp_path / "run"} from training process {process.pid} on '
          f'host {socket.gethostname()}') in out and 'it is no longer running' in out, out


def test_a_lock_from_another_machine_is_taken_over_once_its_heartbeat_is_stale(tmp_path,
                                                                               capsys):
  _record(tmp_path, host='node-7', boot_id='b', pid=4242, heartbeat=time.time() - 30)
  with pytest.raises(workdir_lock.WorkdirLocked,
                     match=r'process 4242 on host node-7.*last heartbeat 3\d s ago.*may still be '
                           r'running.*once its heartbeat is 10 minutes old'):
    workdir_lock.WorkdirLock(tmp_path, purpose='training').acquire()
  _record(tmp_path, host='node-7', boot_id='b', pid=4242,
          heartbeat=time.time() - workdir_lock.STALE_SECONDS - 60)
  with workdir_lock.WorkdirLock(tmp_path, purpose='training'):
    pass
  out = capsys.readouterr().out
  assert 'from training process 4242 on host node-7' in out
  assert 'it ran on another machine and its last heartbeat is 11 minutes old (more than 10)' in out


def test_without_file_locks_the_pid_and_its_start_time_decide(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(workdir_lock, '_try_flock', lambda fd: False)  # e.g. some network mounts
  _record(tmp_path)  # this very process: alive
  with pytest.raises(workdir_lock.WorkdirLocked, match='may still be running'):
    workdir_lock.WorkdirLock(tmp_path, purpose='training').acquire()
  ticks = workdir_lock.process_start_ticks(os.getpid())
  if ticks is None:
    pytest.skip('no /proc here: a reused pid cannot be told apart')
  _record(tmp_path, process_start=ticks - 1)  # the same pid, another process: reused
  with workdir_lock.WorkdirLock(tmp_path, purpose='training'):
    pass
  assert 'it is no longer running' in capsys.readouterr().out


@needs_smollm2
def test_a_second_training_launch_exits_at_once_naming_the_holder(tmp_path, holder):
  workdir = tmp_path / 'run'
  process = holder(workdir)
  started = time.time()
  result = subprocess.run(test_train_cli._command(workdir, '--config.steps=2'),
                          env=test_train_cli._env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
  assert result.stderr.strip().startswith('[qtarget] WorkdirLocked: '), result.stderr[-3000:]
  for part in (str(workdir), f'training process {process.pid} on host {socket.gethostname()}',
               'Wait for that run to finish', 'another --config.workdir'):
    assert part in result.stderr, (part, result.stderr[-3000:])
  assert sorted(p.name for p in workdir.iterdir()) == [workdir_lock.LOCK_FILE]  # nothing else
  assert 'train data' not in result.stdout and time.time() - started < 120


@needs_smollm2
def test_train_run_refuses_before_writing_anything(tmp_path):
  import test_train_step  # pylint: disable=g-import-not-at-top
  from qtarget import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  config = test_train_step.tiny_config(**{'workdir': str(workdir), 'steps': 2,
                                          'data.data_dir': str(tmp_path / 'tfds'),
                                          'eval.before': False, 'eval.after': False})
  with workdir_lock.WorkdirLock(workdir, purpose='training'):
    with pytest.raises(train.WorkdirLocked, match=str(workdir)):
      train.run(config)
  assert sorted(p.name for p in workdir.iterdir()) == [workdir_lock.LOCK_FILE]


@needs_smollm2
@pytest.mark.parametrize('own_path', [False, True], ids=['in_the_workdir', 'elsewhere'])
def test_cache_prior_respects_the_lock_of_what_it_writes(own_path, tmp_path):
  import test_train_step  # pylint: disable=g-import-not-at-top
  from qtarget import cache_prior  # pylint: disable=g-import-not-at-top
  from qtarget.data import prior_cache_files  # pylint: disable=g-import-not-at-top
  config = test_train_step.tiny_config(**{
      'workdir': str(tmp_path / 'run'), 'data.data_dir': str(tmp_path / 'tfds'),
      'prior.source': 'cached', 'prior.cache.path': str(tmp_path / 'cache') if own_path else ''})
  locked = tmp_path / ('cache' if own_path else 'run')
  assert cache_prior.locked_directory(config) == locked
  with workdir_lock.WorkdirLock(locked, purpose='training'):
    with pytest.raises(workdir_lock.WorkdirLocked, match=str(locked)):
      cache_prior.build(config, progress=False)
  cache = prior_cache_files.cache_directory(config)
  assert not list(cache.glob('prior-*')) and not (cache / prior_cache_files.METADATA).exists()


def test_the_grid_runner_respects_the_lock(tmp_path):
  from experiments import compare  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'runs' / 'setting_sft_0'
  (workdir / 'checkpoints' / '2').mkdir(parents=True)
  grid = types.SimpleNamespace(get_config=lambda name: ml_collections.ConfigDict(
      {'workdir': str(workdir), 'steps': 2, 'seed': 0}))
  with workdir_lock.WorkdirLock(workdir, purpose='training'):
    with pytest.raises(workdir_lock.WorkdirLocked, match=str(workdir)):
      compare.train_run(grid, 'grid.py', 'setting/sft/0', compare.Registry(tmp_path / 'results'))
    with pytest.raises(workdir_lock.WorkdirLocked, match=str(workdir)):
      compare.clean_up(grid, 'setting/sft/0')
  assert not (workdir / 'code.json').exists() and (workdir / 'checkpoints' / '2').exists()
  compare.clean_up(grid, 'setting/sft/0')  # free: cleaned
  assert not (workdir / 'checkpoints').exists()


@needs_smollm2
@pytest.mark.slow  # two training runs side by side (the cheap launch test above is the same rule)
def test_two_training_runs_on_one_workdir_do_not_interleave(tmp_path):
  workdir = tmp_path / 'run'
  command = test_train_cli._command(workdir, '--config.steps=6')
  first = subprocess.Popen(command, env=test_train_cli._env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and first.poll() is None and not (
      (workdir / 'metrics.jsonl').exists() and (workdir / 'metrics.jsonl').read_text()):
    time.sleep(0.05)
  second = subprocess.run(command, env=test_train_cli._env(), capture_output=True, text=True,
                          timeout=600)
  first_out, first_err = first.communicate(timeout=600)
  assert first.returncode == 0, first_err[-3000:]
  assert second.returncode == 1 and 'WorkdirLocked' in second.stderr, second.stderr[-3000:]
  steps = [json.loads(line)['step'] for line in (workdir / 'metrics.jsonl').read_text()
           .splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6], steps
  assert 'resumed from the checkpoint' not in first_out + second.stdout
