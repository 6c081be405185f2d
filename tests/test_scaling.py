"""The compiled step grows linearly with the number of leaves.

A model with a few hundred unscanned tensors must not wait minutes for its
first step. XLA copies cheap scalar arithmetic into every fusion that reads
it, so a statistic that chains over all leaves (a sum of n partial norms)
and is read by each leaf's own arithmetic puts n copies of an n-term chain
in the program: compile time then grows as the square of the leaf count.
These tests count the instructions of the optimized program (every
computation, fusions included) of the full step for trees of ``N`` and
``2 N`` leaves: a linear program about doubles, a quadratic one grows by
well over 2x at these sizes. They check structure, not time.

XLA also compiles each kernel of distinct code separately, and shares one
kernel among all the fusions with the same code: a program that gives every
leaf a kernel of its own (a slice at the leaf's own offset, say) compiles
in time linear in the leaves but many times slower than one whose leaves of
a shape share their kernels. The same compiles count the distinct fused
computations: twice the leaves may add a few (a level of
``_numerics.split_rows``), not one per leaf.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest
from test_contract import TRANSFORMS, _make

import optax_guard as og

N = 24  # leaves of the smaller tree
LINEAR = 2.25  # at most this growth from N to 2 N leaves
FEW = N // 2  # at most this many more distinct kernels for N more leaves

pytestmark = pytest.mark.xla_cpu  # the optimized program of XLA:CPU


def _tree(n: int) -> dict:
  return {f"w{i:03d}": jax.ShapeDtypeStruct((4, 4), jnp.float32) for i in range(n)}


def _program(tx: optax.GradientTransformation, n: int, fused: bool = False) -> str:
  tx = optax.with_extra_args_support(tx)
  params = _tree(n)
  state = jax.eval_shape(tx.init, params)

  def step(p, s, g):
    if fused:
      return og.update_and_apply(tx, g, s, p, value=jnp.float32(1.0))
    u, s = tx.update(g, s, p, value=jnp.float32(1.0))
    return optax.apply_updates(p, u), s

  return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()


def _instructions(text: str) -> int:
  return len(re.findall(r"^\s*(?:ROOT )?%\S+ = ", text, re.M))


def _distinct_kernels(text: str) -> int:
  """The fused computations of distinct code (names, metadata and parameter
  names aside)."""
  bodies = set()
  for m in re.finditer(r"^%((?:fused|wrapped)\S*) \((.*?)\) -> (.*?) \{\n(.*?)\n\}", text,
                       re.S | re.M):
    body = re.sub(r"%[\w.\-]+", "%x", re.sub(r", metadata=\{[^}]*\}", "", m.group(4)))
    bodies.add((re.sub(r"[\w.]+: ", "", m.group(2)), m.group(3), body))
  return len(bodies)


def _growth(tx_fn, fused: bool = False) -> tuple[float, int]:
  """The growth of the instruction count from N to 2 N leaves, and the number
  of distinct kernels the N more leaves add."""
  small, large = _program(tx_fn(), N, fused), _program(tx_fn(), 2 * N, fused)
  return (_instructions(large) / _instructions(small),
          _distinct_kernels(large) - _distinct_kernels(small))


@pytest.mark.parametrize("name", sorted(n for n, e in TRANSFORMS.items() if not e.extra))
def test_compiled_step_grows_linearly_with_the_leaves(name):
  entry = TRANSFORMS[name]
  growth, new_kernels = _growth(lambda: optax.chain(_make(entry), optax.adam(1e-3)))
  assert growth <= LINEAR, f"{name}: {growth:.2f}x the instructions for 2x the leaves"
  assert new_kernels <= FEW, f"{name}: {new_kernels} more distinct kernels for {N} more leaves"


@pytest.mark.parametrize("guard", ["skip_nonfinite", "skip_on_spike", "skip_steps"])
def test_fused_guarded_step_grows_linearly_with_the_leaves(guard):
  make = {"skip_nonfinite": og.skip_nonfinite, "skip_on_spike": og.skip_on_spike,
          "skip_steps": lambda tx: og.skip_steps(tx, [(3, 5)])}[guard]
  growth, new_kernels = _growth(
      lambda: make(optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-3))), fused=True)
  assert growth <= LINEAR, f"{guard}: {growth:.2f}x the instructions for 2x the leaves"
  assert new_kernels <= FEW, f"{guard}: {new_kernels} more distinct kernels for {N} more leaves"


def test_the_measure_sees_a_quadratic_program():
  """The control: every leaf's arithmetic reading an n-term chain of scalars
  (the pattern that made AdaGC's compile time quadratic) fails the bound."""

  def quadratic():
    def update(g, s, p=None, **kw):
      leaves, treedef = jax.tree.flatten(g)
      total = jnp.zeros((), jnp.float32)
      for x in leaves:
        total = total + jnp.sum(x * x)
      ok = jnp.isfinite(total)
      return jax.tree.unflatten(treedef, [jnp.where(ok, x, 0.0) * jnp.sum(x) for x in leaves]), s

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

  assert _growth(quadratic)[0] > LINEAR


def test_the_measure_sees_a_kernel_per_leaf():
  """The control: every leaf scaled by its own element of one vector, cut at the
  leaf's offset (how AdaGC handed out its factors before ``split_rows``),
  adds a distinct kernel per leaf."""

  def per_leaf():
    def update(g, s, p=None, **kw):
      leaves, treedef = jax.tree.flatten(g)
      factors = jnp.stack([jnp.sum(x * x) for x in leaves])
      factors = jnp.minimum(1.0, 1.0 / factors)
      return jax.tree.unflatten(treedef, [x * factors[i] for i, x in enumerate(leaves)]), s

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

  growth, new_kernels = _growth(per_leaf)
  assert growth <= LINEAR and new_kernels > FEW
