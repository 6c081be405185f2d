"""Tests of dynamic_loss_scale (PyTorch GradScaler's rule as a guard) and loss_scale."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import assert_bitwise_equal

import optax_guard as og

LR = 0.5  # a power of two: the reference's sgd step rounds as optax's


def _params():
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
          "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}


# ---------------------------------------------------------------------------
# A NumPy reference of torch.amp.GradScaler (unscale_, step, update)
# ---------------------------------------------------------------------------


def _np_grad_scaler(received, params, *, init_scale, growth_factor, backoff_factor,
                    growth_interval):
  """GradScaler around SGD(LR) on float32 params, step by step in NumPy.

  ``_amp_foreach_non_finite_check_and_unscale_``: the inverse scale is one
  float32 number, every element is tested for finiteness *before* it is
  unscaled, and unscaled in float32; ``optimizer.step`` runs only if all are
  finite; ``_amp_update_scale_`` then backs off (tracker 0) or counts the
  step and, at ``growth_interval``, grows the scale if the float32 product is
  finite (tracker 0 either way). Returns a list of ``(skipped, scale,
  tracker, params)`` after each step.
  """
  f32 = np.float32
  scale, tracker = f32(init_scale), 0
  p = {k: np.asarray(v).copy() for k, v in params.items()}
  out = []
  for g in received:
    found_inf = not all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in g.values())
    inv = f32(1) / scale
    if found_inf:
      scale, tracker = f32(scale * f32(backoff_factor)), 0
    else:
      for k, x in g.items():
        x = np.asarray(x)
        u = (x.astype(f32) * inv).astype(x.dtype)
        p[k] = (p[k] + (u * np.asarray(-LR, u.dtype)).astype(f32)).astype(f32)
      successful = tracker + 1
      if successful == growth_interval:
        grown = f32(scale * f32(growth_factor))
        scale = grown if np.isfinite(grown) else scale
        tracker = 0
      else:
        tracker = successful
    out.append((found_inf, scale, tracker, {k: v.copy() for k, v in p.items()}))
  return out


def _true_gradient(rng):
  """A gradient of magnitude 10**U(-4, 4), now and then with a NaN or inf written in."""
  mag = 10.0 ** rng.uniform(-4, 4)
  g = {"w": rng.standard_normal((4, 3)) * mag, "b": rng.standard_normal(3) * mag}
  if rng.random() < 0.15:
    g["w"].reshape(-1)[rng.integers(12)] = rng.choice([np.nan, np.inf, -np.inf])
  return g


def _powers_of_two(kwargs):
  """Whether every scale of the run is a power of two (its inverse exact on any backend)."""
  return all(np.frexp(kwargs[k])[0] == 0.5
             for k in ("init_scale", "growth_factor", "backoff_factor"))


CONFIGS = [
    dict(init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=3),
    dict(init_scale=1000.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=1),
    dict(init_scale=3.0, growth_factor=1.5, backoff_factor=0.25, growth_interval=2),
    dict(init_scale=2.0**-3, growth_factor=4.0, backoff_factor=0.75, growth_interval=4),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("config", range(len(CONFIGS)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dynamic_loss_scale_matches_a_reference_of_grad_scaler(seed, config, dtype):
  """Scale, tracker, skips and parameters equal GradScaler's, bitwise, over random runs.

  Each step's gradients are those of ``loss * scale`` with the scale the run holds
  (cast to ``dtype``: float16 overflows to inf by itself at large scales).
  """
  kwargs = CONFIGS[config]
  params = _params()
  tx = og.dynamic_loss_scale(optax.sgd(LR), **kwargs)
  step = jax.jit(lambda g, s, p: og.update_and_apply(tx, g, s, p))
  rng = np.random.default_rng(seed)
  state, p, received, got = tx.init(params), params, [], []
  for _ in range(40):
    scale = np.float64(og.loss_scale(state))
    with np.errstate(over="ignore"):  # float16 overflows to inf, as in a float16 backward pass
      g = {k: (v * scale).astype(np.float32).astype(dtype)
           for k, v in _true_gradient(rng).items()}
    received.append(g)
    p, state = step(jax.tree.map(jnp.asarray, g), state, p)
    got.append((bool(state.last_skipped), state.scale, int(state.growth_tracker), p))
  ref = _np_grad_scaler(received, params, **kwargs)
  for i, ((skipped, scale, tracker, p), (ref_skipped, ref_scale, ref_tracker, ref_p)) in \
      enumerate(zip(got, ref, strict=True)):
    assert (skipped, tracker) == (ref_skipped, ref_tracker), i
    assert np.float32(scale).tobytes() == np.float32(ref_scale).tobytes(), (i, scale, ref_scale)
    want = {k: jnp.asarray(v) for k, v in ref_p.items()}
    if jax.default_backend() == "cpu" or _powers_of_two(kwargs):
      assert_bitwise_equal(p, want)
    else:  # XLA:GPU's float32 1/scale is not correctly rounded: an ulp of the inverse
      chex.assert_trees_all_close(p, want, rtol=1e-6, atol=1e-7)
  assert 0 < int(state.num_skipped) < 40  # both branches were taken


def test_dynamic_loss_scale_counters_and_state_types():
  tx = og.dynamic_loss_scale(optax.sgd(1.0), init_scale=8.0, growth_interval=2)
  state = tx.init(_params())
  assert state.scale.dtype == jnp.float32 and state.growth_tracker.dtype == jnp.int32
  bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), _params())
  good = jax.tree.map(jnp.ones_like, _params())
  pattern = [1, 1, 0, 0, 0, 1, 0]
  want = [(4.0, 0), (2.0, 0), (2.0, 1), (4.0, 0), (4.0, 1), (2.0, 0), (2.0, 1)]
  for i, (b, (scale, tracker)) in enumerate(zip(pattern, want, strict=True)):
    _, state = jax.jit(tx.update)(bad if b else good, state)
    assert (float(state.scale), int(state.growth_tracker)) == (scale, tracker), i
  assert int(state.num_skipped) == 3 and int(state.consecutive_skipped) == 0
  stats = og.guard_stats(state)
  assert sorted(stats) == [
      "dynamic_loss_scale/consecutive_skipped", "dynamic_loss_scale/growth_tracker",
      "dynamic_loss_scale/last_skipped", "dynamic_loss_scale/num_skipped",
      "dynamic_loss_scale/scale"]
  assert float(stats["dynamic_loss_scale/scale"]) == 2.0


def test_dynamic_loss_scale_growth_never_overflows_float32():
  """A growth past float32 range keeps the scale (and still resets the tracker)."""
  tx = og.dynamic_loss_scale(optax.sgd(1.0), init_scale=2.0**126, growth_factor=4.0,
                             growth_interval=1)
  g = jnp.ones(2)
  state = tx.init(g)
  for _ in range(3):
    _, state = tx.update(g, state)
    assert float(state.scale) == 2.0**126 and int(state.growth_tracker) == 0
  tx = og.dynamic_loss_scale(optax.sgd(1.0), init_scale=2.0**125, growth_interval=1)
  _, state = tx.update(g, tx.init(g))
  assert float(state.scale) == 2.0**126


def test_dynamic_loss_scale_skipped_step_leaves_inner_state_and_params():
  params, inner = _params(), optax.adam(1e-2)
  tx = og.dynamic_loss_scale(inner, init_scale=4.0)
  g = jax.tree.map(lambda x: 4.0 * x, _params())
  p1, s1 = og.update_and_apply(tx, g, tx.init(params), params)
  bad = {**g, "b": g["b"].at[1].set(jnp.inf)}
  p2, s2 = og.update_and_apply(tx, bad, s1, p1)
  assert_bitwise_equal(p2, p1)
  assert_bitwise_equal(s2.inner_state, s1.inner_state)
  assert bool(s2.last_skipped) and float(s2.scale) == 2.0
  # the applied step is the inner step on the unscaled gradients
  ref_u, ref_s = inner.update(_params(), inner.init(params), params)
  assert_bitwise_equal(s1.inner_state, ref_s)
  assert_bitwise_equal(p1, optax.apply_updates(params, ref_u))


def test_dynamic_loss_scale_zero_scale_skips_instead_of_applying_nan():
  """A scale that underflowed to 0 (1/scale = inf) skips: 0 * inf would be NaN."""
  tx = og.dynamic_loss_scale(optax.sgd(1.0), init_scale=2.0**-126, backoff_factor=2.0**-30)
  g = jnp.zeros(2)
  state = tx.init(g)
  _, state = tx.update(g.at[0].set(jnp.nan), state)  # backs off to 0
  assert float(state.scale) == 0.0
  u, state = tx.update(g, state)
  assert bool(state.last_skipped) and not np.any(np.asarray(u))


# ---------------------------------------------------------------------------
# float16
# ---------------------------------------------------------------------------


def _regression(seed=0):
  """A linear model with float32 master weights computing in float16; the loss is the
  mean over 256 x 256 outputs, whose residuals (about 2e-4) give float16 output
  gradients of 2 r / 65536 ~ 6e-9: they round to 0 without a loss scale."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((256, 32)).astype(np.float32)
  w_true = (1e-2 / np.sqrt(32) * rng.standard_normal((32, 256))).astype(np.float32)
  w0 = w_true + (2e-4 / np.sqrt(32) * rng.standard_normal((32, 256))).astype(np.float32)
  y = x @ w_true

  def loss(w, dtype):
    pred = jnp.asarray(x, dtype) @ w.astype(dtype)
    return jnp.mean((pred.astype(jnp.float32) - y) ** 2)

  return jnp.asarray(w0), loss


def _train_regression(dtype, scaled, steps=30):
  w, loss = _regression()
  inner = optax.adam(2e-5, eps=1e-12)
  tx = og.dynamic_loss_scale(inner) if scaled else inner
  state = tx.init(w)

  @jax.jit
  def step(w, state):
    scale = og.loss_scale(state) if scaled else 1.0
    g = jax.grad(lambda w: loss(w, dtype) * scale)(w)
    w, state = og.update_and_apply(tx, g, state, w)
    return w, state, g

  losses, nonzero = [float(loss(w, jnp.float32))], []
  for _ in range(steps):
    w, state, g = step(w, state)
    losses.append(float(loss(w, jnp.float32)))
    nonzero.append(float(jnp.mean(g != 0)))
  return np.array(losses), max(nonzero), state


def test_float16_gradients_underflow_without_a_scale_and_train_with_one():
  f32, _, _ = _train_regression(jnp.float32, scaled=False)
  f16, nonzero, _ = _train_regression(jnp.float16, scaled=False)
  scaled, _, state = _train_regression(jnp.float16, scaled=True)
  assert nonzero < 0.01  # more than 99% of the float16 gradients underflowed to 0
  assert f16[-1] > 0.9 * f16[0]  # and training stalled
  assert f32[-1] < 0.02 * f32[0]
  np.testing.assert_allclose(scaled, f32, rtol=0.05)  # float32 training, within float16 noise
  assert int(state.num_skipped) == 0


def test_float16_leaves_are_unscaled_in_float32_and_overflow_backs_off():
  g = jnp.array([60000.0, 2.0**-14, -3.0], jnp.float16)  # the gradients of loss * 2**15
  tx = og.dynamic_loss_scale(optax.sgd(-1.0), init_scale=2.0**15)
  u, state = tx.update(g, tx.init(g))
  assert u.dtype == jnp.float16
  want = (np.asarray(g, np.float32) * np.float32(2.0**-15)).astype(np.float16)
  assert_bitwise_equal(u, jnp.asarray(want))  # 2**-29 is a float16 subnormal underflow: 0
  _, state = tx.update(g * jnp.float16(2), state)  # 120000 overflows float16
  assert bool(state.last_skipped) and float(state.scale) == 2.0**14


# ---------------------------------------------------------------------------
# Nesting, fused step, loss_scale lookup
# ---------------------------------------------------------------------------


def _grads_sequence(nan_at=(3, 4, 9)):
  rng = np.random.default_rng(5)
  out = []
  for i in range(12):
    g = {"w": jnp.asarray(64.0 * rng.standard_normal((4, 3)), jnp.float32),
         "b": jnp.asarray(64.0 * rng.standard_normal(3), jnp.float32)}
    if i == 6:  # a x1e3 spike for the spike guard inside
      g = jax.tree.map(lambda x: 1e3 * x, g)
    if i in nan_at:
      g = {**g, "w": g["w"].at[1, 1].set(jnp.nan)}
    out.append(g)
  return out


NESTINGS = {
    "adam": lambda: og.dynamic_loss_scale(optax.adam(1e-2), init_scale=64.0,
                                          growth_interval=2),
    "skip_on_spike inside": lambda: og.dynamic_loss_scale(
        og.skip_on_spike(optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-2)),
                         window=4, min_history=2), init_scale=64.0, growth_interval=2),
    "skip_nonfinite inside": lambda: og.dynamic_loss_scale(
        og.skip_nonfinite(optax.adam(1e-2)), init_scale=64.0, growth_interval=2),
    "MultiSteps inside": lambda: og.dynamic_loss_scale(
        optax.MultiSteps(optax.adam(1e-2), 2).gradient_transformation(), init_scale=64.0,
        growth_interval=2),
    "inside MultiSteps": lambda: optax.MultiSteps(
        og.dynamic_loss_scale(optax.adam(1e-2), init_scale=64.0, growth_interval=2), 2),
    "inside skip_steps": lambda: og.skip_steps(
        og.dynamic_loss_scale(optax.adam(1e-2), init_scale=64.0, growth_interval=2), [(7, 8)]),
    "inject_hyperparams": lambda: optax.inject_hyperparams(og.dynamic_loss_scale)(
        optax.adam(1e-2), init_scale=64.0, growth_interval=2),
}


def _as_tx(tx):
  return tx.gradient_transformation() if isinstance(tx, optax.MultiSteps) else tx


@pytest.mark.parametrize("name", sorted(NESTINGS))
def test_dynamic_loss_scale_fused_step_equals_update_then_apply(name):
  tx = _as_tx(NESTINGS[name]())
  params = _params()
  fused_step = jax.jit(lambda g, s, p: og.update_and_apply(tx, g, s, p))

  @jax.jit
  def unfused_step(g, s, p):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  fused = unfused = (params, tx.init(params))
  scales = []
  for g in _grads_sequence():
    fused = fused_step(g, fused[1], fused[0])
    unfused = unfused_step(g, unfused[1], unfused[0])
    # the same decisions, counters and scales; floats up to XLA's fusion of the addition
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(unfused), strict=True):
      if jnp.issubdtype(a.dtype, jnp.floating):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
      else:
        np.testing.assert_array_equal(a, b)
    scales.append(float(og.loss_scale(fused[1])))
  assert min(scales) < 64.0  # the NaN steps backed the scale off
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(fused[0]))


def test_dynamic_loss_scale_judges_each_micro_batch_around_multi_steps():
  """Outside MultiSteps a NaN micro-batch is skipped and left out of the accumulator;
  inside, the accumulated gradient is judged at the k-th micro-batch."""
  params = _params()
  base = jax.tree.map(jnp.ones_like, params)
  nan_b = lambda g: {**g, "b": g["b"].at[0].set(jnp.nan)}  # noqa: E731
  outer = og.dynamic_loss_scale(optax.MultiSteps(optax.sgd(1.0), 2).gradient_transformation(),
                                init_scale=8.0)
  inner = optax.MultiSteps(og.dynamic_loss_scale(optax.sgd(1.0), init_scale=8.0), 2)
  s_out, s_in = outer.init(params), inner.init(params)
  p_out = p_in = params
  scaled = lambda s: jax.tree.map(lambda x: x * og.loss_scale(s), base)  # grads of loss * S
  for bad in (False, True, False):
    g_out, g_in = scaled(s_out), scaled(s_in)
    p_out, s_out = og.update_and_apply(outer, nan_b(g_out) if bad else g_out, s_out, p_out)
    u, s_in = inner.update(nan_b(g_in) if bad else g_in, s_in, p_in)
    p_in = optax.apply_updates(p_in, u)
  # outside: the two finite micro-batches were averaged and applied; the scale backed off
  chex.assert_trees_all_equal(p_out, jax.tree.map(lambda p: p - 1.0, params))
  assert float(og.loss_scale(s_out)) == 4.0 and int(s_out.num_skipped) == 1
  # inside: the mean of the first two was NaN at the second micro-batch, and skipped
  chex.assert_trees_all_equal(p_in, params)
  assert float(og.loss_scale(s_in)) == 4.0
  assert int(s_in.inner_opt_state.num_skipped) == 1


def test_a_guard_around_dynamic_loss_scale_hides_overflows_from_it():
  """Documented: an outer guard skips an overflowing step before the scale backs off."""
  tx = og.skip_nonfinite(og.dynamic_loss_scale(optax.sgd(1.0), init_scale=8.0))
  g = jnp.array([jnp.inf, 1.0])
  state = tx.init(g)
  for _ in range(3):
    _, state = tx.update(g, state)
  assert int(state.num_skipped) == 3 and float(og.loss_scale(state)) == 8.0


def test_loss_scale_finds_the_state_in_any_nesting_under_jit():
  params = _params()
  wrapped = {
      "chain": optax.chain(og.monitor(), og.dynamic_loss_scale(optax.sgd(1.0), init_scale=4.0)),
      "guard": og.skip_steps(og.dynamic_loss_scale(optax.sgd(1.0), init_scale=4.0), []),
      "multi": optax.MultiSteps(og.dynamic_loss_scale(optax.sgd(1.0), init_scale=4.0), 2)
      .gradient_transformation(),
      "inject": optax.inject_hyperparams(og.dynamic_loss_scale)(optax.sgd(1.0), init_scale=4.0),
      "multi_transform": optax.multi_transform(
          {"a": og.dynamic_loss_scale(optax.sgd(1.0), init_scale=4.0), "b": optax.sgd(1.0)},
          {"w": "a", "b": "b"}),
  }
  for name, tx in wrapped.items():
    state = tx.init(params)
    assert float(og.loss_scale(state)) == 4.0, name
    assert float(jax.jit(og.loss_scale)(state)) == 4.0, name
    assert og.loss_scale(state).dtype == jnp.float32


def test_loss_scale_needs_exactly_one_state():
  params = _params()
  with pytest.raises(ValueError, match=r"loss_scale\(opt_state=\.\.\.\).*exactly one.*found 0"):
    og.loss_scale(optax.adam(1e-3).init(params))
  two = optax.chain(og.dynamic_loss_scale(optax.sgd(1.0)), og.dynamic_loss_scale(optax.sgd(1.0)))
  with pytest.raises(ValueError, match="found 2"):
    og.loss_scale(two.init(params))


def test_dynamic_loss_scale_same_decision_on_every_device(devices):
  """Only device 5's shard holds the inf: every device skips and backs off."""
  g = jnp.ones((8, 4)).at[5, 2].set(jnp.inf)

  def runner(tx):
    def run(g):
      u, s = tx.update(g, tx.init(g), g)
      return u, s.last_skipped, s.scale

    return jax.pmap(run, axis_name="d")

  tx = og.dynamic_loss_scale(optax.sgd(1.0), init_scale=4.0, axis_name="d")
  u, skipped, scale = runner(tx)(g)
  assert np.all(np.asarray(skipped)) and not np.any(np.asarray(u))
  assert np.all(np.asarray(scale) == 2.0)
  _, skipped, _ = runner(og.dynamic_loss_scale(optax.sgd(1.0)))(g)
  assert np.asarray(skipped).tolist() == [i == 5 for i in range(8)]


def test_dynamic_loss_scale_reuses_an_outer_guards_sum_of_squares():
  """Inside skip_nonfinite the received gradients are read for a norm once, not twice."""
  params = {"w": jnp.ones((6, 5))}
  grads = {"w": jnp.full((6, 5), 0.5)}
  for tx in (og.dynamic_loss_scale(optax.sgd(0.1)),
             og.skip_nonfinite(og.dynamic_loss_scale(optax.sgd(0.1)))):
    s = tx.init(params)
    jaxpr = jax.make_jaxpr(lambda g, s, tx=tx: og.update_and_apply(tx, g, s, params))(grads, s)
    assert str(jaxpr).count("reduce_sum[axes=(0, 1)") == 1


# ---------------------------------------------------------------------------
# Flax
# ---------------------------------------------------------------------------


def test_flax_optimizer_and_train_state_train_with_the_scale():
  import flax.linen as nn
  from flax import nnx

  import optax_guard.flax as ogf

  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
  y = jnp.ones((8, 1))
  tx = lambda: og.dynamic_loss_scale(optax.adam(1e-2), init_scale=2.0**10)  # noqa: E731

  model = nnx.Linear(4, 1, dtype=jnp.float16, rngs=nnx.Rngs(0))
  optimizer = ogf.Optimizer(model, tx(), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer):
    scale = og.loss_scale(optimizer.opt_state)
    loss_fn = lambda m: jnp.mean((m(x).astype(jnp.float32) - y) ** 2) * scale  # noqa: E731
    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)

  for _ in range(3):
    nnx_step(model, optimizer)
  assert float(og.loss_scale(optimizer.opt_state)) == 2.0**10
  assert int(og.guard_stats(optimizer.opt_state)["dynamic_loss_scale/num_skipped"]) == 0

  module = nn.Dense(1, dtype=jnp.float16)
  state = ogf.TrainState.create(apply_fn=module.apply,
                                params=module.init(jax.random.key(0), x)["params"], tx=tx())

  @jax.jit
  def linen_step(state):
    scale = og.loss_scale(state.opt_state)
    loss_fn = lambda p: jnp.mean(  # noqa: E731
        (state.apply_fn({"params": p}, x).astype(jnp.float32) - y) ** 2) * scale
    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

  before = state.params
  for _ in range(3):
    state = linen_step(state)
  assert int(state.step) == 3 and float(og.loss_scale(state.opt_state)) == 2.0**10
  assert not np.allclose(state.params["kernel"], before["kernel"])


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(init_scale=0.0), r"init_scale=\.\.\.\) must be in"),
    (dict(init_scale=1e39), r"init_scale"),
    (dict(init_scale=float("inf")), r"init_scale"),
    (dict(growth_factor=1.0), r"growth_factor=\.\.\.\) must be > 1"),
    (dict(backoff_factor=1.0), r"backoff_factor=\.\.\.\) must be in \(0"),
    (dict(backoff_factor=0.0), r"backoff_factor"),
    (dict(growth_interval=0), r"growth_interval=\.\.\.\) must be >= 1"),
    (dict(growth_interval=2.5), r"growth_interval=\.\.\.\) must be an int"),
    (dict(axis_name=1), r"axis_name"),
])
def test_dynamic_loss_scale_rejects_invalid_arguments(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=r"dynamic_loss_scale\(" + match):
    og.dynamic_loss_scale(optax.sgd(1.0), **kwargs)


def test_dynamic_loss_scale_rejects_integer_gradients():
  g = {"w": jnp.ones(2), "n": jnp.array([1, 2], jnp.int32)}
  tx = og.dynamic_loss_scale(optax.sgd(1.0))
  with pytest.raises(TypeError, match=r"dynamic_loss_scale.*\['n'\].*int32"):
    tx.update(g, tx.init(g))


def test_dynamic_loss_scale_infinite_growth_factor_never_grows():
  tx = og.dynamic_loss_scale(optax.sgd(1.0), init_scale=8.0, growth_factor=float("inf"),
                             growth_interval=1)
  g = jnp.ones(2)
  state = tx.init(g)
  for _ in range(3):
    _, state = tx.update(g, state)
  assert float(state.scale) == 8.0
