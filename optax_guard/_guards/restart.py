"""Guard state for restarts: add a guard to a running optimizer, strip it, seed it.

* :func:`add_guard_state` builds the state of a guarded optimizer from the
  state of the optimizer it wraps (for example restored from a checkpoint
  written without the guard), :func:`strip_guard_state` goes back, and
* :func:`seed_spike_history` fills the norm history of
  :func:`~optax_guard.skip_on_spike` from logged norms, so the restarted guard
  tests spikes from its first step instead of after ``min_history`` steps.

Which levels of a state are guards is read from the states' own declaration
(``_stats.declare(..., guard=True)``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from optax_guard import _numerics as num
from optax_guard import _stats
from optax_guard import _validation as val
from optax_guard._guards.spike import SkipOnSpikeState, SpikeTracker
from optax_guard._guards.steps import INT32_MAX, SkipStepsState


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


def _signature(tree: Any) -> tuple[Any, list[tuple[tuple[int, ...], np.dtype]]]:
  """The tree structure and the ``(shape, dtype)`` of every leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, [(tuple(np.shape(x)), np.dtype(jnp.result_type(x))) for x in leaves]


def _descend(state: Any, depth: int) -> Any:
  for _ in range(depth):
    state = state.inner_state
  return state


def _replace_at(state: Any, depth: int, new: Any) -> Any:
  """``state`` with the node ``depth`` levels down its ``inner_state`` chain replaced."""
  if depth == 0:
    return new
  return state._replace(inner_state=_replace_at(state.inner_state, depth - 1, new))


def _has_inner_state(x: Any) -> bool:
  return hasattr(x, "_fields") and "inner_state" in x._fields


def add_guard_state(
    guard: optax.GradientTransformation,
    inner_state: optax.OptState,
    params: optax.Params,
    *,
    step: ArrayLike | None = None,
) -> optax.OptState:
  """The state of ``guard`` around the given state of the optimizer it wraps.

  ``guard`` is a guard built around the optimizer that produced
  ``inner_state`` (:func:`~optax_guard.skip_nonfinite`,
  :func:`~optax_guard.skip_on_spike`, :func:`skip_steps`, several of them
  nested, or any wrapper whose state keeps the wrapped state in an
  ``inner_state`` field, such as ``optax.inject_hyperparams``). The result is
  ``guard.init(params)`` with the state of that optimizer replaced by
  ``inner_state``: the guard's own fields start as after ``init`` (no step
  skipped yet, an empty spike history), the optimizer continues exactly where
  ``inner_state`` left it. Use it to add a guard to a run restored from a
  checkpoint written without one; :func:`strip_guard_state` goes back.

  The place of ``inner_state`` is found by structure: going down the
  ``inner_state`` fields of ``guard.init(params)``, the first state with the
  tree structure, shapes and dtypes of ``inner_state``. A state that already
  has the structure of the whole guarded state is returned as it is. The
  optimizer's own ``init`` is never run on the parameters (only traced, for
  its structure), so no second copy of its state is made.

  Args:
    guard: the guarded optimizer.
    inner_state: the state of the optimizer that ``guard`` wraps (arrays:
      for a Flax NNX optimizer, ``nnx.as_pure(optimizer.opt_state)``).
    params: the parameters, or a tree of ``jax.ShapeDtypeStruct`` of their
      shapes and dtypes (only those are read); arrays, not Flax NNX
      variables (``nnx.as_pure(nnx.state(model, nnx.Param))``).
    step: for a :func:`skip_steps` level of ``guard``, the index of the next
      update call (for example the number of steps the restored run has
      made, so that its ranges count from the start of the run); None keeps
      0, counting from now.

  Returns:
    The state of ``guard``.

  Raises:
    ValueError: no state inside ``guard``'s state matches ``inner_state``, or
      ``step`` is given and ``guard`` adds no :func:`skip_steps` level.
    TypeError: ``params`` is not a tree of arrays, or ``params`` or
      ``inner_state`` holds variables (``nnx.Param``...) instead of arrays.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> params = jnp.zeros(3)
    >>> adam = optax.adam(1e-3)
    >>> adam_state = adam.init(params)  # e.g. restored from a checkpoint
    >>> guard = og.skip_on_spike(adam)
    >>> state = og.add_guard_state(guard, adam_state, params)
    >>> int(state.num_skipped), state.inner_state is adam_state
    (0, True)
    >>> og.strip_guard_state(state) is adam_state
    True
  """
  owner = "add_guard_state"
  guard = val.transformation(owner, "guard", guard)
  val.plain_tree(owner, "inner_state", inner_state)
  val.array_tree(owner, "params", params)
  abstract_params = jax.tree.map(_abstract, params)
  shapes = jax.eval_shape(guard.init, abstract_params)
  want = _signature(inner_state)
  depth, node = 0, shapes
  while _signature(node) != want:
    if not _has_inner_state(node):
      raise ValueError(
          f"{owner}(inner_state=...) does not match the state of the optimizer inside "
          f"guard: expected {jax.tree.structure(node)}, got {jax.tree.structure(inner_state)} "
          f"(or leaves of other shapes or dtypes); pass the state of the optimizer that "
          f"guard wraps"
      )
    depth, node = depth + 1, node.inner_state
  added = [_descend(shapes, d) for d in range(depth)]
  if step is not None:
    val.integer(owner, "step", step, minimum=0)
    if not val.is_jax(step):
      step = min(int(np.asarray(step)), INT32_MAX)  # the counter saturates there
    if not any(isinstance(level, SkipStepsState) for level in added):
      raise ValueError(
          f"{owner}(step=...) sets the counter of a skip_steps level, and guard adds none"
      )
  if depth == 0:
    return inner_state

  def fresh():
    # traced on stand-in zeros; the optimizer's init is dropped from the
    # outputs, so XLA computes neither
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params)
    state = _replace_at(guard.init(zeros), depth, None)
    if step is None:
      return state
    return _set_step(state, depth, jnp.asarray(step).astype(jnp.int32))

  return _replace_at(jax.jit(fresh)(), depth, inner_state)


def _set_step(state: Any, depth: int, step: jax.Array) -> Any:
  """Sets the counter of every :class:`SkipStepsState` of the first ``depth`` levels."""
  if depth == 0:
    return state
  inner = _set_step(state.inner_state, depth - 1, step)
  if isinstance(state, SkipStepsState):
    return state._replace(inner_state=inner, step=step)
  return state._replace(inner_state=inner)


def strip_guard_state(state: optax.OptState) -> optax.OptState:
  """The state of the optimizer inside the guards: the inverse of :func:`add_guard_state`.

  Removes every outer level of :func:`~optax_guard.skip_nonfinite`,
  :func:`~optax_guard.skip_on_spike` and :func:`skip_steps` state and returns
  the ``inner_state`` they wrap, unchanged: the state of the unguarded
  optimizer, for example to continue a run without the guards or to write a
  checkpoint that an unguarded script can restore. To remove only the
  outermost level, read ``state.inner_state``.

  Args:
    state: the state of a guard (outermost).

  Returns:
    The innermost ``inner_state``.

  Raises:
    TypeError: ``state`` is not the state of a guard.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.skip_steps(og.skip_nonfinite(optax.sgd(0.1)), [(5, 10)])
    >>> og.strip_guard_state(tx.init(jnp.zeros(2)))
    (EmptyState(), EmptyState())
  """
  if not _stats.is_guard_state(state):
    raise TypeError(
        f"strip_guard_state(state=...) must be the state of skip_nonfinite, skip_on_spike "
        f"or skip_steps (outermost), got {type(state).__name__}"
    )
  while _stats.is_guard_state(state):
    state = state.inner_state
  return state


def _seed(tracker: SpikeTracker, xs: jax.Array) -> SpikeTracker:
  """``tracker`` after recording every finite entry of ``xs`` in order.

  What recording them one step at a time would give: the history keeps the
  last ``window`` finite observations (old and new), newest last; the count
  grows by the number of finite ones (saturating); ``last`` is the last entry.
  """
  if xs.shape[0] == 0:
    return tracker
  window = tracker.history.shape[0]
  values = jnp.concatenate([tracker.history, xs])
  valid = jnp.concatenate([num.ring_valid(tracker.history, tracker.count), jnp.isfinite(xs)])
  rank = jnp.cumsum(valid.astype(jnp.int32))  # 1-based rank among the valid entries
  slot = window - 1 - (rank[-1] - rank)  # the newest valid entry goes to window - 1
  keep = valid & (slot >= 0)
  history = jnp.zeros_like(tracker.history).at[jnp.where(keep, slot, window)].set(
      values, mode="drop"
  )
  count = num.saturating_add(tracker.count, jnp.sum(jnp.isfinite(xs).astype(jnp.int32)))
  return tracker._replace(history=history, count=count, last=xs[-1])


def _spike_states(state: Any) -> list[SkipOnSpikeState]:
  """Every :class:`SkipOnSpikeState` in ``state``, those inside another's ``inner_state`` too."""
  is_spike = lambda x: isinstance(x, SkipOnSpikeState)
  found = []
  for node in jax.tree.leaves(state, is_leaf=is_spike):
    if is_spike(node):
      found += [node, *_spike_states(node.inner_state)]
  return found


def _one_spike_state(owner: str, state: Any) -> None:
  """Raises unless ``state`` holds exactly one :class:`SkipOnSpikeState`."""
  found = _spike_states(state)
  if len(found) == 1:
    return
  if isinstance(state, optax.GradientTransformation):
    hint = ": pass the optimizer state (tx.init(params) or a restored one), not the optimizer"
  elif found:
    hint = (" (a skip_on_spike inside another's inner_state counts too): seed the one you "
            "mean, e.g. state._replace(inner_state=seed_spike_history(state.inner_state, "
            "norms))")
  else:
    hint = ""
  raise ValueError(
      f"{owner}(state=...) must hold exactly one skip_on_spike state, found {len(found)}{hint}"
  )


def seed_spike_history(
    state: optax.OptState, norms: ArrayLike, *, values: ArrayLike | None = None
) -> optax.OptState:
  """Records logged norms (and losses) in the history of a :func:`~optax_guard.skip_on_spike`.

  A guard added to a running optimizer (:func:`add_guard_state`), or rebuilt
  after a restart from a checkpoint without its state, starts with an empty
  history and tests no spike before ``min_history`` steps. Seeding it with
  the global gradient norms the run logged (oldest first), for example
  ``guard_stats(...)["monitor/global_norm"]`` of a ``monitor()`` placed before
  the optimizer, or ``"skip_on_spike/norm/last"`` of an earlier guard, makes
  it test from its first step, against the level the run had reached.

  The result is what the guard would hold had it observed ``norms`` one step
  at a time: the finite entries are recorded in order (NaN and ``inf`` are
  not, as in the guard; a negative norm is a mistake and raises a
  ``ValueError`` when the norms are concrete), the history keeps the last ``window`` of them (after
  what it held before), the count grows by their number (saturating) and
  ``last`` is the last entry. The threshold a step was compared with is not
  recomputed (it is reported for logging only, and the next step sets it).
  Give the norms of the gradients the guard sees (raw, if it is outermost):
  norms logged after a clip would make the history too low. The counters
  and the inner state are unchanged. Works under ``jax.jit``.

  Args:
    state: an optimizer state holding exactly one
      :class:`~optax_guard.SkipOnSpikeState` (anywhere in the tree; a
      ``skip_on_spike`` nested in another's ``inner_state`` counts too).
    norms: 1-D array of global gradient norms, oldest first.
    values: optionally, a 1-D array of the losses passed as ``value=``,
      oldest first, for the history of ``value``.

  Returns:
    ``state`` with the histories of its :class:`~optax_guard.SkipOnSpikeState`
    extended.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.skip_on_spike(optax.sgd(0.1), window=4, min_history=2)
    >>> state = og.seed_spike_history(tx.init(jnp.zeros(1)), [1.0, jnp.nan, 1.2, 0.9])
    >>> state.norm.history, int(state.norm.count)
    (Array([0. , 1. , 1.2, 0.9], dtype=float32), 3)
    >>> u, state = tx.update(jnp.array([50.0]), state)  # tested at once: a spike
    >>> bool(state.last_skipped)
    True
  """
  owner = "seed_spike_history"
  _one_spike_state(owner, state)
  norms = val.observations(owner, "norms", norms, norms=True)
  seeded_values = None if values is None else val.observations(owner, "values", values)
  is_spike = lambda x: isinstance(x, SkipOnSpikeState)

  def seed(node):
    if not is_spike(node):
      return node
    value = node.value if seeded_values is None else _seed(node.value, seeded_values)
    return node._replace(norm=_seed(node.norm, norms), value=value)

  return jax.tree.map(seed, state, is_leaf=is_spike)
