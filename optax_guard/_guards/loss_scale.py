"""The loss-scale guard: dynamic loss scaling for float16 training, as PyTorch's ``GradScaler``.

Float16 gradients underflow: the gradient of a small loss term, or of a
deep layer, falls under float16's smallest subnormal (about ``6e-8``) and
becomes 0. Scaling the loss by a large factor ``S`` scales every gradient by
``S`` and lifts them into range; the optimizer then needs the gradients
divided by ``S`` again, and a scale that is too large overflows to ``inf``.
:func:`dynamic_loss_scale` keeps ``S`` in the optimizer state and adapts it
with the rule of ``torch.amp.GradScaler``: back off after a non-finite step
(which it skips), grow after a run of finite ones. :func:`loss_scale` reads
the current ``S`` from an optimizer state, for the loss function.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from optax_guard import _numerics as num
from optax_guard import _stats
from optax_guard import _validation as val
from optax_guard._guards.combinator import Decision, counters, guard, zero_counters

# the scale is a float32: it starts as a normal float32 number
_F32 = np.finfo(np.float32)


_REPORTED = ("scale", "growth_tracker", "num_skipped", "consecutive_skipped", "last_skipped")


@_stats.declare("dynamic_loss_scale", _REPORTED, guard=True)
class DynamicLossScaleState(NamedTuple):
  """State of :func:`dynamic_loss_scale`.

  Attributes:
    inner_state: the state of the optimizer inside, as it was after the
      last applied step.
    scale: float32, the loss scale for the *next* step (what
      :func:`loss_scale` returns).
    growth_tracker: int32, finite steps since the scale last changed (0 after
      a skipped step and after the scale grew), as ``GradScaler``'s growth
      tracker.
    num_skipped: int32, how many steps had non-finite scaled gradients and
      were skipped (saturating).
    consecutive_skipped: int32, the length of the current run of skipped
      steps, 0 once a step applies (saturating).
    last_skipped: bool scalar, True when the latest step was skipped.
  """

  inner_state: optax.OptState
  scale: jax.Array
  growth_tracker: jax.Array
  num_skipped: jax.Array
  consecutive_skipped: jax.Array
  last_skipped: jax.Array


def _next_scale(state: DynamicLossScaleState, skip: jax.Array, *, growth_factor: Any,
                backoff_factor: Any, growth_interval: Any) -> tuple[jax.Array, jax.Array]:
  """``(scale, growth_tracker)`` after this step, as ``torch._amp_update_scale_``.

  A skipped step multiplies the scale by ``backoff_factor`` and resets the
  tracker. A finite step counts itself first; when the count reaches
  ``growth_interval`` the scale is multiplied by ``growth_factor`` (kept
  unchanged if the product is not a finite float32) and the tracker is reset
  to 0 either way.
  """
  scale = state.scale
  successful = optax.safe_increment(state.growth_tracker)
  grow = jnp.logical_not(skip) & (successful >= growth_interval)
  grown = (scale * growth_factor).astype(jnp.float32)
  backed_off = (scale * backoff_factor).astype(jnp.float32)
  new_scale = jnp.where(skip, backed_off, jnp.where(grow & jnp.isfinite(grown), grown, scale))
  tracker = jnp.where(skip | grow, jnp.zeros((), jnp.int32), successful)
  return new_scale, tracker


def dynamic_loss_scale(
    inner: optax.GradientTransformation,
    *,
    init_scale: ArrayLike = 2.0**16,
    growth_factor: ArrayLike = 2.0,
    backoff_factor: ArrayLike = 0.5,
    growth_interval: ArrayLike = 2000,
    axis_name: val.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Dynamic loss scaling (PyTorch ``GradScaler``'s rule) around an optimizer.

  The loss function multiplies the loss by the current scale,
  ``loss * og.loss_scale(opt_state)``, so the gradients this guard receives
  are those of the scaled loss, :math:`g = S_t \nabla L`. With :math:`Q` the
  float32-accumulated sum of squares of :math:`g`:

  .. math::
    (u, s) \leftarrow \begin{cases} (0,\ s) & Q \notin \mathbb{R} \\
    \mathrm{inner}(g \cdot \mathrm{fl}_{32}(1 / S_t),\ s) & \text{otherwise}
    \end{cases}

    S_{t+1} = \begin{cases} S_t \cdot \text{backoff} & \text{skipped} \\
    S_t \cdot \text{growth} & k_t + 1 = \text{interval} \text{ (if finite)} \\
    S_t & \text{otherwise} \end{cases}, \qquad
    k_{t+1} = \begin{cases} k_t + 1 & \text{finite, no growth} \\
    0 & \text{otherwise} \end{cases}

  The rule is ``torch.amp.GradScaler``'s (``_amp_update_scale_``), step for
  step: the inverse scale is one float32 number, each gradient is multiplied
  by it in float32 and cast back to its dtype; a step with a non-finite
  gradient is skipped and backs the scale off; a finite step counts itself
  in the growth tracker :math:`k` first, and when the count reaches
  ``growth_interval`` the scale grows and the tracker is reset to 0. A
  growth that would give an infinite float32 scale leaves the scale as it
  is (the tracker is still reset), so the scale stays finite; it is not
  floored, so a run whose every step is non-finite backs it off towards
  float32 underflow, as in PyTorch.

  The skip is the guard's: zero updates, the inner state untouched
  (``jax.lax.cond``; ``inner.update`` does not run), the fused step of
  ``og.update_and_apply`` and the Flax drop-ins, nesting with the other
  guards and ``optax.MultiSteps`` (see :ref:`design-guards`). The skipped
  step still counts, in ``num_skipped`` and ``consecutive_skipped``.

  Differences from PyTorch, all at the edges:

  * The non-finite test reads the float32 sum of squares of the *received*
    (scaled) gradients, one reduction as in
    :func:`~optax_guard.skip_nonfinite`, where PyTorch tests each element.
    For float16 gradients the two agree (squares of float16 numbers cannot
    overflow a float32 sum). For float32 or bfloat16 gradients a sum of
    squares above float32 range (a scaled norm above about ``1.8e19``)
    also counts as non-finite: the scale backs off a step earlier than
    PyTorch would, until the scaled gradients fit.
  * Unscaled gradients cannot overflow while the scale is at least 1:
    multiplying by ``1/S <= 1`` never makes a finite number larger. Under a
    scale below 1 (an ``init_scale`` under 1, or a scale that backed off
    that far because even the unscaled gradients overflow) the unscaled
    gradients of a float16 leaf can exceed float16 range; keep float32
    gradients then (PyTorch's ``GradScaler`` refuses float16 gradients
    altogether). A scale that underflowed to 0 (an infinite inverse) skips
    the step, where PyTorch would apply ``0 * inf = NaN``.
  * PyTorch forms the inverse scale in float64 and the new scale as a
    float64 product rounded to float32; here both are float32 operations.
    They agree for powers of two (the defaults keep every scale a power of
    two, so :math:`1/S` is exact on every backend) and for factors that are
    float32 numbers; for other factors (``growth_factor=1.1``) a scale can
    differ by one float32 rounding.
  * The growth test is ``count >= growth_interval`` (PyTorch: ``==``), so a
    ``growth_interval`` lowered during a run (under
    ``optax.inject_hyperparams``) grows at once instead of never.

  Args:
    inner: the transformation to guard (the whole optimizer; it receives the
      unscaled gradients).
    init_scale: the first scale, a float32 number ``> 0`` (PyTorch's default
      ``2**16``).
    growth_factor: ``> 1``, the factor of a growth (``inf`` never grows).
    backoff_factor: in ``(0, 1)``, the factor after a skipped step.
    growth_interval: int ``>= 1``, finite steps in a row before a growth.
    axis_name: inside ``pmap``/``shard_map`` when each device holds a
      different shard of the gradients, the mapped axis to ``psum`` the sum
      of squares over (one collective), so every device skips and rescales
      alike; see :ref:`design-collectives`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`DynamicLossScaleState`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.dynamic_loss_scale(optax.sgd(1.0), init_scale=1024.0, growth_interval=2)
    >>> state = tx.init(jnp.zeros(1))
    >>> float(og.loss_scale(state))
    1024.0
    >>> u, state = tx.update(jnp.array([jnp.inf]), state)  # overflow: skip, back off
    >>> u, float(og.loss_scale(state)), bool(state.last_skipped)
    (Array([0.], dtype=float32), 512.0, True)
    >>> for _ in range(2):  # the gradients of loss * 512
    ...   u, state = tx.update(jnp.array([256.0]), state)
    >>> u, float(og.loss_scale(state))  # two finite steps: grown
    (Array([-0.5], dtype=float32), 1024.0)

  References:
    Micikevicius et al., 2018, *Mixed Precision Training*,
    https://arxiv.org/abs/1710.03740 (loss scaling);
    ``torch.amp.GradScaler``,
    https://docs.pytorch.org/docs/stable/amp.html#gradient-scaling
  """
  owner = "dynamic_loss_scale"
  val.in_range(owner, "init_scale", init_scale, float(_F32.tiny), float(_F32.max),
               why=" (a normal float32 number)")
  val.in_range(owner, "growth_factor", growth_factor, 1.0, np.inf, lo_open=True)
  val.in_range(owner, "backoff_factor", backoff_factor, 0.0, 1.0, lo_open=True, hi_open=True)
  val.integer(owner, "growth_interval", growth_interval, minimum=1)
  axis_name = val.axis_name(owner, axis_name)

  def init_fields(params):
    del params
    # jnp.array copies: a state field never shares a buffer with a hyperparameter
    return (jnp.array(init_scale, jnp.float32), jnp.zeros((), jnp.int32), *zero_counters())

  def decide(updates, state, extra):
    val.float_leaves(owner, updates)
    # one pass: the sum of squares of the received gradients (an enclosing
    # guard's, when it measured the same leaves)
    partial = num.global_partial(updates, 2, axis_name, shared=extra.get(num.SHARED_NORM))
    inverse = jnp.float32(1) / state.scale
    skip = jnp.logical_not(num.is_finite_scalar(partial) & jnp.isfinite(inverse))
    scale, tracker = _next_scale(state, skip, growth_factor=growth_factor,
                                 backoff_factor=backoff_factor, growth_interval=growth_interval)
    # unscaled inside the apply branch, where it fuses into the inner update
    unscaled = lambda: num.scale_tree(updates, inverse)
    return Decision(skip, (scale, tracker, *counters(state, skip)), updates=unscaled)

  return guard(owner, inner, state_type=DynamicLossScaleState, init=init_fields, decide=decide)


def loss_scale(opt_state: optax.OptState) -> jax.Array:
  """The current loss scale in an optimizer state: multiply the loss by it.

  Finds the one :class:`DynamicLossScaleState` anywhere in ``opt_state``
  (inside ``optax.chain`` tuples, ``optax.inject_hyperparams``,
  ``optax.MultiSteps``, other guards, the state of ``optax_guard.flax``'s
  ``Optimizer`` or ``TrainState``) and returns its ``scale``, a float32
  scalar. The search reads only the structure of the state, so it works
  under ``jax.jit`` (it returns the traced scale there).

  Args:
    opt_state: an optimizer state holding exactly one
      :func:`dynamic_loss_scale` state.

  Returns:
    The float32 scale for the next step's loss.

  Raises:
    ValueError: if ``opt_state`` holds no :func:`dynamic_loss_scale` state,
      or several.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_guard as og
    >>> tx = optax.chain(optax.identity(), og.dynamic_loss_scale(optax.adam(1e-3)))
    >>> state = tx.init(jnp.zeros(3))
    >>> float(og.loss_scale(state))
    65536.0
    >>> scaled_loss = lambda p: jnp.sum(p ** 2) * og.loss_scale(state)  # what jax.grad takes
  """
  is_state = lambda x: isinstance(x, DynamicLossScaleState)  # noqa: E731
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
  if len(found) != 1:
    raise ValueError(
        f"loss_scale(opt_state=...) needs exactly one dynamic_loss_scale state in the "
        f"optimizer state, found {len(found)}"
    )
  (scale,) = jax.tree.leaves(found[0].scale)  # an array, or the array of a Flax variable
  return scale
