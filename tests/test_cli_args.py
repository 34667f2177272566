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
    # The user's dict, with a named flag on top of it (a new name, so folded into it).
    (['--config.method=sft_kl', "--config.hparams={'lam': 0.2}", '--config.hparams.eta=1'],
     'sft_kl', {'lam': 0.2, 'eta': 1}),
    # A new name beside the config's eta: eta keeps the config's type (1 -> 1.0).
    (['--config.hparams.eta=1', '--config.hparams.lam=0.1'], 'target_sft',
     {'eta': 1.0, 'lam': 0.1}),
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


def test_forms_it_does_not_read_are_left_to_config_flags():
  for argv in ([f'--config={TINY}', '--config.method', 'dft'],
               [f'--config={TINY}', '-config.hparams.eta=0.8'],
               [f'--config={TINY}', '--config.hparams.eta', '0.8']):
    assert cli.prepare_argv(argv) == argv


def test_the_folded_flag_takes_the_first_ones_place_before_a_double_dash():
  argv = [f'--config={TINY}', '--config.method=label_smoothing', '--config.hparams.lam=0.1',
          '--config.steps=3', '--', 'positional']
  assert cli.prepare_argv(argv) == [
      f'--config={TINY}', '--config.method=label_smoothing', "--config.hparams={'lam': 0.1}",
      '--config.steps=3', '--', 'positional']


def test_single_dash_config_and_flagfiles_are_not_refused():
  assert cli.prepare_argv([f'-config={TINY}', '--config.steps=3'])[0] == f'-config={TINY}'
  assert cli.prepare_argv(['--flagfile=args.txt']) == ['--flagfile=args.txt']
