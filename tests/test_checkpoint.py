"""Checkpointing: every state round-trips, and a restored run continues bitwise."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import optax_guard as og


def _params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jnp.zeros(3)},
          "scale": jax.random.normal(k2, ())}


def _grads(i):
  """Gradients with a NaN at step 5 and a x50 spike at step 7."""
  leaves, treedef = jax.tree_util.tree_flatten(_params())
  keys = jax.random.split(jax.random.PRNGKey(100 + i), len(leaves))
  g = [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
  if i == 5:
    g[0] = g[0].at[0].set(jnp.nan)
  if i == 7:
    g = [50.0 * x for x in g]
  return jax.tree_util.tree_unflatten(treedef, g)


def _value(i):
  return jnp.float32(2.0 + np.sin(i) + (8.0 if i == 11 else 0.0))


def _recipe():
  """The README recipe: monitor raw gradients, skip spikes, ZClip, AdamW."""
  lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20)
  return optax.chain(
      og.monitor(per_leaf=True),
      og.skip_on_spike(
          optax.chain(og.zclip(warmup_steps=3), optax.adamw(lr, weight_decay=0.1),
                      og.reduce_on_plateau(patience=2, factor=0.5)),
          window=8, min_history=4,
      ),
  )


def _factories():
  out = {
      "skip_nonfinite": lambda: og.skip_nonfinite(optax.adam(1e-2)),
      "skip_on_spike": lambda: og.skip_on_spike(optax.adam(1e-2), window=8, min_history=4),
      "monitor": lambda: og.monitor(),
      "monitor/per_leaf": lambda: og.monitor(per_leaf=True),
      "recipe": _recipe,
      "inject_hyperparams": lambda: optax.inject_hyperparams(og.skip_on_spike)(
          optax.chain(og.monitor(), optax.sgd(0.1)), window=8, min_history=4
      ),
  }
  adaptive = {
      "autoclip": lambda: og.autoclip(50.0, history_size=8),
      "zclip": lambda: og.zclip(warmup_steps=3),
      "reduce_on_plateau": lambda: og.reduce_on_plateau(patience=2),
  }
  for name, make in adaptive.items():
    out[name] = make if hasattr(og, name) else None
  return out


FACTORIES = _factories()


def _make(name):
  make = FACTORIES[name]
  if make is None:
    pytest.skip(f"og.{name} is not exported yet")
  return optax.with_extra_args_support(make())


def _step_fn(tx):
  @jax.jit
  def step(params, state, i):
    u, state = tx.update(_grads_traced(i), state, params, value=_value_traced(i))
    return optax.apply_updates(params, u), state

  return step


_GRADS = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[_grads(i) for i in range(16)])
_VALUES = jnp.stack([_value(i) for i in range(16)])


def _grads_traced(i):
  return jax.tree_util.tree_map(lambda x: x[i], _GRADS)


def _value_traced(i):
  return _VALUES[i]


def _run(tx, step, params, state, start, stop):
  for i in range(start, stop):
    params, state = step(params, state, jnp.int32(i))
  return params, state


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_checkpoint_state_round_trips_through_flax_serialization(name):
  tx = _make(name)
  params = _params()
  _, state = _run(tx, _step_fn(tx), params, tx.init(params), 0, 9)
  blob = serialization.to_bytes(state)
  restored = serialization.from_bytes(tx.init(params), blob)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_dtypes(restored, state)
  # the state holds only arrays (no Python scalars that a checkpoint would drop)
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(state))


@pytest.mark.parametrize("name", ["recipe", "skip_nonfinite"])
def test_checkpoint_restored_run_continues_bitwise(name):
  tx = _make(name)
  step = _step_fn(tx)
  params = _params()
  full_p, full_s = _run(tx, step, params, tx.init(params), 0, 16)
  half_p, half_s = _run(tx, step, params, tx.init(params), 0, 8)
  blob = serialization.to_bytes({"params": half_p, "opt_state": half_s})
  del half_p, half_s
  template = {"params": _params(), "opt_state": tx.init(_params())}
  restored = serialization.from_bytes(template, blob)
  p, s = _run(tx, step, restored["params"], restored["opt_state"], 8, 16)
  chex.assert_trees_all_equal(p, full_p)
  chex.assert_trees_all_equal(s, full_s)
  # the run did take both branches of the guards
  stats = og.guard_stats(full_s)
  skipped = [k for k in stats if k.endswith("/num_skipped")]
  assert skipped and all(int(stats[k]) >= 1 for k in skipped)


def test_checkpoint_orbax_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = _make("recipe")
  step = _step_fn(tx)
  params = _params()
  p8, s8 = _run(tx, step, params, tx.init(params), 0, 8)
  tree = {"params": p8, "opt_state": s8}
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
  )
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "standard", tree)
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "standard", abstract)
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(tree)
  chex.assert_trees_all_equal(restored, tree)
  chex.assert_trees_all_equal_dtypes(restored, tree)
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(tmp_path / "pytree", tree)
  restored = ckptr.restore(
      tmp_path / "pytree",
      args=ocp.args.PyTreeRestore(
          item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree)
      ),
  )
  chex.assert_trees_all_equal(restored, tree)
  # and the restored run continues exactly like the uninterrupted one
  full_p, full_s = _run(tx, step, params, tx.init(params), 0, 16)
  p, s = _run(tx, step, restored["params"], restored["opt_state"], 8, 16)
  chex.assert_trees_all_equal((p, s), (full_p, full_s))
