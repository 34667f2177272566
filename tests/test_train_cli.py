"""The trainer end to end: resume after SIGKILL, two processes, bad input (subprocesses)."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from qtarget import train
from qtarget.data import pipeline
from qtarget.data import records

import availability
import xla_flags
import test_train_step

ROOT = pathlib.Path(__file__).resolve().parent.parent
availability.skip_module_without_smollm2()  # the tiny config uses SmolLM2's tokenizer


def _command(workdir, *flags):
  return [sys.executable, '-m', 'qtarget.train', '--config', str(ROOT / 'configs' / 'tiny.py'),
          f'--config.workdir={workdir}', '--config.eval.before=False',
          '--config.eval.after=False', '--config.steps=8', '--config.checkpoint.every=2',
          f'--config.data.data_dir={workdir.parent / "tfds"}', *flags]


def _env(devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_flags.with_devices(devices)
  env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
  return env


def _exported(workdir):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(str(workdir / 'hf' / 'model.safetensors'))


def _metric_lines(workdir):
  path = workdir / 'metrics.jsonl'
  return path.read_text().splitlines() if path.exists() else []


def _run_until(command, env, condition, timeout=300):
  """Starts the trainer and SIGKILLs it once `condition()` holds; returns what happened."""
  process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    if condition():
      process.send_signal(signal.SIGKILL)
      process.wait()
      return 'killed'
    time.sleep(0.005)
  if process.poll() is None:
    process.kill()
  return f'exited {process.returncode}: {process.stderr.read()[-2000:]}'


def test_resume_after_sigkill_reaches_the_same_parameters(tmp_path):
  # Half the tiny config's rows and tokens (its examples are at most 52 tokens long): four
  # processes run 8-step trainings, and a step's cost is the 49k-token vocabulary's logits.
  small = ('--config.data.seq_len=64', '--config.batch_size=2')
  env = _env()  # with the test run's compilation cache (conftest.py)
  reference = tmp_path / 'reference'
  subprocess.run(_command(reference, *small), env=env, check=True, capture_output=True)
  expected = _exported(reference)
  logged = json.loads(_metric_lines(reference)[-1])
  assert set(logged) >= {'step', 'loss', 'nll', 'trust', 'residual_mass', 'prior_entropy',
                         'accuracy', 'grad_norm', 'learning_rate', 'tokens_per_second'}
  assert list((reference / 'tensorboard').glob('events.out.tfevents.*'))
  summary = json.loads((reference / 'summary.json').read_text())
  assert summary['steps'] == 8 and summary['exported_to'].endswith('hf')

  interrupted = tmp_path / 'interrupted'
  checkpoints_dir = interrupted / 'checkpoints'
  # First kill: while a checkpoint is being written (its temporary directory exists).
  saving = lambda: checkpoints_dir.exists() and any(
      'tmp' in p.name for p in checkpoints_dir.iterdir())
  first = _run_until(_command(interrupted, *small), env, saving)
  assert first == 'killed', first
  # Second kill: between checkpoints, after a later step was logged.
  steps_logged = lambda: len(_metric_lines(interrupted)) >= 5
  second = _run_until(_command(interrupted, *small), env, steps_logged)
  assert second == 'killed', second
  finished = subprocess.run(_command(interrupted, *small), env=env, capture_output=True,
                            text=True)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert 'resumed from the checkpoint at step' in finished.stdout
  # Without a progress bar (the tiny config's), each logged step prints a line.
  assert re.search(r'^\[qtarget\] step 8/8: loss \d+\.\d{4}, nll \d+\.\d{4}, accuracy '
                   r'\d\.\d{3}, \d+ tokens/s$', finished.stdout, re.M), finished.stdout
  got = _exported(interrupted)
  assert set(got) == set(expected)
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
  # The metrics log has each step once, in order.
  steps = [json.loads(line)['step'] for line in _metric_lines(interrupted)]
  assert steps == list(range(1, 9))


def test_the_printed_result_gives_both_accuracies_with_their_intervals():
  from qtarget import config_files  # pylint: disable=g-import-not-at-top
  from qtarget.train import loop  # pylint: disable=g-import-not-at-top
  config = config_files.load_module(ROOT / 'configs' / 'tiny.py').get_config()
  summary = {'accuracy_before': 0.105, 'accuracy_after': 0.66, 'wall_seconds': 512.4,
             'eval_before': {'problems': 256, 'k': 1}, 'eval_after': {'problems': 256, 'k': 1}}
  assert loop.accuracy_lines(summary, config) == [
      'held-out accuracy (256 test problems of chain_sum, greedy, 95% Wilson intervals): '
      'before 0.105 [0.073, 0.149] -> after 0.660 [0.600, 0.715]; wall time 512 s',
      'Target-SFT against SFT, DFT and distillation over seeds and tasks: '
      'experiments/grid2/RESULTS.md']
  config.eval.split = 'validation'
  summary['eval_after']['k'] = 4
  assert loop.accuracy_lines(summary, config)[0].startswith(
      'held-out accuracy (256 validation problems of chain_sum, Average@4, ')
  assert loop.accuracy_lines({**summary, 'accuracy_before': None}, config) == []


def test_the_evaluated_split_is_checked_before_anything_loads():
  from qtarget.train import loop  # pylint: disable=g-import-not-at-top
  config = test_train_step.tiny_config()
  assert loop.checked_eval_split(config) == 'test'
  config.eval.split = 'validation'
  assert loop.checked_eval_split(config) == 'validation'
  config.eval.validation_problems = 3
  with pytest.raises(train.ConfigError, match='already read that split'):
    loop.checked_eval_split(config)
  config.eval.validation_problems = 0
  config.data.kind = 'files'
  with pytest.raises(train.ConfigError, match="'files' has a test split only"):
    loop.checked_eval_split(config)
  config.eval.split = 'train'
  with pytest.raises(train.ConfigError, match=r"eval.split='train': must be one of"):
    loop.checked_eval_split(config)


@pytest.mark.slow  # a CLI process; the split's problems are tested in test_data
def test_evaluations_on_the_validation_split(tmp_path):
  """eval.split=validation: before and after read validation problems, none of them a test
  problem, and the printed result names the split."""
  workdir = tmp_path / 'on_validation'
  flags = ['--config.steps=1', '--config.eval.before=True', '--config.eval.after=True',
           '--config.eval.num_problems=3', '--config.eval.split=validation',
           '--config.export_hf=False']
  run = subprocess.run(_command(workdir, *flags), env=_env(), check=True, capture_output=True,
                       text=True)
  assert re.search(r'^\[qtarget\] held-out accuracy \(3 validation problems of chain_sum, greedy, '
                   r'95% Wilson intervals\): before \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] -> after '
                   r'\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]; wall time \d+ s\n'
                   r'\[qtarget\] Target-SFT against SFT, DFT and distillation over seeds and '
                   r'tasks: experiments/grid2/RESULTS.md$', run.stdout, re.M), run.stdout[-2000:]
  from qtarget import config_files  # pylint: disable=g-import-not-at-top
  config = config_files.load_module(ROOT / 'configs' / 'tiny.py').get_config()
  config.data.data_dir = str(tmp_path / 'tfds')
  test = {r['prompt'] for r in train.held_out_records(config)}
  config.eval.split = 'validation'
  validation = [r['prompt'] for r in train.held_out_records(config)][:3]
  for name in ('before', 'after'):
    asked = [json.loads(line)['question'] for line in
             (workdir / f'predictions_{name}.jsonl').read_text().splitlines()]
    assert asked == validation and not set(asked) & test


def test_the_cpu_is_chosen_where_it_is_the_only_backend():
  """No TPU attached and no GPU plugin: jax never starts libtpu (installed by the tpu extra),
  whose initialization errors would come first in the output; a platform the user sets, even
  an empty one (jax's own choice), is left alone."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('jax_plugins') or importlib.metadata.entry_points(
      group='jax_plugins'):
    pytest.skip('a jax plugin (a GPU) is installed: jax chooses')
  probe = ('from qtarget.train import __main__ as cli; cli.choose_cpu_without_accelerators(); '
           'import jax; jax.numpy.zeros(1).block_until_ready(); '
           'print(jax.config.jax_platforms, [d.platform for d in jax.devices()])')
  env = {k: v for k, v in _env().items() if k != 'JAX_PLATFORMS'}
  chosen = subprocess.run([sys.executable, '-c', probe], env=env, capture_output=True,
                          text=True, check=True)
  if chosen.stdout.startswith('tpu'):
    pytest.skip('a TPU is attached: jax chose it on import')
  assert chosen.stdout.strip() == "cpu ['cpu']", chosen.stdout
  assert 'TPU' not in chosen.stderr, chosen.stderr
  for users in ('cpu', ''):
    kept = subprocess.run([sys.executable, '-c', probe], env={**env, 'JAX_PLATFORMS': users},
                          capture_output=True, text=True, check=True)
    assert kept.stdout.split(' [')[0] == users, (users, kept.stdout)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow  # two processes: sharded equality is tested in one process by test_train_step
def test_two_processes_agree_with_one(tmp_path):
  single = tmp_path / 'single'
  subprocess.run(_command(single, '--config.steps=3'), env=_env(devices=4), check=True,
                 capture_output=True)
  port = _free_port()
  multi = tmp_path / 'multi'
  processes = [subprocess.Popen(
      _command(multi, '--config.steps=3', '--config.distributed.enabled=True',
               f'--config.distributed.coordinator_address=127.0.0.1:{port}',
               '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}',
               '--config.distributed.cpu_collectives=gloo'),
      env=_env(devices=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in outputs[0][0]
  expected, got = _exported(single), _exported(multi)
  # Same losses and gradient norms at every step (measured: 2e-7 and 1.4e-5 relative).
  for name, rtol in (('loss', 1e-5), ('grad_norm', 1e-4)):
    single_values = [json.loads(l)[name] for l in _metric_lines(single)]
    multi_values = [json.loads(l)[name] for l in _metric_lines(multi)]
    assert len(single_values) == 3
    np.testing.assert_allclose(multi_values, single_values, rtol=rtol, err_msg=name)
  # Reductions run in another order across processes, and the tiny random model's gradients
  # are ~1e-7 per entry, where Adam's g / sqrt(v) turns rounding into visible differences on a
  # few entries (measured: mean 1e-7, at most 1e-5, against steps of ~1e-3). Wrong data or a
  # lost gradient would move nearly every entry by about a step.
  for name in expected:
    assert np.abs(got[name] - expected[name]).mean() < 1e-6, name
    close = np.isclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert close.mean() > 0.95, (name, close.mean())


# Bad input stops before training, with the problem and the record named.

def _files_config(tmp_path, train_rows, **overrides):
  path = tmp_path / 'train.jsonl'
  path.write_text(''.join(json.dumps(row) + '\n' for row in train_rows))
  config = test_train_step.tiny_config(**{
      'workdir': str(tmp_path / 'run'), 'data.kind': 'files', 'data.train_path': str(path),
      'data.data_dir': str(tmp_path / 'tfds'), 'model.architecture.vocab_size': 49152,
      **overrides})
  return config


def _assert_stopped_before_training(config, error, message):
  with pytest.raises(error, match=message):
    train.run(config)
  assert not (pathlib.Path(config.workdir) / 'checkpoints').exists()


def test_empty_data_file(tmp_path):
  _assert_stopped_before_training(_files_config(tmp_path, []), records.RecordError,
                                  'train.jsonl is empty')


@pytest.mark.slow  # a CLI process for one error message (records.py raises it, tested directly)
def test_record_without_response(tmp_path):
  rows = [{'prompt': 'What is 2+2?', 'response': '4'}, {'prompt': 'What is 3+3?'}]
  _assert_stopped_before_training(_files_config(tmp_path, rows), records.RecordError,
                                  r'train.jsonl:2: record without a response')


@pytest.mark.slow  # a CLI process for one error message
def test_sequence_too_long_without_truncation(tmp_path):
  rows = [{'prompt': 'What is 2+2?', 'response': '4'},
          {'prompt': 'Count: ' + ' '.join(['one'] * 300), 'response': 'many'}]
  _assert_stopped_before_training(_files_config(tmp_path, rows), pipeline.DataError,
                                  r'train record \d+ .*exceeds the maximum 128 and truncation '
                                  r'is off')


def test_token_ids_out_of_range_name_the_record():
  class _Tokenizer:
    def encode_example(self, prompt, response, system=None):
      del prompt, response, system
      return type('E', (), {'token_ids': np.array([1, 2, 500], np.int32),
                            'loss_mask': np.array([False, True, True])})()
  with pytest.raises(pipeline.DataError, match=r'record 0 .*token id 500 is out of range for '
                                               r'the model vocabulary 100'):
    pipeline.scan([{'prompt': 'p', 'response': 'r', 'metadata': '{}'}], _Tokenizer(),
                  max_length=16, truncate=False, vocab_size=100)


def test_prior_with_a_different_tokenizer(tmp_path):
  import tokenizers  # pylint: disable=g-import-not-at-top
  other = tmp_path / 'other_tokenizer'
  other.mkdir()
  vocab = {f'w{i}': i for i in range(1000)}
  tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='w0')).save(
      str(other / 'tokenizer.json'))
  rows = [{'prompt': 'What is 2+2?', 'response': '4'}]
  arch = dict(test_train_step.tiny_config().model.architecture)
  config = _files_config(tmp_path, rows, **{
      'prior.source': 'random', 'prior.tokenizer_path': str(other),
      'prior.architecture': {**arch, 'vocab_size': 1000}})
  _assert_stopped_before_training(config, train.ConfigError,
                                  r"prior's tokenizer \(1000 tokens\) differs from the "
                                  r"student's \(49152 tokens\)")


@pytest.mark.slow  # a CLI process for one error message
def test_prior_too_small_for_the_tokenizer(tmp_path):
  rows = [{'prompt': 'What is 2+2?', 'response': '4'}]
  arch = dict(test_train_step.tiny_config().model.architecture)
  config = _files_config(tmp_path, rows, **{'prior.source': 'random',
                                            'prior.architecture': {**arch, 'vocab_size': 40000}})
  _assert_stopped_before_training(config, ValueError, 'tokenizer has 49152 tokens but the model '
                                                      'embeds only 40000')


def test_unknown_method(tmp_path):
  config = _files_config(tmp_path, [{'prompt': 'a', 'response': 'b'}], method='sfft')
  _assert_stopped_before_training(config, train.ConfigError, "unknown method 'sfft'")


@pytest.mark.slow  # the SIGKILL resume test above covers interruption; this adds interval evaluation
def test_evaluation_at_intervals_and_after_an_interruption(tmp_path):
  workdir = tmp_path / 'interval'
  flags = ['--config.steps=5', '--config.eval.every=2', '--config.eval.after=True',
           '--config.eval.num_problems=2', '--config.export_hf=False']
  subprocess.run(_command(workdir, *flags), env=_env(), check=True, capture_output=True)
  evaluated = sorted(p.name for p in workdir.glob('predictions_*.jsonl'))
  assert evaluated == ['predictions_after.jsonl', 'predictions_step2.jsonl',
                       'predictions_step4.jsonl']
  lines = [json.loads(line) for line in _metric_lines(workdir)]
  assert [l['step'] for l in lines if 'eval_accuracy' in l] == [2, 4]
  step2 = [json.loads(line) for line in (workdir / 'predictions_step2.jsonl').read_text()
           .splitlines()]
  assert {p['step'] for p in step2} == {2} and len(step2) == 2
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['eval_after']['step'] == 5 and summary['eval_after']['problems'] == 2
  # Killed during the step-4 evaluation (its checkpoint written, its predictions not): the
  # resumed run evaluates step 4 before going on, and logs it once.
  (workdir / 'predictions_step4.jsonl').unlink()
  for path in (workdir / 'checkpoints').iterdir():
    if path.name == '5':
      import shutil  # pylint: disable=g-import-not-at-top
      shutil.rmtree(path)
  kept = [l for l in _metric_lines(workdir) if json.loads(l)['step'] <= 3]
  (workdir / 'metrics.jsonl').write_text(''.join(l + '\n' for l in kept))
  subprocess.run(_command(workdir, *flags), env=_env(), check=True, capture_output=True)
  assert (workdir / 'predictions_step4.jsonl').exists()
  lines = [json.loads(line) for line in _metric_lines(workdir)]
  assert [l['step'] for l in lines if 'eval_accuracy' in l] == [2, 4]


@pytest.mark.slow  # two evaluations after a CLI run; the split itself is tested in test_data
def test_greedy_evaluation_after_training_and_on_the_validation_split(tmp_path):
  """eval.greedy_after adds a greedy pass beside the sampled one; eval.validation_problems adds
  a greedy pass on validation problems, none of which is a test problem."""
  workdir = tmp_path / 'greedy'
  flags = ['--config.steps=2', '--config.eval.after=True', '--config.eval.num_problems=2',
           '--config.eval.num_samples=2', '--config.eval.temperature=0.7',
           '--config.eval.greedy_after=True', '--config.eval.validation_problems=3',
           '--config.export_hf=False']
  subprocess.run(_command(workdir, *flags), env=_env(), check=True, capture_output=True)
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['eval_after']['k'] == 2 and summary['eval_after_greedy']['k'] == 1
  assert summary['eval_validation']['k'] == 1 and summary['eval_validation']['problems'] == 3
  read = lambda name: [json.loads(line) for line in
                       (workdir / f'predictions_{name}.jsonl').read_text().splitlines()]
  assert len(read('after')) == 4 and len(read('after_greedy')) == 2  # 2 samples vs 1 answer
  assert {p['question'] for p in read('after_greedy')} == {p['question'] for p in read('after')}
  from qtarget import config_files  # pylint: disable=g-import-not-at-top
  config = config_files.load_module(ROOT / 'configs' / 'tiny.py').get_config()
  config.data.data_dir = str(tmp_path / 'tfds')
  test = {r['prompt'] for r in train.held_out_records(config)}
  validation = [p['question'] for p in read('validation')]
  assert len(validation) == 3 and not set(validation) & test
