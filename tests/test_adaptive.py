"""Tests of adaptive clipping (optax_guard/_adaptive.py).

AutoClip and ZClip are checked against plain-NumPy float64 reimplementations
of the published algorithms written here (a Python list/deque history and
``numpy.percentile``; ZClip's warm-up buffer then EMA, structured like the
authors' reference code), over long sequences of gradient norms with spikes,
zeros and non-finite values. AGC is checked against a NumPy closed form and
against ``optax.adaptive_grad_clip`` where their unit conventions overlap.
"""

from __future__ import annotations

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import f64, np_norm, np_unit_axes
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_guard as og

F32_MAX = float(np.finfo(np.float32).max)
DIM = 4  # every sequence test feeds a single leaf of shape (DIM,)


# ---------------------------------------------------------------------------
# Norm sequences
# ---------------------------------------------------------------------------


def _ref_norm(g) -> float:
  """The float32-accumulated L2 norm, modelled in float64.

  The sum of squares is exact enough in float64; it is ``inf`` in float32 as
  soon as it exceeds the float32 range (1e30-scaled gradients, or norms above
  ~1.8e19), and NaN for a NaN element.
  """
  with np.errstate(over="ignore", invalid="ignore"):
    n = float(np_norm(g))
  return float("inf") if n * n > F32_MAX else n


def _sequence(seed: int, steps: int, *, faults: bool = True) -> np.ndarray:
  """float32 ``(steps, DIM)`` gradients whose norms drift, spike and break.

  Includes x50 spikes, exact zeros, NaN, +-inf and 1e30-scaled entries (finite
  in float32, but their squares overflow), some of them in the first steps so
  that warm-ups and empty histories see them too.
  """
  rng = np.random.default_rng(seed)
  base = np.exp(rng.normal(0.0, 0.3, steps)) * np.linspace(2.0, 0.5, steps)
  direction = rng.normal(size=(steps, DIM))
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  g = base[:, None] * direction
  kind = rng.choice(
      ["ok", "spike", "zero", "nan", "inf", "big"],
      size=steps, p=[0.86, 0.05, 0.02, 0.03, 0.02, 0.02],
  )
  if not faults:
    kind = np.where(np.isin(kind, ["nan", "inf", "big"]), "ok", kind)
  else:
    kind[[1, 3]] = ["nan", "inf"]  # faults during warm-up
  for t, k in enumerate(kind):
    if k == "spike":
      g[t] *= 50.0
    elif k == "zero":
      g[t] = 0.0
    elif k == "nan":
      g[t, 0] = np.nan
    elif k == "inf":
      g[t, 1] = -np.inf if t % 2 else np.inf
    elif k == "big":
      g[t] = direction[t] * 1e30
  return g.astype(np.float32)


def _factor(threshold: float, n: float) -> float:
  """min(1, c/n) with 1 for n = 0, 0 for n = inf, NaN for n = NaN."""
  if np.isnan(n):
    return float("nan")
  if np.isinf(n):
    return 0.0
  if n <= threshold:
    return 1.0
  return threshold / n


def _run(tx, grads, params=None):
  """Runs ``tx`` over the rows of ``grads`` with lax.scan; NumPy results."""
  grads = jnp.asarray(grads)
  params = jnp.zeros(grads.shape[1:], grads.dtype) if params is None else params

  @jax.jit
  def run(grads, state):
    def body(s, g):
      u, s = tx.update(g, s, params)
      return s, (u, s)

    return jax.lax.scan(body, state, grads)[1]

  updates, states = run(grads, tx.init(params))
  return np.asarray(updates), jax.tree.map(np.asarray, states)


def _assert_close(actual, desired, rtol=1e-5):
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol, atol=0)


# ---------------------------------------------------------------------------
# AutoClip reference (Seetharaman et al. 2020, Algorithm 1, bounded history)
# ---------------------------------------------------------------------------


def _ref_autoclip(grads, percentile, history_size):
  """The paper: append the norm to the history, clip at its percentile.

  Only finite norms are appended; before any is recorded there is no clipping
  (threshold = the norm). ``percentile`` may be a function of the step.
  """
  history = collections.deque(maxlen=history_size)
  outs, norms, thresholds = [], [], []
  for t, g in enumerate(np.asarray(grads, np.float64)):
    n = _ref_norm(g)
    if np.isfinite(n):
      history.append(n)
    q = percentile(t) if callable(percentile) else percentile
    c = float(np.percentile(np.array(history), q)) if history else n
    with np.errstate(invalid="ignore"):
      # a norm within float noise (a relative 1e-3) of the threshold is not clipped
      outs.append(g * (1.0 if np.isfinite(n) and n <= c * (1 + 1e-3) else _factor(c, n)))
    norms.append(n)
    thresholds.append(c)
  return np.array(outs), np.array(norms), np.array(thresholds)


@pytest.mark.parametrize(
    "seed,steps,percentile,history_size",
    [(0, 300, 10.0, 50), (1, 300, 50.0, 1000), (2, 200, 90.0, 7), (3, 120, 0.0, 16),
     (4, 120, 99.9, 16), (5, 60, 37.5, 1)],
)
def test_autoclip_matches_numpy_reference(seed, steps, percentile, history_size):
  grads = _sequence(seed, steps)
  tx = og.autoclip(percentile, history_size=history_size)
  updates, state = _run(tx, grads)
  ref_u, ref_n, ref_c = _ref_autoclip(grads, percentile, history_size)
  _assert_close(updates, ref_u)
  _assert_close(state.norm, ref_n)
  _assert_close(state.threshold, ref_c)
  finite = np.isfinite(ref_n)
  np.testing.assert_array_equal(state.count, np.cumsum(finite))
  assert state.history.shape == (steps, history_size)


def test_autoclip_before_any_finite_norm_does_not_clip_or_hide():
  grads = np.array([[np.nan, 1, 0, 0], [np.inf, 0, 0, 0], [1e30, 1e30, 0, 0],
                    [3.0, 4.0, 0, 0], [30.0, 40.0, 0, 0]], np.float32)
  updates, state = _run(og.autoclip(10.0, history_size=8), grads)
  np.testing.assert_array_equal(state.count, [0, 0, 0, 1, 2])
  assert np.all(np.isnan(updates[0]))  # NaN norm: NaN updates
  np.testing.assert_array_equal(updates[1], [np.nan, 0, 0, 0])  # inf * 0
  np.testing.assert_array_equal(updates[2], [0, 0, 0, 0])  # norm overflows: factor 0
  assert np.isnan(state.threshold[0]) and np.isinf(state.threshold[1:3]).all()
  np.testing.assert_array_equal(updates[3], grads[3])  # first finite norm: no clip
  np.testing.assert_array_equal(state.threshold[3], 5.0)
  # percentile 10 of [5, 50] = 9.5
  _assert_close(state.threshold[4], 9.5)
  _assert_close(updates[4], grads[4] * 9.5 / 50.0)


def test_autoclip_nonfinite_norm_uses_history_alone():
  grads = np.array([[1.0, 0, 0, 0], [3.0, 0, 0, 0], [np.inf, 0, 2.0, 0]], np.float32)
  updates, state = _run(og.autoclip(50.0, history_size=4), grads)
  _assert_close(state.threshold[2], 2.0)  # median of [1, 3], the inf is not recorded
  np.testing.assert_array_equal(updates[2], [np.nan, 0, 0, 0])
  np.testing.assert_array_equal(state.history[2], [0, 0, 1.0, 3.0])


def test_autoclip_ring_buffer_keeps_the_last_norms():
  grads = np.zeros((7, DIM), np.float32)
  grads[:, 0] = [1, 2, 3, 4, 5, 6, 7]
  _, state = _run(og.autoclip(50.0, history_size=3), grads)
  np.testing.assert_array_equal(state.history[-1], [5.0, 6.0, 7.0])
  # the median of the last three norms (of the one or two there are at first)
  np.testing.assert_array_equal(state.threshold, [1, 1.5, 2, 3, 4, 5, 6])


def test_autoclip_count_saturates_and_the_history_keeps_rotating():
  tx = og.autoclip(50.0, history_size=5)
  top = np.iinfo(np.int32).max
  state = tx.init(jnp.zeros(DIM))._replace(
      count=jnp.asarray(top, jnp.int32), history=jnp.arange(5, dtype=jnp.float32)
  )
  update = jax.jit(tx.update)
  _, state = update(jnp.array([9.0, 0, 0, 0]), state)
  assert int(state.count) == top
  np.testing.assert_array_equal(state.history, [1, 2, 3, 4, 9])
  _, state = update(jnp.array([8.0, 0, 0, 0]), state)
  assert int(state.count) == top
  np.testing.assert_array_equal(state.history, [2, 3, 4, 9, 8])


def test_autoclip_percentile_schedule_under_inject_hyperparams():
  grads = _sequence(7, 150)
  sched = lambda t: jnp.minimum(90.0, 10.0 + t)
  tx = optax.inject_hyperparams(og.autoclip)(percentile=sched, history_size=20)
  updates, state = _run(tx, grads)
  ref_u, _, ref_c = _ref_autoclip(grads, lambda t: min(90.0, 10.0 + t), 20)
  _assert_close(updates, ref_u)
  _assert_close(state.inner_state.threshold, ref_c)
  assert state.inner_state.history.shape == (150, 20)


def test_autoclip_history_size_under_inject_hyperparams():
  params = jnp.zeros(DIM)
  tx = optax.inject_hyperparams(og.autoclip)()  # history_size=1000 becomes an array
  assert tx.init(params).inner_state.history.shape == (1000,)
  with pytest.raises(ValueError, match="static_args"):
    jax.eval_shape(tx.init, params)
  static = optax.inject_hyperparams(og.autoclip, static_args=("history_size",))(
      history_size=12
  )
  assert jax.eval_shape(static.init, params).inner_state.history.shape == (12,)
  assert jax.jit(static.init)(params).inner_state.history.shape == (12,)


# ---------------------------------------------------------------------------
# ZClip reference (Kumar et al. 2025; zscore mode, adaptive_scaling)
# ---------------------------------------------------------------------------


def _ref_zclip(grads, *, alpha=0.97, z_threshold=2.5, warmup_steps=25, max_norm=None,
               eps=1e-6):
  """ZClip as published: a warm-up buffer initialises the mean and population
  variance, then z-score clipping to ``mu + z_thr**2 sigma / z`` and an EMA of
  the clipped norm. Our documented choices: non-finite norms are not recorded
  and ``max_norm`` (when given) is part of the clipped norm fed to the EMA.
  ``z_threshold`` may be a function of the step.
  """
  buffer, mean, var = [], None, None
  outs, norms, thresholds, zs, means, stds = [], [], [], [], [], []
  for t, g in enumerate(np.asarray(grads, np.float64)):
    n = _ref_norm(g)
    zt = z_threshold(t) if callable(z_threshold) else z_threshold
    c, z = np.inf, np.nan
    if mean is not None:
      # the deviation is floored at float noise: a relative 1e-3 of the mean
      std = max(np.sqrt(var), 1e-3 * abs(mean))
      with np.errstate(invalid="ignore", divide="ignore"):
        z = (n - mean) / (std + eps)
        if z > zt:
          c = mean + zt * zt * std / z
    if max_norm is not None:
      c = min(c, max_norm)
    with np.errstate(invalid="ignore"):
      outs.append(g * _factor(c, n))
    if np.isfinite(n):
      if mean is None:
        buffer.append(n)
        if len(buffer) == warmup_steps:
          mean, var = float(np.mean(buffer)), float(np.var(buffer))
      else:
        x = min(n, c)
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
    norms.append(n)
    thresholds.append(c)
    zs.append(z)
    means.append(np.mean(buffer) if mean is None and buffer else (mean or 0.0))
    stds.append(np.std(buffer) if mean is None and buffer else np.sqrt(var or 0.0))
  return (np.array(outs), np.array(norms), np.array(thresholds), np.array(zs),
          np.array(means), np.array(stds))


def _check_zclip(updates, state, ref, z_threshold):
  ref_u, ref_n, ref_c, ref_z, ref_mean, ref_std = ref
  _assert_close(updates, ref_u)
  _assert_close(state.norm, ref_n)
  # the applied norm min(n, c) is continuous in z (at z = z_thr, c = n)
  with np.errstate(invalid="ignore"):
    _assert_close(np.minimum(state.threshold, state.norm), np.minimum(ref_c, ref_n))
  zt = np.array([z_threshold(t) if callable(z_threshold) else z_threshold
                 for t in range(len(ref_n))])
  decided = ~(np.abs(ref_z - zt) < 1e-3)  # float32 and float64 agree on the spike test
  np.testing.assert_array_equal(np.isinf(state.threshold)[decided], np.isinf(ref_c)[decided])
  _assert_close(state.mean, ref_mean)
  # float32 cancellation in (x - mean)**2 once the deviation is ~1e-5 of the mean
  np.testing.assert_allclose(
      state.std, ref_std, rtol=2e-5, atol=1e-7 * np.nanmax(np.abs(ref_mean))
  )
  np.testing.assert_array_equal(state.count, np.cumsum(np.isfinite(ref_n)))


@pytest.mark.parametrize(
    "seed,steps,kwargs",
    [
        (10, 400, {}),
        (11, 300, dict(alpha=0.9, z_threshold=2.0, warmup_steps=10)),
        (12, 300, dict(warmup_steps=5, max_norm=1.5)),
        (13, 200, dict(alpha=0.5, z_threshold=1.0, warmup_steps=1, eps=0.0)),
        (14, 200, dict(alpha=0.99, z_threshold=3.0, warmup_steps=3, max_norm=40.0)),
    ],
)
def test_zclip_matches_numpy_reference(seed, steps, kwargs):
  grads = _sequence(seed, steps)
  updates, state = _run(og.zclip(**kwargs), grads)
  ref = _ref_zclip(grads, **kwargs)
  with np.errstate(invalid="ignore"):
    assert (ref[3] > kwargs.get("z_threshold", 2.5)).sum() >= 5, "too few spikes"
  _check_zclip(updates, state, ref, kwargs.get("z_threshold", 2.5))


def test_zclip_warmup_statistics_then_first_adaptive_step():
  norms = [1.0, 2.0, 4.0]
  grads = np.zeros((5, DIM), np.float32)
  grads[:3, 0] = norms
  grads[3, 0] = np.nan  # not counted
  grads[4, 0] = 20.0
  updates, state = _run(og.zclip(warmup_steps=3), grads)
  np.testing.assert_array_equal(state.count, [1, 2, 3, 3, 4])
  np.testing.assert_array_equal(state.threshold[:4], np.inf)  # no clipping in warm-up
  mu, sd = np.mean(norms), np.std(norms)
  _assert_close(state.mean[2], mu)
  _assert_close(state.std[2], sd)
  _assert_close(state.mean[3], mu)  # NaN leaves the statistics untouched
  z = (20.0 - mu) / (sd + 1e-6)
  c = mu + 2.5**2 * sd / z
  _assert_close(state.threshold[4], c)
  _assert_close(updates[4, 0], c)
  mu_new = 0.97 * mu + 0.03 * c
  _assert_close(state.mean[4], mu_new)
  _assert_close(state.std[4], np.sqrt(0.97 * sd**2 + 0.03 * (c - mu_new) ** 2))


def test_zclip_max_norm_during_warmup_and_nonfinite():
  grads = np.array([[30.0, 40.0, 0, 0], [np.inf, 0, 0, 0], [np.nan, 0, 0, 0],
                    [1e30, 0, 0, 0], [1e18, 0, 0, 0]], np.float32)
  updates, state = _run(og.zclip(warmup_steps=10, max_norm=5.0), grads)
  _assert_close(updates[0], [3.0, 4.0, 0, 0])
  _assert_close(state.mean[0], 50.0)  # the warm-up records the raw norm
  np.testing.assert_array_equal(updates[1], [np.nan, 0, 0, 0])
  assert np.isnan(updates[2]).all()
  np.testing.assert_array_equal(updates[3], [0, 0, 0, 0])  # 1e60 overflows float32
  _assert_close(updates[4], [5.0, 0, 0, 0])  # 1e36 does not: finite norm, clipped
  np.testing.assert_array_equal(state.count, [1, 1, 1, 1, 2])
  _assert_close(state.mean[4], (50.0 + 1e18) / 2)
  # without max_norm an infinite norm during warm-up still gives factor 0
  updates, _ = _run(og.zclip(warmup_steps=10), grads[1:2])
  np.testing.assert_array_equal(updates[0], [np.nan, 0, 0, 0])


def test_zclip_count_saturates():
  tx = og.zclip(warmup_steps=2)
  top = np.iinfo(np.int32).max
  state = tx.init(None)._replace(count=jnp.asarray(top, jnp.int32), mean=jnp.float32(1.0),
                                 std=jnp.float32(0.5))
  _, state = jax.jit(tx.update)(jnp.array([1.2, 0, 0, 0]), state)
  assert int(state.count) == top
  _assert_close(state.mean, 0.97 + 0.03 * 1.2)


def test_zclip_schedules_and_defaults_under_inject_hyperparams():
  grads = _sequence(20, 200)
  sched = lambda t: 1.5 + 0.01 * t
  tx = optax.inject_hyperparams(og.zclip)(z_threshold=sched, warmup_steps=8)
  updates, state = _run(tx, grads)
  _check_zclip(updates, state.inner_state, _ref_zclip(grads, z_threshold=sched,
                                                       warmup_steps=8), sched)
  # defaults traced (warmup_steps=25 as an int32 array), max_norm=None static
  injected, s_inj = _run(optax.inject_hyperparams(og.zclip)(), grads)
  direct, s_dir = _run(og.zclip(), grads)
  chex.assert_trees_all_close(injected, direct, rtol=1e-6)
  chex.assert_trees_all_close(s_inj.inner_state, s_dir, rtol=1e-6)


# ---------------------------------------------------------------------------
# Properties shared by both: the bound holds, an update under it is untouched
# ---------------------------------------------------------------------------

_SEQ = 24


def _run_raw(tx, grads):
  def body(s, g):
    u, s = tx.update(g, s)
    return s, (u, s.norm, s.threshold)

  return jax.lax.scan(body, tx.init(grads[0]), grads)[1]


_bound_runs = {  # jitted once, reused by every hypothesis example
    "autoclip": jax.jit(lambda g: _run_raw(og.autoclip(25.0, history_size=6), g)),
    "zclip": jax.jit(lambda g: _run_raw(og.zclip(warmup_steps=4, max_norm=30.0), g)),
}


@settings(max_examples=25)
@given(
    st.lists(st.floats(-3.0, 8.0), min_size=_SEQ, max_size=_SEQ),
    st.sampled_from(sorted(_bound_runs)),
)
def test_adaptive_bound_holds_and_small_updates_untouched(log_norms, name):
  rng = np.random.default_rng(len(name))
  direction = rng.normal(size=(_SEQ, DIM))
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  grads = (np.exp(np.array(log_norms))[:, None] * direction).astype(np.float32)
  updates, norm, threshold = map(np.asarray, _bound_runs[name](jnp.asarray(grads)))
  out_norm = np.linalg.norm(updates.astype(np.float64), axis=1)
  # autoclip leaves a norm within float noise (a relative 1e-3) of its threshold alone
  slack = 1e-3 if name == "autoclip" else 0.0
  assert np.all(out_norm <= threshold * (1 + slack) * (1 + 1e-6))
  assert np.all(out_norm <= np.linalg.norm(grads.astype(np.float64), axis=1) * (1 + 1e-6))
  if name == "zclip":
    assert np.all(out_norm <= 30.0 * (1 + 1e-6))
  under = norm <= threshold * (1 + slack)
  np.testing.assert_array_equal(updates[under], grads[under])


# ---------------------------------------------------------------------------
# AGC
# ---------------------------------------------------------------------------


def _ref_agc(g, p, clipping, eps, axis=None):
  """Brock et al. 2021, eq. 3: per unit g * min(1, lambda max(|W|, eps) / |g|)."""
  g64 = f64(g)
  axes = np_unit_axes(g64.ndim, axis)
  gn = np_norm(g64, axis=axes, keepdims=True)
  pn = np_norm(p, axis=axes, keepdims=True)
  limit = clipping * np.maximum(pn, eps)
  with np.errstate(divide="ignore", invalid="ignore"):
    factor = np.where(gn <= limit, 1.0, limit / gn)
  return g64 * factor


def _agc_tree(seed, shapes):
  rng = np.random.default_rng(seed)
  params, grads = {}, {}
  for i, shape in enumerate(shapes):
    params[f"l{i}"] = rng.normal(size=shape).astype(np.float32)
    # per-unit scales spanning "well under" to "far over" the limit
    scale = np.exp(rng.uniform(-6, 1, size=shape[-1:] if shape else ()))
    grads[f"l{i}"] = (scale * rng.normal(size=shape)).astype(np.float32)
  return jax.tree.map(jnp.asarray, (params, grads))


SHAPES = [(), (5,), (6, 4), (3, 3, 2, 8), (2, 2, 2, 3, 4)]


@jax.jit
def _agc(grads, params, clipping, eps=1e-3):
  """og.adaptive_grad_clip with traced clipping/eps (one compile per tree shape)."""
  return og.adaptive_grad_clip(clipping, eps=eps).update(grads, optax.EmptyState(), params)[0]


def test_adaptive_grad_clip_matches_numpy_closed_form():
  shapes = SHAPES + [(4, 3, 5), (1, 7), (2, 3, 4, 5, 2, 3)]
  params, grads = _agc_tree(0, shapes)
  out = _agc(grads, params, 0.05)
  for k in grads:
    _assert_close(out[k], _ref_agc(grads[k], params[k], 0.05, 1e-3))
  changed = np.concatenate([np.ravel(out[k] != grads[k]) for k in grads])
  assert 0.2 < changed.mean() < 0.9, changed.mean()  # both branches are exercised


def test_adaptive_grad_clip_matches_optax_where_units_agree():
  # scalars, vectors, (in, out), HWIO and DHWIO kernels: same units as optax
  params, grads = _agc_tree(1, SHAPES)
  for clipping, eps in ((0.01, 1e-3), (0.1, 0.5)):
    theirs = optax.adaptive_grad_clip(clipping, eps=eps)
    a = _agc(grads, params, clipping, eps)
    b, _ = jax.jit(theirs.update)(grads, theirs.init(params), params)
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=0)


def test_adaptive_grad_clip_differs_from_optax_on_3d_leaves_as_documented():
  params, grads = _agc_tree(2, [(4, 3, 5)])
  a = _agc(grads, params, 0.05)
  # ours reduces over (0, 1) for a 3-D leaf; optax (multi-head) over axis 0 only
  run = lambda tx: jax.jit(tx.update)(grads, optax.EmptyState(), params)[0]
  b = run(optax.adaptive_grad_clip(0.05, axis=(0, 1)))
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=0)
  c = run(optax.adaptive_grad_clip(0.05))
  assert not np.allclose(a["l0"], c["l0"], rtol=1e-3)
  # and an explicit axis gives optax's units
  chex.assert_trees_all_close(run(og.adaptive_grad_clip(0.05, axis=0)), c, rtol=1e-6, atol=0)


def test_adaptive_grad_clip_zero_weights_use_eps():
  params = {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}
  grads = {"kernel": jnp.array([[3.0, 0.0], [4.0, 1e-6], [0.0, 0.0]]),
           "bias": jnp.array([6.0, 8.0])}
  out = _agc(grads, params, 0.5, 0.01)
  limit = 0.5 * 0.01
  _assert_close(out["kernel"][:, 0], np.array([3.0, 4.0, 0.0]) / 5.0 * limit)
  np.testing.assert_array_equal(out["kernel"][:, 1], grads["kernel"][:, 1])  # under limit
  _assert_close(out["bias"], np.array([6.0, 8.0]) / 10.0 * limit)


def test_adaptive_grad_clip_nonfinite_units_not_hidden_others_untouched():
  params = jnp.ones((2, 3))
  grads = jnp.array([[np.nan, np.inf, 1e-3], [1.0, 0.0, 1e-3]], jnp.float32)
  out = _agc(grads, params, 0.01)
  assert np.isnan(out[:, 0]).all()  # NaN unit: NaN
  np.testing.assert_array_equal(out[:, 1], [np.nan, 0.0])  # inf unit: factor 0
  np.testing.assert_array_equal(out[:, 2], grads[:, 2])  # under the limit: bitwise


@settings(max_examples=20)
@given(
    st.sampled_from([(), (7,), (3, 5), (2, 3, 4), (2, 2, 3, 2)]),
    st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    st.floats(1e-3, 1.0),
    st.integers(0, 2**16),
)
def test_adaptive_grad_clip_bound_holds(shape, dtype, clipping, seed):
  rng = np.random.default_rng(seed)
  p = jnp.asarray(rng.normal(size=shape) * 100.0, dtype)  # float16 squares overflow
  g = jnp.asarray(rng.normal(size=shape) * rng.uniform(0.01, 50.0), dtype)
  out = _agc(g, p, clipping)
  assert out.dtype == g.dtype and out.shape == g.shape
  axes = np_unit_axes(len(shape))
  o64, g64 = f64(out), f64(g)
  on, gn = np_norm(o64, axis=axes), np_norm(g64, axis=axes)
  limit = clipping * np.maximum(np_norm(p, axis=axes), 1e-3)
  tol = 4 * float(jnp.finfo(dtype).eps)
  assert np.all(on <= limit * (1 + tol) + 1e-30)
  untouched = gn <= limit * (1 - tol)
  if len(shape) >= 2:
    np.testing.assert_array_equal(o64[..., untouched], g64[..., untouched])
  elif untouched.all():
    np.testing.assert_array_equal(o64, g64)


@pytest.mark.parametrize("level", [1e-5, 1.0, 3e4])
def test_statistical_clips_ignore_float_noise(level):
  """Norms equal up to +-1 ulp, then one a few ulp above: bitwise unchanged."""
  rng = np.random.default_rng(3)
  lvl = np.float32(level)
  steps = np.array([np.nextafter(lvl, np.float32(0)), lvl, np.nextafter(lvl, np.float32(9e9))])
  few_ulp = steps[2] * np.float32(1.0 + 3e-7)
  norms = np.concatenate([np.full(20, lvl), rng.choice(steps, 40), [few_ulp]])
  grads = np.zeros((len(norms), DIM), np.float32)
  grads[:, 0] = norms.astype(np.float32)
  for tx in (og.zclip(warmup_steps=10), og.autoclip(10.0, history_size=50)):
    updates, _ = _run(tx, grads)
    np.testing.assert_array_equal(updates, grads)
  # a 10x norm afterwards is still clipped by zclip
  spiked = np.concatenate([grads, grads[:1] * 10])
  updates, _ = _run(og.zclip(warmup_steps=10), spiked)
  assert np.linalg.norm(updates[-1]) < 1.01 * lvl
