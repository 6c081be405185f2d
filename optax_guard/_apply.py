"""A fused update-and-apply step, so that a guard's skip costs no extra buffer.

``optax`` splits a training step in two: ``tx.update`` returns the updates and
``optax.apply_updates`` adds them to the parameters. For an ordinary optimizer
XLA fuses the two into one pass over the parameters. For a guard
(:func:`~optax_guard.skip_nonfinite`, :func:`~optax_guard.skip_on_spike`) it
cannot: the updates are the output of a ``jax.lax.cond``, and XLA does not fuse
across a conditional, so the updates leave the conditional as a full
update-sized buffer that ``apply_updates`` then reads again.
:func:`update_and_apply` moves the parameter update *into* the guard's
``lax.cond`` instead; the skip branch returns the parameters as they are.

How a guard is recognised: its ``update`` function carries the fused step
as a method, ``tx.update.update_and_apply(grads, opt_state, params,
**extra)`` (the guards' update functions are
:class:`~optax_guard._guards.combinator.GuardUpdate` objects). The guard
itself stays an ordinary ``optax.GradientTransformationExtraArgs``
(``optax.chain``, ``MultiSteps``, ``inject_hyperparams`` and Flax's
``nnx.Optimizer`` see nothing new); nothing is registered anywhere.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import optax

from optax_guard import _validation as val


@runtime_checkable
class FusedUpdate(Protocol):
  """An update function that also offers a fused update-and-apply step.

  ``update_and_apply(grads, opt_state, params, **extra)`` must return what
  the update function followed by ``optax.apply_updates`` returns.
  """

  def __call__(self, updates: Any, state: Any, params: Any = None, **extra: Any) -> Any: ...

  def update_and_apply(self, grads: Any, opt_state: Any, params: Any, **extra: Any) -> Any: ...


def update_and_apply(
    tx: optax.GradientTransformation,
    grads: optax.Updates,
    opt_state: optax.OptState,
    params: optax.Params,
    **extra: Any,
) -> tuple[optax.Params, optax.OptState]:
  r"""One optimizer step: ``tx.update`` and ``optax.apply_updates`` in one call.

  .. math::
    (u, s') = \mathrm{tx.update}(g, s, \theta, \ldots),\qquad
    \theta' = \theta + u,\qquad \text{returns } (\theta', s')

  For any ``tx`` the result is that of

  .. code-block:: python

    updates, new_opt_state = tx.update(grads, opt_state, params, **extra)
    new_params = optax.apply_updates(params, updates)

  When ``tx`` *is* a guard (:func:`~optax_guard.skip_nonfinite` or
  :func:`~optax_guard.skip_on_spike`, outermost), the parameter update runs
  inside the guard's ``jax.lax.cond``: the apply branch runs the inner
  ``update`` and adds its updates to the parameters; the skip branch returns
  the parameters and the inner state untouched (bitwise, where the unfused
  step returns ``params + 0``, which differs only for ``-0.0`` entries). A
  jitted step with the parameters and the optimizer state donated then keeps
  no update-sized temporary, and the guard costs only its norm pass.

  Choices:

  * **Fallback.** Any other ``tx`` takes the unfused path above, with the
    same result. That includes a guard that is not outermost (for example
    ``optax.chain(og.monitor(), guard)``, or a guard under
    ``optax.inject_hyperparams`` or ``optax.MultiSteps``): ``optax.chain``
    does not expose its members, so the guard cannot be found inside it.
    Put the guard outermost (``guard(chain(og.monitor(), ...))``) to get the
    fused step.
  * **Extras.** ``**extra`` (such as ``value=loss``) is passed to
    ``tx.update``; a plain ``optax.GradientTransformation`` ignores it, as it
    does inside ``optax.chain`` (``optax.with_extra_args_support``).
  * **Results** equal the unfused step's up to float rounding (XLA may fuse
    the addition with the optimizer's arithmetic in a different order);
    integer and bool state (counters, the skip flag) is identical.
  * Works under ``jax.jit``, ``jax.vmap``, ``jax.pmap`` and ``shard_map``
    (with the guard's ``axis_name``, as for ``tx.update``). Under ``vmap`` with
    a decision that varies along the mapped axis the ``cond`` becomes a
    select over both branches: same results, no memory saving.

  Args:
    tx: any optax transformation (usually the whole optimizer).
    grads: the gradients (the updates ``tx.update`` receives).
    opt_state: ``tx``'s state.
    params: the current parameters (required: they are updated).
    **extra: keyword extras for ``tx.update``, such as ``value=``.

  Returns:
    ``(new_params, new_opt_state)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.skip_nonfinite(optax.sgd(0.1))
    >>> params = jnp.array([1.0, 2.0])
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda g, s, p: og.update_and_apply(tx, g, s, p))
    >>> params, state = step(jnp.array([1.0, 1.0]), state, params)
    >>> params
    Array([0.9, 1.9], dtype=float32)
    >>> params, state = step(jnp.array([jnp.nan, 1.0]), state, params)
    >>> params, int(state.num_skipped)
    (Array([0.9, 1.9], dtype=float32), 1)

  References:
    The optax step it fuses: ``optax.apply_updates``
    (https://optax.readthedocs.io/en/latest/api/apply_updates.html); buffer
    donation: https://docs.jax.dev/en/latest/buffer_donation.html
  """
  tx = val.transformation("update_and_apply", "tx", tx)
  if params is None:
    raise ValueError(
        "update_and_apply(params=...) must be the current parameters, got None"
    )
  if isinstance(tx.update, FusedUpdate):
    return tx.update.update_and_apply(grads, opt_state, params, **extra)
  updates, new_opt_state = tx.update(grads, opt_state, params, **extra)
  return optax.apply_updates(params, updates), new_opt_state
