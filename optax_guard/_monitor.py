"""Monitoring: what the gradients look like, and what the guards decided.

:func:`monitor` is an identity transformation that records statistics of the
updates it sees; :func:`guard_stats` collects every scalar statistic held by
the states of optax_guard transformations anywhere inside an optimizer state,
as a flat ``dict`` ready for a logger.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_guard import _numerics as num
from optax_guard import _validation as val


class MonitorState(NamedTuple):
  """State of :func:`monitor`: statistics of the most recent updates.

  Attributes:
    global_norm: float32, the L2 norm of the whole update tree (float32
      accumulation; NaN if any element is NaN, ``inf`` on overflow).
    max_abs: float32, the largest absolute element (NaN if any is NaN).
    num_nonfinite: int32, how many elements are NaN or ``+-inf``.
    leaf_norms: with ``per_leaf=True``, a tree (the structure of the params
      given to ``init``) of float32 per-leaf L2 norms; None otherwise. With
      ``stacked``, the entry of a stacked leaf holds one norm per layer: its
      shape is the leaf's leading layer axes, e.g. ``(layers,)``.
  """

  global_norm: jax.Array
  max_abs: jax.Array
  num_nonfinite: jax.Array
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
    axis_name: inside ``pmap``/``shard_map`` when each device holds a different
      shard of the updates, the mapped axis to combine over: one ``psum`` (the
      sums of squares and the non-finite count) and one ``pmax`` (``max_abs``).
      Leave None under plain ``jit`` and for replicated updates.
    stacked: with ``per_leaf``, the leading layer axes of the leaves: None,
      an int, a tree of ints (a prefix of the params' tree) or a callable
      ``(path, leaf) -> int``. A model built with ``nnx.scan`` keeps all
      layers' kernels in one leaf ``(layers, ...)``; ``stacked=1`` records
      one norm per layer slice (the norms of the unrolled model's leaves),
      in an array of the layer shape. :func:`guard_stats` reports scalars
      only and leaves such arrays out. Static: under
      ``optax.inject_hyperparams`` an int or a callable needs
      ``static_args=("stacked",)``.

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
    return MonitorState(zero(), zero(), jnp.zeros((), jnp.int32), leaf_norms)

  def update_fn(updates, state, params=None):
    del params
    f32 = lambda x: jnp.asarray(x).astype(jnp.float32)
    leaves, treedef = jax.tree.flatten(updates)
    stats = [num.partial_stats(x) for x in leaves]  # one read of each leaf
    ssq = [s[0] for s in stats]
    max_abs = f32(num.combine_partials([s[1] for s in stats], "inf"))
    bad = sum((s[2] for s in stats), jnp.zeros((), jnp.int32))
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
      total, bad = num.cross_device((num.combine_partials(ssq), bad), 2, axis_name)
      leaf_norms = None
    max_abs = num.cross_device(max_abs, "inf", axis_name)
    return updates, MonitorState(f32(num.finish_norm(total)), max_abs, bad, leaf_norms)

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# guard_stats
# ---------------------------------------------------------------------------

_PREFIXES = {
    "ZClipState": "zclip",
    "AutoClipState": "autoclip",
    "SkipNonfiniteState": "skip_nonfinite",
    "SkipOnSpikeState": "skip_on_spike",
    "SkipStepsState": "skip_steps",
    "ReduceOnPlateauState": "reduce_on_plateau",
    "MonitorState": "monitor",
    "QkClipState": "qk_clip",
}
_INJECT = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
# Fields of our optimizer states that hold moments (trees like the params),
# not statistics: left out even where a leaf is a scalar.
_MOMENTS = ("mu", "nu")


def _is_ours(x: Any) -> bool:
  return hasattr(x, "_fields") and type(x).__module__.startswith("optax_guard")


def _kind(x: Any) -> str:
  name = type(x).__name__
  if name in _PREFIXES:
    return _PREFIXES[name]
  if name.endswith("State") and len(name) > len("State"):
    name = name[: -len("State")]
  return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _is_scalar(x: Any) -> bool:
  if isinstance(x, (bool, int, float, np.number)):
    return True
  return isinstance(x, (jax.Array, np.ndarray)) and x.ndim == 0


def _scalars(prefix: str, tree: Any) -> Iterator[tuple[str, jax.Array]]:
  """``(name, scalar)`` for every scalar leaf of ``tree``; arrays are skipped.

  A trailing ``.value`` attribute in the path (the array inside a variable
  wrapper, e.g. the state of Flax NNX's ``nnx.Optimizer``) is not named.
  """
  for path, leaf in jax.tree.flatten_with_path(tree)[0]:
    if _is_scalar(leaf):
      if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
      parts = ([prefix] if prefix else []) + [_key_str(k) for k in path]
      yield "/".join(parts), leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf)


def _collect(state: Any, found: list) -> None:
  """Appends ``(kind, [(name, value), ...])`` for every recognised state."""
  stop = lambda x: _is_ours(x) or isinstance(x, _INJECT)
  for node in jax.tree.leaves(state, is_leaf=stop):
    if isinstance(node, _INJECT):
      hyperparams = list(_scalars("", node.hyperparams))
      if hyperparams:
        found.append(("hyperparams", hyperparams))
      _collect(node.inner_state, found)
    elif _is_ours(node):
      entries: list = []
      found.append((_kind(node), entries))
      for field in node._fields:
        value = getattr(node, field)
        if field == "inner_state":
          _collect(value, found)
        elif field not in _MOMENTS:
          entries.extend(_scalars(field, value))


def guard_stats(opt_state: optax.OptState) -> dict[str, jax.Array]:
  """Every scalar statistic of optax_guard states inside an optimizer state.

  Walks any optimizer state (tuples of ``optax.chain``, the dicts of
  ``optax.multi_transform``, ``optax.MultiStepsState``, masked states, the
  ``inner_state`` of our guards and of ``optax.inject_hyperparams``, and any
  other pytree) depth first, in the order ``jax.tree.flatten`` flattens it, and
  finds every state whose class is defined in ``optax_guard``. Each scalar
  field becomes an entry ``"<kind>/<field>"``: the kind is ``zclip``,
  ``autoclip``, ``skip_nonfinite``, ``skip_on_spike``, ``skip_steps``,
  ``reduce_on_plateau``, ``monitor``, ``qk_clip``, or for other states the snake-cased
  class name without ``State`` (``scale_by_stable_adam``, ``scale_by_spam``,
  ``adagc``). Arrays with dimensions (history buffers) and the moments of
  our optimizers (``mu``, ``nu``) are left out; a field
  holding a tree of scalars (``monitor(per_leaf=True)``'s ``leaf_norms``)
  gives one entry per leaf, ``"monitor/leaf_norms/<path>"``. Variable
  wrappers holding the array in ``.value`` (the state of Flax NNX's
  ``nnx.Optimizer``, so ``guard_stats(optimizer.opt_state)`` works) are looked
  through without adding ``/value`` to the name.

  The numeric hyperparameters of every ``optax.inject_hyperparams`` state are
  reported too, as ``"hyperparams/<name>"`` (a scheduled learning rate or
  clipping threshold is worth logging next to the statistics it drives).

  When a kind occurs more than once, every occurrence gets a suffix in walk
  order: ``"zclip_1/threshold"``, ``"zclip_2/threshold"``. The structure of the
  result depends only on the structure of ``opt_state``, so this is safe inside
  ``jax.jit`` (it returns the state's arrays, or tracers under ``jit``) and
  costs nothing at run time. (A dict returned from a jitted function comes
  back with its keys sorted, as JAX flattens dicts.)

  Args:
    opt_state: any optimizer state.

  Returns:
    A ``dict`` from names to scalar ``jax.Array`` values (int32 counters, bool
    flags, float32 statistics).

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.skip_nonfinite(optax.chain(og.monitor(), optax.sgd(0.1)))
    >>> state = tx.init(jnp.zeros(2))
    >>> _, state = tx.update(jnp.array([3.0, 4.0]), state)
    >>> stats = og.guard_stats(state)
    >>> sorted(stats)  # doctest: +NORMALIZE_WHITESPACE
    ['monitor/global_norm', 'monitor/max_abs', 'monitor/num_nonfinite',
     'skip_nonfinite/consecutive_skipped', 'skip_nonfinite/last_skipped',
     'skip_nonfinite/num_skipped']
    >>> float(stats["monitor/global_norm"])
    5.0
  """
  found: list = []
  _collect(opt_state, found)
  totals: dict[str, int] = {}
  for kind, _ in found:
    totals[kind] = totals.get(kind, 0) + 1
  seen: dict[str, int] = {}
  out: dict[str, jax.Array] = {}
  for kind, entries in found:
    seen[kind] = seen.get(kind, 0) + 1
    label = kind if totals[kind] == 1 else f"{kind}_{seen[kind]}"
    for name, value in entries:
      out[f"{label}/{name}"] = value
  return out
