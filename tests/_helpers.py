"""Shared test helpers: small parameter/gradient trees and NumPy float64 references.

Import from test modules as ``from _helpers import ...`` (pytest puts ``tests/``
on ``sys.path``). Every reference here is plain NumPy in float64, independent
of the code under test.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# ---------------------------------------------------------------------------
# Trees
# ---------------------------------------------------------------------------


def make_tree(seed: int, dtype: Any = jnp.float32, scale: float = 1.0) -> dict:
  """A small Dense-layer-like tree: ``{"dense": {"kernel", "bias"}, "scale"}``.

  Leaves of shapes (4, 3), (3,) and () drawn from a standard normal (NumPy,
  so ``seed`` fixes the values on any backend), times ``scale``, in ``dtype``.
  """
  rng = np.random.default_rng(seed)
  draw = lambda shape: jnp.asarray(scale * rng.standard_normal(shape), np.float32).astype(dtype)
  return {"dense": {"kernel": draw((4, 3)), "bias": draw((3,))}, "scale": draw(())}


def make_params(dtype: Any = jnp.float32) -> dict:
  """The parameters most tests use (``make_tree(0)``)."""
  return make_tree(0, dtype)


def make_grads(step: int, scale: float = 1.0, dtype: Any = jnp.float32) -> dict:
  """Gradients of the shape of :func:`make_params` for ``step`` (a different draw each step)."""
  return make_tree(1000 + step, dtype, scale)


# ---------------------------------------------------------------------------
# NumPy float64 references
# ---------------------------------------------------------------------------


def f64(x: Any) -> np.ndarray:
  """``x`` as a float64 NumPy array (exact for every float16/bfloat16/float32 value)."""
  return np.asarray(x).astype(np.float64)


def np_norm(x: Any, ord: Any = None, axis: Any = None, keepdims: bool = False) -> np.ndarray:  # noqa: A002
  """The vector norm (``ord`` None/2, 1 or inf) over ``axis``, in float64.

  An empty reduction is 0 for every ``ord`` (``max`` with ``initial=0``).
  """
  a = np.abs(np.asarray(x, np.float64))
  if ord in (None, 2):
    return np.sqrt(np.sum(a * a, axis=axis, keepdims=keepdims))
  if ord == 1:
    return np.sum(a, axis=axis, keepdims=keepdims)
  return np.max(a, axis=axis, keepdims=keepdims, initial=0.0)


def np_global_norm(leaves: Any, ord: Any = None) -> float:  # noqa: A002
  """The norm of all elements of a tree (or a list of arrays) together, in float64."""
  flat = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(leaves)]
  return float(np_norm(np.concatenate(flat) if flat else np.zeros(0), ord))


def np_unit_axes(ndim: int, axis: Any = None) -> tuple[int, ...]:
  """The axes reduced for one unit of a leaf (the per-unit convention).

  Default: every axis but the last (the output features of a Dense/Conv
  kernel) for ``ndim >= 2``; the whole leaf for a vector or scalar.
  """
  if axis is None:
    return tuple(range(ndim - 1)) if ndim >= 2 else tuple(range(ndim))
  axes = (axis,) if isinstance(axis, int) else axis
  return tuple(sorted({a % ndim for a in axes}))



# ---------------------------------------------------------------------------
# Bitwise comparison and trees with special values
# ---------------------------------------------------------------------------


def with_special_values(tree: Any, seed: int, *, nan: bool = True, inf: bool = True) -> Any:
  """``tree`` with ``-0.0`` (and, if asked, NaN and ``+-inf``) written into its leaves.

  Every leaf with at least two elements gets a ``-0.0``; with ``inf`` every
  leaf with at least three gets a ``+inf`` or ``-inf``; with ``nan`` one leaf
  of four or more elements gets a NaN. Positions are drawn with ``seed``.
  """
  rng = np.random.default_rng(seed)
  paths_leaves, treedef = jax.tree.flatten_with_path(tree)
  out, nan_done = [], False
  for _, x in paths_leaves:
    a = np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x).copy()
    flat = a.reshape(-1)
    slots = rng.permutation(flat.size)
    if flat.size >= 2:
      flat[slots[0]] = -0.0
    if inf and flat.size >= 3:
      flat[slots[1]] = np.inf if rng.random() < 0.5 else -np.inf
    if nan and not nan_done and flat.size >= 4:
      flat[slots[2]] = np.nan
      nan_done = True
    out.append(jnp.asarray(a).astype(x.dtype))
  return jax.tree.unflatten(treedef, out)


def assert_bitwise_equal(got: Any, want: Any) -> None:
  """Same tree structure, shapes, dtypes and bits (``-0.0`` and NaN payloads included)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(want)[0]]
  for path, a, b in zip(paths, jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape, b.shape)
    assert a.tobytes() == b.tobytes(), (path, a, b)


# ---------------------------------------------------------------------------
# Stacked (scanned) layers and their unrolled twin
# ---------------------------------------------------------------------------

LAYERS = 3
# ``stacked`` for :func:`scanned_tree`: one layer axis under "blocks", none in "head"
SCANNED_SPEC = {"blocks": 1, "head": None}


def scanned_tree(seed: int, dtype: Any = jnp.float32, scales: Any = (0.1, 1.0, 10.0)) -> dict:
  """A scanned model's tree: ``{"blocks": {...}, "head"}``.

  ``blocks`` holds a kernel ``(L, 4, 3)``, a bias ``(L, 3)`` and a gain
  ``(L,)`` for ``L = len(scales)`` layers (layer ``i`` drawn times
  ``scales[i]``, so a bound can clip some layers and leave others); ``head``
  is an unstacked ``(3, 2)`` kernel.
  """
  rng = np.random.default_rng(seed)
  scales = np.asarray(scales, np.float32)

  def draw(shape):
    x = rng.standard_normal((len(scales),) + shape).astype(np.float32)
    return jnp.asarray(x * scales.reshape((-1,) + (1,) * len(shape))).astype(dtype)

  blocks = {"kernel": draw((4, 3)), "bias": draw((3,)), "gain": draw(())}
  head = jnp.asarray(rng.standard_normal((3, 2)), np.float32).astype(dtype)
  return {"blocks": blocks, "head": head}


def unroll(scanned: dict) -> dict:
  """The unrolled twin of :func:`scanned_tree`: ``{"blocks": {"0": {...}, ...}, "head"}``."""
  n = jax.tree.leaves(scanned["blocks"])[0].shape[0]
  blocks = {str(i): jax.tree.map(lambda x, i=i: x[i], scanned["blocks"]) for i in range(n)}
  return {"blocks": blocks, "head": scanned["head"]}


def restack(unrolled: dict) -> dict:
  """The inverse of :func:`unroll` (also for trees of statistics shaped like it)."""
  layers = [unrolled["blocks"][str(i)] for i in range(len(unrolled["blocks"]))]
  return {"blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *layers), "head": unrolled["head"]}


# ---------------------------------------------------------------------------
# Runs and programs
# ---------------------------------------------------------------------------


def scan_steps(tx: Any, params: Any, grads: Any, values: Any) -> tuple[Any, Any]:
  """``init`` + one update per step under ``lax.scan``: ``(final state, stacked updates)``.

  ``grads`` holds one gradient tree per step along a leading axis and
  ``values`` one ``value=`` per step; each update is applied to the params.
  """
  tx = optax.with_extra_args_support(tx)

  def step(carry, xs):
    params, state = carry
    g, value = xs
    u, state = tx.update(g, state, params, value=value)
    return (optax.apply_updates(params, u), state), u

  (_, state), updates = jax.lax.scan(step, (params, tx.init(params)), (grads, values))
  return state, updates


def all_eqns(jaxpr: Any) -> Any:
  """Every equation of ``jaxpr`` and of the jaxprs nested in its equations."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns"):
          yield from all_eqns(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from all_eqns(sub.jaxpr)
