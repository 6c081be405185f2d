"""Tests of monitor() and guard_stats()."""

from __future__ import annotations

import collections
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import make_grads, make_params
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import optax_guard as og

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ---------------------------------------------------------------------------
# monitor
# ---------------------------------------------------------------------------


@st.composite
def _trees(draw):
  dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
  n = draw(st.integers(0, 4))
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  tree = {}
  for i in range(n):
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    x = rng.standard_normal(shape) * draw(st.sampled_from([0.0, 1e-3, 1.0, 300.0]))
    if x.size and draw(st.booleans()):
      flat = x.reshape(-1)
      for _ in range(draw(st.integers(1, 3))):
        flat[rng.integers(flat.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    tree[f"leaf{i}"] = jnp.asarray(x, dtype)
  return tree


def _numpy_stats(tree):
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  flat = np.concatenate([x.reshape(-1) for x in leaves]) if leaves else np.zeros(0)
  with np.errstate(invalid="ignore", over="ignore"):
    norm = np.sqrt(np.sum(flat**2))
    max_abs = np.max(np.abs(flat), initial=0.0) if not np.isnan(flat).any() else np.nan
  return norm, max_abs, int(np.sum(~np.isfinite(flat)))


@settings(max_examples=15)
@given(tree=_trees())
def test_monitor_statistics_match_numpy(tree):
  tx = og.monitor(per_leaf=True)
  out, s = jax.jit(tx.update)(tree, tx.init(tree))
  chex.assert_trees_all_equal(out, tree)  # identity, bitwise (NaN == NaN here)
  norm, max_abs, bad = _numpy_stats(tree)
  np.testing.assert_allclose(s.global_norm, norm, rtol=1e-5)
  np.testing.assert_allclose(s.max_abs, max_abs, rtol=0)
  assert int(s.num_nonfinite) == bad
  assert s.global_norm.dtype == s.max_abs.dtype == jnp.float32
  assert s.num_nonfinite.dtype == jnp.int32
  for name, x in tree.items():
    np.testing.assert_allclose(s.leaf_norms[name], _numpy_stats({name: x})[0], rtol=1e-5)


def test_monitor_float16_norm_does_not_overflow():
  g = {"w": jnp.full((50257, 16), 0.1, jnp.float16)}
  _, s = og.monitor().update(g, og.monitor().init(g))
  np.testing.assert_allclose(s.global_norm, 0.1 * math.sqrt(50257 * 16), rtol=1e-3)
  assert int(s.num_nonfinite) == 0


def test_monitor_nonfinite_steps_counts_every_step_with_a_nonfinite_element():
  """A logger reading every N steps misses no bad step: the running total beside
  ``num_nonfinite`` counts steps, not elements."""
  tx = og.monitor()
  g = {"w": jnp.ones(4)}
  state = tx.init(g)
  step = jax.jit(tx.update)
  bad_elements = [0, 2, 0, 0, 4, 1, 0]
  totals = []
  for n in bad_elements:
    x = g["w"].at[:n].set(jnp.nan) if n else g["w"]
    _, state = step({"w": x}, state)
    assert int(state.num_nonfinite) == n
    totals.append(int(og.guard_stats(state)["monitor/nonfinite_steps"]))
  assert totals == np.cumsum([n > 0 for n in bad_elements]).tolist()
  _, state = step({"w": jnp.full(4, jnp.inf)}, state._replace(nonfinite_steps=jnp.int32(2**31 - 1)))
  assert int(state.nonfinite_steps) == 2**31 - 1 and state.nonfinite_steps.dtype == jnp.int32


def test_monitor_without_per_leaf_holds_no_leaf_norms():
  tx = og.monitor()
  s = tx.init(make_params())
  assert s.leaf_norms is None
  _, s = tx.update(make_grads(0), s)
  assert s.leaf_norms is None and float(s.global_norm) > 0


def test_monitor_inside_a_chain_sees_raw_and_clipped_gradients():
  tx = optax.chain(og.monitor(), og.clip_by_global_norm(1.0), og.monitor(), optax.sgd(0.1))
  g = make_grads(0, 10.0)
  _, s = tx.update(g, tx.init(make_params()))
  stats = og.guard_stats(s)
  np.testing.assert_allclose(stats["monitor_1/global_norm"], optax.tree.norm(g), rtol=1e-6)
  np.testing.assert_allclose(stats["monitor_2/global_norm"], 1.0, rtol=1e-6)


def test_monitor_shard_map_state_matches_single_device(devices):
  g = {"a": jax.random.normal(jax.random.PRNGKey(1), (16, 3)),
       "b": jnp.arange(8.0).at[6].set(-jnp.inf)}
  tx_one = og.monitor(per_leaf=True)
  _, ref = tx_one.update(g, tx_one.init(g))
  tx = og.monitor(per_leaf=True, axis_name="d")

  def run(g):
    return tx.update(g, tx.init(g))[1]

  mesh = Mesh(np.array(devices), ("d",))
  out = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=P("d"), out_specs=P()))(g)
  chex.assert_trees_all_close(out, ref, rtol=1e-6)
  assert int(out.num_nonfinite) == 1 and float(out.max_abs) == math.inf
  shards = jax.tree.map(lambda x: x.reshape(8, -1, *x.shape[1:]), g)
  out = jax.pmap(run, axis_name="d")(shards)
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[3], out), ref, rtol=1e-6)


# ---------------------------------------------------------------------------
# guard_stats
# ---------------------------------------------------------------------------


def _run(tx, steps=4, params=None, jit=True):
  params = make_params() if params is None else params
  tx = optax.with_extra_args_support(tx)
  s = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for i in range(steps):
    _, s = update(make_grads(i, 30.0 if i == 3 else 1.0), s, params, value=jnp.float32(3 - i))
  return s


def _zclip():
  return og.zclip(warmup_steps=2)


def test_guard_stats_finds_states_in_chain_and_wrappers():
  tx = og.skip_on_spike(
      optax.chain(og.monitor(), _zclip(), og.autoclip(50.0, history_size=4), optax.adam(1e-3),
                  og.reduce_on_plateau(patience=1)),
      window=4, min_history=2,
  )
  s = _run(tx)
  stats = og.guard_stats(s)
  spike = [f"skip_on_spike/{f}" for f in (
      "num_skipped", "consecutive_skipped", "last_skipped", "norm/count", "norm/last",
      "norm/threshold", "value/count", "value/last", "value/threshold")]
  expected = (
      spike
      + ["monitor/global_norm", "monitor/max_abs", "monitor/num_nonfinite",
         "monitor/nonfinite_steps"]
      + [f"zclip/{f}" for f in og.ZClipState._fields]
      + ["autoclip/count", "autoclip/norm", "autoclip/threshold"]
      + [f"reduce_on_plateau/{f}" for f in og.ReduceOnPlateauState._fields]
  )
  assert list(stats) == expected  # walk order: wrapper first, then the chain in order
  assert not any("history" in k for k in stats)
  assert int(stats["skip_on_spike/num_skipped"]) == int(s.num_skipped) == 1
  inner = s.inner_state
  np.testing.assert_array_equal(stats["zclip/threshold"], inner[1].threshold)
  np.testing.assert_array_equal(stats["reduce_on_plateau/scale"], inner[4].scale)
  # the monitor sits inside the guard: the skipped step 3 left it at step 2's norm
  np.testing.assert_allclose(stats["monitor/global_norm"], optax.tree.norm(make_grads(2)),
                             rtol=1e-6)
  np.testing.assert_allclose(stats["skip_on_spike/norm/last"], optax.tree.norm(make_grads(3, 30.0)),
                             rtol=1e-6)
  assert all(v.shape == () for v in stats.values())


def test_guard_stats_suffixes_repeated_kinds_in_walk_order():
  tx = optax.chain(og.monitor(), _zclip(), og.monitor(), _zclip(), og.skip_nonfinite(og.monitor()))
  s = _run(tx)
  stats = og.guard_stats(s)
  kinds = list(dict.fromkeys(k.split("/")[0] for k in stats))
  assert kinds == ["monitor_1", "zclip_1", "monitor_2", "zclip_2", "skip_nonfinite", "monitor_3"]
  for name, state in [("monitor_1", s[0]), ("zclip_1", s[1]), ("monitor_2", s[2]),
                      ("zclip_2", s[3]), ("monitor_3", s[4].inner_state)]:
    for field in state._fields:
      if f"{name}/{field}" in stats:
        np.testing.assert_array_equal(stats[f"{name}/{field}"], getattr(state, field))
  # the suffixes follow the chain: zclip_1 clipped the x30 spike monitor_1 saw
  assert float(stats["monitor_2/global_norm"]) < float(stats["monitor_1/global_norm"])


def test_guard_stats_inject_hyperparams_reports_hyperparams():
  tx = optax.chain(
      optax.inject_hyperparams(og.clip_by_global_norm)(max_norm=0.5),
      optax.inject_hyperparams(og.skip_on_spike)(
          optax.chain(og.monitor(), optax.inject_hyperparams(optax.adam)(
              learning_rate=optax.linear_schedule(1e-3, 0.0, 10))),
          window=4, min_history=2,
      ),
  )
  s = _run(tx)
  stats = og.guard_stats(s)
  assert float(stats["hyperparams_1/max_norm"]) == 0.5
  assert float(stats["hyperparams_2/sigma"]) == 6.0 and int(stats["hyperparams_2/window"]) == 4
  # the clip before the guard removes the x30 spike: 4 applied steps, lr = schedule(3)
  assert int(stats["skip_on_spike/num_skipped"]) == 0
  np.testing.assert_allclose(stats["hyperparams_3/learning_rate"], 1e-3 * 0.7, rtol=1e-5)
  assert "skip_on_spike/num_skipped" in stats and "monitor/global_norm" in stats
  # the walk order: outer inject, the wrapper, then what it wraps
  kinds = list(dict.fromkeys(k.split("/")[0] for k in stats))
  assert kinds == ["hyperparams_1", "hyperparams_2", "skip_on_spike", "monitor", "hyperparams_3"]


def test_guard_stats_multi_transform_masked_and_multisteps():
  params = make_params()
  labels = {"dense": {"kernel": "a", "bias": "b"}, "scale": "b"}
  tx = optax.chain(
      optax.multi_transform({"a": optax.chain(_zclip(), optax.sgd(0.1)),
                             "b": og.skip_nonfinite(optax.chain(og.monitor(), optax.sgd(0.1)))},
                            labels),
      optax.masked(og.monitor(per_leaf=True), {"dense": {"kernel": True, "bias": False},
                                               "scale": True}),
  )
  ms = optax.MultiSteps(tx, every_k_schedule=2)
  s = _run(ms, params=params)
  stats = og.guard_stats(s)
  kinds = list(dict.fromkeys(k.split("/")[0] for k in stats))
  assert kinds == ["zclip", "skip_nonfinite", "monitor_1", "monitor_2"]
  assert sorted(k for k in stats if "leaf_norms" in k) == [
      "monitor_2/leaf_norms/dense/kernel", "monitor_2/leaf_norms/scale"]
  inner = s.inner_opt_state[0].inner_states["b"].inner_state
  np.testing.assert_array_equal(stats["skip_nonfinite/num_skipped"], inner.num_skipped)
  # MultiSteps applied the inner step twice in 4 mini-steps
  assert int(s.inner_opt_state[0].inner_states["a"].inner_state[0].count) == 2


def test_guard_stats_is_jit_safe():
  tx = og.skip_on_spike(optax.chain(og.monitor(per_leaf=True), _zclip(), optax.sgd(0.1)),
                        window=4, min_history=2)
  params = make_params()
  traces = []

  @jax.jit
  def step(s, g, value):
    traces.append(1)
    _, s = tx.update(g, s, params, value=value)
    return s, og.guard_stats(s)

  s = tx.init(params)
  for i in range(4):
    s, stats = step(s, make_grads(i, 30.0 if i == 3 else 1.0), jnp.float32(1.0))
  assert len(traces) == 1
  eager = og.guard_stats(s)
  assert sorted(stats) == sorted(eager)  # jit returns dicts with sorted keys
  chex.assert_trees_all_equal(stats, eager)
  assert bool(stats["skip_on_spike/last_skipped"])
  assert jax.jit(og.guard_stats)(s).keys() == eager.keys()


def test_guard_stats_ignores_foreign_states_and_walks_through_them():
  assert og.guard_stats(optax.adam(1e-3).init(make_params())) == {}
  assert og.guard_stats(None) == {} and og.guard_stats(()) == {}
  # a user's own state container is walked through, its own fields are not reported
  TrainState = collections.namedtuple("TrainState", ["step", "opt_state"])
  tx = optax.chain(og.monitor(), optax.adam(1e-3))
  _, opt_state = tx.update(make_grads(0), tx.init(make_params()), make_params())
  stats = og.guard_stats({"train": TrainState(jnp.int32(7), opt_state)})
  assert list(stats) == ["monitor/global_norm", "monitor/max_abs", "monitor/num_nonfinite",
                         "monitor/nonfinite_steps"]
  np.testing.assert_allclose(stats["monitor/global_norm"], optax.tree.norm(make_grads(0)),
                             rtol=1e-6)


def test_guard_stats_logging_recipe_runs_under_scan():
  """The README recipe: collect stats each step inside lax.scan."""
  tx = og.skip_on_spike(optax.chain(og.monitor(), _zclip(), optax.adamw(1e-3)),
                        window=8, min_history=4)
  params = make_params()

  def step(carry, i):
    p, s = carry
    g = make_grads(0, 1.0 + (i == 9) * 100.0)
    u, s = tx.update(g, s, p, value=jnp.float32(1.0))
    return (optax.apply_updates(p, u), s), og.guard_stats(s)

  _, logs = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(12))
  assert logs["skip_on_spike/last_skipped"].shape == (12,)
  assert np.flatnonzero(np.asarray(logs["skip_on_spike/last_skipped"])).tolist() == [9]
  np.testing.assert_array_equal(logs["skip_on_spike/num_skipped"], np.arange(12) >= 9)


def test_guard_stats_reads_a_flax_nnx_optimizer_state():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  tx = optax.chain(og.monitor(per_leaf=True),
                   og.skip_on_spike(optax.adam(1e-3), window=4, min_history=2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, scale):
    loss, grads = nnx.value_and_grad(lambda m: scale * jnp.sum(m(jnp.ones((1, 3))) ** 2))(model)
    optimizer.update(model, grads, value=loss)
    return og.guard_stats(optimizer.opt_state)

  for i in range(4):
    stats = step(model, optimizer, jnp.float32(1e4 if i == 3 else 1.0))
  assert {"monitor/global_norm", "monitor/leaf_norms/kernel", "monitor/leaf_norms/bias",
          "skip_on_spike/num_skipped", "skip_on_spike/value/last"} <= set(stats)
  assert not any(k.endswith("/value/value") or "history" in k for k in stats)
  assert int(stats["skip_on_spike/num_skipped"]) == 1
