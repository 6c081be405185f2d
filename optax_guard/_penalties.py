"""L1 and L2 penalties added to the gradient, with Keras' conventions.

``add_l1_penalty(w)`` adds the gradient of ``w * sum(|p|)`` and
``add_l2_penalty(w)`` the gradient of ``w * sum(p**2)``, exactly as a Keras
``regularizers.L1(w)`` / ``regularizers.L2(w)`` term in the loss would. Put
them *before* the optimizer in ``optax.chain`` so that the penalty goes
through its preconditioning like any other gradient term (coupled weight
decay); for decoupled decay (AdamW) use ``optax.add_decayed_weights`` after
the optimizer's scaling instead.

Both are stateless and need ``params``. ``mask`` selects the leaves that get
the penalty, as in ``optax.masked``: a tree of bools with the structure of
the parameters (or a prefix of it), or a callable ``params -> such a tree``.

A zero weight (Keras ``L1(0.0)``) or a mask that selects no leaf switches
the penalty off: the updates come back bitwise unchanged. The weight is
tested elementwise (``where(weight != 0, g + term, g)``, fused into the one
pass over the leaf), so this holds for a traced weight under
``optax.inject_hyperparams`` too, and ``-0.0`` or ``inf`` updates or
parameters are not turned into ``+0.0`` or NaN by a ``0 * p`` term.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_guard import _validation as val

# A mask: a tree of bools with the structure of the params (or a prefix of
# it), or a callable that returns one from the params.
BoolTree = bool | Mapping[Any, "BoolTree"] | Sequence["BoolTree"]
Mask = BoolTree | Callable[[optax.Params], BoolTree]


def _penalty(
    owner: str,
    *,
    weight: ArrayLike,
    mask: Mask | None,
    term: Callable[[jax.Array, jax.Array], jax.Array],
) -> optax.GradientTransformation:
  val.non_negative(owner, "weight", weight, finite=True)
  val.mask(owner, mask)

  def update_fn(updates, state, params=None):
    val.params_and_updates(owner, updates, params)

    def leaf(path, g, p, on=True):
      if not on:
        return g
      g, p = jnp.asarray(g), jnp.asarray(p)
      if jnp.iscomplexobj(g) != jnp.iscomplexobj(p):
        raise TypeError(
            f"{owner}: the leaf {jax.tree_util.keystr(path) or '(root)'} has "
            f"{g.dtype} updates for {p.dtype} params; both must be real or both complex"
        )
      # float32 at least (float64 / complex for such leaves), cast back at the end
      wide = jnp.promote_types(jnp.promote_types(g.dtype, p.dtype), jnp.float32)
      w = jnp.asarray(weight).astype(wide)
      # weight 0 is the off switch: g itself (g + 0 * term could change bits)
      return jnp.where(w != 0, (g.astype(wide) + term(w, p.astype(wide))).astype(g.dtype), g)

    if mask is None:
      out = jax.tree.map_with_path(leaf, updates, params)
    else:
      on = val.expand_mask(owner, mask, params)
      out = jax.tree.map_with_path(leaf, updates, params, on)
    return out, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def add_l1_penalty(weight: ArrayLike, *, mask: Mask | None = None) -> optax.GradientTransformation:
  r"""Adds the gradient of an L1 penalty ``weight * sum(|p|)`` to the updates.

  .. math::
    g \leftarrow g + \lambda\, \mathrm{sign}(p)

  Keras ``regularizers.L1(l1=lambda)``. At ``p == 0`` the subgradient 0 is
  used (``sign(0) = 0``, as TensorFlow's gradient of ``abs``), so exact zeros
  are not pushed away from 0 (``jax.grad(jnp.abs)(0.)`` would give 1). The
  sum is computed in float32 (float64 for float64 leaves) and cast back to
  the update's dtype.

  Complex parameters get :math:`\lambda\, p / |p|` (0 at 0), the direction of
  steepest ascent of :math:`\lambda \sum |p|`, which is the convention of
  optax's optimizers and of ``optax.add_decayed_weights`` for complex
  parameters (the complex conjugate of what ``jax.grad`` returns for the
  penalty); the updates must then be complex too.

  Args:
    weight: ``lambda >= 0``, finite; 0 switches the penalty off (the updates
      come back bitwise unchanged).
    mask: None (every leaf), a tree of bools with the structure of the
      parameters (or a prefix of it), or a callable ``params -> tree of
      bools``; only leaves marked True get the penalty (none marked: the
      updates come back unchanged, as with ``optax.masked``). Under
      ``optax.inject_hyperparams`` a callable mask needs
      ``static_args=("mask",)`` (optax takes callables for schedules).

  Returns:
    An ``optax.GradientTransformation`` with ``optax.EmptyState``; its update
    raises ``ValueError`` when ``params`` is None.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.add_l1_penalty(0.1)
    >>> p = jnp.array([2.0, 0.0, -3.0])
    >>> tx.update(jnp.ones(3), tx.init(p), p)[0]
    Array([1.1, 1. , 0.9], dtype=float32)

  References:
    Tibshirani, 1996, *Regression shrinkage and selection via the lasso*,
    JRSS B 58(1). Keras, ``keras.regularizers.L1``,
    https://keras.io/api/layers/regularizers/
  """
  return _penalty("add_l1_penalty", weight=weight, mask=mask, term=lambda w, p: w * jnp.sign(p))


def add_l2_penalty(weight: ArrayLike, *, mask: Mask | None = None) -> optax.GradientTransformation:
  r"""Adds the gradient of an L2 penalty ``weight * sum(p**2)`` to the updates.

  .. math::
    g \leftarrow g + 2 \lambda\, p

  Keras ``regularizers.L2(l2=lambda)``: the penalty is ``lambda * sum(p**2)``
  with no ``1/2``, so its gradient carries a factor 2. Note that
  ``optax.add_decayed_weights(w)`` adds ``w * p`` (the gradient of
  ``w/2 * sum(p**2)``): ``add_l2_penalty(w)`` equals
  ``optax.add_decayed_weights(2 * w)`` placed at the same point of the chain.
  The sum is computed in float32 (float64 for float64 leaves) and cast back
  to the update's dtype. Complex parameters get :math:`2 \lambda p`, the
  steepest-ascent direction of :math:`\lambda \sum |p|^2` in optax's
  convention for complex parameters (``optax.add_decayed_weights`` adds
  :math:`w p` for them too), with complex updates.

  Args:
    weight: ``lambda >= 0``, finite; 0 switches the penalty off (the updates
      come back bitwise unchanged).
    mask: None, a tree of bools (or a prefix of one), or a callable
      ``params -> tree of bools``, as in :func:`add_l1_penalty`. Under
      ``optax.inject_hyperparams`` a callable mask needs
      ``static_args=("mask",)``.

  Returns:
    As :func:`add_l1_penalty`: an ``optax.GradientTransformation`` with
    ``optax.EmptyState``, whose update needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.add_l2_penalty(0.25)
    >>> p = jnp.array([2.0, -4.0])
    >>> tx.update(jnp.zeros(2), tx.init(p), p)[0]
    Array([ 1., -2.], dtype=float32)

  References:
    Krogh, Hertz, 1991, *A Simple Weight Decay Can Improve Generalization*,
    NeurIPS 4. Keras, ``keras.regularizers.L2``,
    https://keras.io/api/layers/regularizers/
  """
  return _penalty("add_l2_penalty", weight=weight, mask=mask, term=lambda w, p: 2.0 * w * p)
