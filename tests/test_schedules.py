"""Tests of optax_guard._schedules: closed forms, torch/Keras sequences, optax use.

Every reference here is computed independently in float64 (NumPy or plain
Python) from the published formula, with the hyperparameters first rounded to
float32 (the schedules' contract is float32 hyperparameters and outputs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_guard as og

TOP = 2**31 - 1


def f32(x):
  return float(np.float32(x))


# ---------------------------------------------------------------------------
# Independent float64 closed forms
# ---------------------------------------------------------------------------


def ref_polynomial(t, init, T, power=1.0, end=0.0, cycle=False):
  t = max(int(t), 0)
  init, power, end = f32(init), f32(power), f32(end)
  if cycle:
    mult = 1 if t == 0 else -(-t // T)  # exact ceil(t / T) on Python ints
    p = t / (T * mult)
  else:
    p = min(t, T) / T
  return (init - end) * (1.0 - p) ** power + end


def ref_inverse_sqrt(t, init, timescale=1.0):
  return f32(init) / math.sqrt(1.0 + max(int(t), 0) / f32(timescale))


def ref_inverse_time(t, init, T, rate=1.0, power=1.0, staircase=False):
  t = max(int(t), 0)
  p = t // T if staircase else t / T
  return f32(init) / (1.0 + f32(rate) * p) ** f32(power)


def ref_exponential(t, init, rate, T=1, staircase=False, end=None):
  t = max(int(t), 0)
  p = t // T if staircase else t / T
  with np.errstate(over="ignore"):  # a growing rate overflows to inf before the cap
    v = float(np.float64(f32(init)) * np.float64(f32(rate)) ** np.float64(p))
  if end is not None:
    v = max(v, f32(end)) if f32(rate) < 1 else min(v, f32(end)) if f32(rate) > 1 else v
  return v


def ref_step(t, init, step_size, factor=0.1):
  return f32(init) * f32(factor) ** (max(int(t), 0) // step_size)


def ref_multistep(t, init, milestones, factor=0.1):
  t = max(int(t), 0)
  return f32(init) * f32(factor) ** sum(1 for m in milestones if t >= m)


def ref_warmup(t, inner, W, init=0.0):
  t = max(int(t), 0)
  if t < W:
    return f32(init) + (inner(0) - f32(init)) * t / W
  return inner(t - W)


# (name, schedule, reference(t), boundaries)
CASES = [
    ("poly_linear", og.polynomial_decay(1.0, 10),
     lambda t: ref_polynomial(t, 1.0, 10), [10]),
    ("poly_sqrt_T41", og.polynomial_decay(0.5, 41, power=0.5, end_value=0.05),
     lambda t: ref_polynomial(t, 0.5, 41, 0.5, 0.05), [41]),
    ("poly_cycle", og.polynomial_decay(2.0, 7, power=3.0, end_value=0.1, cycle=True),
     lambda t: ref_polynomial(t, 2.0, 7, 3.0, 0.1, True), [7, 14, 21]),
    ("poly_cycle_sqrt_T3", og.polynomial_decay(1.0, 3, power=0.5, cycle=True),
     lambda t: ref_polynomial(t, 1.0, 3, 0.5, 0.0, True), [3, 6, 3 * 715827882]),
    ("linear", og.linear_decay(1.0, 100, end_value=0.01),
     lambda t: ref_polynomial(t, 1.0, 100, 1.0, 0.01), [100]),
    ("linear_up", og.linear_decay(0.1, 41, end_value=0.3),
     lambda t: ref_polynomial(t, 0.1, 41, 1.0, 0.3), [41]),
    ("inv_sqrt", og.inverse_sqrt_decay(1.0),
     lambda t: ref_inverse_sqrt(t, 1.0), [3]),
    ("inv_sqrt_ts", og.inverse_sqrt_decay(0.3, timescale=1000.0),
     lambda t: ref_inverse_sqrt(t, 0.3, 1000.0), [1000]),
    ("inv_time", og.inverse_time_decay(1.0, 10, decay_rate=0.5),
     lambda t: ref_inverse_time(t, 1.0, 10, 0.5), [10, 20]),
    ("inv_time_stair", og.inverse_time_decay(0.3, 3, decay_rate=2.0, power=0.5, staircase=True),
     lambda t: ref_inverse_time(t, 0.3, 3, 2.0, 0.5, True), [3, 6, 3 * 715827882]),
    ("inv_time_stair_big", og.inverse_time_decay(1.0, 10**7, staircase=True),
     lambda t: ref_inverse_time(t, 1.0, 10**7, 1.0, 1.0, True), [10**7, 2 * 10**7]),
    ("exp", og.exponential_decay(1.0, 1, 0.9),
     lambda t: ref_exponential(t, 1.0, 0.9), [5]),
    ("exp_stair", og.exponential_decay(0.3, 7, 0.5, staircase=True),
     lambda t: ref_exponential(t, 0.3, 0.5, 7, True), [7, 14]),
    # float32(2e7 - 1) == 2e7: a float floor(t / T) would be one period early here
    ("exp_stair_big", og.exponential_decay(0.3, 10**7, 0.5, staircase=True),
     lambda t: ref_exponential(t, 0.3, 0.5, 10**7, True), [10**7, 2 * 10**7]),
    ("exp_floor", og.exponential_decay(0.3, 100, 0.96, end_value=0.01),
     lambda t: ref_exponential(t, 0.3, 0.96, 100, False, 0.01), [100, 8331, 8332]),
    ("exp_cap", og.exponential_decay(0.01, 10, 1.5, end_value=1.0),
     lambda t: ref_exponential(t, 0.01, 1.5, 10, False, 1.0), [10, 113, 114]),
    ("step", og.step_decay(1.0, 30),
     lambda t: ref_step(t, 1.0, 30), [30, 60]),
    ("step_huge", og.step_decay(0.3, 2**30, factor=0.5),
     lambda t: ref_step(t, 0.3, 2**30, 0.5), [2**30]),
    ("multistep", og.multistep_decay(1.0, [30, 80]),
     lambda t: ref_multistep(t, 1.0, [30, 80]), [30, 80]),
    ("multistep_edges", og.multistep_decay(0.3, [0, 5, 5, TOP], factor=0.5),
     lambda t: ref_multistep(t, 0.3, [0, 5, 5, TOP], 0.5), [5, TOP]),
    ("warmup_linear", og.warmup(og.linear_decay(1.0, 100, end_value=0.1), 10),
     lambda t: ref_warmup(t, lambda s: ref_polynomial(s, 1.0, 100, 1.0, 0.1), 10), [10, 110]),
    ("warmup_exp", og.warmup(og.exponential_decay(0.3, 1, 0.9), 7, init_value=0.03),
     lambda t: ref_warmup(t, lambda s: ref_exponential(s, 0.3, 0.9), 7, 0.03), [7]),
]


def _steps_for(boundaries):
  steps = {0, 1, 2, 10**6, TOP - 1, TOP}
  for b in boundaries:
    steps |= {b - 1, b, b + 1}
  return sorted(s for s in steps if 0 <= s <= TOP)


@pytest.mark.parametrize("name,sched,ref,boundaries", CASES, ids=[c[0] for c in CASES])
def test_schedules_match_float64_closed_form(name, sched, ref, boundaries):
  steps = _steps_for(boundaries)
  expected = np.array([ref(t) for t in steps])
  # scalar calls, eager and jitted, must agree bitwise
  eager = np.array([sched(t) for t in steps])
  jitted = jax.jit(sched)
  np.testing.assert_array_equal(np.array([jitted(jnp.int32(t)) for t in steps]), eager)
  assert eager.dtype == np.float32 and np.all(np.isfinite(eager)), (name, eager)
  rtol = 2e-5 if name.startswith("exp") else 2e-6  # exponent p = t/T rounds in float32
  np.testing.assert_allclose(eager, expected, rtol=rtol, atol=1e-37, err_msg=name)
  # vmapped over the step vector: same up to an ulp of vectorised arithmetic
  vm = jax.vmap(sched)(jnp.asarray(steps, jnp.int32))
  np.testing.assert_allclose(vm, eager, rtol=1e-6, atol=1e-37)


def test_polynomial_decay_exact_at_ends():
  # 41 * float32(1/41) != 1: a reciprocal rewrite under jit would move step 0.
  for T in (41, 47, 97, 3):
    sched = og.polynomial_decay(0.1, T, power=0.5, end_value=0.001)
    for f in (sched, jax.jit(sched)):
      assert f(0) == np.float32(0.1)
      assert f(T) == np.float32(0.001) and f(T + 5) == np.float32(0.001)
      assert f(T - 1) > np.float32(0.001)
  # float32(0.02) + (float32(0.1) - float32(0.02)) != float32(0.1): step 0 must still be init
  for init, end in ((0.1, 0.02), (1e-4, 1.0), (0.05, 0.2)):
    lin = og.linear_decay(init, 41, end_value=end)
    assert lin(0) == np.float32(init) and jax.jit(lin)(0) == np.float32(init)
    assert lin(41) == np.float32(end)
  cyc = og.polynomial_decay(1.0, 7, power=0.5, end_value=0.25, cycle=True)
  for k in (1, 2, 3, 306783378):  # 7 * 306783378 = 2147483646
    assert cyc(7 * k) == np.float32(0.25)
    assert cyc(7 * k + 1) > cyc(7 * k)
  assert np.isfinite(cyc(TOP)) and cyc(TOP) >= np.float32(0.25)


def test_linear_decay_never_negative_or_nan():
  steps = jnp.arange(0, 420)  # one shape: one compilation for every T
  for T in range(1, 200, 7):
    vals = np.asarray(og.linear_decay(1.0, T)(steps))
    assert np.all(vals >= 0) and np.all(vals[T:] == 0) and np.all(vals[:T] > 0), T


# ---------------------------------------------------------------------------
# Monotonicity (hypothesis)
# ---------------------------------------------------------------------------

_positive = st.floats(1e-4, 10.0).map(f32)
_rate = st.floats(0.01, 1.0).map(f32)
_steps = st.integers(1, 10**5)


@st.composite
def _step_vector(draw):
  """64 sorted steps: random ones, small ones and the int32 top."""
  xs = draw(st.lists(st.integers(0, TOP), min_size=40, max_size=40))
  small = draw(st.lists(st.integers(0, 300), min_size=21, max_size=21))
  return np.sort(np.asarray(xs + small + [0, TOP - 1, TOP], np.int64))


@st.composite
def _decaying(draw):
  kind = draw(st.sampled_from(
      ["poly", "linear", "isqrt", "itime", "exp", "step", "multistep", "warmup"]))
  init = draw(_positive)
  if kind == "poly":
    end = draw(st.floats(0.0, 1.0)) * init
    return og.polynomial_decay(init, draw(_steps), power=draw(st.floats(0.0, 4.0)),
                               end_value=end)
  if kind == "linear":
    return og.linear_decay(init, draw(_steps), end_value=draw(st.floats(0.0, 1.0)) * init)
  if kind == "isqrt":
    return og.inverse_sqrt_decay(init, timescale=draw(st.floats(0.01, 1e4)))
  if kind == "itime":
    return og.inverse_time_decay(init, draw(_steps), decay_rate=draw(st.floats(0.0, 10.0)),
                                 power=draw(st.floats(0.0, 3.0)), staircase=draw(st.booleans()))
  if kind == "exp":
    end = draw(st.one_of(st.none(), st.floats(0.0, 1.0).map(lambda x: x * init)))
    return og.exponential_decay(init, draw(_steps), draw(_rate),
                                staircase=draw(st.booleans()), end_value=end)
  if kind == "step":
    return og.step_decay(init, draw(_steps), factor=draw(_rate))
  if kind == "multistep":
    ms = sorted(draw(st.lists(st.integers(0, TOP), max_size=6)))
    return og.multistep_decay(init, ms, factor=draw(_rate))
  inner = og.step_decay(init, draw(_steps), factor=draw(_rate))
  return og.warmup(inner, 0, init_value=0.0)  # W = 0: the inner schedule itself


@settings(max_examples=25)
@given(sched=_decaying(), steps=_step_vector())
def test_schedules_monotone_non_increasing(sched, steps):
  vals = np.asarray(sched(steps))
  assert np.all(np.isfinite(vals)) and np.all(vals >= 0)
  assert np.all(np.diff(vals) <= 0), vals


@settings(max_examples=10)
@given(init=st.floats(0.0, 1.0), peak=_positive, W=st.integers(1, 5000), steps=_step_vector())
def test_warmup_monotone_up_then_down(init, peak, W, steps):
  init = f32(init * peak)
  sched = og.warmup(og.inverse_sqrt_decay(peak, timescale=100.0), W, init_value=init)
  vals = np.asarray(sched(steps))
  up, down = vals[steps <= W], vals[steps >= W]
  assert np.all(np.diff(up) >= 0) and np.all(np.diff(down) <= 0), vals
  assert np.all(up >= np.float32(init)) and np.all(vals <= np.float32(peak))


# ---------------------------------------------------------------------------
# PyTorch sequences (written from torch's recursive get_lr rules, no torch)
# ---------------------------------------------------------------------------


def torch_sequence(base_lr, get_lr, epochs=100):
  """lr after construction (epoch 0) and after each scheduler.step()."""
  lrs, lr = [], base_lr
  for epoch in range(epochs):
    lr = get_lr(epoch, lr)
    lrs.append(lr)
  return np.array(lrs)


def test_step_decay_matches_torch_step_lr():
  # StepLR.get_lr: lr unchanged if epoch == 0 or epoch % step_size != 0, else lr * gamma
  def get_lr(e, lr):
    return lr if e == 0 or e % 7 != 0 else lr * 0.3

  expected = torch_sequence(0.5, get_lr)
  ours = jax.vmap(og.step_decay(0.5, 7, factor=0.3))(jnp.arange(100))
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-30)


def test_multistep_decay_matches_torch_multistep_lr():
  # MultiStepLR.get_lr: milestones = Counter(...); lr * gamma ** count at a milestone
  milestones = [10, 30, 30, 75]

  def get_lr(e, lr):
    c = milestones.count(e)
    return lr * 0.5**c if c else lr

  expected = torch_sequence(0.2, get_lr)
  ours = jax.vmap(og.multistep_decay(0.2, milestones, factor=0.5))(jnp.arange(100))
  np.testing.assert_allclose(ours, expected, rtol=1e-6)
  assert ours[29] / ours[30] == pytest.approx(4.0)  # a repeated milestone counts twice


def test_exponential_decay_matches_torch_exponential_lr():
  # ExponentialLR.get_lr: lr at epoch 0, lr * gamma afterwards
  def get_lr(e, lr):
    return lr if e == 0 else lr * 0.93

  expected = torch_sequence(0.1, get_lr)
  ours = jax.vmap(og.exponential_decay(0.1, 1, 0.93))(jnp.arange(100))
  np.testing.assert_allclose(ours, expected, rtol=2e-6)


@pytest.mark.parametrize("end", [0.0, 0.004])
def test_linear_decay_matches_torch_linear_lr(end):
  # LinearLR(start_factor=1, end_factor=end/init, total_iters=T), recursive get_lr
  init, T = 0.02, 37
  s, e_f = 1.0, end / init

  def get_lr(e, lr):
    if e == 0:
      return init * s
    if e > T:
      return lr
    return lr * (1.0 + (e_f - s) / (T * s + (e - 1) * (e_f - s)))

  expected = torch_sequence(init, get_lr)
  ours = jax.vmap(og.linear_decay(init, T, end_value=end))(jnp.arange(100))
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-9)
  assert float(ours[T]) == np.float32(end)


# ---------------------------------------------------------------------------
# Keras sequences (written from keras.optimizers.schedules formulas)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("staircase", [False, True])
def test_inverse_time_decay_matches_keras(staircase):
  # InverseTimeDecay: init / (1 + rate * step / decay_steps), floor() if staircase
  init, T, rate = 0.1, 6, 0.75
  expected = []
  for step in range(100):
    p = step / T
    expected.append(init / (1 + rate * (math.floor(p) if staircase else p)))
  ours = jax.vmap(og.inverse_time_decay(init, T, decay_rate=rate, staircase=staircase))(
      jnp.arange(100))
  np.testing.assert_allclose(ours, expected, rtol=2e-6)


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_polynomial_decay_cycle_matches_keras(power):
  # PolynomialDecay(cycle=True): multiplier = 1 if step == 0 else ceil(step / T)
  init, T, end = 0.1, 8, 0.001
  expected = []
  for step in range(100):
    multiplier = 1.0 if step == 0 else math.ceil(step / T)
    p = step / (T * multiplier)
    expected.append((init - end) * (1 - p) ** power + end)
  ours = jax.vmap(og.polynomial_decay(init, T, power=power, end_value=end, cycle=True))(
      jnp.arange(100))
  np.testing.assert_allclose(ours, expected, rtol=2e-6)
  assert float(ours[0]) == np.float32(init)  # step 0 starts the first cycle
  assert float(ours[T]) == np.float32(end) and float(ours[T + 1]) > float(ours[T])


def test_polynomial_decay_matches_keras_without_cycle():
  init, T, end, power = 0.1, 30, 1e-4, 0.5  # Keras' default end_learning_rate is 1e-4
  expected = [(init - end) * (1 - min(s, T) / T) ** power + end for s in range(100)]
  ours = jax.vmap(og.polynomial_decay(init, T, power=power, end_value=end))(jnp.arange(100))
  np.testing.assert_allclose(ours, expected, rtol=2e-6)


@pytest.mark.parametrize("staircase", [False, True])
def test_exponential_decay_matches_keras(staircase):
  # ExponentialDecay: init * rate ** (step / decay_steps), floor() if staircase
  init, T, rate = 0.1, 9, 0.6
  expected = [init * rate ** (math.floor(s / T) if staircase else s / T) for s in range(100)]
  ours = jax.vmap(og.exponential_decay(init, T, rate, staircase=staircase))(
      jnp.arange(100))
  np.testing.assert_allclose(ours, expected, rtol=5e-6)


# ---------------------------------------------------------------------------
# Steps: types, saturation, negative and float steps
# ---------------------------------------------------------------------------

_ANY = [
    og.polynomial_decay(1.0, 5, power=0.5, cycle=True),
    og.inverse_time_decay(1.0, 3, staircase=True),
    og.exponential_decay(1.0, 1000, 0.999),
    og.multistep_decay(1.0, [2, 9, TOP], factor=0.5),
    og.warmup(og.inverse_sqrt_decay(1.0), 4, init_value=0.5),
]


@pytest.mark.parametrize("i", range(len(_ANY)))
def test_schedules_step_types(i):
  sched = _ANY[i]
  top, zero, seven = sched(TOP), sched(0), sched(7)
  for big in (2**40, np.int64(2**40), np.uint64(2**63), jnp.uint32(2**32 - 1),
              np.array(2**40, np.int64)):
    assert sched(big) == top, big  # saturates like optax.safe_increment, never wraps
  for neg in (-1, -(2**40), np.int64(-5), jnp.int32(-(2**31)), jnp.int8(-3), -0.5):
    assert sched(neg) == zero, neg
  for f in (7.0, 7.9, np.float64(7.5), jnp.float32(7.99), jnp.bfloat16(7.0), np.float32(7.2)):
    assert sched(f) == seven, f  # float steps are floored
  assert sched(jnp.float32(jnp.nan)) == zero
  assert sched(jnp.float32(jnp.inf)) == sched(2147483520)  # largest float32 below 2**31
  vec = np.array([0, 3, 7, 2**40])
  expected = np.array([sched(int(t)) for t in vec])
  np.testing.assert_array_equal(sched(vec), expected)
  np.testing.assert_allclose(sched(jnp.asarray(vec[:3], jnp.int32)), expected[:3], rtol=1e-6)


def test_schedules_accept_traced_hyperparameters():
  @jax.jit
  def f(init, rate, t):
    return og.exponential_decay(init, 4, rate, staircase=True)(t)

  np.testing.assert_allclose(f(0.5, 0.5, 9), 0.5 * 0.25, rtol=1e-6)
  arr = og.step_decay(jnp.asarray(1.0), jnp.asarray(3), factor=jnp.asarray(0.5))
  assert arr(7) == og.step_decay(1.0, 3, factor=0.5)(7)
  ms = og.multistep_decay(1.0, jnp.asarray([2, 4]), factor=0.5)
  np.testing.assert_allclose(jax.vmap(ms)(jnp.arange(6)), [1, 1, 0.5, 0.5, 0.25, 0.25])


def test_schedules_accept_integral_float_sizes():
  assert og.step_decay(1.0, 1e1, factor=0.5)(25) == og.step_decay(1.0, 10, factor=0.5)(25)
  assert og.linear_decay(1.0, 4.0)(1) == np.float32(0.75)


@pytest.mark.parametrize("make,match", [
    (lambda: og.polynomial_decay(1.0, 0), r"polynomial_decay\(decay_steps=\.\.\.\) must be >= 1"),
    (lambda: og.polynomial_decay(1.0, 2.5), r"decay_steps=\.\.\.\) must be a whole number"),
    (lambda: og.polynomial_decay(1.0, 2**31), r"decay_steps=\.\.\.\) must be <= 2\*\*31 - 1"),
    (lambda: og.polynomial_decay(1.0, 5, power=-1.0), r"polynomial_decay\(power=\.\.\.\).*-1"),
    (lambda: og.linear_decay(float("nan"), 5), r"linear_decay\(init_value=\.\.\.\).*nan"),
    (lambda: og.linear_decay(1.0, 5, end_value=float("inf")), r"end_value.*inf"),
    (lambda: og.inverse_sqrt_decay(1.0, timescale=0.0), r"inverse_sqrt_decay\(timescale"),
    (lambda: og.inverse_time_decay(1.0, 5, decay_rate=-1.0), r"decay_rate=\.\.\.\) must be >= 0"),
    (lambda: og.exponential_decay(1.0, 1, 0.0),
     r"exponential_decay\(decay_rate=\.\.\.\) must be > 0"),
    (lambda: og.exponential_decay(1.0, 1, 0.5, end_value=float("nan")), r"end_value.*nan"),
    (lambda: og.step_decay(1.0, 0), r"step_decay\(step_size=\.\.\.\) must be >= 1, got 0"),
    (lambda: og.step_decay(1.0, 3, factor=-0.5), r"step_decay\(factor=\.\.\.\) must be > 0"),
    (lambda: og.multistep_decay(1.0, [5, 3]), r"multistep_decay\(milestones=\.\.\.\).*sorted"),
    (lambda: og.multistep_decay(1.0, [-1, 3]), r"multistep_decay\(milestones=\.\.\.\).*-1"),
    (lambda: og.multistep_decay(1.0, [1.5]), r"milestones.*whole"),
    (lambda: og.warmup(og.linear_decay(1.0, 5), -1), r"warmup\(warmup_steps=\.\.\.\).*-1"),
])
def test_schedules_invalid_arguments_raise_value_error(make, match):
  with pytest.raises(ValueError, match=match):
    make()


# ---------------------------------------------------------------------------
# Warmup and composition
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("W", [1, 2, 10, 1000])
def test_warmup_joins_continuously(W):
  inner = og.polynomial_decay(0.3, 50, power=2.0, end_value=0.01)
  s0 = float(inner(0))
  for init in (0.0, 0.05):
    sched = og.warmup(inner, W, init_value=init)
    assert sched(0) == np.float32(init)
    assert sched(W) == inner(0)
    np.testing.assert_allclose(sched(W - 1), f32(init) + (s0 - f32(init)) * (W - 1) / W,
                               rtol=1e-6)
    assert sched(W + 17) == inner(17)
    assert sched(W + TOP) == inner(TOP - W)  # saturated step, no overflow in t - W


def test_warmup_zero_steps_is_the_schedule():
  inner = optax.cosine_decay_schedule(0.1, 100)
  sched = og.warmup(inner, 0, init_value=0.7)
  for t in (0, 1, 50, 100):
    assert sched(t) == jnp.float32(inner(t))
  assert sched(-4) == jnp.float32(inner(0))


def test_warmup_equals_optax_join_of_linear_and_schedule():
  inner = optax.cosine_decay_schedule(0.1, 100, alpha=0.1)
  ours = og.warmup(inner, 20, init_value=0.01)
  ref = optax.join_schedules([optax.linear_schedule(0.01, inner(0), 20), inner], [20])
  steps = jnp.arange(150)
  np.testing.assert_allclose(jax.vmap(ours)(steps), jax.vmap(ref)(steps), rtol=1e-6)


def test_schedules_compose_with_optax_join_schedules():
  a = og.linear_decay(1.0, 50, end_value=0.5)
  b = og.step_decay(0.5, 10, factor=0.5)
  c = og.exponential_decay(0.0625, 1, 0.9)
  joined = optax.join_schedules([a, b, c], [50, 90])
  expected = [ref_polynomial(t, 1.0, 50, 1.0, 0.5) if t < 50 else
              ref_step(t - 50, 0.5, 10, 0.5) if t < 90 else
              ref_exponential(t - 90, 0.0625, 0.9) for t in range(200)]
  np.testing.assert_allclose(jax.jit(jax.vmap(joined))(jnp.arange(200)), expected, rtol=2e-6)


# ---------------------------------------------------------------------------
# Inside optax
# ---------------------------------------------------------------------------


def _numpy_adam(grads, lrs, b1=0.9, b2=0.999, eps=1e-8):
  m = v = 0.0
  out = []
  for k, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mhat, vhat = m / (1 - b1**k), v / (1 - b2**k)
    out.append(-lr * mhat / (np.sqrt(vhat) + eps))
  return out


@pytest.mark.parametrize("kind", ["exp", "warmup"])
def test_schedules_as_adam_learning_rate(kind):
  if kind == "exp":
    sched = og.exponential_decay(0.1, 1, 0.5)
    lrs = [ref_exponential(k, 0.1, 0.5) for k in range(6)]
  else:
    sched = og.warmup(og.step_decay(0.1, 2, factor=0.5), 3, init_value=0.0)
    lrs = [ref_warmup(k, lambda s: ref_step(s, 0.1, 2, 0.5), 3) for k in range(6)]
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=(3,)).astype(np.float32) for _ in range(6)]
  tx = optax.adam(learning_rate=sched)
  state = tx.init(jnp.zeros(3))
  update = jax.jit(tx.update)
  ours = []
  for g in grads:
    u, state = update(jnp.asarray(g), state)
    ours.append(np.asarray(u))
  expected = _numpy_adam([g.astype(np.float64) for g in grads], lrs)
  np.testing.assert_allclose(np.stack(ours), np.stack(expected), rtol=2e-5, atol=1e-9)
  if kind == "warmup":
    assert np.all(ours[0] == 0)  # lr(0) = init_value = 0


def test_schedules_drive_clip_threshold_through_inject_hyperparams():
  sched = og.warmup(og.linear_decay(2.0, 5, end_value=0.5), 3, init_value=0.5)
  tx = optax.inject_hyperparams(og.clip_by_global_norm)(max_norm=sched)
  params = {"w": jnp.zeros((4,)), "b": jnp.zeros(())}
  state = tx.init(params)
  assert state.hyperparams["max_norm"] == sched(0)
  update = jax.jit(tx.update)
  grads = {"w": jnp.full((4,), 5.0), "b": jnp.asarray(3.0)}  # norm ~10.4: always clipped
  for k in range(12):
    u, state = update(grads, state)
    # inject_hyperparams evaluates the schedule at its own count: k for the k-th update
    assert state.hyperparams["max_norm"] == sched(k), k
    expected = ref_warmup(k, lambda s: ref_polynomial(s, 2.0, 5, 1.0, 0.5), 3, 0.5)
    np.testing.assert_allclose(optax.tree.norm(u), expected, rtol=1e-5)


def test_schedules_with_scale_by_schedule_under_jit_no_retrace():
  sched = og.multistep_decay(1.0, [2, 4], factor=0.1)
  tx = optax.scale_by_schedule(sched)
  state = tx.init(jnp.zeros(()))
  traces = []

  @jax.jit
  def step(g, s):
    traces.append(1)
    return tx.update(g, s)

  outs = []
  for _ in range(6):
    u, state = step(jnp.asarray(1.0), state)
    outs.append(float(u))
  assert len(traces) == 1
  np.testing.assert_allclose(outs, [1, 1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
