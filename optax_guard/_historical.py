"""Clipping a norm at ``mean + sigma * std`` of a window of its own history.

:func:`clip_by_historical_norm` is the update-norm clip of large-scale
training (Levanter's ``clip_update_by_historical_norm``, used for Marin 32B
with ``sigma=2`` and a window of 128): placed *after* Adam's scaling and
before the learning rate, it bounds the norm of the optimizer's update
rather than of the gradient, so it also catches an update that is large
because the second moment has decayed, not because the gradient spiked.
Placed first in a chain it clips the gradient norm the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_guard import _numerics as num
from optax_guard import _stats
from optax_guard import _validation as val


@_stats.declare("clip_by_historical_norm", ("count", "norm", "threshold"))
class ClipByHistoricalNormState(NamedTuple):
  """State of :func:`clip_by_historical_norm`.

  Attributes:
    count: int32, the number of finite norms recorded so far (saturating).
    history: float32 ``[window]`` buffer of the last finite norms, oldest
      first (the newest is the last entry; the last ``min(count, window)``
      entries hold data). Unclipped norms, so that clipping never drags the
      threshold down.
    norm: float32, the global norm of this step's incoming updates.
    threshold: float32, the bound applied this step: ``mean + sigma * std``
      of the history before this step (``inf`` until ``min_history`` norms
      are recorded).
  """

  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  history: jax.Array
  norm: jax.Array
  threshold: jax.Array


def clip_by_historical_norm(
    sigma: ArrayLike = 3.0, *, window: int = 128, min_history: int | None = None,
    axis_name: val.AxisName = None,
) -> optax.GradientTransformation:
  r"""Clip the global norm at the mean plus ``sigma`` standard deviations of its history.

  With :math:`\mu, s` the mean and population standard deviation of the
  last ``window`` finite norms (not including this step's):

  .. math::
    c_t = \mu + \sigma \max(s,\ 10^{-3}\mu), \qquad
    u \leftarrow u \cdot \min\!\left(1, \frac{c_t}{\lVert u\rVert}\right)

  once ``min_history`` norms are recorded (no clipping before). Every finite
  norm is recorded unclipped. For update-norm clipping put it between
  Adam's scaling (and the weight decay) and the learning rate::

    optax.chain(optax.scale_by_adam(b1, b2), optax.add_decayed_weights(wd),
                og.clip_by_historical_norm(2.0, window=128),
                optax.scale_by_learning_rate(schedule))

  :func:`optax_guard.zclip` and :func:`optax_guard.autoclip` work in the same
  place with their own rules (an EMA z-score with a reciprocal clip; a
  percentile of the history including the current norm).

  Follows Levanter's ``clip_update_by_historical_norm``: the window of
  unclipped norms excluding the current one, ``mean + sigma * std`` with
  the population ``std``, no clipping until ``max(2, window // 2)`` norms
  are in the window, the defaults (``sigma=3``, ``window=128``). Differs:
  non-finite norms are not recorded (Levanter records them, and one NaN then
  makes the threshold NaN, which switches clipping off until it leaves the
  window) and are not hidden (a NaN norm gives NaN updates, an infinite one
  factor 0); the floor of ``std`` is relative, ``1e-3`` of the mean
  (Levanter's is ``1e-6``, absolute), so that norms equal up to float noise
  never clip (on every backend alike); a norm at or under the threshold
  leaves the updates bitwise unchanged (a comparison decides).

  Args:
    sigma: ``> 0``; the number of standard deviations allowed above the
      mean (Marin 32B used 2; ``inf`` switches clipping off).
    window: ``>= 2``, the number of recent finite norms kept. Static: its
      value fixes the state's shape (under ``optax.inject_hyperparams`` pass
      ``static_args=("window",)`` to call ``init`` under ``jit``).
    min_history: ``1 <= min_history <= window`` norms needed before the
      first clip; None for ``max(2, window // 2)``.
    axis_name: the mapped axis to ``psum`` the squared norms over when the
      devices hold different shards of the updates, so that every device
      clips alike; see :ref:`design-collectives`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state,
    :class:`ClipByHistoricalNormState`, holds the window of norms.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.clip_by_historical_norm(2.0, window=4)
    >>> state = tx.init(jnp.zeros(1))
    >>> for n in (1.0, 3.0, 1.0, 3.0):  # mean 2, std 1
    ...   _, state = tx.update(jnp.array([n]), state)
    >>> u, state = tx.update(jnp.array([10.0]), state)
    >>> u, state.threshold  # 2 + 2 * 1
    (Array([4.], dtype=float32), Array(4., dtype=float32))

  References:
    Levanter, ``levanter.optim.clip_update_norm``,
    https://github.com/stanford-crfm/levanter; Marin 32B,
    https://github.com/marin-community/marin
  """
  owner = "clip_by_historical_norm"
  val.positive(owner, "sigma", sigma)
  val.history_window(owner, window, min_history, smallest=2)
  axis_name = val.axis_name(owner, axis_name)

  def init_fn(params):
    del params
    size = val.concrete_size(owner, "window", window)
    zero = lambda: jnp.zeros((), jnp.float32)  # one buffer per field (donatable)
    return ClipByHistoricalNormState(
        count=jnp.zeros((), jnp.int32), history=jnp.zeros((size,), jnp.float32),
        norm=zero(), threshold=zero(),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params
    val.float_leaves(owner, updates)
    f32 = jnp.float32
    size = state.history.shape[0]
    norm = num.global_norm(updates, None, axis_name, extra_args.get(num.SHARED_NORM))
    x = norm.astype(f32)

    valid = num.ring_valid(state.history, state.count)
    n = jnp.minimum(state.count, size).astype(f32)
    mean = jnp.sum(jnp.where(valid, state.history, 0.0)) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.where(valid, (state.history - mean) ** 2, 0.0)) / jnp.maximum(n, 1.0)
    spread = num.noise_floor(jnp.sqrt(var), mean)
    needed = size // 2 if min_history is None else min_history
    needed = jnp.maximum(jnp.asarray(needed, jnp.int32), 1 if min_history is not None else 2)
    ready = jnp.minimum(state.count, size) >= needed
    threshold = jnp.where(ready, mean + jnp.asarray(sigma, f32) * spread, jnp.inf)
    updates = num.scale_tree(updates, num.safe_factor(threshold, norm, zero_infinite=True))

    history, count = num.ring_record(state.history, state.count, x, jnp.isfinite(x))
    return updates, ClipByHistoricalNormState(count, history, x, threshold.astype(f32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
