"""qtarget: supervised fine-tuning losses as target distributions (the Q-target view).

The loss library (`targets`, `losses`, `native`) needs only jax and numpy.
"""

from qtarget import losses
from qtarget import native
from qtarget import targets

__version__ = '0.1.0'
