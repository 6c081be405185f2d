"""Adaptive clipping: AGC (per unit, by weight norm), AutoClip and ZClip.

* :func:`adaptive_grad_clip` bounds each unit's gradient by a fraction of the
  matching unit's weight norm (stateless, needs ``params``).
* :func:`autoclip` clips the global norm at a percentile of the recent finite
  global norms (a ring buffer of ``history_size`` float32 norms).
* :func:`zclip` clips the global norm when its z-score against an exponential
  moving mean/variance of past (clipped) norms is too large.

All three scale by multiplying with one factor ``min(1, c / max(norm, tiny))``
computed in float32 (see ``_numerics``), so an update at or under the bound is
returned bitwise unchanged. Non-finite values are never hidden: a NaN norm
gives NaN updates and an infinite norm gives factor 0, and the stateful ones
never record a non-finite norm in their statistics. Use
:func:`optax_guard.skip_nonfinite` to skip such steps instead.
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

# ---------------------------------------------------------------------------
# AGC
# ---------------------------------------------------------------------------


def adaptive_grad_clip(
    clipping: ArrayLike = 0.01,
    *,
    eps: ArrayLike = 1e-3,
    axis: val.UnitAxis = None,
    stacked: val.Stacked = None,
) -> optax.GradientTransformation:
  r"""Adaptive gradient clipping (AGC): per unit, by the unit's weight norm.

  .. math::
    g_u \leftarrow g_u \cdot \min\!\left(1,
      \frac{\lambda \max(\lVert W_u\rVert, \epsilon)}
           {\max(\lVert g_u\rVert, \epsilon_{tiny})}\right)

  where a unit ``u`` is a slice of a leaf reduced over ``axis`` (as in
  :func:`optax_guard.clip_by_axis_norm`): ``axis=None`` reduces over every
  axis but the last for leaves with ``ndim >= 2`` (one unit per output
  feature of a Flax ``Dense`` ``(in, out)`` or HWIO conv kernel) and over the
  whole leaf for scalars and vectors. Norms accumulate in float32; ``eps``
  keeps zero-initialised weights (biases) trainable.

  Difference from ``optax.adaptive_grad_clip``: the two agree on scalars,
  vectors, 2-D and 4-D (HWIO) and 5-D kernels. For 3-D leaves optax reduces
  over axis 0 only (it assumes multi-head ``(in, heads, out)`` kernels) while
  this one reduces over ``(0, 1)``; optax also treats any leaf that squeezes
  to a vector (e.g. a ``(1, n)`` kernel) as one unit, and rejects ``ndim > 5``.
  Pass ``axis`` explicitly to get optax's units. Here a norm at or under the
  limit leaves the gradient bitwise unchanged and norms never overflow in
  low precision.

  Off switch: ``clipping=inf`` never clips: the updates come back bitwise
  unchanged (``-0.0`` and ``+-inf`` included, whatever the weights). A unit
  with a NaN gradient norm still becomes NaN.

  Args:
    clipping: the ratio ``lambda > 0`` of gradient norm to weight norm allowed
      per unit (Brock et al. use 0.01 to 0.16, smaller for larger batches);
      ``inf`` switches clipping off.
    eps: the smallest weight norm used for the limit, ``>= 0`` and finite.
      With 0 (accepted, as by optax, with the same math) a unit whose
      weights are all zero gets a zero limit, so its gradient becomes 0 and
      it never moves: keep ``eps > 0`` when some units start at zero.
    axis: int, tuple of ints, or None (see above); applies to every leaf.
      Under ``optax.inject_hyperparams`` an int ``axis`` would become an
      array, which raises a ``TypeError``: pass ``static_args=("axis",)`` or
      a tuple such as ``axis=(0,)`` (tuples and None stay static).
    stacked: leading layer axes of each leaf (None, an int, a prefix tree of
      ints or a callable ``(path, leaf) -> int``); see :ref:`design-stacked`.
      ``axis`` then refers to the axes of one layer's slice.

  Returns:
    An ``optax.GradientTransformation`` with ``optax.EmptyState``; its update
    raises ``ValueError`` when ``params`` is None.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.adaptive_grad_clip(0.1, eps=1.0)
    >>> w = jnp.array([[3.0, 0.0], [4.0, 0.0]])  # (in=2, out=2), norms 5 and 0
    >>> g = jnp.array([[1.0, 0.0], [0.0, 1.0]])  # unit norms 1 and 1
    >>> tx.update(g, tx.init(w), w)[0]  # limits 0.1 * 5 and 0.1 * eps
    Array([[0.5, 0. ],
           [0. , 0.1]], dtype=float32)

  References:
    Brock, De, Smith, Simonyan, 2021, *High-Performance Large-Scale Image
    Recognition Without Normalization*, https://arxiv.org/abs/2102.06171
  """
  owner = "adaptive_grad_clip"
  val.positive(owner, "clipping", clipping)
  val.non_negative(owner, "eps", eps, finite=True)
  axis = val.unit_axis(owner, axis)
  stacked = val.stacked(owner, stacked)

  def update_fn(updates, state, params=None):
    val.params_and_updates(owner, updates, params)

    def leaf(path, lead, g, p):
      g_norm = num.unit_norm_at(owner, path, g, axis, lead=lead)
      p_norm = num.unit_norm_at(owner, path, p, axis, lead=lead)
      c = jnp.asarray(clipping, p_norm.dtype)
      # clipping = inf is off: an infinite limit even for a zero (or NaN) weight norm
      limit = jnp.where(jnp.isposinf(c), c, c * jnp.maximum(p_norm, jnp.asarray(eps, c.dtype)))
      return num.scale_leaf(g, num.safe_factor(limit, g_norm))

    return num.map_tensors(owner, stacked, leaf, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


# ---------------------------------------------------------------------------
# AutoClip
# ---------------------------------------------------------------------------


@_stats.declare("autoclip", ("count", "norm", "threshold"))
class AutoClipState(NamedTuple):
  """State of :func:`autoclip`.

  Attributes:
    count: int32, the number of finite global norms recorded so far
      (saturating).
    history: float32 ``[history_size]`` buffer of the last finite global
      norms, oldest first: the newest is the last entry and the last
      ``min(count, history_size)`` entries hold data (unused ones are 0). It
      keeps rotating after ``count`` saturates.
    norm: float32, the global norm of this step's incoming updates.
    threshold: float32, the bound applied this step: the percentile of the
      history including this norm (``norm`` itself before any finite norm has
      been recorded, i.e. no clipping).
  """

  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  history: jax.Array
  norm: jax.Array
  threshold: jax.Array


def _percentile_of_valid(values: jax.Array, n_valid: jax.Array, q: ArrayLike) -> jax.Array:
  """``numpy.percentile(values[-n_valid:], q)`` (linear) with traced n and q.

  Unused slots are set to ``+inf`` so they sort last; the interpolation only
  reads ranks ``<= n_valid - 1``. Returns NaN-free garbage when ``n_valid``
  is 0 (the caller selects another value then).
  """
  size = values.shape[0]
  valid = jnp.arange(size) >= size - n_valid
  ranked = jnp.sort(jnp.where(valid, values, jnp.inf))
  last = jnp.maximum(n_valid - 1, 0)
  # q * 0.01, not q / 100: a product is correctly rounded on every backend
  # (a float32 division is not on XLA:GPU), and 100 * 0.01 rounds to exactly 1
  pos = last.astype(jnp.float32) * (jnp.asarray(q, jnp.float32) * jnp.float32(0.01))
  pos = jnp.clip(pos, 0.0, last.astype(jnp.float32))
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, last)
  frac = pos - lo.astype(jnp.float32)
  a, b = ranked[lo], ranked[hi]
  return a + (b - a) * frac


def autoclip(
    percentile: ArrayLike = 10.0, *, history_size: int = 1000, axis_name: val.AxisName = None
) -> optax.GradientTransformation:
  r"""AutoClip: clip the global norm at a percentile of its recent history.

  .. math::
    H_t = \{\text{last } N \text{ finite } \lVert G_s\rVert,\ s \le t\}, \quad
    c_t = \mathrm{percentile}_p(H_t), \quad
    G_t \leftarrow G_t \cdot \min\!\left(1,
      \frac{c_t}{\max(\lVert G_t\rVert, \epsilon_{tiny})}\right)

  The history includes the current norm (as in the paper, which appends the
  norm before taking the percentile), and the percentile interpolates linearly
  between order statistics exactly like ``numpy.percentile``. The paper keeps
  every norm since the start; here the last ``history_size`` are kept in a
  float32 ring buffer (``history_size >= number of steps`` reproduces it).

  Non-finite norms are not recorded and are not hidden either: the
  threshold comes from the recorded history alone, a NaN norm gives NaN
  updates and an infinite norm gives factor 0. Before any finite norm has been
  recorded the threshold is the current norm (no clipping).

  Float noise never decides: a finite norm within a relative ``1e-3`` of the
  threshold is left bitwise unchanged. When the recent norms are equal up to
  rounding (a clip ahead of AutoClip makes them so), whether the current one
  lies an ulp above or below the percentile depends on the backend's
  rounding; with the tolerance every backend leaves it alone.

  ``history_size`` fixes the state's shape, so it is static: ``update`` reads
  it back from ``state.history.shape``. Under ``optax.inject_hyperparams``
  the integer becomes an array hyperparameter: ``init`` reads its concrete
  value when called eagerly, and later changes of
  ``state.hyperparams["history_size"]`` have no effect. To call ``init`` under
  ``jit`` or ``jax.eval_shape`` (where it would be a tracer, and ``init``
  raises ``ValueError``), pass ``static_args=("history_size",)``:
  ``optax.inject_hyperparams(og.autoclip, static_args=("history_size",))``.
  ``percentile`` may be traced or a schedule.

  Off switch: ``percentile=100`` (accepted by the reference code) never
  clips a finite norm: the threshold is then the largest recorded norm,
  the current one included, so the updates come back bitwise unchanged.
  A non-finite norm is handled as at any percentile.

  Args:
    percentile: ``p`` in ``[0, 100]``; the paper recommends 10.
    history_size: ``N >= 1``, the number of recent finite norms kept.
    axis_name: the mapped axis to ``psum`` the squared norms over when the
      devices hold different shards of the updates, so that every device uses
      the same norm and threshold; see :ref:`design-collectives`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`AutoClipState`.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.autoclip(50.0, history_size=4)
    >>> state = tx.init(jnp.zeros(1))
    >>> for n in (1.0, 3.0, 2.0, 10.0):
    ...   g, state = tx.update(jnp.array([n]), state)
    >>> g, state.threshold  # median of [1, 3, 2, 10]
    (Array([2.5], dtype=float32), Array(2.5, dtype=float32))

  References:
    Seetharaman, Wichern, Pardo, Le Roux, 2020, *AutoClip: Adaptive Gradient
    Clipping for Source Separation Networks*, https://arxiv.org/abs/2007.14469
  """
  owner = "autoclip"
  val.in_range(owner, "percentile", percentile, 0.0, 100.0)
  val.integer(owner, "history_size", history_size, minimum=1)
  axis_name = val.axis_name(owner, axis_name)

  def init_fn(params):
    del params
    size = val.concrete_size(owner, "history_size", history_size)
    val.integer(owner, "history_size", size, minimum=1)  # an array at construction
    return AutoClipState(
        count=jnp.zeros((), jnp.int32),
        history=jnp.zeros((size,), jnp.float32),
        norm=jnp.zeros((), jnp.float32),
        threshold=jnp.zeros((), jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params
    val.float_leaves(owner, updates)
    size = state.history.shape[0]
    norm = num.global_norm(updates, None, axis_name, extra_args.get(num.SHARED_NORM))
    x = norm.astype(jnp.float32)
    finite = jnp.isfinite(x)
    history, count = num.ring_record(state.history, state.count, x, finite)
    n_valid = jnp.minimum(count, size)
    threshold = jnp.where(
        n_valid > 0, _percentile_of_valid(history, n_valid, percentile), x
    )
    # a norm within float noise of the threshold is not clipped (see
    # _numerics.NOISE_RTOL): the outcome never depends on the backend's rounding
    tolerated = threshold + num.NOISE_RTOL * threshold
    factor = num.safe_factor(threshold, norm, zero_infinite=True)
    within = (norm <= tolerated.astype(norm.dtype)) & jnp.isfinite(norm)
    factor = jnp.where(within, jnp.ones((), factor.dtype), factor)
    updates = num.scale_tree(updates, factor)
    return updates, AutoClipState(count, history, x, threshold)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# ZClip
# ---------------------------------------------------------------------------


@_stats.declare("zclip", ("count", "mean", "std", "threshold", "norm"))
class ZClipState(NamedTuple):
  """State of :func:`zclip`.

  Attributes:
    count: int32, the number of finite global norms seen (saturating); the
      warm-up lasts while ``count < warmup_steps``.
    mean: float32, the running mean of the norms: the plain mean of the warm-up
      norms, then the EMA of the clipped norms.
    std: float32, the square root of the running population variance,
      likewise (the variance itself is ``std**2``).
    threshold: float32, the bound applied this step (``inf`` when neither the
      z-score test nor ``max_norm`` bounds the norm).
    norm: float32, the global norm of this step's incoming updates.
  """

  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  mean: jax.Array
  std: jax.Array
  threshold: jax.Array
  norm: jax.Array


def zclip(
    *,
    alpha: ArrayLike = 0.97,
    z_threshold: ArrayLike = 2.5,
    warmup_steps: int = 25,
    max_norm: ArrayLike | None = None,
    eps: ArrayLike = 1e-6,
    axis_name: val.AxisName = None,
) -> optax.GradientTransformation:
  r"""ZClip: clip the global norm when its z-score against an EMA is too high.

  With :math:`n_t = \lVert G_t\rVert` and the statistics :math:`\mu, \sigma`
  from before step ``t``, after the warm-up:

  .. math::
    z_t = \frac{n_t - \mu}{\sigma + \epsilon}, \qquad
    c_t = \begin{cases} \mu + \dfrac{z_{thr}^2\, \sigma}{z_t} & z_t > z_{thr}
          \\ \infty & \text{otherwise} \end{cases}, \qquad
    c_t \leftarrow \min(c_t, \text{max\_norm}),

  the updates are scaled by :math:`\min(1, c_t / n_t)` and, with
  :math:`x_t = \min(n_t, c_t)` the clipped norm,

  .. math::
    \mu \leftarrow \alpha \mu + (1 - \alpha) x_t, \qquad
    \sigma^2 \leftarrow \alpha \sigma^2 + (1 - \alpha)(x_t - \mu_{new})^2 .

  During the warm-up (the first ``warmup_steps`` *finite* norms) the updates
  are only clipped at ``max_norm`` (if given) and ``mean``/``var`` are the
  running mean and population variance of the raw norms (Welford, float32);
  the first step after the warm-up uses exactly these statistics. This is the
  "zscore" mode with the "adaptive_scaling" (reciprocal) clip option of the
  reference implementation, ``clip_factor=1``.

  Non-finite norms leave the statistics and ``count`` untouched and are not
  hidden: a NaN norm gives NaN updates, an infinite norm factor 0.

  Difference from the reference implementation: there ``max_grad_norm``
  defaults to 1.0 and the EMA is fed the z-score clip value ignoring
  ``max_grad_norm``; here ``max_norm=None`` by default and the EMA is fed the
  norm actually applied, ``min(n_t, c_t)`` with ``max_norm`` included. Without
  ``max_norm`` the two agree. The reference also records NaN/inf norms.

  Under ``optax.inject_hyperparams`` every numeric argument may be traced or a
  schedule (``warmup_steps`` is compared as an array); ``max_norm=None`` stays
  static. ``inject_hyperparams`` casts float hyperparameters to the params'
  dtype (``alpha=0.97`` becomes 0.96875 with bfloat16 params): pass
  ``hyperparam_dtype=jnp.float32`` to keep them exact.

  Float noise never decides: the deviation in the z-score is floored at a
  relative ``1e-3`` of the mean, :math:`\sigma \leftarrow \max(\sigma,
  10^{-3}\mu)` (an addition to the published rule). When the recorded norms
  are equal up to rounding (a clip ahead of ZClip makes them so) the EMA
  deviation shrinks towards 0, and a norm one ulp above the mean would
  otherwise get a huge z-score and be clipped, differently on each backend.

  Args:
    alpha: EMA decay in ``[0, 1]``.
    z_threshold: ``z_thr > 0``; norms with a larger z-score are clipped.
    warmup_steps: number of finite norms (``>= 1``) used to initialise the
      statistics before z-score clipping starts.
    max_norm: optional fixed bound ``> 0`` applied at every step; ``inf``
      is the same as None (no fixed bound).
    eps: ``>= 0`` added to ``sigma`` in the z-score.
    axis_name: the mapped axis to ``psum`` the squared norms over when the
      devices hold different shards of the updates, so that every device
      keeps the same statistics; see :ref:`design-collectives`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`ZClipState`.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.zclip(warmup_steps=2)
    >>> state = tx.init(jnp.zeros(1))
    >>> for n in (1.0, 3.0):  # warm-up: mean 2, std 1
    ...   _, state = tx.update(jnp.array([n]), state)
    >>> g, state = tx.update(jnp.array([12.0]), state)  # z = 10
    >>> g, state.threshold  # 2 + 2.5**2 * 1 / 10
    (Array([2.625], dtype=float32), Array(2.625, dtype=float32))

  References:
    Kumar, Owen, Chowdhury, Güra, 2025, *ZClip: Adaptive Spike Mitigation for
    LLM Pre-Training*, https://arxiv.org/abs/2504.02507 (reference code:
    https://github.com/bluorion-com/ZClip)
  """
  owner = "zclip"
  val.in_range(owner, "alpha", alpha, 0.0, 1.0)
  val.positive(owner, "z_threshold", z_threshold, finite=True)
  val.integer(owner, "warmup_steps", warmup_steps, minimum=1)
  if max_norm is not None:
    val.positive(owner, "max_norm", max_norm)
  val.non_negative(owner, "eps", eps, finite=True)
  axis_name = val.axis_name(owner, axis_name)

  def init_fn(params):
    del params
    zero = lambda: jnp.zeros((), jnp.float32)  # one buffer per field (donatable)
    return ZClipState(
        count=jnp.zeros((), jnp.int32), mean=zero(), std=zero(), threshold=zero(), norm=zero(),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params
    val.float_leaves(owner, updates)
    f32 = jnp.float32
    norm = num.global_norm(updates, None, axis_name, extra_args.get(num.SHARED_NORM))
    x = norm.astype(f32)
    finite = jnp.isfinite(x)
    a = jnp.asarray(alpha, f32)
    zt = jnp.asarray(z_threshold, f32)
    warm = state.count < jnp.asarray(warmup_steps, jnp.int32)
    mu, sigma = state.mean, state.std
    var = sigma * sigma

    # the deviation is floored at float noise (NOISE_RTOL of the mean), so
    # norms equal up to rounding never make a z-score above the threshold
    spread = num.noise_floor(sigma, mu)
    denom = spread + jnp.asarray(eps, f32)
    z = (x - mu) / denom
    # decided by a product (correctly rounded everywhere), not by the quotient z
    spike = jnp.logical_and(jnp.logical_not(warm), x - mu > zt * denom)
    threshold = jnp.where(spike, mu + zt * zt * spread / z, jnp.inf)
    if max_norm is not None:
      threshold = jnp.minimum(threshold, jnp.asarray(max_norm, f32))
    updates = num.scale_tree(updates, num.safe_factor(threshold, norm, zero_infinite=True))

    # Warm-up: running mean and population variance of the raw norms.
    k = state.count.astype(f32)
    delta = x - mu
    mu_w = mu + delta / (k + 1.0)
    var_w = (k * var + delta * (x - mu_w)) / (k + 1.0)
    # After: EMA of the clipped norm.
    clipped = jnp.minimum(x, threshold)
    mu_e = a * mu + (1.0 - a) * clipped
    var_e = a * var + (1.0 - a) * (clipped - mu_e) ** 2

    new_mu = jnp.where(finite, jnp.where(warm, mu_w, mu_e), mu)
    new_var = jnp.where(finite, jnp.where(warm, var_w, var_e), var)
    count = jnp.where(finite, optax.safe_increment(state.count), state.count)
    return updates, ZClipState(
        count=count, mean=new_mu, std=jnp.sqrt(new_var),
        threshold=threshold.astype(f32), norm=x,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
