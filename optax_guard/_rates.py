"""Learning rates from the gradient norm or from the parameters.

* :func:`scale_by_grad_norm` scales the updates by a function of the global
  gradient norm (``eta_t = g(||grad L_t||)``).
* :func:`scale_by_parameter` scales each leaf by a function of its parameter
  and update (``eta_{t,i} = h_i(theta_t)``, e.g. a LARS trust ratio).

Both scale by multiplying with one factor (see ``_numerics.scale_leaf``), so
every leaf keeps its dtype and shape. The rate from the loss is
:func:`optax_guard.reduce_on_plateau`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_guard import _numerics as num
from optax_guard import _validation as val

_FN_HINT = ("; under optax.inject_hyperparams pass static_args=('fn',) (callables are "
            "otherwise taken for schedules)")


def scale_by_grad_norm(
    fn: Callable[[jax.Array], ArrayLike], *, axis_name: val.AxisName = None
) -> optax.GradientTransformation:
  r"""Multiplies the updates by a function of their global norm.

  .. math::
    G \leftarrow G \cdot f(\lVert G\rVert), \qquad
    \lVert G\rVert = \Big(\sum_\ell \lVert g_\ell\rVert^2\Big)^{1/2}

  the learning rate as a function of the gradient norm,
  ``eta_t = f(||grad L_t||)``. The norm is accumulated in float32 (see
  ``_numerics.global_norm``) and ``f`` must be traceable (``jnp`` operations,
  no Python ``if`` on the norm) and return a scalar. Nothing is hidden: a NaN
  or infinite norm is passed to ``f`` as is. ``f(n) = min(1, c / n)`` is
  clipping by global norm; ``f(n) = 1 / (1 + n)`` is a smooth alternative.

  Under ``optax.inject_hyperparams`` pass ``static_args=("fn",)``: optax
  otherwise takes every callable argument for a schedule of the step count.

  Args:
    fn: scalar function of the float32 global norm.
    axis_name: the mapped axis over which the squares summed into the norm
      that ``fn`` receives are added up, when the devices hold different
      shards of the updates; see :ref:`design-collectives`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``optax.EmptyState``.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.scale_by_grad_norm(lambda n: 1.0 / (1.0 + n))
    >>> tx.update(jnp.array([3.0, 4.0]), tx.init(None))[0]
    Array([0.5      , 0.6666667], dtype=float32)

  References:
    Pascanu, Mikolov, Bengio, 2013, *On the difficulty of training recurrent
    neural networks* (norm-dependent step sizes), https://arxiv.org/abs/1211.5063
  """
  owner = "scale_by_grad_norm"
  val.callable_(owner, "fn", fn, hint=_FN_HINT)
  axis_name = val.axis_name(owner, axis_name)

  def update_fn(updates, state, params=None, **extra_args):
    del params
    val.float_leaves(owner, updates)
    shared = extra_args.get(num.SHARED_NORM)
    factor = jnp.asarray(fn(num.global_norm(updates, None, axis_name, shared)))
    val.scalar_result(owner, "fn", factor)
    return num.scale_tree(updates, factor), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def scale_by_parameter(
    fn: Callable[[jax.Array, jax.Array], ArrayLike],
) -> optax.GradientTransformation:
  r"""Multiplies each leaf of the updates by a function of its parameter.

  .. math::
    u_\ell \leftarrow u_\ell \cdot h(p_\ell, u_\ell)

  a per-parameter learning rate ``eta_{t,i} = h_i(theta_t)``. ``h`` receives
  the parameter leaf and the update leaf (in their own dtypes) and returns a
  scalar or an array that broadcasts to the leaf's shape (a per-unit factor).
  For instance the LARS trust ratio
  ``h(p, u) = eta * ||p|| / (||u|| + wd * ||p||)``. The product is computed
  in the factor's precision and cast back to the leaf's dtype.

  Under ``optax.inject_hyperparams`` pass ``static_args=("fn",)``.

  Args:
    fn: ``(param_leaf, update_leaf) -> factor``, traceable.

  Returns:
    An ``optax.GradientTransformation`` with ``optax.EmptyState``; its update
    raises ``ValueError`` when ``params`` is None.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.scale_by_parameter(lambda p, u: jnp.abs(p))
    >>> p = jnp.array([0.5, 2.0])
    >>> tx.update(jnp.array([1.0, 1.0]), tx.init(p), p)[0]
    Array([0.5, 2. ], dtype=float32)

  References:
    You, Gitman, Ginsburg, 2017, *Large Batch Training of Convolutional
    Networks* (LARS), https://arxiv.org/abs/1708.03888
  """
  owner = "scale_by_parameter"
  val.callable_(owner, "fn", fn, hint=_FN_HINT)

  def update_fn(updates, state, params=None):
    val.matching_params(owner, updates, params)
    val.float_leaves(owner, updates)

    def leaf(u, p):
      u = jnp.asarray(u)
      factor = jnp.asarray(fn(p, u))
      val.broadcasts_to(owner, "fn", factor, u.shape)
      return num.scale_leaf(u, factor)

    return jax.tree.map(leaf, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
