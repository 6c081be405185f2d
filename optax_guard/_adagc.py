"""AdaGC: per-tensor clipping against each tensor's own history of norms.

:func:`adagc` bounds each tensor's gradient norm by a multiple of an
exponential moving average of that tensor's past (clipped) norms, after a
warm-up that clips the global norm at a fixed bound. A spike confined to one
tensor is cut in that tensor alone: every other tensor is multiplied by
exactly 1 and comes back bitwise unchanged, where a global clip would have
shrunk all of them.

Norms accumulate in float32, the per-tensor sums of squares of all tensors
are combined across devices with one ``psum``, and each tensor is scaled by
one factor, ``1`` where its norm is at or under its bound (decided by that
comparison; see ``_numerics.safe_factor``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from optax_guard import _numerics as num
from optax_guard import _stats
from optax_guard import _validation as val


@_stats.declare("adagc", ("count", "gamma", "norm", "num_clipped", "total_clipped"))
class AdagcState(NamedTuple):
  """State of :func:`adagc`.

  Attributes:
    count: int32, the number of steps whose norms were all finite
      (saturating); the warm-up lasts while ``count < warmup_steps``.
    gamma: a tree like the params of float32 per-tensor statistics: the
      minimum of the clipped norms during the warm-up, their EMA after it.
      A leaf with ``stacked`` layer axes holds one value per layer (shape
      ``leaf.shape[:layers]``), others a scalar. 0 until the tensor's first
      finite nonzero norm.
    norm: float32, the global norm of this step's incoming updates.
    num_clipped: int32, how many tensors (layer slices count one each) were
      scaled down this step.
    total_clipped: int32, the sum of ``num_clipped`` over every step so far
      (saturating at ``2**31 - 1``): a logger that reads the state every N
      steps sees every clip in its difference.
  """

  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  gamma: optax.Updates
  norm: jax.Array
  num_clipped: jax.Array
  total_clipped: jax.Array


def _factors(
    norm: jax.Array, gamma: jax.Array, *, warm: jax.Array, finite: jax.Array,
    h_abs: jax.Array, rel: jax.Array, b: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Every tensor's factor and new ``gamma``, on the vectors of all tensors at once."""
  f32 = jnp.float32
  seen = gamma > 0
  bound = rel * gamma
  h_rel = jnp.where(seen, num.safe_factor(bound, norm), jnp.ones((), f32))
  factor = jnp.where(warm, h_abs, h_rel)
  # the clipped norm, recorded when finite and nonzero
  clipped = jnp.where(warm, h_abs * norm, jnp.where(seen, jnp.minimum(norm, bound), norm))
  record = jnp.isfinite(norm) & jnp.isfinite(clipped) & (clipped > 0) & (
      finite | jnp.logical_not(warm))
  during = jnp.where(seen, jnp.minimum(gamma, clipped), clipped)
  after = jnp.where(seen, b * gamma + (1 - b) * clipped, clipped)
  new = jnp.where(record, jnp.where(warm, during, after), gamma)
  return factor, new.astype(f32)


def _split(pred, factor, gamma, factor_shapes, gamma_shapes):
  """Each tensor's factor and ``gamma``, cut out of the vectors of all tensors.

  The two vectors are the columns of one array, cut by
  ``_numerics.split_rows`` (whose compile time does not grow with the
  number of tensors) into one buffer per tensor: each tensor's arithmetic
  then reads its own small buffer and compiles to the same kernel for every
  tensor of a shape, where a slice at each tensor's offset would make every
  tensor's kernel distinct, and the vector arithmetic copied into each
  tensor's fusion would make the program quadratic in the number of tensors.
  """
  sizes = [math.prod(s) for s in gamma_shapes]
  pieces = num.split_rows(pred, jnp.stack([factor, gamma], axis=1), sizes)
  return ([p[:, 0].reshape(s) for p, s in zip(pieces, factor_shapes, strict=True)],
          [p[:, 1].reshape(s) for p, s in zip(pieces, gamma_shapes, strict=True)])


def adagc(
    *,
    lambda_abs: ArrayLike = 1.0,
    lambda_rel: ArrayLike = 1.05,
    beta: ArrayLike = 0.98,
    warmup_steps: ArrayLike = 100,
    stacked: val.Stacked = None,
    axis_name: val.AxisName = None,
) -> optax.GradientTransformation:
  r"""AdaGC: clip each tensor relative to an EMA of its own clipped norms.

  For each tensor :math:`i` (each layer slice of a ``stacked`` leaf), after
  the warm-up:

  .. math::
    h_{i} = \min\!\left(1, \frac{\lambda_{rel}\,\gamma_{i,t-1}}
      {\lVert g_{i,t}\rVert}\right), \qquad
    g_{i,t} \leftarrow h_i\, g_{i,t}, \qquad
    \gamma_{i,t} = \beta\,\gamma_{i,t-1} + (1 - \beta)\,\lVert g_{i,t}\rVert
    \ \text{(the clipped norm)}.

  During the warm-up (the first ``warmup_steps`` steps with finite norms)
  the whole tree is clipped at the global norm ``lambda_abs``, and
  :math:`\gamma_i` is seeded with the first clipped norm of the tensor, then
  follows the minimum of its clipped norms. Put it first in the chain, before
  any optimizer: ``optax.chain(og.adagc(), optax.adamw(lr))``.

  A tensor at or under its bound is multiplied by exactly 1, so a spike in
  one tensor leaves every other tensor bitwise unchanged; a global clip
  (:func:`optax_guard.clip_by_global_norm`) would shrink all of them.

  Non-finite values are not hidden: a tensor with a NaN norm becomes NaN
  (the others are clipped as usual), one with an infinite norm gets factor
  0; during the warm-up a non-finite global norm does so to every tensor.
  Non-finite norms never enter :math:`\gamma`, and a warm-up step with one
  does not count. Use :func:`optax_guard.skip_nonfinite` to skip such steps.

  Follows Algorithm 1 of Wang et al. (2025): the warm-up clip at
  ``lambda_abs``, the seeding and running minimum of :math:`\gamma` during
  it, the relative clip and the EMA of the clipped norm after it, and the
  defaults (:math:`\lambda_{abs}=1`, :math:`\lambda_{rel}=1.05`,
  :math:`\beta=0.98`, :math:`T_{start}=100`). Differs: it is a clipping
  transformation for any optimizer (the paper's algorithm and the
  ``pytorch_optimizer`` implementation fuse it into AdamW);
  ``warmup_steps`` counts the warm-up steps (the paper's :math:`t <
  T_{start}` with :math:`t` from 1 is ``warmup_steps = T_start - 1``); the
  clipped norm is :math:`\min(\lVert g\rVert, \lambda_{rel}\gamma)`, not a
  second pass over the clipped tensor; no ``eps`` is added to the norm (the
  comparison decides); a zero norm never enters :math:`\gamma` and a tensor
  whose :math:`\gamma` is still 0 is not clipped and starts its history at
  its first nonzero norm (in the paper one step without gradient during the
  warm-up, such as an unrouted expert's, sets :math:`\gamma = 0`, after
  which that tensor's gradients are clipped to 0 for good, and steps
  without gradient after the warm-up decay :math:`\gamma` towards 0).

  Args:
    lambda_abs: ``> 0``, the global-norm bound of the warm-up (``inf``: the
      warm-up only records the norms).
    lambda_rel: ``>= 1``, the allowed ratio of a tensor's norm to its
      :math:`\gamma` (below 1 every threshold would shrink to 0; ``inf``
      switches the clipping after the warm-up off).
    beta: EMA decay in ``[0, 1]``.
    warmup_steps: ``>= 0`` warm-up steps (0: per-tensor clipping from the
      start, each :math:`\gamma` seeded unclipped).
    stacked: leading layer axes of each leaf (None, an int, a prefix tree of
      ints or a callable ``(path, leaf) -> int``); see :ref:`design-stacked`.
      Each layer slice is a tensor with its own :math:`\gamma`.
    axis_name: the mapped axis to ``psum`` the per-tensor sums of squares
      over when the devices hold different shards of the updates; see
      :ref:`design-collectives`.

  Returns:
    An ``optax.GradientTransformation`` with :class:`AdagcState`.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.adagc(warmup_steps=1)
    >>> g = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([0.6, 0.8])}
    >>> state = tx.init(g)
    >>> _, state = tx.update(g, state)  # warm-up: global norm 1.118 clipped to 1
    >>> state.gamma  # the clipped norms of the tensors
    {'a': Array(0.4472, dtype=float32), 'b': Array(0.8944, dtype=float32)}
    >>> spike = {"a": jnp.array([30.0, 40.0]), "b": jnp.array([0.3, 0.4])}
    >>> out, state = tx.update(spike, state)  # "a" is cut to norm 1.05 * 0.4472
    >>> float(jnp.linalg.norm(out["a"])), bool((out["b"] == spike["b"]).all())
    (0.4696, True)

  References:
    Wang, Li, Chen, Zeng, Yang, Sun, Ma, Yu, Shen, 2025, *AdaGC: Improving
    Training Stability for Large Language Model Pretraining*,
    https://arxiv.org/abs/2502.11034
  """
  owner = "adagc"
  val.positive(owner, "lambda_abs", lambda_abs)
  val.in_range(owner, "lambda_rel", lambda_rel, 1.0, math.inf,
               why=" (below 1 every tensor's threshold shrinks geometrically to 0 and "
               "training stops)")
  val.in_range(owner, "beta", beta, 0.0, 1.0)
  warmup_steps = val.whole(owner, "warmup_steps", warmup_steps, minimum=0)
  stacked = val.stacked(owner, stacked)
  axis_name = val.axis_name(owner, axis_name)

  def init_fn(params):
    gamma = num.map_tensors(
        owner, stacked, lambda path, lead, x: jnp.zeros(np.shape(x)[:lead], jnp.float32), params
    )
    return AdagcState(
        count=jnp.zeros((), jnp.int32), gamma=gamma, norm=jnp.zeros((), jnp.float32),
        num_clipped=jnp.zeros((), jnp.int32), total_clipped=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None):
    del params
    val.float_leaves(owner, updates)
    f32 = jnp.float32
    leads = num.stacked_counts(owner, updates, stacked)
    leaves, treedef = jax.tree.flatten(updates)
    partials = num.tensor_partials(leaves, leads)
    partials = num.cross_device(partials, 2, axis_name)  # one collective for all tensors
    # every tensor's partial in one vector: one sum and one square root for all
    squares = num.concat_flat(partials)
    total = jnp.sum(squares)
    gnorm = num.finish_norm(total).astype(f32)
    finite = jnp.isfinite(total)
    warm = state.count < jnp.asarray(warmup_steps, jnp.int32)
    h_abs = num.safe_factor(lambda_abs, gnorm)
    rel, b = jnp.asarray(lambda_rel, f32), jnp.asarray(beta, f32)

    gamma_leaves = jax.tree.leaves(state.gamma)
    norms = num.finish_norm(squares).astype(f32)
    factor, gamma = _factors(norms, num.concat_flat(gamma_leaves, f32), warm=warm,
                             finite=finite, h_abs=h_abs, rel=rel, b=b)
    num_clipped = jnp.sum((factor < 1) & (norms > 0), dtype=jnp.int32)
    factors, gammas = _split(warm, factor, gamma, [p.shape for p in partials],
                             [g.shape for g in gamma_leaves])
    out = [num.scale_leaf(x, f) for x, f in zip(leaves, factors, strict=True)]

    count = jnp.where(finite, optax.safe_increment(state.count), state.count)
    return jax.tree.unflatten(treedef, out), AdagcState(
        count=count, gamma=jax.tree.unflatten(jax.tree.structure(state.gamma), list(gammas)),
        norm=gnorm, num_clipped=num_clipped,
        total_clipped=num.saturating_add(state.total_clipped, num_clipped),
    )

  return optax.GradientTransformation(init_fn, update_fn)
