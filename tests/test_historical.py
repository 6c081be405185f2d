"""Tests of update-norm clipping against history (optax_guard/_historical.py).

``clip_by_historical_norm`` is checked against a plain-NumPy float64
reimplementation of Levanter's ``clip_update_by_historical_norm`` rule written
here (a deque of the last ``window`` norms, ``mean + sigma * std``, no
clipping before ``max(2, window // 2)`` norms), with the differences the
docstring states (non-finite norms not recorded, a relative floor of the
spread). The update-norm recipe (between Adam and the learning rate) is
checked for it and for ``zclip`` and ``autoclip`` in the same place.
"""

from __future__ import annotations

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import f64, np_norm
from flax import serialization

import optax_guard as og


def _np_levanter(norms, sigma=3.0, window=128, min_history=None):
  """Thresholds and factors of the rule, in float64, for a sequence of norms."""
  history = collections.deque(maxlen=window)
  need = max(2, window // 2) if min_history is None else min_history
  thresholds, factors = [], []
  with np.errstate(invalid="ignore", over="ignore"):
    for n in norms:
      if len(history) >= need:
        h = np.asarray(history)
        mean, std = h.mean(), h.std()
        c = mean + sigma * max(std, 1e-3 * abs(mean))
      else:
        c = np.inf
      if np.isnan(n):
        f = np.nan
      elif np.isinf(n):
        f = 0.0
      else:
        f = 1.0 if n <= c else c / n
      thresholds.append(c)
      factors.append(f)
      if np.isfinite(n):
        history.append(n)
  return thresholds, factors


def _sequence(seed, steps):
  rng = np.random.default_rng(seed)
  base = np.exp(rng.normal(0, 0.2, steps)) * np.linspace(1.0, 0.6, steps)
  g = base[:, None] * rng.standard_normal((steps, 5))
  for t in rng.choice(np.arange(steps // 3, steps), 6, replace=False):
    g[t] *= rng.choice([5.0, 50.0])
  g[steps // 2, 1] = np.nan
  g[steps // 2 + 3, 2] = np.inf
  return g.astype(np.float32)


@pytest.mark.parametrize("seed, kwargs", [
    (0, dict(sigma=2.0, window=16)),
    (1, dict(sigma=3.0, window=9)),
    (2, dict(sigma=1.0, window=8, min_history=3)),
], ids=["marin_sigma", "odd_window", "min_history"])
def test_clip_by_historical_norm_matches_numpy_reference(seed, kwargs):
  g = _sequence(seed, 60)
  tx = og.clip_by_historical_norm(**kwargs)
  state = tx.init(jnp.zeros(5))
  update = jax.jit(tx.update)
  norms = [float(np_norm(f64(x))) for x in g]
  thresholds, factors = _np_levanter(norms, **kwargs)
  clipped = 0
  for t, x in enumerate(g):
    out, state = update(jnp.asarray(x), state)
    np.testing.assert_allclose(state.threshold, thresholds[t], rtol=1e-5, err_msg=str(t))
    with np.errstate(invalid="ignore"):
      want = f64(x) * factors[t]
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=1e-30, err_msg=str(t))
    clipped += factors[t] < 1
    if factors[t] == 1.0:
      np.testing.assert_array_equal(out, x)  # at or under the threshold: bitwise
  assert clipped >= 3


def test_clip_by_historical_norm_equal_norms_never_clip():
  """A spread of float noise only: the relative floor keeps the threshold above it."""
  tx = og.clip_by_historical_norm(2.0, window=8)
  state = tx.init(jnp.zeros(3))
  g = jnp.array([1.0, 2.0, 2.0])
  for i in range(20):
    x = g * (1 + 1e-7 * (i % 3))  # ulp-level differences
    out, state = tx.update(x, state)
    np.testing.assert_array_equal(out, x)


def test_clip_by_historical_norm_nonfinite_not_hidden_not_recorded():
  tx = og.clip_by_historical_norm(2.0, window=4)
  state = tx.init(jnp.zeros(2))
  out, state = tx.update(jnp.array([jnp.inf, 1.0]), state)  # no history yet: still factor 0
  assert np.isnan(out[0]) and out[1] == 0.0 and int(state.count) == 0
  for n in (1.0, 3.0, 1.0, 3.0):
    _, state = tx.update(jnp.array([n, 0.0]), state)
  out, new = tx.update(jnp.array([jnp.nan, 1.0]), state)
  assert bool(jnp.all(jnp.isnan(out)))
  chex.assert_trees_all_equal((new.count, new.history), (state.count, state.history))


# ---------------------------------------------------------------------------
# The update-norm recipe: between Adam (and the weight decay) and the rate
# ---------------------------------------------------------------------------


def _recipe_grads(steps=40, spikes=(25, 33)):
  rng = np.random.default_rng(7)
  grads = []
  for t in range(steps):
    g = {"w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
         "b": jnp.asarray(rng.standard_normal(4), jnp.float32)}
    if t in spikes:  # a gradient spike: Adam's update jumps because v has not caught up
      g = jax.tree.map(lambda x: 100.0 * x, g)
    grads.append(g)
  return grads


def test_update_norm_recipe_clips_adams_update_as_levanter_does():
  lr = optax.linear_schedule(0.1, 0.01, 40)
  params = {"w": jnp.ones((6, 4)), "b": jnp.zeros(4)}
  grads = _recipe_grads()
  base = optax.chain(optax.scale_by_adam(0.9, 0.95), optax.add_decayed_weights(0.1))
  tx = optax.chain(optax.scale_by_adam(0.9, 0.95), optax.add_decayed_weights(0.1),
                   og.clip_by_historical_norm(2.0, window=16), optax.scale_by_learning_rate(lr))
  b_state, state = base.init(params), tx.init(params)
  raw_norms, outs, raws = [], [], []
  for g in grads:  # the same params each step, so the two chains see the same updates
    raw, b_state = base.update(g, b_state, params)
    u, state = tx.update(g, state, params)
    raw_norms.append(float(np_norm(np.concatenate([f64(x).ravel() for x in
                                                   jax.tree.leaves(raw)]))))
    outs.append(u)
    raws.append(raw)
  _, factors = _np_levanter(raw_norms, sigma=2.0, window=16)
  for t, (u, raw) in enumerate(zip(outs, raws, strict=True)):
    scale = -float(lr(t)) * factors[t]
    chex.assert_trees_all_close(u, jax.tree.map(lambda x, s=scale: s * x, raw),
                                rtol=2e-5, atol=1e-9)
  assert factors[25] < 0.9  # Adam's update nearly doubled there


@pytest.mark.parametrize("clip", [
    lambda: og.zclip(warmup_steps=10),
    lambda: og.autoclip(90.0, history_size=32),
    lambda: og.clip_by_historical_norm(2.0, window=16),
], ids=["zclip", "autoclip", "historical"])
def test_history_clips_between_adam_and_the_rate_bound_the_update_norm(clip):
  """In the update-norm place each clip bounds Adam's update by its own threshold,
  and leaves an ordinary update bitwise unchanged."""
  params = {"w": jnp.ones((6, 4)), "b": jnp.zeros(4)}
  adam = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(0.01))
  tx = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(0.01), clip())
  a_state, state = adam.init(params), tx.init(params)
  clipped = 0
  for g in _recipe_grads(80, spikes=(60, 70)):
    raw, a_state = adam.update(g, a_state, params)
    u, state = tx.update(g, state, params)
    threshold = float(state[2].threshold)
    raw_norm = float(optax.tree.norm(raw))
    unchanged = all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(u),
                                                           jax.tree.leaves(raw), strict=True))
    if unchanged:  # at or under the threshold (within the clips' float-noise margin)
      assert raw_norm <= threshold * (1 + 2e-3)
    else:
      clipped += 1
      assert raw_norm > threshold
      assert float(optax.tree.norm(u)) == pytest.approx(threshold, rel=1e-5)
  assert clipped >= 1


# ---------------------------------------------------------------------------
# Transformations
# ---------------------------------------------------------------------------


def test_clip_by_historical_norm_window_under_inject_hyperparams():
  tx = optax.inject_hyperparams(og.clip_by_historical_norm, static_args=("window",))(
      2.0, window=8)
  state = jax.jit(tx.init)(jnp.zeros(3))
  assert state.inner_state.history.shape == (8,)
  direct = og.clip_by_historical_norm(2.0, window=8)
  d_state = direct.init(jnp.zeros(3))
  for x in _sequence(3, 20)[:, :3]:
    a, state = jax.jit(tx.update)(jnp.asarray(x), state)
    b, d_state = direct.update(jnp.asarray(x), d_state)
    chex.assert_trees_all_close(a, b, rtol=1e-6)


def test_clip_by_historical_norm_checkpoint_round_trip():
  tx = og.clip_by_historical_norm(2.0, window=8)
  step = jax.jit(tx.update)
  g = _sequence(4, 24)
  state = tx.init(jnp.zeros(5))
  for x in g[:12]:
    _, state = step(jnp.asarray(x), state)
  restored = serialization.from_bytes(tx.init(jnp.zeros(5)), serialization.to_bytes(state))
  chex.assert_trees_all_equal(restored, state)
  for x in g[12:]:
    a, state = step(jnp.asarray(x), state)
    b, restored = step(jnp.asarray(x), restored)
    chex.assert_trees_all_equal(a, b)


def test_clip_by_historical_norm_guard_stats():
  tx = og.clip_by_historical_norm()
  state = tx.init(jnp.zeros(2))
  _, state = tx.update(jnp.ones(2), state)
  assert set(og.guard_stats(state)) == {"clip_by_historical_norm/count",
                                        "clip_by_historical_norm/norm",
                                        "clip_by_historical_norm/threshold"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(window=1), r"window=...\) must be >= 2"),
    (dict(window=8, min_history=9), r"min_history=...\) must be <= window"),
    (dict(min_history=0), r"min_history=...\) must be >= 1"),
    (dict(sigma=0.0), r"sigma=...\) must be > 0"),
    (dict(sigma=float("nan")), r"sigma=...\)"),
])
def test_clip_by_historical_norm_bad_hyperparameters(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=r"clip_by_historical_norm\(" + match[:0]):
    og.clip_by_historical_norm(**kwargs)
  with pytest.raises((ValueError, TypeError), match=match):
    og.clip_by_historical_norm(**kwargs)
