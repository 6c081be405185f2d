"""The contract every public factory of optax_guard honours (DESIGN.md 4).

One registry lists every public name with a small valid configuration and
configurations that must be rejected. ``test_registry_covers_public_api``
fails when a public name is missing, so a new factory cannot land untested.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og


@dataclasses.dataclass(frozen=True)
class Transform:
  """A registry entry for a factory returning a GradientTransformation."""

  factory: Callable[..., Any]
  kwargs: dict = dataclasses.field(default_factory=dict)
  needs_params: bool = False
  uses_value: bool = False
  static_args: tuple[str, ...] = ()
  bad: tuple[dict, ...] = ()


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A registry entry for a factory returning an optax.Schedule."""

  factory: Callable[..., Any]
  kwargs: dict = dataclasses.field(default_factory=dict)
  bad: tuple[dict, ...] = ()


NAN = float("nan")

# ---------------------------------------------------------------------------
# The registry. Keep one block per module; every public factory appears once.
# ---------------------------------------------------------------------------
TRANSFORMS: dict[str, Transform] = {
    # --- _clipping.py ---
    "clip_by_value": Transform(
        og.clip_by_value, dict(max_value=0.5),
        bad=(dict(max_value=NAN), dict(max_value=1.0, min_value=2.0),
             dict(max_value=-1.0), dict(max_value="big")),
    ),
    "clip_by_norm": Transform(
        og.clip_by_norm, dict(max_norm=0.5),
        bad=(dict(max_norm=0.0), dict(max_norm=-1.0), dict(max_norm=NAN),
             dict(max_norm=1.0, ord=3)),
    ),
    "clip_by_global_norm": Transform(
        og.clip_by_global_norm, dict(max_norm=0.5),
        bad=(dict(max_norm=0.0), dict(max_norm=-1.0), dict(max_norm=NAN),
             dict(max_norm=1.0, ord=0)),
    ),
    "clip_by_axis_norm": Transform(
        og.clip_by_axis_norm, dict(max_norm=0.5),
        bad=(dict(max_norm=-1.0), dict(max_norm=1.0, axis="rows")),
    ),
    "truncate_by_value": Transform(
        og.truncate_by_value, dict(threshold=1.0),
        bad=(dict(threshold=0.0), dict(threshold=NAN)),
    ),
    "clip_weights": Transform(
        og.clip_weights, dict(max_value=0.3), needs_params=True,
        bad=(dict(max_value=0.1, min_value=0.2), dict(max_value=NAN)),
    ),
    "clip_weights_by_norm": Transform(
        og.clip_weights_by_norm, dict(max_norm=0.5), needs_params=True,
        bad=(dict(max_norm=0.0), dict(max_norm=-2.0)),
    ),
    # --- _adaptive.py ---
    "adaptive_grad_clip": Transform(
        og.adaptive_grad_clip, dict(clipping=0.05), needs_params=True,
        bad=(dict(clipping=0.0), dict(clipping=NAN), dict(eps=-1.0),
             dict(axis="rows")),
    ),
    "autoclip": Transform(
        og.autoclip, dict(percentile=50.0, history_size=3),
        bad=(dict(percentile=101.0), dict(percentile=-1.0), dict(history_size=0),
             dict(history_size=2.5)),
    ),
    "zclip": Transform(
        og.zclip, dict(warmup_steps=2, max_norm=100.0),
        bad=(dict(alpha=1.5), dict(z_threshold=0.0), dict(warmup_steps=0),
             dict(max_norm=-1.0), dict(eps=-1e-6)),
    ),
    # --- _guards.py ---
    "skip_nonfinite": Transform(
        og.skip_nonfinite,
        dict(inner=optax.chain(og.clip_by_global_norm(1.0),
                               og.reduce_on_plateau(patience=1, factor=0.5))),
        uses_value=True,
        bad=(dict(inner="sgd"), dict(inner=None)),
    ),
    "skip_on_spike": Transform(
        og.skip_on_spike,
        dict(inner=optax.chain(og.clip_by_global_norm(1.0), optax.sgd(0.1)),
             window=4, min_history=2),
        uses_value=True,
        bad=(dict(sigma=0.0), dict(sigma=-1.0), dict(sigma=NAN), dict(window=0),
             dict(window=2.5), dict(min_history=0), dict(min_history=5)),
    ),
    # --- _feedback.py ---
    "reduce_on_plateau": Transform(
        og.reduce_on_plateau, dict(patience=1, factor=0.5, cooldown=1), uses_value=True,
        bad=(dict(factor=1.0), dict(factor=-0.1), dict(patience=-1), dict(patience=1.5),
             dict(cooldown=-1), dict(threshold=-1e-4), dict(threshold=NAN),
             dict(min_scale=-1.0), dict(eps=-1.0), dict(mode="median"),
             dict(threshold_mode="relative")),
    ),
    "scale_by_grad_norm": Transform(
        og.scale_by_grad_norm, dict(fn=lambda n: 1.0 / (1.0 + n)), static_args=("fn",),
        bad=(dict(fn=3.0), dict(fn=None)),
    ),
    "scale_by_parameter": Transform(
        og.scale_by_parameter, dict(fn=lambda p, u: 1.0 / (1.0 + jnp.abs(p))),
        needs_params=True, static_args=("fn",),
        bad=(dict(fn=0.5),),
    ),
    # --- _penalties.py ---
    "add_l1_penalty": Transform(
        og.add_l1_penalty, dict(weight=0.01), needs_params=True,
        bad=(dict(weight=-1.0), dict(weight=NAN), dict(weight=float("inf")),
             dict(weight="big")),
    ),
    "add_l2_penalty": Transform(
        og.add_l2_penalty,
        dict(weight=0.01, mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim > 1, p)),
        needs_params=True, static_args=("mask",),
        bad=(dict(weight=-0.5), dict(weight=NAN)),
    ),
    # --- _monitor.py ---
    "monitor": Transform(og.monitor, dict(per_leaf=True), bad=(dict(per_leaf="yes"),)),
}

SCHEDULES: dict[str, Schedule] = {
    # --- _schedules.py ---
    "polynomial_decay": Schedule(
        og.polynomial_decay, dict(init_value=1.0, decay_steps=8, power=2.0, end_value=0.1),
        bad=(dict(decay_steps=0), dict(decay_steps=2.5), dict(power=-1.0),
             dict(init_value=NAN), dict(end_value=float("inf")), dict(cycle="yes")),
    ),
    "linear_decay": Schedule(
        og.linear_decay, dict(init_value=1.0, decay_steps=8, end_value=0.1),
        bad=(dict(decay_steps=-3), dict(init_value=float("inf")), dict(end_value=NAN)),
    ),
    "inverse_sqrt_decay": Schedule(
        og.inverse_sqrt_decay, dict(init_value=1.0, timescale=4.0),
        bad=(dict(timescale=0.0), dict(timescale=-1.0), dict(init_value=NAN)),
    ),
    "inverse_time_decay": Schedule(
        og.inverse_time_decay, dict(init_value=1.0, decay_steps=3, decay_rate=0.5),
        bad=(dict(decay_steps=0), dict(decay_rate=-0.5), dict(power=-1.0),
             dict(staircase=1)),
    ),
    "exponential_decay": Schedule(
        og.exponential_decay, dict(init_value=1.0, decay_steps=2, decay_rate=0.9),
        bad=(dict(decay_rate=0.0), dict(decay_rate=-0.9), dict(decay_steps=0),
             dict(end_value=NAN), dict(init_value=float("inf"))),
    ),
    "step_decay": Schedule(
        og.step_decay, dict(init_value=1.0, step_size=3, factor=0.5),
        bad=(dict(step_size=0), dict(factor=0.0), dict(factor=-0.1), dict(step_size=1.5)),
    ),
    "multistep_decay": Schedule(
        og.multistep_decay, dict(init_value=1.0, milestones=[2, 5, 9], factor=0.5),
        bad=(dict(milestones=[5, 2]), dict(milestones=[-1, 3]), dict(factor=0.0),
             dict(milestones=3)),
    ),
    "warmup": Schedule(
        og.warmup, dict(schedule=optax.constant_schedule(0.5), warmup_steps=4, init_value=0.1),
        bad=(dict(warmup_steps=-1), dict(schedule=0.5), dict(init_value=NAN)),
    ),
}

# Public names that are neither factories nor schedules, with the test module
# that covers them.
OTHERS: dict[str, str] = {
    "__version__": "test_version_is_a_string (below)",
    # --- _monitor.py ---
    "guard_stats": "tests/test_monitor.py (test_guard_stats_*)",
    # --- _apply.py ---
    "update_and_apply": "tests/test_apply.py (test_update_and_apply_*)",
}


def _state_class_names():
  return {n for n in og.__all__ if n.endswith("State")}


def test_registry_covers_public_api():
  registered = set(TRANSFORMS) | set(SCHEDULES) | set(OTHERS) | _state_class_names()
  missing = sorted(set(og.__all__) - registered)
  assert not missing, f"public names missing from tests/test_contract.py: {missing}"
  unknown = sorted(registered - set(og.__all__))
  assert not unknown, f"registry names that optax_guard does not export: {unknown}"


def test_all_is_sorted_and_exported():
  assert list(og.__all__) == sorted(og.__all__)
  for name in og.__all__:
    assert hasattr(og, name), name


def test_version_is_a_string():
  assert isinstance(og.__version__, str) and og.__version__.count(".") >= 1


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _params(dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  return {
      "dense": {
          "kernel": jax.random.normal(k1, (4, 3), jnp.float32).astype(dtype),
          "bias": (0.1 * jax.random.normal(k2, (3,), jnp.float32)).astype(dtype),
      },
      "scale": jax.random.normal(k3, (), jnp.float32).astype(dtype),
  }


def _grads(step, dtype=jnp.float32):
  key = jax.random.PRNGKey(100 + step)
  g = jax.tree_util.tree_map(
      lambda p: 2.0 * jax.random.normal(key, p.shape, jnp.float32), _params()
  )
  # a spike at step 3 so that adaptive/guard transforms take both branches
  if step == 3:
    g = jax.tree_util.tree_map(lambda x: 50.0 * x, g)
  return jax.tree_util.tree_map(lambda x: x.astype(dtype), g)


def _value(step):
  return jnp.asarray([3.0, 2.5, 2.5, 9.0, 2.4, 2.6][step % 6], jnp.float32)


def _run(tx, steps=6, dtype=jnp.float32, jit=True):
  """Runs ``steps`` updates; returns the list of updates and the final state."""
  tx = optax.with_extra_args_support(tx)
  params = _params(dtype)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  outs = []
  for i in range(steps):
    u, state = update(_grads(i, dtype), state, params, value=_value(i))
    outs.append(u)
  return outs, state


def _make(entry: Transform, **override):
  return entry.factory(**{**entry.kwargs, **override})


transform_names = sorted(TRANSFORMS)
schedule_names = sorted(SCHEDULES)


# ---------------------------------------------------------------------------
# Transformations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", transform_names)
def test_transform_is_optax_transformation(name):
  tx = _make(TRANSFORMS[name])
  assert isinstance(tx, optax.GradientTransformation)
  if TRANSFORMS[name].uses_value:
    assert isinstance(tx, optax.GradientTransformationExtraArgs)


@pytest.mark.parametrize("name", transform_names)
def test_transform_jit_no_retrace(name):
  tx = optax.with_extra_args_support(_make(TRANSFORMS[name]))
  params = _params()
  traces = []

  @jax.jit
  def step(g, s, value):
    traces.append(1)
    return tx.update(g, s, params, value=value)

  s = tx.init(params)
  for i in range(4):
    _, s = step(_grads(i), s, _value(i))
  assert len(traces) == 1


@pytest.mark.parametrize("name", transform_names)
def test_transform_init_on_shape_dtype_struct(name):
  tx = _make(TRANSFORMS[name])
  params = _params()
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params
  )
  real = tx.init(params)
  from_struct = tx.init(abstract)
  assert jax.tree_util.tree_structure(real) == jax.tree_util.tree_structure(from_struct)
  for a, b in zip(
      jax.tree_util.tree_leaves(real), jax.tree_util.tree_leaves(from_struct), strict=True
  ):
    assert jnp.shape(a) == jnp.shape(b) and jnp.result_type(a) == jnp.result_type(b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", transform_names)
def test_transform_preserves_dtype_and_shape(name, dtype):
  outs, _ = _run(_make(TRANSFORMS[name]), steps=4, dtype=dtype)
  ref = _params(dtype)
  for u in outs:
    chex.assert_trees_all_equal_shapes_and_dtypes(u, ref)


@pytest.mark.parametrize("name", transform_names)
def test_transform_ignores_unknown_extra_args(name):
  entry = TRANSFORMS[name]
  tx = optax.with_extra_args_support(_make(entry))
  params = _params()
  s = tx.init(params)
  a, _ = tx.update(_grads(0), s, params, value=_value(0))
  b, _ = tx.update(_grads(0), s, params, value=_value(0), unknown_extra=1.0)
  chex.assert_trees_all_equal(a, b)
  chained = optax.chain(optax.identity(), _make(entry))
  c, _ = chained.update(_grads(0), chained.init(params), params, value=_value(0),
                        unknown_extra=1.0)
  chex.assert_trees_all_equal(a, c)


@pytest.mark.parametrize("name", [n for n in transform_names if TRANSFORMS[n].uses_value])
def test_transform_value_reaches_it_inside_chain(name):
  entry = TRANSFORMS[name]
  direct, s_direct = _run(_make(entry), steps=6, jit=False)
  chained, s_chain = _run(optax.chain(optax.identity(), _make(entry)), steps=6, jit=False)
  chex.assert_trees_all_close(direct, chained, rtol=1e-6, atol=0)
  chex.assert_trees_all_close(s_direct, s_chain[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", transform_names)
def test_transform_same_under_inject_hyperparams(name):
  entry = TRANSFORMS[name]
  direct, _ = _run(_make(entry), steps=6)
  injected_tx = optax.inject_hyperparams(entry.factory, static_args=entry.static_args)(
      **entry.kwargs
  )
  injected, _ = _run(injected_tx, steps=6)
  chex.assert_trees_all_close(direct, injected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", transform_names)
def test_transform_defaults_work_under_inject_hyperparams(name):
  """With only the required arguments, inject_hyperparams traces the defaults."""
  entry = TRANSFORMS[name]
  injected_tx = optax.inject_hyperparams(entry.factory, static_args=entry.static_args)(
      **entry.kwargs
  )
  outs, _ = _run(injected_tx, steps=3)
  assert all(bool(jnp.all(jnp.isfinite(x))) for u in outs for x in jax.tree_util.tree_leaves(u))


@pytest.mark.parametrize("name", transform_names)
def test_transform_state_structure_stable_under_cond(name):
  tx = optax.with_extra_args_support(_make(TRANSFORMS[name]))
  params = _params()
  s0 = tx.init(params)

  @jax.jit
  def step(pred, g, s):
    def do(g, s):
      return tx.update(g, s, params, value=_value(1))

    def skip(g, s):
      return jax.tree_util.tree_map(jnp.zeros_like, g), s

    return jax.lax.cond(pred, do, skip, g, s)

  _, s1 = step(True, _grads(0), s0)
  _, s2 = step(False, _grads(1), s1)
  chex.assert_trees_all_equal_shapes_and_dtypes(s0, s1, s2)


@pytest.mark.parametrize("name", transform_names)
def test_transform_rejects_invalid_hyperparameters(name):
  entry = TRANSFORMS[name]
  assert entry.bad, f"{name}: the registry must list at least one invalid configuration"
  for bad in entry.bad:
    with pytest.raises((ValueError, TypeError)) as info:
      _make(entry, **bad)
    assert entry.factory.__name__ in str(info.value) or any(
        k in str(info.value) for k in bad
    ), str(info.value)


@pytest.mark.parametrize("name", [n for n in transform_names if TRANSFORMS[n].needs_params])
def test_transform_needs_params_error(name):
  tx = _make(TRANSFORMS[name])
  with pytest.raises(ValueError, match="params"):
    tx.update(_grads(0), tx.init(_params()), None)


# ---------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", schedule_names)
def test_schedule_returns_float32_scalar_for_all_step_types(name):
  entry = SCHEDULES[name]
  sched = entry.factory(**entry.kwargs)
  ref = sched(7)
  assert ref.dtype == jnp.float32 and ref.shape == ()
  for step in (np.int64(7), np.int32(7), jnp.int32(7), jnp.asarray(7, jnp.float32)):
    np.testing.assert_array_equal(sched(step), ref)
  np.testing.assert_array_equal(jax.jit(sched)(7), ref)
  assert bool(jnp.isfinite(sched(-3))) and sched(-3) == sched(0)


@pytest.mark.parametrize("name", schedule_names)
def test_schedule_jit_no_retrace_and_vmap(name):
  entry = SCHEDULES[name]
  sched = entry.factory(**entry.kwargs)
  traces = []

  @jax.jit
  def f(t):
    traces.append(1)
    return sched(t)

  for t in (0, 5, 1000):
    f(jnp.asarray(t, jnp.int32))
  assert len(traces) == 1
  steps = jnp.arange(10)
  out = jax.vmap(sched)(steps)
  assert out.shape == (10,) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.array([sched(int(t)) for t in steps]), rtol=1e-6)


@pytest.mark.parametrize("name", schedule_names)
def test_schedule_rejects_invalid_arguments(name):
  entry = SCHEDULES[name]
  assert entry.bad, f"{name}: the registry must list at least one invalid configuration"
  for bad in entry.bad:
    with pytest.raises((ValueError, TypeError)):
      entry.factory(**{**entry.kwargs, **bad})

