"""Tests of the stateless clipping family (optax_guard/_clipping.py).

Properties are checked with hypothesis over random trees (nested dicts and
lists, scalars, empty trees, empty arrays) in float32, bfloat16 and float16,
against NumPy float64 closed forms written here, and against optax's own
transforms where the semantics overlap.

Rounding: a clipped output is rounded to the leaf dtype, so "the bound holds"
means ``||out|| <= c * (1 + 2u + 2e-5) + n * delta`` where ``u`` is the leaf
dtype's unit roundoff (2**-24, 2**-8, 2**-11), ``2e-5`` covers the float32
accumulation of the norm and ``delta`` is half the smallest subnormal (the
absolute rounding error near zero).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import assert_bitwise_equal, f64, np_global_norm, np_norm, np_unit_axes
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_guard as og

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
SHAPES = ((), (0,), (3, 0), (1,), (4,), (2, 3), (3, 1, 2))
ORDS = (None, 1, math.inf)  # None is L2; ord=2 is checked equal to None below
ACC = 2e-5  # relative error of a float32-accumulated norm of a small tree


# ---------------------------------------------------------------------------
# Strategies and helpers
# ---------------------------------------------------------------------------


def _unit_roundoff(dtype) -> float:
  return float(jnp.finfo(dtype).eps) / 2


def _delta(dtype) -> float:
  return float(jnp.finfo(dtype).smallest_subnormal) / 2


def _build(spec, rng, scale):
  if isinstance(spec, tuple):
    shape, dtype = spec
    vals = (rng.standard_normal(shape) * scale).astype(np.float32)
    return jnp.asarray(vals).astype(dtype)
  if isinstance(spec, list):
    return [_build(s, rng, scale) for s in spec]
  return {k: _build(s, rng, scale) for k, s in spec.items()}


_leaf_specs = st.tuples(st.sampled_from(SHAPES), st.sampled_from(DTYPES))
_specs = st.recursive(
    _leaf_specs,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.dictionaries(st.sampled_from("abcd"), kids, max_size=3),
    ),
    max_leaves=5,
)


@st.composite
def trees(draw, n=1, specs=_specs):
  """``n`` random trees of one structure and dtypes (e.g. params and updates)."""
  spec = draw(specs)
  out = []
  for _ in range(n):
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    out.append(_build(spec, rng, scale))
  return out[0] if n == 1 else tuple(out)


f32_trees = trees(specs=st.recursive(
    st.tuples(st.sampled_from(SHAPES), st.just(jnp.float32)),
    lambda kids: st.dictionaries(st.sampled_from("abcd"), kids, max_size=3),
    max_leaves=4,
))

bounds = st.sampled_from([1e-2, 0.3, 1.0, 4.0, 100.0])


def _update(tx, updates, params=None):
  out, _ = tx.update(updates, tx.init(params if params is not None else updates), params)
  return out


def _assert_same_structure_dtypes_shapes(out, tree):
  assert jax.tree.structure(out) == jax.tree.structure(tree)
  for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
    assert o.dtype == x.dtype and o.shape == x.shape


def _np_factor(c, n):
  """``min(1, c / n)`` in float64, 1 for a zero norm."""
  n = np.asarray(n, np.float64)
  return np.where(n > c, c / np.where(n > 0, n, 1.0), 1.0)


# Reference closed forms: tree of float64 leaves -> (expected leaves, norms fn)
def _ref_global(c, ord):  # noqa: A002
  def ref(leaves64):
    f = _np_factor(c, np_global_norm(leaves64, ord))
    return [x * f for x in leaves64]

  def norms(leaves64):
    return np.atleast_1d(np_global_norm(leaves64, ord))

  return ref, norms


def _ref_per_leaf(c, ord):  # noqa: A002
  def ref(leaves64):
    return [x * _np_factor(c, np_norm(x, ord)) for x in leaves64]

  def norms(leaves64):
    return np.array([np_norm(x, ord) for x in leaves64])

  return ref, norms


def _ref_per_unit(c, axis=None):
  def unit_norms(x):
    return np_norm(x, 2, axis=np_unit_axes(x.ndim, axis), keepdims=True)

  def ref(leaves64):
    return [x * _np_factor(c, unit_norms(x)) for x in leaves64]

  def norms(leaves64):
    return np.concatenate([unit_norms(x).ravel() for x in leaves64] + [np.zeros(0)])

  return ref, norms


def _check_norm_clip(tx, tree, c, reference):
  """Bound, direction, closed form, idempotence, dtypes, no NaN."""
  ref, norms = reference
  out = _update(tx, tree)
  _assert_same_structure_dtypes_shapes(out, tree)
  xs = [f64(x) for x in jax.tree.leaves(tree)]
  os_ = [f64(o) for o in jax.tree.leaves(out)]
  for x, o, e, leaf in zip(xs, os_, ref(xs), jax.tree.leaves(tree), strict=True):
    u, d = _unit_roundoff(leaf.dtype), _delta(leaf.dtype)
    assert np.all(np.isfinite(o))
    # closed form (which also fixes the factor: one factor per leaf/unit/tree)
    assert np.all(np.abs(o - e) <= (2 * u + ACC) * np.abs(e) + d), (x, o, e)
    # direction: out = f * x with 0 <= f <= 1, exactly (the multiply is monotone)
    assert np.all(np.abs(o) <= np.abs(x))
    assert np.all(o * x >= 0)
    assert np.all(o[x == 0] == 0)
  # the bound holds up to the rounding of the output to the leaf dtype
  leaves = jax.tree.leaves(tree)
  u_max = max((_unit_roundoff(x.dtype) for x in leaves), default=0.0)
  slack = sum(x.size for x in xs) * max((_delta(x.dtype) for x in leaves), default=0.0)
  excess = 2 * u_max + ACC + slack / c  # relative overshoot of the bound after rounding
  assert np.all(norms(os_) <= c * (1 + excess)), (norms(os_), c)
  # idempotent within rounding: the second factor is 1 or at least 1 - excess
  twice = _update(tx, out)
  for o, t, leaf in zip(os_, jax.tree.leaves(twice), jax.tree.leaves(tree), strict=True):
    u, d = _unit_roundoff(leaf.dtype), _delta(leaf.dtype)
    assert np.all(np.abs(f64(t) - o) <= (excess + u) * np.abs(o) + 2 * d)
  return out


# ---------------------------------------------------------------------------
# Norm clipping: properties against float64 closed forms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ord", ORDS)
@given(tree=trees(), c=bounds)
def test_clip_by_global_norm_bound_direction_closed_form(ord, tree, c):  # noqa: A002
  _check_norm_clip(og.clip_by_global_norm(c, ord=ord), tree, c, _ref_global(c, ord))


@pytest.mark.parametrize("ord", ORDS)
@given(tree=trees(), c=bounds)
def test_clip_by_norm_bound_direction_closed_form(ord, tree, c):  # noqa: A002
  _check_norm_clip(og.clip_by_norm(c, ord=ord), tree, c, _ref_per_leaf(c, ord))


@given(tree=trees(), c=bounds)
def test_clip_by_axis_norm_bound_direction_closed_form(tree, c):
  _check_norm_clip(og.clip_by_axis_norm(c), tree, c, _ref_per_unit(c))


@given(tree=trees(specs=st.tuples(st.sampled_from([(2, 3), (3, 1, 2), (2, 2, 2, 3)]),
                                  st.sampled_from(DTYPES))),
       c=bounds, axis=st.sampled_from([0, -1, 1, (0, 1), (0, -1)]))
def test_clip_by_axis_norm_explicit_axes_closed_form(tree, c, axis):
  _check_norm_clip(og.clip_by_axis_norm(c, axis), tree, c, _ref_per_unit(c, axis))


def _own_norms(kind, tree, ord):  # noqa: A002
  """The float32 norms the transform itself compares with the bound."""
  from optax_guard import _numerics as num

  if kind == "global":
    return [num.global_norm(tree, ord)]
  if kind == "leaf":
    return jax.tree.leaves(num.leaf_norms(tree, ord))
  return [num.unit_norm(x) for x in jax.tree.leaves(tree)]


_FACTORIES = {
    "global": lambda c, ord: og.clip_by_global_norm(c, ord=ord),
    "leaf": lambda c, ord: og.clip_by_norm(c, ord=ord),
    "unit": lambda c, ord: og.clip_by_axis_norm(c),
}


@pytest.mark.parametrize("kind", sorted(_FACTORIES))
@given(tree=trees(), slack=st.sampled_from([1.0, 1.5, 1e3]), ord=st.sampled_from(ORDS))
def test_norm_clipping_unchanged_at_or_under_bound(kind, tree, slack, ord):  # noqa: A002
  """clip_by_{global_norm,norm,axis_norm}: bitwise identity at/under the bound."""
  norms = [float(np.max(np.asarray(n), initial=0.0)) for n in _own_norms(kind, tree, ord)]
  top = max(norms, default=0.0)
  c = top * slack if top > 0 else 1.0  # slack 1.0: the largest norm is exactly at c
  assert_bitwise_equal(_update(_FACTORIES[kind](c, ord), tree), tree)


@pytest.mark.parametrize("kind", sorted(_FACTORIES))
@pytest.mark.parametrize("ord", ORDS)
@settings(max_examples=10)
@given(tree=trees(), c=bounds)
def test_norm_clipping_zero_gradients_give_zeros(kind, ord, tree, c):  # noqa: A002
  zeros = jax.tree.map(jnp.zeros_like, tree)
  assert_bitwise_equal(_update(_FACTORIES[kind](c, ord), zeros), zeros)


def test_clip_by_norm_ord_spellings_agree():
  g = {"a": jnp.array([3.0, -4.0]), "b": jnp.ones((2, 2), jnp.bfloat16)}
  for factory in (og.clip_by_norm, og.clip_by_global_norm):
    assert_bitwise_equal(_update(factory(1.0, ord=2), g), _update(factory(1.0), g))
    for spelling in ("inf", np.inf):
      assert_bitwise_equal(_update(factory(1.0, ord=spelling), g),
                            _update(factory(1.0, ord=math.inf), g))


def test_clip_by_global_norm_examples():
  g = {"a": jnp.array([3.0]), "b": [jnp.array([[0.0, 4.0]])]}
  out = _update(og.clip_by_global_norm(1.0), g)
  np.testing.assert_allclose(out["a"], [0.6], rtol=1e-6)
  np.testing.assert_allclose(out["b"][0], [[0.0, 0.8]], rtol=1e-6)
  out = _update(og.clip_by_global_norm(1.0, ord=1), g)  # ||g||_1 = 7
  np.testing.assert_allclose(out["a"], [3 / 7], rtol=1e-6)
  out = _update(og.clip_by_global_norm(2.0, ord=math.inf), g)  # ||g||_inf = 4
  np.testing.assert_allclose(out["b"][0], [[0.0, 2.0]], rtol=1e-6)
  assert _update(og.clip_by_global_norm(1.0), {}) == {}
  s = _update(og.clip_by_global_norm(2.0), jnp.float32(-8.0))
  assert float(s) == -2.0


# ---------------------------------------------------------------------------
# Agreement with optax
# ---------------------------------------------------------------------------


@given(tree=f32_trees, c=bounds)
def test_clip_by_global_norm_matches_optax_in_float32(tree, c):
  ours = _update(og.clip_by_global_norm(c), tree)
  theirs = _update(optax.clip_by_global_norm(c), tree)
  chex.assert_trees_all_close(ours, theirs, rtol=2e-6, atol=1e-30)
  if float(optax.tree.norm(tree)) < c * (1 - 1e-5):  # clearly under: both return g itself
    assert_bitwise_equal(ours, theirs)


@given(tree=f32_trees, c=bounds)
def test_clip_by_norm_matches_optax_global_clip_per_leaf(tree, c):
  ours = _update(og.clip_by_norm(c), tree)
  theirs = jax.tree.map(lambda x: _update(optax.clip_by_global_norm(c), x), tree)
  chex.assert_trees_all_close(ours, theirs, rtol=2e-6, atol=1e-30)


@given(tree=trees(specs=st.tuples(st.sampled_from([(), (0,), (1,), (5,)]),
                                  st.sampled_from(DTYPES))), c=bounds)
def test_clip_by_axis_norm_on_vectors_equals_clip_by_norm(tree, c):
  a = _update(og.clip_by_axis_norm(c), tree)
  b = _update(og.clip_by_norm(c), tree)
  chex.assert_trees_all_close(a, b, rtol=2 * _unit_roundoff(tree.dtype), atol=0)


@given(tree=f32_trees, c=st.floats(1e-3, 5.0))  # c = 0 is a zero-width box: rejected
def test_clip_by_value_matches_optax_clip(tree, c):
  assert_bitwise_equal(_update(og.clip_by_value(c), tree), _update(optax.clip(c), tree))


# ---------------------------------------------------------------------------
# float16: the norm of a GPT-2-sized embedding gradient
# ---------------------------------------------------------------------------


def test_clip_by_global_norm_float16_large_leaf_differs_from_optax():
  """50257x768 entries of 0.1 in float16: the true norm is about 621.1.

  Squaring in float16 overflows (the sum of squares is 3.9e5 > 65504), so
  ``optax.global_norm`` is inf and ``optax.clip_by_global_norm`` zeroes every
  update; ours accumulates in float32.
  """
  g = {"wte": jnp.full((50257, 768), 0.1, jnp.float16), "b": jnp.full((768,), 0.1, jnp.float16)}
  v = float(np.float16(0.1))  # 0.0999755859375
  n_elems = 50257 * 768 + 768
  true = math.sqrt(v * v * n_elems)  # 621.1223675...
  ours_norm = float(og._numerics.global_norm(g))
  assert math.isfinite(ours_norm)
  assert abs(ours_norm - true) / true < 1e-3

  tx = og.clip_by_global_norm(1.0)
  out = jax.jit(tx.update)(g, tx.init(g))[0]
  assert out["wte"].dtype == jnp.float16 and out["wte"].shape == (50257, 768)
  wte = np.asarray(out["wte"])
  w = float(wte.flat[0])
  assert np.all(wte == wte.flat[0])  # a constant leaf stays constant
  out_norm = math.sqrt(w * w * wte.size + float(np.sum(f64(out["b"]) ** 2)))
  assert abs(out_norm - 1.0) < 1e-3

  assert not math.isfinite(float(optax.tree.norm(g)))
  otx = optax.clip_by_global_norm(1.0)
  theirs = jax.jit(otx.update)(g, otx.init(g))[0]
  assert not np.any(np.asarray(theirs["wte"])) and not np.any(np.asarray(theirs["b"]))


# ---------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_by_global_norm_nan_makes_everything_nan(ord, dtype):  # noqa: A002
  g = {"a": jnp.array([1.0, jnp.nan, 2.0], dtype), "b": jnp.ones((2, 2), dtype),
       "e": jnp.zeros((0,), dtype)}
  out = _update(og.clip_by_global_norm(1.0, ord=ord), g)
  assert np.all(np.isnan(f64(out["a"]))) and np.all(np.isnan(f64(out["b"])))
  assert out["e"].shape == (0,) and out["a"].dtype == dtype


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_by_global_norm_inf_gives_factor_zero(ord, dtype):  # noqa: A002
  g = {"a": jnp.array([1.0, jnp.inf, -2.0], dtype), "b": -jnp.ones((2,), dtype)}
  out = _update(og.clip_by_global_norm(1.0, ord=ord), g)
  a, b = f64(out["a"]), f64(out["b"])
  assert a[0] == 0 and a[2] == 0 and np.isnan(a[1])  # inf * 0 = NaN: not hidden
  assert np.all(b == 0)


def test_clip_by_global_norm_float32_overflow_gives_factor_zero():
  # 1e30**2 overflows float32: the L2 norm is inf, so the factor is 0.
  g = {"a": jnp.full((3,), 1e30, jnp.float32), "b": jnp.array([-2e30, 5e29], jnp.float32)}
  out = _update(og.clip_by_global_norm(1.0), g)
  for x in jax.tree.leaves(out):
    assert np.all(f64(x) == 0)
  # ord=1 and inf do not overflow there: a finite factor
  out1 = _update(og.clip_by_global_norm(1.0, ord=1), g)
  np.testing.assert_allclose(f64(out1["a"]), np.full(3, 1e30 / 5.5e30), rtol=1e-6)


def test_clip_by_norm_nonfinite_stays_in_its_leaf():
  g = {"nan": jnp.array([jnp.nan, 1.0]), "inf": jnp.array([jnp.inf, 1.0]),
       "ok": jnp.array([3.0, 4.0])}
  out = _update(og.clip_by_norm(1.0), g)
  assert np.all(np.isnan(out["nan"]))
  assert np.isnan(out["inf"][0]) and float(out["inf"][1]) == 0.0
  np.testing.assert_allclose(out["ok"], [0.6, 0.8], rtol=1e-6)


def test_clip_by_axis_norm_nonfinite_stays_in_its_unit():
  kernel = jnp.array([[jnp.nan, 3.0, jnp.inf], [1.0, 4.0, 1.0]])  # units are columns
  out = np.asarray(_update(og.clip_by_axis_norm(1.0), kernel))
  assert np.all(np.isnan(out[:, 0]))
  np.testing.assert_allclose(out[:, 1], [0.6, 0.8], rtol=1e-6)
  assert np.isnan(out[0, 2]) and out[1, 2] == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_by_value_nonfinite(dtype):
  g = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.25], dtype)
  out = f64(_update(og.clip_by_value(1.0), g))
  assert out[0] == 1.0 and out[1] == -1.0 and np.isnan(out[2]) and out[3] == 0.25
  out = f64(_update(og.clip_by_value(2.0, min_value=0.5), g))
  assert out[0] == 2.0 and out[1] == 0.5 and np.isnan(out[2]) and out[3] == 0.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_truncate_by_value_nonfinite_become_zero(dtype):
  g = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.25, -3.0], dtype)
  out = _update(og.truncate_by_value(1.0), g)
  assert out.dtype == dtype
  np.testing.assert_array_equal(f64(out), [0.0, 0.0, 0.0, 0.25, 0.0])


# ---------------------------------------------------------------------------
# clip_by_axis_norm: units
# ---------------------------------------------------------------------------


def test_clip_by_axis_norm_units():
  tx = og.clip_by_axis_norm(1.0)
  kernel = np.array([[3.0, 0.3], [4.0, 0.4]], np.float32)  # (in, out): columns are units
  np.testing.assert_allclose(_update(tx, kernel), [[0.6, 0.3], [0.8, 0.4]], rtol=1e-6)
  conv = np.ones((3, 3, 2, 4), np.float32)  # HWIO: 4 units of norm sqrt(18)
  conv[..., 3] *= 0.1  # this unit has norm 0.42: unchanged
  out = np.asarray(_update(tx, conv))
  np.testing.assert_allclose(out[..., :3], np.full((3, 3, 2, 3), 1 / math.sqrt(18)), rtol=1e-6)
  assert out[..., 3].tobytes() == conv[..., 3].tobytes()
  np.testing.assert_allclose(_update(tx, np.array([3.0, 4.0], np.float32)), [0.6, 0.8],
                             rtol=1e-6)  # a vector is one unit
  assert float(_update(tx, np.float32(-5.0))) == -1.0  # a scalar too
  rows = og.clip_by_axis_norm(1.0, axis=1)
  np.testing.assert_allclose(_update(rows, kernel.T), kernel.T * np.array([[0.2], [1.0]]),
                             rtol=1e-6)
  neg = og.clip_by_axis_norm(1.0, axis=-1)
  assert_bitwise_equal(_update(neg, kernel.T), _update(rows, kernel.T))
  tup = og.clip_by_axis_norm(1.0, axis=(0, 1))  # the whole kernel is one unit
  np.testing.assert_allclose(_update(tup, kernel), kernel / np.linalg.norm(kernel), rtol=1e-6)


@pytest.mark.parametrize(
    "axis, leaf",
    [(2, np.ones((2, 3))), (-3, np.ones((2, 3))), (0, np.float32(1.0)), ((0, 1), np.ones(3))],
)
def test_clip_by_axis_norm_out_of_range_axis_raises(axis, leaf):
  tx = og.clip_by_axis_norm(1.0, axis=axis)
  with pytest.raises(ValueError, match="axis"):
    tx.update({"w": jnp.asarray(leaf, jnp.float32)}, tx.init(None))


# ---------------------------------------------------------------------------
# clip_by_value and truncate_by_value
# ---------------------------------------------------------------------------


@given(tree=trees(), hi=st.floats(-3.0, 3.0), width=st.one_of(st.none(), st.floats(1e-3, 4.0)))
def test_clip_by_value_closed_form_and_idempotent(tree, hi, width):
  if width is None:
    hi = max(abs(hi), 1e-3)
    lo = -hi
    tx = og.clip_by_value(hi)
  else:
    lo = hi - width
    tx = og.clip_by_value(hi, min_value=lo)
  out = _update(tx, tree)
  _assert_same_structure_dtypes_shapes(out, tree)
  for x, o in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True):
    # the bounds are rounded to the leaf dtype, then the clip is exact
    lo_d = float(np.asarray(jnp.asarray(lo).astype(x.dtype), np.float64))
    hi_d = float(np.asarray(jnp.asarray(hi).astype(x.dtype), np.float64))
    np.testing.assert_array_equal(f64(o), np.clip(f64(x), lo_d, hi_d))
    inside = (f64(x) >= lo_d) & (f64(x) <= hi_d)
    assert np.asarray(o)[inside].tobytes() == np.asarray(x)[inside].tobytes()
  assert_bitwise_equal(_update(tx, out), out)


@given(tree=trees(), t=st.floats(1e-3, 10.0))
def test_truncate_by_value_closed_form_and_idempotent(tree, t):
  tx = og.truncate_by_value(t)
  out = _update(tx, tree)
  _assert_same_structure_dtypes_shapes(out, tree)
  t32 = float(np.float32(t))  # the comparison runs in float32
  for x, o in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True):
    x64 = f64(x)
    np.testing.assert_array_equal(f64(o), np.where(np.abs(x64) <= t32, x64, 0.0))
    keep = np.abs(x64) <= t32
    assert np.asarray(o)[keep].tobytes() == np.asarray(x)[keep].tobytes()
  assert_bitwise_equal(_update(tx, out), out)


@settings(max_examples=10)
@given(tree=trees())
def test_value_clipping_zero_gradients_give_zeros(tree):
  zeros = jax.tree.map(jnp.zeros_like, tree)
  for tx in (og.clip_by_value(1.0), og.clip_by_value(2.0, min_value=-0.5),
             og.truncate_by_value(1.0)):
    assert_bitwise_equal(_update(tx, zeros), zeros)


# ---------------------------------------------------------------------------
# Weight-side: clip_weights and clip_weights_by_norm
# ---------------------------------------------------------------------------


def _weights_after(tx, params, updates):
  """Per leaf ``(new, plain, param)``: the weights after ``tx``'s update and after the raw
  ``updates``, and the weights they start from (``tx``'s update checked for structure,
  dtypes and shapes first)."""
  out = _update(tx, updates, params)
  _assert_same_structure_dtypes_shapes(out, updates)
  new = optax.apply_updates(params, out)
  plain = optax.apply_updates(params, updates)
  return zip(jax.tree.leaves(new), jax.tree.leaves(plain), jax.tree.leaves(params), strict=True)


def _one_rounding(w64, p64, dtype):
  """Error of ``p + fl(w - p)`` against ``w``: the update ``w - p`` is rounded
  to the leaf dtype (half an ulp of ``|w - p|``), then the sum (half an ulp of
  ``|w|``)."""
  return (_ulp(w64 - p64, dtype) + _ulp(w64, dtype)) / 2


def _ulp(x64, dtype):
  """The spacing of ``dtype`` at each |x| (at least the smallest subnormal)."""
  finfo = jnp.finfo(dtype)
  e = np.floor(np.log2(np.maximum(np.abs(x64), float(finfo.tiny))))
  return np.maximum(2.0 ** (e - finfo.nmant), float(finfo.smallest_subnormal))


@given(pu=trees(n=2), hi=st.floats(0.05, 3.0), width=st.one_of(st.none(), st.floats(1e-3, 4.0)))
def test_clip_weights_lands_in_box(pu, hi, width):
  params, updates = pu
  lo = -hi if width is None else hi - width
  tx = og.clip_weights(hi) if width is None else og.clip_weights(hi, min_value=lo)
  for w, s, leaf in _weights_after(tx, params, updates):
    lo_d = float(np.asarray(jnp.asarray(lo).astype(leaf.dtype), np.float64))
    hi_d = float(np.asarray(jnp.asarray(hi).astype(leaf.dtype), np.float64))
    want = np.clip(f64(s), lo_d, hi_d)  # the box applied to the plain new weights
    err = _one_rounding(want, f64(leaf), leaf.dtype)
    assert np.all(np.abs(f64(w) - want) <= err), (w, want)
  # weights already in the box and a zero update: the update stays exactly zero
  inside = jax.tree.map(lambda p: jnp.clip(p, lo, hi).astype(p.dtype), params)
  zeros = jax.tree.map(jnp.zeros_like, updates)
  assert_bitwise_equal(_update(tx, zeros, inside), zeros)


@given(pu=trees(n=2, specs=st.dictionaries(
    st.sampled_from("abc"), st.tuples(st.sampled_from(SHAPES), st.just(jnp.float32)),
    min_size=1, max_size=3)), lo=st.floats(-2.0, 0.0), hi=st.floats(1e-3, 2.0))
def test_clip_weights_matches_optax_projection_box(pu, lo, hi):
  # (min_size=1: optax.projections.projection_box fails on an empty tree)
  params, updates = pu
  out = _update(og.clip_weights(hi, min_value=lo), updates, params)
  ours = optax.apply_updates(params, out)
  plain = optax.apply_updates(params, updates)
  theirs = optax.projections.projection_box(  # bounds as trees of the same structure
      plain, jax.tree.map(lambda _: lo, plain),
      jax.tree.map(lambda _: hi, plain))
  for a, b, p in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), jax.tree.leaves(params),
                     strict=True):
    assert np.all(np.abs(f64(a) - f64(b)) <= _one_rounding(f64(b), f64(p), jnp.float32))


def _keras_max_norm(w, c, axes, eps=1e-7):
  """keras.constraints.MaxNorm: ``w * clip(n, 0, c) / (eps + n)`` (Keras 3 source)."""
  n = np.sqrt(np.sum(w * w, axis=axes, keepdims=True))
  return w * np.clip(n, 0, c) / (eps + n)


@given(pu=trees(n=2), c=bounds)
def test_clip_weights_by_norm_unit_norms_bounded(pu, c):
  params, updates = pu
  for w, s, p in _weights_after(og.clip_weights_by_norm(c), params, updates):
    u = _unit_roundoff(p.dtype)
    axes = np_unit_axes(p.ndim)
    s64 = f64(s)
    want = s64 * _np_factor(c, np_norm(s64, 2, axis=axes, keepdims=True))
    # rounding of w * f, of (w * f) - p and of p + (that): three roundings
    err = 3 * u * (np.abs(want) + np.abs(f64(p))) + ACC * np.abs(want) + 3 * _delta(p.dtype)
    assert np.all(np.abs(f64(w) - want) <= err)
    bound = c * (1 + ACC) + np_norm(err, 2, axis=axes, keepdims=True)
    assert np.all(np_norm(f64(w), 2, axis=axes, keepdims=True) <= bound)


def test_clip_weights_by_norm_matches_keras_max_norm():
  """Keras' MaxNorm divides by ``eps + n`` (eps = 1e-7): every unit shrinks by
  ``n / (n + eps)``, even under the bound. Ours has no eps (a unit under the
  bound is unchanged), so the two agree to ``eps / n`` relative."""
  rng = np.random.default_rng(0)
  for shape, keras_axes in (((5, 4), (0,)), ((3, 3, 2, 6), (0, 1, 2)), ((7,), (0,))):
    p = rng.standard_normal(shape).astype(np.float32)
    u = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    w = (p + u).astype(np.float64)
    norms = np.sqrt(np.sum(w * w, axis=keras_axes))
    assert norms.min() > 0.05
    # some units clipped and some not; all clipped; none clipped
    for c in (float(np.median(norms)), 0.5 * norms.min(), 2.0 * norms.max()):
      out = _update(og.clip_weights_by_norm(c), jnp.asarray(u), jnp.asarray(p))
      ours = f64(optax.apply_updates(jnp.asarray(p), out))
      np.testing.assert_allclose(ours, _keras_max_norm(w, c, keras_axes), rtol=1e-5, atol=1e-6)


def test_clip_weights_by_norm_explicit_axis():
  p = jnp.zeros((2, 3))
  u = jnp.array([[3.0, 0.0, 0.1], [4.0, 0.0, 0.0]])
  out = _update(og.clip_weights_by_norm(1.0, axis=1), u, p)  # rows are the units
  np.testing.assert_allclose(out, u * np.array([[1 / math.sqrt(9.01)], [0.25]]), rtol=1e-6)


# ---------------------------------------------------------------------------
# Traced hyperparameters
# ---------------------------------------------------------------------------


def test_clip_by_global_norm_traced_max_norm_under_inject_hyperparams():
  tx = optax.inject_hyperparams(og.clip_by_global_norm)(max_norm=1.0)
  g = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
  traces = []

  @jax.jit
  def step(g, s):
    traces.append(1)
    return tx.update(g, s)

  s = tx.init(g)
  out1, s = step(g, s)
  np.testing.assert_allclose(optax.tree.norm(out1), 1.0, rtol=1e-6)
  s.hyperparams["max_norm"] = jnp.float32(2.5)  # not weak-typed: no retrace
  out2, s = step(g, s)
  np.testing.assert_allclose(optax.tree.norm(out2), 2.5, rtol=1e-6)
  s.hyperparams["max_norm"] = jnp.float32(10.0)
  out3, _ = step(g, s)
  assert_bitwise_equal(out3, g)
  assert len(traces) == 1


def test_clip_by_value_traced_bounds_under_inject_hyperparams():
  tx = optax.inject_hyperparams(og.clip_by_value)(max_value=1.0)
  g = jnp.array([-3.0, 0.5, 2.0], jnp.bfloat16)
  out, s = jax.jit(tx.update)(g, tx.init(g))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(f64(out), [-1.0, 0.5, 1.0])
  s.hyperparams["max_value"] = jnp.float32(0.25)
  out, _ = jax.jit(tx.update)(g, s)
  np.testing.assert_array_equal(f64(out), [-0.25, 0.25, 0.25])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_weight_side_unchanged_when_new_weights_within_bound(dtype):
  """Weights that stay inside the box / under the norm get ``u`` back bitwise (-0.0 too)."""
  key = jax.random.PRNGKey(3)
  p = (0.1 * jax.random.normal(key, (5, 4))).astype(dtype)
  u = (0.01 * jax.random.normal(jax.random.PRNGKey(4), (5, 4))).astype(dtype)
  u = u.at[0, 0].set(-0.0).at[1, 1].set(0.0)
  for tx in (og.clip_weights(1.0), og.clip_weights_by_norm(10.0)):
    out, _ = tx.update(u, tx.init(p), p)
    assert_bitwise_equal(out, u)
  # a unit over the bound is still clipped (only that unit changes)
  big = u.at[:, 0].set(jnp.asarray(5.0, dtype))
  out, _ = og.clip_weights_by_norm(1.0).update(big, None, p)
  np.testing.assert_array_equal(np.asarray(out[:, 1:]), np.asarray(big[:, 1:]))
  w0 = np.asarray(p[:, 0] + out[:, 0], np.float64)
  assert np.linalg.norm(w0) <= 1.0 + 1e-2


def test_clip_weights_nan_new_weights_keep_their_update():
  """NaN new weights are outside no box: the update comes back as is (the weights stay NaN)."""
  p = jnp.array([jnp.nan, 0.5, -jnp.inf, 0.0])
  u = jnp.array([0.25, jnp.nan, jnp.inf, 2.0])
  out, _ = og.clip_weights(1.0).update(u, optax.EmptyState(), p)
  assert_bitwise_equal(out[:3], u[:3])
  assert float(out[3]) == 1.0
  assert np.isnan(np.asarray(optax.apply_updates(p, out))[:3]).all()
