"""``python -m qtarget.train --config configs/NAME.py [--config.key=value ...]``."""

from absl import app
from ml_collections import config_flags

from qtarget.train import loop

_CONFIG = config_flags.DEFINE_config_file('config', None, 'a configs/*.py file',
                                          lock_config=True)


def main(argv) -> None:
  del argv
  loop.run(_CONFIG.value)


if __name__ == '__main__':
  app.run(main)
