"""Monitoring: what the gradients look like.

:func:`monitor` is an identity transformation that records statistics of the
updates it sees; :func:`~optax_guard.guard_stats` reads them (with every other
statistic the states of optax_guard declare) as a flat ``dict`` for a logger.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_guard import _numerics as num
from optax_guard import _stats
from optax_guard import _validation as val


@_stats.declare(
    "monitor", ("global_norm", "max_abs", "num_nonfinite", "nonfinite_steps", "leaf_norms")
)
class MonitorState(NamedTuple):
  """State of :func:`monitor`: statistics of the most recent updates, and one total.

  Attributes:
    global_norm: float32, the L2 norm of the whole update tree (float32
      accumulation; NaN if any element is NaN, ``inf`` on overflow).
    max_abs: float32, the largest absolute element (NaN if any is NaN).
    num_nonfinite: int32, how many elements are NaN or ``+-inf``.
    nonfinite_steps: int32, how many steps so far had at least one NaN or
      ``+-inf`` element (saturating): the running total beside
      ``num_nonfinite``, counted in steps (a count of elements would
      saturate after one bad step of a large model). A logger that reads the
      state every N steps sees every such step in its difference.
    leaf_norms: with ``per_leaf=True``, a tree (the structure of the params
      given to ``init``) of float32 per-leaf L2 norms; None otherwise. With
      ``stacked``, the entry of a stacked leaf holds one norm per layer: its
      shape is the leaf's leading layer axes, e.g. ``(layers,)``.
  """

  global_norm: jax.Array
  max_abs: jax.Array
  num_nonfinite: jax.Array
  nonfinite_steps: jax.Array
  leaf_norms: Any


def monitor(
    *, per_leaf: bool = False, axis_name: val.AxisName = None, stacked: val.Stacked = None
) -> optax.GradientTransformation:
  r"""Identity transformation that records statistics of the incoming updates.

  .. math::
    \lVert G\rVert_2 = \Big(\sum_i g_i^2\Big)^{1/2},\quad
    \max_i |g_i|,\quad \#\{i : g_i \notin \mathbb{R}\}
    \ \big(,\ \lVert g_\ell\rVert_2 \text{ per leaf}\big)

  The updates pass through bitwise unchanged. Put ``monitor()`` first in the
  chain to watch raw gradients, or after a clipping transformation to watch
  what the optimizer receives; read the numbers with :func:`guard_stats`.
  Inside a guard (``skip_on_spike(chain(monitor(), ...))``) its state, like
  every inner state, keeps the last *applied* step's numbers on skipped steps;
  put it before the guard to see every step.
  All statistics come from one read of each leaf (one variadic reduction);
  counting non-finite elements is the one per-element test of the library,
  and it is here only because a monitor is for looking.

  Args:
    per_leaf: also record the L2 norm of every leaf (a tree of scalars with
      the structure of the params given to ``init``).
    axis_name: the mapped axis to combine over when the devices hold
      different shards of the updates: one ``psum`` (the sums of squares and
      the non-finite count) and one ``pmax`` (``max_abs``); see
      :ref:`design-collectives`.
    stacked: with ``per_leaf``, the leading layer axes of each leaf (None, an
      int, a prefix tree of ints or a callable ``(path, leaf) -> int``); see
      :ref:`design-stacked`. A stacked leaf gets one norm per layer slice, in
      an array of the layer shape, which :func:`guard_stats` (scalars only)
      leaves out.

  Returns:
    An ``optax.GradientTransformation`` with :class:`MonitorState`.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.monitor()
    >>> g = {"a": jnp.array([3.0, -4.0]), "b": jnp.array([jnp.inf])}
    >>> out, state = tx.update(g, tx.init(g))
    >>> float(state.max_abs), int(state.num_nonfinite)
    (inf, 1)
    >>> og.guard_stats(state)["monitor/global_norm"]
    Array(inf, dtype=float32)

  References:
    Zhang et al., 2022, *OPT: Open Pre-trained Transformer Language Models*
    (logbook of gradient-norm spikes), https://arxiv.org/abs/2205.01068
  """
  per_leaf = val.flag("monitor", "per_leaf", per_leaf)
  axis_name = val.axis_name("monitor", axis_name)
  stacked = val.stacked("monitor", stacked)

  def init_fn(params):
    zero = lambda: jnp.zeros((), jnp.float32)  # one buffer per field (donatable)
    leaf_norms = None
    if per_leaf:  # one norm per tensor: the layer shape of a stacked leaf
      leaf_norms = num.map_tensors(
          "monitor", stacked, lambda _, lead, x: jnp.zeros(np.shape(x)[:lead], jnp.float32),
          params,
      )
    count = lambda: jnp.zeros((), jnp.int32)
    return MonitorState(zero(), zero(), count(), count(), leaf_norms)

  def update_fn(updates, state, params=None):
    del params
    f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
    leaves, treedef = jax.tree.flatten(updates)
    stats = [num.partial_stats(x) for x in leaves]  # one read of each leaf
    ssq = [s[0] for s in stats]
    max_abs = f32(num.combine_partials([s[1] for s in stats], "inf"))
    # a leaf replicated along an axis of axis_name counts once (device_shares);
    # with axis_name the counts join the sums' psum as float32 (exact below 2**24)
    counts = num.device_shares([s[2] for s in stats], axis_name)
    if axis_name is not None:
      counts = [f32(c) for c in counts]
    bad = sum(counts, jnp.zeros((), counts[0].dtype if counts else jnp.int32))
    if per_leaf:
      leads = num.stacked_counts("monitor", updates, stacked)
      # a stacked leaf: one sum of squares per layer slice replaces the whole
      # leaf's (which XLA then drops); the global sum adds them up
      ssq = [num.tensor_partial(x, n) if n else p
             for x, n, p in zip(leaves, leads, ssq, strict=True)]
      ssq, bad = num.cross_device((ssq, bad), 2, axis_name)
      total = num.combine_partials(
          [jnp.sum(p) if n else p for p, n in zip(ssq, leads, strict=True)]
      )
      leaf_norms = jax.tree.unflatten(treedef, [
          f32(num.finish_norm(p)).reshape(np.shape(x)[:n])
          for p, x, n in zip(ssq, leaves, leads, strict=True)
      ])
    else:
      total = num.combine_partials(num.device_shares(ssq, axis_name))
      total, bad = num.cross_device((total, bad), 2, axis_name)
      leaf_norms = None
    max_abs = num.cross_device(max_abs, "inf", axis_name)
    bad = bad.astype(jnp.int32)
    steps = jnp.where(bad > 0, optax.safe_increment(state.nonfinite_steps), state.nonfinite_steps)
    return updates, MonitorState(f32(num.finish_norm(total)), max_abs, bad, steps, leaf_norms)

  return optax.GradientTransformation(init_fn, update_fn)
