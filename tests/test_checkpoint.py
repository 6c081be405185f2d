"""Checkpointing: every state round-trips, and a restored run continues bitwise."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import make_grads, make_params
from flax import serialization

import optax_guard as og


def _grads(i):
  """Gradients with a NaN at step 5 and a x50 spike at step 7."""
  g = make_grads(i, scale=50.0 if i == 7 else 1.0)
  if i == 5:
    g["dense"]["bias"] = g["dense"]["bias"].at[0].set(jnp.nan)
  return g


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


FACTORIES = {
    "skip_nonfinite": lambda: og.skip_nonfinite(optax.adam(1e-2)),
    "skip_on_spike": lambda: og.skip_on_spike(optax.adam(1e-2), window=8, min_history=4),
    "monitor": lambda: og.monitor(),
    "monitor/per_leaf": lambda: og.monitor(per_leaf=True),
    "recipe": _recipe,
    "inject_hyperparams": lambda: optax.inject_hyperparams(og.skip_on_spike)(
        optax.chain(og.monitor(), optax.sgd(0.1)), window=8, min_history=4
    ),
    "autoclip": lambda: og.autoclip(50.0, history_size=8),
    "zclip": lambda: og.zclip(warmup_steps=3),
    "reduce_on_plateau": lambda: og.reduce_on_plateau(patience=2),
}


def _make(name):
  return optax.with_extra_args_support(FACTORIES[name]())


def _step_fn(tx):
  @jax.jit
  def step(params, state, i):
    u, state = tx.update(_grads_traced(i), state, params, value=_value_traced(i))
    return optax.apply_updates(params, u), state

  return step


_GRADS = jax.tree.map(lambda *xs: jnp.stack(xs), *[_grads(i) for i in range(16)])
_VALUES = jnp.stack([_value(i) for i in range(16)])


def _grads_traced(i):
  return jax.tree.map(lambda x: x[i], _GRADS)


def _value_traced(i):
  return _VALUES[i]


def _run(tx, step, params, state, start, stop):
  for i in range(start, stop):
    params, state = step(params, state, jnp.int32(i))
  return params, state


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_checkpoint_state_round_trips_through_flax_serialization(name):
  tx = _make(name)
  params = make_params()
  _, state = _run(tx, _step_fn(tx), params, tx.init(params), 0, 9)
  blob = serialization.to_bytes(state)
  restored = serialization.from_bytes(tx.init(params), blob)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_dtypes(restored, state)
  # the state holds only arrays (no Python scalars that a checkpoint would drop)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name", ["recipe", "skip_nonfinite"])
def test_checkpoint_restored_run_continues_bitwise(name):
  tx = _make(name)
  step = _step_fn(tx)
  params = make_params()
  full_p, full_s = _run(tx, step, params, tx.init(params), 0, 16)
  half_p, half_s = _run(tx, step, params, tx.init(params), 0, 8)
  blob = serialization.to_bytes({"params": half_p, "opt_state": half_s})
  del half_p, half_s
  template = {"params": make_params(), "opt_state": tx.init(make_params())}
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
  params = make_params()
  p8, s8 = _run(tx, step, params, tx.init(params), 0, 8)
  tree = {"params": p8, "opt_state": s8}
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
  )
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "standard", tree)
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / "standard", abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(tree)
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
