"""Tests of the step guards: skip_nonfinite and skip_on_spike."""

from __future__ import annotations

import functools
import inspect
import math

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import all_eqns
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import optax_guard as og

INT32_MAX = np.iinfo(np.int32).max


def _params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"w": jax.random.normal(k1, (4, 3)), "b": jax.random.normal(k2, (3,))}


def _grads(seed, scale=1.0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"w": scale * jax.random.normal(k1, (4, 3)), "b": scale * jax.random.normal(k2, (3,))}


def _inner():
  return optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-2))


def _with(tree, leaf, index, x):
  return {**tree, leaf: tree[leaf].at[index].set(x)}


def _scaled_by_value():
  """An extra-args transform: multiplies the updates by ``value`` (required)."""

  def update_fn(updates, state, params=None, *, value, **extra_args):
    del params, extra_args
    return jax.tree.map(lambda u: u * value, updates), state

  return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)


def _faulty(kind):
  g = _grads(1)
  if kind == "nan":
    return _with(g, "w", (0, 0), jnp.nan)
  if kind == "+inf":
    return _with(g, "b", 2, jnp.inf)
  if kind == "-inf":
    return _with(g, "b", 0, -jnp.inf)
  if kind == "1e30-scaled":  # every element finite, the sum of squares overflows float32
    return jax.tree.map(lambda x: 1e30 * x, g)
  assert kind == "one-1e20-element"
  return _with(g, "w", (1, 1), 1e20)


FAULTS = ["nan", "+inf", "-inf", "1e30-scaled", "one-1e20-element"]


# ---------------------------------------------------------------------------
# skip_nonfinite
# ---------------------------------------------------------------------------


def test_skip_nonfinite_skips_every_nonfinite_kind():
  params = _params()
  tx = og.skip_nonfinite(_inner())
  update = jax.jit(tx.update)
  _, state = update(_grads(0), tx.init(params), params)  # one real step first
  for kind in FAULTS:
    g = _faulty(kind)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g)) == (
        kind in ("1e30-scaled", "one-1e20-element")
    )
    u, new = update(g, state, params)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(new.inner_state, state.inner_state)  # untouched, bitwise
    assert int(new.num_skipped) == 1 and int(new.consecutive_skipped) == 1, kind
    assert new.last_skipped.dtype == jnp.bool_ and bool(new.last_skipped)


def test_skip_nonfinite_finite_step_is_the_inner_step_bitwise():
  params, inner = _params(), _inner()
  tx = og.skip_nonfinite(inner)
  s, s_ref = tx.init(params), inner.init(params)
  for i in range(3):
    u, s = jax.jit(tx.update)(_grads(i, 10.0), s, params)
    u_ref, s_ref = jax.jit(inner.update)(_grads(i, 10.0), s_ref, params)
    chex.assert_trees_all_equal(u, u_ref)
    chex.assert_trees_all_equal(s.inner_state, s_ref)
  assert int(s.num_skipped) == 0 and not bool(s.last_skipped)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_skip_nonfinite_zero_updates_keep_the_inner_output_dtype(dtype):
  params = jax.tree.map(lambda x: x.astype(dtype), _params())
  g = jax.tree.map(lambda x: x.astype(dtype), _faulty("nan"))
  tx = og.skip_nonfinite(optax.sgd(0.1))
  u, _ = tx.update(g, tx.init(params), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
  assert all(not bool(jnp.any(x)) for x in jax.tree.leaves(u))


def test_skip_nonfinite_float16_tree_that_overflows_in_float16_is_not_skipped():
  # 100k entries of 1.0: the float16 sum of squares is inf, the float32 one is 1e5
  g = {"w": jnp.ones((100_000,), jnp.float16)}
  tx = og.skip_nonfinite(optax.sgd(1.0))
  u, s = tx.update(g, tx.init(g), g)
  assert not bool(s.last_skipped) and float(u["w"][0]) == -1.0


def test_skip_nonfinite_counters_follow_a_reference():
  pattern = [0, 1, 1, 0, 1, 1, 1, 0, 0, 1]
  params = _params()
  tx = og.skip_nonfinite(_inner())
  s = tx.init(params)
  update = jax.jit(tx.update)
  total = run = 0
  for i, bad in enumerate(pattern):
    g = _faulty("nan") if bad else _grads(i)
    _, s = update(g, s, params)
    total, run = total + bad, (run + 1 if bad else 0)
    assert (int(s.num_skipped), int(s.consecutive_skipped), bool(s.last_skipped)) == (
        total, run, bool(bad)
    ), i
    assert s.num_skipped.dtype == s.consecutive_skipped.dtype == jnp.int32
  # the inner transformation saw only the 4 finite steps
  assert int(s.inner_state[1][0].count) == pattern.count(0)


def test_skip_nonfinite_counters_saturate():
  params = _params()
  tx = og.skip_nonfinite(_inner())
  s = tx.init(params)._replace(
      num_skipped=jnp.int32(INT32_MAX - 1), consecutive_skipped=jnp.int32(INT32_MAX - 1)
  )
  update = jax.jit(tx.update)
  for _ in range(3):
    _, s = update(_faulty("+inf"), s, params)
  assert int(s.num_skipped) == INT32_MAX and int(s.consecutive_skipped) == INT32_MAX
  _, s = update(_grads(0), s, params)
  assert int(s.num_skipped) == INT32_MAX and int(s.consecutive_skipped) == 0


def test_skip_nonfinite_passes_value_and_extras_to_inner():
  params = _params()
  tx = og.skip_nonfinite(_scaled_by_value())
  u, _ = tx.update(_grads(0), tx.init(params), params, value=jnp.float32(3.0), other=1)
  chex.assert_trees_all_close(u, jax.tree.map(lambda x: 3.0 * x, _grads(0)))
  # inside a chain, the value still arrives
  chained = optax.chain(optax.identity(), tx)
  u2, _ = chained.update(_grads(0), chained.init(params), params, value=jnp.float32(3.0))
  chex.assert_trees_all_equal(u, u2)


def test_skip_nonfinite_with_reduce_on_plateau_matches_unguarded_on_finite_steps():
  params = _params()
  inner = optax.chain(og.clip_by_global_norm(1.0), og.reduce_on_plateau(patience=1, factor=0.5))
  tx = og.skip_nonfinite(inner)
  s, s_ref = tx.init(params), inner.init(params)
  update, update_ref = jax.jit(tx.update), jax.jit(inner.update)
  for i, loss in enumerate([3.0, 2.0, 2.5, 2.6, 2.7, 1.0]):
    u, s = update(_grads(i), s, params, value=jnp.float32(loss))
    u_ref, s_ref = update_ref(_grads(i), s_ref, params, value=jnp.float32(loss))
    chex.assert_trees_all_equal(u, u_ref)
  chex.assert_trees_all_equal(s.inner_state, s_ref)
  assert float(og.guard_stats(s)["reduce_on_plateau/scale"]) < 1.0  # the plateau was seen


def _largest_select(tx, params):
  state = jax.eval_shape(tx.init, params)
  jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr
  prims = [e.primitive.name for e in jaxpr.eqns]
  sizes = [
      math.prod(v.aval.shape) for e in all_eqns(jaxpr) if e.primitive.name == "select_n"
      for v in e.outvars
  ]
  return prims, max(sizes, default=0)


def test_skip_nonfinite_huge_tree_uses_cond_and_no_select_over_the_state():
  # 16 leaves of 4096x4096 (268M parameters): traced abstractly, nothing allocated
  params = {f"layer{i}": jax.ShapeDtypeStruct((4096, 4096), jnp.float32) for i in range(16)}
  inner = optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-3))
  prims, largest = _largest_select(og.skip_nonfinite(inner), params)
  assert "cond" in prims
  assert largest <= 1, f"a select over {largest} elements"
  state = jax.eval_shape(og.skip_nonfinite(inner).init, params)
  hlo = jax.jit(og.skip_nonfinite(inner).update).lower(params, state, params).as_text()
  assert "stablehlo.case" in hlo or "stablehlo.if" in hlo
  # the check does catch the anti-pattern: a guard that selects the whole state
  _, largest_ref = _largest_select(_where_guard(inner), params)
  assert largest_ref >= 4096 * 4096


def _where_guard(inner):
  """The anti-pattern: selecting updates and the whole state with jnp.where."""

  def update_fn(updates, state, params=None):
    ok = jnp.isfinite(optax.tree.norm(updates))
    new_u, new_s = inner.update(updates, state, params)
    pick = lambda a, b: jnp.where(ok, a, b)
    return (jax.tree.map(lambda u: pick(u, jnp.zeros_like(u)), new_u),
            jax.tree.map(pick, new_s, state))

  return optax.GradientTransformation(inner.init, update_fn)


def test_skip_nonfinite_same_decision_on_every_device(devices):
  """Only device 5's shard holds the NaN; all 8 devices must skip."""
  g = jnp.ones((8, 4)).at[5, 2].set(jnp.nan)

  def runner(tx):
    def run(g):
      u, s = tx.update(g, tx.init(g), g)
      return u, s.last_skipped

    return jax.pmap(run, axis_name="d")

  u, skipped = runner(og.skip_nonfinite(optax.sgd(1.0), axis_name="d"))(g)
  assert np.all(np.asarray(skipped)) and not np.any(np.asarray(u))
  # without the axis name only device 5 would skip
  _, skipped = runner(og.skip_nonfinite(optax.sgd(1.0)))(g)
  assert np.asarray(skipped).tolist() == [i == 5 for i in range(8)]


def test_skip_nonfinite_rejects_non_transformations():
  with pytest.raises(TypeError, match=r"skip_nonfinite\(inner=...\)"):
    og.skip_nonfinite(optax.sgd)


# ---------------------------------------------------------------------------
# skip_on_spike
# ---------------------------------------------------------------------------

MAD_TO_STD = 1.482602218505602  # 1 / Phi^{-1}(3/4)


DEFAULT_MIN_RATIO = inspect.signature(og.skip_on_spike).parameters["min_ratio"].default


def _robust_threshold(history, sigma, window, min_history, min_ratio=DEFAULT_MIN_RATIO):
  """float64 ``max(median + sigma * scale, min_ratio * q80)``.

  ``scale`` is ``1.4826 * MAD`` (the population std if the MAD is 0), floored
  at float noise, a relative 1e-3 of the median; ``q80`` is the order
  statistic of rank ``floor(0.8 (n - 1))``. ``min_ratio=None``: no ratio floor
  (the loss tracker).
  """
  if len(history) < min_history:
    return math.inf
  h = np.asarray(history[-window:], np.float64)
  med = np.median(h)
  mad = np.median(np.abs(h - med))
  scale = max(MAD_TO_STD * mad if mad > 0 else h.std(), 1e-3 * abs(med))
  threshold = med + sigma * scale if scale > 0 else med
  q80 = np.sort(h)[(4 * (len(h) - 1)) // 5]
  if min_ratio is not None and q80 > 0:
    threshold = max(threshold, min_ratio * q80)
  return threshold


def _mean_std_threshold(history, sigma, window, min_history):
  """The rule of OLMo-core's and Levanter's skip-step optimizers: mean + sigma * std."""
  if len(history) < min_history:
    return math.inf
  h = np.asarray(history[-window:], np.float64)
  return h.mean() + sigma * h.std()


def _f32_norm(x):
  with np.errstate(over="ignore", invalid="ignore"):
    return float(np.sqrt(np.float32(x) * np.float32(x)))  # float32 accumulation


def _reference_skip_on_spike(norm_inputs, values, sigma, window, min_history):
  """Plain-Python float64 rule; norms of one-element trees ``[x]``.

  The norm decides finite spikes; a value only skips when it is non-finite.
  Every finite norm and value is recorded, skipped or not.
  """
  norms_hist, values_hist, out = [], [], []
  for x, v in zip(norm_inputs, values, strict=True):
    n = _f32_norm(x)
    tn = _robust_threshold(norms_hist, sigma, window, min_history)
    skip = not math.isfinite(n) or n > tn
    tv = math.inf
    if v is not None:
      tv = _robust_threshold(values_hist, sigma, window, min_history, None)
      skip = skip or not math.isfinite(v)
      if math.isfinite(v):
        values_hist.append(v)
    if math.isfinite(n):
      norms_hist.append(n)
    out.append((skip, n, tn, tv, len(norms_hist), len(values_hist)))
  return out


def _sequence(seed, steps=300, zeros=5):
  rng = np.random.default_rng(seed)
  x = rng.lognormal(0.0, 0.3, steps)
  x[150:] *= 4.0  # a level shift
  spikes = rng.choice(np.arange(20, steps), 12, replace=False)
  x[spikes] *= rng.choice([30.0, 1e3], 12)
  x[rng.choice(steps, 4, replace=False)] = np.nan
  x[rng.choice(steps, 2, replace=False)] = np.inf
  x[rng.choice(steps, 2, replace=False)] = 1e30
  x[rng.choice(steps, zeros, replace=False)] = 0.0
  v = 2.0 + 0.1 * rng.standard_normal(steps)
  v[rng.choice(np.arange(30, steps), 5, replace=False)] += 5.0
  v[rng.choice(steps, 3, replace=False)] = np.nan
  return x, v


def _spike_runner(tx, with_value):
  """Jitted ``(x, v) -> (state, per-step outputs)`` over one-element gradients ``[x_t]``."""
  params = jnp.zeros((1,))

  def step(s, inp):
    g, val = inp
    kw = {"value": val} if with_value else {}
    u, s = tx.update(g[None], s, params, **kw)
    return s, (s.last_skipped, s.norm.last, s.norm.threshold, s.value.threshold,
               s.norm.count, s.value.count, u[0])

  return jax.jit(lambda x, v: jax.lax.scan(step, tx.init(params), (x, v)))


def _scan_spike(tx, x, v=None, runner=None):
  """Runs ``tx`` over ``[x_t]`` (with ``value=v_t`` unless None); outputs as NumPy."""
  runner = runner or _spike_runner(tx, v is not None)
  v = np.zeros_like(x) if v is None else v
  s, out = runner(jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32))
  return s, tuple(np.asarray(a) for a in out)


@pytest.mark.parametrize(
    "sigma,window,min_history,with_value,zeros",
    [(3.0, 16, 8, True, 5), (4.0, 64, 32, False, 5), (2.0, 5, 1, True, 5),
     (3.0, 8, 4, True, 200)],  # the last: mostly exact zeros, the MAD is often 0
)
def test_skip_on_spike_matches_reference(sigma, window, min_history, with_value, zeros):
  x, v = _sequence(window, zeros=zeros)
  tx = og.skip_on_spike(optax.sgd(1.0), sigma=sigma, window=window, min_history=min_history)
  s, (skipped, norm, tn, tv, nc, vc, u) = _scan_spike(tx, x, v if with_value else None)
  ref = _reference_skip_on_spike(
      x, [float(np.float32(a)) for a in v] if with_value else [None] * len(x),
      sigma, window, min_history,
  )
  rs, rn, rtn, rtv, rnc, rvc = (np.asarray(a) for a in zip(*ref, strict=True))
  np.testing.assert_allclose(norm, rn, rtol=1e-6)
  np.testing.assert_allclose(tn, rtn, rtol=2e-5, atol=1e-30)
  np.testing.assert_allclose(tv, rtv, rtol=2e-5)
  np.testing.assert_array_equal(nc, rnc)
  np.testing.assert_array_equal(vc, rvc)
  # decisions agree wherever the float32 and float64 thresholds are not a near-tie
  tie = np.isclose(norm, rtn, rtol=1e-5) & (norm != np.float32(rtn))
  assert tie.sum() <= 1
  np.testing.assert_array_equal(skipped[~tie], rs[~tie])
  assert int(s.num_skipped) == int(skipped.sum()) and 8 <= skipped.sum() < len(x) // 2
  np.testing.assert_array_equal(u[skipped], 0.0)
  np.testing.assert_array_equal(u[~skipped], -x[~skipped].astype(np.float32))


# Property tests on the decision after a finite history: window 16, min_history 8, sigma 3.
_PROP = dict(sigma=3.0, window=16, min_history=8)
_norms = hnp.arrays(np.float32, 16, elements=st.floats(2.0**-10, 2.0**10, width=32), unique=True)


@functools.cache
def _decide():
  """``(history, x) -> (skipped, threshold)``: record ``history``, then test ``x``."""
  tx = og.skip_on_spike(optax.sgd(1.0), **_PROP)
  p = jnp.zeros((1,))

  def run(history, x):
    def step(s, g):
      return tx.update(g[None], s, p)[1], None

    s = jax.lax.scan(step, tx.init(p), history)[0]
    s = tx.update(x[None], s, p)[1]
    return s.last_skipped, s.norm.threshold

  return jax.jit(run)


@given(history=_norms, x=st.floats(0.0, 1e4, width=32), k=st.integers(-8, 8))
def test_skip_on_spike_decision_is_scale_free_and_monotone(history, x, k):
  skipped, threshold = _decide()(history, np.float32(x))
  ref = _robust_threshold(list(history.astype(np.float64)), **_PROP)
  np.testing.assert_allclose(float(threshold), ref, rtol=1e-5)
  # powers of two scale exactly: same decision, threshold scaled by the same factor
  c = np.float32(2.0**k)
  skipped_c, threshold_c = _decide()(history * c, np.float32(x) * c)
  assert bool(skipped_c) == bool(skipped) and float(threshold_c) == float(threshold) * c
  # larger norms are skipped too, and nothing at or under the median is
  if bool(skipped):
    assert bool(_decide()(history, np.float32(2 * x + 1))[0])
  assert not bool(_decide()(history, np.float32(np.median(history)))[0])


@given(clean=_norms, k=st.integers(1, 3), big=st.floats(2.0**14, 2.0**99, width=32))
def test_skip_on_spike_spikes_in_the_history_do_not_raise_the_threshold(clean, k, big):
  """Up to 3 of 16 recorded norms (a fifth) replaced by huge ones: the clean bound holds."""
  history = clean.copy()
  history[np.random.default_rng(k).choice(16, k, replace=False)] = big
  skipped, threshold = _decide()(history, np.float32(big))
  lo, hi = float(clean.min()), float(clean.max())
  bound = max(hi + _PROP["sigma"] * MAD_TO_STD * (hi - lo), DEFAULT_MIN_RATIO * hi)
  assert float(threshold) <= bound * (1 + 1e-6)
  assert bool(skipped)  # the next huge one is still a spike
  # with the mean and standard deviation it would not be, once a few are recorded
  if k >= 3:
    assert big <= _mean_std_threshold(list(history), **_PROP)


@functools.cache
def _prop_runner(with_value):
  return _spike_runner(og.skip_on_spike(optax.sgd(1.0), **_PROP), with_value)


@given(
    values=hnp.arrays(np.float32, 40, elements=st.floats(-1e6, 1e6, width=32)),
    seed=st.integers(0, 3),
)
def test_skip_on_spike_finite_values_never_decide(values, seed):
  x, _ = _sequence(seed, steps=40)
  _, with_v = _scan_spike(None, x, values, _prop_runner(True))
  _, without = _scan_spike(None, x, None, _prop_runner(False))
  np.testing.assert_array_equal(with_v[0], without[0])  # same decisions
  np.testing.assert_array_equal(with_v[6], without[6])  # same updates
  # a non-finite value skips exactly its step, and is not recorded
  bad = values.copy()
  bad[[5, 17]] = [np.nan, -np.inf]
  s, out = _scan_spike(None, x, bad, _prop_runner(True))
  np.testing.assert_array_equal(out[0], without[0] | np.isin(np.arange(40), [5, 17]))
  assert int(s.value.count) == 38


def _faulty_norm(kind, base):
  """One-element gradient with the given fault applied to a healthy norm ``base``."""
  return {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf, "1e30-scaled": 1e30 * base,
          "x1e4": 1e4 * base}[kind]


@pytest.mark.parametrize("kind", ["nan", "+inf", "-inf", "1e30-scaled", "x1e4"])
def test_skip_on_spike_skips_every_fault_kind_even_when_they_cluster(kind):
  """A fault every 8 steps, 40 of them, with the loss passed: every one is skipped.

  With the mean and standard deviation of the recorded norms, the x1e4 spikes
  (recorded, as every finite norm) would hide each other after a few.
  """
  rng = np.random.default_rng(0)
  x = rng.lognormal(0.0, 0.3, 128 + 320)
  fault = np.zeros(x.shape, bool)
  fault[128::8] = True
  x[fault] = [_faulty_norm(kind, b) for b in x[fault]]
  loss = 2.0 + 0.1 * rng.standard_normal(x.shape)
  _, (skipped, *_) = _scan_spike(og.skip_on_spike(optax.sgd(1.0)), x, loss)
  np.testing.assert_array_equal(skipped, fault)
  if kind == "x1e4":
    norms, old = [], []
    for n in x:
      old.append(n > _mean_std_threshold(norms, 6.0, 128, 64))
      norms.append(n)
    assert not np.all(np.asarray(old)[fault])  # the old rule lets some through


def test_skip_on_spike_records_skipped_finite_norms():
  tx = og.skip_on_spike(optax.sgd(1.0), sigma=2.0, window=8, min_history=3)
  p = jnp.zeros((1,))
  s = tx.init(p)
  for g in [1.0, 1.2, 0.8, 1.1]:
    _, s = tx.update(jnp.array([g]), s, p)
  _, s = tx.update(jnp.array([50.0]), s, p)
  assert bool(s.last_skipped) and int(s.norm.count) == 5
  assert float(s.norm.history[-1]) == 50.0 and float(s.norm.last) == 50.0
  _, s = tx.update(jnp.array([jnp.nan]), s, p)  # non-finite: skipped, not recorded
  assert bool(s.last_skipped) and int(s.norm.count) == 5 and int(s.num_skipped) == 2
  assert math.isnan(float(s.norm.last)) and float(s.norm.history[-1]) == 50.0


def test_skip_on_spike_level_shift_is_accepted_once_it_fills_a_fifth_of_the_window():
  rng = np.random.default_rng(0)
  x = np.concatenate([1.0 + 0.05 * rng.standard_normal(100),
                      10.0 + 0.5 * rng.standard_normal(100)])
  window = 32
  tx = og.skip_on_spike(optax.sgd(1.0), sigma=3.0, window=window, min_history=8)
  s, (skipped, *_) = _scan_spike(tx, x)
  assert not skipped[:100].any()
  ref = np.asarray([r[0] for r in _reference_skip_on_spike(x, [None] * 200, 3.0, window, 8)])
  np.testing.assert_array_equal(skipped, ref)
  # skipped from the jump until the new level fills the window's top fifth (the
  # ratio floor's 80th percentile then sits on it), then accepted
  fill = window - (4 * (window - 1)) // 5
  assert skipped[100 : 100 + fill].all()
  assert not skipped[100 + fill :].any() and int(s.consecutive_skipped) == 0


def test_skip_on_spike_keeps_rotating_after_the_count_saturates():
  tx = og.skip_on_spike(optax.sgd(1.0), sigma=3.0, window=4, min_history=2)
  p = jnp.zeros((1,))
  s = tx.init(p)
  full = lambda t: t._replace(history=jnp.array([1.0, 1.1, 0.9, 1.0]),
                              count=jnp.int32(INT32_MAX - 1))
  s = s._replace(norm=full(s.norm), value=full(s.value))
  update = jax.jit(tx.update)
  for i, g in enumerate([1.2, 0.8, 1.05, 0.95, 100.0]):
    _, s = update(jnp.array([g]), s, p, value=jnp.float32(g))
    assert int(s.norm.count) == int(s.value.count) == INT32_MAX
    assert bool(s.last_skipped) == (g == 100.0), i
  expected = np.float32([0.8, 1.05, 0.95, 100.0])  # newest last, still moving
  np.testing.assert_array_equal(s.norm.history, expected)
  np.testing.assert_array_equal(s.value.history, expected)


def test_skip_on_spike_value_tests():
  tx = og.skip_on_spike(optax.sgd(1.0), sigma=3.0, window=8, min_history=4)
  p = jnp.zeros((1,))
  s = tx.init(p)
  for i, loss in enumerate([2.0, 2.1, 1.9, 2.0, 2.05]):
    _, s = tx.update(jnp.array([1.0 + 0.01 * i]), s, p, value=jnp.float32(loss))
  assert int(s.num_skipped) == 0 and int(s.value.count) == 5
  u, s = tx.update(jnp.array([1.0]), s, p, value=jnp.float32(9.0))  # loss spike only
  assert not bool(s.last_skipped) and float(u[0]) == -1.0  # applied, but reported
  assert float(s.value.last) == 9.0 and float(s.value.last) > float(s.value.threshold)
  u, s = tx.update(jnp.array([1.0]), s, p, value=jnp.float32(jnp.nan))  # NaN loss
  assert bool(s.last_skipped) and float(u[0]) == 0.0
  assert int(s.value.count) == 6 and int(s.num_skipped) == 1
  before = s.value
  u, s = tx.update(jnp.array([1.0]), s, p)  # no value: only the norm is tested
  assert not bool(s.last_skipped) and float(u[0]) == -1.0
  chex.assert_trees_all_equal(s.value, before)


def test_skip_on_spike_nan_value_skips_before_min_history():
  tx = og.skip_on_spike(optax.sgd(1.0))
  p = jnp.zeros((1,))
  u, s = tx.update(jnp.array([1.0]), tx.init(p), p, value=jnp.float32(jnp.inf))
  assert bool(s.last_skipped) and float(u[0]) == 0.0


def test_skip_on_spike_passes_value_to_inner_and_keeps_inner_state():
  p = _params()
  inner = optax.chain(_scaled_by_value(), optax.adam(0.1))
  tx = og.skip_on_spike(inner, window=4, min_history=2)
  s = tx.init(p)
  s_ref = inner.init(p)
  update, update_ref = jax.jit(tx.update), jax.jit(inner.update)
  for i in range(3):
    u, s = update(_grads(i), s, p, value=jnp.float32(2.0))
    u_ref, s_ref = update_ref(_grads(i), s_ref, p, value=jnp.float32(2.0))
    chex.assert_trees_all_equal(u, u_ref)
  before = s.inner_state
  u, s = update(_grads(3, 100.0), s, p, value=jnp.float32(2.0))
  assert bool(s.last_skipped)
  chex.assert_trees_all_equal(s.inner_state, before)


def test_skip_on_spike_window_must_be_concrete_for_jitted_init():
  factory = optax.inject_hyperparams(og.skip_on_spike)
  p = jnp.zeros((3,))
  tx = factory(optax.sgd(0.1), window=8, min_history=2)
  assert tx.init(p).inner_state.norm.history.shape == (8,)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(tx.init)(p)
  tx = optax.inject_hyperparams(og.skip_on_spike, static_args=("window",))(
      optax.sgd(0.1), window=8, min_history=2
  )
  s = jax.jit(tx.init)(p)
  assert s.inner_state.norm.history.shape == (8,)
  # sigma, min_ratio and min_history are traced hyperparameters that can be
  # changed in place
  s.hyperparams["sigma"] = jnp.float32(1e-3)
  s.hyperparams["min_ratio"] = jnp.float32(1.0)
  update = jax.jit(tx.update)
  for g in [1.0, 1.1, 1.2]:
    _, s = update(jnp.full((3,), g), s, p)
  # 1.2 > median 1.05 + 0.001 * std of [1, 1.1]
  assert int(s.inner_state.num_skipped) == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(sigma=0.0), "sigma"), (dict(window=0), "window"), (dict(window=3.0), "window"),
     (dict(min_history=0), "min_history"), (dict(window=4, min_history=5), "min_history"),
     (dict(sigma=float("nan")), "sigma")],
)
def test_skip_on_spike_rejects_invalid_hyperparameters(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match) as info:
    og.skip_on_spike(optax.sgd(0.1), **kwargs)
  assert "skip_on_spike" in str(info.value)


# ---------------------------------------------------------------------------
# Multi-epoch training: a skipped batch must not be skipped again for lagging
# ---------------------------------------------------------------------------

NB, EPOCHS, RATE = 64, 20, 0.3  # batches, epochs, loss decay per applied visit


def _lagging_run(decide):
  """A model of memorization: each batch's loss falls by ``exp(-RATE)`` per *applied* visit.

  ``decide(t, norm, loss) -> skipped`` is called in order, step by step; a
  skipped visit leaves its batch behind (its next loss and norm are higher
  than the others'). Gradient faults hit 4% of the steps (NaN, inf, 1e30- and
  x1e4-scaled, in turn). Returns ``(skipped, fault)`` per step.
  """
  rng = np.random.default_rng(1)
  difficulty = np.exp(0.1 * rng.standard_normal(NB))
  steps = NB * EPOCHS
  noise_loss = 1.0 + 0.03 * rng.standard_normal(steps)
  noise_norm = 1.0 + 0.2 * rng.standard_normal(steps)
  fault = np.zeros(steps, np.int32)
  hit = rng.choice(np.arange(NB, steps), steps // 25, replace=False)
  fault[hit] = np.arange(len(hit)) % 4 + 1
  kinds = [None, "nan", "+inf", "1e30-scaled", "x1e4"]
  visits = np.zeros(NB, np.int64)
  skipped = np.zeros(steps, bool)
  for t in range(steps):
    b = t % NB
    loss = difficulty[b] * math.exp(-RATE * visits[b]) * noise_loss[t]
    norm = math.sqrt(loss) * noise_norm[t]
    if fault[t]:
      norm = _faulty_norm(kinds[fault[t]], norm)
    skipped[t] = decide(t, np.float32(norm), np.float32(loss))
    visits[b] += not skipped[t]
  return skipped, fault > 0


def test_skip_on_spike_multi_epoch_no_false_skips_of_lagging_batches():
  tx = og.skip_on_spike(optax.sgd(1.0), window=32, min_history=16)
  update = jax.jit(tx.update)
  p = jnp.zeros((1,))
  state = [tx.init(p)]

  def guard(t, norm, loss):
    _, state[0] = update(jnp.array([norm]), state[0], p, value=loss)
    return bool(state[0].last_skipped)

  skipped, fault = _lagging_run(guard)
  np.testing.assert_array_equal(skipped, fault)  # every fault, and nothing else

  # the mean/std rule on the loss and the norm, OR-combined, skips healthy lagging batches
  norms, losses = [], []

  def old(t, norm, loss):
    bad = not math.isfinite(_f32_norm(norm))
    skip = bad or norm > _mean_std_threshold(norms, 6.0, 32, 16)
    skip = skip or loss > _mean_std_threshold(losses, 6.0, 32, 16)
    norms.extend([] if bad else [_f32_norm(norm)])
    losses.append(float(loss))
    return skip

  old_skipped, fault = _lagging_run(old)
  false = np.flatnonzero(old_skipped & ~fault)
  assert len(false) >= 5
  assert np.any(np.diff(false) % NB == 0)  # the same batch again on a later visit


# ---------------------------------------------------------------------------
# Fault injection: a 2-layer MLP regression trained 2,000 steps
# ---------------------------------------------------------------------------

STEPS = 2000
NONFINITE = 40  # 2% of the steps: NaN, +inf, -inf, 1e30-scaled, 10 of each
SPIKES = 10  # finite x1000 spikes, 150 steps apart (more than the window)
BASE = lambda: optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-3))


def _fault_codes():
  """0 clean, 1 NaN, 2 +inf, 3 -inf (one element), 4 all x1e30, 5 all x1000."""
  code = np.zeros(STEPS, np.int32)
  spikes = 200 + 150 * np.arange(SPIKES)
  code[spikes] = 5
  rng = np.random.default_rng(0)
  free = np.setdiff1d(np.arange(STEPS), spikes)
  code[rng.choice(free, NONFINITE, replace=False)] = np.arange(NONFINITE) % 4 + 1
  return code


def _inject(g, c):
  bad = jnp.array([0.0, jnp.nan, jnp.inf, -jnp.inf, 0.0, 0.0])[c]
  first = jnp.where((c >= 1) & (c <= 3), bad, g["w1"][0, 0])
  g = {**g, "w1": g["w1"].at[0, 0].set(first)}
  scale = jnp.array([1.0, 1.0, 1.0, 1.0, 1e30, 1e3])[c]
  return jax.tree.map(lambda x: x * scale, g)


def _mlp_loss(p, x, y):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  return jnp.mean(((h @ p["w2"] + p["b2"])[:, 0] - y) ** 2)


def _trainer(tx):
  """Minibatch training on y = sin(2 x.w) + noise, compiled once.

  Returns ``code -> (params, state, full-data loss)``.
  """
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(k[0], (512, 8))
  y = jnp.sin(2.0 * x @ (jax.random.normal(k[1], (8,)) / jnp.sqrt(8.0)))
  y = y + 0.05 * jax.random.normal(k[2], (512,))
  params = {"w1": jax.random.normal(k[3], (8, 32)) / jnp.sqrt(8.0), "b1": jnp.zeros(32),
            "w2": jax.random.normal(k[4], (32, 1)) / jnp.sqrt(32.0), "b2": jnp.zeros(1)}
  tx = optax.with_extra_args_support(tx)

  def step(carry, inp):
    p, s = carry
    t, c = inp
    idx = jax.random.randint(jax.random.fold_in(jax.random.PRNGKey(2), t), (64,), 0, 512)
    loss, g = jax.value_and_grad(_mlp_loss)(p, x[idx], y[idx])
    u, s = tx.update(_inject(g, c), s, p, value=loss)
    return (optax.apply_updates(p, u), s), None

  run = jax.jit(lambda p, s, code: jax.lax.scan(step, (p, s), (jnp.arange(STEPS), code))[0])

  def train(code):
    p, s = run(params, tx.init(params), jnp.asarray(code))
    return p, s, float(_mlp_loss(p, x, y))

  return train


@pytest.fixture(scope="module")
def fault_runs():
  code = _fault_codes()
  plain = _trainer(BASE())
  return {
      "code": code,
      "clean": plain(np.zeros_like(code)),
      "unguarded": plain(code),
      "skip_nonfinite": _trainer(og.skip_nonfinite(BASE()))(code),
      "skip_on_spike": _trainer(og.skip_on_spike(BASE()))(code),
  }


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def test_skip_nonfinite_fault_injection_run_is_ruined_without_a_guard(fault_runs):
  params, _, loss = fault_runs["unguarded"]
  assert not _finite(params) and math.isnan(loss)
  assert 0.0 < fault_runs["clean"][2] < 0.5 and _finite(fault_runs["clean"][0])


def test_skip_nonfinite_fault_injection_skips_exactly_the_nonfinite_steps(fault_runs):
  params, state, loss = fault_runs["skip_nonfinite"]
  code = fault_runs["code"]
  assert _finite(params)
  assert int(state.num_skipped) == np.sum((code >= 1) & (code <= 4)) == NONFINITE
  assert abs(loss - fault_runs["clean"][2]) <= 0.1 * fault_runs["clean"][2]


def test_skip_on_spike_fault_injection_skips_nonfinite_and_spikes(fault_runs):
  params, state, loss = fault_runs["skip_on_spike"]
  assert _finite(params)
  # every fault is skipped, and no ordinary step (the loss is tested as well)
  assert int(state.num_skipped) == np.sum(fault_runs["code"] > 0) == NONFINITE + SPIKES
  assert abs(loss - fault_runs["clean"][2]) <= 0.1 * fault_runs["clean"][2]


def _count_full_reductions(jaxpr, shape):
  """``reduce_sum`` equations over an operand of ``shape``, sub-jaxprs included."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "reduce_sum" and tuple(eqn.invars[0].aval.shape) == shape:
      count += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _count_full_reductions(sub, shape)
  return count


@pytest.mark.parametrize("guard", [og.skip_nonfinite,
                                   lambda i: og.skip_on_spike(i, window=4, min_history=2)],
                         ids=["skip_nonfinite", "skip_on_spike"])
def test_guard_shares_its_norm_with_an_inner_global_clip(guard):
  """The inner clip of the same updates reuses the guard's sum of squares: one pass."""
  params = {"w": jnp.ones((6, 5))}
  grads = {"w": jnp.full((6, 5), 0.5)}
  shared = guard(optax.chain(og.clip_by_global_norm(1.0), optax.sgd(0.1)))
  # a penalty first makes the clip see other updates: its norm is computed anew
  separate = guard(optax.chain(og.add_l2_penalty(0.1), og.clip_by_global_norm(1.0),
                               optax.sgd(0.1)))
  for tx, expected in ((shared, 1), (separate, 2)):
    s = tx.init(params)
    jaxpr = jax.make_jaxpr(lambda g, s, tx=tx: tx.update(g, s, params))(grads, s).jaxpr
    assert _count_full_reductions(jaxpr, (6, 5)) == expected
    fused = jax.make_jaxpr(lambda g, s, tx=tx: og.update_and_apply(tx, g, s, params))(grads, s)
    assert _count_full_reductions(fused.jaxpr, (6, 5)) == expected
  # and the result is the clip's: the norm sqrt(30 * 0.25) clipped to 1
  u, _ = jax.jit(shared.update)(grads, shared.init(params), params)
  np.testing.assert_allclose(u["w"], -0.1 * grads["w"] / np.sqrt(7.5), rtol=1e-6)


@pytest.mark.parametrize("value", [jnp.ones(4), True, "1.0"], ids=["vector", "bool", "string"])
def test_skip_on_spike_value_must_be_a_scalar_number(value):
  tx = og.skip_on_spike(optax.sgd(0.1))
  p = jnp.zeros(3)
  with pytest.raises((TypeError, ValueError), match=r"skip_on_spike\(value=\.\.\.\)"):
    tx.update(jnp.ones(3), tx.init(p), p, value=value)


# ---------------------------------------------------------------------------
# skip_on_spike: float noise, trends and hard batches are not spikes
# ---------------------------------------------------------------------------


def _ulp_noise_norms(level, window, rng):
  """Half the window exactly ``level``, the rest ``level`` +-1 ulp."""
  lvl = np.float32(level)
  up, down = np.nextafter(lvl, np.float32(np.inf)), np.nextafter(lvl, np.float32(0))
  noisy = rng.choice(np.array([down, lvl, up], np.float32), window - window // 2)
  return np.concatenate([np.full(window // 2, lvl, np.float32), noisy])


@pytest.mark.parametrize("level", [1e-6, 0.37, 1.0, 5e3])
def test_skip_on_spike_never_skips_float_noise(level):
  rng = np.random.default_rng(0)
  window = 32
  tx = og.skip_on_spike(optax.sgd(1.0), window=window, min_history=16)
  lvl = np.float32(level)
  few_ulp = lvl
  for _ in range(4):
    few_ulp = np.nextafter(few_ulp, np.float32(np.inf))
  # norms equal up to +-1 ulp (the MAD is 0 or one ulp), then a few ulp above
  x = np.concatenate([_ulp_noise_norms(level, window, rng), [few_ulp, lvl, few_ulp]])
  s, (skipped, *_rest) = _scan_spike(tx, x.astype(np.float32))
  assert not skipped.any() and int(s.num_skipped) == 0
  # a 10x norm after that is still a spike
  s, (skipped, *_rest) = _scan_spike(tx, np.append(x, 10 * lvl).astype(np.float32))
  assert skipped.tolist() == [False] * len(x) + [True]


def test_skip_on_spike_min_ratio_lets_moderate_outliers_through():
  # a narrow window (MAD 1% of the median): 5.8x the median is many MADs away,
  # but under the default ratio floor (6x the 80th percentile, about 1.008),
  # so it is left to a clip inside
  rng = np.random.default_rng(1)
  x = (1.0 + 0.01 * rng.standard_normal(64)).astype(np.float32)
  tx = og.skip_on_spike(optax.sgd(1.0), window=64, min_history=32)
  assert DEFAULT_MIN_RATIO == 6.0
  for outlier, want in [(2.5, False), (5.8, False), (6.3, True), (1e4, True)]:
    _, (skipped, *_rest) = _scan_spike(tx, np.append(x, outlier).astype(np.float32))
    assert bool(skipped[-1]) is want, outlier
    assert not skipped[:-1].any()
  # min_ratio=1 is the plain median/MAD rule: 2.5x is then a spike
  tx1 = og.skip_on_spike(optax.sgd(1.0), window=64, min_history=32, min_ratio=1.0)
  _, (skipped, *_rest) = _scan_spike(tx1, np.append(x, 2.5).astype(np.float32))
  assert bool(skipped[-1])


def test_skip_on_spike_follows_a_warmup_trend():
  # the norm grows 1% a step, as under a learning-rate warm-up: never a spike
  x = (0.5 * 1.01 ** np.arange(400)).astype(np.float32)
  tx = og.skip_on_spike(optax.sgd(1.0))
  s, (skipped, *_rest) = _scan_spike(tx, x)
  assert not skipped.any()
  x[300] *= 1e4
  s, (skipped, *_rest) = _scan_spike(tx, x)
  assert np.flatnonzero(skipped).tolist() == [300]


def test_skip_on_spike_off_values_keep_the_nonfinite_test():
  # sigma = inf or min_ratio = inf: no finite norm is a spike, NaN/inf still skip
  x = np.array([1.0] * 10 + [1e6, np.nan, 1.0, np.inf], np.float32)
  for kwargs in (dict(sigma=math.inf), dict(min_ratio=math.inf)):
    tx = og.skip_on_spike(optax.sgd(1.0), window=8, min_history=4, **kwargs)
    _, (skipped, *_rest) = _scan_spike(tx, x)
    assert np.flatnonzero(skipped).tolist() == [11, 13], kwargs


@pytest.mark.parametrize("bad", [0.5, 0.0, -1.0, math.nan])
def test_skip_on_spike_rejects_min_ratio_under_one(bad):
  with pytest.raises(ValueError, match=r"skip_on_spike\(min_ratio=...\)"):
    og.skip_on_spike(optax.sgd(1.0), min_ratio=bad)
