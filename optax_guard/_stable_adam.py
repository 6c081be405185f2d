"""StableAdamW: Adam with each tensor's rate cut by ``max(1, RMS)``.

:func:`scale_by_stable_adam` and :func:`stable_adamw` (Wortsman et al. 2023)
lower each tensor's learning rate by ``max(1, RMS)``, where ``RMS`` is the
root mean square of ``g / sqrt(v_hat)`` (Adafactor's update clipping, applied
tensor-wise to the rate). The Adam step is the one SPAM shares
(``_adam_pieces``), so where no rate is cut the updates are bitwise those of
``optax.adamw``. Whether a rate is cut is decided by a comparison, never by
the rounding of a quotient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_guard import _numerics as num
from optax_guard import _stats
from optax_guard import _validation as val
from optax_guard._adam_pieces import ScalarOrSchedule, adam_direction, decay


@_stats.declare("scale_by_stable_adam", ("count", "num_cut", "total_cut", "max_rms"))
class ScaleByStableAdamState(NamedTuple):
  """State of :func:`scale_by_stable_adam` (and of :func:`stable_adamw`).

  Attributes:
    count: int32, the number of updates so far (saturating), as in
      ``optax.ScaleByAdamState``.
    mu: the first moment, a tree like the params (dtype ``mu_dtype``).
    nu: the second moment, a tree like the params.
    num_cut: int32, how many tensors (layer slices of stacked leaves count
      one each) had their rate cut this step, i.e. ``RMS > 1``.
    total_cut: int32, the sum of ``num_cut`` over every step so far
      (saturating at ``2**31 - 1``): a logger that reads the state every N
      steps sees every cut in its difference.
    max_rms: float32, the largest ``RMS`` of this step (NaN if one is NaN).
  """

  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  mu: optax.Updates
  nu: optax.Updates
  num_cut: jax.Array
  total_cut: jax.Array
  max_rms: jax.Array


def _tensor_rms(
    updates: optax.Updates, nu: optax.Updates, leads: list[int], bc2: jax.Array, eps: Any,
    axis_name: val.AxisName,
) -> jax.Array:
  """``RMS = sqrt(mean(g^2 / max(v_hat, eps^2)))`` of every tensor, as one vector.

  The tensors (layer slices of stacked leaves) in leaf order; in float32, or
  float64 when a leaf is. One collective for the partial sums and element
  counts of every tensor. Each tensor's reduction reads g and the new moment
  (written to the state anyway) behind its own optimization barrier, scalars
  included: shared with the update or with another tensor's reduction, v_hat
  or the broadcasts of the scalars would become full-size temporaries;
  separate, the reduction is one more read of g and nu, and the update fuses
  as in adamw. What follows the sums is one vector computation for all
  tensors, not a few scalar operations per tensor (a compile time that grows
  with the number of tensors).

  The bias correction ``bc = 1 - b2^t`` is taken out of the elementwise
  part: ``g^2 / max(v / bc, eps^2) = bc * g (g / max(v, eps^2 bc))``, so each
  element costs a maximum, a division and a product (XLA:CPU's fused
  reductions are bound by their arithmetic here: each elementwise operation
  dropped saves a few percent of the step, and ``g * (g / x)`` runs faster
  than ``g * g / x``; see ``python -m benchmarks.reductions``). It rounds
  differently from the textbook form, by an ulp or so of each term.
  """
  leaves = jax.tree.leaves(updates)
  sums, sizes = [], []
  for g, v, lead in zip(leaves, jax.tree.leaves(nu), leads, strict=True):
    g, v, bc, e = jax.lax.optimization_barrier((g, v, bc2, jnp.asarray(eps, jnp.float32)))
    acc = num.accumulation_dtype(g.dtype)
    a = (jnp.abs(g) if jnp.iscomplexobj(g) else g).astype(acc)  # |g|^2 = g * g when real
    bc, e = bc.astype(acc), e.astype(acc)
    ratio = a * (a / jnp.maximum(jnp.real(v).astype(acc), e * e * bc))
    sums.append(jnp.sum(ratio, axis=tuple(range(lead, g.ndim))))
    sizes.append(jnp.asarray(math.prod(g.shape[lead:]), acc))
  # an element count belongs to its tensor: counted once where the tensor is replicated
  sizes = num.device_shares(sizes, axis_name, like=leaves)
  sums, sizes = num.cross_device((sums, sizes), 2, axis_name)
  dtype = jnp.result_type(jnp.float32, *sums)
  total = num.concat_flat(sums, dtype)
  count = num.concat_flat([jnp.broadcast_to(n, s.shape) for s, n in zip(sums, sizes,
                                                                          strict=True)], dtype)
  return jnp.sqrt(total * bc2.astype(dtype) / jnp.maximum(count, 1))


def _cut_rates(
    direction: optax.Updates, rms: jax.Array, leads: list[int], pred: jax.Array
) -> tuple[optax.Updates, jax.Array, jax.Array]:
  """Each tensor divided by ``max(1, RMS)``, with ``num_cut`` and ``max_rms``.

  ``rms`` is :func:`_tensor_rms`'s vector. The factor is exactly 1 where
  ``RMS <= 1`` (a comparison decides). The factors are cut into one small
  buffer per leaf by ``_numerics.split_rows`` (``pred``: any traced boolean),
  so every leaf of a shape scales by the same kernel.
  """
  factors = num.safe_factor(1.0, rms)
  leaves, treedef = jax.tree.flatten(direction)
  counts = [math.prod(u.shape[:lead]) for u, lead in zip(leaves, leads, strict=True)]
  pieces = num.split_rows(pred, factors[:, None], counts)
  out = jax.tree.unflatten(treedef, [
      num.scale_leaf(u, f.reshape(u.shape[:lead] + (1,) * (u.ndim - lead)))
      for u, f, lead in zip(leaves, pieces, leads, strict=True)])
  num_cut = jnp.sum(rms > 1.0, dtype=jnp.int32)
  max_rms = jnp.max(rms, initial=0.0).astype(jnp.float32)
  return out, num_cut, max_rms


def _stable_adam(
    owner: str, *, b1: Any, b2: Any, eps: Any, eps_root: Any, mu_dtype: Any,
    weight_decay: Any, mask: Any, stacked: val.Stacked, axis_name: val.AxisName,
) -> optax.GradientTransformation:
  """The StableAdam scaling, with the decoupled weight decay when given."""
  val.adam_betas(owner, b1, b2, eps)
  val.non_negative(owner, "eps_root", eps_root, finite=True)
  mu_dtype = val.float_dtype(owner, "mu_dtype", mu_dtype)
  stacked = val.stacked(owner, stacked)
  axis_name = val.axis_name(owner, axis_name)
  if weight_decay is not None:
    val.rate(owner, "weight_decay", weight_decay)
    val.mask(owner, mask)

  def init_fn(params):
    return ScaleByStableAdamState(
        count=jnp.zeros((), jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
        num_cut=jnp.zeros((), jnp.int32),
        total_cut=jnp.zeros((), jnp.int32),
        max_rms=jnp.zeros((), jnp.float32),
    )

  def update_fn(updates, state, params=None):
    val.float_leaves(owner, updates)
    if weight_decay is not None:
      val.matching_params(owner, updates, params)
    leads = num.stacked_counts(owner, updates, stacked)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count_inc = optax.safe_increment(state.count)
    direction, _ = adam_direction(mu, nu, b1, b2, eps, eps_root, count_inc)
    direction = decay(owner, direction, params, state.count, weight_decay, mask)
    rms = _tensor_rms(updates, nu, leads, 1 - b2**count_inc, eps, axis_name)
    out, num_cut, max_rms = _cut_rates(direction, rms, leads, count_inc > 0)
    mu = optax.tree.cast(mu, mu_dtype)
    nu = optax.tree.cast_like(nu, state.nu)
    total_cut = num.saturating_add(state.total_cut, num_cut)
    return out, ScaleByStableAdamState(count_inc, mu, nu, num_cut, total_cut, max_rms)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_stable_adam(
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    *,
    stacked: val.Stacked = None,
    axis_name: val.AxisName = None,
) -> optax.GradientTransformation:
  r"""Adam's scaling with each tensor's step cut by ``max(1, RMS)`` (StableAdam).

  With :math:`\hat m_t, \hat v_t` Adam's bias-corrected moments (``v_hat``
  includes this step's gradient), per tensor :math:`i`:

  .. math::
    \mathrm{RMS}_{i,t} = \sqrt{\operatorname{mean}\!\left(
      \frac{g_{i,t}^2}{\max(\hat v_{i,t}, \epsilon^2)}\right)}, \qquad
    u_{i,t} = \frac{1}{\max(1, \mathrm{RMS}_{i,t})}\,
      \frac{\hat m_{i,t}}{\sqrt{\hat v_{i,t} + \epsilon_{root}} + \epsilon}

  Chain it like ``optax.scale_by_adam``:
  ``optax.chain(og.scale_by_stable_adam(), optax.scale_by_learning_rate(lr))``
  is StableAdam without weight decay; :func:`stable_adamw` adds decoupled
  weight decay at the same reduced rate. A tensor whose ``RMS`` is at or
  under 1 (decided by that comparison) gets exactly Adam's update, bitwise.
  ``RMS`` is large when the gradient is large against its own history: after
  a gradient spike the second moment has not caught up, and the step of that
  tensor shrinks instead of jumping.

  Follows the reference ``StableAdamWUnfused`` (Wortsman et al.) in the
  ``RMS`` formula (``eps**2`` floor, bias-corrected ``v_hat`` including this
  step, ``clip_thresh=1``). Differs: the moments are kept and bias-corrected
  as ``optax.scale_by_adam`` does (the reference folds the correction into
  the decay rates, which rounds differently); the defaults are optax's
  (the reference's are ``betas=(0.9, 0.99)``); the decision is taken on
  device without a host sync (the reference calls ``.item()``); ``RMS`` of
  complex gradients uses ``|g|^2``.

  Args:
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1)``.
    eps: ``>= 0``, added to ``sqrt(v_hat)``; ``eps**2`` floors ``v_hat`` in
      the ``RMS``.
    eps_root: ``>= 0``, added to ``v_hat`` inside the square root (as optax).
    mu_dtype: optional floating dtype of the first moment.
    stacked: leading layer axes of each leaf (None, an int, a prefix tree of
      ints or a callable ``(path, leaf) -> int``); see :ref:`design-stacked`.
      Each layer slice is a tensor with its own ``RMS``.
    axis_name: the mapped axis to ``psum`` the per-tensor sums over when the
      devices hold different shards of a tensor; see :ref:`design-collectives`.

  Returns:
    An ``optax.GradientTransformation`` with :class:`ScaleByStableAdamState`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.scale_by_stable_adam()
    >>> state = tx.init(jnp.zeros(2))
    >>> for g in (0.1, 0.1, 10.0):  # a x100 spike at step 3
    ...   u, state = tx.update(jnp.full(2, g), state)
    >>> int(state.num_cut), round(float(state.max_rms), 2)
    (1, 1.73)
    >>> u  # Adam's step divided by that RMS
    Array([0.3753, 0.3753], dtype=float32)

  References:
    Wortsman, Dettmers, Zettlemoyer, Morcos, Farhadi, Schmidt, 2023, *Stable
    and low-precision training for large-scale vision-language models*,
    https://arxiv.org/abs/2304.13013; Shazeer, Stern, 2018, *Adafactor*,
    https://arxiv.org/abs/1804.04235
  """
  return _stable_adam("scale_by_stable_adam", b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                      mu_dtype=mu_dtype, weight_decay=None, mask=None, stacked=stacked,
                      axis_name=axis_name)


def stable_adamw(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9,
    b2: ArrayLike = 0.999,
    eps: ArrayLike = 1e-8,
    eps_root: ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    stacked: val.Stacked = None,
    axis_name: val.AxisName = None,
) -> optax.GradientTransformation:
  r"""StableAdamW: AdamW whose rate per tensor is ``lr / max(1, RMS)``.

  .. math::
    \eta_{i,t} = \frac{\eta_t}{\max(1, \mathrm{RMS}_{i,t})}, \qquad
    p_i \leftarrow p_i - \eta_{i,t}\left(
      \frac{\hat m_{i,t}}{\sqrt{\hat v_{i,t}} + \epsilon} + \lambda p_i\right)

  with :math:`\mathrm{RMS}_{i,t}` as in :func:`scale_by_stable_adam`: the
  decoupled weight decay uses the same reduced rate
  :math:`\eta_{i,t}`. A drop-in for ``optax.adamw`` (same positional
  arguments, defaults and ``mask``): on every step where each tensor's ``RMS``
  is at or under 1 the updates are bitwise ``optax.adamw``'s. The state is
  ``(ScaleByStableAdamState, the learning-rate state)``;
  :func:`optax_guard.guard_stats` reports ``num_cut``, ``total_cut`` and
  ``max_rms``.

  Follows the reference ``StableAdamWUnfused`` (its later version, which
  decays the weights with the reduced rate; the first gist decayed with the
  full one). Differs as listed in :func:`scale_by_stable_adam`, and the decay
  is optax's ``p <- p - lr_t (u + wd p)`` (the reference multiplies ``p`` by
  ``1 - lr_t wd`` before adding the step, the same to first order).

  Args:
    learning_rate: a number ``>= 0`` or a schedule ``step -> rate``.
    b1, b2, eps, eps_root, mu_dtype: as in :func:`scale_by_stable_adam`.
    weight_decay: ``>= 0`` or a schedule; 0 switches it off.
    mask: as in ``optax.adamw``: None, a tree of bools (or a prefix of one),
      or a callable ``params -> tree``, selecting the leaves that decay.
      Under ``optax.inject_hyperparams`` a callable mask needs
      ``static_args=("mask",)`` (optax takes callables for schedules).
    stacked, axis_name: as in :func:`scale_by_stable_adam`.

  Returns:
    An ``optax.GradientTransformation``; its update needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.stable_adamw(1e-3, weight_decay=0.1)
    >>> p = jnp.ones(3)
    >>> u, state = tx.update(jnp.array([0.5, -0.5, 0.1]), tx.init(p), p)
    >>> u  # -lr * (sign of the first step + 0.1 * p)
    Array([-0.0011, 0.0009, -0.0011], dtype=float32)

  References:
    Wortsman et al., 2023, https://arxiv.org/abs/2304.13013; Loshchilov,
    Hutter, 2019, *Decoupled Weight Decay Regularization*,
    https://arxiv.org/abs/1711.05101
  """
  owner = "stable_adamw"
  val.rate(owner, "learning_rate", learning_rate)
  val.rate(owner, "weight_decay", weight_decay)
  return optax.chain(
      _stable_adam(owner, b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
                   weight_decay=weight_decay, mask=mask, stacked=stacked, axis_name=axis_name),
      optax.scale_by_learning_rate(learning_rate),
  )
