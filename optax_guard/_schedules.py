"""Learning-rate decay rules as ``optax.Schedule`` functions.

Every factory returns a pure function ``step -> float32 scalar`` (or the
shape of a vector of steps) for ``optax.scale_by_schedule``, the
``learning_rate`` of any optax optimizer, ``optax.join_schedules`` or
``optax.inject_hyperparams`` (so a clipping threshold can follow a schedule).

Steps. A step may be a Python int, a NumPy integer or float, or a JAX array of
any integer or float dtype, concrete or traced (``jit``, ``vmap``). It is
first turned into an int32 ``n`` in ``[0, 2**31 - 1]``: negative steps act as
0, float steps are floored (``7.9`` acts as ``7``; NaN acts as 0) and larger
steps saturate at ``2**31 - 1`` (as ``optax.safe_increment`` does; a float32
step saturates at 2147483520, the largest float32 below ``2**31``). Every
boundary decision (``floor(n / T)``, ``ceil(n / T)``, ``min(n, T)``, a
milestone) is then taken in integer arithmetic, so it is exact in float32
under ``jit`` and cannot overflow int32; fractions such as ``1 - n / T`` are
formed as ``(T - min(n, T)) / T`` and are never negative.

Bitwise reproducibility. Each rule's arithmetic is one jitted function (so
an eager call runs the same compiled code, fused multiply-adds included, as a
call inside the user's ``jit``) whose hyperparameters pass through
``lax.optimization_barrier``, so XLA does not rewrite ``x / T`` as
``x * (1/T)`` with a folded constant (not correctly rounded:
``41 * float32(1/41) != 1``): a schedule gives the same bits eagerly, under
``jit`` and as an optax learning rate.

Hyperparameters are checked at construction (``ValueError`` naming the
function, the argument and the value); JAX arrays pass unchecked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from optax_guard import _validation as val

_INT32_MAX = val.INT32_MAX
# The largest float32 below 2**31 (float32(2**31 - 1) rounds up to 2**31).
_F32_BELOW_2_31 = 2147483520.0


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------


def _step(count: Any) -> jax.Array:
  """The step as int32 in ``[0, 2**31 - 1]`` (floored, clamped, NaN -> 0)."""
  if val.is_jax(count):
    t = jnp.asarray(count)
    dtype = t.dtype
    if dtype == jnp.bool_:
      return t.astype(jnp.int32)
    if jnp.issubdtype(dtype, jnp.integer):
      if jnp.iinfo(dtype).max > _INT32_MAX:
        t = jnp.minimum(t, jnp.asarray(_INT32_MAX, dtype))
      if jnp.issubdtype(dtype, jnp.signedinteger):
        t = jnp.maximum(t, jnp.zeros((), dtype))
      return t.astype(jnp.int32)
    if jnp.issubdtype(dtype, jnp.floating):
      hi = _INT32_MAX if dtype == jnp.float64 else _F32_BELOW_2_31
      if dtype != jnp.float64:
        t = t.astype(jnp.float32)
      t = jnp.where(jnp.isnan(t), jnp.zeros((), t.dtype), jnp.floor(t))
      return jnp.clip(t, 0, hi).astype(jnp.int32)
    raise TypeError(f"a schedule step must be an integer or float, got dtype {dtype}")
  if isinstance(count, (bool, np.bool_)) or isinstance(count, (int, np.integer)):
    return jnp.asarray(min(max(int(count), 0), _INT32_MAX), jnp.int32)
  a = np.asarray(count)
  if a.dtype.kind in "biu":
    a = a.astype(np.uint64 if a.dtype.kind == "u" else np.int64)
    return jnp.asarray(np.clip(a, 0, _INT32_MAX).astype(np.int32))
  if a.dtype.kind == "f":
    a = np.asarray(a, np.float64)
    a = np.where(np.isnan(a), 0.0, np.floor(a))
    return jnp.asarray(np.clip(a, 0, _INT32_MAX).astype(np.int64).astype(np.int32))
  raise TypeError(f"a schedule step must be an integer or float, got {count!r}")


def _int32(x: Any) -> Any:
  """A hyperparameter as int32: NumPy for concrete values (no device work)."""
  return x.astype(jnp.int32) if val.is_jax(x) else np.int32(x)


def _f32(x: Any) -> Any:
  """A hyperparameter as float32: NumPy for concrete values (no device work)."""
  return x.astype(jnp.float32) if val.is_jax(x) else np.float32(x)


def _unit(power: Any) -> bool:
  """True for a concrete power of exactly 1 (the pow is then skipped)."""
  return not val.is_jax(power) and float(power) == 1.0


def _opaque(*hparams: jax.Array) -> tuple[jax.Array, ...]:
  """Hides hyperparameter values from XLA's algebraic simplifier."""
  return jax.lax.optimization_barrier(hparams)


def _pow(base: jax.Array, power: jax.Array, unit: bool) -> jax.Array:
  return base if unit else jnp.power(base, power)


def _times(init: jax.Array, mult: jax.Array) -> jax.Array:
  """``init * mult``, with 0 for a zero ``init`` even when ``mult`` is inf."""
  return jnp.where(init == 0, jnp.zeros((), jnp.float32), init * mult)


def _periods(n: jax.Array, steps: jax.Array, staircase: bool) -> jax.Array:
  """``n / steps`` in float32, floored in integer arithmetic if ``staircase``."""
  if staircase:
    return (n // steps).astype(jnp.float32)
  return n.astype(jnp.float32) / steps.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Polynomial family
# ---------------------------------------------------------------------------


def polynomial_decay(
    init_value: ArrayLike,
    decay_steps: int,
    *,
    power: ArrayLike = 1.0,
    end_value: ArrayLike = 0.0,
    cycle: bool = False,
) -> optax.Schedule:
  r"""Polynomial decay from ``init_value`` to ``end_value`` over ``decay_steps``.

  .. math::
    \eta_t = (\eta_0 - \eta_T)\left(1 - \frac{\min(t, T)}{T}\right)^{p} + \eta_T

  With ``cycle=True`` the horizon restarts: :math:`T` is replaced by
  :math:`T \cdot \max(1, \lceil t / T \rceil)`, exactly as Keras
  ``PolynomialDecay(cycle=True)`` (whose multiplier is 1 at step 0): the value
  reaches ``end_value`` at every multiple of ``T`` and jumps back up (to a
  lower peak each cycle) right after it. The ceiling is taken in integer
  arithmetic, so there is no off-by-one at multiples of ``T`` and no int32
  overflow at ``t = 2**31 - 1``; ``1 - t/T`` is formed as ``(T - t')/T`` and
  is never negative, so a fractional power never gives NaN. The value is
  exactly ``init_value`` at step 0 and exactly ``end_value`` from step ``T``
  (and, with ``cycle``, at every multiple of ``T``).

  Equivalents: Keras ``PolynomialDecay`` (same arguments; its
  ``end_learning_rate`` default is 1e-4, ours 0.0), torch ``PolynomialLR``
  (``end_value=0``, ``total_iters=T``), ``optax.polynomial_schedule``
  (without ``cycle``).

  Args:
    init_value: the value at step 0 (finite).
    decay_steps: the horizon ``T``, a whole number ``>= 1``.
    power: the exponent ``p >= 0`` (1 is linear, 0.5 square root).
    end_value: the value from step ``T`` on (finite).
    cycle: restart the decay every ``T`` steps (Keras semantics).

  Returns:
    An ``optax.Schedule``: ``step -> float32``.

  Example:
    >>> import optax_guard as og
    >>> sched = og.polynomial_decay(1.0, 4, power=2.0, end_value=0.5)
    >>> [float(sched(t)) for t in (0, 2, 4, 100)]
    [1.0, 0.625, 0.5, 0.5]
    >>> cyc = og.polynomial_decay(1.0, 4, cycle=True)
    >>> [float(cyc(t)) for t in (0, 4, 5, 8)]
    [1.0, 0.0, 0.375, 0.0]

  References:
    Chen et al., 2017, *DeepLab: Semantic Image Segmentation with Deep
    Convolutional Nets, Atrous Convolution, and Fully Connected CRFs* ("poly"
    policy), https://arxiv.org/abs/1606.00915
  """
  owner = "polynomial_decay"
  val.finite(owner, "init_value", init_value)
  decay_steps = val.whole(owner, "decay_steps", decay_steps, minimum=1)
  val.non_negative(owner, "power", power, finite=True)
  val.finite(owner, "end_value", end_value)
  cycle = val.flag(owner, "cycle", cycle)
  return _polynomial(init_value=init_value, decay_steps=decay_steps, power=power,
                     end_value=end_value, cycle=cycle)


@functools.partial(jax.jit, static_argnames=("cycle", "unit"))
def _polynomial_core(n, init, end, steps, power, *, cycle, unit):
  init, end, steps, power = _opaque(init, end, steps, power)
  if cycle:
    rem = n % steps
    cycles = jnp.maximum(n // steps + (rem > 0).astype(jnp.int32), 1)
    left = jnp.where(rem == 0, 0, steps - rem)  # step 0 is handled below
    span = steps.astype(jnp.float32) * cycles.astype(jnp.float32)
  else:
    left = steps - jnp.minimum(n, steps)
    span = steps.astype(jnp.float32)
  frac = left.astype(jnp.float32) / span
  out = end + (init - end) * _pow(frac, power, unit)
  # exactly init_value at step 0 (end + (init - end) can be an ulp off init)
  return jnp.where(n == 0, init, out)


def _polynomial(
    *,
    init_value: ArrayLike, decay_steps: Any, power: ArrayLike, end_value: ArrayLike,
    cycle: bool,
) -> optax.Schedule:
  hp = (_f32(init_value), _f32(end_value), _int32(decay_steps), _f32(power))
  unit = _unit(power)
  return lambda count: _polynomial_core(_step(count), *hp, cycle=cycle, unit=unit)


def linear_decay(
    init_value: ArrayLike, decay_steps: int, *, end_value: ArrayLike = 0.0
) -> optax.Schedule:
  r"""Linear decay from ``init_value`` to ``end_value`` over ``decay_steps``.

  .. math::
    \eta_t = \eta_0 + (\eta_T - \eta_0)\,\frac{\min(t, T)}{T}

  :func:`polynomial_decay` with ``power=1`` (no pow is evaluated).

  Equivalents: torch ``LinearLR(start_factor=1, end_factor=end/init,
  total_iters=T)`` (torch restricts ``end_factor`` to ``[0, 1]``; here
  ``end_value`` may also exceed ``init_value``), Keras ``PolynomialDecay``
  with ``power=1``, ``optax.linear_schedule(init, end, T)``.

  Args:
    init_value: the value at step 0 (finite).
    decay_steps: the horizon ``T``, a whole number ``>= 1``.
    end_value: the value from step ``T`` on (finite).

  Returns:
    An ``optax.Schedule``: ``step -> float32``.

  Example:
    >>> import optax_guard as og
    >>> sched = og.linear_decay(1.0, 4, end_value=0.5)
    >>> [float(sched(t)) for t in range(6)]
    [1.0, 0.875, 0.75, 0.625, 0.5, 0.5]

  References:
    ``torch.optim.lr_scheduler.LinearLR``,
    https://pytorch.org/docs/stable/generated/torch.optim.lr_scheduler.LinearLR.html
  """
  owner = "linear_decay"
  val.finite(owner, "init_value", init_value)
  decay_steps = val.whole(owner, "decay_steps", decay_steps, minimum=1)
  val.finite(owner, "end_value", end_value)
  return _polynomial(init_value=init_value, decay_steps=decay_steps, power=1.0,
                     end_value=end_value, cycle=False)


# ---------------------------------------------------------------------------
# Inverse-time family
# ---------------------------------------------------------------------------


def inverse_sqrt_decay(init_value: ArrayLike, *, timescale: ArrayLike = 1.0) -> optax.Schedule:
  r"""Inverse square-root decay.

  .. math::
    \eta_t = \frac{\eta_0}{\sqrt{1 + t / \tau}}

  ``timescale=1`` gives the classic :math:`\eta_0 / \sqrt{t + 1}`; a larger
  ``timescale`` keeps the value near ``init_value`` for about ``timescale``
  steps. Combine with :func:`warmup` for the Transformer ("Noam") schedule.
  There is no direct torch or Keras class (torch: ``LambdaLR`` with
  ``lambda t: (1 + t / tau) ** -0.5``).

  Args:
    init_value: the value at step 0 (finite).
    timescale: ``tau > 0`` (finite), in steps.

  Returns:
    An ``optax.Schedule``: ``step -> float32``.

  Example:
    >>> import optax_guard as og
    >>> sched = og.inverse_sqrt_decay(1.0, timescale=2.0)
    >>> [float(sched(t)) for t in (0, 6, 30)]
    [1.0, 0.5, 0.25]

  References:
    Vaswani et al., 2017, *Attention Is All You Need*,
    https://arxiv.org/abs/1706.03762
  """
  owner = "inverse_sqrt_decay"
  val.finite(owner, "init_value", init_value)
  val.positive(owner, "timescale", timescale, finite=True)

  hp = (_f32(init_value), _f32(timescale))
  return lambda count: _inverse_sqrt_core(_step(count), *hp)


@jax.jit
def _inverse_sqrt_core(n, init, timescale):
  init, timescale = _opaque(init, timescale)
  return init / jnp.sqrt(1.0 + n.astype(jnp.float32) / timescale)


def inverse_time_decay(
    init_value: ArrayLike, decay_steps: int, *,
    decay_rate: ArrayLike = 1.0, power: ArrayLike = 1.0, staircase: bool = False,
) -> optax.Schedule:
  r"""Inverse time decay.

  .. math::
    \eta_t = \frac{\eta_0}{(1 + r\, p)^{q}}, \qquad
    p = \frac{t}{T} \text{ (or } \lfloor t / T \rfloor \text{ with staircase)}

  ``power=1`` is Keras ``InverseTimeDecay(init, T, r, staircase)``; the floor
  is taken in integer arithmetic (Keras floors a float division, which can be
  off by one for large steps in float32). ``power=0.5`` with ``T = 1`` is
  ``init / sqrt(1 + r t)``. torch has no direct class (``LambdaLR``).

  Args:
    init_value: the value at step 0 (finite).
    decay_steps: ``T``, a whole number ``>= 1``.
    decay_rate: ``r >= 0`` (finite).
    power: ``q >= 0`` (finite).
    staircase: floor ``t / T`` (decay at discrete intervals).

  Returns:
    An ``optax.Schedule``: ``step -> float32``.

  Example:
    >>> import optax_guard as og
    >>> sched = og.inverse_time_decay(1.0, 10, decay_rate=1.0, staircase=True)
    >>> [float(sched(t)) for t in (0, 9, 10, 30)]
    [1.0, 1.0, 0.5, 0.25]

  References:
    Robbins, Monro, 1951, *A Stochastic Approximation Method*,
    https://doi.org/10.1214/aoms/1177729586
  """
  owner = "inverse_time_decay"
  val.finite(owner, "init_value", init_value)
  decay_steps = val.whole(owner, "decay_steps", decay_steps, minimum=1)
  val.non_negative(owner, "decay_rate", decay_rate, finite=True)
  val.non_negative(owner, "power", power, finite=True)
  staircase = val.flag(owner, "staircase", staircase)

  hp = (_f32(init_value), _int32(decay_steps), _f32(decay_rate), _f32(power))
  unit = _unit(power)
  return lambda count: _inverse_time_core(_step(count), *hp, staircase=staircase, unit=unit)


@functools.partial(jax.jit, static_argnames=("staircase", "unit"))
def _inverse_time_core(n, init, steps, rate, power, *, staircase, unit):
  init, steps, rate, power = _opaque(init, steps, rate, power)
  return init / _pow(1.0 + rate * _periods(n, steps, staircase), power, unit)


# ---------------------------------------------------------------------------
# Exponential family
# ---------------------------------------------------------------------------


def exponential_decay(
    init_value: ArrayLike,
    decay_steps: int,
    decay_rate: ArrayLike,
    *,
    staircase: bool = False,
    end_value: ArrayLike | None = None,
) -> optax.Schedule:
  r"""Exponential decay, optionally in stairs and with a floor (or cap).

  .. math::
    \eta_t = \eta_0\, r^{p}, \qquad
    p = \frac{t}{T} \text{ (or } \lfloor t / T \rfloor \text{ with staircase)}

  ``end_value`` bounds the value: a floor ``max(eta_t, end)`` when
  ``decay_rate < 1``, a cap ``min(eta_t, end)`` when ``decay_rate > 1``, and
  ignored when ``decay_rate == 1`` (the value stays ``init_value``). As in
  ``optax.exponential_decay`` the bound applies from step 0, so a floor above
  ``init_value`` gives the constant ``end_value``. Underflow gives 0, never
  NaN; a zero ``init_value`` gives 0 even when ``r**p`` overflows.

  The positional order ``(init_value, decay_steps, decay_rate)`` is the one of
  ``optax.exponential_decay(init_value, transition_steps, decay_rate)`` and
  Keras ``ExponentialDecay(initial_learning_rate, decay_steps, decay_rate)``,
  so a call written for either means the same here; the rest is
  keyword-only (optax's fourth positional argument, ``transition_begin``,
  has no equivalent: use :func:`warmup` or ``optax.join_schedules``).

  Equivalents: ``decay_steps=1`` is torch ``ExponentialLR(gamma=r)``; Keras
  ``ExponentialDecay(init, T, r, staircase)`` (neither has ``end_value``);
  ``optax.exponential_decay(init, T, r, staircase=..., end_value=...)``.

  Args:
    init_value: the value at step 0 (finite).
    decay_steps: ``T``, a whole number ``>= 1`` (1 decays every step).
    decay_rate: ``r > 0`` (finite); ``r < 1`` decays, ``r > 1`` grows.
    staircase: floor ``t / T`` (in integer arithmetic).
    end_value: None, or a finite floor (``r < 1``) / cap (``r > 1``).

  Returns:
    An ``optax.Schedule``: ``step -> float32``.

  Example:
    >>> import optax_guard as og
    >>> sched = og.exponential_decay(1.0, 2, 0.5, end_value=0.2)
    >>> [float(sched(t)) for t in (0, 2, 4, 100)]
    [1.0, 0.5, 0.25, 0.2]

  References:
    ``torch.optim.lr_scheduler.ExponentialLR`` and Keras ``ExponentialDecay``,
    https://keras.io/api/optimizers/learning_rate_schedules/exponential_decay/
  """
  owner = "exponential_decay"
  val.finite(owner, "init_value", init_value)
  val.positive(owner, "decay_rate", decay_rate, finite=True)
  decay_steps = val.whole(owner, "decay_steps", decay_steps, minimum=1)
  staircase = val.flag(owner, "staircase", staircase)
  if end_value is not None:
    val.finite(owner, "end_value", end_value)

  hp = (_f32(init_value), _f32(decay_rate), _int32(decay_steps),
        _f32(0.0 if end_value is None else end_value))
  bounded = end_value is not None
  return lambda count: _exponential_core(_step(count), *hp, staircase=staircase, bounded=bounded)


@functools.partial(jax.jit, static_argnames=("staircase", "bounded"))
def _exponential_core(n, init, rate, steps, end, *, staircase, bounded):
  init, rate, steps, end = _opaque(init, rate, steps, end)
  out = _times(init, jnp.power(rate, _periods(n, steps, staircase)))
  if bounded:
    out = jnp.where(rate < 1, jnp.maximum(out, end),
                    jnp.where(rate > 1, jnp.minimum(out, end), out))
  return out


def step_decay(
    init_value: ArrayLike, step_size: int, *, factor: ArrayLike = 0.1
) -> optax.Schedule:
  r"""Multiplies the value by ``factor`` every ``step_size`` steps.

  .. math::
    \eta_t = \eta_0\, \gamma^{\lfloor t / s \rfloor}

  The floor is integer floor-division of the step. Equivalent to torch
  ``StepLR(step_size=s, gamma=factor)`` and to Keras
  ``ExponentialDecay(init, s, factor, staircase=True)``.

  Args:
    init_value: the value at step 0 (finite).
    step_size: ``s``, a whole number ``>= 1``.
    factor: ``gamma > 0`` (finite).

  Returns:
    An ``optax.Schedule``: ``step -> float32``.

  Example:
    >>> import optax_guard as og
    >>> sched = og.step_decay(1.0, 10, factor=0.5)
    >>> [float(sched(t)) for t in (0, 9, 10, 25)]
    [1.0, 1.0, 0.5, 0.25]

  References:
    He et al., 2016, *Deep Residual Learning for Image Recognition*,
    https://arxiv.org/abs/1512.03385
  """
  owner = "step_decay"
  val.finite(owner, "init_value", init_value)
  step_size = val.whole(owner, "step_size", step_size, minimum=1)
  val.positive(owner, "factor", factor, finite=True)

  hp = (_f32(init_value), _int32(step_size), _f32(factor))
  return lambda count: _step_core(_step(count), *hp)


@jax.jit
def _step_core(n, init, step_size, factor):
  init, step_size, factor = _opaque(init, step_size, factor)
  return _times(init, jnp.power(factor, (n // step_size).astype(jnp.float32)))


def multistep_decay(
    init_value: ArrayLike, milestones: Sequence[int], *, factor: ArrayLike = 0.1
) -> optax.Schedule:
  r"""Multiplies the value by ``factor`` at each milestone step.

  .. math::
    \eta_t = \eta_0\, \gamma^{\#\{m \in M : t \ge m\}}

  Equivalent to torch ``MultiStepLR(milestones, gamma=factor)``, including a
  repeated milestone (it counts twice, like torch's ``Counter``) and a
  milestone at 0 (applied from step 0). Keras ``PiecewiseConstantDecay``
  switches *after* a boundary (``t > b``), i.e. its boundaries are ours minus
  one. Milestones beyond ``2**31 - 1`` are never reached.

  Args:
    init_value: the value at step 0 (finite).
    milestones: sorted (non-decreasing) whole numbers ``>= 0``; may be empty.
    factor: ``gamma > 0`` (finite).

  Returns:
    An ``optax.Schedule``: ``step -> float32``.

  Example:
    >>> import optax_guard as og
    >>> sched = og.multistep_decay(1.0, [3, 5], factor=0.5)
    >>> [float(sched(t)) for t in (0, 2, 3, 5, 9)]
    [1.0, 1.0, 0.5, 0.25, 0.25]

  References:
    ``torch.optim.lr_scheduler.MultiStepLR``,
    https://pytorch.org/docs/stable/generated/torch.optim.lr_scheduler.MultiStepLR.html
  """
  owner = "multistep_decay"
  val.finite(owner, "init_value", init_value)
  val.positive(owner, "factor", factor, finite=True)
  if val.is_jax(milestones):
    marks = _int32(jnp.ravel(jnp.asarray(milestones)))
  else:
    ms = val.milestones(owner, milestones)
    marks = np.asarray([m for m in ms if m <= _INT32_MAX], np.int32)  # others: never reached

  hp = (_f32(init_value), marks, _f32(factor))
  return lambda count: _multistep_core(_step(count), *hp)


@jax.jit
def _multistep_core(n, init, marks, factor):
  init, marks, factor = _opaque(init, marks, factor)
  k = jnp.sum(n[..., None] >= marks, axis=-1, dtype=jnp.int32)
  return _times(init, jnp.power(factor, k.astype(jnp.float32)))


# ---------------------------------------------------------------------------
# Warmup
# ---------------------------------------------------------------------------


def warmup(
    schedule: optax.Schedule,
    warmup_steps: int,
    *,
    init_value: ArrayLike = 0.0,
) -> optax.Schedule:
  r"""Linear warmup into any schedule.

  .. math::
    \eta_t = \begin{cases}
      \eta_{\text{init}} + (s(0) - \eta_{\text{init}})\, t / W & t < W \\
      s(t - W) & t \ge W
    \end{cases}

  The join is continuous: the value at ``t = W`` is ``s(0)``, the end point
  of the ramp. ``warmup_steps=0`` gives ``s`` itself (with our step
  handling: float32 output, negative steps act as 0). ``schedule`` may be any
  optax schedule; it is called with an int32 step. Equivalent to torch
  ``SequentialLR([LinearLR(init/s0, 1, W), sched], milestones=[W])`` (torch
  needs ``init > 0``) and to
  ``optax.join_schedules([optax.linear_schedule(init, s0, W), s], [W])``.

  Args:
    schedule: the schedule ``s`` to run after the warmup.
    warmup_steps: ``W``, a whole number ``>= 0``.
    init_value: the value at step 0 (finite).

  Returns:
    An ``optax.Schedule``: ``step -> float32``.

  Example:
    >>> import optax_guard as og
    >>> sched = og.warmup(og.step_decay(1.0, 2, factor=0.5), 4)
    >>> [float(sched(t)) for t in (0, 1, 4, 6)]
    [0.0, 0.25, 1.0, 0.5]

  References:
    Goyal et al., 2017, *Accurate, Large Minibatch SGD: Training ImageNet in 1
    Hour*, https://arxiv.org/abs/1706.02677
  """
  owner = "warmup"
  val.callable_(owner, "schedule", schedule)
  warmup_steps = val.whole(owner, "warmup_steps", warmup_steps, minimum=0)
  val.finite(owner, "init_value", init_value)

  if not val.is_jax(warmup_steps) and warmup_steps == 0:
    return lambda count: _run(schedule, _step(count))

  hp = (_f32(init_value), _int32(warmup_steps))
  return lambda count: _warmup_core(_step(count), *hp, schedule=schedule)


def _run(schedule: Callable[[Any], ArrayLike], n: jax.Array) -> jax.Array:
  return jnp.asarray(schedule(n)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("schedule",))
def _warmup_core(n, start, steps, *, schedule):
  start, steps = _opaque(start, steps)
  peak = _run(schedule, jnp.zeros((), jnp.int32))
  frac = jnp.minimum(n, steps).astype(jnp.float32) / jnp.maximum(steps, 1).astype(jnp.float32)
  ramp = start + (peak - start) * frac
  return jnp.where(n < steps, ramp, _run(schedule, jnp.maximum(n - steps, 0)))
