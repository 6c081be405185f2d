"""The Adam arithmetic that StableAdamW and SPAM share.

Both optimizers own their moments, because their defence reads the second
moment. Their Adam step is ``optax.scale_by_adam``'s, operation for operation
(moments with ``optax.tree.update_moment``, bias correction with
``optax.tree.bias_correction``), and their decoupled weight decay is
``optax.add_decayed_weights``', so with the defence inactive the updates are
bitwise those of ``optax.adamw`` with the same ``b1``, ``b2``, ``eps``,
weight decay and mask (SPAM's defaults for ``eps`` and the weight decay are
not ``optax.adamw``'s).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_guard import _validation as val

ScalarOrSchedule = ArrayLike | Callable[[ArrayLike], ArrayLike]


def adam_direction(mu, nu, b1, b2, eps, eps_root, count):
  """``m_hat / (sqrt(v_hat + eps_root) + eps)`` exactly as ``optax.scale_by_adam``."""
  mu_hat = optax.tree.bias_correction(mu, b1, count)
  nu_hat = optax.tree.bias_correction(nu, b2, count)
  return jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat), nu_hat


def decay(owner, updates, params, count, weight_decay, mask):
  """``optax.add_decayed_weights`` (same mask semantics and arithmetic); a mask that
  does not fit ``params`` raises naming ``owner`` and ``mask``."""
  if weight_decay is None:
    return updates
  s = weight_decay(count) if callable(weight_decay) else weight_decay
  mask = None if mask is None else val.expand_mask(owner, mask, params)
  tx = optax.add_decayed_weights(s, mask)
  return tx.update(updates, tx.init(params), params)[0]
