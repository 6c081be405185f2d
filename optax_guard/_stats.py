"""Declared statistics: what each state reports, and :func:`guard_stats`.

Every state type of optax_guard says, with the class decorator
:func:`declare`, which of its fields are statistics worth logging and under
which name (a :class:`Reports`, kept in the class attribute ``__reports__``).
:func:`guard_stats` reads those declarations and nothing else: it does not
look at module or class names, and a state type without a declaration
reports nothing. The guards' checkpoint helpers
(:func:`~optax_guard.strip_guard_state`) use the same declaration to know
which levels of a state are guards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax


class Reports(NamedTuple):
  """What a state type reports to :func:`guard_stats`.

  Attributes:
    kind: the prefix of its names, e.g. ``"zclip"`` gives ``"zclip/threshold"``.
    fields: the fields reported, in order. A field holding a scalar gives one
      entry, a field holding a tree gives one entry per scalar leaf (arrays
      with dimensions, such as history buffers, are left out).
    guard: the state is a guard's: its ``inner_state`` field holds the state
      of the transformation it wraps. :func:`guard_stats` walks into it, and
      :func:`~optax_guard.strip_guard_state` removes such levels.
  """

  kind: str
  fields: tuple[str, ...]
  guard: bool = False


_T = TypeVar("_T", bound=type)


def declare(kind: str, fields: tuple[str, ...], *, guard: bool = False) -> Callable[[_T], _T]:
  """Class decorator: the state type reports ``fields`` under ``kind``.

  Sets the class attribute ``__reports__`` to ``Reports(kind, fields,
  guard)``; every field named must be a field of the state, and a guard's
  state has the fields ``inner_state`` and ``last_skipped`` (a bool scalar:
  whether the step that produced the state was skipped).
  """

  def decorate(cls: _T) -> _T:
    have = getattr(cls, "_fields", ())
    missing = [f for f in fields if f not in have]
    if guard:  # what wraps the inner state, and whether the last step was skipped
      missing += [f for f in ("inner_state", "last_skipped") if f not in have]
    if missing:
      raise TypeError(f"{cls.__name__} cannot report {missing}: not a field")
    cls.__reports__ = Reports(kind, tuple(fields), guard)  # type: ignore[attr-defined]
    return cls

  return decorate


def declared(x: Any) -> Reports | None:
  """The :class:`Reports` declared by the type of ``x``, or None."""
  found = getattr(type(x), "__reports__", None)
  return found if isinstance(found, Reports) else None


def is_guard_state(x: Any) -> bool:
  """Whether ``x`` is the state of a guard (declares ``guard=True``)."""
  found = declared(x)
  return found is not None and found.guard


_INJECT = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


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
  """Appends ``(kind, [(name, value), ...])`` for every declaring state, walk order."""
  stop = lambda x: declared(x) is not None or isinstance(x, _INJECT)
  for node in jax.tree.leaves(state, is_leaf=stop):
    if isinstance(node, _INJECT):
      hyperparams = list(_scalars("", node.hyperparams))
      if hyperparams:
        found.append(("hyperparams", hyperparams))
      _collect(node.inner_state, found)
      continue
    reported = declared(node)
    if reported is None:
      continue
    entries: list = []
    found.append((reported.kind, entries))
    if reported.guard:
      _collect(node.inner_state, found)
    for field in reported.fields:
      entries.extend(_scalars(field, getattr(node, field)))


def guard_stats(opt_state: optax.OptState) -> dict[str, jax.Array]:
  """Every scalar statistic of optax_guard states inside an optimizer state.

  Walks any optimizer state (tuples of ``optax.chain``, the dicts of
  ``optax.multi_transform``, ``optax.MultiStepsState``, masked states, the
  ``inner_state`` of our guards and of ``optax.inject_hyperparams``, and any
  other pytree) depth first, in the order ``jax.tree.flatten`` flattens it.
  Every state type of optax_guard declares the statistics it reports (a
  kind and a list of fields, with the class decorator :func:`declare`); each
  scalar in a declared field becomes an entry ``"<kind>/<field>"``. The kinds
  are the factory names: ``zclip``, ``autoclip``, ``adagc``,
  ``clip_by_historical_norm``, ``skip_nonfinite``, ``skip_on_spike``,
  ``skip_steps``, ``dynamic_loss_scale``, ``reduce_on_plateau``, ``monitor``,
  ``qk_clip``, ``scale_by_stable_adam``, ``scale_by_spam``. Arrays with dimensions
  (history buffers) and the moments of our optimizers (``mu``, ``nu``) are
  not reported; a field holding a tree of scalars
  (``monitor(per_leaf=True)``'s ``leaf_norms``) gives one entry per leaf,
  ``"monitor/leaf_norms/<path>"``. Variable wrappers holding the array in
  ``.value`` (the state of Flax NNX's ``nnx.Optimizer``, so
  ``guard_stats(optimizer.opt_state)`` works) are looked through without
  adding ``/value`` to the name.

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
    ['monitor/global_norm', 'monitor/max_abs', 'monitor/nonfinite_steps',
     'monitor/num_nonfinite', 'skip_nonfinite/consecutive_skipped',
     'skip_nonfinite/last_skipped', 'skip_nonfinite/num_skipped']
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
