"""Flax drop-ins that take the fused guarded step: ``Optimizer`` (NNX) and ``TrainState`` (linen).

``nnx.Optimizer.update`` and linen's ``TrainState.apply_gradients`` make the
two-line optax step (``tx.update``, then ``optax.apply_updates``). With a guard
(:func:`~optax_guard.skip_nonfinite`, :func:`~optax_guard.skip_on_spike`,
:func:`~optax_guard.skip_steps`) as the optimizer, the updates then leave the
guard's ``jax.lax.cond`` as a full update-sized buffer. The classes here are
the same classes with that one step replaced by
:func:`~optax_guard.update_and_apply`, which adds the updates to the
parameters inside the guard's ``cond``; for any other optimizer the result is
the one the Flax class gives. Keyword extras such as ``value=loss`` reach the
optimizer.

This is the only module of optax_guard that imports Flax; ``import
optax_guard`` does not import it, and Flax is not a dependency of the package.

A skipped step is skipped for the whole training state. BatchNorm statistics
and other non-parameter state are written by the forward pass, not by the
optimizer: in NNX inside ``nnx.value_and_grad``, before ``update`` runs; in
linen by ``apply(..., mutable=["batch_stats"])``, and then passed to
``apply_gradients``. With the Flax classes a skipped step leaves the
parameters and the optimizer state as they were, but the statistics of the
skipped batch are already taken in (a batch whose forward pass is non-finite
writes NaN into the running mean and variance). Here, when the outermost
guard skips the step, ``Optimizer`` puts the variables selected by
``keep_on_skip`` (``nnx.BatchStat`` by default) back to their values after
the last applied step, and ``TrainState.apply_gradients`` keeps the old value
of every field passed as a keyword (``batch_stats=``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.nnx.training.optimizer import to_opt_state
from flax.training import train_state

from optax_guard import _stats
from optax_guard._apply import update_and_apply
from optax_guard._guards.combinator import last_step_skipped

__all__ = ["Optimizer", "TrainState"]

M = TypeVar("M")


class Optimizer(nnx.Optimizer[M]):
  """``nnx.Optimizer`` whose ``update`` takes the fused step :func:`~optax_guard.update_and_apply`.

  Built as ``nnx.Optimizer`` is, ``Optimizer(model, tx, wrt=nnx.Param)``,
  with the same ``wrt`` filters and the same attributes (``step``, ``tx``,
  ``opt_state``, ``wrt``). Only :meth:`update` differs, and the one
  argument ``keep_on_skip``.

  **A skipped step is skipped for the whole model.** When the outermost
  guard of ``tx`` skips a step, the variables selected by ``keep_on_skip``
  (an NNX filter; ``nnx.BatchStat`` by default) are put back to their values
  after the last applied step: a NaN batch leaves the parameters *and* the
  BatchNorm running statistics as they were. The optimizer keeps a copy of
  those variables for this (for BatchNorm two floats per channel, small next
  to the parameters) in the attribute ``kept``, which a checkpoint of the
  optimizer holds too; on every step it costs one select over them. The
  default is ``nnx.BatchStat`` because skipping a step means, to a user,
  that the batch never happened. ``keep_on_skip=None`` keeps no copy and
  gives exactly ``nnx.Optimizer``'s state layout (a checkpoint of one then
  restores into the other). Without a guard in ``tx`` nothing is ever
  restored; with a guard that is not outermost (inside ``optax.chain`` or
  ``optax.MultiSteps``, where it skips only part of a step) ``update``
  raises ``ValueError`` unless ``keep_on_skip=None``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> from flax import nnx
    >>> import optax_guard.flax
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> tx = og.skip_nonfinite(optax.sgd(0.1))
    >>> optimizer = optax_guard.flax.Optimizer(model, tx, wrt=nnx.Param)
    >>> loss_fn = lambda model: jnp.mean(model(jnp.ones((4, 2))) ** 2)
    >>> loss, grads = nnx.value_and_grad(loss_fn)(model)
    >>> optimizer.update(model, grads, value=loss)
    >>> stats = og.guard_stats(optimizer.opt_state)
    >>> int(optimizer.step[...]), int(stats["skip_nonfinite/num_skipped"])
    (1, 0)
  """

  def __init__(
      self,
      model: M,
      tx: optax.GradientTransformation,
      *,
      wrt: Any,
      graph: bool | None = None,
      keep_on_skip: Any = nnx.BatchStat,
  ):
    """As ``nnx.Optimizer(model, tx, wrt=..., graph=...)``; ``keep_on_skip``: see above."""
    super().__init__(model, tx, wrt=wrt, graph=graph)
    self.keep_on_skip = keep_on_skip
    if keep_on_skip is not None:
      kept = jax.tree.map(jnp.copy, nnx.as_pure(nnx.state(model, keep_on_skip, graph=graph)))
      self.kept = nnx.data(to_opt_state(kept))

  def _restore_if_skipped(self, model: M, new_opt_state: Any) -> None:
    """Puts the ``keep_on_skip`` variables back when the step was skipped."""
    current = nnx.as_pure(nnx.state(model, self.keep_on_skip, graph=self.graph))
    if not jax.tree.leaves(current):
      return
    skipped = last_step_skipped(new_opt_state)
    if skipped is None:
      nodes = jax.tree.leaves(new_opt_state, is_leaf=_stats.is_guard_state)
      if any(_stats.is_guard_state(x) for x in nodes):
        raise ValueError(
            "Optimizer(keep_on_skip=...) needs the guard outermost in tx (a guard inside "
            "optax.chain or optax.MultiSteps skips only part of a step); put the guard "
            "outermost, or pass keep_on_skip=None"
        )
      return
    kept = nnx.as_pure(self.kept)
    restored = jax.tree.map(lambda old, new: jnp.where(skipped, old, new), kept, current)
    nnx.update(model, restored)
    nnx.update(self.kept, nnx.state(restored, graph=self.graph))

  def update(self, model: M, grads: Any, /, **kwargs: Any) -> None:
    """Updates the parameters of ``model`` and the optimizer state in one fused step.

    The same as ``nnx.Optimizer.update(model, grads, **kwargs)``: the
    variables of ``model`` selected by ``wrt`` are updated from ``grads``
    (for example from ``nnx.grad``), ``opt_state`` is updated and ``step``
    (the number of calls, skipped steps included) grows by one. The step is
    :func:`~optax_guard.update_and_apply`: with a guard outermost in ``tx``,
    the parameter update runs inside its ``jax.lax.cond``, and a skipped step
    leaves the parameters bitwise as they were. Works inside ``nnx.jit``,
    and under ``jax.jit`` on ``nnx.split`` states, with donation.

    Args:
      model: the model whose ``wrt`` variables are updated in place.
      grads: the gradients, with the structure of the ``wrt`` state of
        ``model`` (as ``nnx.grad`` returns them).
      **kwargs: keyword extras for ``tx.update``, such as ``value=loss`` for
        :func:`~optax_guard.skip_on_spike` or
        :func:`~optax_guard.reduce_on_plateau`.

    Returns:
      None. ``nnx.Optimizer.update`` returns the updates; the fused step never
      forms them (that is the buffer it saves).
    """
    param_arrays = nnx.as_pure(nnx.state(model, self.wrt, graph=self.graph))
    grad_arrays = nnx.as_pure(nnx.state(grads, self.wrt, graph=self.graph))
    opt_state_arrays = nnx.as_pure(self.opt_state)
    kwargs_arrays = nnx.as_pure(kwargs)
    new_params, new_opt_state = update_and_apply(
        self.tx, grad_arrays, opt_state_arrays, param_arrays, **kwargs_arrays
    )
    nnx.update(model, new_params)
    nnx.update(self.opt_state, nnx.state(new_opt_state, graph=self.graph))
    if self.keep_on_skip is not None:
      self._restore_if_skipped(model, new_opt_state)
    self.step[...] += 1


class TrainState(train_state.TrainState):
  """Linen ``TrainState`` whose ``apply_gradients`` takes the fused step and forwards extras.

  Created as ``flax.training.train_state.TrainState`` is,
  ``TrainState.create(apply_fn=..., params=..., tx=...)``, with the same
  fields; subclass it to add fields (``batch_stats``) as with the Flax class.
  Only :meth:`apply_gradients` differs.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_guard as og
    >>> import flax.linen as nn
    >>> from optax_guard.flax import TrainState
    >>> model = nn.Dense(1)
    >>> x = jnp.ones((4, 2))
    >>> state = TrainState.create(apply_fn=model.apply,
    ...                           params=model.init(jax.random.key(0), x)["params"],
    ...                           tx=og.skip_on_spike(optax.sgd(0.1)))
    >>> loss_fn = lambda p: jnp.mean(state.apply_fn({"params": p}, x) ** 2)
    >>> loss, grads = jax.value_and_grad(loss_fn)(state.params)
    >>> state = state.apply_gradients(grads=grads, value=loss)
    >>> int(state.step), int(state.opt_state.value.count)
    (1, 1)
  """

  def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
    """One fused step: ``step + 1``, new ``params`` and ``opt_state``.

    The result of ``flax.training.train_state.TrainState.apply_gradients``,
    with the step made by :func:`~optax_guard.update_and_apply` (with a guard
    outermost in ``tx``, the parameter update runs inside its
    ``jax.lax.cond``; a skipped step leaves ``params`` bitwise as they were,
    and ``step`` still counts it). A keyword that names a field of the state
    (``batch_stats`` of a subclass, say) replaces that field, as in Flax;
    every other keyword (``value=loss``) goes to ``tx.update``. When the
    outermost guard of ``tx`` skips the step, such fields keep their old
    values (the batch never happened: its BatchNorm statistics are not taken
    in); only ``step`` and the guard's counters move. Parameters under
    ``OVERWRITE_WITH_GRADIENT`` (fp8 scales) are handled as in Flax.

    Args:
      grads: gradients with the structure of ``params``.
      **kwargs: fields to replace, and keyword extras for the optimizer.

    Returns:
      The updated state.
    """
    fields = {f.name for f in dataclasses.fields(self)}
    replace = {k: v for k, v in kwargs.items() if k in fields}
    extra = {k: v for k, v in kwargs.items() if k not in fields}
    overwrite = OVERWRITE_WITH_GRADIENT in grads
    grads_with_opt = grads["params"] if overwrite else grads
    params_with_opt = self.params["params"] if overwrite else self.params
    new_params_with_opt, new_opt_state = update_and_apply(
        self.tx, grads_with_opt, self.opt_state, params_with_opt, **extra
    )
    if overwrite:
      new_params = {
          "params": new_params_with_opt,
          OVERWRITE_WITH_GRADIENT: grads[OVERWRITE_WITH_GRADIENT],
      }
    else:
      new_params = new_params_with_opt
    skipped = last_step_skipped(new_opt_state)
    if skipped is not None:  # the skipped batch never happened: old field values
      replace = {k: jax.tree.map(lambda old, new: jnp.where(skipped, old, new),
                                 getattr(self, k), v)
                 for k, v in replace.items()}
    return self.replace(
        step=self.step + 1, params=new_params, opt_state=new_opt_state, **replace
    )
