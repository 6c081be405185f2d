"""The learning rate from the loss: a scale that drops when the loss plateaus.

:func:`reduce_on_plateau` scales the updates down when the loss (or any
metric passed as ``value=``) stops improving, with exactly the decision rule
of ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (``eta = f(L_t)``). It
scales by multiplying with one factor (see ``_numerics.scale_leaf``), so every
leaf keeps its dtype and shape. The rates from the gradient norm and from the
parameters are in ``_rates``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_guard import _numerics as num
from optax_guard import _stats
from optax_guard import _validation as val


@_stats.declare(
    "reduce_on_plateau", ("scale", "best", "num_bad_steps", "cooldown_counter", "count")
)
class ReduceOnPlateauState(NamedTuple):
  """State of :func:`reduce_on_plateau`.

  Attributes:
    scale: float32 scalar, the factor the updates are multiplied by (torch's
      ``lr / initial_lr``); starts at 1.
    best: float32 scalar, the best finite value seen so far (``+inf`` in
      ``"min"`` mode, ``-inf`` in ``"max"`` mode before the first one).
    num_bad_steps: int32, steps since the last improvement (torch's
      ``num_bad_epochs``); reset to 0 on improvement, during cooldown and
      after a reduction; saturates at the int32 maximum.
    cooldown_counter: int32, steps left in the cooldown after a reduction.
    count: int32, the number of updates (values) seen; saturates.
  """

  scale: jax.Array
  best: jax.Array
  num_bad_steps: jax.Array
  cooldown_counter: jax.Array
  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count


def _is_better(a: jax.Array, best: jax.Array, *, threshold: Any, mode: str,
               threshold_mode: str) -> jax.Array:
  """torch's ``is_better``, with the margin ``tau |best|`` for either sign of ``best``."""
  tau = jnp.asarray(threshold, jnp.float32)
  # rel: the margin is tau * |best| (torch's best * (1 -+ tau) for best >= 0)
  lower, upper = best * (1.0 - tau), best * (1.0 + tau)
  if mode == "min":
    bound = jnp.where(best >= 0, lower, upper) if threshold_mode == "rel" else best - tau
    return a < bound
  bound = jnp.where(best >= 0, upper, lower) if threshold_mode == "rel" else best + tau
  return a > bound


def _plateau_step(
    state: ReduceOnPlateauState, a: jax.Array, better: jax.Array, *, factor: Any,
    patience: Any, cooldown: Any, min_scale: Any, eps: Any,
) -> ReduceOnPlateauState:
  """The state after torch's ``ReduceLROnPlateau.step(a)``, ``better`` decided."""
  best = jnp.where(better, a, state.best)
  bad = jnp.where(better, 0, optax.safe_increment(state.num_bad_steps))
  in_cooldown = state.cooldown_counter > 0
  cooldown_counter = jnp.where(
      in_cooldown, state.cooldown_counter - 1, state.cooldown_counter
  )
  bad = jnp.where(in_cooldown, 0, bad)

  reduce = bad > jnp.asarray(patience).astype(jnp.int32)
  old = state.scale
  new = jnp.maximum(old * jnp.asarray(factor, jnp.float32),
                    jnp.asarray(min_scale, jnp.float32))
  # only ever down: a floor min_scale >= 1 (or eps = inf) leaves the scale at 1
  apply = reduce & (new < old) & (old - new > jnp.asarray(eps, jnp.float32))
  scale = jnp.where(apply, new, old)
  cooldown_counter = jnp.where(
      reduce, jnp.asarray(cooldown).astype(jnp.int32), cooldown_counter
  )
  bad = jnp.where(reduce, 0, bad)
  return ReduceOnPlateauState(
      scale=scale.astype(jnp.float32),
      best=best.astype(jnp.float32),
      num_bad_steps=bad.astype(jnp.int32),
      cooldown_counter=cooldown_counter.astype(jnp.int32),
      count=optax.safe_increment(state.count),
  )


def reduce_on_plateau(
    *,
    factor: ArrayLike = 0.1,
    patience: ArrayLike = 10,
    threshold: ArrayLike = 1e-4,
    threshold_mode: str = "rel",
    cooldown: ArrayLike = 0,
    min_scale: ArrayLike = 0.0,
    mode: str = "min",
    eps: ArrayLike = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales the updates down when the loss passed as ``value=`` plateaus.

  Each update reads the loss or metric ``a = value`` and applies, in order,
  the rule of ``torch.optim.lr_scheduler.ReduceLROnPlateau.step(a)``:

  .. math::
    \text{better} = \begin{cases}
      a < b - \tau |b| & \text{min, rel} \qquad a < b - \tau \quad
        \text{min, abs} \\
      a > b + \tau |b| & \text{max, rel} \qquad a > b + \tau \quad
        \text{max, abs}
    \end{cases}

  then ``best <- a, bad <- 0`` if better, else ``bad <- bad + 1``; if in
  cooldown (``cooldown_counter > 0``): ``cooldown_counter -= 1, bad <- 0``;
  if ``bad > patience``: ``s' = max(s * factor, min_scale)``, the scale
  becomes ``s'`` only if ``s - s' > eps``, and (whether or not it changed)
  ``cooldown_counter <- cooldown, bad <- 0``. The updates are returned
  multiplied by the *new* scale, so after the k-th update ``state.scale``
  equals torch's ``lr / initial_lr`` after its k-th ``step(value)``.

  ``min_scale`` and ``eps`` are in units of the scale (the learning rate
  divided by the initial one): to reproduce torch with an initial learning
  rate ``lr0`` pass ``min_scale=min_lr / lr0`` and ``eps=torch_eps / lr0``.

  Off switch: ``min_scale >= 1`` or ``eps=inf`` never reduces, so the scale
  stays 1 and the updates come back bitwise unchanged while ``best`` and the
  counters are still tracked. The scale never increases, whatever the
  hyperparameters (a traced ``min_scale`` above the current scale included).
  ``best`` starts at ``+inf`` (``"min"``) or ``-inf`` (``"max"``), so the first
  finite value always improves on it (torch's ``_reset``). The comparisons run
  in float32 (torch uses Python floats), which only matters for a value
  within one float32 rounding of the threshold.

  Negative values: for ``b >= 0`` the ``"rel"`` rule above is torch's
  ``a < b (1 - tau)`` (``a > b (1 + tau)`` in max mode), computed the same way.
  For a negative ``best`` torch's margin ``b * tau`` flips sign, so a value up
  to ``|b| tau`` *worse* than ``best`` counts as better and a flat negative
  plateau never reduces the scale (a known flaw of torch's rule, which
  ``optax.contrib`` shares). Here the margin is ``tau |b|`` whatever the sign, so
  negative losses (e.g. log-likelihood bounds) plateau as positive ones do.
  This is the one deliberate difference from torch's decision rule.

  Non-finite values: a NaN or infinite ``value`` is never "better" and never
  becomes ``best``; it counts as a bad step (like torch for NaN and for
  ``+inf`` in min mode). This differs from torch only for ``-inf`` in min mode
  (``+inf`` in max mode), which torch would store as an unbeatable ``best``.

  Under ``optax.inject_hyperparams`` the string options ``mode`` and
  ``threshold_mode`` stay static by themselves; every numeric one (``factor``,
  ``patience``, ``threshold``, ``cooldown``, ``min_scale``, ``eps``) may be
  traced or scheduled (with bfloat16 parameters optax casts them to bfloat16;
  pass ``hyperparam_dtype=jnp.float32`` to keep them exact).

  Args:
    factor: multiplies the scale on a reduction, ``0 <= factor < 1``.
    patience: number of bad steps tolerated; the scale is reduced on the
      ``patience + 1``-th consecutive bad step (int ``>= 0``).
    threshold: ``tau >= 0``, the margin a value must beat ``best`` by.
    threshold_mode: ``"rel"`` (margin ``best * tau``) or ``"abs"`` (``tau``).
    cooldown: number of steps after a reduction during which bad steps are
      not counted (int ``>= 0``).
    min_scale: lower bound of the scale, ``>= 0``; at or above 1 (torch's
      ``min_lr >= lr``) the scale never drops.
    mode: ``"min"`` (lower is better, a loss) or ``"max"`` (an accuracy).
    eps: a reduction changing the scale by ``eps`` or less is not applied
      (``>= 0``; ``inf``, which torch accepts too, never reduces).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`ReduceOnPlateauState`; its update needs ``value=`` (a scalar) and
    raises ``ValueError`` without it.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> opt = optax.chain(optax.sgd(1.0), og.reduce_on_plateau(patience=1, factor=0.5))
    >>> g = jnp.ones(2)
    >>> s = opt.init(g)
    >>> for loss in [3.0, 2.0, 2.0, 2.5]:
    ...   u, s = opt.update(g, s, g, value=loss)
    >>> s[1].scale, u
    (Array(0.5, dtype=float32), Array([-0.5, -0.5], dtype=float32))

  References:
    PyTorch, ``torch.optim.lr_scheduler.ReduceLROnPlateau``,
    https://pytorch.org/docs/stable/generated/torch.optim.lr_scheduler.ReduceLROnPlateau.html
  """
  owner = "reduce_on_plateau"
  val.choice(owner, "mode", mode, ("min", "max"))
  val.choice(owner, "threshold_mode", threshold_mode, ("rel", "abs"))
  val.in_range(owner, "factor", factor, 0.0, 1.0, hi_open=True)
  val.integer(owner, "patience", patience, minimum=0)
  val.non_negative(owner, "threshold", threshold, finite=True)
  val.integer(owner, "cooldown", cooldown, minimum=0)
  val.non_negative(owner, "min_scale", min_scale)
  val.non_negative(owner, "eps", eps)
  rule = dict(factor=factor, patience=patience, cooldown=cooldown, min_scale=min_scale, eps=eps)

  def init_fn(params):
    del params
    worst = jnp.inf if mode == "min" else -jnp.inf
    return ReduceOnPlateauState(
        scale=jnp.ones((), jnp.float32),
        best=jnp.asarray(worst, jnp.float32),
        num_bad_steps=jnp.zeros((), jnp.int32),
        cooldown_counter=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del params, extra_args
    val.needs_value(owner, value)
    val.scalar(owner, "value", value)  # NaN allowed: a bad step
    val.float_leaves(owner, updates)
    a = jnp.asarray(value).astype(jnp.float32)
    better = _is_better(a, state.best, threshold=threshold, mode=mode,
                        threshold_mode=threshold_mode) & num.is_finite_scalar(a)
    new_state = _plateau_step(state, a, better, **rule)
    # a scale of 1 returns the updates themselves: x * 1 keeps every number,
    # but XLA:GPU gives a NaN its canonical bits
    one = new_state.scale == 1
    out = jax.tree.map(lambda g: jnp.where(one, g, num.scale_leaf(g, new_state.scale)), updates)
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
