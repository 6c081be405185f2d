"""The guard combinator: one way to skip a step, for every guard.

A guard wraps an inner transformation (usually the whole optimizer). Each step
it takes one decision from a few scalars and then runs either
``inner.update`` or nothing, through ``jax.lax.cond``:

* a skipped step returns zero updates (``jnp.zeros`` of the inner's output
  shapes and dtypes, so ``optax.apply_updates`` leaves the parameters bitwise
  unchanged) and the inner state *untouched* (Adam's moments and step count do
  not see the bad gradient);
* the state is never selected with ``jnp.where`` (that reads and writes the
  whole optimizer state every step) and nothing is multiplied by 0 (``0 * NaN``
  is NaN).

:func:`guard` builds a guard from three pieces: the state type (its first
field is ``inner_state``), the initial values of the guard's own fields, and
a *decision function* ``decide(updates, state, extra) -> Decision``. The
update function it returns, :class:`GuardUpdate`, also carries the fused
step (:meth:`GuardUpdate.update_and_apply`), which
:func:`~optax_guard.update_and_apply` finds on ``tx.update``. A decision may
carry the sum of squares it measured (:class:`~optax_guard._numerics.SharedNorm`);
the guard hands it to ``inner`` as the keyword extra ``shared_norm=``, so an
inner ``clip_by_global_norm`` of the same updates does not read them again.

Under ``jax.vmap`` with a decision that differs across the mapped axis,
``lax.cond`` becomes a select over both branches: ``inner.update`` runs on
every step and the inner state is selected elementwise. The results are the
same, but the step costs what a ``jnp.where`` over the whole state costs.
Under ``jit``, ``pmap`` and ``shard_map`` the decision is one scalar and the
branch is a real one.

Counters are int32 and saturate at ``2**31 - 1`` (``optax.safe_increment``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_guard import _apply, _stats
from optax_guard import _numerics as num
from optax_guard import _validation as val


class Decision(NamedTuple):
  """What a guard's decision function returns.

  Attributes:
    skip: bool scalar, whether to skip this step (the same on every device).
    fields: the guard's own new state fields, in the state's order after
      ``inner_state``.
    shared: the sum of squares of the updates handed to ``inner`` that the
      decision measured (None if it measured none).
    updates: when ``inner`` is not to receive the incoming updates, a
      function of no arguments returning what it receives instead (a
      loss-scale guard unscales them). It runs inside the apply branch, so
      the new updates fuse into the inner step and no update-sized buffer
      is formed before the ``cond``. None hands the incoming updates on.
  """

  skip: jax.Array
  fields: tuple
  shared: num.SharedNorm | None = None
  updates: Callable[[], optax.Updates] | None = None


# decide(updates, state, extra) -> Decision
DecideFn = Callable[[optax.Updates, Any, dict[str, Any]], Decision]


def like(x: jax.Array, spec: Any) -> jax.Array:
  """``x`` with the dtype and the ``shard_map`` varying axes of ``spec``.

  The values are unchanged: the cast only reconciles weak types, and the
  ``pcast`` only marks a replicated value as device-varying, as the other
  branch of the ``cond`` produces it.
  """
  x = jnp.asarray(x, spec.dtype)
  missing = num.varying_axes(spec) - num.varying_axes(x)
  if missing:
    x = jax.lax.pcast(x, tuple(sorted(missing)), to="varying")
  return x


def _apply_unless(skip: jax.Array, apply: Callable[[], Any], kept: Callable[[Any], Any]) -> Any:
  """``lax.cond(not skip, apply, kept(shapes of apply's result))``.

  ``kept`` receives the abstract result of ``apply`` (to match its dtypes
  and varying axes) and returns what a skipped step gives. The apply branch
  is the *true* branch on purpose: with the branches the other way round,
  XLA:CPU (jax 0.10) keeps full-size copies of the inner state next to the
  donated buffers (3x the gradient bytes of temporaries for ``chain(clip,
  adam)`` instead of 1x, and about twice the step time).
  """
  out = jax.eval_shape(apply)
  return jax.lax.cond(jnp.logical_not(skip), apply, lambda: kept(out))


class GuardUpdate:
  """The update function of a guard, and its fused update-and-apply step.

  Called as an optax update function, ``(updates, state, params=None,
  **extra) -> (updates, state)``. :meth:`update_and_apply` is the fused
  step that :func:`~optax_guard.update_and_apply` runs when the guard is
  outermost.
  """

  def __init__(self, inner: optax.GradientTransformationExtraArgs, state_type: type,
               decide: DecideFn):
    self.inner = inner
    self.state_type = state_type
    self.decide = decide

  def _decision(
      self, updates: Any, state: Any, extra: dict[str, Any]
  ) -> tuple[Decision, Callable[[], Any], dict[str, Any]]:
    """``(decision, updates for inner, extras for inner)``.

    The updates for ``inner`` are a function of no arguments, called inside
    the apply branch.
    """
    decision = self.decide(updates, state, extra)
    if decision.shared is not None:
      extra = {**extra, num.SHARED_NORM: decision.shared}
    handed = decision.updates if decision.updates is not None else lambda: updates
    return decision, handed, extra

  def __call__(self, updates, state, params=None, **extra):
    decision, handed, extra = self._decision(updates, state, extra)

    def apply():
      return self.inner.update(handed(), state.inner_state, params, **extra)

    def kept(out):
      out_updates, out_state = out
      zeros = jax.tree.map(lambda s: like(jnp.zeros(s.shape, s.dtype), s), out_updates)
      return zeros, jax.tree.map(like, state.inner_state, out_state)

    new_updates, inner_state = _apply_unless(decision.skip, apply, kept)
    return new_updates, self.state_type(inner_state, *decision.fields)

  def update_and_apply(self, grads, state, params, **extra):
    """``(new_params, new_state)``: the parameter update inside the ``cond``.

    The apply branch runs the inner step and adds its updates to ``params``
    (through :func:`~optax_guard.update_and_apply`, so a guard inside applies
    within its own ``cond`` too) and XLA fuses the addition into the inner
    update: no update-sized buffer crosses the conditional. The skip branch
    returns ``params`` and the inner state as they are.
    """
    decision, handed, extra = self._decision(grads, state, extra)

    def apply():
      return _apply.update_and_apply(self.inner, handed(), state.inner_state, params, **extra)

    def kept(out):
      out_params, out_state = out
      kept_params = jax.tree.map(like, params, out_params)
      return kept_params, jax.tree.map(like, state.inner_state, out_state)

    new_params, inner_state = _apply_unless(decision.skip, apply, kept)
    return new_params, self.state_type(inner_state, *decision.fields)


def guard(
    owner: str,
    inner: Any,
    *,
    state_type: type,
    init: Callable[[optax.Params], tuple],
    decide: DecideFn,
) -> optax.GradientTransformationExtraArgs:
  """A guard around ``inner``: ``init`` and a :class:`GuardUpdate`.

  Args:
    owner: the public factory's name, for error messages.
    inner: the transformation to guard (checked here).
    state_type: the guard's state, a ``NamedTuple`` whose first field is
      ``inner_state`` and which declares its statistics
      (``_stats.declare(..., guard=True)``).
    init: ``params -> fields``, the initial values of the guard's own fields.
    decide: the decision function (see :class:`Decision`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; keyword extras reach
    ``inner``.
  """
  inner = val.transformation(owner, "inner", inner)

  def init_fn(params):
    return state_type(inner.init(params), *init(params))

  return optax.GradientTransformationExtraArgs(init_fn, GuardUpdate(inner, state_type, decide))


def zero_counters() -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(num_skipped, consecutive_skipped, last_skipped)`` after ``init``."""
  # one array per field: a state whose fields share a buffer cannot be
  # donated to a jitted step ("donate the same buffer twice")
  return jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.bool_)


def counters(state: Any, skip: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The new ``(num_skipped, consecutive_skipped, last_skipped)``."""
  num_skipped = jnp.where(skip, optax.safe_increment(state.num_skipped), state.num_skipped)
  consecutive = jnp.where(
      skip, optax.safe_increment(state.consecutive_skipped), jnp.zeros((), jnp.int32)
  )
  return num_skipped, consecutive, jnp.asarray(skip, jnp.bool_)


def last_step_skipped(opt_state: Any) -> jax.Array | None:
  """Whether the step that produced ``opt_state`` was skipped by an outermost guard.

  Follows the guard levels from the outside in (through
  ``optax.inject_hyperparams`` states too): the step was skipped when any of
  them skipped it. An inner guard's flag is stale after an outer guard
  skipped, but the outer flag already decides then. None when
  ``opt_state`` does not start with a guard (a guard inside ``optax.chain``
  or ``optax.MultiSteps`` skips only part of the step).
  """
  flags = []
  node = opt_state
  while True:
    if _stats.is_guard_state(node):
      flags.append(jnp.asarray(node.last_skipped, jnp.bool_))
    elif not isinstance(node, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)):
      break
    node = node.inner_state
  if not flags:
    return None
  skipped = flags[0]
  for flag in flags[1:]:
    skipped = skipped | flag
  return skipped
