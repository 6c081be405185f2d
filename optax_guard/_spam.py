"""SPAM: Adam with spike-aware clipping and periodic moment resets.

:func:`scale_by_spam` and :func:`spam` (Huang et al. 2025) clip each gradient
element whose square exceeds ``threshold`` times the previous second moment,
and periodically reset both moments with a cosine re-warm of the step size.
The Adam step is the one StableAdamW shares (``_adam_pieces``), so outside the
ramps, on steps where no element is clipped, the updates are bitwise those of
``optax.adamw`` given the same ``eps`` and weight decay (the defaults differ).
Whether an element is a spike and whether a step resets are decided by a
comparison and by integer arithmetic on the step, never by the rounding of a
quotient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_guard import _numerics as num
from optax_guard import _stats
from optax_guard import _validation as val
from optax_guard._adam_pieces import ScalarOrSchedule, adam_direction


@_stats.declare("scale_by_spam", ("count", "scale"))
class ScaleBySpamState(NamedTuple):
  """State of :func:`scale_by_spam` (and of :func:`spam`).

  Attributes:
    count: int32, the number of updates so far (saturating). A moment reset
      does not restart it, so Adam's bias correction goes on from it.
    mu: the first moment, a tree like the params.
    nu: the second moment, a tree like the params.
    scale: float32, the re-warm factor applied to this step's update (1
      outside the ramps that follow a moment reset).
  """

  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  mu: optax.Updates
  nu: optax.Updates
  scale: jax.Array



def _rewarm_scale(
    step: ArrayLike, interval: ArrayLike | None, warmup_steps: ArrayLike
) -> jax.Array:
  """SPAM's step-size factor at the 1-based ``step`` (float32).

  ``1 - 0.99 (1 + cos(pi s / (W + 1))) / 2`` for ``s < W`` steps since the
  last moment reset (``s = step mod interval`` once ``step >= interval``),
  else 1: from 0.01 on the reset step back up to 1. Integer arithmetic
  decides the ramp, so its ends are exact at any step.
  """
  step = jnp.asarray(step, jnp.int32)
  w = jnp.asarray(warmup_steps, jnp.int32)
  if interval is None:
    return jnp.ones((), jnp.float32)
  n = jnp.asarray(interval, jnp.int32)
  since = step % jnp.maximum(n, 1)
  ramp = (n > 0) & (step >= n) & (since < w)
  x = jnp.float32(math.pi) * since.astype(jnp.float32) / (w + 1).astype(jnp.float32)
  value = 1.0 - 0.99 * (1.0 + jnp.cos(x)) / 2.0
  return jnp.where(ramp, value, jnp.ones((), jnp.float32)).astype(jnp.float32)


def _switches(
    k: jax.Array, clip_delay: Any, reset_interval: Any, threshold: Any
) -> tuple[jax.Array, jax.Array]:
  """``(clip_on, reset)`` at the 1-based step ``k``, as scalar bools.

  Clipping waits ``clip_delay`` steps at the start of training and after each
  reset; a reset falls on every multiple of ``reset_interval``.
  """
  delay = jnp.asarray(clip_delay, jnp.int32)
  clip_on = k >= delay
  if reset_interval is None:
    reset = jnp.zeros((), bool)
  else:
    n = jnp.asarray(reset_interval, jnp.int32)
    period = k % jnp.maximum(n, 1)
    reset = (n > 0) & (period == 0)
    clip_on = clip_on & ((n <= 0) | (period >= delay))
  if threshold is None:
    clip_on = jnp.zeros((), bool)
  else:
    clip_on = clip_on & (jnp.asarray(threshold) > 0)
  return clip_on, reset


def _clipped_moments(updates, mu_prev, nu_prev, theta, clip_on, b1, b2):
  """Both moments fed the gradient with its spikes clipped to ``sign(g) sqrt(theta v)``."""

  def spiked(g, v):
    """The spike mask and the squared bound ``theta * v``, in float32 (float64)."""
    acc = num.accumulation_dtype(g.dtype)
    gf, vf = g.astype(acc), v.astype(acc)
    bound = theta.astype(acc) * vf
    return clip_on & (vf > 0) & (gf * gf > bound), bound

  def clipped(g, v):
    spike, bound = spiked(g, v)
    return jnp.where(spike, (jnp.sign(g.astype(bound.dtype)) * jnp.sqrt(bound)).astype(g.dtype),
                     g)

  def clipped_sq(g, v):
    # The second moment takes theta * v for a clipped element (the square of the
    # clipped value without the rounding of its square root) and g**2 otherwise, as
    # optax squares it. Written without the square root, the clipped gradient is
    # not a value the two moments share, which XLA would keep as a full-size
    # temporary.
    spike, bound = spiked(g, v)
    return jnp.where(spike, bound.astype(g.dtype), g**2)

  grads = jax.tree.map(clipped, updates, nu_prev)
  mu = optax.tree.update_moment(grads, mu_prev, b1, 1)
  nu = jax.tree.map(lambda g, v: (1 - b2) * clipped_sq(g, v) + b2 * v, updates, nu_prev)
  # the second moment is written in place over the old one, which the first moment's
  # loop reads: ordered after it, XLA keeps no copy of the old one
  nu = jax.tree.map(num.ordered_after, nu, mu)
  return mu, nu


def _check_periods(owner: str, *, threshold: Any, reset_interval: Any, warmup_steps: Any,
                   clip_delay: Any) -> None:
  """Each reset period must leave room for the defence: the re-warm-up ends, and
  clipping (when on) starts, before the next reset (when the values are concrete)."""
  if reset_interval is None or val.is_jax(reset_interval) or reset_interval == 0:
    return  # no resets (or a traced interval: not checked)
  val.ordered(owner, "warmup_steps", warmup_steps, "reset_interval", reset_interval,
              strict=True, why=" (the re-warm-up after each moment reset would never end: "
              "the step size would never return to its full value)")
  off = threshold is None or (not val.is_jax(threshold) and float(threshold) in (0.0, math.inf))
  if not off:
    val.ordered(owner, "clip_delay", clip_delay, "reset_interval", reset_interval,
                strict=True, why=" (clipping waits clip_delay steps after each moment reset, "
                "so it would never act)")


def _spam_scaling(
    owner: str, *, b1: Any, b2: Any, eps: Any, threshold: Any, reset_interval: Any,
    warmup_steps: Any, clip_delay: Any, with_params: bool, mask: Any = None,
) -> optax.GradientTransformation:
  """:func:`scale_by_spam`, with errors naming ``owner`` (and ``params``, and the
  ``mask`` of the weight decay that follows, checked if asked)."""
  val.adam_betas(owner, b1, b2, eps)
  if threshold is not None:
    val.non_negative(owner, "threshold", threshold)
  if reset_interval is not None:
    reset_interval = val.whole(owner, "reset_interval", reset_interval, minimum=0)
  warmup_steps = val.whole(owner, "warmup_steps", warmup_steps, minimum=0)
  clip_delay = val.whole(owner, "clip_delay", clip_delay, minimum=1)
  _check_periods(owner, threshold=threshold, reset_interval=reset_interval,
                 warmup_steps=warmup_steps, clip_delay=clip_delay)

  def init_fn(params):
    if mask is not None:  # checked before optax.add_decayed_weights reads it
      val.expand_mask(owner, mask, params)
    return ScaleBySpamState(
        count=jnp.zeros((), jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
        scale=jnp.ones((), jnp.float32),
    )

  def update_fn(updates, state, params=None):
    val.float_leaves(owner, updates, complex_ok=False)
    if with_params:  # for the weight decay that follows in spam
      val.matching_params(owner, updates, params)
      if mask is not None:
        val.expand_mask(owner, mask, params)
    k = optax.safe_increment(state.count)  # this step, 1-based
    clip_on, reset = _switches(k, clip_delay, reset_interval, threshold)
    zero_if_reset = lambda t: jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), t)
    mu_prev, nu_prev = zero_if_reset(state.mu), zero_if_reset(state.nu)
    theta = jnp.asarray(0.0 if threshold is None else threshold)
    mu, nu = _clipped_moments(updates, mu_prev, nu_prev, theta, clip_on, b1, b2)
    direction, _ = adam_direction(mu, nu, b1, b2, eps, 0.0, k)
    scale = _rewarm_scale(k, reset_interval, warmup_steps)
    direction = jax.tree.map(lambda u: num.scale_leaf(u, scale), direction)
    nu = optax.tree.cast_like(nu, state.nu)
    mu = optax.tree.cast_like(mu, state.mu)
    return direction, ScaleBySpamState(k, mu, nu, scale)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_spam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-6,
    *,
    threshold: ArrayLike | None = 5000.0,
    reset_interval: ArrayLike | None = 500,
    warmup_steps: ArrayLike = 150,
    clip_delay: ArrayLike = 20,
) -> optax.GradientTransformation:
  r"""Adam's scaling with spike-aware clipping and periodic moment resets (SPAM).

  At the 1-based step :math:`k`, with :math:`v_{k-1}` the raw (not
  bias-corrected) second moment of the previous step and :math:`\theta` the
  ``threshold``, every element with

  .. math::
    g^2 > \theta\, v_{k-1} \quad\text{becomes}\quad
    \operatorname{sign}(g)\sqrt{\theta\, v_{k-1}}

  (decided by that comparison), and both moments are fed the clipped
  gradient (the second moment its square, :math:`\theta v_{k-1}`). Every
  ``reset_interval`` steps (:math:`k \bmod N = 0`) both moments are zeroed
  before the step, and the update is multiplied by a
  cosine ramp from 0.01 back to 1 over ``warmup_steps`` steps,
  :math:`s = 1 - 0.99\,(1 + \cos(\pi r / (W + 1)))/2` at the
  :math:`r`-th step after the reset (:math:`r < W`). Clipping is inactive
  for the first ``clip_delay`` steps of training and of every reset period
  (the second moment is still accumulating then). Outside the ramps, on
  steps where no element is clipped, the update is bitwise
  ``optax.scale_by_adam``'s.

  Follows the reference ``SPAM.py`` (Huang et al.): the raw ``v`` in the
  test, the clipped value, what a reset zeroes (both moments, not the step
  count, so bias correction is not restarted), the ramp's formula
  (``CosineDecay(0.99, warmup_steps)``), no ramp at the start of training
  (the learning-rate schedule warms up), ``grad_accu_steps`` as
  ``clip_delay``, and the defaults. Differs: an element whose previous
  second moment is exactly 0 is never clipped (the reference sets it to
  ``sign(g) * 0 = 0``, and since its moment then stays 0 the element can
  never learn, e.g. the embedding row of a token first seen after the
  delay); Adam's ``eps`` is added to ``sqrt(v_hat)`` as in optax (the
  reference adds it to ``sqrt(v)`` before bias correction); ``+-inf``
  elements are clipped like any spike and NaN elements pass unchanged (use
  :func:`optax_guard.skip_nonfinite` to skip such steps); the reference's
  random sparse-momentum masks are not implemented.

  Args:
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1)``.
    eps: ``>= 0``, added to ``sqrt(v_hat)``.
    threshold: :math:`\theta \ge 0`; None, 0 or ``inf`` switch clipping off.
    reset_interval: reset the moments every this many steps; None or 0
      switch resets (and the ramps) off.
    warmup_steps: length ``W >= 0`` of the cosine ramp after each reset,
      less than ``reset_interval`` (else the step size never returns to its
      full value).
    clip_delay: ``>= 1`` steps without clipping at the start of training and
      after each reset (with 0 the empty second moment would clip every
      gradient to 0); less than ``reset_interval`` when clipping is on (else
      it never acts).

  Returns:
    An ``optax.GradientTransformation`` with :class:`ScaleBySpamState`.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.scale_by_spam(b1=0.0, threshold=4.0, clip_delay=1)
    >>> state = tx.init(jnp.zeros(2))
    >>> _, state = tx.update(jnp.array([1.0, 1.0]), state)  # v = 0.001
    >>> _, state = tx.update(jnp.array([0.05, -100.0]), state)
    >>> state.mu  # b1 = 0: the clipped gradient; sqrt(4 * 0.001) = 0.063
    Array([ 0.05  , -0.0632], dtype=float32)

  References:
    Huang, Zhu, Jin, Liu, Wang, Liu, 2025, *SPAM: Spike-Aware Adam with
    Momentum Reset for Stable LLM Training*, ICLR 2025,
    https://arxiv.org/abs/2501.06842 (reference code:
    https://github.com/TianjinYellow/SPAM-Optimizer)
  """
  return _spam_scaling("scale_by_spam", b1=b1, b2=b2, eps=eps, threshold=threshold,
                       reset_interval=reset_interval, warmup_steps=warmup_steps,
                       clip_delay=clip_delay, with_params=False)


def spam(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9, b2: ArrayLike = 0.999, eps: ArrayLike = 1e-6,  # as in scale_by_spam
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    threshold: ArrayLike | None = 5000.0,
    reset_interval: ArrayLike | None = 500,
    warmup_steps: ArrayLike = 150,
    clip_delay: ArrayLike = 20,
) -> optax.GradientTransformation:
  r"""SPAM: Adam with spike-aware clipping and momentum reset, as an optimizer.

  ``optax.chain(scale_by_spam(...), optax.add_decayed_weights(weight_decay,
  mask), optax.scale_by_learning_rate(learning_rate))``, the layout of
  ``optax.adamw``:

  .. math::
    p \leftarrow p - \eta_t\left(s_k\,\frac{\hat m_k}{\sqrt{\hat v_k} + \epsilon}
      + \lambda p\right)

  with the moments of the clipped gradient and the re-warm factor
  :math:`s_k` of :func:`scale_by_spam`. The weight decay is not re-warmed
  (as in the reference, which decays with the plain learning rate).

  With ``threshold=None`` and ``reset_interval=None`` (the defences off) it
  is bitwise ``optax.adamw(learning_rate, b1, b2, eps,
  weight_decay=weight_decay, mask=mask)`` with the same arguments, ``eps``
  and ``weight_decay`` included: the defaults differ (here ``eps=1e-6``
  and ``weight_decay=0``, the reference's; ``optax.adamw``'s are ``1e-8``
  and ``1e-4``), so ``og.spam(lr, threshold=None, reset_interval=None)``
  is ``optax.adamw(lr, eps=1e-6, weight_decay=0.0)``.

  Differs from the reference ``SPAM.py`` as listed in :func:`scale_by_spam`,
  and in the decay (optax's ``p - lr (u + wd p)``; the reference decays after
  the step, ``(p - lr u)(1 - lr wd)``).

  Args:
    learning_rate: a number ``>= 0`` or a schedule ``step -> rate``.
    b1, b2, eps: as in :func:`scale_by_spam`.
    weight_decay: ``>= 0`` or a schedule (the reference's default is 0).
    mask: as in ``optax.adamw`` (None, a tree of bools or a callable).
    threshold, reset_interval, warmup_steps, clip_delay: as in
      :func:`scale_by_spam`.

  Returns:
    An ``optax.GradientTransformation``; its update needs ``params`` (as
    ``optax.adamw``'s).

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.spam(1e-3, reset_interval=4, warmup_steps=2, clip_delay=2)
    >>> p = jnp.zeros(1)
    >>> state = tx.init(p)
    >>> for _ in range(5):  # the moments are reset before the 4th step
    ...   u, state = tx.update(jnp.ones(1), state, p)
    ...   print(round(float(og.guard_stats(state)["scale_by_spam/scale"]), 4))
    1.0
    1.0
    1.0
    0.01
    0.2575

  References:
    Huang et al., 2025, https://arxiv.org/abs/2501.06842
  """
  owner = "spam"
  val.rate(owner, "learning_rate", learning_rate)
  val.rate(owner, "weight_decay", weight_decay)
  val.mask(owner, mask)
  return optax.chain(
      _spam_scaling(owner, b1=b1, b2=b2, eps=eps, threshold=threshold,
                    reset_interval=reset_interval, warmup_steps=warmup_steps,
                    clip_delay=clip_delay, with_params=True, mask=mask),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
