"""A target design written outside the package: one Method, used by name everywhere."""

import json
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtarget import compile_check
from qtarget import config_files
from qtarget import fused
from qtarget import losses
from qtarget import targets

import availability
import test_train_cli
import test_train_step

# In no paper: trust sqrt(p_y), residual proportional to sqrt(p * prior).
DESIGN_SOURCE = '''
import jax.numpy as jnp
from qtarget import targets

SQRT_TRUST_GEOMETRIC = targets.Method(
    'sqrt_trust_geometric',
    trust=lambda label_log_prob: jnp.exp(0.5 * label_log_prob),
    residual_powers=lambda: (0.5, 0.5),
    needs_prior=True)
'''
_namespace = {}
exec(DESIGN_SOURCE, _namespace)  # pylint: disable=exec-used
DESIGN = _namespace['SQRT_TRUST_GEOMETRIC']


@pytest.fixture(autouse=True)
def _private_registry(monkeypatch):
  """Each test registers into a copy of the registry: nothing leaks into other tests."""
  monkeypatch.setattr(targets, 'METHODS', dict(targets.METHODS))
  monkeypatch.setattr(targets, 'CONSTRUCTORS', dict(targets.CONSTRUCTORS))


def _softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_the_design_target_against_float64_numpy():
  targets.register(DESIGN)
  keys = jax.random.split(jax.random.key(0), 3)
  logits = jax.random.normal(keys[0], (3, 5, 11)) * 2
  prior_logits = jax.random.normal(keys[1], (3, 5, 11)) * 2
  labels = jax.random.randint(keys[2], (3, 5), 0, 11)
  target = targets.get('sqrt_trust_geometric')(logits, labels, prior_logits=prior_logits)
  p, prior = _softmax64(logits), _softmax64(prior_logits)
  p_y = np.take_along_axis(p, np.asarray(labels)[..., None], -1)[..., 0]
  residual = np.sqrt(p * prior)
  residual /= residual.sum(-1, keepdims=True)
  trust = np.sqrt(p_y)[..., None]
  q = trust * np.eye(11)[np.asarray(labels)] + (1 - trust) * residual
  np.testing.assert_allclose(targets.dense(target, labels), q, rtol=1e-5, atol=1e-6)
  # The loss's logit gradient is p - Q (jax.grad of the Q-loss).
  grad = jax.grad(lambda z: jnp.sum(losses.q_cross_entropy(z, labels, target)))(logits)
  np.testing.assert_allclose(grad, p - q, atol=1e-5)
  # The fused loss reads the same entry (the Method object itself works too).
  hidden = jax.random.normal(keys[0], (6, 8))
  head = jax.random.normal(keys[1], (8, 11))
  prior_hidden = jax.random.normal(keys[2], (6, 8))
  labels6 = jnp.arange(6) % 11
  fused_loss, _ = fused.q_cross_entropy_fused(hidden, head, labels6, DESIGN,
                                              prior_hidden_NxP=prior_hidden, prior_head_PxV=head)
  logits6, prior6 = hidden @ head, prior_hidden @ head
  dense_target = targets.get(DESIGN.name)(logits6, labels6, prior_logits=prior6)
  dense_loss = jnp.sum(losses.q_cross_entropy(logits6, labels6, dense_target))
  np.testing.assert_allclose(fused_loss, dense_loss, rtol=1e-5)


def test_registration_rules():
  assert targets.register(DESIGN) is DESIGN
  assert targets.register(DESIGN) is DESIGN  # the same object again: a no-op
  again = {}
  exec(DESIGN_SOURCE, again)  # pylint: disable=exec-used
  assert targets.register(again['SQRT_TRUST_GEOMETRIC'])  # the same definition run again
  other = targets.Method('sqrt_trust_geometric', trust=jnp.exp, residual_powers=lambda: (1, 0))
  with pytest.raises(ValueError, match="already registered"):
    targets.register(other)
  with pytest.raises(ValueError, match="already registered"):
    targets.register(targets.Method('weighted', trust=jnp.exp, residual_powers=lambda: (1, 0)))
  with pytest.raises(ValueError, match='must be an identifier'):
    targets.register(targets.Method('my design', trust=jnp.exp, residual_powers=lambda: (1, 0)))
  with pytest.raises(TypeError, match='takes a qtarget.targets.Method'):
    targets.register('sft')


def test_compile_check_takes_the_design_object():
  config = test_train_step.tiny_config(**{'mesh.fsdp': 8, 'hparams': {}})
  with config.ignore_type():
    config.method = DESIGN  # a Method object in the config: registered, then named
  report = compile_check.check(config, cpu_devices=8)
  assert config.method == 'sqrt_trust_geometric'
  assert report.flops > 0 and report.total > 0


@availability.needs_smollm2('the tiny config uses SmolLM2 tokenizer')
@pytest.mark.slow  # two CLI runs; fused = dense for designs is tested at the loss level
def test_the_design_trains_through_the_cli_dense_equal_to_fused(tmp_path):
  config_file = tmp_path / 'design_config.py'
  tiny = pathlib.Path(test_train_cli.ROOT) / 'configs' / 'tiny.py'
  config_file.write_text(DESIGN_SOURCE + f'''
from qtarget import config_files


def get_config():
  config = config_files.load_module({str(tiny)!r}).get_config()
  config.method = targets.register(SQRT_TRUST_GEOMETRIC).name
  config.hparams = {{}}
  return config
''')
  cli = test_train_cli  # pylint: disable=protected-access  (its private functions)
  runs = {}
  for loss in ('dense', 'fused'):
    workdir = tmp_path / loss
    command = cli._command(workdir, '--config.steps=2', f'--config.loss={loss}')
    command[command.index('--config') + 1] = str(config_file)
    result = subprocess.run(command, env=cli._env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / 'summary.json').read_text())
    assert summary['method'] == 'sqrt_trust_geometric'
    lines = [json.loads(line) for line in cli._metric_lines(workdir)]
    runs[loss] = ([line for line in lines if 'loss' in line], cli._exported(workdir))
  (dense_lines, dense_params), (fused_lines, fused_params) = runs['dense'], runs['fused']
  assert len(dense_lines) == len(fused_lines) == 2
  for dense_line, fused_line in zip(dense_lines, fused_lines):
    for name in ('loss', 'nll', 'trust', 'prior_entropy', 'grad_norm'):
      np.testing.assert_allclose(fused_line[name], dense_line[name], rtol=1e-5, err_msg=name)
    # The trust is the design's: sqrt(p_y) lies between p_y (DFT's) and 1 (SFT's).
    assert np.exp(-dense_line['nll']) < dense_line['trust'] < 1
  for name in dense_params:
    np.testing.assert_allclose(fused_params[name], dense_params[name], atol=1e-6, err_msg=name)


def test_the_cli_takes_a_config_whose_method_is_the_design_object(tmp_path, monkeypatch, capsys):
  """The CLI's check of --config.KEY overrides reads the config as JSON before training: a
  Method object there is resolved to its name first (it raised a TypeError before)."""
  from qtarget.train import __main__ as cli  # pylint: disable=g-import-not-at-top
  config_file = tmp_path / 'design_object_config.py'
  tiny = pathlib.Path(test_train_cli.ROOT) / 'configs' / 'tiny.py'
  config_file.write_text(DESIGN_SOURCE + f'''
from qtarget import config_files


def get_config():
  config = config_files.load_module({str(tiny)!r}).get_config()
  with config.ignore_type():
    config.method = SQRT_TRUST_GEOMETRIC
  config.hparams = {{}}
  return config
''')
  argv = [f'--config={config_file}', '--config.steps=2']
  assert cli.prepare_argv(argv) == argv  # no exit
  with pytest.raises(SystemExit, match="unknown config key 'stepz' .*did you mean steps"):
    cli.prepare_argv([f'--config={config_file}', '--config.stepz=2'])
  # compile_check's summary line sees the design's prior.
  config = config_files.load_module(config_file).get_config()
  assert compile_check.model_configs(config)[1] is not None
