"""Gradient accumulation: ``optax.MultiSteps`` wherever a transformation is taken.

``guard(MultiSteps(inner, k))`` judges each micro-batch, and a skipped one
leaves the accumulator as it was; ``MultiSteps(guard(inner), k)`` judges the
accumulated gradient; ``update_and_apply`` on a ``MultiSteps`` equals its
two-line step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og

PARAMS = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.25)}


def _grads(i, *, nan=False):
  rng = np.random.default_rng(i)
  g = {"w": jnp.asarray(rng.standard_normal(3), jnp.float32),
       "b": jnp.asarray(rng.standard_normal(()), jnp.float32)}
  if nan:
    g["w"] = g["w"].at[1].set(jnp.nan)
  return g


def _inner():
  return optax.chain(og.clip_by_global_norm(1.0), optax.adam(0.1))


def _run(tx, grads, *, fused):
  params, state = PARAMS, tx.init(PARAMS)
  step = jax.jit(lambda g, s, p: og.update_and_apply(tx, g, s, p))
  for g in grads:
    if fused:
      params, state = step(g, state, params)
    else:
      u, state = tx.update(g, state, params)
      params = optax.apply_updates(params, u)
  return params, state


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


GUARDS = {
    "skip_nonfinite": og.skip_nonfinite,
    "skip_on_spike": lambda inner: og.skip_on_spike(inner, window=8, min_history=4),
    "skip_steps": lambda inner: og.skip_nonfinite(og.skip_steps(inner, [(100, 101)])),
}


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("guard", sorted(GUARDS))
def test_guard_of_multisteps_judges_each_micro_batch(guard, fused):
  """Micro-batches g0, NaN, g1, g2, g3 give what g0..g3 give without the guard."""
  clean = [_grads(i) for i in range(4)]
  with_nan = [clean[0], _grads(9, nan=True), *clean[1:]]
  tx = GUARDS[guard](optax.MultiSteps(_inner(), every_k_schedule=2))
  params, state = _run(tx, with_nan, fused=fused)
  ref = optax.MultiSteps(_inner(), every_k_schedule=2)
  ref_params, ref_state = _run(ref.gradient_transformation(), clean, fused=False)
  _close(params, ref_params)
  skipped = {k: int(v) for k, v in og.guard_stats(state).items() if k.endswith("num_skipped")}
  assert sum(skipped.values()) == 1, skipped
  # the accumulator and the inner optimizer saw the healthy micro-batches only
  _close(og.strip_guard_state(state), ref_state)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_multisteps_of_a_guard_judges_the_accumulated_gradient(fused):
  guard = og.skip_on_spike(_inner(), window=8, min_history=3)
  tx = optax.MultiSteps(guard, every_k_schedule=2)
  clean = [_grads(i) for i in range(12)]
  spike = jax.tree.map(lambda g: 1e4 * g, _grads(50))
  # windows 0-3 clean, window 4 holds a x1e4 micro-batch, window 5 clean
  grads = clean[:8] + [clean[8], spike] + clean[10:12]
  params, state = _run(tx, grads, fused=fused)
  stats = og.guard_stats(state)
  assert int(stats["skip_on_spike/num_skipped"]) == 1
  assert not bool(stats["skip_on_spike/last_skipped"])
  # the guard recorded one norm per window: the accumulated gradient's
  assert int(stats["skip_on_spike/norm/count"]) == 6
  ref = optax.MultiSteps(_inner(), every_k_schedule=2).gradient_transformation()
  ref_params, _ = _run(ref, clean[:8] + clean[10:12], fused=False)
  _close(params, ref_params)


def test_multisteps_of_a_guard_a_nan_micro_batch_poisons_later_windows():
  """optax.MultiSteps resets its accumulator by multiplying by 0: NaN stays NaN.

  The guard inside then skips every later window (loudly: the skip counters
  grow); the guard outside, ``guard(MultiSteps(...))``, keeps the NaN
  micro-batch out of the accumulator instead (see the first test).
  """
  tx = optax.MultiSteps(og.skip_nonfinite(_inner()), every_k_schedule=2)
  grads = [_grads(0), _grads(1, nan=True), _grads(2), _grads(3)]
  params, state = _run(tx, grads, fused=True)
  assert int(og.guard_stats(state)["skip_nonfinite/num_skipped"]) == 2
  _close(params, PARAMS)


def test_update_and_apply_on_multisteps_equals_its_two_line_step():
  grads = [_grads(i) for i in range(6)]
  ms = optax.MultiSteps(_inner(), every_k_schedule=3)
  fused = _run(ms, grads, fused=True)
  unfused = _run(ms.gradient_transformation(), grads, fused=False)
  _close(fused, unfused)
  assert int(fused[1].gradient_step) == 2


def test_multisteps_keyword_extras_reach_the_inner_optimizer():
  inner = optax.chain(optax.sgd(1.0), og.reduce_on_plateau(patience=0, factor=0.5))
  tx = og.skip_nonfinite(optax.MultiSteps(inner, every_k_schedule=1))
  state = tx.init(PARAMS)
  for value in (1.0, 2.0):
    _, state = og.update_and_apply(tx, _grads(0), state, PARAMS, value=jnp.float32(value))
  assert float(og.guard_stats(state)["reduce_on_plateau/scale"]) == 0.5


def test_add_guard_state_takes_a_multisteps_guard():
  ms = optax.MultiSteps(_inner(), every_k_schedule=2)
  ms_state = ms.init(PARAMS)
  guard = og.skip_on_spike(ms)
  state = og.add_guard_state(guard, ms_state, PARAMS)
  assert state.inner_state is ms_state
  assert og.strip_guard_state(state) is ms_state


@pytest.mark.parametrize("call", [
    lambda tx: og.skip_nonfinite(tx),
    lambda tx: og.update_and_apply(tx, PARAMS, None, PARAMS),
], ids=["guard", "update_and_apply"])
def test_other_objects_are_still_rejected_naming_the_argument(call):
  with pytest.raises(TypeError, match=r"GradientTransformation or an optax.MultiSteps"):
    call(optax.adam)  # the factory, not a transformation
