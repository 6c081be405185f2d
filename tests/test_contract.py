"""The contract every public factory of optax_guard honours.

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
from _helpers import assert_bitwise_equal, with_special_values

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
  # keyword extras every update needs (besides value=), e.g. qk_clip's maxima
  extra: dict = dataclasses.field(default_factory=dict)


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
             dict(max_value=-1.0), dict(max_value="big"), dict(max_value=0.0),
             dict(max_value=-float("inf"))),
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
        bad=(dict(max_value=0.1, min_value=0.2), dict(max_value=NAN),
             dict(max_value=0.2, min_value=0.2)),
    ),
    "clip_weights_by_norm": Transform(
        og.clip_weights_by_norm, dict(max_norm=0.5), needs_params=True,
        bad=(dict(max_norm=0.0), dict(max_norm=-2.0)),
    ),
    # --- _adagc.py ---
    "adagc": Transform(
        og.adagc, dict(warmup_steps=2),
        bad=(dict(lambda_rel=0.5), dict(lambda_abs=0.0), dict(beta=2.0), dict(warmup_steps=-1),
             dict(stacked="layers"), dict(warmup_steps=2**31)),
    ),
    # --- _adaptive.py ---
    "adaptive_grad_clip": Transform(
        og.adaptive_grad_clip, dict(clipping=0.05), needs_params=True,
        bad=(dict(clipping=0.0), dict(clipping=NAN), dict(eps=-1.0), dict(eps=float("inf")),
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
             dict(window=2.5), dict(min_history=0), dict(min_history=5),
             dict(min_ratio=0.5), dict(min_ratio=NAN)),
    ),
    "dynamic_loss_scale": Transform(
        og.dynamic_loss_scale,
        dict(inner=optax.chain(og.clip_by_global_norm(1.0),
                               og.reduce_on_plateau(patience=1, factor=0.5)),
             growth_interval=2),
        uses_value=True,
        bad=(dict(inner="sgd"), dict(init_scale=0.0), dict(init_scale=1e39),
             dict(growth_factor=1.0), dict(backoff_factor=1.0), dict(backoff_factor=0.0),
             dict(growth_interval=0), dict(growth_interval=2.5)),
    ),
    # --- _restart.py ---
    "skip_steps": Transform(
        og.skip_steps,
        dict(inner=optax.chain(og.clip_by_global_norm(1.0),
                               og.reduce_on_plateau(patience=1, factor=0.5)),
             ranges=[(1, 3)]),
        uses_value=True,
        bad=(dict(inner="sgd"), dict(ranges=[(3, 1)]), dict(ranges=[(-1, 2)]),
             dict(ranges="0:5"), dict(ranges=[(0.5, 2)])),
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
             dict(weight="big"), dict(mask="no"), dict(mask={"dense": 1.0})),
    ),
    "add_l2_penalty": Transform(
        og.add_l2_penalty,
        dict(weight=0.01, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
        needs_params=True, static_args=("mask",),
        bad=(dict(weight=-0.5), dict(weight=NAN)),
    ),
    # --- _adamc.py ---
    "adamc": Transform(
        og.adamc, dict(learning_rate=0.1, weight_decay=0.01, peak_learning_rate=0.2),
        needs_params=True,
        bad=(dict(learning_rate=-1.0), dict(peak_learning_rate=0.0),
             dict(learning_rate=optax.constant_schedule(0.1), peak_learning_rate=None),
             dict(weight_decay=-0.1), dict(mask="no"), dict(b1=1.5), dict(nesterov="yes")),
    ),
    # --- _stable.py ---
    "scale_by_stable_adam": Transform(
        og.scale_by_stable_adam, dict(b1=0.8),
        bad=(dict(b1=1.0), dict(b2=-0.1), dict(eps=-1.0), dict(mu_dtype=jnp.int32),
             dict(stacked=-1), dict(stacked="layers")),
    ),
    "stable_adamw": Transform(
        og.stable_adamw, dict(learning_rate=0.1, weight_decay=0.01), needs_params=True,
        bad=(dict(learning_rate=-1.0), dict(learning_rate="fast"), dict(weight_decay=-0.1),
             dict(mask="no"), dict(b1=1.5)),
    ),
    "scale_by_spam": Transform(
        og.scale_by_spam, dict(threshold=4.0, reset_interval=4, warmup_steps=2, clip_delay=2),
        bad=(dict(threshold=-1.0), dict(threshold=NAN), dict(reset_interval=-1),
             dict(clip_delay=0), dict(warmup_steps=1.5), dict(clip_delay=4),
             dict(warmup_steps=5), dict(reset_interval=2)),
    ),
    "spam": Transform(
        og.spam, dict(learning_rate=0.1, threshold=4.0, reset_interval=4, warmup_steps=2,
                      clip_delay=2),
        needs_params=True,
        bad=(dict(learning_rate=NAN), dict(weight_decay=-1.0), dict(threshold=-1.0),
             dict(clip_delay=0), dict(mask=3), dict(clip_delay=4), dict(warmup_steps=4)),
    ),
    # --- _historical.py ---
    "clip_by_historical_norm": Transform(
        og.clip_by_historical_norm, dict(sigma=2.0, window=4, min_history=2),
        bad=(dict(window=1), dict(sigma=0.0), dict(min_history=5), dict(min_history=0)),
    ),
    # --- _monitor.py ---
    "monitor": Transform(og.monitor, dict(per_leaf=True), bad=(dict(per_leaf="yes"),)),
    # --- _qk_clip.py --- (one head of width 1 in the fused kernel [4, 3]; S = 8 > 2)
    "qk_clip": Transform(
        og.qk_clip, dict(threshold=2.0, layouts=og.qk_fused("dense")), needs_params=True,
        extra=dict(attn_max_logits=np.array([[1.5], [8.0]], np.float32)),
        bad=(dict(threshold=0.0), dict(threshold=NAN), dict(threshold=True),
             dict(layouts="dense"), dict(alpha=1.5), dict(min_factor=0.0)),
    ),
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
    # --- _guards/loss_scale.py ---
    "loss_scale": "tests/test_loss_scale.py (test_loss_scale_*)",
    # --- _qk_clip.py ---
    "qk_fused": "tests/test_qk_clip.py (test_qk_fused_*)",
    "qk_separate": "tests/test_qk_clip.py (test_qk_separate_*)",
    # --- _restart.py ---
    "add_guard_state": "tests/test_restart.py (test_add_guard_state_*)",
    "seed_spike_history": "tests/test_restart.py (test_seed_spike_history_*)",
    "strip_guard_state": "tests/test_restart.py (test_strip_guard_state_*)",
}


def _state_class_names():
  """The exported state types (NamedTuples such as ``ZClipState``)."""
  return {n for n in og.__all__ if isinstance(getattr(og, n), type)}


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
  g = jax.tree.map(
      lambda p: 2.0 * jax.random.normal(key, p.shape, jnp.float32), _params()
  )
  # a spike at step 3 so that adaptive/guard transforms take both branches
  if step == 3:
    g = jax.tree.map(lambda x: 50.0 * x, g)
  return jax.tree.map(lambda x: x.astype(dtype), g)


def _value(step):
  return jnp.asarray([3.0, 2.5, 2.5, 9.0, 2.4, 2.6][step % 6], jnp.float32)


def _run(tx, steps=6, dtype=jnp.float32, jit=True, select=lambda tree: tree):
  """Runs ``steps`` updates; returns the list of updates and the final state.

  ``select`` picks the part of the test tree to use (e.g. without scalars).
  """
  tx = optax.with_extra_args_support(tx)
  params = select(_params(dtype))
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  outs = []
  for i in range(steps):
    u, state = update(select(_grads(i, dtype)), state, params, value=_value(i))
    outs.append(u)
  return outs, state


def _feed(tx, extra):
  """``tx`` with the registry's keyword ``extra`` passed to every update."""
  if not extra:
    return tx
  tx = optax.with_extra_args_support(tx)
  return optax.GradientTransformationExtraArgs(
      tx.init, lambda u, s, p=None, **kw: tx.update(u, s, p, **{**extra, **kw}))


def _make(entry: Transform, **override):
  return _feed(entry.factory(**{**entry.kwargs, **override}), entry.extra)


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
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params
  )
  real = tx.init(params)
  from_struct = tx.init(abstract)
  assert jax.tree.structure(real) == jax.tree.structure(from_struct)
  for a, b in zip(
      jax.tree.leaves(real), jax.tree.leaves(from_struct), strict=True
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
  injected, _ = _run(_feed(injected_tx, entry.extra), steps=6)
  chex.assert_trees_all_close(direct, injected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", transform_names)
def test_transform_defaults_work_under_inject_hyperparams(name):
  """Only the required arguments: every default goes through inject_hyperparams."""
  import inspect
  entry = TRANSFORMS[name]
  params = inspect.signature(entry.factory).parameters
  required = {k: v for k, v in entry.kwargs.items()
              if params[k].default is inspect.Parameter.empty}
  assert all(params[k].default is not inspect.Parameter.empty
             for k in params if k not in required)
  injected_tx = optax.inject_hyperparams(entry.factory, static_args=entry.static_args)(
      **required
  )
  direct, _ = _run(_feed(entry.factory(**required), entry.extra), steps=3)
  outs, _ = _run(_feed(injected_tx, entry.extra), steps=3)
  chex.assert_trees_all_close(direct, outs, rtol=1e-5, atol=1e-6)
  assert all(bool(jnp.all(jnp.isfinite(x))) for u in outs for x in jax.tree.leaves(u))


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



# ---------------------------------------------------------------------------
# The bad-input matrix: every argument of every factory against the wrong
# inputs a user plausibly passes. Each must raise ValueError or TypeError at
# construction, naming the function and the argument, eagerly and under jit.
# ---------------------------------------------------------------------------

INF = float("inf")
_NUMERIC_BAD = (("array", np.array([1.0, 2.0])), ("jax_array", "jnp.ones(2)"), ("bool", True),
                ("string", "1.0"), ("list", [1.0]), ("nan", NAN))
_INT_BAD = (("array", np.array([1, 2])), ("jax_array", "jnp.ones(2, int)"), ("bool", True),
            ("string", "3"), ("list", [3]), ("fraction", 2.5), ("nan", NAN))
_RULE_BAD = {
    "real": (),
    "pos": (("zero", 0.0), ("negative", -1.0)),
    "pos_finite": (("zero", 0.0), ("negative", -1.0), ("inf", INF)),
    "nonneg": (("negative", -1.0), ("minus_inf", -INF)),
    "nonneg_finite": (("negative", -1.0), ("inf", INF)),
    "finite": (("inf", INF),),
    "unit": (("negative", -0.1), ("above_one", 1.5)),
    "unit_open": (("negative", -0.1), ("one", 1.0)),
    "percent": (("negative", -1.0), ("above_hundred", 100.5)),
    "int_pos": (("zero", 0), ("negative", -1)),
    "int_nonneg": (("negative", -1),),
    "int_window": (("zero", 0), ("one", 1), ("negative", -1)),
    # step counts compared with an int32 step: at most 2**31 - 1
    "int_steps_pos": (("zero", 0), ("negative", -1), ("too_big", 2**31)),
    "int_steps_nonneg": (("negative", -1), ("too_big", 2**31)),
    "at_least_one": (("below_one", 0.5), ("zero", 0.0), ("negative", -1.0)),
    "above_one": (("one", 1.0), ("below_one", 0.5), ("zero", 0.0), ("negative", -1.0)),
}
_OTHER_BAD = {
    "rate": (("negative", -1.0), ("inf", INF), ("nan", NAN), ("string", "0.1"),
             ("bool", True), ("array", np.array([1.0, 2.0])), ("jax_array", "jnp.ones(2)"),
             ("list", [0.1]), ("none", None)),
    "dtype": (("int", "int32"), ("bool", "bool"), ("unknown", "float99"), ("number", 3)),
    "ord": (("three", 3), ("zero", 0), ("bool", True), ("string", "l2"),
            ("jax_array", "jnp.asarray(1)")),
    "axis": (("string", "rows"), ("fraction", 1.5), ("bool", True), ("empty", ()),
             ("jax_array", "jnp.asarray(0)")),
    "axis_name": (("bool", True), ("int", 1), ("mixed", ("i", 1)), ("empty", ())),
    "mask": (("string", "no"), ("float", 0.0), ("string_leaf", {"dense": "yes"}),
             ("int_list", [1])),
    "inner": (("string", "sgd"), ("none", None), ("factory", optax.sgd)),
    "callable": (("float", 3.0), ("none", None), ("string", "abs")),
    "flag": (("string", "yes"), ("int", 1), ("none", None)),
    "mode": (("other", "median"), ("none", None)),
    "threshold_mode": (("other", "relative"), ("none", None)),
    "ranges": (("string", "0:5"), ("none", None), ("pair", (1, 3)), ("unordered", [(5, 2)]),
               ("range_alone", range(1, 3)), ("range_step", [range(0, 6, 2)]),
               ("empty_range", [(2, 2)]), ("negative", [(-1, 3)]), ("fraction", [(0.5, 3)]),
               ("bool", [(True, 3)]), ("triple", [(1, 2, 3)]), ("too_big", [(0, 2**31)]),
               ("jax_array", "jnp.ones((1, 2), int)")),
    "qk_layouts": (("none", None), ("string", "dense"), ("empty", []), ("number", 3.0),
                   ("string_leaf", {"a": "dense"})),
    "stacked": (("string", "layers"), ("negative", -1), ("fraction", 1.5), ("bool", True),
                ("jax_array", "jnp.asarray(1)")),
    "milestones": (("unsorted", [5, 2]), ("negative", [-1, 3]), ("scalar", 3),
                   ("string", "ab"), ("fractions", [1.5])),
}

# factory -> {argument: rule}; a rule ending in "?" accepts None.
ARGS: dict[str, dict[str, str]] = {
    "clip_by_value": dict(max_value="real", min_value="real?"),
    "clip_by_norm": dict(max_norm="pos", ord="ord", axis_name="axis_name", stacked="stacked"),
    "clip_by_global_norm": dict(max_norm="pos", ord="ord", axis_name="axis_name"),
    "clip_by_axis_norm": dict(max_norm="pos", axis="axis", axis_name="axis_name",
                              stacked="stacked"),
    "truncate_by_value": dict(threshold="pos"),
    "clip_weights": dict(max_value="real", min_value="real?"),
    "clip_weights_by_norm": dict(max_norm="pos", axis="axis", stacked="stacked"),
    "adaptive_grad_clip": dict(clipping="pos", eps="nonneg_finite", axis="axis",
                               stacked="stacked"),
    "autoclip": dict(percentile="percent", history_size="int_pos", axis_name="axis_name"),
    "zclip": dict(alpha="unit", z_threshold="pos_finite", warmup_steps="int_pos",
                  max_norm="pos?", eps="nonneg_finite", axis_name="axis_name"),
    "skip_nonfinite": dict(inner="inner", axis_name="axis_name"),
    "skip_on_spike": dict(inner="inner", sigma="pos", window="int_pos",
                          min_history="int_pos", min_ratio="at_least_one",
                          axis_name="axis_name"),
    "skip_steps": dict(inner="inner", ranges="ranges"),
    "dynamic_loss_scale": dict(inner="inner", init_scale="pos_finite", growth_factor="above_one",
                               backoff_factor="unit_open", growth_interval="int_pos",
                               axis_name="axis_name"),
    "reduce_on_plateau": dict(factor="unit_open", patience="int_nonneg",
                              threshold="nonneg_finite", threshold_mode="threshold_mode",
                              cooldown="int_nonneg", min_scale="nonneg",
                              mode="mode", eps="nonneg"),
    "scale_by_grad_norm": dict(fn="callable", axis_name="axis_name"),
    "scale_by_parameter": dict(fn="callable"),
    "add_l1_penalty": dict(weight="nonneg_finite", mask="mask?"),
    "add_l2_penalty": dict(weight="nonneg_finite", mask="mask?"),
    "monitor": dict(per_leaf="flag", axis_name="axis_name", stacked="stacked"),
    "qk_clip": dict(threshold="pos", layouts="qk_layouts", alpha="unit", min_factor="unit_open",
                    stacked="stacked", axis_name="axis_name"),
    "scale_by_stable_adam": dict(b1="unit_open", b2="unit_open", eps="nonneg_finite",
                                 eps_root="nonneg_finite", mu_dtype="dtype?", stacked="stacked",
                                 axis_name="axis_name"),
    "stable_adamw": dict(learning_rate="rate", b1="unit_open", b2="unit_open",
                         eps="nonneg_finite", eps_root="nonneg_finite", mu_dtype="dtype?",
                         weight_decay="rate", mask="mask?", stacked="stacked",
                         axis_name="axis_name"),
    "scale_by_spam": dict(b1="unit_open", b2="unit_open", eps="nonneg_finite",
                          threshold="nonneg?", reset_interval="int_steps_nonneg?",
                          warmup_steps="int_steps_nonneg", clip_delay="int_steps_pos"),
    "adamc": dict(learning_rate="rate", b1="unit_open", b2="unit_open", eps="nonneg_finite",
                  eps_root="nonneg_finite", mu_dtype="dtype?", weight_decay="rate",
                  mask="mask?", nesterov="flag", peak_learning_rate="pos_finite?"),
    "spam": dict(learning_rate="rate", b1="unit_open", b2="unit_open", eps="nonneg_finite",
                 weight_decay="rate", mask="mask?", threshold="nonneg?",
                 reset_interval="int_steps_nonneg?", warmup_steps="int_steps_nonneg",
                 clip_delay="int_steps_pos"),
    "adagc": dict(lambda_abs="pos", lambda_rel="at_least_one", beta="unit",
                  warmup_steps="int_steps_nonneg", stacked="stacked", axis_name="axis_name"),
    "clip_by_historical_norm": dict(sigma="pos", window="int_window", min_history="int_pos?",
                                    axis_name="axis_name"),
    "polynomial_decay": dict(init_value="finite", decay_steps="int_pos", power="nonneg_finite",
                             end_value="finite", cycle="flag"),
    "linear_decay": dict(init_value="finite", decay_steps="int_pos", end_value="finite"),
    "inverse_sqrt_decay": dict(init_value="finite", timescale="pos_finite"),
    "inverse_time_decay": dict(init_value="finite", decay_steps="int_pos",
                               decay_rate="nonneg_finite", power="nonneg_finite",
                               staircase="flag"),
    "exponential_decay": dict(init_value="finite", decay_steps="int_pos",
                              decay_rate="pos_finite", staircase="flag", end_value="finite?"),
    "step_decay": dict(init_value="finite", step_size="int_pos", factor="pos_finite"),
    "multistep_decay": dict(init_value="finite", milestones="milestones", factor="pos_finite"),
    "warmup": dict(schedule="callable", warmup_steps="int_nonneg", init_value="finite"),
}


def _bad_values(rule):
  optional = rule.endswith("?")
  rule = rule.rstrip("?")
  if rule in _OTHER_BAD:
    out = list(_OTHER_BAD[rule])
  else:
    out = list(_INT_BAD if rule.startswith("int") else _NUMERIC_BAD) + list(_RULE_BAD[rule])
    if not optional:
      out.append(("none", None))
  return out


def _bad_matrix():
  cases = []
  for name, args in sorted(ARGS.items()):
    for arg, rule in args.items():
      for label, value in _bad_values(rule):
        cases.append(pytest.param(name, arg, value, id=f"{name}-{arg}-{label}"))
  return cases


def _entry_kwargs(name):
  entry = TRANSFORMS.get(name) or SCHEDULES[name]
  return entry.factory, dict(entry.kwargs)


def _materialise(value):
  # jnp arrays are written as strings so that collecting the tests creates none
  return eval(value, {"jnp": jnp}) if isinstance(value, str) and value.startswith("jnp.") \
      else value


def test_bad_matrix_covers_every_factory_argument():
  import inspect
  for name in list(TRANSFORMS) + list(SCHEDULES):
    factory = getattr(og, name)
    params = set(inspect.signature(factory).parameters)
    assert set(ARGS[name]) == params, (name, params ^ set(ARGS[name]))


def _traceable(value):
  return isinstance(value, (np.ndarray, bool)) or (
      isinstance(value, str) and value.startswith("jnp."))


@pytest.mark.parametrize("name, arg, value", _bad_matrix())
def test_bad_input_is_rejected_at_construction_naming_the_argument(name, arg, value):
  """Eagerly, and (for arrays and bools) with the value arriving as a jit tracer."""
  factory, kwargs = _entry_kwargs(name)
  traceable = _traceable(value)
  value = _materialise(value)

  def build(v):
    factory(**{**kwargs, arg: v})
    return jnp.zeros(())

  modes = ["eager", "traced"] if traceable else ["eager"]
  for mode in modes:
    with pytest.raises((ValueError, TypeError)) as info:
      if mode == "eager":
        build(value)
      else:  # what jit sees: shapes and dtypes are static, values are not
        jax.make_jaxpr(build)(value)
    message = str(info.value)
    assert f"{name}(" in message and arg in message, (mode, message)


# Combinations of arguments, the entry points that are not factories, and
# trees passed where arrays are expected: each case is
# (entry point, call, error type, message pattern). Arrays and states are
# built inside the calls, never at collection.
def _spike_state(nested=False):
  inner = og.skip_on_spike(optax.sgd(0.1)) if nested else optax.sgd(0.1)
  return og.skip_on_spike(inner, window=4, min_history=2).init(jnp.zeros(2))


def _nnx_case():
  """A Flax NNX model's parameters and its ``nnx.Optimizer`` state, as variables."""
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  return nnx, nnx.state(model, nnx.Param), optimizer.opt_state


def _add_guard_state_nnx(which):
  nnx, params, opt_state = _nnx_case()
  guard = og.skip_on_spike(optax.adam(1e-3))
  if which == "params":
    return og.add_guard_state(guard, nnx.as_pure(opt_state), params)
  return og.add_guard_state(guard, opt_state, nnx.as_pure(params))


def _update_once(tx):
  params = {"w": jnp.ones(3)}
  return tx.update(params, tx.init(params), params)


ENTRY_BAD = [
    ("spam", lambda: og.spam(0.1, reset_interval=10, warmup_steps=5, clip_delay=10),
     ValueError, r"spam\(clip_delay=\.\.\.\) must be < reset_interval=10 .*never act.*got 10"),
    ("spam", lambda: og.spam(0.1, reset_interval=8, warmup_steps=8, clip_delay=2),
     ValueError, r"spam\(warmup_steps=\.\.\.\) must be < reset_interval=8 .*never end.*got 8"),
    ("scale_by_spam", lambda: og.scale_by_spam(reset_interval=100),  # warmup_steps=150
     ValueError, r"scale_by_spam\(warmup_steps=\.\.\.\) must be < reset_interval=100 .*got 150"),
    ("spam", lambda: _update_once(og.spam(0.1, mask={"b": True})),
     ValueError, r"spam\(mask=\.\.\.\) must have the tree structure of the params"),
    ("stable_adamw", lambda: _update_once(og.stable_adamw(0.1, mask={"b": True})),
     ValueError, r"stable_adamw\(mask=\.\.\.\) must have the tree structure of the params"),
    ("skip_steps", lambda: og.skip_steps([(1, 3)], optax.sgd(0.1)),
     TypeError, r"skip_steps\(inner=\.\.\.\) must be an optax\.GradientTransformation"),
    ("skip_steps", lambda: og.skip_steps(optax.sgd(0.1), range(45, 50)),
     TypeError, r"skip_steps\(ranges=\.\.\.\).*one range is written \[\(45, 50\)\]"),
    ("qk_separate", lambda: og.qk_separate("attn", "attn/key", head_axis=-2),
     ValueError, r"qk_separate\(query=\.\.\., key=\.\.\.\) must not both name the leaves "
                 r"of 'attn/key' \(below 'attn'\)"),
    ("qk_fused", lambda: og.qk_fused(("blocks", "blocks/0/qkv")),
     ValueError, r"qk_fused\(qkv=\.\.\.\) must be free of repeats \('blocks/0/qkv' and "
                 r"'blocks', one below the other\)"),
    ("seed_spike_history", lambda: og.seed_spike_history(_spike_state(), [1.0, -2.0]),
     ValueError, r"seed_spike_history\(norms=\.\.\.\) must hold norms >= 0 .*-2\.0 at index 1"),
    ("seed_spike_history", lambda: og.seed_spike_history(_spike_state(nested=True), [1.0]),
     ValueError, r"seed_spike_history\(state=\.\.\.\) must hold exactly one skip_on_spike "
                 r"state, found 2 .*inner_state"),
    ("seed_spike_history", lambda: og.seed_spike_history(og.skip_on_spike(optax.sgd(0.1)), [1.0]),
     ValueError, r"seed_spike_history\(state=\.\.\.\).*found 0: pass the optimizer state"),
    ("add_guard_state",
     lambda: og.add_guard_state(og.skip_on_spike(optax.sgd(0.1)), optax.sgd(0.1).init({}), None),
     TypeError, r"add_guard_state\(params=\.\.\.\) must be a tree of arrays .*got None"),
    ("add_guard_state",
     lambda: og.add_guard_state(og.skip_on_spike(optax.sgd(0.1)), optax.sgd(0.1).init({}),
                                {"w": "weights"}),
     TypeError, r"add_guard_state\(params=\.\.\.\) must be a tree of arrays.*\['w'\] is 'weights'"),
    ("add_guard_state", lambda: _add_guard_state_nnx("params"),
     TypeError, r"add_guard_state\(params=\.\.\.\) holds variables \(Param at .*\) where "
                r"arrays are expected: for Flax NNX pass nnx\.as_pure"),
    ("add_guard_state", lambda: _add_guard_state_nnx("inner_state"),
     TypeError, r"add_guard_state\(inner_state=\.\.\.\) holds variables .*nnx\.as_pure"),
]


@pytest.mark.parametrize("name, call, error, match", ENTRY_BAD,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(ENTRY_BAD)])
def test_bad_combination_or_entry_point_input_names_the_argument(name, call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_entry_points_with_arguments_have_bad_input_cases():
  covered = {name for name, *_ in ENTRY_BAD}
  for name in ("add_guard_state", "seed_spike_history", "qk_fused", "qk_separate"):
    assert name in covered, name


# ---------------------------------------------------------------------------
# optax.inject_hyperparams with a non-default value for every argument:
# eager and jit give the same result, equal to the direct call.
# ---------------------------------------------------------------------------

_KERNEL_ONLY = {"dense": {"kernel": True, "bias": False}, "scale": True}
# stacked layers: the "dense" leaves as if scanned over their first axis (a
# tree of ints is static under inject_hyperparams, a callable needs static_args)
_STACK_DENSE = {"dense": 1, "scale": None}
_STACK_MATRICES = lambda path, leaf: 1 if np.ndim(leaf) == 2 else 0  # noqa: E731
NONDEFAULT: dict[str, tuple[dict, tuple[str, ...]]] = {
    "clip_by_value": (dict(max_value=0.5, min_value=-0.3), ()),
    "clip_by_norm": (dict(max_norm=0.5, ord=1, stacked=_STACK_DENSE), ("ord",)),
    "clip_by_global_norm": (dict(max_norm=0.5, ord="inf"), ()),
    "clip_by_axis_norm": (dict(max_norm=0.5, axis=0, stacked=_STACK_MATRICES),
                          ("axis", "stacked")),
    "truncate_by_value": (dict(threshold=1.5), ()),
    "clip_weights": (dict(max_value=0.3, min_value=-0.2), ()),
    "clip_weights_by_norm": (dict(max_norm=0.5, axis=(0,), stacked=_STACK_MATRICES),
                             ("stacked",)),
    "adaptive_grad_clip": (dict(clipping=0.05, eps=1e-2, axis=0, stacked=_STACK_MATRICES),
                           ("axis", "stacked")),
    "autoclip": (dict(percentile=50.0, history_size=3), ()),
    "zclip": (dict(alpha=0.9, z_threshold=1.5, warmup_steps=2, max_norm=100.0, eps=1e-5), ()),
    "skip_nonfinite": (dict(inner=optax.sgd(0.1)), ()),
    "skip_on_spike": (dict(inner=optax.sgd(0.1), sigma=2.0, window=4, min_history=2,
                           min_ratio=1.5), ()),
    "skip_steps": (dict(inner=optax.sgd(0.1), ranges=[(1, 3), (4, 5)]), ()),
    "dynamic_loss_scale": (dict(inner=optax.sgd(0.1), init_scale=1024.0, growth_factor=4.0,
                                backoff_factor=0.25, growth_interval=2), ()),
    "reduce_on_plateau": (dict(factor=0.5, patience=1, threshold=1e-3, threshold_mode="abs",
                               cooldown=1, min_scale=0.01, mode="max", eps=1e-6), ()),
    "scale_by_grad_norm": (dict(fn=lambda n: 1.0 / (2.0 + n)), ("fn",)),
    "scale_by_parameter": (dict(fn=lambda p, u: 0.5 + jnp.abs(p)), ("fn",)),
    "add_l1_penalty": (dict(weight=0.02, mask=_KERNEL_ONLY), ()),
    "add_l2_penalty": (dict(weight=0.03, mask=lambda p: jax.tree.map(lambda x: x.ndim > 0, p)),
                       ("mask",)),
    "scale_by_stable_adam": (dict(b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-9,
                                  mu_dtype=jnp.float32, stacked=0), ("mu_dtype", "stacked")),
    "stable_adamw": (dict(learning_rate=0.05, b1=0.8, b2=0.99,
                          eps=1e-6, eps_root=1e-9, mu_dtype=jnp.float32, weight_decay=0.05,
                          mask=_KERNEL_ONLY, stacked=0), ("mu_dtype", "stacked")),
    "adamc": (dict(learning_rate=0.05, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-9,
                   mu_dtype=jnp.float32, weight_decay=0.05, mask=_KERNEL_ONLY, nesterov=True,
                   peak_learning_rate=0.1), ("mu_dtype",)),
    "scale_by_spam": (dict(b1=0.8, b2=0.99, eps=1e-7, threshold=4.0, reset_interval=3,
                           warmup_steps=2, clip_delay=2), ()),
    "spam": (dict(learning_rate=0.05, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.01,
                  mask=_KERNEL_ONLY, threshold=4.0, reset_interval=3, warmup_steps=2,
                  clip_delay=2), ()),
    "adagc": (dict(lambda_abs=2.0, lambda_rel=1.2, beta=0.9, warmup_steps=2, stacked=0),
              ("stacked",)),
    "clip_by_historical_norm": (dict(sigma=1.5, window=6, min_history=2), ()),
    "monitor": (dict(per_leaf=True, stacked=_STACK_DENSE), ()),
    "qk_clip": (dict(threshold=3.0, layouts=og.qk_fused("dense", num_kv_heads=1), alpha=0.25,
                     min_factor=0.5, stacked=0), ("stacked",)),
}


def test_nondefault_table_sets_every_argument():
  import inspect
  for name in TRANSFORMS:
    kwargs, _ = NONDEFAULT[name]
    params = inspect.signature(getattr(og, name)).parameters
    missing = {a for a in params if a not in kwargs and a != "axis_name"}
    assert not missing, (name, missing)  # axis_name: see tests/test_distributed.py
    for arg, value in kwargs.items():
      default = params[arg].default
      assert default is inspect.Parameter.empty or value is not default, (name, arg)


@pytest.mark.parametrize("name", transform_names)
def test_transform_nondefault_arguments_same_eagerly_and_under_jit(name):
  kwargs, static = NONDEFAULT[name]
  # an explicit unit axis applies to every leaf: leave out the scalar leaf
  select = (lambda t: {"dense": t["dense"]}) if "axis" in kwargs else (lambda t: t)
  extra = TRANSFORMS[name].extra
  direct, s_direct = _run(_feed(getattr(og, name)(**kwargs), extra), steps=6, select=select)
  injected = _feed(optax.inject_hyperparams(getattr(og, name), static_args=static)(**kwargs),
                   extra)
  eager, s_eager = _run(injected, steps=6, jit=False, select=select)
  jitted, s_jit = _run(injected, steps=6, jit=True, select=select)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(direct, jitted, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s_eager.inner_state, s_jit.inner_state, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(s_direct, s_jit.inner_state, rtol=1e-5, atol=1e-6)


_ALGORITHM_ARGS = [
    ("clip_by_norm", dict(max_norm=0.5, ord=1), "ord"),
    ("clip_by_global_norm", dict(max_norm=0.5, ord=1), "ord"),
    ("clip_by_axis_norm", dict(max_norm=0.5, axis=0), "axis"),
    ("clip_weights_by_norm", dict(max_norm=0.5, axis=0), "axis"),
    ("adaptive_grad_clip", dict(clipping=0.05, axis=0), "axis"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name, kwargs, arg", _ALGORITHM_ARGS)
def test_algorithm_argument_traced_by_inject_hyperparams_fails_alike(name, kwargs, arg, jit):
  """An int ``ord``/``axis`` becomes an array under inject_hyperparams: both modes say so."""
  injected = optax.inject_hyperparams(getattr(og, name))(**kwargs)
  with pytest.raises(TypeError, match=rf"{name}\({arg}=.*static_args=\('{arg}',\)"):
    _run(injected, steps=1, jit=jit)


# ---------------------------------------------------------------------------
# Leaves the library does not understand are never changed silently.
# ---------------------------------------------------------------------------


def _with_int_leaf(tree):
  return {**tree, "count": jnp.array([3, 4], jnp.int32)}


@pytest.mark.parametrize("name", transform_names)
def test_integer_leaves_raise_naming_the_leaf_or_pass_through(name):
  tx = optax.with_extra_args_support(_make(TRANSFORMS[name]))
  params = _with_int_leaf(_params())
  grads = _with_int_leaf(_grads(0))
  try:
    out, _ = tx.update(grads, tx.init(params), params, value=_value(0))
  except TypeError as e:
    assert "count" in str(e) and "int32" in str(e), str(e)
  else:  # passed through untouched, as documented by the transformation
    np.testing.assert_array_equal(out["count"], grads["count"])
    assert out["count"].dtype == jnp.int32


@pytest.mark.parametrize("name", [n for n in transform_names if TRANSFORMS[n].needs_params])
def test_params_that_do_not_match_the_updates_name_params(name):
  tx = _make(TRANSFORMS[name])
  params = _params()
  missing = {"dense": params["dense"]}
  with pytest.raises(ValueError, match=rf"{name}.*params"):
    tx.update(_grads(0), tx.init(params), missing)
  wrong_shape = {**params, "scale": jnp.zeros((2,))}
  with pytest.raises(ValueError, match=rf"{name}.*params.*'scale'"):
    tx.update(_grads(0), tx.init(params), wrong_shape)


@pytest.mark.parametrize("name", ["clip_by_axis_norm", "clip_weights_by_norm",
                                  "adaptive_grad_clip"])
def test_axis_out_of_range_names_the_leaf(name):
  tx = getattr(og, name)(0.5, axis=5) if name != "adaptive_grad_clip" else \
      og.adaptive_grad_clip(0.05, axis=5)
  params = {"w": jnp.ones((3,))}
  with pytest.raises(ValueError, match=rf"{name}: leaf \['w'\].*axis=5"):
    tx.update({"w": jnp.ones((3,))}, tx.init(params), params)


def _complex_tree():
  k1, k2 = jax.random.split(jax.random.PRNGKey(7))
  re = 3.0 * jax.random.normal(k1, (4, 3))
  im = 3.0 * jax.random.normal(k2, (4, 3))
  return {"w": (re + 1j * im).astype(jnp.complex64), "b": jnp.array([1 - 2j], jnp.complex64)}


def _real_view(tree):
  return jax.tree.map(lambda z: jnp.stack([z.real, z.imag], axis=-1), tree)


@pytest.mark.parametrize("make", [
    lambda: og.clip_by_global_norm(2.0), lambda: og.clip_by_norm(2.0),
    lambda: og.autoclip(50.0, history_size=4), lambda: og.zclip(warmup_steps=1, max_norm=3.0),
    lambda: og.scale_by_grad_norm(lambda n: 1.0 / (1.0 + n)),
], ids=["global", "per_leaf", "autoclip", "zclip", "grad_norm"])
def test_norm_based_transforms_on_complex_equal_the_real_view(make):
  """An L2 norm of complex leaves is the norm of the (re, im) pairs: same result."""
  z = _complex_tree()
  tx, rtx = make(), make()
  out, state = tx.update(z, tx.init(z))
  real_out, real_state = rtx.update(_real_view(z), rtx.init(_real_view(z)))
  chex.assert_trees_all_close(_real_view(out), real_out, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(state, real_state, rtol=1e-6, atol=1e-6)


def test_l1_norm_of_complex_leaves_sums_moduli():
  z = _complex_tree()
  n1 = sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(z))
  out, _ = og.clip_by_global_norm(1.0, ord=1).update(z, optax.EmptyState())
  chex.assert_trees_all_close(out, jax.tree.map(lambda x: x / n1, z), rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: og.clip_by_value(1.0), lambda: og.clip_weights(1.0)],
                         ids=["clip_by_value", "clip_weights"])
def test_box_clipping_rejects_complex(make):
  tx = make()
  z = _complex_tree()
  with pytest.raises(TypeError, match=r"complex.*\['b'\]|complex.*\['w'\]"):
    tx.update(z, tx.init(z), z)


def test_clip_by_axis_norm_on_complex_uses_moduli_per_unit():
  z = jnp.array([[3 + 4j, 1j], [0j, 0j]], jnp.complex64)  # (in=2, out=2): unit norms 5, 1
  out, _ = og.clip_by_axis_norm(2.0).update(z, optax.EmptyState())
  np.testing.assert_allclose(out, z * jnp.array([0.4, 1.0]), rtol=1e-6)


def test_truncate_by_value_on_complex_uses_the_modulus():
  z = jnp.array([3 + 4j, 3 + 3j, -0.5j], jnp.complex64)  # moduli 5, 4.24, 0.5
  out, _ = og.truncate_by_value(4.5).update(z, optax.EmptyState())
  np.testing.assert_array_equal(out, jnp.array([0, 3 + 3j, -0.5j], jnp.complex64))


@pytest.mark.parametrize("factory, penalty", [
    (og.add_l1_penalty, lambda w: lambda p: w * sum(jnp.sum(jnp.abs(x))
                                                    for x in jax.tree.leaves(p))),
    (og.add_l2_penalty, lambda w: lambda p: w * sum(jnp.sum(jnp.abs(x) ** 2)
                                                    for x in jax.tree.leaves(p))),
], ids=["l1", "l2"])
def test_penalties_on_complex_params_follow_optax_convention(factory, penalty):
  """The added term is conj(jax.grad(penalty)): the direction optax descends for complex."""
  p, g = _complex_tree(), jax.tree.map(lambda x: 0.5 * x, _complex_tree())
  out, _ = factory(0.3).update(g, optax.EmptyState(), p)
  expected = jax.tree.map(lambda a, b: a + jnp.conj(b), g, jax.grad(penalty(0.3))(p))
  chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)
  # and the L2 term is what optax.add_decayed_weights(2w) adds for complex params
  if factory is og.add_l2_penalty:
    ref, _ = optax.add_decayed_weights(0.6).update(g, optax.EmptyState(), p)
    chex.assert_trees_all_close(out, ref, rtol=1e-6)


# ---------------------------------------------------------------------------
# No device work at construction: a script may build its optimizer before
# jax.distributed.initialize().
# ---------------------------------------------------------------------------

_BUILD_BEFORE_INITIALIZE = r"""
import socket, sys
sys.path.insert(0, {tests!r})
import jax
import test_contract as tc  # the registry builds every transformation at import
for entry in list(tc.TRANSFORMS.values()) + list(tc.SCHEDULES.values()):
  entry.factory(**entry.kwargs)
for name, (kwargs, _) in tc.NONDEFAULT.items():
  getattr(tc.og, name)(**kwargs)
with socket.socket() as s:
  s.bind(("localhost", 0))
  port = s.getsockname()[1]
jax.distributed.initialize(f"localhost:{{port}}", num_processes=1, process_id=0)
print("initialized after building", len(tc.TRANSFORMS) + len(tc.SCHEDULES), "factories")
"""


def test_every_factory_builds_before_jax_distributed_initialize(tmp_path):
  import os
  import subprocess
  import sys
  tests = os.path.dirname(os.path.abspath(__file__))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-c", _BUILD_BEFORE_INITIALIZE.format(tests=tests)],
      capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "initialized after building" in proc.stdout


# ---------------------------------------------------------------------------
# Off switches are values, not errors: what optax, PyTorch or Keras accept to
# mean "off" is accepted and returns the updates bitwise unchanged, directly
# and under optax.inject_hyperparams + jit (where the value is traced).
# ---------------------------------------------------------------------------

# (factory, kwargs, static_args, special): the special values in the trees.
# "all": -0.0, NaN and +-inf pass bitwise. "inf": -0.0 and +-inf (a norm clip
# keeps a NaN norm visible as NaN, whatever the bound). "finite": -0.0 only
# (autoclip handles a non-finite norm as at any percentile).
_NO_LEAF = lambda p: jax.tree.map(lambda _: False, p)
OFF_SWITCHES = [
    ("clip_by_value", dict(max_value=INF), (), "all"),
    ("clip_by_value", dict(max_value=INF, min_value=-INF), (), "all"),
    ("truncate_by_value", dict(threshold=INF), (), "all"),
    ("clip_by_norm", dict(max_norm=INF), (), "inf"),
    ("clip_by_norm", dict(max_norm=INF, ord=1), ("ord",), "inf"),
    ("clip_by_global_norm", dict(max_norm=INF), (), "inf"),
    ("clip_by_global_norm", dict(max_norm=INF, ord="inf"), (), "inf"),
    ("clip_by_axis_norm", dict(max_norm=INF), (), "inf"),
    ("clip_weights", dict(max_value=INF), (), "all"),
    ("clip_weights_by_norm", dict(max_norm=INF), (), "inf"),
    ("adaptive_grad_clip", dict(clipping=INF), (), "inf"),
    ("adaptive_grad_clip", dict(clipping=INF, eps=0.0), (), "inf"),
    ("autoclip", dict(percentile=100.0, history_size=3), (), "finite"),
    ("reduce_on_plateau", dict(patience=0, min_scale=1.0), (), "all"),
    ("reduce_on_plateau", dict(patience=0, min_scale=INF), (), "all"),
    ("reduce_on_plateau", dict(patience=0, eps=INF), (), "all"),
    ("add_l1_penalty", dict(weight=0.0), (), "all"),
    ("add_l2_penalty", dict(weight=0.0), (), "all"),
    ("add_l1_penalty", dict(weight=0.1, mask=False), (), "all"),
    ("add_l2_penalty", dict(weight=0.1, mask={"dense": False, "scale": False}), (), "all"),
    ("add_l2_penalty", dict(weight=0.1, mask=_NO_LEAF), ("mask",), "all"),
    ("monitor", dict(per_leaf=True), (), "all"),
]


def _off_id(case):
  name, kwargs, _, _ = case
  return name + "-" + ",".join(
      f"{k}={'fn' if callable(v) else v}" for k, v in kwargs.items() if k != "history_size"
  )


def _special(tree, seed, special):
  return with_special_values(tree, seed, nan=special == "all", inf=special != "finite")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", OFF_SWITCHES, ids=_off_id)
def test_off_switch_is_the_identity_bitwise(case, dtype):
  name, kwargs, static, special = case
  factory = getattr(og, name)
  # the params keep -0.0 and NaN/inf only where a unit norm of p + u stays clear of inf - inf
  params = _special(_params(dtype), 1, special if special == "all" else "finite")
  grads = [_special(_grads(i, dtype), 10 + i, special) for i in range(5)]
  values = [1.0, 2.0, 3.0, 4.0, 5.0]  # a loss that only gets worse
  builds = {
      "eager": (factory(**kwargs), False),
      "jit": (factory(**kwargs), True),
      "inject_jit": (optax.inject_hyperparams(factory, static_args=static)(**kwargs), True),
  }
  for mode, (tx, jit) in builds.items():
    tx = optax.with_extra_args_support(tx)
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    for g, v in zip(grads, values, strict=True):
      out, state = update(g, state, params, value=jnp.float32(v))
      try:
        assert_bitwise_equal(out, g)
      except AssertionError as e:
        raise AssertionError(f"{mode}: {e}") from None


def test_zclip_infinite_max_norm_is_no_fixed_bound():
  """``zclip(max_norm=inf)`` is ``zclip()``: the same updates and states, bitwise."""
  grads = [_special(_grads(i), 10 + i, "inf") if i == 4 else _grads(i) for i in range(6)]
  for inject in (False, True):
    wrap = (lambda f: optax.inject_hyperparams(f)) if inject else (lambda f: f)
    txs = [wrap(og.zclip)(warmup_steps=2, max_norm=INF), wrap(og.zclip)(warmup_steps=2)]
    runs = []
    for tx in txs:
      state, outs = tx.init(_params()), []
      for g in grads:
        u, state = jax.jit(tx.update)(g, state)
        outs.append(u)
      runs.append((outs, state.inner_state if inject else state))
    assert_bitwise_equal(runs[0][0], runs[1][0])
    assert_bitwise_equal(runs[0][1], runs[1][1])


def test_reduce_on_plateau_scale_never_increases():
  """A floor above the current scale (here traced, so unchecked) never raises it."""
  tx = optax.inject_hyperparams(og.reduce_on_plateau)(patience=0, factor=0.5)
  state = tx.init(_params())
  for v in (1.0, 2.0, 3.0):
    _, state = jax.jit(tx.update)(_grads(0), state, value=jnp.float32(v))
  assert float(state.inner_state.scale) == 0.25
  state.hyperparams["min_scale"] = jnp.float32(0.75)
  for v in (4.0, 5.0):
    _, state = jax.jit(tx.update)(_grads(0), state, value=jnp.float32(v))
    assert float(state.inner_state.scale) == 0.25


@pytest.mark.parametrize("name", transform_names)
def test_transform_fresh_state_can_be_donated(name):
  """``init`` gives every field its own buffer, so a jitted step may donate the state."""
  tx = optax.with_extra_args_support(_make(TRANSFORMS[name]))
  params = _params()
  step = jax.jit(lambda g, s: tx.update(g, s, params, value=_value(0)), donate_argnums=1)
  _, state = step(_grads(0), tx.init(params))
  _, state = step(_grads(1), state)
  assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))


STATE_TYPES = ("AdagcState", "AutoClipState", "ClipByHistoricalNormState",
               "DynamicLossScaleState", "MonitorState",
               "QkClipState", "ReduceOnPlateauState", "ScaleBySpamState", "ScaleByStableAdamState",
               "SkipNonfiniteState", "SkipOnSpikeState", "SkipStepsState", "SpikeTracker",
               "ZClipState")


def test_state_types_are_named_tuples_with_documented_fields():
  assert set(STATE_TYPES) == _state_class_names()
  for name in STATE_TYPES:
    cls = getattr(og, name)
    assert issubclass(cls, tuple) and hasattr(cls, "_fields"), name
    doc = cls.__doc__ or ""
    for field in cls._fields:
      assert f"{field}:" in doc, f"{name}.{field} is not documented"
