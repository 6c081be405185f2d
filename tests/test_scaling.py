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

pytestmark = pytest.mark.xla_cpu  # the optimized program of XLA:CPU


def _tree(n: int) -> dict:
  return {f"w{i:03d}": jax.ShapeDtypeStruct((4, 4), jnp.float32) for i in range(n)}


def _instructions(tx: optax.GradientTransformation, n: int, fused: bool = False) -> int:
  tx = optax.with_extra_args_support(tx)
  params = _tree(n)
  state = jax.eval_shape(tx.init, params)

  def step(p, s, g):
    if fused:
      return og.update_and_apply(tx, g, s, p, value=jnp.float32(1.0))
    u, s = tx.update(g, s, p, value=jnp.float32(1.0))
    return optax.apply_updates(p, u), s

  text = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()
  return len(re.findall(r"^\s*(?:ROOT )?%\S+ = ", text, re.M))


def _growth(tx_fn, fused: bool = False) -> float:
  return _instructions(tx_fn(), 2 * N, fused) / _instructions(tx_fn(), N, fused)


@pytest.mark.parametrize("name", sorted(n for n, e in TRANSFORMS.items() if not e.extra))
def test_compiled_step_grows_linearly_with_the_leaves(name):
  entry = TRANSFORMS[name]
  growth = _growth(lambda: optax.chain(_make(entry), optax.adam(1e-3)))
  assert growth <= LINEAR, f"{name}: {growth:.2f}x the instructions for 2x the leaves"


@pytest.mark.parametrize("guard", ["skip_nonfinite", "skip_on_spike", "skip_steps"])
def test_fused_guarded_step_grows_linearly_with_the_leaves(guard):
  make = {"skip_nonfinite": og.skip_nonfinite, "skip_on_spike": og.skip_on_spike,
          "skip_steps": lambda tx: og.skip_steps(tx, [(3, 5)])}[guard]
  growth = _growth(lambda: make(optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-3))),
                   fused=True)
  assert growth <= LINEAR, f"{guard}: {growth:.2f}x the instructions for 2x the leaves"


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

  assert _growth(quadratic) > LINEAR
