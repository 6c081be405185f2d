"""Stacked (scanned) layers: each layer slice of a leaf is a tensor of its own.

A model built with ``nnx.scan`` keeps all layers' kernels in one leaf
``(layers, ...)``. With ``stacked``, every per-tensor statistic
(``clip_by_norm``, ``clip_by_axis_norm``, ``adaptive_grad_clip``,
``clip_weights_by_norm`` and ``monitor(per_leaf=True)``) gives the scanned
tree the updates and statistics of its unrolled twin, a dict of separate
layers: eagerly, under ``jit`` and under ``optax.inject_hyperparams``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import (
    SCANNED_SPEC,
    assert_bitwise_equal,
    restack,
    scanned_tree,
    unroll,
)

import optax_guard as og
from optax_guard import _numerics as num


@dataclasses.dataclass(frozen=True)
class Case:
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict
  needs_params: bool = False
  static: tuple[str, ...] = ()


CASES: dict[str, Case] = {
    "clip_by_norm": Case(og.clip_by_norm, dict(max_norm=1.0)),
    "clip_by_norm/ord=1": Case(og.clip_by_norm, dict(max_norm=1.0, ord=1), static=("ord",)),
    "clip_by_norm/ord=inf": Case(og.clip_by_norm, dict(max_norm=0.5, ord="inf")),
    "clip_by_axis_norm": Case(og.clip_by_axis_norm, dict(max_norm=0.5)),
    "adaptive_grad_clip": Case(og.adaptive_grad_clip, dict(clipping=0.05), needs_params=True),
    "clip_weights_by_norm": Case(og.clip_weights_by_norm, dict(max_norm=1.0), needs_params=True),
    "monitor": Case(og.monitor, dict(per_leaf=True)),
}

SPECS: dict[str, Any] = {
    "prefix": SCANNED_SPEC,
    "full_tree": {"blocks": {"kernel": 1, "bias": 1, "gain": 1}, "head": 0},
    "callable": lambda path, leaf: 1 if path[0].key == "blocks" else 0,
}


def _steps(case: Case, tx, trees, params, jit):
  """Two updates of ``tx`` on ``trees`` (a list); the outputs and the final state."""
  update = jax.jit(tx.update) if jit else tx.update
  state, outs = tx.init(params), []
  for g in trees:
    out, state = update(g, state, params if case.needs_params else None)
    outs.append(out)
  return outs, state


def _build(case: Case, mode: str, stacked: Any):
  kwargs = {**case.kwargs, "stacked": stacked}
  if mode == "inject_jit":  # a tree of ints is static by itself, a callable is not
    static = ("stacked",) if callable(stacked) or isinstance(stacked, int) else ()
    return optax.inject_hyperparams(case.factory, static_args=case.static + static)(**kwargs)
  return case.factory(**kwargs)


def assert_twins_equal(got, want):
  """The scanned result equals the unrolled one, up to the order of a reduction.

  Exact on XLA:CPU. XLA:GPU may sum a layer slice of a stacked leaf in
  another order than the separate leaf of the unrolled model, which moves a
  norm, and so a clipped value, by an ulp: hence ``rtol=1e-6``.
  """
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)


def _state_of(state, mode):
  return state.inner_state if mode == "inject_jit" else state


@pytest.mark.parametrize("mode", ["eager", "jit", "inject_jit"])
@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_scanned_tree_gets_the_updates_of_its_unrolled_twin(name, spec, mode):
  case = CASES[name]
  grads = [scanned_tree(10), scanned_tree(11, scales=(3.0, 0.01, 1.0))]
  params = scanned_tree(1)
  scanned, s_state = _steps(case, _build(case, mode, SPECS[spec]), grads, params, mode != "eager")
  unrolled, u_state = _steps(
      case, _build(case, mode, None), [unroll(g) for g in grads], unroll(params), mode != "eager"
  )
  # each layer slice is reduced on its own, as the unrolled leaf is
  assert_twins_equal(scanned, [restack(u) for u in unrolled])
  if name == "monitor":
    assert_bitwise_equal(scanned, grads)  # an identity
    s_state, u_state = _state_of(s_state, mode), _state_of(u_state, mode)
    assert_twins_equal(s_state.leaf_norms, restack(u_state.leaf_norms))
    assert s_state.leaf_norms["blocks"]["kernel"].shape == (3,)
    assert_bitwise_equal(s_state.max_abs, u_state.max_abs)
    assert_bitwise_equal(s_state.num_nonfinite, u_state.num_nonfinite)
    # the global sum of squares adds the same terms in another order: rounding only
    np.testing.assert_allclose(s_state.global_norm, u_state.global_norm, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_int_stacked_on_a_tree_of_stacked_leaves(name):
  """``stacked=1`` for every leaf; the layer slices clip independently."""
  case = CASES[name]
  grads, params = [scanned_tree(10)["blocks"]], scanned_tree(1)["blocks"]
  scanned, _ = _steps(case, case.factory(**case.kwargs, stacked=1), grads, params, True)
  layers = [jax.tree.map(lambda x, i=i: x[i], grads[0]) for i in range(3)]
  p_layers = [jax.tree.map(lambda x, i=i: x[i], params) for i in range(3)]
  tx = case.factory(**case.kwargs)
  per_layer = [_steps(case, tx, [g], p, True)[0][0] for g, p in zip(layers, p_layers, strict=True)]
  assert_twins_equal(scanned[0], jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer))
  if name.startswith("clip_by_norm"):  # the quiet layer is untouched, the loud one clipped
    assert_bitwise_equal(scanned[0]["kernel"][0], grads[0]["kernel"][0])
    assert not np.array_equal(scanned[0]["kernel"][2], grads[0]["kernel"][2])


@pytest.mark.parametrize("make, needs_params", [
    (lambda **kw: og.clip_by_axis_norm(0.5, axis=-1, **kw), False),
    (lambda **kw: og.adaptive_grad_clip(0.05, axis=(0,), **kw), True),
    (lambda **kw: og.clip_weights_by_norm(1.0, axis=-1, **kw), True),
], ids=["clip_by_axis_norm", "adaptive_grad_clip", "clip_weights_by_norm"])
def test_explicit_axis_refers_to_one_layer_slice(make, needs_params):
  """``axis`` counts the axes of a layer's slice, as in the unrolled model."""
  g, p = scanned_tree(10)["blocks"], scanned_tree(1)["blocks"]
  del g["gain"], p["gain"]  # an explicit axis applies to every leaf: no scalar slices
  tx, plain = make(stacked=1), make()
  out, _ = jax.jit(tx.update)(g, tx.init(p), p if needs_params else None)
  layers = []
  for i in range(3):
    gi, pi = jax.tree.map(lambda x, i=i: x[i], g), jax.tree.map(lambda x, i=i: x[i], p)
    layers.append(jax.jit(plain.update)(gi, plain.init(pi), pi if needs_params else None)[0])
  assert_twins_equal(out, jax.tree.map(lambda *xs: jnp.stack(xs), *layers))


def test_stacked_none_and_zero_are_the_plain_transformation():
  g = scanned_tree(10)
  for stacked in (None, 0, {"blocks": None, "head": None}, lambda path, leaf: 0):
    out, _ = og.clip_by_norm(1.0, stacked=stacked).update(g, optax.EmptyState())
    assert_bitwise_equal(out, og.clip_by_norm(1.0).update(g, optax.EmptyState())[0])


# ---------------------------------------------------------------------------
# Bad values: at construction, or when the tree is known (trace time)
# ---------------------------------------------------------------------------


def _make(name, stacked):
  case = CASES[name]
  return case, case.factory(**case.kwargs, stacked=stacked)


@pytest.mark.parametrize("bad", [-1, True, 1.0, "layers", {"blocks": -1, "head": None},
                                 {"blocks": True, "head": None}],
                         ids=["negative", "bool", "float", "string", "tree_negative", "tree_bool"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_stacked_raises_at_construction(name, bad):
  owner = CASES[name].factory.__name__
  with pytest.raises(TypeError, match=rf"{owner}\(stacked=\.\.\.\)"):
    _make(name, bad)


def _update(name, stacked, tree):
  case, tx = _make(name, stacked)
  params = tree if case.needs_params else None
  return jax.jit(tx.update)(tree, tx.init(tree), params)


@pytest.mark.parametrize("name", sorted(CASES))
def test_more_layer_axes_than_the_leaf_has_names_the_leaf(name):
  owner = CASES[name].factory.__name__
  with pytest.raises(ValueError, match=rf"{owner}\(stacked=\.\.\.\).*\['blocks'\]\['gain'\]"):
    _update(name, {"blocks": 2, "head": None}, scanned_tree(0))


@pytest.mark.parametrize("bad", [{"blocks": 1}, {"blocks": 1, "head": None, "extra": 1},
                                 [1, None]], ids=["missing_key", "extra_key", "list"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_stacked_tree_that_is_no_prefix_raises(name, bad):
  owner = CASES[name].factory.__name__
  with pytest.raises(ValueError, match=rf"{owner}\(stacked=\.\.\.\) must be a prefix"):
    _update(name, bad, scanned_tree(0))


@pytest.mark.parametrize("bad", [-1, True, 0.5], ids=["negative", "bool", "float"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_stacked_callable_returning_a_bad_count_names_the_leaf(name, bad):
  owner = CASES[name].factory.__name__
  with pytest.raises(TypeError, match=rf"{owner}\(stacked=\.\.\.\) gave .*\['head'\]"):
    _update(name, lambda path, leaf: bad if path[0].key == "head" else 1, scanned_tree(0))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_int_stacked_traced_by_inject_hyperparams_asks_for_static_args(name, jit):
  """An int ``stacked`` becomes an array under inject_hyperparams: both modes say so."""
  case = CASES[name]
  tx = optax.inject_hyperparams(case.factory, static_args=case.static)(**case.kwargs, stacked=1)
  g = scanned_tree(0)["blocks"]
  with pytest.raises(TypeError, match=r"\(stacked=.*static_args=\('stacked',\)"):
    state = tx.init(g)
    (jax.jit(tx.update) if jit else tx.update)(g, state, g)


# ---------------------------------------------------------------------------
# monitor: state shapes from init, and the shared counting of layer axes
# ---------------------------------------------------------------------------


def test_monitor_stacked_state_shapes_from_init_and_no_retrace():
  tx = og.monitor(per_leaf=True, stacked=SCANNED_SPEC)
  g = scanned_tree(0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), g)
  state = tx.init(abstract)
  shapes = jax.tree.map(jnp.shape, state.leaf_norms)
  assert shapes == {"blocks": {"kernel": (3,), "bias": (3,), "gain": (3,)}, "head": ()}
  traces = []

  @jax.jit
  def step(g, state):
    traces.append(1)
    return tx.update(g, state)

  for seed in range(3):
    _, state = step(scanned_tree(seed), state)
  assert len(traces) == 1
  np.testing.assert_allclose(
      state.leaf_norms["blocks"]["gain"], np.abs(np.asarray(scanned_tree(2)["blocks"]["gain"]))
  )
  # guard_stats reports scalars: the unstacked leaf's norm, not the per-layer arrays
  stats = og.guard_stats(state)
  assert "monitor/leaf_norms/head" in stats
  assert not any("blocks" in k for k in stats)


def test_stacked_counts_forms():
  g = scanned_tree(0)
  expected = [1, 1, 1, 0]  # bias, gain, kernel, head in jax.tree.leaves order
  assert num.stacked_counts("f", g, SCANNED_SPEC) == expected
  assert num.stacked_counts("f", g, SPECS["callable"]) == expected
  assert num.stacked_counts("f", g, None) == [0, 0, 0, 0]
  assert num.stacked_counts("f", g["blocks"], 1) == [1, 1, 1]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), g)
  assert num.stacked_counts("f", abstract, SCANNED_SPEC) == expected
