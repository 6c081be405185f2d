"""Tests of optax_guard._penalties: add_l1_penalty, add_l2_penalty.

The added terms are checked against ``jax.grad`` of the penalties
``weight * sum(|p|)`` and ``weight * sum(p**2)`` (Keras ``L1``/``L2``) and
against ``optax.add_decayed_weights`` (which adds ``w * p``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import make_tree
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_guard as og


def _l1(w):
  return lambda p: w * sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(p))


def _l2(w):
  return lambda p: w * sum(jnp.sum(x**2) for x in jax.tree.leaves(p))


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), weight=st.sampled_from([1e-4, 0.01, 0.5, 3.0]))
def test_add_penalties_equal_jax_grad_of_penalty(seed, weight):
  params, grads = make_tree(seed), make_tree(seed + 1)
  for factory, penalty in [(og.add_l1_penalty, _l1), (og.add_l2_penalty, _l2)]:
    tx = factory(weight)
    out, _ = tx.update(grads, tx.init(params), params)
    expected = jax.tree.map(jnp.add, grads, jax.grad(penalty(weight))(params))
    chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=1e-7)
    # independent NumPy float64 closed form
    for o, g, p in zip(jax.tree.leaves(out), jax.tree.leaves(grads),
                       jax.tree.leaves(params), strict=True):
      p64, g64 = np.asarray(p, np.float64), np.asarray(g, np.float64)
      term = weight * np.sign(p64) if factory is og.add_l1_penalty else 2 * weight * p64
      np.testing.assert_allclose(np.asarray(o, np.float64), g64 + term, rtol=1e-6, atol=1e-7)


def test_add_l1_penalty_uses_subgradient_zero_at_zero():
  p = jnp.array([0.0, -0.0, 1.0, -2.0])
  g = jnp.array([0.25, -0.25, 0.0, 0.0])
  out, _ = og.add_l1_penalty(0.5).update(g, optax.EmptyState(), p)
  np.testing.assert_array_equal(out, [0.25, -0.25, 0.5, -0.5])


def test_add_l2_penalty_is_add_decayed_weights_with_twice_the_weight():
  params, grads = make_tree(3), make_tree(4)
  ours, _ = og.add_l2_penalty(0.05).update(grads, optax.EmptyState(), params)
  tx = optax.add_decayed_weights(0.1)
  theirs, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=0)
  single = optax.add_decayed_weights(0.05)
  half, _ = single.update(grads, single.init(params), params)
  assert not np.allclose(ours["dense"]["kernel"], half["dense"]["kernel"])


def test_add_l2_penalty_in_chain_is_sgd_on_the_penalised_loss():
  params = make_tree(5)
  target = make_tree(6)
  loss = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in zip(
      jax.tree.leaves(p), jax.tree.leaves(target), strict=True))
  opt = optax.chain(og.add_l2_penalty(0.1), og.add_l1_penalty(0.01), optax.sgd(0.05))
  ref = optax.sgd(0.05)
  p1, p2 = params, params
  s1, s2 = opt.init(p1), ref.init(p2)
  full = lambda p: loss(p) + _l2(0.1)(p) + _l1(0.01)(p)
  for _ in range(5):
    u1, s1 = opt.update(jax.grad(loss)(p1), s1, p1)
    u2, s2 = ref.update(jax.grad(full)(p2), s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factory", [og.add_l1_penalty, og.add_l2_penalty])
def test_add_penalties_respect_masks(factory):
  params, grads = make_tree(7), make_tree(8)
  full, _ = factory(0.3).update(grads, optax.EmptyState(), params)
  tree_mask = {"dense": {"kernel": True, "bias": False}, "scale": False}
  prefix_mask = {"dense": True, "scale": False}
  fn_mask = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
  for mask, on in [
      (tree_mask, {"kernel"}), (fn_mask, {"kernel"}), (prefix_mask, {"kernel", "bias"}),
  ]:
    tx = factory(0.3, mask=mask)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    flat_out = dict(jax.tree.leaves_with_path(out))
    flat_full = dict(jax.tree.leaves_with_path(full))
    flat_g = dict(jax.tree.leaves_with_path(grads))
    for path, o in flat_out.items():
      name = jax.tree_util.keystr(path).split("'")[-2]
      if name in on:  # (jit may fuse g + 2*w*p into an FMA: one rounding apart)
        np.testing.assert_allclose(o, flat_full[path], rtol=1e-6)
      else:  # masked out: bitwise unchanged
        np.testing.assert_array_equal(o, flat_g[path])
        assert not np.array_equal(o, flat_full[path])


def test_add_penalties_callable_mask_under_inject_hyperparams():
  params, grads = make_tree(9), make_tree(10)
  fn_mask = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
  tx = optax.inject_hyperparams(og.add_l2_penalty, static_args=("mask",))(0.2, mask=fn_mask)
  s = tx.init(params)
  assert set(s.hyperparams) == {"weight"}
  out, s = jax.jit(tx.update)(grads, s, params)
  ref, _ = og.add_l2_penalty(0.2, mask=fn_mask).update(grads, optax.EmptyState(), params)
  chex.assert_trees_all_close(out, ref, rtol=1e-6)
  s.hyperparams["weight"] = jnp.float32(0.0)
  out, _ = jax.jit(tx.update)(grads, s, params)
  chex.assert_trees_all_equal(out, grads)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_add_penalties_keep_low_precision_dtypes(dtype):
  params = make_tree(11, jnp.float32)
  grads = make_tree(12, dtype)
  for factory, term in [(og.add_l1_penalty, lambda p: 0.1 * np.sign(p)),
                        (og.add_l2_penalty, lambda p: 0.2 * p)]:
    out, _ = factory(0.1).update(grads, optax.EmptyState(), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
    for o, g, p in zip(jax.tree.leaves(out), jax.tree.leaves(grads),
                       jax.tree.leaves(params), strict=True):
      expected = np.asarray(g, np.float64) + term(np.asarray(p, np.float64))
      # one rounding to the low-precision dtype
      np.testing.assert_array_equal(np.asarray(o), np.asarray(jnp.asarray(expected, dtype)))
