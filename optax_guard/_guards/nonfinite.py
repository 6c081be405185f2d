"""The non-finite guard: skip a step whose gradients hold a NaN or an infinity.

``optax.apply_if_finite`` branches with ``jax.lax.cond`` as well. It differs
in its test and its policy: it runs ``jnp.isfinite`` over every element (a
separate pass, which finite gradients whose squares overflow float32, such as
``1e30``-scaled ones, pass) and it applies a non-finite update anyway after
``max_consecutive_errors`` skipped steps. :func:`skip_nonfinite` reads one
float32 sum of squares and never gives in.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_guard import _numerics as num
from optax_guard import _stats
from optax_guard import _validation as val
from optax_guard._guards.combinator import Decision, counters, guard, zero_counters


@_stats.declare(
    "skip_nonfinite", ("num_skipped", "consecutive_skipped", "last_skipped"), guard=True
)
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


def skip_nonfinite(
    inner: optax.GradientTransformation, *, axis_name: val.AxisName = None
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
  state bitwise untouched; ``inner.update`` does not run. (Under ``jax.vmap``
  with a decision that varies along the mapped axis the ``cond`` becomes a
  select: ``inner.update`` runs and its state is selected elementwise, with
  the same results.) Keyword extras such as ``value=`` are passed through to
  ``inner``. With the guard outermost, ``og.update_and_apply(guard, grads,
  state, params)`` applies the update to the parameters inside the ``cond``
  (no update-sized buffer between the guard and ``optax.apply_updates``).

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
    https://arxiv.org/abs/1710.03740). ``optax.apply_if_finite`` also skips
    with ``jax.lax.cond``, but tests every element and gives up after
    ``max_consecutive_errors`` skipped steps.
  """
  axis_name = val.axis_name("skip_nonfinite", axis_name)

  def decide(updates, state, extra):
    del extra
    # decide on the sum of squares, not on its sqrt: XLA may rewrite
    # sqrt(x * x) as |x| for a one-element tree, hiding the overflow
    partial = num.global_partial(updates, 2, axis_name)
    skip = jnp.logical_not(num.is_finite_scalar(partial))
    return Decision(skip, counters(state, skip), num.SharedNorm.of(updates, partial, axis_name))

  return guard("skip_nonfinite", inner, state_type=SkipNonfiniteState,
               init=lambda params: zero_counters(), decide=decide)
