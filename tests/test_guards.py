"""Tests of the step guards: skip_nonfinite and skip_on_spike."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
    return jax.tree_util.tree_map(lambda u: u * value, updates), state

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
    return jax.tree_util.tree_map(lambda x: 1e30 * x, g)
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
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(g)) == (
        kind in ("1e30-scaled", "one-1e20-element")
    )
    u, new = update(g, state, params)
    chex.assert_trees_all_equal(u, jax.tree_util.tree_map(jnp.zeros_like, params))
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
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), _params())
  g = jax.tree_util.tree_map(lambda x: x.astype(dtype), _faulty("nan"))
  tx = og.skip_nonfinite(optax.sgd(0.1))
  u, _ = tx.update(g, tx.init(params), params)
  chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
  assert all(not bool(jnp.any(x)) for x in jax.tree_util.tree_leaves(u))


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
  chex.assert_trees_all_close(u, jax.tree_util.tree_map(lambda x: 3.0 * x, _grads(0)))
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


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns"):
          yield from _all_eqns(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from _all_eqns(sub.jaxpr)


def _largest_select(tx, params):
  state = jax.eval_shape(tx.init, params)
  jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr
  prims = [e.primitive.name for e in jaxpr.eqns]
  sizes = [
      math.prod(v.aval.shape) for e in _all_eqns(jaxpr) if e.primitive.name == "select_n"
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
  """The anti-pattern (DESIGN 1.5): jnp.where over updates and state."""

  def update_fn(updates, state, params=None):
    ok = jnp.isfinite(optax.tree.norm(updates))
    new_u, new_s = inner.update(updates, state, params)
    pick = lambda a, b: jnp.where(ok, a, b)
    return (jax.tree_util.tree_map(lambda u: pick(u, jnp.zeros_like(u)), new_u),
            jax.tree_util.tree_map(pick, new_s, state))

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


def _reference_skip_on_spike(norm_inputs, values, sigma, window, min_history):
  """Plain-Python float64 rule; norms of one-element trees ``[x]``."""

  def threshold(history):
    if len(history) < min_history:
      return math.inf
    h = np.asarray(history[-window:], np.float64)
    return h.mean() + sigma * h.std()

  norms_hist, values_hist, out = [], [], []
  for x, v in zip(norm_inputs, values, strict=True):
    with np.errstate(over="ignore", invalid="ignore"):
      n = float(np.sqrt(np.float32(x) * np.float32(x)))  # float32 accumulation
    tn = threshold(norms_hist)
    skip = not math.isfinite(n) or n > tn
    tv = math.inf
    if v is not None:
      tv = threshold(values_hist)
      skip = skip or not math.isfinite(v) or v > tv
      if math.isfinite(v):
        values_hist.append(v)
    if math.isfinite(n):
      norms_hist.append(n)
    out.append((skip, n, tn, tv, len(norms_hist), len(values_hist)))
  return out


def _sequence(seed, steps=300):
  rng = np.random.default_rng(seed)
  x = rng.lognormal(0.0, 0.3, steps)
  x[150:] *= 4.0  # a level shift
  spikes = rng.choice(np.arange(20, steps), 12, replace=False)
  x[spikes] *= rng.choice([30.0, 1e3], 12)
  x[rng.choice(steps, 4, replace=False)] = np.nan
  x[rng.choice(steps, 2, replace=False)] = np.inf
  x[rng.choice(steps, 2, replace=False)] = 1e30
  x[rng.choice(steps, 5, replace=False)] = 0.0
  v = 2.0 + 0.1 * rng.standard_normal(steps)
  v[rng.choice(np.arange(30, steps), 5, replace=False)] += 5.0
  v[rng.choice(steps, 3, replace=False)] = np.nan
  return x, v


@pytest.mark.parametrize(
    "sigma,window,min_history,with_value",
    [(3.0, 16, 8, True), (4.0, 64, 32, False), (2.0, 5, 1, True)],
)
def test_skip_on_spike_matches_reference(sigma, window, min_history, with_value):
  x, v = _sequence(window)
  tx = og.skip_on_spike(optax.sgd(1.0), sigma=sigma, window=window, min_history=min_history)
  params = jnp.zeros((1,))

  def step(s, inp):
    g, val = inp
    kw = {"value": val} if with_value else {}
    u, s = tx.update(g[None], s, params, **kw)
    return s, (s.last_skipped, s.norm, s.norm_threshold, s.value_threshold, s.norm_count,
               s.value_count, u[0])

  s, out = jax.jit(lambda s: jax.lax.scan(step, s, (jnp.asarray(x, jnp.float32),
                                                    jnp.asarray(v, jnp.float32))))(
      tx.init(params)
  )
  skipped, norm, tn, tv, nc, vc, u = (np.asarray(a) for a in out)
  ref = _reference_skip_on_spike(
      x, [float(np.float32(a)) for a in v] if with_value else [None] * len(x),
      sigma, window, min_history,
  )
  rs, rn, rtn, rtv, rnc, rvc = (np.asarray(a) for a in zip(*ref, strict=True))
  np.testing.assert_allclose(norm, rn, rtol=1e-6)
  np.testing.assert_allclose(tn, rtn, rtol=2e-5)
  np.testing.assert_allclose(tv, rtv, rtol=2e-5)
  np.testing.assert_array_equal(nc, rnc)
  np.testing.assert_array_equal(vc, rvc)
  # decisions agree wherever the float32 and float64 thresholds are not a near-tie
  tie = np.isclose(norm, rtn, rtol=1e-5) | (with_value & np.isclose(v, rtv, rtol=1e-5))
  assert tie.sum() <= 1
  np.testing.assert_array_equal(skipped[~tie], rs[~tie])
  assert int(s.num_skipped) == int(skipped.sum()) and 8 <= skipped.sum() < len(x) // 2
  np.testing.assert_array_equal(u[skipped], 0.0)
  np.testing.assert_array_equal(u[~skipped], -x[~skipped].astype(np.float32))


def test_skip_on_spike_records_skipped_finite_norms():
  tx = og.skip_on_spike(optax.sgd(1.0), sigma=2.0, window=8, min_history=3)
  p = jnp.zeros((1,))
  s = tx.init(p)
  for g in [1.0, 1.2, 0.8, 1.1]:
    _, s = tx.update(jnp.array([g]), s, p)
  _, s = tx.update(jnp.array([50.0]), s, p)
  assert bool(s.last_skipped) and int(s.norm_count) == 5
  assert float(s.norm_history[-1]) == 50.0
  _, s = tx.update(jnp.array([jnp.nan]), s, p)  # non-finite: skipped, not recorded
  assert bool(s.last_skipped) and int(s.norm_count) == 5 and int(s.num_skipped) == 2


def test_skip_on_spike_level_shift_is_eventually_accepted():
  """After a 10x shift, at most a few steps are skipped (about window/10 here)."""
  rng = np.random.default_rng(0)
  x = np.concatenate([1.0 + 0.05 * rng.standard_normal(100), 10.0 + 0.5 * rng.standard_normal(100)])
  tx = og.skip_on_spike(optax.sgd(1.0), sigma=3.0, window=32, min_history=8)
  p = jnp.zeros((1,))

  def step(s, g):
    _, s = tx.update(g[None], s, p)
    return s, s.last_skipped

  s, skipped = jax.lax.scan(step, tx.init(p), jnp.asarray(x, jnp.float32))
  skipped = np.asarray(skipped)
  assert not skipped[:100].any()
  assert 1 <= skipped[100:].sum() <= 8 and skipped[100]
  assert not skipped[110:].any() and int(s.consecutive_skipped) == 0


def test_skip_on_spike_value_tests():
  tx = og.skip_on_spike(optax.sgd(1.0), sigma=3.0, window=8, min_history=4)
  p = jnp.zeros((1,))
  s = tx.init(p)
  for i, loss in enumerate([2.0, 2.1, 1.9, 2.0, 2.05]):
    _, s = tx.update(jnp.array([1.0 + 0.01 * i]), s, p, value=jnp.float32(loss))
  assert int(s.num_skipped) == 0 and int(s.value_count) == 5
  u, s = tx.update(jnp.array([1.0]), s, p, value=jnp.float32(9.0))  # loss spike only
  assert bool(s.last_skipped) and float(u[0]) == 0.0 and float(s.value) == 9.0
  u, s = tx.update(jnp.array([1.0]), s, p, value=jnp.float32(jnp.nan))  # NaN loss
  assert bool(s.last_skipped) and int(s.value_count) == 6 and int(s.num_skipped) == 2
  u, s = tx.update(jnp.array([1.0]), s, p)  # no value: only the norm is tested
  assert not bool(s.last_skipped) and int(s.value_count) == 6 and float(u[0]) == -1.0


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
  assert tx.init(p).inner_state.norm_history.shape == (8,)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(tx.init)(p)
  tx = optax.inject_hyperparams(og.skip_on_spike, static_args=("window",))(
      optax.sgd(0.1), window=8, min_history=2
  )
  s = jax.jit(tx.init)(p)
  assert s.inner_state.norm_history.shape == (8,)
  # sigma and min_history are traced hyperparameters that can be changed in place
  s.hyperparams["sigma"] = jnp.float32(1e-3)
  update = jax.jit(tx.update)
  for g in [1.0, 1.1, 1.2]:
    _, s = update(jnp.full((3,), g), s, p)
  assert int(s.inner_state.num_skipped) == 1  # 1.2 > mean + 0.001 std of [1, 1.1]


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
  return jax.tree_util.tree_map(lambda x: x * scale, g)


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
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


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
