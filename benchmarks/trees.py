"""Parameter trees the benchmarks run on (shapes only, and fixed gradients).

* ``gpt2``: the exact GPT-2 small (124M) parameter shapes, 148 leaves, laid
  out as the Hugging Face / Flax checkpoint: token and position embeddings,
  12 blocks of (``ln_1``, ``attn.c_attn``, ``attn.c_proj``, ``ln_2``,
  ``mlp.c_fc``, ``mlp.c_proj``) with a weight and a bias each, and ``ln_f``.
* ``many``: 2,000 leaves of 2,048 parameters (32 x 64): the many-small-leaves
  case where per-leaf overheads (fusions, kernel launches, dispatch) dominate.
* ``uniform:N``: N leaves of 2,048 parameters (the compile-time trees).
* ``wide``: 8 leaves of 8192 x 8192 (2 GiB per copy in float32), ``wide:N``
  N of them: few, large leaves, where the step is bound by memory bandwidth
  and not by per-leaf launch or dispatch costs (an accelerator's regime).

``leaves`` changes the number of leaves of ``many``, ``uniform:N`` and
``wide``; ``leaf_size`` makes every leaf of them a
``leaf_size x leaf_size`` matrix (``--leaf-size 64`` gives a wide tree that a
small CPU runs in seconds). ``scale`` shrinks every leaf's element count by about that factor (each
dimension by ``scale ** (1 / ndim)``, at least 1) for quick runs; the number of
leaves and the tree structure never change.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

GPT2_VOCAB, GPT2_CTX, GPT2_WIDTH, GPT2_LAYERS = 50257, 1024, 768, 12
WIDE_LEAVES, WIDE_SIZE = 8, 8192
MANY_LEAVES, SMALL_LEAF = 2000, (32, 64)


def gpt2_shapes() -> dict[str, Any]:
  """Nested dict of GPT-2 small parameter shapes (124,439,808 parameters)."""
  d = GPT2_WIDTH

  def dense(n_in, n_out):
    return {"w": (n_in, n_out), "b": (n_out,)}

  def norm():
    return {"g": (d,), "b": (d,)}

  blocks = {
      f"{i:02d}": {
          "ln_1": norm(),
          "attn": {"c_attn": dense(d, 3 * d), "c_proj": dense(d, d)},
          "ln_2": norm(),
          "mlp": {"c_fc": dense(d, 4 * d), "c_proj": dense(4 * d, d)},
      }
      for i in range(GPT2_LAYERS)
  }
  return {
      "wte": (GPT2_VOCAB, d),
      "wpe": (GPT2_CTX, d),
      "h": blocks,
      "ln_f": norm(),
  }


def uniform_shapes(num_leaves: int, leaf_shape=SMALL_LEAF) -> dict[str, Any]:
  """``num_leaves`` leaves of the same shape (default 2,048 parameters)."""
  return {f"layer_{i:05d}": tuple(leaf_shape) for i in range(num_leaves)}


def _count(tree: str) -> int:
  try:
    n = int(tree.split(":", 1)[1])
  except ValueError:
    n = 0
  if n < 1:
    raise ValueError(f"tree {tree!r}: the number of leaves must be an integer >= 1")
  return n


def tree_shapes(tree: str, leaf_size: int | None = None,
                leaves: int | None = None) -> dict[str, Any]:
  """Shapes of a named tree: ``gpt2``, ``many``, ``uniform:N``, ``wide`` or ``wide:N``.

  ``leaf_size``: square leaves of that size instead of the tree's own;
  ``leaves``: that many leaves (neither for ``gpt2``, whose shapes are the
  model's).
  """
  if leaves is not None:
    if leaves < 1:
      raise ValueError(f"leaves must be >= 1, got {leaves}")
    if tree == "gpt2":
      raise ValueError("leaves does not apply to the gpt2 tree (its shapes are the model's)")
  if leaf_size is not None:
    if leaf_size < 1:
      raise ValueError(f"leaf_size must be >= 1, got {leaf_size}")
    if tree == "gpt2":
      raise ValueError("leaf_size does not apply to the gpt2 tree (its shapes are the model's)")
  square = None if leaf_size is None else (leaf_size, leaf_size)
  if tree == "gpt2":
    return gpt2_shapes()
  if tree == "many":
    return uniform_shapes(leaves or MANY_LEAVES, square or SMALL_LEAF)
  if tree.startswith("uniform:"):
    return uniform_shapes(leaves or _count(tree), square or SMALL_LEAF)
  if tree == "wide" or tree.startswith("wide:"):
    n = leaves or (WIDE_LEAVES if tree == "wide" else _count(tree))
    return uniform_shapes(n, square or (WIDE_SIZE, WIDE_SIZE))
  raise ValueError(
      f"unknown tree {tree!r}; expected 'gpt2', 'many', 'uniform:N', 'wide' or 'wide:N'")


def _is_shape(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def scaled(shape: tuple[int, ...], scale: float) -> tuple[int, ...]:
  """``shape`` with about ``scale`` times as many elements (each dim >= 1)."""
  if scale == 1.0 or not shape:
    return shape
  f = scale ** (1.0 / len(shape))
  return tuple(max(1, int(round(d * f))) for d in shape)


def abstract_tree(tree: str, dtype: Any, scale: float = 1.0,
                  leaf_size: int | None = None, leaves: int | None = None) -> Any:
  """The tree as ``jax.ShapeDtypeStruct`` leaves."""
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(scaled(s, scale), jnp.dtype(dtype)),
      tree_shapes(tree, leaf_size, leaves),
      is_leaf=_is_shape,
  )


def describe(abstract: Any) -> dict[str, Any]:
  """Leaf count, parameter count and bytes of an abstract tree."""
  leaves = jax.tree.leaves(abstract)
  n = sum(math.prod(x.shape) for x in leaves)
  nbytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)
  return {"leaves": len(leaves), "params": int(n), "bytes": int(nbytes)}


def tree_bytes(abstract: Any) -> int:
  return describe(abstract)["bytes"]


def make_gradients(abstract: Any, seed: int = 0, std: float = 1e-3) -> Any:
  """Fixed, finite gradients ``N(0, std^2)`` with the abstract tree's shapes.

  With the default ``std`` the GPT-2 tree's global norm is about 11 and the
  wide tree's about 23, so clipping at 1.0 is active (every clip really
  multiplies).
  """
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.PRNGKey(seed), max(len(leaves), 1))
  drawers: dict[Any, Any] = {}
  out = []
  for key, like in zip(keys[: len(leaves)], leaves, strict=True):
    sig = (tuple(like.shape), jnp.dtype(like.dtype))
    if sig not in drawers:
      drawers[sig] = jax.jit(
          lambda k, s, shape=sig[0], dtype=sig[1]: (
              s * jax.random.normal(k, shape, jnp.float32)
          ).astype(dtype)
      )
    out.append(drawers[sig](key, np.float32(std)))
  return jax.tree.unflatten(treedef, out)
