"""Runs that fail loudly and resume safely: divergence, damaged or lost checkpoints, changed
configs, ranges, and messages that name the key and the fix."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtarget import checkpoints
from qtarget import train
from qtarget.train import loading
from qtarget.train import loop
from qtarget.train import metrics_log

import availability
import test_train_cli
import test_train_step

availability.skip_module_without_smollm2()  # the tiny config uses SmolLM2's tokenizer
ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def _config(workdir, data_dir, **overrides):
  """The tiny config, in process on the 8 test devices: 4 steps, checkpoints at 2 and 4."""
  return test_train_step.tiny_config(**{
      'workdir': str(workdir), 'data.data_dir': str(data_dir),
      'model.architecture.vocab_size': 49152, 'batch_size': 8, 'steps': 4,
      'checkpoint.every': 2, 'checkpoint.keep': 2, 'eval.before': False, 'eval.after': False,
      'export_hf': False, **overrides})


def _strict_json_lines(path):
  def refuse(constant):
    raise ValueError(f'{path} holds {constant}, which is not JSON')
  return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# Divergence.

def test_a_diverged_run_stops_keeps_its_checkpoint_and_exports_nothing(tmp_path, data_dir):
  config = _config(tmp_path / 'run', data_dir, **{'optimizer.learning_rate': 1e38,
                                                  'checkpoint.every': 1, 'export_hf': True})
  with pytest.raises(loop.TrainingDiverged,
                     match=r'step \d: (loss|grad_norm) is (nan|inf|-inf).*not finite.*last good '
                           r'checkpoint is step \d'):
    train.run(config)
  workdir = tmp_path / 'run'
  assert not (workdir / 'hf').exists() and not (workdir / 'summary.json').exists()
  lines = _strict_json_lines(workdir / 'metrics.jsonl')  # valid JSON: no NaN literals
  assert lines[-1]['nonfinite'] == 1.0
  assert lines[-1]['loss'] is None or lines[-1]['grad_norm'] is None
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved and max(saved) == lines[-1]['step'] - 1  # the last good step, not the bad one


def test_a_zero_gradient_with_response_tokens_is_a_dead_model():
  assert 'the model has died' in loop._divergence(  # pylint: disable=protected-access
      {'loss': 0.0, 'grad_norm': 0.0, 'response_tokens': 12.0})
  assert loop._divergence({'loss': 0.0, 'grad_norm': 0.0, 'response_tokens': 0.0}) is None
  assert loop._divergence({'loss': 1.0, 'grad_norm': 0.5, 'response_tokens': 12.0}) is None


@pytest.mark.slow  # a training run; the stop is the diverged run's, the rule is tested above
def test_a_dead_model_stops_the_run(tmp_path, data_dir):
  # A learning rate of 1e3 saturates the model within two steps: the loss of Target-SFT drops
  # to 0 (p_y = 0, and the residual sits where p does) and the gradient is exactly 0.
  config = _config(tmp_path / 'run', data_dir, **{'optimizer.learning_rate': 1e3,
                                                  'export_hf': True})
  with pytest.raises(loop.TrainingDiverged, match=r'step \d: the gradient norm is exactly 0 .*'
                                                  r'the model has died.*no checkpoint was '
                                                  r'written before it. Lower'):
    train.run(config)
  assert not (tmp_path / 'run' / 'hf').exists()


def test_skip_nonfinite_keeps_the_previous_state():
  config = test_train_step.tiny_config(on_nonfinite='skip')
  state = train.create_state(config, *test_train_step._models(config))
  assert state.spec.skip_nonfinite
  poisoned = state.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan)
                                               if x.ndim == 2 else x, state.params))
  new_state, metrics = test_train_step._single_device_step(poisoned, test_train_step.make_batch())
  assert metrics['nonfinite'] == 1.0
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(poisoned.params)):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(jax.tree.leaves(new_state.opt_state),
                       jax.tree.leaves(poisoned.opt_state)):
    np.testing.assert_array_equal(got, want)
  # A finite step is applied as usual.
  _, clean = test_train_step._single_device_step(state, test_train_step.make_batch())
  assert clean['nonfinite'] == 0.0


@pytest.mark.slow  # the step-level test above covers the update; this covers the count
def test_the_loop_counts_skipped_updates(tmp_path, data_dir):
  config = _config(tmp_path / 'run', data_dir, **{'optimizer.learning_rate': 1e38,
                                                  'on_nonfinite': 'skip'})
  train.run(config)
  lines = _strict_json_lines(tmp_path / 'run' / 'metrics.jsonl')
  assert lines[-1]['skipped_updates'] >= 1
  assert sum(line['nonfinite'] for line in lines) == lines[-1]['skipped_updates']


# The host waits on the device once per log interval, not once per step.

@pytest.mark.slow  # a training run counting host syncs
def test_metrics_are_fetched_once_per_log_interval(tmp_path, data_dir, monkeypatch):
  fetched = []
  original = train.loop.fetch_metrics
  monkeypatch.setattr(train.loop, 'fetch_metrics',
                      lambda pending: fetched.append(len(pending)) or original(pending))
  workdir = tmp_path / 'run'
  train.run(_config(workdir, data_dir, steps=8, log_every=4, **{'checkpoint.every': 8}))
  # The first step alone (it includes compilation), then steps 2-4, then 5-8: every step once.
  assert fetched == [1, 3, 4]
  logged = [line['step'] for line in _strict_json_lines(workdir / 'metrics.jsonl')]
  assert logged == [4, 8]


# Damaged, missing and lost checkpoints.

@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, data_dir):
  """A finished 4-step run (checkpoints 2 and 4) and its final parameters."""
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  config = _config(workdir, data_dir, export_hf=True)
  train.run(config)
  return workdir, checkpoints.load_hf(workdir / 'hf')


def _copy(finished, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(finished, workdir)
  shutil.rmtree(workdir / 'hf')
  (workdir / 'summary.json').unlink()
  return workdir


def _truncate_a_data_file(step_dir):
  files = sorted((p for p in (step_dir / 'state').rglob('*') if p.is_file()),
                 key=lambda p: p.stat().st_size)
  files[-1].write_bytes(files[-1].read_bytes()[:10])


DAMAGES = {
    'truncated_data_file': _truncate_a_data_file,
    'no_manifest': lambda d: [p.unlink() for p in d.rglob('manifest.ocdbt')],
    'no_state_folder': lambda d: shutil.rmtree(d / 'state'),
    'no_data_folder': lambda d: shutil.rmtree(d / 'data'),
}


# One damage in the default run; the other three are marked slow (same code path).
@pytest.mark.parametrize('damage', [
    pytest.param(name, marks=() if name == 'truncated_data_file' else pytest.mark.slow)
    for name in DAMAGES])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(
    damage, finished_run, tmp_path, data_dir, capsys):
  finished, final = finished_run
  workdir = _copy(finished, tmp_path)
  DAMAGES[damage](workdir / 'checkpoints' / '4')
  train.run(_config(workdir, data_dir, export_hf=True))
  out = capsys.readouterr().out
  assert 'the checkpoint at step 4' in out and 'cannot be read' in out, out[-2000:]
  assert 'Falling back to the checkpoint at step 2' in out
  assert 'resumed from the checkpoint at step 2' in out
  assert [p.name.split('_')[0] for p in (workdir / 'damaged_checkpoints').iterdir()] == ['4']
  # Steps 3 and 4 trained again from step 2 reach the same parameters.
  again = checkpoints.load_hf(workdir / 'hf')
  for got, want in zip(jax.tree.leaves(again.embed[...]), jax.tree.leaves(final.embed[...])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # the fallback path is run by the truncated-file case
def test_no_readable_checkpoint_is_an_error_naming_each(finished_run, tmp_path, data_dir):
  workdir = _copy(finished_run[0], tmp_path)
  for step in ('2', '4'):
    shutil.rmtree(workdir / 'checkpoints' / step / 'state')
  with pytest.raises(train.ConfigError, match=r'no checkpoint in .* can be read \(step 4: .*; '
                                               r'step 2: .*\)'):
    train.run(_config(workdir, data_dir))


@pytest.mark.slow  # two more runs over the shared finished run
def test_lost_checkpoints_refuse_to_erase_results_unless_asked(finished_run, tmp_path, data_dir):
  workdir = tmp_path / 'run'
  shutil.copytree(finished_run[0], workdir)
  shutil.rmtree(workdir / 'checkpoints')
  (workdir / 'predictions_step2.jsonl').write_text('{"stale": true}\n')
  before = (workdir / 'metrics.jsonl').read_text()
  with pytest.raises(train.ConfigError, match=r'holds results of an earlier run \(hf, '
                                               r'summary.json, metrics.jsonl, '
                                               r'predictions_step2.jsonl\).*start_over=True'):
    train.run(_config(workdir, data_dir))
  assert (workdir / 'metrics.jsonl').read_text() == before  # nothing touched
  train.run(_config(workdir, data_dir, start_over=True))
  previous = list(workdir.glob('previous_*'))
  assert len(previous) == 1
  assert (previous[0] / 'metrics.jsonl').read_text() == before
  assert (previous[0] / 'predictions_step2.jsonl').exists()
  assert not (workdir / 'predictions_step2.jsonl').exists()
  assert [line['step'] for line in _strict_json_lines(workdir / 'metrics.jsonl')] == [1, 2, 3, 4]


# A changed config.

@pytest.mark.parametrize('overrides, fields', [
    ({'method': 'sft', 'hparams': {}}, ["method: 'target_sft' -> 'sft'", 'hparams.eta']),
    # The same comparison of two configs: the other fields are slow.
    pytest.param({'steps': 2}, ['steps: 4 -> 2'], marks=pytest.mark.slow),
    pytest.param({'optimizer.learning_rate': 2e-3}, ['optimizer.learning_rate: 0.001 -> 0.002'],
                 marks=pytest.mark.slow),
])
def test_a_changed_config_refuses_to_resume(overrides, fields, finished_run, tmp_path, data_dir):
  workdir = _copy(finished_run[0], tmp_path)
  with pytest.raises(train.ConfigError, match='another config') as raised:
    train.run(_config(workdir, data_dir, **overrides))
  for field in fields:
    assert field in str(raised.value)


@pytest.mark.slow  # resume rules covered by the faster tests above; these add a kill and the listing
def test_harmless_changes_resume_and_are_listed(finished_run, tmp_path, data_dir, capsys):
  workdir = _copy(finished_run[0], tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / '4')
  train.run(_config(workdir, data_dir, log_every=2, **{'checkpoint.every': 1}))
  out = capsys.readouterr().out
  assert 'resumed from the checkpoint at step 2' in out
  assert 'log_every: 1 -> 2' in out and 'checkpoint.every: 2 -> 1' in out


# Ranges and messages, all before anything loads.

@pytest.mark.parametrize('overrides, message', [
    ({'steps': -5}, r'steps=-5: must be an integer >= 1'),
    ({'accum_steps': 0}, r'accum_steps=0: must be an integer >= 1'),
    ({'batch_size': 0}, r'batch_size=0: must be an integer >= 1'),
    ({'optimizer.learning_rate': -1e-3}, r'learning_rate=-0.001: must be a finite number > 0'),
    ({'optimizer.warmup_steps': -1}, r'warmup_steps=-1: must be an integer >= 0'),
    ({'loss_chunk_size': 0}, r'loss_chunk_size=0: must be an integer >= 1'),
    ({'eval.num_problems': -1}, r'eval.num_problems=-1: must be an integer >= 0'),
    ({'eval.batch_size': 0}, r'eval.batch_size=0: must be an integer >= 1'),
    ({'data.seq_len': 1}, r'data.seq_len=1: must be an integer >= 2'),
    ({'on_nonfinite': 'ignore'}, r"on_nonfinite='ignore': must be 'stop'"),
    ({'prior.source': 'none'}, r"method 'target_sft' needs a prior, and prior.source='none' "
                               r'gives none: set --config.prior.source'),
    ({'prior.source': 'hf'}, r"prior.path is empty: prior.source='hf' needs the teacher's"),
    ({'data.kind': 'files'}, r"data.train_path is empty: data.kind='files' needs"),
    ({'data.kind': 'file'}, r"data.kind='file': must be one of .*did you mean 'files'"),
    ({'data.task': 'chain_summ'}, r"data.task='chain_summ' is not a reasoning-gym task; did you "
                                  r'mean chain_sum'),
    ({'loss': 'fuse'}, r"loss='fuse': must be one of 'dense', 'fused'"),
    ({'model.remat': 'ful'}, r"model.remat='ful': must be one of 'none', 'full'"),
    ({'model.compute_dtype': 'bf16'}, r"model.compute_dtype='bf16': must name a floating dtype"),
])
def test_bad_values_stop_before_anything_loads(overrides, message, tmp_path):
  # model.source 'hf' at a path that does not exist: any loading would fail differently.
  config = _config(tmp_path / 'run', tmp_path / 'tfds', **{
      'model.source': 'hf', 'model.path': str(tmp_path / 'absent'), **overrides})
  with pytest.raises(train.ConfigError, match=message):
    train.run(config)
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_a_corrupt_config_json_names_the_file(tmp_path):
  (tmp_path / 'config.json').write_text('{"model_type": "llama",')
  with pytest.raises(checkpoints.CheckpointError, match=r'config.json is not valid JSON'):
    checkpoints.load_hf(tmp_path)


def test_an_unknown_config_key_is_named_in_a_few_lines(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'qtarget.train', '--config', str(ROOT / 'configs' / 'tiny.py'),
       '--config.optimizer.learning_rat=1e-3'], capture_output=True, text=True, timeout=120,
      env=test_train_cli._env())
  assert result.returncode != 0
  assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
  assert "unknown config key 'optimizer.learning_rat'" in result.stderr
  assert 'optimizer.learning_rate' in result.stderr


def test_compare_only_matching_nothing_exits_non_zero(tmp_path):
  result = subprocess.run(
      [sys.executable, 'experiments/compare.py', 'run', '--only', 'no_such_setting/*',
       '--dry_run', '--results_dir', str(tmp_path / 'results')], capture_output=True,
      text=True, timeout=120, cwd=ROOT)
  assert result.returncode != 0 and 'matches no run' in result.stderr
  assert 'teacher' not in result.stdout


@pytest.mark.slow  # resume rules covered by the faster tests above; these add a kill and the listing
def test_sigkill_during_the_fallback_still_resumes(finished_run, tmp_path, data_dir):
  workdir = _copy(finished_run[0], tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / '4' / 'state')
  command = test_train_cli._command(workdir, '--config.steps=4', '--config.checkpoint.keep=2',
                                    '--config.batch_size=8', '--config.export_hf=True',
                                    f'--config.data.data_dir={data_dir}')
  command = [c for c in command if not c.startswith('--config.data.data_dir=') or
             c.endswith(str(data_dir))]
  process = subprocess.Popen(command, env=test_train_cli._env(8), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  deadline, seen = time.time() + 300, ''
  while time.time() < deadline:
    line = process.stdout.readline()
    seen += line
    if 'cannot be read' in line or not line:
      break
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert 'cannot be read' in seen, seen[-3000:]
  # Killed right after it named the damaged checkpoint: the next run falls back again (or finds
  # it already moved aside) and finishes with the uninterrupted run's parameters.
  result = subprocess.run(command, env=test_train_cli._env(8), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  again = checkpoints.load_hf(workdir / 'hf')
  np.testing.assert_allclose(again.embed[...], finished_run[1].embed[...], rtol=1e-5, atol=1e-7)


# Before anything loads: another run's workdir, a finished run. Interruption by a signal.

def _no_loading(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('loaded a model')
  monkeypatch.setattr(loading, 'load_model', refuse)


def test_another_runs_workdir_is_refused_before_anything_loads(finished_run, tmp_path, data_dir,
                                                                monkeypatch):
  workdir = _copy(finished_run[0], tmp_path)
  _no_loading(monkeypatch)
  with pytest.raises(train.ConfigError, match=r'another config .*steps: 4 -> 6.*train the finished '
                                               r'run further.*--config.model.source=hf'):
    train.run(_config(workdir, data_dir, steps=6))


def test_a_finished_run_is_not_run_again(finished_run, tmp_path, data_dir, monkeypatch, capsys):
  workdir = tmp_path / 'run'
  shutil.copytree(finished_run[0], workdir)
  before = (workdir / 'summary.json').read_text()
  _no_loading(monkeypatch)
  summary = train.run(_config(workdir, data_dir, export_hf=True))
  assert 'is complete (4 of 4 steps): nothing to do' in capsys.readouterr().out
  assert (workdir / 'summary.json').read_text() == before and summary == json.loads(before)


def test_resumed_at_the_end_the_summary_keeps_the_logged_metrics(finished_run, tmp_path,
                                                                  data_dir):
  # Killed after the last checkpoint, before the summary: no step runs in the new process.
  workdir = _copy(finished_run[0], tmp_path)
  logged = _strict_json_lines(workdir / 'metrics.jsonl')[-1]
  summary = train.run(_config(workdir, data_dir))
  assert summary['resumed_at_step'] == 4
  assert summary['final_metrics'] == {k: v for k, v in logged.items() if k != 'step'}
  assert summary['final_metrics']['loss'] > 0
  assert summary['mean_step_seconds'] is None and summary['tokens_per_second'] is None


@pytest.mark.parametrize('signum', [
    pytest.param(signal.SIGTERM, id='SIGTERM'),
    # The same path by the other signal: slow (python -m pytest -m slow).
    pytest.param(signal.SIGINT, id='SIGINT', marks=pytest.mark.slow)])
def test_a_signal_saves_the_step_in_flight_and_the_run_resumes(signum, tmp_path, data_dir,
                                                                monkeypatch, capsys):
  workdir = tmp_path / 'run'
  config = _config(workdir, data_dir, **{'checkpoint.every': 4})  # no regular save before 4
  write = metrics_log.MetricsLog.write

  def write_then_signal(self, step, metrics):
    write(self, step, metrics)
    if step == 1:
      os.kill(os.getpid(), signum)  # handled at once: the step-1 checkpoint follows

  handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  monkeypatch.setattr(metrics_log.MetricsLog, 'write', write_then_signal)
  with pytest.raises(train.TrainingInterrupted,
                     match=rf'{signal.Signals(signum).name} at step 1: its checkpoint is saved'):
    train.run(config)
  assert {s: signal.getsignal(s) for s in handlers} == handlers  # put back
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['1']
  monkeypatch.setattr(metrics_log.MetricsLog, 'write', write)
  train.run(config)
  assert 'resumed from the checkpoint at step 1' in capsys.readouterr().out
  assert [line['step'] for line in _strict_json_lines(workdir / 'metrics.jsonl')] == [1, 2, 3, 4]


def test_a_signal_at_the_last_step_stops_before_the_export(tmp_path, data_dir, monkeypatch):
  workdir = tmp_path / 'run'
  config = _config(workdir, data_dir, export_hf=True)
  write = metrics_log.MetricsLog.write

  def write_then_signal(self, step, metrics):
    write(self, step, metrics)
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(metrics_log.MetricsLog, 'write', write_then_signal)
  with pytest.raises(train.TrainingInterrupted, match='SIGTERM at step 4'):
    train.run(config)
  assert not (workdir / 'hf').exists() and not (workdir / 'summary.json').exists()
  monkeypatch.setattr(metrics_log.MetricsLog, 'write', write)
  summary = train.run(config)  # resumes at the end: the export and the summary
  assert summary['resumed_at_step'] == 4 and (workdir / 'hf' / 'model.safetensors').exists()


def test_a_finished_run_asked_for_more_does_it(finished_run, tmp_path, data_dir):
  workdir = tmp_path / 'run'
  shutil.copytree(finished_run[0], workdir)
  assert 'accuracy_after' not in json.loads((workdir / 'summary.json').read_text())
  summary = train.run(_config(workdir, data_dir, export_hf=True, **{'eval.after': True}))
  assert summary['accuracy_after'] is not None and summary['resumed_at_step'] == 4


def test_the_command_line_exits_with_the_signals_status(monkeypatch):
  from qtarget.train import __main__ as cli  # pylint: disable=g-import-not-at-top

  def interrupted(config):
    raise train.TrainingInterrupted(signal.SIGTERM, 3, '/somewhere')

  monkeypatch.setattr(loop, 'run', interrupted)
  monkeypatch.setattr(cli, '_CONFIG', types.SimpleNamespace(value=None))
  with pytest.raises(SystemExit) as exited:
    cli.main([])
  assert exited.value.code == 128 + signal.SIGTERM
