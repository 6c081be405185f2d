"""The spike guard: skip a step whose gradient norm is far above its recent history.

A robust rule (median and median absolute deviation of a window of recent
finite norms, with a floor relative to the window's 80th percentile), so that
float noise, a warm-up trend or a recurring hard batch never counts as a
spike. :func:`skip_on_spike` also skips non-finite steps, as
:func:`~optax_guard.skip_nonfinite` does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_guard import _numerics as num
from optax_guard import _stats
from optax_guard import _validation as val
from optax_guard._guards.combinator import Decision, counters, guard, zero_counters

# 1 / Phi^{-1}(3/4): makes the median absolute deviation of normal data an
# estimate of its standard deviation
_MAD_TO_STD = 1.482602218505602


class SpikeTracker(NamedTuple):
  """Recent history of one statistic watched by :func:`skip_on_spike`.

  :class:`SkipOnSpikeState` holds one for the global gradient norm and one
  for the ``value=`` argument (the loss).

  Attributes:
    history: float32 buffer of shape ``(window,)`` holding the most recent
      finite observations, newest last (the last ``min(count, window)``
      entries hold data).
    count: int32, number of finite observations recorded so far (saturating).
    last: float32, the most recent observation (NaN/inf kept; 0 until the
      first one).
    threshold: float32, the spike threshold ``median + sigma * scale`` of the
      history that ``last`` was compared with (``inf`` while fewer than
      ``min_history`` observations were recorded).
  """

  history: jax.Array
  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  last: jax.Array
  threshold: jax.Array


@_stats.declare(
    "skip_on_spike",
    ("num_skipped", "consecutive_skipped", "last_skipped", "norm", "value"),
    guard=True,
)
class SkipOnSpikeState(NamedTuple):
  """State of :func:`skip_on_spike`.

  Attributes:
    inner_state: the wrapped transformation's state (unchanged on skipped
      steps).
    num_skipped: int32, total number of skipped steps (saturating).
    consecutive_skipped: int32, skipped steps since the last applied one.
    last_skipped: bool scalar, whether the most recent step was skipped.
    norm: :class:`SpikeTracker` of the global norm of the incoming updates.
      It decides the finite spikes.
    value: :class:`SpikeTracker` of the ``value=`` argument (the mean over
      devices with ``axis_name``); unchanged on steps without ``value=``.
      Its threshold is reported for logging; a finite value never skips a
      step by itself.
  """

  inner_state: optax.OptState
  num_skipped: jax.Array
  consecutive_skipped: jax.Array
  last_skipped: jax.Array
  norm: SpikeTracker
  value: SpikeTracker


def _sorted_valid(x, valid):
  """``x`` sorted, with the entries that are not ``valid`` last (as ``inf``)."""
  return jnp.sort(jnp.where(valid, x, jnp.inf))


def _median_of_sorted(s, n):
  """Median of the first ``n >= 1`` entries of a sorted ``s`` (as ``numpy.median``)."""
  return 0.5 * (s[(n - 1) // 2] + s[n // 2])


def _spike_threshold(history, count, sigma, min_history, min_ratio):
  """``max(median + sigma * scale, min_ratio * q80)`` of the recorded history.

  ``scale`` is ``1.4826 * MAD`` (the median absolute deviation from the
  median), or the population standard deviation when the MAD is 0, and never
  below float noise (``NOISE_RTOL`` of the median); ``q80`` is the 80th
  percentile of the history (its order statistic of rank ``floor(0.8 (n -
  1))``, no interpolation). ``inf`` while ``count < min_history``.
  ``history.shape[0]`` is the window. ``min_ratio=None``: no ratio floor.
  """
  f32 = jnp.float32
  n = jnp.maximum(jnp.minimum(count, history.shape[0]), 1)
  valid = num.ring_valid(history, count)
  ranked = _sorted_valid(history, valid)
  center = _median_of_sorted(ranked, n)
  mad = _median_of_sorted(_sorted_valid(jnp.abs(history - center), valid), n)
  denom = n.astype(f32)
  mean = jnp.sum(jnp.where(valid, history, 0.0)) / denom
  dev = jnp.where(valid, history - mean, 0.0)
  std = jnp.sqrt(jnp.sum(dev * dev) / denom)
  scale = num.noise_floor(jnp.where(mad > 0, _MAD_TO_STD * mad, std), center)
  # written so that sigma = inf or min_ratio = inf (off) give inf, never inf * 0
  spread = jnp.where(scale > 0, jnp.asarray(sigma, f32) * scale, f32(0))
  threshold = center + spread
  if min_ratio is not None:
    upper = ranked[(4 * (n - 1)) // 5]
    floor = jnp.where(upper > 0, jnp.asarray(min_ratio, f32) * upper, f32(0))
    threshold = jnp.maximum(threshold, floor)
  return jnp.where(count >= min_history, threshold.astype(f32), f32(jnp.inf))


def _track(tracker, x, sigma, min_history, min_ratio):
  """``(x > threshold, new tracker)``: tests ``x``, then records it if finite."""
  threshold = _spike_threshold(tracker.history, tracker.count, sigma, min_history, min_ratio)
  history, count = num.ring_record(tracker.history, tracker.count, x, jnp.isfinite(x))
  return x > threshold, SpikeTracker(history, count, x, threshold)


def _spike_decision(updates, state, value, *, sigma, min_history, min_ratio, axis_name):
  """The :class:`~optax_guard._guards.combinator.Decision` of :func:`skip_on_spike`.

  ``value`` is the ``value=`` extra or None.
  """
  if value is not None:
    val.scalar("skip_on_spike", "value", value)  # a scalar loss (NaN allowed: it skips)
    value = jnp.asarray(value).astype(jnp.float32)
  if value is not None and axis_name is not None:
    # one collective for the norm partial, the values and the device count (a
    # value replicated along an axis counts once there, and so does its 1)
    partial, value_sum, ndev = num.cross_device(
        (num.local_partial(updates, 2, axis_name), value, jnp.ones_like(value)), 2, axis_name
    )
    value = value_sum / ndev
  else:
    partial = num.global_partial(updates, 2, axis_name)
  # finiteness is read from the sum of squares (see skip_nonfinite)
  finite = jnp.isfinite(partial)
  norm = jnp.where(finite, num.finish_norm(partial), partial).astype(jnp.float32)
  spike, norm_tracker = _track(state.norm, norm, sigma, min_history, min_ratio)
  skip = jnp.logical_not(finite & jnp.isfinite(norm)) | spike
  if value is None:
    value_tracker = state.value
  else:
    # the loss tracker is for logging: no ratio floor (a loss can be negative)
    _, value_tracker = _track(state.value, value, sigma, min_history, None)
    skip = skip | jnp.logical_not(jnp.isfinite(value))
  fields = (*counters(state, skip), norm_tracker, value_tracker)
  return Decision(skip, fields, num.SharedNorm.of(updates, partial, axis_name))


def skip_on_spike(
    inner: optax.GradientTransformation,
    *,
    sigma: ArrayLike = 6.0,
    window: ArrayLike = 128,
    min_history: ArrayLike = 64,
    min_ratio: ArrayLike = 6.0,
    axis_name: val.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Skips the step when the gradient norm spikes, or it or the loss is non-finite.

  With :math:`n_t` the float32-accumulated global norm of the incoming
  updates, :math:`v_t` the loss passed as ``value=`` (if any), and :math:`H`
  the last :math:`\min(c_t, \text{window})` finite norms recorded *before*
  step :math:`t` (:math:`c_t` of them were recorded so far):

  .. math::
    \mathrm{skip}_t = (n_t \notin \mathbb{R}) \lor (v_t \notin \mathbb{R})
      \lor \big(c_t \ge m \land
      n_t > \max(\tilde n + \sigma\, s,\ k\, q_{80})\big),

    \tilde n = \operatorname{median} H,\qquad q_{80} = \text{80th percentile of } H,\qquad
    s = \max\big(1.4826 \operatorname{median} |H - \tilde n|,\ 10^{-3}\, \tilde n\big)

  where :math:`m` is ``min_history``, :math:`k` is ``min_ratio`` and
  :math:`s` is the median absolute deviation scaled to estimate a standard
  deviation (the population standard deviation of :math:`H` instead when the
  MAD is 0, i.e. when more than half of the recorded norms are equal, e.g.
  exact zeros), never below float noise (a relative :math:`10^{-3}` of the
  median). Every finite norm is recorded, skipped or not. A skipped step
  returns zero updates and leaves the inner state untouched
  (``jax.lax.cond``, as :func:`skip_nonfinite`); the inner state includes
  the step count of a learning-rate schedule, so a skipped step also pauses
  the schedule. Norms
  above float32 range count as non-finite. ``value=`` and all other keyword
  extras are passed through to ``inner``.

  The choices behind the rule:

  * **The gradient norm decides; a finite loss never skips by itself.** The
    update is made from the gradient, not from the loss. A loss spike with an
    ordinary gradient norm is a hard batch, or one the model has not learned
    yet, and its step is no larger than any other. Skipping it makes skipping
    self-reinforcing in multi-epoch training: the batch is not learned, so its
    next visit spikes again, and so on for the rest of training. (Rules that
    also skip on a finite loss spike, as in OLMo-core and Levanter, skip the
    same healthy batch on every later visit once faults have hit it twice.)
  * **Median and MAD, not mean and standard deviation.** A recorded spike
    moves neither, so recording skipped norms costs nothing: spikes that come
    close together are all caught (with the mean and standard deviation a few
    recorded ``x1e4`` spikes inflate the deviation enough for the next one to
    pass), and a real level shift still enters the history. A sustained jump
    of the norm (several times the old level) is accepted once it fills the
    top fifth of the recorded window (about ``window / 5`` skipped steps,
    when the ratio floor below reaches it); a gradual drift is followed
    without skips.
  * **A skip is for what clipping cannot repair.** A norm has to be both
    about ``sigma`` standard deviations above the median *and* ``min_ratio``
    times the window's 80th percentile (6x by default) to count as a spike.
    Late in training the recent norms are close together and the MAD is
    narrow, so a batch that is merely harder than the others would be many
    MADs away; once the rest of the data is memorised its norm can reach 12x
    the median. Skipping it keeps it unlearned, so it is skipped again on
    every later visit, further behind each time. Under a learning-rate
    warm-up the norm grows steadily and the window lags behind it. The ratio
    floor lets these through, their update clipped by a clip *inside* the
    guard, and still skips non-finite steps and ``x1e4`` faults. The 80th
    percentile rather than the median: a hard batch sits among the harder
    fifth of the window (a floor of 12x the median would be needed
    otherwise), while up to a fifth of the window may be recorded faults
    before they raise the floor. The default 6 leaves a margin over the
    lowest floor that skipped no healthy step in the false-skip trials of
    the Performance page.
  * **Float noise never decides.** When the recorded norms are equal up to
    rounding (a clip ahead of the guard makes them so), the MAD is 0 or one
    ulp, and a norm one ulp above the median would exceed ``median + sigma *
    MAD``. The deviation is floored at a relative ``1e-3`` of the median, so
    such norms pass on every backend alike.
  * With ``sigma=6`` a skip needs a norm about six standard deviations above
    the median; keep a clipping transformation inside the guard for the
    moderate spikes it lets through. A clip placed *before* the guard hides
    the spikes from it: the guard then only ever skips non-finite steps.
  * The window should be long. With a few dozen norms the median and the MAD
    are noisy, and late in training, when the norms are small and
    heavy-tailed, a short window skips ordinary steps (the false-skip
    trials of the Performance page measure the default of 128 with
    ``min_history=64``). Raise ``sigma`` rather than shorten the window.

  When to pass ``value=``: pass the loss when it can become NaN or ``inf``
  while the gradients stay finite (a float16 loss reduction that overflows, a
  term under ``stop_gradient``), or to log it: ``state.value`` records it with
  the threshold a spike of it would cross, so a logger sees the loss spikes
  the guard applied. ``inner`` receives ``value=`` in any case (for
  ``reduce_on_plateau`` inside the guard).

  ``window`` is read back from the history shape inside ``update``, so under
  ``optax.inject_hyperparams`` it only has to be concrete when ``init`` runs
  (list it in ``static_args`` to ``jax.jit`` the ``init``); ``sigma`` and
  ``min_history`` may be traced or scheduled. Under ``jax.vmap`` with a
  decision that varies along the mapped axis, the ``cond`` becomes a select
  over both branches (same results, the cost of a whole-state select). With
  the guard outermost, ``og.update_and_apply(guard, grads, state, params,
  value=loss)`` applies the update to the parameters inside the ``cond``.

  Args:
    inner: the transformation to guard (usually the whole optimizer).
    sigma: how many (robust) standard deviations above the median count as a
      spike (``> 0``; ``inf`` switches spike skipping off, leaving the
      non-finite test).
    window: number of most recent finite observations kept (int ``>= 1``).
    min_history: observations needed before spikes are tested (int, ``1 <=
      min_history <= window``); before that only non-finite steps are skipped.
    min_ratio: a spike is also above this multiple of the window's 80th
      percentile norm (``>= 1``; ``inf`` switches spike skipping off, a value
      near 1 approaches the plain median/MAD rule). Moderate outliers under
      it are left to a clip inside the guard.
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
    >>> u, int(state.num_skipped), int(state.norm.count)
    (Array([0.], dtype=float32), 1, 4)
    >>> float(state.norm.threshold)  # max(1.0 + 6 * 1.4826 * MAD 0.1, 6 * q80 1.0)
    6.0

  References:
    Loss-spike skipping as in Chowdhery et al., 2022, *PaLM: Scaling Language
    Modeling with Pathways*, https://arxiv.org/abs/2204.02311 (section 5.1),
    and Molybog et al., 2023, *A Theory on Adam Instability in Large-Scale
    Machine Learning*, https://arxiv.org/abs/2304.09871; the median/MAD
    outlier test is Hampel's (Hampel, 1974, *The Influence Curve and Its Role
    in Robust Estimation*, https://doi.org/10.1080/01621459.1974.10482962).
  """
  owner = "skip_on_spike"
  val.positive(owner, "sigma", sigma)
  val.in_range(owner, "min_ratio", min_ratio, 1.0, math.inf,
               why=" (a multiple of the window's 80th-percentile norm)")
  val.integer(owner, "window", window, minimum=1)
  val.integer(owner, "min_history", min_history, minimum=1)
  val.ordered(owner, "min_history", min_history, "window", window)
  axis_name = val.axis_name(owner, axis_name)

  def init_fields(params):
    del params
    size = val.concrete_size(owner, "window", window)

    def tracker() -> SpikeTracker:
      return SpikeTracker(
          jnp.zeros((size,), jnp.float32), jnp.zeros((), jnp.int32),
          jnp.zeros((), jnp.float32), jnp.full((), jnp.inf, jnp.float32),
      )

    return (*zero_counters(), tracker(), tracker())

  def decide(updates, state, extra):
    return _spike_decision(updates, state, extra.get("value"), sigma=sigma,
                           min_history=min_history, min_ratio=min_ratio, axis_name=axis_name)

  return guard(owner, inner, state_type=SkipOnSpikeState, init=init_fields, decide=decide)
