"""The step-range guard: skip the update calls of known step ranges (for replays).

Long runs restart from checkpoints. After a loss spike the usual remedy is to
go back to a checkpoint written some steps before it and replay, skipping the
batches that caused it. :func:`skip_steps` skips the update calls whose index
(counted from ``init`` and kept in its state, so it survives a checkpoint)
falls in given ranges, exactly as a guard skips a bad step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_guard import _stats
from optax_guard import _validation as val
from optax_guard._guards.combinator import Decision, guard

INT32_MAX = int(np.iinfo(np.int32).max)


@_stats.declare("skip_steps", ("step", "num_skipped", "last_skipped"), guard=True)
class SkipStepsState(NamedTuple):
  """State of :func:`skip_steps`.

  Attributes:
    inner_state: the wrapped transformation's state (unchanged on skipped
      steps).
    step: int32, the number of update calls since ``init``, skipped ones
      included: the index of the next call (saturating at ``2**31 - 1``).
    num_skipped: int32, total number of skipped steps (saturating).
    last_skipped: bool scalar, whether the most recent step was skipped.
  """

  inner_state: optax.OptState
  step: jax.Array
  num_skipped: jax.Array
  last_skipped: jax.Array


def _in_ranges(step: jax.Array, bounds: tuple[tuple[int, int], ...]) -> jax.Array:
  """Whether ``step`` lies in one of the half-open ranges (a bool scalar)."""
  if not bounds:
    return jnp.zeros((), jnp.bool_)
  starts = np.array([a for a, _ in bounds], np.int32)
  stops = np.array([b for _, b in bounds], np.int32)
  return jnp.any((step >= starts) & (step < stops))


def skip_steps(
    inner: optax.GradientTransformation, ranges: Sequence[tuple[int, int]]
) -> optax.GradientTransformationExtraArgs:
  r"""Skips the update calls whose index falls in given ranges (for replays).

  With :math:`t` the index of the update call (0 for the first call after
  ``init``, kept in the state) and :math:`R` the half-open ranges
  :math:`[a_k, b_k)`:

  .. math::
    (u, s) \leftarrow \begin{cases} (0,\ s) & t \in \bigcup_k [a_k, b_k) \\
    \mathrm{inner}(g, s) & \text{otherwise} \end{cases},
    \qquad t \leftarrow t + 1

  A skipped call is skipped as a guard skips a bad step: it returns
  ``jnp.zeros`` with the inner's output shapes and dtypes and leaves the inner
  state bitwise untouched (``jax.lax.cond``; ``inner.update`` does not run),
  so the inner step count, and any learning-rate schedule driven by it, does
  not advance either. The index counts every call, skipped or not, and lives
  in the state: a run restored from a checkpoint of this state continues
  counting where the saved run stopped, so the ranges keep meaning the same
  calls. Keyword extras such as ``value=`` are passed through to ``inner``.
  With ``skip_steps`` outermost, ``og.update_and_apply(tx, grads, state,
  params)`` applies the update to the parameters inside the ``cond`` (and
  inside the ``cond`` of a guard it wraps).

  The use: after a loss spike, restore a checkpoint written before it and
  replay the run with the data that followed, skipping the steps around the
  spike (the PaLM authors restarted about 100 steps before a spike and
  skipped 200 to 500 batches). The data loader still delivers the skipped
  batches, so the data order and every later step index stay as they were.
  To wrap a running optimizer whose checkpoint has no ``skip_steps`` state,
  build the state with :func:`add_guard_state` (its ``step=`` sets the index
  of the next call).

  Args:
    inner: the transformation to wrap (usually the whole optimizer, or a
      guard around it).
    ranges: a sequence of half-open ``(start, stop)`` pairs of update-call
      indices, ``0 <= start < stop <= 2**31 - 1`` (Python or NumPy ints), or
      of ``range`` objects of step 1 (``range(45, 50)`` is ``(45, 50)``);
      they may overlap and come in any order. An empty sequence skips
      nothing. One range alone is written ``[(45, 50)]``.
      The ranges are static: they are not part of the state, so a restored
      run may be given other ranges.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`SkipStepsState`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.skip_steps(optax.sgd(1.0), [(1, 3)])
    >>> state = tx.init(jnp.zeros(1))
    >>> for _ in range(4):
    ...   u, state = tx.update(jnp.ones(1), state)
    ...   print(int(state.step), float(u[0]), bool(state.last_skipped))
    1 -1.0 False
    2 0.0 True
    3 0.0 True
    4 -1.0 False

  References:
    Chowdhery et al., 2022, *PaLM: Scaling Language Modeling with Pathways*,
    https://arxiv.org/abs/2204.02311 (section 5.1, restarting before a spike
    and skipping batches).
  """
  owner = "skip_steps"
  bounds: tuple[tuple[int, int], ...] = ()

  def init_fields(params):
    del params
    zero = lambda dtype: jnp.zeros((), dtype)  # one buffer per field (donatable)
    return zero(jnp.int32), zero(jnp.int32), zero(jnp.bool_)

  def decide(updates, state, extra):
    del updates, extra
    skip = _in_ranges(state.step, bounds)
    num_skipped = jnp.where(skip, optax.safe_increment(state.num_skipped), state.num_skipped)
    return Decision(skip, (optax.safe_increment(state.step), num_skipped, skip))

  # inner first (guard checks it), so that skip_steps(ranges, inner) blames inner
  tx = guard(owner, inner, state_type=SkipStepsState, init=init_fields, decide=decide)
  bounds = val.step_ranges(owner, ranges)
  return tx
