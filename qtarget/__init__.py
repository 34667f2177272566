"""qtarget: supervised fine-tuning losses as target distributions (the Q-target view).

The loss library needs only jax and numpy: the one-call losses :func:`q_loss` (logits) and
:func:`q_loss_fused` (hidden states and head, no tokens x vocabulary array), :func:`token_mean`,
and the modules behind them (`targets`, `losses`, `fused`, `cached_prior`, `native`).
"""

from qtarget import cached_prior
from qtarget import fused
from qtarget import losses
from qtarget import native
from qtarget import targets
from qtarget.cached_prior import CachedPrior
from qtarget.loss_calls import FusedPrior
from qtarget.loss_calls import q_loss
from qtarget.loss_calls import q_loss_fused
from qtarget.loss_calls import token_mean
from qtarget.loss_calls import TokenMetrics
from qtarget.method import Method

__version__ = '0.1.0'
