"""Cross-device correctness: pmap, jit(shard_map) and jit on sharded arrays.

For every factory that takes ``axis_name``, a multi-step run where each of the 8
simulated devices holds a different shard of the updates (split along the
first axis of every leaf) must equal the single-device run on the whole tree;
and plain ``jit`` on ``NamedSharding`` inputs with ``axis_name=None`` must
equal it too (the global norm is already global there).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import scan_steps
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_guard as og

NDEV = 8
STEPS = 6


@dataclasses.dataclass(frozen=True)
class Dist:
  """``make(axis_name)`` builds the transformation to compare."""

  make: Callable[[Any], optax.GradientTransformation]
  steps: int = STEPS


# ---------------------------------------------------------------------------
# The registry: every public factory with an ``axis_name`` argument (one block
# per module). Leaves are sharded along their first axis, which every
# transformation here reduces over.
# ---------------------------------------------------------------------------
DIST: dict[str, Dist] = {
    # --- _clipping.py ---
    "clip_by_norm": Dist(lambda a: og.clip_by_norm(0.5, axis_name=a)),
    "clip_by_norm/ord=1": Dist(lambda a: og.clip_by_norm(0.5, ord=1, axis_name=a)),
    "clip_by_global_norm": Dist(lambda a: og.clip_by_global_norm(0.5, axis_name=a)),
    "clip_by_global_norm/ord=inf": Dist(
        lambda a: og.clip_by_global_norm(0.5, ord="inf", axis_name=a)
    ),
    "clip_by_global_norm/in-chain": Dist(
        lambda a: optax.chain(og.clip_by_global_norm(0.5, axis_name=a), optax.adam(0.1))
    ),
    "clip_by_axis_norm": Dist(lambda a: og.clip_by_axis_norm(0.3, axis_name=a)),
    # --- _adagc.py ---
    "adagc": Dist(lambda a: og.adagc(warmup_steps=2, axis_name=a)),
    "adagc/in-chain": Dist(
        lambda a: optax.chain(og.adagc(warmup_steps=3, lambda_rel=1.1, axis_name=a),
                              optax.adam(0.1))
    ),
    # --- _adaptive.py ---
    "autoclip": Dist(lambda a: og.autoclip(50.0, history_size=4, axis_name=a)),
    "zclip": Dist(lambda a: og.zclip(warmup_steps=2, axis_name=a)),
    "zclip/max_norm-in-chain": Dist(
        lambda a: optax.chain(og.zclip(warmup_steps=2, max_norm=30.0, axis_name=a),
                              optax.adam(0.1))
    ),
    # --- _guards.py ---
    "skip_nonfinite": Dist(
        lambda a: og.skip_nonfinite(
            optax.chain(og.clip_by_global_norm(0.5, axis_name=a), optax.adam(0.1)),
            axis_name=a)
    ),
    "skip_on_spike": Dist(
        lambda a: og.skip_on_spike(
            optax.chain(og.clip_by_global_norm(0.5, axis_name=a), optax.adam(0.1)),
            window=4, min_history=2, axis_name=a)
    ),
    "dynamic_loss_scale": Dist(
        lambda a: og.dynamic_loss_scale(
            optax.chain(og.clip_by_global_norm(0.5, axis_name=a), optax.adam(0.1)),
            init_scale=2.0**-4, growth_interval=2, axis_name=a)
    ),
    # --- _feedback.py ---
    "scale_by_grad_norm": Dist(lambda a: og.scale_by_grad_norm(lambda n: 1.0 / (1.0 + n),
                                                               axis_name=a)),
    "scale_by_grad_norm/with-plateau": Dist(
        lambda a: optax.chain(og.scale_by_grad_norm(lambda n: 1.0 / (1.0 + n), axis_name=a),
                              og.reduce_on_plateau(patience=0, factor=0.5))
    ),
    # --- _stable.py ---
    "scale_by_stable_adam": Dist(lambda a: og.scale_by_stable_adam(axis_name=a)),
    "stable_adamw": Dist(lambda a: og.stable_adamw(0.1, weight_decay=0.1, axis_name=a)),
    # --- _historical.py ---
    "clip_by_historical_norm": Dist(
        lambda a: og.clip_by_historical_norm(1.0, window=4, min_history=2, axis_name=a)
    ),
    # --- _monitor.py ---
    "monitor": Dist(
        lambda a: optax.chain(og.monitor(per_leaf=True, axis_name=a),
                              og.clip_by_global_norm(0.5, axis_name=a))
    ),
    # --- _qk_clip.py ---
    "qk_clip": Dist(lambda a: _qk_clip_fed(a)),
}


def _qk_clip_fed(axis_name):
  """qk_clip of ``kernel`` read as a fused q|k|v of one head (columns stay whole on every
  shard), fed per-device maxima ``[batch, heads]``: only device 5 saw a logit above the
  threshold, so the replicas agree only through the ``pmax``."""
  tx = og.qk_clip(2.0, og.qk_fused("kernel"), axis_name=axis_name)
  maxima = np.ones((NDEV, 1), np.float32)
  maxima[5] = 9.0

  def update(u, s, p=None, **extra):
    m = jnp.asarray(maxima)
    if axis_name is not None:
      m = jax.lax.dynamic_slice_in_dim(m, jax.lax.axis_index(axis_name), 1)
    return tx.update(u, s, p, attn_max_logits=m, **extra)

  return optax.GradientTransformationExtraArgs(tx.init, update)


def _tree(key, lead):
  """A tree whose leaves all have first axis ``lead`` (divisible by 8)."""
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      "kernel": jax.random.normal(k1, (lead, 3), jnp.float32),
      "bias": jax.random.normal(k2, (lead,), jnp.float32),
      "conv": jax.random.normal(k3, (lead, 2, 2), jnp.float32),
  }


def _inputs(steps):
  params = _tree(jax.random.PRNGKey(0), 4 * NDEV)
  grads = [
      _tree(jax.random.PRNGKey(10 + i), 4 * NDEV) for i in range(steps)
  ]
  # a spike and a NaN-free large step so that guards take both branches
  grads[steps // 2] = jax.tree.map(lambda x: 40.0 * x, grads[steps // 2])
  grads = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)
  values = jnp.linspace(3.0, 1.0, steps).at[steps // 2].set(50.0)
  return params, grads, values


def _run_steps(tx, params, grads, values):
  """init + len(values) updates under lax.scan; returns the stacked updates."""
  return scan_steps(tx, params, grads, values)[1]


def _case(name):
  """The entry of ``name`` and its inputs ``(params, grads, values)``."""
  entry = DIST[name]
  return entry, _inputs(entry.steps)


@functools.cache
def _single(name):
  """The single-device result on the whole tree (computed once per entry)."""
  entry, inputs = _case(name)
  return jax.jit(partial(_run_steps, entry.make(None)))(*inputs)


def _assert_matches_single(out, name):
  chex.assert_trees_all_close(out, _single(name), rtol=2e-5, atol=1e-6)


names = sorted(DIST)


def test_registry_covers_every_axis_name_factory():
  have = {n.split("/")[0] for n in DIST}
  need = {
      n for n in og.__all__
      if callable(getattr(og, n)) and not n.endswith("State")
      and "axis_name" in inspect.signature(getattr(og, n)).parameters
  }
  assert need <= have, f"factories with axis_name missing here: {sorted(need - have)}"


@pytest.mark.parametrize("name", names)
def test_pmap_matches_single_device(name, devices):
  entry, (params, grads, values) = _case(name)
  shard = lambda x: x.reshape((NDEV, x.shape[0] // NDEV) + x.shape[1:])
  shard_steps = lambda x: jnp.moveaxis(
      x.reshape((x.shape[0], NDEV, x.shape[1] // NDEV) + x.shape[2:]), 1, 0
  )
  out = jax.pmap(
      partial(_run_steps, entry.make("d")), axis_name="d", in_axes=(0, 0, None)
  )(jax.tree.map(shard, params), jax.tree.map(shard_steps, grads), values)
  # (dev, step, k, ...) -> (step, dev*k, ...)
  out = jax.tree.map(
      lambda x: jnp.moveaxis(x, 0, 1).reshape((x.shape[1], -1) + x.shape[3:]), out
  )
  _assert_matches_single(out, name)


@pytest.mark.parametrize("name", names)
def test_shard_map_matches_single_device(name, devices):
  entry, (params, grads, values) = _case(name)
  mesh = Mesh(np.array(devices), ("d",))
  fn = jax.jit(
      jax.shard_map(
          partial(_run_steps, entry.make("d")),
          mesh=mesh,
          in_specs=(P("d"), P(None, "d"), P()),
          out_specs=P(None, "d"),
      )
  )
  out = fn(params, grads, values)
  _assert_matches_single(out, name)


@pytest.mark.parametrize("name", names)
def test_sharded_jit_matches_single_device(name, devices):
  entry, (params, grads, values) = _case(name)
  mesh = Mesh(np.array(devices), ("d",))
  params = jax.device_put(params, NamedSharding(mesh, P("d")))
  grads = jax.device_put(grads, NamedSharding(mesh, P(None, "d")))
  out = jax.jit(partial(_run_steps, entry.make(None)))(params, grads, values)
  _assert_matches_single(out, name)
