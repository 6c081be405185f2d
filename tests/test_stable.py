"""Tests of StableAdamW and SPAM (optax_guard/_stable_adam.py, optax_guard/_spam.py).

Both are checked against plain-NumPy float64 reimplementations written here:
StableAdamW from the published rule (per-tensor ``RMS`` of ``g / sqrt(v_hat)``,
the rate and the weight decay divided by ``max(1, RMS)``), SPAM structured
like the authors' ``SPAM.py`` (its step counters, its reset condition, its
``CosineDecay(0.99, W)`` ramp) with the differences our docstrings state.
Properties: StableAdamW is ``optax.adamw`` bitwise while no rate is cut, SPAM
is ``optax.adamw`` bitwise with its defences off (given the same ``eps`` and
weight decay, whose defaults differ), SPAM clips exactly the
spiked elements to exactly ``sign(g) sqrt(theta v)``, a scanned tree and its
unrolled twin get the same updates.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import assert_bitwise_equal, f64, make_params
from flax import serialization
from hypothesis import given
from hypothesis import strategies as st

import optax_guard as og


def _tree(rng, scale=1.0, dtype=jnp.float32):
  shapes = {"dense": {"kernel": (4, 3), "bias": (3,)}, "scale": ()}
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.standard_normal(s), jnp.float32).astype(dtype),
      shapes, is_leaf=lambda x: isinstance(x, tuple),
  )


def _run(tx, grads, params, *, apply=True, jit=True):
  """Updates (and params) of ``len(grads)`` steps; returns (updates, params, states)."""
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  outs, states = [], []
  for g in grads:
    u, state = update(g, state, params)
    if apply:
      params = optax.apply_updates(params, u)
    outs.append(u)
    states.append(state)
  return outs, params, states


# ---------------------------------------------------------------------------
# StableAdamW: NumPy float64 reference
# ---------------------------------------------------------------------------


def _np_stable_adamw(grads, params, lr, *, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, decay=None,
                     stacked=None):
  """The published rule, leaf by leaf (``stacked``: leaf name -> leading layer axes)."""
  leaves = {k: f64(v) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in leaves.items()}
  v = {k: np.zeros_like(x) for k, x in leaves.items()}
  updates, rms_log = [], []
  for t, g in enumerate(grads, start=1):
    step, rms_step = {}, []
    for k in leaves:
      gk = f64(g[k])
      m[k] = b1 * m[k] + (1 - b1) * gk
      v[k] = b2 * v[k] + (1 - b2) * gk * gk
      m_hat = m[k] / (1 - b1**t)
      v_hat = v[k] / (1 - b2**t)
      lead = (stacked or {}).get(k, 0)
      axes = tuple(range(lead, gk.ndim))
      ratio = gk * gk / np.maximum(v_hat, eps * eps)
      rms = np.sqrt(np.mean(ratio, axis=axes, keepdims=True)) if axes else np.sqrt(ratio)
      rms_step.extend(np.ravel(rms).tolist())
      rate = lr(t - 1) if callable(lr) else lr
      lr_t = rate / np.maximum(1.0, rms)
      wd_k = wd if (decay is None or decay[k]) else 0.0
      u = -lr_t * (m_hat / (np.sqrt(v_hat) + eps) + wd_k * leaves[k])
      leaves[k] = leaves[k] + u
      step[k] = u
    updates.append(step)
    rms_log.append(rms_step)
  return updates, rms_log


def _flat_params(rng):
  return {"w": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal((4,)), jnp.float32),
          "s": jnp.asarray(rng.standard_normal(()), jnp.float32)}


def _spiky_grads(rng, params, steps, spikes=(4, 9), leaf="w"):
  grads = []
  for t in range(steps):
    g = {k: jnp.asarray(rng.standard_normal(np.shape(v)), jnp.float32) for k, v in params.items()}
    if t in spikes:
      g[leaf] = 30.0 * g[leaf]
    grads.append(g)
  return grads


@pytest.mark.parametrize("seed", [0, 1])
def test_stable_adamw_matches_numpy_reference(seed):
  rng = np.random.default_rng(seed)
  params = _flat_params(rng)
  grads = _spiky_grads(rng, params, 14)
  lr = optax.linear_schedule(0.05, 0.01, 10)
  mask = {"w": True, "b": False, "s": True}
  tx = og.stable_adamw(lr, weight_decay=0.1, mask=mask)
  outs, _, states = _run(tx, grads, params)
  want, rms = _np_stable_adamw(grads, params, lambda t: float(lr(t)), wd=0.1, decay=mask)
  for t, (got, ref) in enumerate(zip(outs, want, strict=True)):
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=2e-7, err_msg=f"step {t} {k}")
    stats = og.guard_stats(states[t])
    assert int(stats["scale_by_stable_adam/num_cut"]) == sum(r > 1.0 for r in rms[t])
    np.testing.assert_allclose(stats["scale_by_stable_adam/max_rms"], max(rms[t]), rtol=1e-5)
  assert any(r > 1.0 for step in rms for r in step)  # the spikes did cut rates


def test_scale_by_stable_adam_cuts_only_the_spiked_tensor():
  rng = np.random.default_rng(3)
  params = _flat_params(rng)
  grads = _decreasing_grads(rng, params, 6)
  grads[-1] = {**grads[-1], "b": 1e3 * grads[-1]["b"]}
  adam_outs, _, _ = _run(optax.scale_by_adam(), grads, params, apply=False)
  outs, _, states = _run(og.scale_by_stable_adam(), grads, params, apply=False)
  last = states[-1]
  assert [int(s.num_cut) for s in states] == [0, 0, 0, 0, 0, 1] and float(last.max_rms) > 1.0
  assert_bitwise_equal({"w": outs[-1]["w"], "s": outs[-1]["s"]},
           {"w": adam_outs[-1]["w"], "s": adam_outs[-1]["s"]})
  np.testing.assert_allclose(outs[-1]["b"], adam_outs[-1]["b"] / last.max_rms, rtol=1e-6)


def test_stable_adamw_total_cut_adds_up_the_per_step_counts():
  """A logger reading every N steps misses no cut: ``total_cut`` is the running sum."""
  rng = np.random.default_rng(11)
  params = _flat_params(rng)
  grads = _spiky_grads(rng, params, 16, spikes=(3, 4, 8, 13), leaf="w")
  grads[8] = {**grads[8], "b": 50.0 * grads[8]["b"]}  # two tensors cut at once
  _, _, states = _run(og.stable_adamw(0.05, weight_decay=0.1), grads, params)
  per_step = [int(s[0].num_cut) for s in states]
  totals = [int(og.guard_stats(s)["scale_by_stable_adam/total_cut"]) for s in states]
  assert sum(c > 0 for c in per_step) >= 3 and max(per_step) >= 2  # cuts on several steps
  assert totals == np.cumsum(per_step).tolist()
  assert states[-1][0].total_cut.dtype == jnp.int32


def test_stable_adam_total_cut_saturates():
  g = {"a": jnp.ones(2), "b": jnp.ones(3)}
  tx = og.scale_by_stable_adam()
  state = tx.init(g)
  _, state = tx.update(jax.tree.map(lambda x: 1e-3 * x, g), state)
  state = state._replace(total_cut=jnp.int32(2**31 - 2))
  _, state = tx.update(g, state)  # both tensors spike: RMS > 1 for each
  assert int(state.num_cut) == 2 and int(state.total_cut) == 2**31 - 1


def _decreasing_grads(rng, params, steps, dtype=jnp.float32):
  """Random signs, every element's magnitude halving each step: ``g^2 <= v_hat`` always."""
  base = {k: np.abs(rng.standard_normal(np.shape(v))) + 0.1 for k, v in params.items()}
  out = []
  for t in range(steps):
    sign = {k: rng.choice([-1.0, 1.0], np.shape(v)) for k, v in params.items()}
    out.append({k: jnp.asarray(sign[k] * base[k] * 0.5**t, jnp.float32).astype(dtype)
                for k in params})
  return out


@pytest.mark.parametrize("dtype, scale, eps", [(jnp.float32, 1.0, 1e-8),
                                               (jnp.bfloat16, 1e-3, 1e-1)], ids=["f32", "bf16"])
def test_stable_adamw_is_optax_adamw_bitwise_while_no_rate_is_cut(dtype, scale, eps):
  """bfloat16 rounds ``v_hat`` too coarsely for ``RMS <= 1`` at step 1: there ``eps`` floors it."""
  rng = np.random.default_rng(5)
  params = jax.tree.map(lambda x: x.astype(dtype), _flat_params(rng))
  grads = [jax.tree.map(lambda x: (scale * x).astype(dtype), g)
           for g in _decreasing_grads(rng, params, 10)]
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 3, 10)
  kwargs = dict(eps=eps, weight_decay=optax.linear_schedule(0.1, 0.0, 8),
                mask=lambda p: jax.tree.map(lambda x: x.ndim > 0, p))
  ref, ref_params, _ = _run(optax.adamw(lr, **kwargs), grads, params)
  got, got_params, states = _run(og.stable_adamw(lr, **kwargs), grads, params)
  assert all(int(s[0].num_cut) == 0 for s in states)
  assert_bitwise_equal(got, ref)
  assert_bitwise_equal(got_params, ref_params)


@given(st.integers(0, 2**31 - 1))
def test_stable_adamw_bitwise_adamw_property(seed):
  rng = np.random.default_rng(seed)
  params = _tree(rng)
  grads = _decreasing_grads(rng, {"k": params["dense"]["kernel"]}, 4)
  grads = [{"dense": {"kernel": g["k"], "bias": jnp.zeros(3)}, "scale": jnp.float32(0.0)}
           for g in grads]
  ref, _, _ = _run(optax.adamw(0.01, weight_decay=0.5), grads, params)
  got, _, states = _run(og.stable_adamw(0.01, weight_decay=0.5), grads, params)
  assert all(int(s[0].num_cut) == 0 for s in states)
  assert_bitwise_equal(got, ref)


def test_scale_by_stable_adam_first_step_is_not_cut():
  """At step 1 ``v_hat = g^2`` up to rounding; optax's rounding puts ``RMS`` just under 1."""
  g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((64,)), jnp.float32)}
  tx = og.scale_by_stable_adam()
  _, state = tx.update(g, tx.init(g))
  assert int(state.num_cut) == 0 and 0.9999 < float(state.max_rms) <= 1.0


def test_scale_by_stable_adam_rms_floors_v_hat_at_eps_squared():
  tx = og.scale_by_stable_adam(eps=0.1)
  g = jnp.array([0.05, 0.0, 0.0, 0.0])  # v_hat = 0.0025 < eps**2 = 0.01
  _, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(state.max_rms, np.sqrt(np.mean([0.0025 / 0.01, 0, 0, 0])),
                             rtol=1e-5)


def test_stable_adamw_decays_with_the_reduced_rate():
  p = {"w": jnp.full((4,), 2.0)}
  tx = og.stable_adamw(0.1, weight_decay=0.5)
  state = tx.init(p)
  for g in (0.01, 0.01, 5.0):  # a spike: RMS > 1 at step 3
    u, state = tx.update({"w": jnp.full((4,), g)}, state, p)
  plain, pstate = optax.adamw(0.1, weight_decay=0.5), None
  pstate = plain.init(p)
  for g in (0.01, 0.01, 5.0):
    pu, pstate = plain.update({"w": jnp.full((4,), g)}, pstate, p)
  rms = float(state[0].max_rms)
  assert rms > 1.0
  np.testing.assert_allclose(u["w"], pu["w"] / rms, rtol=1e-6)  # adam step and decay alike


# ---------------------------------------------------------------------------
# Stacked layers
# ---------------------------------------------------------------------------


def _scanned_and_unrolled(rng, layers=3):
  kernels = rng.standard_normal((layers, 4, 3)).astype(np.float32)
  biases = rng.standard_normal((layers, 3)).astype(np.float32)
  scanned = {"layers": {"kernel": jnp.asarray(kernels), "bias": jnp.asarray(biases)},
             "head": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)}
  unrolled = {"head": scanned["head"]}
  for i in range(layers):
    unrolled[f"layer{i}"] = {"kernel": jnp.asarray(kernels[i]), "bias": jnp.asarray(biases[i])}
  return scanned, unrolled


def _unroll(tree, layers=3):
  out = {"head": tree["head"]}
  for i in range(layers):
    out[f"layer{i}"] = jax.tree.map(lambda x, i=i: x[i], tree["layers"])
  return out


def _stacked_grads(rng, steps, layers=3):
  grads = []
  for t in range(steps):
    g, _ = _scanned_and_unrolled(rng, layers)
    if t == 3:  # a spike in one layer only
      g["layers"]["kernel"] = g["layers"]["kernel"].at[1].multiply(40.0)
    grads.append(g)
  return grads


@pytest.mark.parametrize("stacked", [
    {"layers": 1, "head": 0},
    lambda path, leaf: 1 if jax.tree_util.keystr(path).startswith("['layers']") else 0,
], ids=["prefix_tree", "callable"])
def test_stable_adamw_scanned_equals_unrolled(stacked):
  rng = np.random.default_rng(11)
  scanned, unrolled = _scanned_and_unrolled(rng)
  grads = _stacked_grads(rng, 6)
  outs_s, _, states_s = _run(og.stable_adamw(0.05, weight_decay=0.1, stacked=stacked),
                             grads, scanned)
  outs_u, _, states_u = _run(og.stable_adamw(0.05, weight_decay=0.1), [_unroll(g) for g in grads],
                             unrolled)
  for a, b in zip(outs_s, outs_u, strict=True):
    assert_bitwise_equal(_unroll(a), b)
  assert [int(s[0].num_cut) for s in states_s] == [int(s[0].num_cut) for s in states_u]
  assert int(states_s[3][0].num_cut) >= 1


def test_stable_adam_stacked_slices_count_one_each():
  g = {"x": jnp.ones((2, 5))}
  tx = og.scale_by_stable_adam(stacked=1)
  state = tx.init(g)
  _, state = tx.update(g, state)
  _, state = tx.update({"x": jnp.stack([jnp.ones(5), 100.0 * jnp.ones(5)])}, state)
  assert int(state.num_cut) == 1  # only the second slice


def test_stable_adam_stacked_too_many_axes_names_the_leaf():
  tx = og.scale_by_stable_adam(stacked=2)
  g = {"vec": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"scale_by_stable_adam\(stacked=...\).*\['vec'\]"):
    tx.update(g, tx.init(g))


# ---------------------------------------------------------------------------
# SPAM: NumPy float64 reference, structured like SPAM.py
# ---------------------------------------------------------------------------


def _np_spam(grads, params, lr, *, b1=0.9, b2=0.999, eps=1e-6, wd=0.0, theta=5000.0,
             delta_t=500, warmup=150, accu=20):
  """SPAM.py's bookkeeping (total_step, current_step, CosineDecay(0.99, warmup))."""

  def death_rate(c):  # CosineDecay(0.99, warmup).get_dr: CosineAnnealingLR(T_max=warmup + 1)
    return 0.0 if c >= warmup else 0.99 * (1 + math.cos(math.pi * c / (warmup + 1))) / 2

  p = {k: f64(v) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  total_step, current_step = 0, warmup + 1
  outs, scales, clipped = [], [], []
  for g_in in grads:
    scale = 1 - death_rate(current_step)
    step, n_clipped = {}, 0
    t = total_step + 1
    for k in p:
      g = f64(g_in[k]).copy()
      if delta_t and t % delta_t == 0:
        m[k], v[k] = np.zeros_like(m[k]), np.zeros_like(v[k])
      if theta != 0 and t >= accu and (not delta_t or t % delta_t >= accu):
        spike = (g * g > theta * v[k]) & (v[k] > 0)  # v == 0: not clipped (documented)
        g[spike] = np.sign(g[spike]) * np.sqrt(theta * v[k][spike])
        n_clipped += int(np.sum(spike))
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
      u = -lr * (scale * m_hat / (np.sqrt(v_hat) + eps) + wd * p[k])
      p[k] = p[k] + u
      step[k] = u
    total_step += 1
    current_step += 1
    if delta_t and (total_step + 1) % delta_t == 0:
      current_step = 0
    outs.append(step)
    scales.append(scale)
    clipped.append(n_clipped)
  return outs, scales, clipped


def _spam_grads(rng, params, steps):
  grads = []
  for t in range(steps):
    g = {k: jnp.asarray(rng.standard_normal(np.shape(x)) * (1 + 0.3 * math.sin(t)), jnp.float32)
         for k, x in params.items()}
    if t % 4 == 3:  # x100 spikes on a few elements
      g["w"] = g["w"].at[t % 5, 1].multiply(100.0).at[0, 0].multiply(50.0)
    grads.append(g)
  return grads


@pytest.mark.parametrize("kwargs", [
    dict(threshold=4.0, reset_interval=6, warmup_steps=3, clip_delay=2),
    dict(threshold=50.0, reset_interval=5, warmup_steps=4, clip_delay=1, weight_decay=0.1),
    dict(threshold=4.0, reset_interval=None, clip_delay=3),
], ids=["reset6", "ramp_fills_the_period", "no_reset"])
def test_spam_matches_numpy_reference(kwargs):
  rng = np.random.default_rng(21)
  params = _flat_params(rng)
  grads = _spam_grads(rng, params, 20)
  tx = og.spam(0.01, **kwargs)
  outs, _, states = _run(tx, grads, params)
  want, scales, clipped = _np_spam(
      grads, params, 0.01, wd=kwargs.get("weight_decay", 0.0), theta=kwargs["threshold"],
      delta_t=kwargs["reset_interval"] or 0, warmup=kwargs.get("warmup_steps", 150),
      accu=kwargs["clip_delay"])
  for t, (got, ref) in enumerate(zip(outs, want, strict=True)):
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=2e-7, err_msg=f"step {t} {k}")
    stats = og.guard_stats(states[t])
    np.testing.assert_allclose(stats["scale_by_spam/scale"], scales[t], rtol=1e-6)
  assert sum(clipped) > 0  # the reference clipped elements on these runs


def test_spam_ramp_is_the_reference_cosine_decay():
  """``1 - CosineDecay(0.99, W).get_dr(r)`` after each reset, written out for W = 3."""
  tx = og.scale_by_spam(reset_interval=5, warmup_steps=3, clip_delay=2)
  g = jnp.ones(2)
  state = tx.init(g)
  scales = []
  for _ in range(12):
    _, state = tx.update(g, state)
    scales.append(float(state.scale))
  ramp = [1 - 0.99 * (1 + math.cos(math.pi * r / 4)) / 2 for r in range(3)]
  want = [1.0] * 4 + ramp + [1.0, 1.0] + ramp
  np.testing.assert_allclose(scales, want, rtol=1e-6)
  assert scales[4] == pytest.approx(0.01)


def test_spam_reset_zeroes_both_moments_but_not_the_count():
  tx = og.scale_by_spam(b1=0.5, b2=0.5, reset_interval=3, warmup_steps=2, threshold=None)
  g = jnp.array([2.0, -4.0])
  state = tx.init(g)
  for _ in range(2):
    _, state = tx.update(g, state)
  u, state = tx.update(g, state)  # step 3: the moments restart from 0
  assert int(state.count) == 3
  np.testing.assert_array_equal(state.mu, 0.5 * g)
  np.testing.assert_array_equal(state.nu, 0.5 * g * g)
  # bias correction with the un-restarted count: m_hat = 0.5 g / (1 - 0.5**3)
  m_hat, v_hat = 0.5 * g / 0.875, 0.5 * g * g / 0.875
  np.testing.assert_allclose(u, 0.01 * m_hat / (jnp.sqrt(v_hat) + 1e-6), rtol=1e-6)


@given(st.integers(0, 2**31 - 1), st.sampled_from([1.0, 4.0, 5000.0]))
def test_scale_by_spam_clips_exactly_the_spiked_elements(seed, theta):
  rng = np.random.default_rng(seed)
  g1 = rng.standard_normal(40).astype(np.float32)
  g2 = (rng.standard_normal(40) * np.exp(rng.uniform(-3, 5, 40))).astype(np.float32)
  g1[:3] = 0.0  # no history: never clipped
  tx = og.scale_by_spam(b1=0.0, threshold=theta, clip_delay=2)
  state = tx.init(jnp.asarray(g1))
  _, state = tx.update(jnp.asarray(g1), state)
  v = np.asarray(state.nu)
  _, state = tx.update(jnp.asarray(g2), state)
  bound = np.float32(theta) * v  # float32, as the test is made
  spike = (g2 * g2 > bound) & (v > 0)
  want = np.where(spike, np.sign(g2) * np.sqrt(bound), g2).astype(np.float32)
  mu = np.asarray(state.mu)  # b1 = 0: mu is the clipped gradient
  # the decision is exact; unclipped elements are bitwise g, clipped ones
  # sqrt(theta * v) to an ulp (a GPU's float32 sqrt is not correctly rounded)
  np.testing.assert_array_equal(mu[~spike], g2[~spike])
  np.testing.assert_allclose(mu[spike], want[spike], rtol=2.5e-7, atol=0)
  # the second moment is fed the square of the clipped value, theta * v
  sq = np.where(spike, bound, g2 * g2)
  np.testing.assert_allclose(state.nu, np.float32(1 - 0.999) * sq + np.float32(0.999) * v,
                             rtol=1e-6)


def test_scale_by_spam_boundary_is_not_a_spike():
  tx = og.scale_by_spam(b1=0.0, b2=0.0, threshold=4.0, clip_delay=2)
  state = tx.init(jnp.zeros(3))
  _, state = tx.update(jnp.array([1.0, 1.0, 1.0]), state)  # b2 = 0: v = g^2 = 1
  _, state = tx.update(jnp.array([2.0, -np.nextafter(np.float32(2), 3), -1.0]), state)
  np.testing.assert_array_equal(state.mu, [2.0, -2.0, -1.0])  # g^2 == 4 v passes


def test_scale_by_spam_nan_passes_inf_is_clipped():
  tx = og.scale_by_spam(b1=0.0, b2=0.0, threshold=4.0, clip_delay=2)
  state = tx.init(jnp.zeros(3))
  _, state = tx.update(jnp.ones(3), state)  # v = 1
  _, state = tx.update(jnp.array([jnp.nan, -jnp.inf, 1.0]), state)
  mu = np.asarray(state.mu)
  assert np.isnan(mu[0]) and mu[1] == -2.0 and mu[2] == 1.0


def test_scale_by_spam_second_moment_is_exact_beside_a_non_finite_first_moment():
  """The second moment is ordered after the first through an operation that returns it
  bitwise; a non-finite first moment (or gradient) leaves it optax's value, inf not NaN."""
  g = jnp.array([0.5, -2.0, 3.0, jnp.inf, 1.0], jnp.float32)
  mu0 = jnp.array([jnp.inf, jnp.nan, -jnp.inf, 0.0, 1.0], jnp.float32)
  nu0 = jnp.array([1.0, 0.25, 0.0, 1.0, 2.0], jnp.float32)
  tx = og.scale_by_spam(threshold=None, reset_interval=None)
  state = tx.init(jnp.zeros(5))._replace(mu=mu0, nu=nu0)
  _, got = jax.jit(tx.update)(g, state)
  ref = optax.scale_by_adam(eps=1e-6).init(jnp.zeros(5))._replace(mu=mu0, nu=nu0)
  _, ref = jax.jit(optax.scale_by_adam(eps=1e-6).update)(g, ref)
  assert_bitwise_equal(got.nu, ref.nu)
  assert np.isinf(got.nu[3]) and not np.isnan(np.asarray(got.nu)).any()
  assert_bitwise_equal(got.mu, ref.mu)


def test_scale_by_spam_zero_second_moment_is_not_frozen():
  """An element first seen after the delay (v = 0) learns (the reference would zero it)."""
  tx = og.scale_by_spam(b1=0.0, threshold=4.0, clip_delay=1)
  state = tx.init(jnp.zeros(2))
  for _ in range(5):
    _, state = tx.update(jnp.array([1.0, 0.0]), state)
  u, state = tx.update(jnp.array([1.0, 3.0]), state)
  assert float(state.mu[1]) == 3.0 and float(u[1]) > 0.9


@pytest.mark.parametrize("off", [dict(threshold=None), dict(threshold=0.0),
                                 dict(threshold=float("inf"))], ids=["none", "zero", "inf"])
def test_spam_with_its_defences_off_is_optax_adamw(off):
  """Bitwise for the static off switches; ``inf`` is decided on device (no element is
  clipped), and XLA may then fuse Adam's arithmetic differently by an ulp."""
  rng = np.random.default_rng(8)
  params = _flat_params(rng)
  grads = _spam_grads(rng, params, 8)
  mask = {"w": True, "b": False, "s": True}
  lr = optax.linear_schedule(0.1, 0.02, 6)
  got, got_p, states = _run(og.spam(lr, weight_decay=0.1, mask=mask, reset_interval=None, **off,
                                    clip_delay=1), grads, params)
  ref, ref_p, _ = _run(optax.adamw(lr, eps=1e-6, weight_decay=0.1, mask=mask), grads, params)
  if off["threshold"] == float("inf"):
    chex.assert_trees_all_close((got, got_p), (ref, ref_p), rtol=1e-6, atol=1e-9)
  else:
    assert_bitwise_equal(got, ref)
    assert_bitwise_equal(got_p, ref_p)


def test_spam_defences_off_with_its_defaults_is_adamw_with_spams_eps_and_decay():
  """What the docstring states: ``spam(lr, threshold=None, reset_interval=None)`` is
  ``optax.adamw(lr, eps=1e-6, weight_decay=0.0)`` bitwise; with ``optax.adamw``'s own
  defaults (``eps=1e-8``, ``weight_decay=1e-4``) it is not."""
  rng = np.random.default_rng(9)
  params = _flat_params(rng)
  grads = _spam_grads(rng, params, 6)
  got, got_p, _ = _run(og.spam(0.05, threshold=None, reset_interval=None), grads, params)
  ref, ref_p, _ = _run(optax.adamw(0.05, eps=1e-6, weight_decay=0.0), grads, params)
  assert_bitwise_equal((got, got_p), (ref, ref_p))
  plain, _, _ = _run(optax.adamw(0.05), grads, params)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got),
                                                      jax.tree.leaves(plain), strict=True))


def test_spam_reset_interval_must_leave_room_for_the_ramp_and_the_clipping():
  with pytest.raises(ValueError, match=r"spam\(warmup_steps=\.\.\.\) must be < "
                                       r"reset_interval=100 \(.*never end.*\), got 150"):
    og.spam(0.1, reset_interval=100)  # the default warmup_steps=150
  with pytest.raises(ValueError, match=r"scale_by_spam\(clip_delay=\.\.\.\) must be < "
                                       r"reset_interval=20 \(.*never act\), got 20"):
    og.scale_by_spam(reset_interval=20, warmup_steps=5, clip_delay=20)
  # one step of full rate (or of clipping) per period is allowed
  og.spam(0.1, reset_interval=20, warmup_steps=19, clip_delay=19)
  # with clipping off the clip delay does not matter; with resets off neither does the ramp
  for off in (None, 0.0, float("inf")):
    og.spam(0.1, reset_interval=20, warmup_steps=5, clip_delay=50, threshold=off)
  og.spam(0.1, reset_interval=None, warmup_steps=1000, clip_delay=1000)
  og.spam(0.1, reset_interval=0, warmup_steps=1000, clip_delay=1000)
  # values traced by optax.inject_hyperparams are not compared (as every value check)
  tx = optax.inject_hyperparams(og.spam)(0.1, reset_interval=10, clip_delay=20)
  params = _flat_params(np.random.default_rng(0))
  tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)


def test_spam_step_counts_are_whole_numbers_up_to_int32():
  tx = og.spam(0.1, reset_interval=1e3, warmup_steps=1e2, clip_delay=2e1)  # integral floats
  params = _flat_params(np.random.default_rng(1))
  tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  with pytest.raises(ValueError, match=r"spam\(reset_interval=\.\.\.\) must be <= 2\*\*31 - 1"):
    og.spam(0.1, reset_interval=2**31)
  with pytest.raises(ValueError, match=r"adagc\(warmup_steps=\.\.\.\) must be <= 2\*\*31 - 1"):
    og.adagc(warmup_steps=2**31)


@pytest.mark.parametrize("name", ["stable_adamw", "spam"])
def test_a_mask_that_does_not_fit_the_params_names_the_optimizer_and_mask(name):
  factory = og.stable_adamw if name == "stable_adamw" else og.spam
  params = _flat_params(np.random.default_rng(0))
  grads = jax.tree.map(jnp.ones_like, params)
  for mask in ({"w": True}, lambda p: [True]):
    tx = factory(0.1, weight_decay=0.1, mask=mask)
    with pytest.raises(ValueError, match=rf"{name}\(mask=\.\.\.\) must have the tree "
                                         r"structure of the params or a prefix of it"):
      tx.update(grads, tx.init(params), params)


def test_spam_defaults_follow_the_reference():
  import inspect
  sig = inspect.signature(og.spam).parameters
  assert (sig["b1"].default, sig["b2"].default, sig["eps"].default) == (0.9, 0.999, 1e-6)
  assert sig["threshold"].default == 5000.0 and sig["reset_interval"].default == 500
  assert sig["warmup_steps"].default == 150 and sig["clip_delay"].default == 20
  assert sig["weight_decay"].default == 0.0


def test_spam_traced_intervals_under_inject_hyperparams():
  rng = np.random.default_rng(2)
  params = _flat_params(rng)
  grads = _spam_grads(rng, params, 12)
  kwargs = dict(threshold=4.0, reset_interval=5, warmup_steps=3, clip_delay=2)
  direct, _, _ = _run(og.spam(0.01, **kwargs), grads, params)
  injected, _, states = _run(optax.inject_hyperparams(og.spam)(0.01, **kwargs), grads, params)
  # (optax rounds 1 - b2 differently for a Python float and a float32 array)
  chex.assert_trees_all_close(injected, direct, rtol=2e-5, atol=1e-9)
  # the hyperparameters arrive as arrays and can change mid-run
  assert states[-1].hyperparams["reset_interval"].dtype == jnp.int32


# ---------------------------------------------------------------------------
# Transformations: vmap, guard_stats, checkpoints, bad inputs
# ---------------------------------------------------------------------------

FACTORIES = {
    "stable_adamw": lambda: og.stable_adamw(0.05, weight_decay=0.1),
    "scale_by_stable_adam": lambda: og.scale_by_stable_adam(),
    "spam": lambda: og.spam(0.05, threshold=4.0, reset_interval=5, warmup_steps=2,
                            clip_delay=2),
    "scale_by_spam": lambda: og.scale_by_spam(threshold=4.0, reset_interval=5, warmup_steps=2,
                                              clip_delay=2),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_vmap_over_independent_runs_equals_a_loop(name):
  tx = FACTORIES[name]()
  rng = np.random.default_rng(4)
  params = [_flat_params(rng) for _ in range(3)]
  grads = [_spam_grads(rng, params[0], 7) for _ in range(3)]
  loop = [_run(tx, g, p)[0] for g, p in zip(grads, params, strict=True)]
  stack = lambda *xs: jnp.stack(xs)
  p_b = jax.tree.map(stack, *params)
  state = jax.vmap(tx.init)(p_b)
  update = jax.jit(jax.vmap(tx.update))
  for t in range(7):
    g_b = jax.tree.map(stack, *[g[t] for g in grads])
    u, state = update(g_b, state, p_b)
    p_b = optax.apply_updates(p_b, u)
    for i in range(3):
      chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], u), loop[i][t],
                                  rtol=1e-6, atol=1e-9)


def test_guard_stats_reports_statistics_not_moments():
  params = make_params()  # has a scalar leaf, whose moments are scalars too
  for tx, kind, fields in ((og.stable_adamw(0.1), "scale_by_stable_adam",
                            {"num_cut", "total_cut", "max_rms"}),
                           (og.spam(0.1), "scale_by_spam", {"scale"})):
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    stats = og.guard_stats(state)
    assert set(stats) == {f"{kind}/{f}" for f in fields | {"count"}}, sorted(stats)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_checkpoint_round_trip_and_bitwise_continuation(name):
  tx = FACTORIES[name]()
  rng = np.random.default_rng(6)
  params = _flat_params(rng)
  grads = _spam_grads(rng, params, 12)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  p, s = params, tx.init(params)
  for g in grads[:6]:
    p, s = step(p, s, g)
  blob = serialization.to_bytes({"params": p, "opt_state": s})
  restored = serialization.from_bytes({"params": params, "opt_state": tx.init(params)}, blob)
  chex.assert_trees_all_equal(restored["opt_state"], s)
  chex.assert_trees_all_equal_dtypes(restored["opt_state"], s)
  full_p, full_s = p, s
  p2, s2 = restored["params"], restored["opt_state"]
  for g in grads[6:]:
    full_p, full_s = step(full_p, full_s, g)
    p2, s2 = step(p2, s2, g)
  assert_bitwise_equal((p2, s2), (full_p, full_s))


@pytest.mark.parametrize("make, match", [
    (lambda: og.stable_adamw(0.1, mu_dtype=jnp.int8), r"stable_adamw\(mu_dtype=...\)"),
    (lambda: og.scale_by_stable_adam(mu_dtype="float99"), r"scale_by_stable_adam\(mu_dtype"),
    (lambda: og.stable_adamw(lambda t: 0.1, b2=1.0), r"stable_adamw\(b2=...\)"),
    (lambda: og.stable_adamw(0.1, stacked="layers"), r"stable_adamw\(stacked=...\)"),
    (lambda: og.spam(0.1, clip_delay=0), r"spam\(clip_delay=...\) must be >= 1"),
    (lambda: og.spam(0.1, reset_interval=2.5), r"spam\(reset_interval=...\)"),
    (lambda: og.spam(-0.1), r"spam\(learning_rate=...\)"),
    (lambda: og.scale_by_spam(threshold=-1.0), r"scale_by_spam\(threshold=...\)"),
], ids=["mu_dtype_int", "mu_dtype_unknown", "b2_one", "stacked_string", "clip_delay_zero",
        "reset_fraction", "negative_lr", "negative_threshold"])
def test_bad_hyperparameters_name_the_function_and_argument(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


@pytest.mark.parametrize("name", ["stable_adamw", "spam"])
def test_params_mismatch_names_the_optimizer(name):
  tx = FACTORIES[name]()
  params = _flat_params(np.random.default_rng(0))
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match=rf"{name}.*params"):
    tx.update(grads, tx.init(params), {"w": params["w"]})


def test_spam_rejects_complex_updates():
  tx = og.scale_by_spam()
  z = {"z": jnp.ones(2, jnp.complex64)}
  with pytest.raises(TypeError, match=r"scale_by_spam.*complex.*\['z'\]"):
    tx.update(z, tx.init(z))
