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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_guard import _numerics as num
from optax_guard import _validation as val

Mask = Any | Callable[[optax.Params], Any]


def _expand_mask(mask: Mask, params: Any) -> Any:
  """The mask as a full tree of Python bools matching ``params``."""
  tree = mask(params) if callable(mask) else mask
  return jax.tree_util.tree_map(
      lambda m, sub: jax.tree_util.tree_map(lambda _: bool(m), sub), tree, params
  )


def _penalty(
    fn: str,
    weight: ArrayLike,
    mask: Mask | None,
    term: Callable[[jax.Array, jax.Array], jax.Array],
) -> optax.GradientTransformation:
  val.non_negative(fn, "weight", weight, finite=True)

  def update_fn(updates, state, params=None):
    val.needs_params(fn, params)

    def leaf(g, p, on=True):
      if not on:
        return g
      g = jnp.asarray(g)
      wide = jnp.promote_types(num.accumulation_dtype(g.dtype), num.accumulation_dtype(
          jnp.asarray(p).dtype))
      w = jnp.asarray(weight).astype(wide)
      return (g.astype(wide) + term(w, jnp.asarray(p).astype(wide))).astype(g.dtype)

    if mask is None:
      out = jax.tree_util.tree_map(leaf, updates, params)
    else:
      out = jax.tree_util.tree_map(leaf, updates, params, _expand_mask(mask, params))
    return out, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def add_l1_penalty(weight: ArrayLike, *, mask: Mask | None = None) -> optax.GradientTransformation:
  r"""Adds the gradient of an L1 penalty ``weight * sum(|p|)`` to the updates.

  .. math::
    g \leftarrow g + \lambda\, \mathrm{sign}(p)

  Keras ``regularizers.L1(l1=lambda)``. At ``p == 0`` the subgradient 0 is
  used (``sign(0) = 0``, as TensorFlow's gradient of ``abs``), so exact zeros
  are not pushed away from 0 (``jax.grad(jnp.abs)(0.)`` would give 1). The
  sum is computed in float32 (float64 for float64 leaves) and cast back to
  the update's dtype.

  Args:
    weight: ``lambda >= 0``.
    mask: None (every leaf), a tree of bools with the structure of the
      parameters (or a prefix of it), or a callable ``params -> tree of
      bools``; only leaves marked True get the penalty. Under
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
  return _penalty("add_l1_penalty", weight, mask, lambda w, p: w * jnp.sign(p))


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
  to the update's dtype.

  Args:
    weight: ``lambda >= 0``.
    mask: None, a tree of bools (or a prefix of one), or a callable
      ``params -> tree of bools``, as in :func:`add_l1_penalty`. Under
      ``optax.inject_hyperparams`` a callable mask needs
      ``static_args=("mask",)``.

  Returns:
    An ``optax.GradientTransformation`` with ``optax.EmptyState``; its update
    raises ``ValueError`` when ``params`` is None.

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
  return _penalty("add_l2_penalty", weight, mask, lambda w, p: 2.0 * w * p)
