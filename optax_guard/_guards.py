"""Step guards: skip an optimizer step whose gradients are non-finite or spike.

A guard wraps an inner transformation (usually the whole optimizer). Each step
it takes one decision from a few scalars (the float32-accumulated global norm
of the incoming updates, and for :func:`skip_on_spike` the loss passed as
``value=``) and then runs either ``inner.update`` or nothing, through
``jax.lax.cond``:

* a skipped step returns zero updates (``jnp.zeros`` of the inner's output
  shapes and dtypes, so ``optax.apply_updates`` leaves the parameters bitwise
  unchanged) and the inner state *untouched* (Adam's moments and step count do
  not see the bad gradient);
* the state is never selected with ``jnp.where`` (that reads and writes the
  whole optimizer state every step) and nothing is multiplied by 0 (``0 * NaN``
  is NaN).

Counters are int32 and saturate at ``2**31 - 1`` (``optax.safe_increment``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from optax_guard import _numerics as num
from optax_guard import _validation as val


class SkipNonfiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`.

  Attributes:
    inner_state: the wrapped transformation's state (unchanged on skipped
      steps).
    num_skipped: int32, total number of skipped steps (saturating).
    consecutive_skipped: int32, skipped steps since the last applied one
      (0 after an applied step; saturating).
    last_skipped: bool scalar, whether the most recent step was skipped.
  """

  inner_state: optax.OptState
  num_skipped: jax.Array
  consecutive_skipped: jax.Array
  last_skipped: jax.Array


class SkipOnSpikeState(NamedTuple):
  """State of :func:`skip_on_spike`.

  Attributes:
    inner_state: the wrapped transformation's state (unchanged on skipped
      steps).
    num_skipped: int32, total number of skipped steps (saturating).
    consecutive_skipped: int32, skipped steps since the last applied one.
    last_skipped: bool scalar, whether the most recent step was skipped.
    norm_history: float32 ring buffer of shape ``(window,)`` holding the last
      finite global norms (slot ``k % window`` holds the ``k``-th one).
    norm_count: int32, number of finite norms recorded so far (saturating).
    norm: float32, the global norm of the most recent step (NaN/inf kept).
    norm_threshold: float32, the spike threshold ``mean + sigma * std`` the
      most recent norm was compared with (``inf`` while fewer than
      ``min_history`` norms were recorded).
    value_history: float32 ring buffer of the last finite ``value=``
      arguments (the loss), like ``norm_history``.
    value_count: int32, number of finite values recorded so far.
    value: float32, the most recent ``value=`` as tested (the mean over
      devices with ``axis_name``; 0 until one is passed).
    value_threshold: float32, the threshold the most recent value was
      compared with (``inf`` while the value history is too short).
  """

  inner_state: optax.OptState
  num_skipped: jax.Array
  consecutive_skipped: jax.Array
  last_skipped: jax.Array
  norm_history: jax.Array
  norm_count: jax.Array
  norm: jax.Array
  norm_threshold: jax.Array
  value_history: jax.Array
  value_count: jax.Array
  value: jax.Array
  value_threshold: jax.Array


def _check_inner(fn: str, inner: Any) -> optax.GradientTransformationExtraArgs:
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
        f"{fn}(inner=...) must be an optax.GradientTransformation, got {inner!r}"
    )
  return optax.with_extra_args_support(inner)


def _varying(x: Any) -> frozenset:
  """The manual mesh axes ``x`` varies over inside ``shard_map`` (else empty)."""
  manual = getattr(x, "manual_axis_type", None)
  return frozenset(getattr(manual, "varying", ()) or ())


def _like(x: jax.Array, spec: Any) -> jax.Array:
  """``x`` with the dtype and the ``shard_map`` varying axes of ``spec``.

  The values are unchanged: the cast only reconciles weak types, and the
  ``pcast`` only marks a replicated value as device-varying, as the other
  branch of the ``cond`` produces it.
  """
  x = jnp.asarray(x, spec.dtype)
  missing = _varying(spec) - _varying(jax.typeof(x))
  if missing:
    x = jax.lax.pcast(x, tuple(sorted(missing)), to="varying")
  return x


def _apply_or_skip(inner, skip, updates, inner_state, params, extra_args):
  """``lax.cond(not skip, inner.update(...), (zeros, inner_state))``.

  The apply branch is the *true* branch on purpose: with the branches the
  other way round, XLA:CPU (jax 0.10) keeps full-size copies of the inner
  state next to the donated buffers (3x the gradient bytes of temporaries
  for ``chain(clip, adam)`` instead of 1x, and about twice the step time).
  """

  def apply():
    return inner.update(updates, inner_state, params, **extra_args)

  out_updates, out_state = jax.eval_shape(apply)

  def skip_branch():
    zeros = jax.tree_util.tree_map(
        lambda s: _like(jnp.zeros(s.shape, s.dtype), s), out_updates
    )
    return zeros, jax.tree_util.tree_map(_like, inner_state, out_state)

  return jax.lax.cond(jnp.logical_not(skip), apply, skip_branch)


def _counters(state, skip):
  """The new ``(num_skipped, consecutive_skipped, last_skipped)``."""
  num_skipped = jnp.where(skip, optax.safe_increment(state.num_skipped), state.num_skipped)
  consecutive = jnp.where(
      skip, optax.safe_increment(state.consecutive_skipped), jnp.zeros((), jnp.int32)
  )
  return num_skipped, consecutive, jnp.asarray(skip, jnp.bool_)


def _zero_counters():
  zero = jnp.zeros((), jnp.int32)
  return zero, zero, jnp.zeros((), jnp.bool_)


def skip_nonfinite(
    inner: optax.GradientTransformation, *, axis_name: Any = None
) -> optax.GradientTransformationExtraArgs:
  r"""Skips the step (zero updates, inner state untouched) on non-finite grads.

  .. math::
    n = \Big(\sum_i g_i^2\Big)^{1/2} \text{ (float32 accumulation)},\qquad
    (u, s) \leftarrow \begin{cases} (0,\ s) & n \notin \mathbb{R} \\
    \mathrm{inner}(g, s) & \text{otherwise} \end{cases}

  The decision reads only the squared global norm (the float32-accumulated
  sum of squares), one reduction pass with no per-element test: a NaN or
  ``+-inf`` element makes it NaN or ``inf``, and so does a sum of squares
  beyond float32 range (for example gradients scaled by ``1e30``, or any
  element above ``~1.8e19``), which no float32 optimizer state could absorb
  anyway. (For float64 updates the sum accumulates in float64 and only float64
  overflow counts.) The test is on the sum, not on its square root, because
  XLA may rewrite ``sqrt(x * x)`` as ``|x|`` for a one-element tree.

  The branch is taken with ``jax.lax.cond``: a skipped step returns
  ``jnp.zeros`` with the inner's output shapes and dtypes and leaves the inner
  state bitwise untouched; ``inner.update`` does not run. Keyword extras such
  as ``value=`` are passed through to ``inner``.

  Args:
    inner: the transformation to guard (usually the whole optimizer).
    axis_name: inside ``pmap``/``shard_map`` when each device holds a different
      shard of the updates, the mapped axis to ``psum`` the partial sum of
      squares over (one collective), so every device takes the same decision.
      Leave None under plain ``jit`` and for replicated updates.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`SkipNonfiniteState` (``last_skipped`` is a bool scalar).

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.skip_nonfinite(optax.sgd(0.1))
    >>> state = tx.init(jnp.zeros(2))
    >>> u, state = tx.update(jnp.array([1.0, jnp.nan]), state)
    >>> u, int(state.num_skipped), bool(state.last_skipped)
    (Array([0., 0.], dtype=float32), 1, True)
    >>> u, state = tx.update(jnp.array([1.0, 2.0]), state)
    >>> u, int(state.num_skipped), int(state.consecutive_skipped)
    (Array([-0.1, -0.2], dtype=float32), 1, 0)

  References:
    Same rule as the dynamic loss scaling of mixed-precision training
    (Micikevicius et al., 2018, *Mixed Precision Training*,
    https://arxiv.org/abs/1710.03740) and ``optax.apply_if_finite``, without
    its whole-state ``jnp.where``.
  """
  inner = _check_inner("skip_nonfinite", inner)

  def init_fn(params):
    return SkipNonfiniteState(inner.init(params), *_zero_counters())

  def update_fn(updates, state, params=None, **extra_args):
    # decide on the sum of squares, not on its sqrt: XLA may rewrite
    # sqrt(x * x) as |x| for a one-element tree, hiding the overflow
    skip = jnp.logical_not(num.is_finite_scalar(num.global_partial(updates, 2, axis_name)))
    new_updates, inner_state = _apply_or_skip(
        inner, skip, updates, state.inner_state, params, extra_args
    )
    return new_updates, SkipNonfiniteState(inner_state, *_counters(state, skip))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _spike_threshold(history, count, sigma, min_history):
  """``mean + sigma * std`` (population) of the recorded part of ``history``.

  ``inf`` while ``count < min_history``. ``history.shape[0]`` is the window.
  """
  window = history.shape[0]
  n = jnp.minimum(count, window)
  valid = num.ring_valid(history, count)
  denom = jnp.maximum(n, 1).astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid, history, 0.0)) / denom
  dev = jnp.where(valid, history - mean, 0.0)
  std = jnp.sqrt(jnp.sum(dev * dev) / denom)
  threshold = (mean + jnp.asarray(sigma, jnp.float32) * std).astype(jnp.float32)
  return jnp.where(count >= min_history, threshold, jnp.float32(jnp.inf))


def skip_on_spike(
    inner: optax.GradientTransformation,
    *,
    sigma: ArrayLike = 6.0,
    window: ArrayLike = 128,
    min_history: ArrayLike = 64,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Skips the step when the gradient norm (or the loss) spikes or is non-finite.

  With :math:`n_t` the float32-accumulated global norm of the incoming
  updates and :math:`\mu, \sigma_n` the mean and population standard deviation
  of the last ``window`` finite norms recorded *before* step :math:`t`:

  .. math::
    \mathrm{skip}_t = (n_t \notin \mathbb{R}) \lor
      \big(c_t \ge m \land n_t > \mu + \sigma\,\sigma_n\big)

  where :math:`c_t` is the number of finite norms recorded so far and
  :math:`m` is ``min_history``. When the loss is passed as ``value=``, the
  same test runs on it with its own history (a non-finite value skips too),
  and the step is skipped if either test fires. Every finite observation is
  recorded, skipped or not, so a genuine level shift enters the statistics and
  is accepted after a while (with ``sigma=3`` a 10x shift is accepted once
  about 10% of the window holds the new level). The flip side: a recorded
  spike inflates the standard deviation for the next ``window`` steps, so a
  second spike of similar size within one window may pass (keep a clipping
  transformation inside the guard). A skipped step returns zero updates and
  leaves the inner state untouched (``jax.lax.cond``, as
  :func:`skip_nonfinite`). Norms above float32 range count as non-finite.
  ``value=`` and all other keyword extras are passed through to ``inner``.

  ``window`` is read back from the history shape inside ``update``, so under
  ``optax.inject_hyperparams`` it only has to be concrete when ``init`` runs
  (list it in ``static_args`` to ``jax.jit`` the ``init``); ``sigma`` and
  ``min_history`` may be traced or scheduled.

  Args:
    inner: the transformation to guard (usually the whole optimizer).
    sigma: how many standard deviations above the mean count as a spike
      (``> 0``).
    window: number of most recent finite observations kept (int ``>= 1``).
    min_history: observations needed before spikes are tested (int, ``1 <=
      min_history <= window``); before that only non-finite steps are skipped.
    axis_name: inside ``pmap``/``shard_map`` when each device holds a different
      shard of the updates, the mapped axis over which the partial sum of
      squares (and the value, averaged over devices) are ``psum``-ed in one
      collective, so every device takes the same decision. The value tested is
      then the mean of the devices' values; ``inner`` still receives each
      device's own ``value``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`SkipOnSpikeState`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.skip_on_spike(optax.sgd(1.0), window=4, min_history=2)
    >>> state = tx.init(jnp.zeros(1))
    >>> for g in [1.0, 1.1, 0.9, 100.0]:
    ...   u, state = tx.update(jnp.array([g]), state)
    >>> u, int(state.num_skipped), int(state.norm_count)
    (Array([0.], dtype=float32), 1, 4)

  References:
    Loss-spike skipping as in Chowdhery et al., 2022, *PaLM: Scaling Language
    Modeling with Pathways*, https://arxiv.org/abs/2204.02311 (section 5.1),
    and Molybog et al., 2023, *A Theory on Adam Instability in Large-Scale
    Machine Learning*, https://arxiv.org/abs/2304.09871
  """
  fn = "skip_on_spike"
  inner = _check_inner(fn, inner)
  val.positive(fn, "sigma", sigma)
  val.integer(fn, "window", window, minimum=1)
  val.integer(fn, "min_history", min_history, minimum=1)
  val.ordered(fn, "min_history", min_history, "window", window)

  def init_fn(params):
    try:
      size = int(np.asarray(window))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
      raise ValueError(
          f"{fn}(window=...) must be concrete when init runs (it sets the history "
          f"shape), got a tracer; use inject_hyperparams(..., static_args=('window',))"
      ) from None
    history = jnp.zeros((size,), jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    inf = jnp.full((), jnp.inf, jnp.float32)
    count = jnp.zeros((), jnp.int32)
    return SkipOnSpikeState(
        inner.init(params), *_zero_counters(),
        history, count, zero, inf, history, count, zero, inf,
    )

  def update_fn(updates, state, params=None, **extra_args):
    value = extra_args.get("value")
    if value is not None:
      value = jnp.asarray(value).astype(jnp.float32).reshape(())
    if value is not None and axis_name is not None:
      # one collective for the norm partial, the values and the device count
      partial, value_sum, ndev = num.cross_device(
          (num.global_partial(updates, 2), value, jnp.ones((), jnp.float32)), 2, axis_name
      )
      value = value_sum / ndev
    else:
      partial = num.global_partial(updates, 2, axis_name)
    # finiteness is read from the sum of squares (see skip_nonfinite)
    finite = jnp.isfinite(partial)
    norm = jnp.where(finite, num.finish_norm(partial), partial).astype(jnp.float32)
    finite = finite & jnp.isfinite(norm)

    norm_threshold = _spike_threshold(
        state.norm_history, state.norm_count, sigma, min_history
    )
    skip = jnp.logical_not(finite) | (norm > norm_threshold)
    norm_history, norm_count = num.ring_record(state.norm_history, state.norm_count, norm, finite)

    if value is None:
      value_history, value_count = state.value_history, state.value_count
      value, value_threshold = state.value, state.value_threshold
    else:
      value_threshold = _spike_threshold(
          state.value_history, state.value_count, sigma, min_history
      )
      value_ok = jnp.isfinite(value)
      skip = skip | jnp.logical_not(value_ok) | (value > value_threshold)
      value_history, value_count = num.ring_record(
          state.value_history, state.value_count, value, value_ok
      )

    new_updates, inner_state = _apply_or_skip(
        inner, skip, updates, state.inner_state, params, extra_args
    )
    return new_updates, SkipOnSpikeState(
        inner_state, *_counters(state, skip),
        norm_history, norm_count, norm, norm_threshold,
        value_history, value_count, value, value_threshold,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
