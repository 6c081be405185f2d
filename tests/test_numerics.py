"""Tests of the shared numerics (optax_guard/_numerics.py) against NumPy float64.

Every reference is an independent NumPy float64 computation (here or in
tests/_helpers.py); nothing calls back into the code under test to get an
expected value.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import f64, np_norm, np_unit_axes
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from optax_guard import _numerics as num

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
ORDS = (1, 2, math.inf)
SHAPES = ((), (0,), (3, 0), (1,), (5,), (2, 3), (3, 1, 4))


def _rtol(dtype) -> float:
  """Tolerance of a float32-accumulated norm of inputs that are exact in ``dtype``."""
  del dtype  # the inputs are exact; only the float32 accumulation rounds
  return 2e-6


def _np_partial(x, ord, axis=None, keepdims=False):  # noqa: A002
  a = np.abs(np.asarray(x, np.float64))
  if ord == 2:
    return np.sum(a * a, axis=axis, keepdims=keepdims)
  return np_norm(x, ord, axis, keepdims)


@st.composite
def arrays(draw, shapes=SHAPES, dtypes=DTYPES):
  shape = draw(st.sampled_from(shapes))
  dtype = draw(st.sampled_from(dtypes))
  scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  vals = (rng.standard_normal(shape) * scale).astype(np.float32)
  return jnp.asarray(vals).astype(dtype)


@st.composite
def axes_for(draw, ndim):
  if ndim == 0:
    return None
  picked = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
  return tuple(sorted(picked))


# ---------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ord", ORDS)
@given(x=arrays(), data=st.data(), keepdims=st.booleans())
def test_partial_norm_matches_numpy_float64(ord, x, data, keepdims):  # noqa: A002
  axis = data.draw(axes_for(x.ndim))
  got = num.partial_norm(x, ord, axis=axis, keepdims=keepdims)
  want = _np_partial(f64(x), ord, axis=axis, keepdims=keepdims)
  assert got.dtype == jnp.float32
  assert got.shape == np.shape(want)
  np.testing.assert_allclose(f64(got), want, rtol=_rtol(x.dtype), atol=0)


@pytest.mark.parametrize("ord", (None, *ORDS))
@given(leaves=st.lists(arrays(), max_size=4))
def test_global_norm_matches_numpy_float64(ord, leaves):  # noqa: A002
  tree = {f"l{i}": x for i, x in enumerate(leaves)}
  got = num.global_norm(tree, ord)
  flat = np.concatenate([f64(x).ravel() for x in leaves]) if leaves else np.zeros(0)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(f64(got), np_norm(flat, ord), rtol=_rtol(None), atol=0)


@pytest.mark.parametrize("ord", (None, *ORDS))
@given(leaves=st.lists(arrays(), min_size=1, max_size=4))
def test_leaf_norms_matches_numpy_float64(ord, leaves):  # noqa: A002
  tree = [leaves[0], {"rest": leaves[1:]}]
  got = num.leaf_norms(tree, ord)
  assert jax.tree.structure(got) == jax.tree.structure(tree)
  for g, x in zip(jax.tree.leaves(got), leaves, strict=True):
    assert g.dtype == jnp.float32 and g.shape == ()
    np.testing.assert_allclose(f64(g), np_norm(f64(x), ord), rtol=_rtol(None), atol=0)


@pytest.mark.parametrize("ord", (None, *ORDS))
@given(x=arrays(), data=st.data())
def test_unit_norm_matches_numpy_float64(ord, x, data):  # noqa: A002
  axis = data.draw(st.one_of(st.none(), axes_for(x.ndim)))
  got = num.unit_norm(x, axis, ord)
  axes = np_unit_axes(x.ndim, axis)
  want = np_norm(f64(x), ord, axis=axes, keepdims=True)
  assert got.dtype == jnp.float32 and got.shape == want.shape
  np.testing.assert_allclose(f64(got), want, rtol=_rtol(x.dtype), atol=0)


def test_unit_norm_default_axes():
  kernel = np.arange(6.0, dtype=np.float32).reshape(2, 3)  # (in, out)
  np.testing.assert_allclose(num.unit_norm(kernel), np.sqrt((kernel**2).sum(0, keepdims=True)),
                             rtol=1e-6)
  conv = np.ones((3, 3, 2, 4), np.float32)  # HWIO: 4 units of 18 entries
  out = num.unit_norm(conv)
  assert out.shape == (1, 1, 1, 4)
  np.testing.assert_allclose(out, np.full((1, 1, 1, 4), math.sqrt(18.0)), rtol=1e-6)
  vec = np.array([3.0, 4.0], np.float32)
  np.testing.assert_allclose(num.unit_norm(vec), [5.0])
  np.testing.assert_allclose(num.unit_norm(np.float32(-2.0)), 2.0)


def test_resolve_unit_axes():
  assert num.resolve_unit_axes(0, None) == ()
  assert num.resolve_unit_axes(1, None) == (0,)
  assert num.resolve_unit_axes(2, None) == (0,)
  assert num.resolve_unit_axes(4, None) == (0, 1, 2)
  assert num.resolve_unit_axes(3, -1) == (2,)
  assert num.resolve_unit_axes(3, (2, 0, -3)) == (0, 2)
  assert num.resolve_unit_axes(2, np.int64(1)) == (1,)
  for ndim, axis in ((2, 2), (2, -3), (0, 0), (1, (0, 1))):
    with pytest.raises(ValueError, match="out of range"):
      num.resolve_unit_axes(ndim, axis)


def test_partial_norm_float16_does_not_overflow():
  # 300**2 = 90000 > float16 max 65504: squaring in float16 would give inf.
  x = jnp.full((4,), 300.0, jnp.float16)
  with np.errstate(over="ignore"):
    assert not np.isfinite(np.float16(300.0) * np.float16(300.0))
  assert float(num.partial_norm(x, 2)) == 4 * 90000.0
  assert float(num.global_norm({"x": x})) == 600.0


@pytest.mark.parametrize("ord", ORDS)
def test_norms_propagate_nan_and_inf(ord):  # noqa: A002
  nan = jnp.array([1.0, jnp.nan, 2.0], jnp.bfloat16)
  inf = jnp.array([1.0, -jnp.inf, 2.0], jnp.float16)
  assert np.isnan(num.global_norm([nan, inf], ord))
  assert np.isnan(num.partial_norm(nan, ord))
  assert np.isposinf(num.partial_norm(inf, ord))
  assert np.isposinf(num.global_norm({"a": inf, "b": jnp.ones(3)}, ord))


def test_norms_of_empty_things_are_zero():
  for ord in (None, *ORDS):
    for tree in ({}, [], {"a": jnp.zeros((0,)), "b": jnp.zeros((3, 0), jnp.float16)}):
      n = num.global_norm(tree, ord)
      assert n.dtype == jnp.float32 and float(n) == 0.0
  assert num.combine_partials([], 2).dtype == jnp.float32


def test_combine_partials_sum_or_max():
  parts = [jnp.float32(1.0), jnp.float32(4.0), jnp.float32(2.5)]
  assert float(num.combine_partials(parts, 2)) == 7.5
  assert float(num.combine_partials(parts, 1)) == 7.5
  assert float(num.combine_partials(parts, math.inf)) == 4.0
  assert float(num.combine_partials(parts[:1], "inf")) == 1.0


@pytest.mark.parametrize("ord, want", [(1, 28.0), (2, 28.0), (math.inf, 7.0)])
def test_cross_device_sums_or_maxes_partials_over_the_axis(ord, want, devices):  # noqa: A002
  """psum for ord 1 and 2 (partials are sums), pmax for inf; unchanged without axis_name."""
  partials = {"a": jnp.arange(8.0), "b": 2.0 * jnp.arange(8.0)}  # device i holds i and 2i
  mesh = Mesh(np.array(devices), ("d",))
  combine = lambda axis_name: jax.jit(jax.shard_map(
      lambda t: jax.tree.map(lambda x: x[0], num.cross_device(t, ord, axis_name)),
      mesh=mesh, in_specs=P("d"), out_specs=P()))
  out = combine("d")(partials)
  assert float(out["a"]) == want and float(out["b"]) == 2 * want
  local = jax.jit(lambda t: num.cross_device(t, ord, None))(partials)
  np.testing.assert_array_equal(local["a"], partials["a"])
  np.testing.assert_array_equal(local["b"], partials["b"])


@given(leaves=st.lists(arrays(shapes=((1,), (5,), (2, 3), (3, 1, 4), (70, 64))),
                      min_size=2, max_size=6))
def test_grouped_small_leaves_give_the_sum_of_squares(leaves):
  """The CPU path (small leaves concatenated, one sum) against NumPy float64."""
  got = jax.jit(lambda xs: num._partials(xs, 2, None, group_small=True))(leaves)
  want = sum(float(np.sum(f64(x) ** 2)) for x in leaves)
  np.testing.assert_allclose(f64(got), want, rtol=_rtol(None), atol=0)


@given(leaves=st.lists(arrays(shapes=((1,), (5,), (2, 3), (3, 2), (4, 5, 3))), min_size=2,
                      max_size=6))
def test_grouped_tensor_partials_are_each_tensors_sum_of_squares(leaves):
  """Per-tensor partials on the CPU path (equal-size small leaves as the rows of one
  concatenation; 3-d leaves stacked, one partial per layer) against NumPy float64."""
  leads = [1 if x.ndim == 3 else 0 for x in leaves]
  got = jax.jit(lambda xs: num._tensor_partials(xs, leads, 2, group_small=True))(leaves)
  for g, x, lead in zip(got, leaves, leads, strict=True):
    want = np.sum(f64(x) ** 2, axis=tuple(range(lead, x.ndim)), keepdims=lead > 0)
    assert g.shape == np.shape(want) and g.dtype == jnp.float32
    np.testing.assert_allclose(f64(g), want, rtol=_rtol(None), atol=0)


def test_grouped_small_leaves_compile_to_one_reduction():
  """Fifty small leaves: one concatenation and one reduction, no square written per leaf."""
  leaves = [jnp.full((32, 64), 0.5)] * 50
  compiled = jax.jit(lambda xs: num._partials(xs, 2, None, group_small=True)).lower(
      leaves).compile()
  text = compiled.as_text()
  assert text.count("concatenate(") == 1 and "reduce-window" not in text
  assert compiled.memory_analysis().temp_size_in_bytes <= 50 * 32 * 64 * 4 + 1024
  assert float(compiled(leaves)) == 50 * 32 * 64 * 0.25


@pytest.mark.parametrize("axis_name", ["model", ("data", "model")], ids=str)
def test_grouped_small_leaves_count_a_replicated_leaf_once(axis_name, devices):
  """Under shard_map the sharded and the replicated small leaves form separate groups,
  each counted as its own device share: 4 * 16 + 3 * 9 = 91, the bias once."""
  mesh = Mesh(np.array(devices).reshape(2, 4), ("data", "model"))
  leaves = {"kernel": jnp.full((8, 4), 4.0), "bias": jnp.full((3,), 3.0),
            "scale": jnp.full((8,), 0.0)}
  specs = {"kernel": P("model"), "bias": P(), "scale": P("model")}
  fn = jax.jit(jax.shard_map(
      lambda t: num.cross_device(num._partials(jax.tree.leaves(t), 2, axis_name,
                                               group_small=True), 2, axis_name),
      mesh=mesh, in_specs=(specs,), out_specs=P()))
  assert float(fn(leaves)) == 8 * 4 * 16.0 + 3 * 9.0


def test_a_cpu_device_alone_groups_small_leaves_in_the_compiled_step():
  """With one CPU device (a fresh process), the global norm of many small leaves is
  one reduction of their concatenation. With several (the test processes simulate 8)
  leaves are summed one by one, since jit could shard them: a sharded step that
  gathered them would fail tests/test_mesh.py's count of collectives."""
  import os
  import subprocess
  import sys
  code = (
      "import jax, jax.numpy as jnp\n"
      "from optax_guard import _numerics as num\n"
      "xs = [jnp.full((32, 64), 0.5)] * 40\n"
      "f = jax.jit(lambda xs: num.global_norm(xs))\n"
      "t = f.lower(xs).compile().as_text()\n"
      "print(t.count('concatenate('), t.count('reduce-window('), float(f(xs)))\n"
      "t = jax.jit(lambda xs: num.tensor_partials(xs, [0] * 40)).lower(xs).compile().as_text()\n"
      "print(t.count('concatenate('), t.count('reduce-window('))\n"
  )
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout.split()
  assert out[:2] == ["1", "0"] and out[3:] == ["1", "0"]  # the global and per-tensor sums
  np.testing.assert_allclose(float(out[2]), math.sqrt(40 * 32 * 64 * 0.25), rtol=1e-6)


@given(sizes=st.lists(st.integers(0, 3), min_size=0, max_size=300))
def test_split_rows_gives_the_pieces_bitwise(sizes):
  """Pieces of any sizes (empty ones too, more than one level's worth) are the rows."""
  rows = np.random.default_rng(len(sizes)).standard_normal((sum(sizes), 2)).astype(np.float32)
  got = num.split_rows(jnp.asarray(True), jnp.asarray(rows), sizes)
  want = np.split(rows, np.cumsum(sizes)[:-1]) if sizes else []
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    assert g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g), w)


def test_split_rows_rejects_sizes_that_do_not_add_up():
  with pytest.raises(ValueError, match="add up to 3"):
    num.split_rows(jnp.asarray(True), jnp.zeros((4, 2)), [1, 2])


def _distinct_slices(fn, *args) -> int:
  """How many distinct slices (result shape and bounds) the compiled ``fn`` holds."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  return len(set(re.findall(r"= (\S+) slice\([^)]*\), slice=(\{[^}]*\})", text)))


def test_split_rows_compiles_few_distinct_slices():
  """Three hundred pieces: a direct cut compiles a slice of its own per piece (each a
  distinct kernel); the cut by levels repeats a few."""
  sizes = [1] * 300
  rows = jnp.arange(600.0, dtype=jnp.float32).reshape(300, 2)
  direct = _distinct_slices(lambda r: num.split_flat(r.reshape(-1), [(2,)] * 300), rows)
  by_levels = _distinct_slices(
      lambda r: num.split_rows(r[0, 0] > 0, r, sizes), rows)
  assert direct >= 300
  assert by_levels <= 64, by_levels


def test_canonical_ord_and_accumulation_dtype():
  assert num.canonical_ord(None) == 2
  assert num.canonical_ord("inf") == math.inf
  assert num.canonical_ord(np.inf) == math.inf
  assert num.canonical_ord(1) == 1
  for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.int32):
    assert num.accumulation_dtype(d) == jnp.float32
  assert num.accumulation_dtype(np.float64) == jnp.float64


def test_norms_accumulate_in_float64_for_float64_inputs():
  """With jax_enable_x64, float64 leaves are reduced in float64."""
  with jax.enable_x64(True):
    # 1e8 + 1 is not representable in float32 (spacing 8 there).
    x = jnp.asarray(np.array([1e8, 1.0, 0.5], np.float64))
    assert x.dtype == jnp.float64
    p1 = num.partial_norm(x, 1)
    assert p1.dtype == jnp.float64 and float(p1) == 100000001.5
    n2 = num.global_norm({"x": x, "y": jnp.ones((2,), jnp.float32)})
    assert n2.dtype == jnp.float64
    assert float(n2) == math.sqrt(1e16 + 1.0 + 0.25 + 2.0)
    f = num.safe_factor(1.0, n2)
    assert f.dtype == jnp.float64
    # float32 leaves still accumulate in float32 under x64
    assert num.partial_norm(jnp.ones(3, jnp.float32), 2).dtype == jnp.float32
    assert num.partial_norm(jnp.ones(3, jnp.float16), 2).dtype == jnp.float32


# ---------------------------------------------------------------------------
# Safe factor and scaling
# ---------------------------------------------------------------------------


def test_safe_factor_edge_cases():
  f32 = jnp.float32
  assert float(num.safe_factor(1.0, f32(0.0))) == 1.0
  assert float(num.safe_factor(1e-30, f32(0.0))) == 1.0
  for c in (0.1, 1.0, 3.7, 1e-20, 1e30):
    # a norm equal to the bound (in float32) gives exactly 1
    assert float(num.safe_factor(c, f32(c))) == 1.0
    assert float(num.safe_factor(c, f32(c) * f32(0.5))) == 1.0
  assert float(num.safe_factor(1.0, f32(jnp.inf))) == 0.0
  assert np.isnan(num.safe_factor(1.0, f32(jnp.nan)))
  # an infinite bound switches clipping off: factor 1 for every non-NaN norm
  assert float(num.safe_factor(jnp.inf, f32(jnp.inf))) == 1.0
  assert float(num.safe_factor(jnp.inf, f32(3e38))) == 1.0
  assert float(num.safe_factor(jnp.inf, f32(3.0))) == 1.0
  assert np.isnan(num.safe_factor(jnp.inf, f32(jnp.nan)))
  assert float(num.safe_factor(2.0, f32(4.0))) == 0.5
  assert num.safe_factor(2.0, f32(4.0)).dtype == jnp.float32
  # the bound is cast to the norm's dtype: a traced float32 bound works under jit
  assert float(jax.jit(num.safe_factor)(jnp.float32(3.0), f32(6.0))) == 0.5


def test_safe_factor_decides_by_comparison():
  # "at or under the bound" is decided by norm <= bound, not by the rounding of
  # bound / norm (XLA:GPU's float32 division is not correctly rounded): the
  # traced function compares and selects exactly 1.
  text = str(jax.make_jaxpr(num.safe_factor)(jnp.float32(1.0), jnp.float32(1.0)))
  assert " le " in text and "select_n" in text
  rng = np.random.default_rng(0)
  c = rng.lognormal(0.0, 10.0, 20_000).astype(np.float32)
  below = np.nextafter(c, np.float32(0))
  assert np.all(np.asarray(jax.jit(num.safe_factor)(c, c)) == 1.0)
  assert np.all(np.asarray(jax.jit(num.safe_factor)(c, below)) == 1.0)
  above = np.nextafter(c, np.float32(np.inf))
  assert np.all(np.asarray(jax.jit(num.safe_factor)(c, above)) <= 1.0)


@given(c=st.floats(1e-6, 1e6), n=st.floats(0.0, 1e7))
def test_safe_factor_matches_closed_form(c, n):
  got = float(num.safe_factor(c, jnp.float32(n)))
  c32, n32 = float(np.float32(c)), float(np.float32(n))
  want = 1.0 if n32 <= c32 else c32 / n32
  assert 0.0 <= got <= 1.0
  assert got == pytest.approx(want, rel=2e-7, abs=0)
  if n32 <= c32:
    assert got == 1.0


def test_safe_factor_per_unit():
  norms = jnp.array([[0.0, 1.0, 4.0, jnp.inf]], jnp.float32)
  np.testing.assert_array_equal(num.safe_factor(2.0, norms), [[1.0, 1.0, 0.5, 0.0]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_leaf_keeps_dtype_and_is_exact_at_one(dtype):
  x = jnp.asarray(np.linspace(-3, 3, 7, dtype=np.float32)).astype(dtype)
  one = num.scale_leaf(x, jnp.float32(1.0))
  assert one.dtype == dtype and one.shape == x.shape
  assert np.asarray(one).tobytes() == np.asarray(x).tobytes()
  half = num.scale_leaf(x, jnp.float32(0.3))
  assert half.dtype == dtype
  # x * f is exact in float64, then rounded to float32 (the multiply), then to dtype
  want = (f64(x) * np.float64(np.float32(0.3))).astype(np.float32).astype(np.asarray(x).dtype)
  np.testing.assert_array_equal(np.asarray(half), want)
  per_unit = num.scale_leaf(x.reshape(7, 1), jnp.zeros((1, 1), jnp.float32))
  assert per_unit.dtype == dtype and per_unit.shape == (7, 1)
  assert not np.any(f64(per_unit))


def test_scale_leaf_float16_near_max_stays_finite():
  x = jnp.array([65504.0, -65504.0], jnp.float16)
  out = num.scale_leaf(x, jnp.float32(0.999))
  assert out.dtype == jnp.float16 and np.all(np.isfinite(f64(out)))


def test_scale_tree_keeps_structure_and_dtypes():
  tree = {"a": jnp.ones((2,), jnp.bfloat16), "b": [jnp.ones((), jnp.float16)], "c": {}}
  out = num.scale_tree(tree, jnp.float32(0.5))
  assert jax.tree.structure(out) == jax.tree.structure(tree)
  assert out["a"].dtype == jnp.bfloat16 and out["b"][0].dtype == jnp.float16
  assert float(out["b"][0]) == 0.5


def test_is_finite_scalar():
  assert bool(num.is_finite_scalar(jnp.float32(1.0)))
  assert not bool(num.is_finite_scalar(jnp.float32(jnp.inf)))
  assert not bool(num.is_finite_scalar(jnp.float32(jnp.nan)))


@pytest.mark.parametrize("first0", [1.5, -0.0, np.inf, -np.inf, np.nan])
def test_ordered_after_returns_the_value_bitwise(first0):
  """Whatever the first array holds (finite, a signed zero, +-inf, NaN), the value (a
  second moment: zeros, numbers, inf, NaN) comes back bitwise. These processes
  simulate 8 devices, so every element orders its own; tests/test_memory.py checks
  the one-device form through SPAM."""
  value = np.array([0.0, 1.5, 3e-45, np.inf, np.nan, 7.0], np.float32)
  first = np.array([first0, np.nan, np.inf, 2.0, -1.0, -0.0], np.float32)
  got = jax.jit(num.ordered_after)(jnp.asarray(value), jnp.asarray(first))
  assert np.asarray(got).tobytes() == value.tobytes()
  for dtype in (jnp.bfloat16, jnp.float16):
    got = jax.jit(num.ordered_after)(jnp.asarray(value, dtype), jnp.asarray(first, jnp.float32))
    assert got.dtype == dtype
    assert np.asarray(got).tobytes() == np.asarray(jnp.asarray(value, dtype)).tobytes()
  empty = jnp.zeros((0, 3))
  assert num.ordered_after(empty, empty).shape == (0, 3)
