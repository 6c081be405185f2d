"""Optimizers that own their moments: StableAdamW and SPAM.

Both are Adam with a defence built into the step, because the defence reads
the optimizer's own second moment:

* :func:`scale_by_stable_adam` / :func:`stable_adamw` (Wortsman et al. 2023)
  lower each tensor's learning rate by ``max(1, RMS)``, where ``RMS`` is the
  root mean square of ``g / sqrt(v_hat)`` (Adafactor's update clipping,
  applied tensor-wise to the rate).
* :func:`scale_by_spam` / :func:`spam` (Huang et al. 2025) clip each gradient
  element whose square exceeds ``threshold`` times the previous second
  moment, and periodically reset both moments with a cosine re-warm of the
  step size.

The Adam arithmetic is ``optax.scale_by_adam``'s, operation for operation
(moments with ``optax.tree.update_moment``, bias correction with
``optax.tree.bias_correction``), so with the defence inactive the updates are
bitwise those of ``optax.adamw``. Every decision (is this tensor's rate cut,
is this element a spike, is this a reset step) is a comparison or integer
arithmetic on the step, never the rounding of a quotient.
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
from optax_guard import _validation as val

ScalarOrSchedule = ArrayLike | Callable[[ArrayLike], ArrayLike]


def _rate(owner: str, name: str, value: Any) -> None:
  """A learning rate or weight decay: a schedule, or a finite number ``>= 0``."""
  if callable(value):
    return
  val.non_negative(owner, name, value, finite=True)


def _dtype(owner: str, mu_dtype: Any) -> Any:
  """None or a floating-point dtype, canonicalised (float64 needs x64)."""
  if mu_dtype is None:
    return None
  try:
    dtype = jnp.dtype(mu_dtype)
  except TypeError:
    raise TypeError(f"{owner}(mu_dtype=...) must be None or a dtype, got {mu_dtype!r}") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{owner}(mu_dtype=...) must be a floating-point dtype, got {mu_dtype!r}")
  return jax.dtypes.canonicalize_dtype(dtype)


def _betas(owner: str, b1: Any, b2: Any, eps: Any) -> None:
  val.in_range(owner, "b1", b1, 0.0, 1.0, hi_open=True)
  val.in_range(owner, "b2", b2, 0.0, 1.0, hi_open=True)
  val.non_negative(owner, "eps", eps, finite=True)


def _adam_direction(mu, nu, b1, b2, eps, eps_root, count):
  """``m_hat / (sqrt(v_hat + eps_root) + eps)`` exactly as ``optax.scale_by_adam``."""
  mu_hat = optax.tree.bias_correction(mu, b1, count)
  nu_hat = optax.tree.bias_correction(nu, b2, count)
  return jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat), nu_hat


def _decay(updates, params, count, weight_decay, mask):
  """``optax.add_decayed_weights`` (same mask semantics and arithmetic)."""
  if weight_decay is None:
    return updates
  s = weight_decay(count) if callable(weight_decay) else weight_decay
  tx = optax.add_decayed_weights(s, mask)
  return tx.update(updates, tx.init(params), params)[0]


# ---------------------------------------------------------------------------
# StableAdamW
# ---------------------------------------------------------------------------


class ScaleByStableAdamState(NamedTuple):
  """State of :func:`scale_by_stable_adam` (and of :func:`stable_adamw`).

  Attributes:
    count: int32, the number of updates so far (saturating), as in
      ``optax.ScaleByAdamState``.
    mu: the first moment, a tree like the params (dtype ``mu_dtype``).
    nu: the second moment, a tree like the params.
    num_cut: int32, how many tensors (layer slices of stacked leaves count
      one each) had their rate cut this step, i.e. ``RMS > 1``.
    max_rms: float32, the largest ``RMS`` of this step (NaN if one is NaN).
  """

  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  mu: optax.Updates
  nu: optax.Updates
  num_cut: jax.Array
  max_rms: jax.Array


def _stable_adam(
    owner: str, b1: Any, b2: Any, eps: Any, eps_root: Any, mu_dtype: Any,
    weight_decay: Any, mask: Any, stacked: val.Stacked, axis_name: val.AxisName,
) -> optax.GradientTransformation:
  """The StableAdam scaling, with the decoupled weight decay when given."""
  _betas(owner, b1, b2, eps)
  val.non_negative(owner, "eps_root", eps_root, finite=True)
  mu_dtype = _dtype(owner, mu_dtype)
  stacked = val.stacked(owner, stacked)
  axis_name = val.axis_name(owner, axis_name)
  if weight_decay is not None:
    _rate(owner, "weight_decay", weight_decay)
    val.mask(owner, mask)

  def init_fn(params):
    return ScaleByStableAdamState(
        count=jnp.zeros((), jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
        num_cut=jnp.zeros((), jnp.int32),
        max_rms=jnp.zeros((), jnp.float32),
    )

  def update_fn(updates, state, params=None):
    val.float_leaves(owner, updates)
    if weight_decay is not None:
      val.matching_params(owner, updates, params)
    leads = num.stacked_counts(owner, updates, stacked)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count_inc = optax.safe_increment(state.count)
    direction, _ = _adam_direction(mu, nu, b1, b2, eps, eps_root, count_inc)
    direction = _decay(direction, params, state.count, weight_decay, mask)

    # RMS_t = sqrt(mean(g^2 / max(v_hat, eps^2))) per tensor (layer slice), one
    # collective for the partial sums and element counts of every tensor. Each
    # tensor's reduction reads g and the new moment (written to the state anyway)
    # behind its own optimization barrier, scalars included: shared with the update or
    # with another tensor's reduction, v_hat or the broadcasts of the scalars would
    # become full-size temporaries; separate, the reduction is one more read of g and
    # nu, and the update fuses as in adamw.
    sums, sizes = [], []
    bc2 = 1 - b2**count_inc
    for g, v, lead in zip(jax.tree.leaves(updates), jax.tree.leaves(nu), leads, strict=True):
      g, v, bc, e = jax.lax.optimization_barrier((g, v, bc2, jnp.asarray(eps, jnp.float32)))
      acc = num.accumulation_dtype(g.dtype)
      a = jnp.abs(g).astype(acc)
      v_hat = jnp.real(v).astype(acc) / bc.astype(acc)
      ratio = a * a / jnp.maximum(v_hat, e.astype(acc) * e.astype(acc))
      sums.append(jnp.sum(ratio, axis=tuple(range(lead, g.ndim)), keepdims=lead > 0))
      sizes.append(jnp.asarray(math.prod(g.shape[lead:]), acc))
    sums, sizes = num.cross_device((sums, sizes), 2, axis_name)
    rms = [jnp.sqrt(s / jnp.maximum(n, 1)) for s, n in zip(sums, sizes, strict=True)]
    # lr_t = lr / max(1, RMS): factor exactly 1 where RMS <= 1 (a comparison)
    factors = [num.safe_factor(1.0, r) for r in rms]
    leaves, treedef = jax.tree.flatten(direction)
    out = jax.tree.unflatten(
        treedef, [num.scale_leaf(u, f) for u, f in zip(leaves, factors, strict=True)]
    )
    num_cut = sum((jnp.sum(r > 1.0, dtype=jnp.int32) for r in rms), jnp.zeros((), jnp.int32))
    max_rms = jnp.zeros((), jnp.float32)
    for r in rms:
      max_rms = jnp.maximum(max_rms, jnp.max(r).astype(jnp.float32))
    mu = optax.tree.cast(mu, mu_dtype)
    nu = optax.tree.cast_like(nu, state.nu)
    return out, ScaleByStableAdamState(count_inc, mu, nu, num_cut, max_rms)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_stable_adam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    *,
    stacked: val.Stacked = None,
    axis_name: val.AxisName = None,
) -> optax.GradientTransformation:
  r"""Adam's scaling with each tensor's step cut by ``max(1, RMS)`` (StableAdam).

  With :math:`\hat m_t, \hat v_t` Adam's bias-corrected moments (``v_hat``
  includes this step's gradient), per tensor :math:`i`:

  .. math::
    \mathrm{RMS}_{i,t} = \sqrt{\operatorname{mean}\!\left(
      \frac{g_{i,t}^2}{\max(\hat v_{i,t}, \epsilon^2)}\right)}, \qquad
    u_{i,t} = \frac{1}{\max(1, \mathrm{RMS}_{i,t})}\,
      \frac{\hat m_{i,t}}{\sqrt{\hat v_{i,t} + \epsilon_{root}} + \epsilon}

  Chain it like ``optax.scale_by_adam``:
  ``optax.chain(og.scale_by_stable_adam(), optax.scale_by_learning_rate(lr))``
  is StableAdam without weight decay; :func:`stable_adamw` adds decoupled
  weight decay at the same reduced rate. A tensor whose ``RMS`` is at or
  under 1 (decided by that comparison) gets exactly Adam's update, bitwise.
  ``RMS`` is large when the gradient is large against its own history: after
  a gradient spike the second moment has not caught up, and the step of that
  tensor shrinks instead of jumping.

  Follows the reference ``StableAdamWUnfused`` (Wortsman et al.) in the
  ``RMS`` formula (``eps**2`` floor, bias-corrected ``v_hat`` including this
  step, ``clip_thresh=1``). Differs: the moments are kept and bias-corrected
  as ``optax.scale_by_adam`` does (the reference folds the correction into
  the decay rates, which rounds differently); the defaults are optax's
  (the reference's are ``betas=(0.9, 0.99)``); the decision is taken on
  device without a host sync (the reference calls ``.item()``); ``RMS`` of
  complex gradients uses ``|g|^2``.

  Args:
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1)``.
    eps: ``>= 0``, added to ``sqrt(v_hat)``; ``eps**2`` floors ``v_hat`` in
      the ``RMS``.
    eps_root: ``>= 0``, added to ``v_hat`` inside the square root (as optax).
    mu_dtype: optional floating dtype of the first moment.
    stacked: leading layer axes (None, an int, a tree prefix of ints, or a
      callable ``(path, leaf) -> int``): each slice ``x[i]`` of a stacked
      (scanned) leaf is a tensor with its own ``RMS``, so a scanned model and
      its unrolled twin get the same updates.
    axis_name: inside ``pmap``/``shard_map`` when each device holds a
      different shard of a tensor, the mapped axis to ``psum`` the per-tensor
      sums over (one collective). The stacked layer axes must not be split
      over the devices.

  Returns:
    An ``optax.GradientTransformation`` with :class:`ScaleByStableAdamState`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.scale_by_stable_adam()
    >>> state = tx.init(jnp.zeros(2))
    >>> for g in (0.1, 0.1, 10.0):  # a x100 spike at step 3
    ...   u, state = tx.update(jnp.full(2, g), state)
    >>> int(state.num_cut), round(float(state.max_rms), 2)
    (1, 1.73)
    >>> u  # Adam's step divided by that RMS
    Array([0.3753, 0.3753], dtype=float32)

  References:
    Wortsman, Dettmers, Zettlemoyer, Morcos, Farhadi, Schmidt, 2023, *Stable
    and low-precision training for large-scale vision-language models*,
    https://arxiv.org/abs/2304.13013; Shazeer, Stern, 2018, *Adafactor*,
    https://arxiv.org/abs/1804.04235
  """
  return _stable_adam("scale_by_stable_adam", b1, b2, eps, eps_root, mu_dtype,
                      None, None, stacked, axis_name)


def stable_adamw(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    stacked: val.Stacked = None,
    axis_name: val.AxisName = None,
) -> optax.GradientTransformation:
  r"""StableAdamW: AdamW whose rate per tensor is ``lr / max(1, RMS)``.

  .. math::
    \eta_{i,t} = \frac{\eta_t}{\max(1, \mathrm{RMS}_{i,t})}, \qquad
    p_i \leftarrow p_i - \eta_{i,t}\left(
      \frac{\hat m_{i,t}}{\sqrt{\hat v_{i,t}} + \epsilon} + \lambda p_i\right)

  with :math:`\mathrm{RMS}_{i,t}` as in :func:`scale_by_stable_adam`: the
  decoupled weight decay uses the same reduced rate
  :math:`\eta_{i,t}`. A drop-in for ``optax.adamw`` (same positional
  arguments, defaults and ``mask``): on every step where each tensor's ``RMS``
  is at or under 1 the updates are bitwise ``optax.adamw``'s. The state is
  ``(ScaleByStableAdamState, the learning-rate state)``;
  :func:`optax_guard.guard_stats` reports ``num_cut`` and ``max_rms``.

  Follows the reference ``StableAdamWUnfused`` (its later version, which
  decays the weights with the reduced rate; the first gist decayed with the
  full one). Differs as listed in :func:`scale_by_stable_adam`, and the decay
  is optax's ``p <- p - lr_t (u + wd p)`` (the reference multiplies ``p`` by
  ``1 - lr_t wd`` before adding the step, the same to first order).

  Args:
    learning_rate: a number ``>= 0`` or a schedule ``step -> rate``.
    b1, b2, eps, eps_root, mu_dtype: as in :func:`scale_by_stable_adam`.
    weight_decay: ``>= 0`` or a schedule; 0 switches it off.
    mask: as in ``optax.adamw``: None, a tree of bools (or a prefix of one),
      or a callable ``params -> tree``, selecting the leaves that decay.
      Under ``optax.inject_hyperparams`` a callable mask needs
      ``static_args=("mask",)`` (optax takes callables for schedules).
    stacked, axis_name: as in :func:`scale_by_stable_adam`.

  Returns:
    An ``optax.GradientTransformation``; its update needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.stable_adamw(1e-3, weight_decay=0.1)
    >>> p = jnp.ones(3)
    >>> u, state = tx.update(jnp.array([0.5, -0.5, 0.1]), tx.init(p), p)
    >>> u  # -lr * (sign of the first step + 0.1 * p)
    Array([-0.0011, 0.0009, -0.0011], dtype=float32)

  References:
    Wortsman et al., 2023, https://arxiv.org/abs/2304.13013; Loshchilov,
    Hutter, 2019, *Decoupled Weight Decay Regularization*,
    https://arxiv.org/abs/1711.05101
  """
  owner = "stable_adamw"
  _rate(owner, "learning_rate", learning_rate)
  _rate(owner, "weight_decay", weight_decay)
  return optax.chain(
      _stable_adam(owner, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask,
                   stacked, axis_name),
      optax.scale_by_learning_rate(learning_rate),
  )


# ---------------------------------------------------------------------------
# SPAM
# ---------------------------------------------------------------------------


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
    warmup_steps: length ``W >= 0`` of the cosine ramp after each reset.
    clip_delay: ``>= 1`` steps without clipping at the start of training and
      after each reset (with 0 the empty second moment would clip every
      gradient to 0).

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
  return _spam_scaling("scale_by_spam", b1, b2, eps, threshold, reset_interval, warmup_steps,
                       clip_delay, with_params=False)


def _spam_scaling(
    owner: str, b1: Any, b2: Any, eps: Any, threshold: Any, reset_interval: Any,
    warmup_steps: Any, clip_delay: Any, *, with_params: bool,
) -> optax.GradientTransformation:
  """:func:`scale_by_spam`, with errors naming ``owner`` (and ``params`` checked if asked)."""
  _betas(owner, b1, b2, eps)
  if threshold is not None:
    val.non_negative(owner, "threshold", threshold)
  if reset_interval is not None:
    val.integer(owner, "reset_interval", reset_interval, minimum=0)
  val.integer(owner, "warmup_steps", warmup_steps, minimum=0)
  val.integer(owner, "clip_delay", clip_delay, minimum=1)

  def init_fn(params):
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
    k = optax.safe_increment(state.count)  # this step, 1-based
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

    zero_if_reset = lambda t: jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), t)
    mu_prev, nu_prev = zero_if_reset(state.mu), zero_if_reset(state.nu)

    theta = jnp.asarray(0.0 if threshold is None else threshold)

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
    direction, _ = _adam_direction(mu, nu, b1, b2, eps, 0.0, k)
    scale = _rewarm_scale(k, reset_interval, warmup_steps)
    direction = jax.tree.map(lambda u: num.scale_leaf(u, scale), direction)
    nu = optax.tree.cast_like(nu, state.nu)
    mu = optax.tree.cast_like(mu, state.mu)
    return direction, ScaleBySpamState(k, mu, nu, scale)

  return optax.GradientTransformation(init_fn, update_fn)


def spam(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-6,
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
  (as in the reference, which decays with the plain learning rate). With
  ``threshold=None`` and ``reset_interval=None`` it is ``optax.adamw``
  bitwise.

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
    >>> tx = og.spam(1e-3, reset_interval=4, warmup_steps=2)
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
  _rate(owner, "learning_rate", learning_rate)
  _rate(owner, "weight_decay", weight_decay)
  val.mask(owner, mask)
  return optax.chain(
      _spam_scaling(owner, b1, b2, eps, threshold, reset_interval, warmup_steps, clip_delay,
                    with_params=True),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
