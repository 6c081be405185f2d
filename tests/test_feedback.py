"""Tests of reduce_on_plateau (_plateau.py), scale_by_grad_norm and scale_by_parameter (_rates.py).

``reduce_on_plateau`` is compared step by step with a plain-Python
reimplementation of ``torch.optim.lr_scheduler.ReduceLROnPlateau.step`` (its
documented source: ``is_better``, ``_reduce_lr``, ``in_cooldown``), run in
float64 with an initial learning rate of 1, so ``lr`` there is our ``scale``.
Value sequences are dyadic (multiples of 1/8) and thresholds/factors dyadic
where a decision sits exactly on a boundary, so float32 and float64 agree
exactly; elsewhere the scale is compared to 1e-5 relative.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import make_tree, np_global_norm
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_guard as og


class TorchPlateau:
  """torch.optim.lr_scheduler.ReduceLROnPlateau.step, for one group, lr0 = 1.

  With ``sign_safe`` (the default, our documented deviation; see
  pytorch/pytorch#47513) the rel margin is ``threshold * |best|``: for ``best >= 0`` this is
  torch's own ``best * (1 -+ threshold)``, for negative ``best`` the margin no
  longer flips sign.
  """

  def __init__(self, *, mode="min", factor=0.1, patience=10, threshold=1e-4,
               threshold_mode="rel", cooldown=0, min_lr=0.0, eps=1e-8,
               nonfinite_is_bad=False, sign_safe=True):
    self.sign_safe = sign_safe
    self.mode, self.factor, self.patience = mode, factor, patience
    self.threshold, self.threshold_mode = threshold, threshold_mode
    self.cooldown, self.min_lr, self.eps = cooldown, min_lr, eps
    self.nonfinite_is_bad = nonfinite_is_bad  # our documented deviation for +-inf
    self.lr = 1.0
    self.best = math.inf if mode == "min" else -math.inf
    self.num_bad_epochs = 0
    self.cooldown_counter = 0

  def is_better(self, a, best):
    flip = self.sign_safe and best < 0
    if self.mode == "min" and self.threshold_mode == "rel":
      return a < best * ((1.0 + self.threshold) if flip else (1.0 - self.threshold))
    if self.mode == "min" and self.threshold_mode == "abs":
      return a < best - self.threshold
    if self.mode == "max" and self.threshold_mode == "rel":
      return a > best * ((1.0 - self.threshold) if flip else (self.threshold + 1.0))
    return a > best + self.threshold

  def step(self, metrics):
    current = float(metrics)
    better = self.is_better(current, self.best)
    if self.nonfinite_is_bad and not math.isfinite(current):
      better = False
    if better:
      self.best = current
      self.num_bad_epochs = 0
    else:
      self.num_bad_epochs += 1
    if self.cooldown_counter > 0:
      self.cooldown_counter -= 1
      self.num_bad_epochs = 0
    if self.num_bad_epochs > self.patience:
      new_lr = max(self.lr * self.factor, self.min_lr)
      if self.lr - new_lr > self.eps:
        self.lr = new_lr
      self.cooldown_counter = self.cooldown
      self.num_bad_epochs = 0
    return self.lr


def _reference(values, **kw):
  ref = TorchPlateau(**kw)
  rows = []
  for v in values:
    ref.step(v)
    rows.append((ref.lr, ref.best, ref.num_bad_epochs, ref.cooldown_counter))
  scale, best, bad, cd = map(np.asarray, zip(*rows, strict=True))
  return scale, best, bad, cd


@functools.partial(jax.jit, static_argnames=("mode", "threshold_mode"))
def _scan(values, factor, patience, threshold, cooldown, min_scale, eps, mode, threshold_mode):
  """All states of reduce_on_plateau over ``values``; numeric options traced."""
  tx = og.reduce_on_plateau(
      factor=factor, patience=patience, threshold=threshold, cooldown=cooldown,
      min_scale=min_scale, eps=eps, mode=mode, threshold_mode=threshold_mode,
  )

  def step(s, v):
    u, s = tx.update(jnp.ones((2,), jnp.float32), s, value=v)
    return s, (s, u)

  _, (states, updates) = jax.lax.scan(step, tx.init(None), values)
  return states, updates


def _run(values, **kw):
  """Runs our transform (Python hyperparameters, jitted update) step by step."""
  tx = og.reduce_on_plateau(**kw)
  s = tx.init(None)
  update = jax.jit(tx.update)
  rows = []
  for v in values:
    _, s = update(jnp.zeros(()), s, value=jnp.float32(v))
    rows.append(s)
  return jax.tree.map(lambda *xs: np.stack(xs), *rows)


def _check_against_reference(values, *, rtol=1e-5, **kw):
  torch_kw = dict(kw)
  if "min_scale" in torch_kw:
    torch_kw["min_lr"] = torch_kw.pop("min_scale")
  scale, best, bad, cd = _reference(values, **torch_kw)
  full = dict(factor=0.1, patience=10, threshold=1e-4, cooldown=0, min_scale=0.0, eps=1e-8,
              mode="min", threshold_mode="rel")
  full.update(kw)
  states, updates = _scan(
      jnp.asarray(values, jnp.float32), jnp.float32(full["factor"]),
      jnp.int32(full["patience"]), jnp.float32(full["threshold"]),
      jnp.int32(full["cooldown"]), jnp.float32(full["min_scale"]), jnp.float32(full["eps"]),
      mode=full["mode"], threshold_mode=full["threshold_mode"],
  )
  # atol: float32 on XLA CPU flushes subnormal scales (after ~126 halvings) to 0
  np.testing.assert_allclose(states.scale, scale, rtol=rtol, atol=np.finfo(np.float32).tiny)
  np.testing.assert_array_equal(states.best, best.astype(np.float32))
  np.testing.assert_array_equal(states.num_bad_steps, bad)
  np.testing.assert_array_equal(states.cooldown_counter, cd)
  np.testing.assert_array_equal(states.count, np.arange(1, len(values) + 1))
  np.testing.assert_allclose(updates, np.repeat(np.asarray(states.scale)[:, None], 2, 1))
  return scale


def _values(kind, rng, n):
  if kind == "grid":  # many ties and plateaus, both signs
    return rng.integers(-24, 25, n) / 8.0
  if kind == "negative":
    return -rng.integers(1, 40, n) / 8.0
  if kind == "walk":  # a noisy trend that flattens out
    steps = np.round(rng.normal(-0.2, 1.0, n) * 8) / 8
    return np.cumsum(steps) * np.exp(-np.arange(n) / (n / 4))
  if kind == "blocks":  # piecewise-constant plateaus of random length
    levels = rng.integers(-16, 17, n) / 4.0
    lengths = rng.integers(1, 15, n)
    return np.repeat(levels, lengths)[:n]
  return rng.normal(size=n).astype(np.float32) * 3.0  # continuous


N = 300


@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["grid", "negative", "walk", "blocks"]),
    mode=st.sampled_from(["min", "max"]),
    threshold_mode=st.sampled_from(["rel", "abs"]),
    threshold=st.sampled_from([0.0, 0.125, 0.25, 0.5, 1.0]),
    factor=st.sampled_from([0.5, 0.25, 0.0]),
    patience=st.integers(0, 5),
    cooldown=st.integers(0, 4),
    min_scale=st.sampled_from([0.0, 1.0 / 64, 0.375]),
    eps=st.sampled_from([1e-8, 0.0, 0.0625, 0.2]),
)
def test_reduce_on_plateau_matches_torch_rule_on_dyadic_sequences(
    seed, kind, mode, threshold_mode, threshold, factor, patience, cooldown, min_scale, eps
):
  values = _values(kind, np.random.default_rng(seed), N)
  _check_against_reference(
      values, rtol=0, mode=mode, threshold_mode=threshold_mode, threshold=threshold,
      factor=factor, patience=patience, cooldown=cooldown, min_scale=min_scale, eps=eps,
  )


@settings(max_examples=15)
@given(
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(["min", "max"]),
    threshold_mode=st.sampled_from(["rel", "abs"]),
    patience=st.integers(0, 12),
    cooldown=st.integers(0, 3),
)
def test_reduce_on_plateau_matches_torch_rule_with_torch_defaults(
    seed, mode, threshold_mode, patience, cooldown
):
  """threshold 1e-4, factor 0.1 (not dyadic): scale to 1e-5 relative."""
  values = _values("continuous", np.random.default_rng(seed), N)
  values = values.astype(np.float32).astype(np.float64)
  _check_against_reference(values, mode=mode, threshold_mode=threshold_mode,
                           patience=patience, cooldown=cooldown)


def test_reduce_on_plateau_python_and_traced_hyperparameters_agree():
  values = _values("blocks", np.random.default_rng(0), 60)
  kw = dict(factor=0.5, patience=2, threshold=0.25, cooldown=1, min_scale=0.125, eps=0.0,
            mode="max", threshold_mode="abs")
  direct = _run(values, **kw)
  scale = _check_against_reference(values, rtol=0, **kw)
  np.testing.assert_array_equal(direct.scale, scale)
  assert scale.min() < 1.0


def test_reduce_on_plateau_patience_counts_bad_steps():
  # first value improves on inf; then `patience + 1` bad steps trigger the cut
  for patience in range(4):
    s = _run([1.0] * 10, patience=patience, factor=0.5)
    first_cut = int(np.argmax(s.scale < 1.0))
    assert first_cut == patience + 1
    np.testing.assert_array_equal(s.num_bad_steps[: patience + 1], np.arange(patience + 1))


def test_reduce_on_plateau_exact_threshold_values():
  # rel/min: best 4, tau 0.25 -> the boundary is exactly 3.0, which is not better
  s = _run([4.0, 3.0, 3.0, 2.9999998], threshold=0.25, patience=5)
  np.testing.assert_array_equal(s.best, [4.0, 4.0, 4.0, np.float32(2.9999998)])
  np.testing.assert_array_equal(s.num_bad_steps, [0, 1, 2, 0])
  # abs/min: boundary 4 - 0.5 = 3.5
  s = _run([4.0, 3.5, 3.4999998], threshold=0.5, threshold_mode="abs", patience=5)
  np.testing.assert_array_equal(s.num_bad_steps, [0, 1, 0])
  # rel/max: boundary 4 * 1.25 = 5.0; abs/max: 4 + 0.5
  s = _run([4.0, 5.0, 5.0000005], threshold=0.25, mode="max", patience=5)
  np.testing.assert_array_equal(s.num_bad_steps, [0, 1, 0])
  s = _run([4.0, 4.5, 4.5000005], threshold=0.5, mode="max", threshold_mode="abs", patience=5)
  np.testing.assert_array_equal(s.num_bad_steps, [0, 1, 0])
  # threshold 0: a tie is not an improvement
  s = _run([2.0, 2.0, 2.0], threshold=0.0, patience=1, factor=0.5)
  np.testing.assert_array_equal(s.scale, [1.0, 1.0, 0.5])


def test_reduce_on_plateau_negative_values():
  # abs mode: a flat negative plateau is reduced, as for positive values
  s = _run([-3.0] * 6, threshold_mode="abs", patience=1, factor=0.5)
  np.testing.assert_array_equal(s.scale, [1, 1, 0.5, 0.5, 0.25, 0.25])
  # a worsening negative loss is reduced in rel mode too
  s = _run([-3.0, -2.5, -2.0, -1.5, -1.0], patience=1, factor=0.5)
  np.testing.assert_array_equal(s.scale, [1, 1, 0.5, 0.5, 0.25])
  np.testing.assert_array_equal(s.best, [-3.0] * 5)
  # rel mode: a flat negative plateau is reduced too (torch's own formula, and
  # optax.contrib's, would count it as improving forever and never reduce)
  values = [-3.0] * 6
  s = _run(values, patience=1, factor=0.5)
  np.testing.assert_array_equal(s.scale, _reference(values, patience=1, factor=0.5)[0])
  np.testing.assert_array_equal(s.scale, [1, 1, 0.5, 0.5, 0.25, 0.25])
  assert TorchPlateau(sign_safe=False).is_better(-3.0, -3.0)  # torch's flaw
  contrib = optax.contrib.reduce_on_plateau(patience=1, factor=0.5)
  cs = contrib.init(jnp.zeros(()))
  for v in values:
    _, cs = contrib.update(jnp.zeros(()), cs, value=jnp.float32(v))
  assert float(cs.scale) == 1.0  # optax.contrib never reduces on a negative plateau
  # mixed signs crossing zero, all modes
  values = [2.0, 1.0, 0.0, -1.0, -1.0, -0.5, 0.0, 0.0, -2.0, -2.0, -2.0]
  for mode in ("min", "max"):
    for tm in ("rel", "abs"):
      _check_against_reference(values, rtol=0, mode=mode, threshold_mode=tm, threshold=0.25,
                               patience=1, factor=0.5)


def test_reduce_on_plateau_max_mode():
  s = _run([0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.7], mode="max", patience=1, factor=0.5)
  np.testing.assert_array_equal(s.scale, [1, 1, 1, 0.5, 0.5, 0.5, 0.25])
  np.testing.assert_array_equal(s.best, np.float32([0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7]))
  assert og.reduce_on_plateau(mode="max").init(None).best == -jnp.inf


def test_reduce_on_plateau_cooldown_ignores_bad_steps():
  values = [1.0] * 12
  s = _run(values, patience=0, cooldown=2, factor=0.5)
  # cut at step 1, then 2 cooldown steps with bad count held at 0, then cut again
  np.testing.assert_array_equal(s.scale, [1, .5, .5, .5, .25, .25, .25, .125, .125, .125,
                                          .0625, .0625])
  np.testing.assert_array_equal(s.cooldown_counter, [0, 2, 1, 0, 2, 1, 0, 2, 1, 0, 2, 1])
  np.testing.assert_array_equal(s.num_bad_steps, np.zeros(12))
  _check_against_reference(values, rtol=0, patience=0, cooldown=2, factor=0.5)


def test_reduce_on_plateau_min_scale_and_eps():
  values = [1.0] * 12
  s = _run(values, patience=0, factor=0.5, min_scale=0.1875)
  np.testing.assert_array_equal(s.scale, [1, .5, .25, .1875] + [.1875] * 8)
  # eps: the cut 0.125 -> 0.0625 changes the scale by 0.0625 <= eps: not applied
  s = _run(values, patience=0, factor=0.5, eps=0.0625)
  np.testing.assert_array_equal(s.scale, [1, .5, .25, .125] + [.125] * 8)
  _check_against_reference(values, rtol=0, patience=0, factor=0.5, eps=0.0625)
  # an unapplied cut still restarts the cooldown and the bad-step count
  s = _run(values, patience=0, factor=0.5, min_scale=0.5, cooldown=1)
  np.testing.assert_array_equal(s.cooldown_counter, [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
  _check_against_reference(values, rtol=0, patience=0, factor=0.5, min_scale=0.5, cooldown=1)


def test_reduce_on_plateau_nonfinite_value_is_a_bad_step_and_never_best():
  for mode in ("min", "max"):
    values = [2.0, float("nan"), float("-inf"), float("inf"), 1.5, float("nan"), 3.0, 1.0]
    s = _run(values, mode=mode, patience=1, factor=0.5)
    assert np.all(np.isfinite(s.best))
    scale, best, bad, cd = _reference(values, mode=mode, patience=1, factor=0.5,
                                      nonfinite_is_bad=True)
    np.testing.assert_array_equal(s.scale, scale)
    np.testing.assert_array_equal(s.best, best)
    np.testing.assert_array_equal(s.num_bad_steps, bad)
  # NaN alone is also what torch does (nan < x is False)
  values = [2.0, float("nan"), float("nan"), 1.0]
  np.testing.assert_array_equal(_run(values, patience=1, factor=0.5).scale,
                                _reference(values, patience=1, factor=0.5)[0])
  # torch would store -inf as best in min mode; we do not
  s = _run([2.0, float("-inf"), 1.0], patience=5)
  np.testing.assert_array_equal(s.best, [2.0, 2.0, 1.0])


def test_reduce_on_plateau_inside_chain_receives_value():
  opt = optax.chain(optax.sgd(0.1), og.reduce_on_plateau(patience=0, factor=0.5))
  params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
  s = opt.init(params)
  g = jax.tree.map(jnp.ones_like, params)
  scales = []
  for loss in [1.0, 1.0, 0.5, 0.6]:
    u, s = jax.jit(opt.update)(g, s, params, value=loss)
    scales.append(float(s[1].scale))
    chex.assert_trees_all_close(u, jax.tree.map(lambda x: -0.1 * scales[-1] * x, g))
  assert scales == [1.0, 0.5, 0.5, 0.25]


def test_reduce_on_plateau_under_inject_hyperparams_with_string_options():
  kw = dict(mode="max", threshold_mode="abs", threshold=0.25, patience=1, factor=0.5)
  tx = optax.inject_hyperparams(og.reduce_on_plateau)(**kw)
  s = tx.init(jnp.zeros(2))
  assert "mode" not in s.hyperparams and "threshold_mode" not in s.hyperparams
  assert set(s.hyperparams) == {"factor", "patience", "threshold", "cooldown", "min_scale",
                                "eps"}
  values = [0.0, 0.1, 0.2, 0.3, 1.0, 1.1, 1.2]
  update = jax.jit(tx.update)
  scales = []
  for v in values:
    _, s = update(jnp.ones(2), s, jnp.zeros(2), value=v)
    scales.append(float(s.inner_state.scale))
  np.testing.assert_array_equal(scales, _reference(values, **kw)[0])
  # numeric hyperparameters can be changed in the state
  s.hyperparams["factor"] = jnp.float32(0.25)
  for v in [1.0, 1.0]:
    _, s = update(jnp.ones(2), s, jnp.zeros(2), value=v)
  assert float(s.inner_state.scale) == scales[-1] * 0.25


def test_reduce_on_plateau_matches_optax_contrib_with_patience_shifted():
  """optax.contrib reduces when the bad count *equals* patience (torch: exceeds it)."""
  values = jnp.asarray(_values("blocks", np.random.default_rng(3), 200) + 10.0, jnp.float32)

  def run(tx):
    def step(s, v):
      u, s = tx.update(jnp.ones(2), s, value=v)
      return s, (u, s)

    return jax.jit(lambda vs: jax.lax.scan(step, tx.init(jnp.zeros(2)), vs)[1])(values)

  for patience, cooldown in [(0, 0), (2, 0), (3, 2)]:
    u1, s1 = run(og.reduce_on_plateau(patience=patience, cooldown=cooldown, factor=0.5, eps=0.0))
    u2, s2 = run(optax.contrib.reduce_on_plateau(patience=patience + 1, cooldown=cooldown,
                                                 factor=0.5))
    np.testing.assert_array_equal(u1, u2)
    np.testing.assert_array_equal(s1.best, s2.best_value)
    assert s1.scale[-1] < 1.0


def test_reduce_on_plateau_needs_a_scalar_value():
  tx = og.reduce_on_plateau()
  with pytest.raises(ValueError, match="value="):
    tx.update(jnp.ones(2), tx.init(None))
  chained = optax.chain(optax.identity(), tx)
  with pytest.raises(ValueError, match="value="):
    chained.update(jnp.ones(2), chained.init(None))
  with pytest.raises(ValueError, match="scalar"):
    tx.update(jnp.ones(2), tx.init(None), value=jnp.ones(2))


def test_reduce_on_plateau_state_dtypes_and_update_dtype():
  tx = og.reduce_on_plateau(patience=0)
  g = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones((), jnp.float16)}
  s = tx.init(g)
  for v in [1.0, 1.0]:
    u, s = tx.update(g, s, value=jnp.bfloat16(v))
  chex.assert_trees_all_equal_shapes_and_dtypes(u, g)
  assert s.scale.dtype == s.best.dtype == jnp.float32
  assert s.num_bad_steps.dtype == s.cooldown_counter.dtype == s.count.dtype == jnp.int32
  np.testing.assert_allclose(np.float32(u["a"]), 0.1, rtol=1e-2)


def test_reduce_on_plateau_counters_saturate():
  tx = og.reduce_on_plateau(patience=2**31 - 1)
  big = jnp.int32(2**31 - 1)
  s = tx.init(None)._replace(num_bad_steps=big, count=big, best=jnp.float32(0.0))
  _, s = tx.update(jnp.ones(()), s, value=1.0)
  assert s.num_bad_steps == big and s.count == big and s.scale == 1.0


# ---------------------------------------------------------------------------
# scale_by_grad_norm
# ---------------------------------------------------------------------------


_NORM_FNS = [
    (og.scale_by_grad_norm(lambda n: 1.0 / (1.0 + n)), lambda n: 1.0 / (1.0 + n)),
    (og.scale_by_grad_norm(lambda n: jnp.minimum(1.0, 0.5 / n)), lambda n: min(1.0, 0.5 / n)),
]
_NORM_UPDATES = [jax.jit(tx.update) for tx, _ in _NORM_FNS]


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
def test_scale_by_grad_norm_equals_closed_form(seed, scale, dtype):
  g = make_tree(seed, dtype, scale)
  for update, (_, pyfn) in zip(_NORM_UPDATES, _NORM_FNS, strict=True):
    out, _ = update(g, optax.EmptyState())
    factor = pyfn(np_global_norm(g))
    rtol = 1e-5 if dtype == jnp.float32 else 1e-2
    for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(g), strict=True):
      assert o.dtype == x.dtype and o.shape == x.shape
      np.testing.assert_allclose(np.asarray(o, np.float64),
                                 np.asarray(x, np.float64) * factor, rtol=rtol, atol=1e-30)


def test_scale_by_grad_norm_float16_norm_does_not_overflow():
  g = {"big": jnp.full((300, 300), 100.0, jnp.float16)}  # sum of squares 9e8 >> 65504
  tx = og.scale_by_grad_norm(lambda n: 1.0 / n)
  out, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(np.float32(out["big"]), 1.0 / 300, rtol=1e-3)


def test_scale_by_grad_norm_empty_tree_and_nonfinite():
  tx = og.scale_by_grad_norm(lambda n: 2.0 + n)
  assert tx.update({}, tx.init({}))[0] == {}
  out, _ = tx.update(jnp.array([0.0, 0.0]), tx.init(None))
  np.testing.assert_array_equal(out, [0.0, 0.0])
  out, _ = tx.update(jnp.array([1.0, jnp.nan]), tx.init(None))
  assert np.all(np.isnan(out))


def test_scale_by_grad_norm_errors():
  with pytest.raises(TypeError, match="static_args"):
    og.scale_by_grad_norm(1.0)
  tx = og.scale_by_grad_norm(lambda n: jnp.ones(2) * n)
  with pytest.raises(ValueError, match="scalar"):
    tx.update(jnp.ones(2), tx.init(None))


def test_scale_by_grad_norm_under_inject_hyperparams_with_static_fn():
  fn = lambda n: 1.0 / (1.0 + n)
  tx = optax.inject_hyperparams(og.scale_by_grad_norm, static_args=("fn",))(fn=fn)
  g = make_tree(1)
  out, _ = tx.update(g, tx.init(g), g)
  ref, _ = og.scale_by_grad_norm(fn).update(g, optax.EmptyState())
  chex.assert_trees_all_close(out, ref)


# ---------------------------------------------------------------------------
# scale_by_parameter
# ---------------------------------------------------------------------------


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), eta=st.sampled_from([1e-3, 0.02, 1.0]),
       wd=st.sampled_from([0.0, 1e-4, 0.5]))
def test_scale_by_parameter_reproduces_lars_trust_ratio(seed, eta, wd):
  params, grads = make_tree(seed), make_tree(seed + 1, scale=0.1)

  def trust_ratio(p, u):
    pn, un = jnp.linalg.norm(p), jnp.linalg.norm(u)
    return eta * pn / (un + wd * pn)

  tx = og.scale_by_parameter(trust_ratio)
  out, _ = tx.update(grads, tx.init(params), params)
  for o, u, p in zip(jax.tree.leaves(out), jax.tree.leaves(grads),
                     jax.tree.leaves(params), strict=True):
    p64, u64 = np.asarray(p, np.float64), np.asarray(u, np.float64)
    ratio = eta * np.linalg.norm(p64) / (np.linalg.norm(u64) + wd * np.linalg.norm(p64))
    np.testing.assert_allclose(np.asarray(o, np.float64), u64 * ratio, rtol=2e-5)


def test_scale_by_parameter_per_unit_factor_and_dtype():
  p = jnp.asarray(np.arange(1.0, 7.0).reshape(2, 3), jnp.float32)
  u = jnp.ones((2, 3), jnp.bfloat16)
  tx = og.scale_by_parameter(lambda p, u: 1.0 / jnp.max(jnp.abs(p), axis=0, keepdims=True))
  out, _ = tx.update(u, tx.init(p), p)
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 3)
  np.testing.assert_allclose(np.float32(out), np.broadcast_to(1.0 / np.array([4, 5, 6]),
                                                              (2, 3)), rtol=1e-2)


def test_scale_by_parameter_factor_must_broadcast_to_the_leaf():
  tx = og.scale_by_parameter(lambda p, u: jnp.ones((4,)))
  p = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="broadcast"):
    tx.update(p, tx.init(p), p)


def test_scale_by_parameter_matches_optax_scale_by_trust_ratio():
  params, grads = make_tree(21), make_tree(22, scale=0.1)
  params["zero"], grads["zero"] = jnp.zeros(3), jnp.ones(3)

  def ratio(p, u):
    pn, un = jnp.linalg.norm(p), jnp.linalg.norm(u)
    return jnp.where((pn == 0) | (un == 0), 1.0, pn / un)

  ours, _ = og.scale_by_parameter(ratio).update(grads, optax.EmptyState(), params)
  ref_tx = optax.scale_by_trust_ratio()
  theirs, _ = ref_tx.update(grads, ref_tx.init(params), params)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6)


def test_reduce_on_plateau_python_nan_value_is_a_bad_step():
  tx = og.reduce_on_plateau(patience=0, factor=0.5)
  s = tx.init(None)
  g = jnp.ones(2)
  _, s = tx.update(g, s, value=1.0)
  _, s = tx.update(g, s, value=float("nan"))  # never better: a bad step, reduces
  assert float(s.scale) == 0.5
  with pytest.raises(ValueError, match=r"reduce_on_plateau\(value=\.\.\.\) must be a scalar"):
    tx.update(g, s, value=jnp.ones(3))
