"""Restartable guards: skip_steps, and adding a guard to a running optimizer."""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import make_grads, make_params
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import optax_guard as og

INT32_MAX = int(np.iinfo(np.int32).max)


def _inner():
  return optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-2))


def _run(tx, grads, params, state=None, *, fused=False, values=None):
  """Jitted steps over ``grads``; returns the final ``(params, state)``."""
  tx = optax.with_extra_args_support(tx)
  state = tx.init(params) if state is None else state

  @jax.jit
  def step(params, state, g, value):
    if fused:
      return og.update_and_apply(tx, g, state, params, value=value)
    u, state = tx.update(g, state, params, value=value)
    return optax.apply_updates(params, u), state

  values = values if values is not None else [1.0] * len(grads)
  for g, v in zip(grads, values, strict=True):
    params, state = step(params, state, g, jnp.float32(v))
  return params, state


def _save_restore(tmp_path, tree, template):
  """Writes ``tree`` with orbax and restores it into the structure of ``template``."""
  ocp = pytest.importorskip("orbax.checkpoint")
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template
  )
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "ckpt", tree)
    ckptr.wait_until_finished()
    return ckptr.restore(tmp_path / "ckpt", abstract)


# ---------------------------------------------------------------------------
# skip_steps
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_skip_steps_equals_the_inner_optimizer_without_the_skipped_gradients(fused):
  ranges = [(2, 4), (7, 8), (3, 5)]  # overlapping, out of order
  skipped = {2, 3, 4, 7}
  grads = [make_grads(i) for i in range(10)]
  params, state = _run(og.skip_steps(_inner(), ranges), grads, make_params(), fused=fused)
  kept = [g for i, g in enumerate(grads) if i not in skipped]
  ref_params, ref_state = _run(_inner(), kept, make_params())
  chex.assert_trees_all_close(params, ref_params, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(state.inner_state, ref_state, rtol=1e-6, atol=1e-7)
  assert int(state.step) == 10 and int(state.num_skipped) == len(skipped)
  assert not bool(state.last_skipped)


def test_skip_steps_skipped_call_returns_zeros_and_the_untouched_inner_state():
  tx = og.skip_steps(_inner(), [(1, 2)])
  params = make_params(jnp.bfloat16)
  state = tx.init(params)
  _, state = tx.update(make_grads(0, dtype=jnp.bfloat16), state, params)
  before = state.inner_state
  nan = jax.tree.map(lambda g: g * jnp.nan, make_grads(1, dtype=jnp.bfloat16))
  u, state = jax.jit(tx.update)(nan, state, params)
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
  chex.assert_trees_all_equal(state.inner_state, before)
  assert bool(state.last_skipped) and int(state.num_skipped) == 1 and int(state.step) == 2


def test_skip_steps_fused_skipped_call_leaves_params_bitwise():
  tx = og.skip_steps(optax.sgd(0.1), [(0, 1)])
  params = {"w": jnp.array([-0.0, 1.0])}
  new, state = og.update_and_apply(tx, {"w": jnp.ones(2)}, tx.init(params), params)
  np.testing.assert_array_equal(np.signbit(new["w"]), [True, False])
  assert bool(state.last_skipped)


def test_skip_steps_empty_ranges_is_the_inner_step_bitwise():
  grads = [make_grads(i) for i in range(4)]
  params, state = _run(og.skip_steps(_inner(), []), grads, make_params())
  ref_params, ref_state = _run(_inner(), grads, make_params())
  chex.assert_trees_all_equal(params, ref_params)
  chex.assert_trees_all_equal(state.inner_state, ref_state)
  assert int(state.num_skipped) == 0


def test_skip_steps_counter_saturates():
  tx = og.skip_steps(optax.sgd(1.0), [(INT32_MAX - 1, INT32_MAX)])
  params = jnp.zeros(1)
  state = tx.init(params)._replace(step=jnp.int32(INT32_MAX - 1))
  u, state = tx.update(jnp.ones(1), state)
  assert float(u[0]) == 0.0 and int(state.step) == INT32_MAX
  for _ in range(2):  # the saturated index is in no range
    u, state = tx.update(jnp.ones(1), state)
    assert float(u[0]) == -1.0 and int(state.step) == INT32_MAX
  assert state.step.dtype == jnp.int32


def test_skip_steps_branches_with_cond_and_selects_no_state():
  params = {"w": jnp.zeros((64, 64))}
  tx = og.skip_steps(optax.adam(1e-3), [(3, 5)])
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
  prims = {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}
  assert "cond" in prims
  big_selects = [
      eqn for eqn in jaxpr.jaxpr.eqns
      if eqn.primitive.name == "select_n" and eqn.outvars[0].aval.size > 1
  ]
  assert not big_selects


def test_skip_steps_around_a_guard_fuses_both_and_reports_both():
  tx = og.skip_steps(og.skip_nonfinite(_inner()), [(1, 2)])
  grads = [make_grads(i) for i in range(5)]
  grads[3] = jax.tree.map(lambda g: g * jnp.nan, grads[3])
  fused = _run(tx, grads, make_params(), fused=True)
  unfused = _run(tx, grads, make_params())
  chex.assert_trees_all_close(fused, unfused, rtol=1e-6, atol=1e-7)
  stats = og.guard_stats(fused[1])
  assert int(stats["skip_steps/num_skipped"]) == 1 and int(stats["skip_steps/step"]) == 5
  assert int(stats["skip_nonfinite/num_skipped"]) == 1


def test_skip_steps_passes_value_to_inner():
  inner = optax.chain(optax.sgd(1.0), og.reduce_on_plateau(patience=0, factor=0.5))
  tx = og.skip_steps(inner, [(1, 2)])
  params = jnp.zeros(1)
  _, state = _run(tx, [jnp.ones(1)] * 4, params, values=[1.0, 0.5, 2.0, 3.0])
  # the value of the skipped call never reached reduce_on_plateau
  _, ref = _run(inner, [jnp.ones(1)] * 3, params, values=[1.0, 2.0, 3.0])
  chex.assert_trees_all_equal(state.inner_state, ref)


def test_skip_steps_counter_survives_an_orbax_checkpoint(tmp_path):
  tx = og.skip_steps(og.skip_on_spike(_inner(), window=8, min_history=4), [(6, 9)])
  grads = [make_grads(i) for i in range(12)]
  full_params, full_state = _run(tx, grads, make_params(), fused=True)
  params, state = _run(tx, grads[:5], make_params(), fused=True)
  tree = {"params": params, "opt_state": state}
  restored = _save_restore(tmp_path, tree, {"params": make_params(),
                                            "opt_state": tx.init(make_params())})
  assert int(restored["opt_state"].step) == 5
  params, state = _run(tx, grads[5:], restored["params"], restored["opt_state"], fused=True)
  chex.assert_trees_all_equal((params, state), (full_params, full_state))
  assert int(state.num_skipped) == 3


@pytest.mark.parametrize("ranges, message", [
    ([(3, 1)], r"skip_steps\(ranges=...\) needs 0 <= start < stop"),
    ([(2, 2)], r"skip_steps\(ranges=...\) needs 0 <= start < stop"),
    ([(-1, 2)], r"skip_steps\(ranges=...\) needs 0 <= start < stop"),
    ([(0, 2**31)], r"skip_steps\(ranges=...\) needs .* <= 2\*\*31 - 1"),
    ("0:5", r"skip_steps\(ranges=...\) must be a sequence of \(start, stop\) pairs"),
    ((1, 3), r"skip_steps\(ranges=...\) must be a sequence of \(start, stop\) pairs"),
    ([(1, 2, 3)], r"skip_steps\(ranges=...\) must be a sequence of \(start, stop\) pairs"),
    ([(0.5, 2)], r"skip_steps\(ranges=...\) must hold ints"),
    ([(True, 2)], r"skip_steps\(ranges=...\) must hold ints"),
    (None, r"skip_steps\(ranges=...\) must be a sequence"),
    (np.array([1, 3]), r"skip_steps\(ranges=...\) must be a sequence of \(start, stop\) pairs"),
    (np.array(3), r"skip_steps\(ranges=...\) must be a sequence of \(start, stop\) pairs"),
])
def test_skip_steps_rejects_invalid_ranges(ranges, message):
  with pytest.raises((TypeError, ValueError), match=message):
    og.skip_steps(optax.sgd(0.1), ranges)


def test_skip_steps_takes_range_objects_as_half_open_ranges():
  """``range(1, 3)`` skips the calls 1 and 2, as ``(1, 3)`` does (not ``1`` alone)."""
  skipped = []
  for ranges in ([range(1, 3), range(5, 6)], [(1, 3), (5, 6)]):
    tx = og.skip_steps(optax.sgd(1.0), ranges)
    state, flags = tx.init(jnp.zeros(1)), []
    for _ in range(7):
      _, state = tx.update(jnp.ones(1), state)
      flags.append(bool(state.last_skipped))
    skipped.append(flags)
  assert skipped[0] == skipped[1] == [False, True, True, False, False, True, False]


@pytest.mark.parametrize("ranges, message", [
    ((1, 3), r"one range is written \[\(1, 3\)\], got \(1, 3\)"),
    (range(45, 50), r"one range is written \[\(45, 50\)\], got range\(45, 50\)"),
    ([range(0, 6, 2)], r"takes ranges of step 1, got range\(0, 6, 2\)"),
    ([range(4, 4)], r"needs 0 <= start < stop"),
])
def test_skip_steps_ranges_messages_say_how_to_write_them(ranges, message):
  with pytest.raises((TypeError, ValueError), match=r"skip_steps\(ranges=\.\.\.\) .*" + message):
    og.skip_steps(optax.sgd(0.1), ranges)


def test_skip_steps_with_its_arguments_swapped_names_inner():
  with pytest.raises(TypeError, match=r"skip_steps\(inner=\.\.\.\) .*got \[\(1, 3\)\]"):
    og.skip_steps([(1, 3)], optax.sgd(0.1))


def test_skip_steps_accepts_numpy_ranges_and_rejects_traced_ones():
  tx = og.skip_steps(optax.sgd(1.0), np.array([[0, 1]]))
  u, _ = tx.update(jnp.ones(1), tx.init(jnp.zeros(1)))
  assert float(u[0]) == 0.0
  injected = optax.inject_hyperparams(og.skip_steps)(optax.sgd(1.0), np.array([[0, 1]]))
  with pytest.raises(TypeError, match=r"skip_steps\(ranges=...\).*static_args=\('ranges',\)"):
    injected.init(jnp.zeros(1))
  injected = optax.inject_hyperparams(og.skip_steps)(optax.sgd(1.0), [(0, 1)])
  u, _ = injected.update(jnp.ones(1), injected.init(jnp.zeros(1)))
  assert float(u[0]) == 0.0


# ---------------------------------------------------------------------------
# add_guard_state / strip_guard_state
# ---------------------------------------------------------------------------


def _spike_guard(inner=None):
  return og.skip_on_spike(inner or _inner(), window=8, min_history=4)


def test_add_guard_state_keeps_the_inner_state_and_starts_the_guard_fresh():
  params = make_params()
  inner = _inner()
  _, inner_state = _run(inner, [make_grads(i) for i in range(3)], params)
  guard = _spike_guard(inner)
  state = og.add_guard_state(guard, inner_state, params)
  fresh = guard.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(fresh)
  chex.assert_trees_all_equal(state.inner_state, inner_state)
  chex.assert_trees_all_equal(state._replace(inner_state=None), fresh._replace(inner_state=None))
  assert og.strip_guard_state(state) is inner_state


def test_add_guard_state_continues_like_the_unguarded_run_and_then_guards():
  """Unguarded for 6 steps, guarded after: same as unguarded until a NaN is skipped."""
  params = make_params()
  grads = [make_grads(i) for i in range(10)]
  grads[8] = jax.tree.map(lambda g: g * jnp.nan, grads[8])
  p6, s6 = _run(_inner(), grads[:6], params)
  guard = og.skip_nonfinite(_inner())
  p8, s8 = _run(guard, grads[6:8], p6, og.add_guard_state(guard, s6, p6), fused=True)
  ref_p8, ref_s8 = _run(_inner(), grads[6:8], p6, s6)
  chex.assert_trees_all_close((p8, s8.inner_state), (ref_p8, ref_s8), rtol=1e-6, atol=1e-7)
  p9, s9 = _run(guard, grads[8:9], p8, s8, fused=True)
  chex.assert_trees_all_equal(p9, p8)
  assert int(s9.num_skipped) == 1


def test_add_guard_state_through_nested_wrappers_and_with_abstract_params():
  params = make_params()
  inner = _inner()
  inner_state = inner.init(params)
  guard = og.skip_steps(
      optax.inject_hyperparams(og.skip_on_spike, static_args=("window", "min_history"))(
          og.skip_nonfinite(inner), window=8, min_history=4),
      [(10, 20)],
  )
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state = og.add_guard_state(guard, inner_state, abstract, step=12)
  assert state.inner_state.inner_state.inner_state.inner_state is inner_state
  assert int(state.step) == 12 and state.step.dtype == jnp.int32
  assert jax.tree.structure(state) == jax.tree.structure(guard.init(params))
  # step 12 is inside (10, 20): the first call is skipped
  _, state = optax.with_extra_args_support(guard).update(make_grads(0), state, params)
  assert bool(state.last_skipped)
  # an already guarded state is returned as it is
  assert og.add_guard_state(guard, state, params) is state


def test_add_guard_state_step_saturates_at_the_counter_limit():
  tx = og.skip_steps(optax.sgd(0.1), [(0, 1)])
  sgd_state = optax.sgd(0.1).init(jnp.zeros(1))
  state = og.add_guard_state(tx, sgd_state, jnp.zeros(1), step=2**40)
  assert int(state.step) == INT32_MAX


def test_add_guard_state_rejects_a_state_of_another_optimizer():
  params = make_params()
  with pytest.raises(ValueError, match=r"add_guard_state\(inner_state=...\) does not match"):
    og.add_guard_state(_spike_guard(optax.adam(1e-3)), optax.sgd(0.1).init(params), params)
  other_shapes = optax.adam(1e-3).init({"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match=r"add_guard_state\(inner_state=...\)"):
    og.add_guard_state(_spike_guard(optax.adam(1e-3)), other_shapes, params)
  with pytest.raises(ValueError, match=r"add_guard_state\(step=...\).*skip_steps"):
    og.add_guard_state(_spike_guard(), _inner().init(params), params, step=3)
  with pytest.raises(ValueError, match=r"add_guard_state\(step=...\)"):
    og.add_guard_state(og.skip_steps(_inner(), []), _inner().init(params), params, step=-1)
  with pytest.raises(TypeError, match=r"add_guard_state\(guard=...\)"):
    og.add_guard_state(optax.adam, _inner().init(params), params)


def test_strip_guard_state_removes_every_guard_level():
  params = make_params()
  tx = og.skip_steps(og.skip_on_spike(og.skip_nonfinite(_inner())), [(1, 2)])
  state = tx.init(params)
  assert og.strip_guard_state(state) is state.inner_state.inner_state.inner_state
  with pytest.raises(TypeError, match=r"strip_guard_state\(state=...\)"):
    og.strip_guard_state(_inner().init(params))


def test_strip_guard_state_round_trips_through_an_orbax_checkpoint(tmp_path):
  """Guarded run -> unguarded checkpoint -> restored -> guard added back."""
  params = make_params()
  guard = _spike_guard()
  grads = [make_grads(i) for i in range(6)]
  p, s = _run(guard, grads, params, fused=True)
  tree = {"params": p, "opt_state": og.strip_guard_state(s)}
  restored = _save_restore(tmp_path, tree, {"params": params, "opt_state": _inner().init(params)})
  chex.assert_trees_all_equal(restored["opt_state"], s.inner_state)
  state = og.add_guard_state(guard, restored["opt_state"], restored["params"])
  chex.assert_trees_all_equal(state.inner_state, s.inner_state)


# ---------------------------------------------------------------------------
# seed_spike_history
# ---------------------------------------------------------------------------


def _reference_tracker(window, old, xs):
  """NumPy: the history buffer and count after recording ``old`` then ``xs``."""
  finite = [float(x) for x in list(old) + list(xs) if np.isfinite(x)]
  kept = np.asarray(finite[-window:], np.float32)
  history = np.zeros(window, np.float32)
  if len(kept):
    history[window - len(kept):] = kept
  return history, len(finite)


@pytest.mark.parametrize("n_old, n_new", [(0, 0), (0, 3), (2, 5), (3, 20), (10, 4)])
def test_seed_spike_history_equals_recording_one_step_at_a_time(n_old, n_new):
  rng = np.random.default_rng(n_old * 100 + n_new)
  window = 8
  old = rng.uniform(1.0, 2.0, n_old).astype(np.float32)
  xs = rng.uniform(1.0, 2.0, n_new).astype(np.float32)
  xs[::4] = np.nan
  if n_new > 2:
    xs[1] = np.inf
  tx = og.skip_on_spike(optax.sgd(0.1), window=window, min_history=4, sigma=1e6)
  state = tx.init(jnp.zeros(1))
  recorded = []
  for x in old:  # a guard that recorded n_old norms already (gradient [x]: norm ~x)
    _, state = tx.update(jnp.array([x]), state)
    # the norm as the backend computed it (sqrt(x * x) is x up to an ulp on a GPU)
    recorded.append(np.float32(state.norm.last))
  seeded = jax.jit(og.seed_spike_history)(state, xs)
  history, count = _reference_tracker(window, np.array(recorded, np.float32), xs)
  np.testing.assert_array_equal(seeded.norm.history, history)
  assert int(seeded.norm.count) == count and seeded.norm.count.dtype == jnp.int32
  if n_new:
    np.testing.assert_array_equal(seeded.norm.last, xs[-1])
  else:
    chex.assert_trees_all_equal(seeded, state)
  # the counters and the inner state are untouched, the value history too
  chex.assert_trees_all_equal(seeded._replace(norm=None), state._replace(norm=None))
  # and it equals the guard's own recording of the same norms
  replay = state
  for x in xs:
    g = jnp.array([x]) if np.isfinite(x) else jnp.array([x], jnp.float32)
    _, replay = tx.update(g, replay)
  np.testing.assert_array_equal(seeded.norm.history, replay.norm.history)
  assert int(seeded.norm.count) == int(replay.norm.count)


def test_seed_spike_history_count_saturates():
  tx = og.skip_on_spike(optax.sgd(0.1), window=4, min_history=2)
  state = tx.init(jnp.zeros(1))
  state = state._replace(norm=state.norm._replace(count=jnp.int32(INT32_MAX - 1)))
  seeded = og.seed_spike_history(state, [1.0, 2.0, 3.0])
  assert int(seeded.norm.count) == INT32_MAX


def test_seed_spike_history_seeds_values_and_finds_the_guard_anywhere():
  tx = optax.chain(og.monitor(), og.skip_on_spike(optax.sgd(0.1), window=4, min_history=2))
  state = tx.init(jnp.zeros(1))
  seeded = og.seed_spike_history(state, [1.0, 1.1], values=[3.0, 2.5, 2.0])
  f32 = partial(np.array, dtype=np.float32)
  np.testing.assert_array_equal(seeded[1].norm.history, f32([0, 0, 1.0, 1.1]))
  np.testing.assert_array_equal(seeded[1].value.history, f32([0, 3.0, 2.5, 2.0]))
  assert int(seeded[1].value.count) == 3


def test_seed_spike_history_rejects_bad_input():
  spike = og.skip_on_spike(optax.sgd(0.1), window=4, min_history=2)
  state = spike.init(jnp.zeros(1))
  with pytest.raises(ValueError, match=r"seed_spike_history\(state=...\).*found 0"):
    og.seed_spike_history(optax.sgd(0.1).init(jnp.zeros(1)), [1.0])
  two = optax.chain(spike, spike).init(jnp.zeros(1))
  with pytest.raises(ValueError, match=r"seed_spike_history\(state=...\).*found 2"):
    og.seed_spike_history(two, [1.0])
  with pytest.raises(ValueError, match=r"seed_spike_history\(norms=...\) must be 1-D"):
    og.seed_spike_history(state, [[1.0, 2.0]])
  with pytest.raises(TypeError, match=r"seed_spike_history\(norms=...\)"):
    og.seed_spike_history(state, "1.0")
  with pytest.raises(TypeError, match=r"seed_spike_history\(values=...\)"):
    og.seed_spike_history(state, [1.0], values=[True, False])


def test_seed_spike_history_rejects_negative_norms_and_skips_non_finite_ones():
  tx = og.skip_on_spike(optax.sgd(0.1), window=4, min_history=2)
  state = tx.init(jnp.zeros(1))
  for norms in ([1.0, -0.5], np.array([2.0, -1e-8]), jnp.array([-3.0])):
    with pytest.raises(ValueError, match=r"seed_spike_history\(norms=\.\.\.\) must hold "
                                         r"norms >= 0 \(NaN and inf are not recorded\)"):
      og.seed_spike_history(state, norms)
  # NaN and +-inf are not recorded (as the guard does not record them); losses may be negative
  seeded = og.seed_spike_history(state, [1.0, np.nan, -np.inf, np.inf, 2.0], values=[-1.5, 0.5])
  np.testing.assert_array_equal(seeded.norm.history, np.float32([0, 0, 1.0, 2.0]))
  assert int(seeded.norm.count) == 2 and float(seeded.value.history[-2]) == -1.5
  # under jit the values are not known: only shapes and dtypes are checked
  traced = jax.jit(og.seed_spike_history)(state, jnp.array([1.0, -2.0]))
  assert int(traced.norm.count) == 2


def test_seed_spike_history_counts_a_nested_spike_guard():
  """A skip_on_spike inside another's inner_state is a second one: which to seed is ambiguous."""
  inner = og.skip_on_spike(optax.sgd(0.1), window=4, min_history=2)
  state = og.skip_on_spike(inner, window=4, min_history=2).init(jnp.zeros(1))
  with pytest.raises(ValueError, match=r"found 2 \(a skip_on_spike inside another's "
                                       r"inner_state counts too\)"):
    og.seed_spike_history(state, [1.0])
  # the suggested way: seed the one meant
  seeded = state._replace(inner_state=og.seed_spike_history(state.inner_state, [1.0, 1.2]))
  assert int(seeded.inner_state.norm.count) == 2 and int(seeded.norm.count) == 0
  with pytest.raises(ValueError, match=r"found 0: pass the optimizer state"):
    og.seed_spike_history(inner, [1.0])


def test_add_guard_state_checks_params_before_matching_the_inner_state():
  """``params=None`` used to be reported as an ``inner_state`` that does not match."""
  guard = og.skip_on_spike(optax.adam(1e-3))
  inner_state = optax.adam(1e-3).init(jnp.zeros(3))
  with pytest.raises(TypeError, match=r"add_guard_state\(params=\.\.\.\) must be a tree of "
                                      r"arrays \(or jax\.ShapeDtypeStruct\), got None"):
    og.add_guard_state(guard, inner_state, None)
  with pytest.raises(TypeError, match=r"add_guard_state\(params=\.\.\.\).*the leaf \[0\] is 'w'"):
    og.add_guard_state(guard, inner_state, ["w"])
  # Python numbers and abstract shapes are fine
  state = og.add_guard_state(guard, inner_state, jax.ShapeDtypeStruct((3,), jnp.float32))
  assert state.inner_state is inner_state


def test_add_guard_state_with_flax_nnx_variables_says_to_pass_arrays():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  guard = og.skip_on_spike(optax.adam(1e-3))
  params = nnx.state(model, nnx.Param)
  for inner_state, p, arg in ((nnx.as_pure(optimizer.opt_state), params, "params"),
                              (optimizer.opt_state, nnx.as_pure(params), "inner_state")):
    with pytest.raises(TypeError) as info:
      og.add_guard_state(guard, inner_state, p)
    message = str(info.value)
    assert message.startswith(f"add_guard_state({arg}=...) holds variables")
    assert "nnx.as_pure" in message and len(message) < 300  # not a dump of tree structures
  state = og.add_guard_state(guard, nnx.as_pure(optimizer.opt_state), nnx.as_pure(params))
  assert int(state.num_skipped) == 0


def test_add_guard_state_and_seeded_history_with_orbax(tmp_path):
  """The restart recipe: an unguarded checkpoint, a guard added, its history seeded.

  The seeded guard catches a spike at the first step after the restart; a
  guard with an empty history would test spikes only after ``min_history``
  steps and let it through.
  """
  params = make_params()
  inner = _inner()
  logging = optax.chain(og.monitor(), inner)  # logs the raw gradient norms
  grads = [make_grads(i) for i in range(12)]
  step = jax.jit(lambda p, s, g: og.update_and_apply(logging, g, s, p))
  p, s, norms = params, logging.init(params), []
  for g in grads[:8]:
    p, s = step(p, s, g)
    norms.append(og.guard_stats(s)["monitor/global_norm"])
  restored = _save_restore(tmp_path, {"params": p, "opt_state": s[1]},
                           {"params": params, "opt_state": inner.init(params)})
  guard = og.skip_on_spike(inner, window=8, min_history=8)
  state = og.add_guard_state(guard, restored["opt_state"], restored["params"])
  seeded = og.seed_spike_history(state, jnp.stack(norms))
  spike = jax.tree.map(lambda x: 1e3 * x, grads[8])
  p_seeded, s_seeded = _run(guard, [spike], restored["params"], seeded, fused=True)
  assert bool(s_seeded.last_skipped)
  chex.assert_trees_all_equal(p_seeded, restored["params"])
  _, s_fresh = _run(guard, [spike], restored["params"], state, fused=True)
  assert not bool(s_fresh.last_skipped)
  # without a spike, the guarded continuation is the unguarded one
  p_next, s_next = _run(guard, grads[8:12], restored["params"], seeded, fused=True)
  ref_p, ref_s = _run(inner, grads[8:12], p, s[1])
  chex.assert_trees_all_close((p_next, s_next.inner_state), (ref_p, ref_s), rtol=1e-6, atol=1e-7)
  assert int(s_next.num_skipped) == 0


def test_skip_steps_replays_past_a_spike_after_a_restart(tmp_path):
  """Restore a checkpoint written before a spike and skip the steps around it."""
  params = make_params()
  grads = [make_grads(i) for i in range(12)]
  grads[7] = jax.tree.map(lambda x: 1e4 * x, grads[7])  # the batch behind the spike
  inner = _inner()
  p5, s5 = _run(inner, grads[:5], params)  # the run had no skip_steps: checkpoint at 5
  restored = _save_restore(tmp_path, {"params": p5, "opt_state": s5},
                           {"params": params, "opt_state": inner.init(params)})
  replay = og.skip_steps(inner, [(6, 9)])
  state = og.add_guard_state(replay, restored["opt_state"], restored["params"], step=5)
  p, s = _run(replay, grads[5:], restored["params"], state, fused=True)
  ref_p, ref_s = _run(inner, [grads[i] for i in (5, 9, 10, 11)], p5, s5)
  chex.assert_trees_all_close((p, s.inner_state), (ref_p, ref_s), rtol=1e-6, atol=1e-7)
  assert int(s.step) == 12 and int(s.num_skipped) == 3


def test_skip_steps_fused_step_under_jit_with_donation():
  tx = og.skip_steps(og.skip_nonfinite(_inner()), [(1, 3)])
  step = jax.jit(partial(og.update_and_apply, tx), donate_argnums=(1, 2))
  params = make_params()
  state = tx.init(params)
  for i in range(4):
    params, state = step(make_grads(i), state, params)
  assert int(state.step) == 4 and int(state.num_skipped) == 2


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_skip_steps_under_shard_map_matches_one_device(devices, fused):
  mesh = Mesh(np.array(devices), ("d",))
  params = {"w": jnp.arange(16.0).reshape(8, 2)}
  grads = [{"w": jnp.full((8, 2), float(i + 1))} for i in range(5)]
  grads[3] = {"w": grads[3]["w"].at[5, 1].set(jnp.nan)}  # on one device only

  def make(axis_name):
    return og.skip_steps(og.skip_nonfinite(optax.sgd(0.1), axis_name=axis_name), [(1, 2)])

  ref_params, ref_state = _run(make(None), grads, params, fused=fused)
  tx = make("d")

  def step(params, state, g):
    if fused:
      return og.update_and_apply(tx, g, state, params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("d"), P(), P("d")),
                                  out_specs=(P("d"), P())))
  p, s = params, tx.init(params)
  for g in grads:
    p, s = sharded(p, s, g)
  chex.assert_trees_all_close(p, ref_params, rtol=1e-6)
  chex.assert_trees_all_equal(s, ref_state)
  assert int(s.num_skipped) == 1 and int(s.inner_state.num_skipped) == 1
