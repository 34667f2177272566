"""The trainer's command line before anything runs: hparams flags for any method's own names,
a missing config, unknown keys (parsed by ml_collections' own config_flags)."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from qtarget.train import __main__ as cli

TINY = str(pathlib.Path(__file__).resolve().parent.parent / 'configs' / 'tiny.py')


def _parsed_hparams(argv):
  """The config's hparams after ``prepare_argv`` and config_flags' locked parse."""
  argv = ['train'] + cli.prepare_argv(argv)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True,
                                  sys_argv=argv)  # it reads the overrides from sys.argv
  values(argv)
  return values.config.method, dict(values.config.hparams)


@pytest.mark.parametrize('flags_given, method, hparams', [
    # tiny.py trains target_sft with eta 0.5.
    ([], 'target_sft', {'eta': 0.5}),
    (['--config.hparams.eta=0.8'], 'target_sft', {'eta': 0.8}),
    (['--config.method=dft'], 'dft', {}),  # the config's eta belongs to target_sft
    (['--config.method=label_smoothing', '--config.hparams.lam=0.1'], 'label_smoothing',
     {'lam': 0.1}),
    (['--config.method=eaft', '--config.hparams.k=20'], 'eaft', {'k': 20}),
    (['--config.method=sft_kl', "--config.hparams={'lam': 0.2}"], 'sft_kl', {'lam': 0.2}),
    # A name the method does not take is passed on, for the method check to name.
    (['--config.hparams.lam=0.1'], 'target_sft', {'eta': 0.5, 'lam': 0.1}),
    (['--config.method=label_smoothing', '--config.hparams.lam=bad'], 'label_smoothing',
     {'lam': 'bad'}),  # a string: the method check refuses it by name
])
def test_hparams_flags_set_the_methods_own_names(flags_given, method, hparams):
  assert _parsed_hparams([f'--config={TINY}', *flags_given]) == (method, hparams)


def test_a_missing_config_is_named_with_the_command():
  with pytest.raises(SystemExit, match=r'no config: python -m qtarget.train --config'):
    cli.prepare_argv(['--config.steps=3'])


def test_an_unknown_key_points_to_the_commented_key_list():
  with pytest.raises(SystemExit, match=r"unknown config key 'stpes'.*did you mean steps.*"
                                       r'smollm2_demo.py lists every key'):
    cli.prepare_argv([f'--config={TINY}', '--config.stpes=4'])
