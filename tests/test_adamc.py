"""Tests of adamc: optax.adamw with the decay scaled by lr_t / lr_max."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import assert_bitwise_equal, make_grads, make_params

import optax_guard as og

KERNEL_ONLY = {"dense": {"kernel": True, "bias": False}, "scale": True}


def _run(tx, steps=6, params=None):
  params = make_params() if params is None else params
  state, outs = tx.init(params), []
  update = jax.jit(tx.update)
  for i in range(steps):
    u, state = update(make_grads(i), state, params)
    params = optax.apply_updates(params, u)
    outs.append((u, params))
  return outs, state


@pytest.mark.parametrize("kwargs", [
    dict(), dict(mask=KERNEL_ONLY),
    dict(weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 0, p)),
    dict(b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-9, mu_dtype=jnp.bfloat16, nesterov=True,
         weight_decay=0.3),
], ids=["defaults", "mask", "callable-mask", "every-argument"])
def test_adamc_with_a_constant_rate_is_adamw_bitwise(kwargs):
  kwargs = {"weight_decay": 0.05, **kwargs}
  got, state = _run(og.adamc(1e-2, **kwargs))
  want, ref_state = _run(optax.adamw(1e-2, **kwargs))
  assert_bitwise_equal(got, want)
  assert_bitwise_equal(state, ref_state)


def test_adamc_peak_equal_to_the_constant_rate_is_adamw():
  got, _ = _run(og.adamc(1e-2, weight_decay=0.5, mask=KERNEL_ONLY, peak_learning_rate=1e-2))
  want, _ = _run(optax.adamw(1e-2, weight_decay=0.5, mask=KERNEL_ONLY))
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=0)


def _warmup_cosine(t, init, peak, warmup, decay, end):
  """``optax.warmup_cosine_decay_schedule`` in float64."""
  if t < warmup:
    return init + (peak - init) * t / warmup
  c = 0.5 * (1 + math.cos(math.pi * min(t - warmup, decay - warmup) / (decay - warmup)))
  return end + (peak - end) * c


def _np_adamc(grads, params, mask, *, lr, peak, wd, b1=0.9, b2=0.999, eps=1e-8):
  """AdamC in float64: Adam's step plus the decay ``lr_t * (lr_t / peak) * wd * p``."""
  f64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)  # noqa: E731
  p, mu, nu = f64(params), None, None
  out = []
  for t, g in enumerate(grads):
    g = f64(g)
    mu = jax.tree.map(lambda g: (1 - b1) * g, g) if mu is None else \
        jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, g)
    nu = jax.tree.map(lambda g: (1 - b2) * g * g, g) if nu is None else \
        jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, nu, g)
    rate = lr(t)

    def step(p, m, v, decays, rate=rate, t=t):
      direction = (m / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)
      return p - rate * direction - (rate * (rate / peak) * wd * p if decays else 0.0)

    p = jax.tree.map(step, p, mu, nu, mask)
    out.append(p)
  return out


def test_adamc_with_a_warmup_cosine_schedule_matches_a_float64_reference():
  kw = dict(init=1e-4, peak=1e-2, warmup=3, decay=12, end=1e-4)
  schedule = optax.warmup_cosine_decay_schedule(kw["init"], kw["peak"], kw["warmup"],
                                                kw["decay"], kw["end"])
  tx = og.adamc(schedule, weight_decay=0.5, mask=KERNEL_ONLY, peak_learning_rate=kw["peak"])
  grads = [make_grads(i) for i in range(14)]
  params, state, got = make_params(), tx.init(make_params()), []
  for g in grads:
    u, state = jax.jit(tx.update)(g, state, params)
    params = optax.apply_updates(params, u)
    got.append(params)
  want = _np_adamc(grads, make_params(), KERNEL_ONLY,
                   lr=lambda t: _warmup_cosine(t, **kw), peak=kw["peak"], wd=0.5)
  for a, b in zip(got, want, strict=True):
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
  # and it is not AdamW: AdamW decays by lr_t * wd, more once the rate is under its peak
  adamw, _ = _run(optax.adamw(schedule, weight_decay=0.5, mask=KERNEL_ONLY), steps=14)
  gap = np.abs(np.asarray(adamw[-1][1]["dense"]["kernel"] - got[-1]["dense"]["kernel"]))
  assert gap.max() > 1e-4
  chex.assert_trees_all_close(adamw[-1][1]["dense"]["bias"], got[-1]["dense"]["bias"], rtol=1e-6)


def test_adamc_decay_alone_is_lr_times_lr_over_peak():
  """With zero gradients Adam's direction is 0: the update is the decay term alone."""
  schedule = optax.linear_schedule(1e-2, 0.0, transition_steps=10)
  tx = og.adamc(schedule, weight_decay=0.5, peak_learning_rate=2e-2)
  p = jnp.full(3, 2.0)
  state = tx.init(p)
  for t in range(8):
    u, state = tx.update(jnp.zeros(3), state, p)
    lr = 1e-2 * (1 - t / 10)
    np.testing.assert_allclose(u, -lr * (lr / 2e-2) * 0.5 * 2.0, rtol=1e-5)


def test_adamc_under_inject_hyperparams_with_a_scheduled_rate():
  """inject_hyperparams hands adamc each step's rate as a number: the peak scales it."""
  schedule = optax.cosine_decay_schedule(1e-2, decay_steps=6)
  direct, _ = _run(og.adamc(schedule, weight_decay=0.5, peak_learning_rate=1e-2))
  injected, state = _run(optax.inject_hyperparams(og.adamc)(
      learning_rate=schedule, weight_decay=0.5, peak_learning_rate=1e-2))
  chex.assert_trees_all_close(direct, injected, rtol=1e-5, atol=1e-7)
  assert float(og.guard_stats(state)["hyperparams/learning_rate"]) < 1e-2


def test_adamc_normalized_layer_mask_from_the_docstring():
  params = {"blocks": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
            "norm": {"scale": jnp.ones(3)}, "head": {"kernel": jnp.ones((3, 2))}}

  def normalized(params):
    return jax.tree.map_with_path(
        lambda path, p: p.ndim >= 2 and "head" not in jax.tree_util.keystr(path), params)

  tx = og.adamc(optax.constant_schedule(1e-2), weight_decay=1.0, mask=normalized,
                peak_learning_rate=1e-2)
  zeros = jax.tree.map(jnp.zeros_like, params)
  u, _ = tx.update(zeros, tx.init(params), params)
  decayed = jax.tree.map(lambda x: bool(jnp.any(x != 0)), u)
  assert decayed == {"blocks": {"kernel": True, "bias": False}, "norm": {"scale": False},
                     "head": {"kernel": False}}


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(learning_rate=optax.constant_schedule(0.1)), ValueError,
     r"adamc\(peak_learning_rate=\.\.\.\) is required when learning_rate is a schedule"),
    (dict(learning_rate=0.1, peak_learning_rate=0.0), ValueError,
     r"adamc\(peak_learning_rate=\.\.\.\) must be > 0"),
    (dict(learning_rate=0.1, peak_learning_rate=float("inf")), ValueError,
     r"adamc\(peak_learning_rate=\.\.\.\) must be finite"),
    (dict(learning_rate=-0.1), ValueError, r"adamc\(learning_rate=\.\.\.\) must be >= 0"),
    (dict(learning_rate=0.1, nesterov=1), TypeError, r"adamc\(nesterov=\.\.\.\) must be a bool"),
    (dict(learning_rate=0.1, mask="kernel"), TypeError, r"adamc\(mask=\.\.\.\)"),
])
def test_adamc_rejects_invalid_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    og.adamc(**kwargs)


def test_adamc_params_must_match_the_updates():
  tx = og.adamc(0.1)
  params = make_params()
  with pytest.raises(ValueError, match=r"adamc.*params"):
    tx.update(make_grads(0), tx.init(params), None)
  with pytest.raises(ValueError, match=r"adamc.*params"):
    tx.update(make_grads(0), tx.init(params), {"dense": params["dense"]})
