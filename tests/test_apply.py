"""Tests of update_and_apply: the fused update-and-apply step."""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import optax_guard as og

NDEV = 8


def _params(lead=8):
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"w": jax.random.normal(k1, (lead, 3)), "b": jax.random.normal(k2, (lead,))}


def _grads(seed, lead=8, scale=1.0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(100 + seed))
  return {"w": scale * jax.random.normal(k1, (lead, 3)),
          "b": scale * jax.random.normal(k2, (lead,))}


def _fault(kind, lead=8):
  g = _grads(7, lead)
  if kind == "nan":
    return {**g, "w": g["w"].at[lead - 1, 2].set(jnp.nan)}
  if kind == "+inf":
    return {**g, "b": g["b"].at[1].set(jnp.inf)}
  if kind == "-inf":
    return {**g, "b": g["b"].at[0].set(-jnp.inf)}
  if kind == "1e30-scaled":  # finite elements, the float32 sum of squares overflows
    return jax.tree.map(lambda x: 1e30 * x, g)
  assert kind == "spike"
  return _grads(7, lead, scale=1e4)


FAULTS = ["nan", "+inf", "-inf", "1e30-scaled", "spike"]


def _sequence(lead=8):
  """Ten steps: ordinary gradients with a NaN, an inf and a spike among them."""
  gs = [_grads(i, lead) for i in range(10)]
  gs[5], gs[7], gs[8] = _fault("nan", lead), _fault("spike", lead), _fault("+inf", lead)
  values = [3.0 - 0.1 * i for i in range(10)]
  values[6] = float("nan")
  return gs, values


def _inner():
  return optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-2))


def _spike(inner=None, **kw):
  return og.skip_on_spike(inner or _inner(), window=8, min_history=3, **kw)


TXS = {
    "sgd": lambda: optax.sgd(0.1),
    "adam": lambda: optax.adam(1e-2),
    "chain(clip, adam)": _inner,
    "inject_hyperparams(adamw)": lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=1e-2, weight_decay=1e-3),
    "MultiSteps(adam, 2)": lambda: optax.MultiSteps(optax.adam(1e-2), 2).gradient_transformation(),
    "skip_nonfinite(chain(clip, adam))": lambda: og.skip_nonfinite(_inner()),
    "skip_on_spike(chain(clip, adam))": _spike,
    "skip_nonfinite(inject_hyperparams(adam))": lambda: og.skip_nonfinite(
        optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)),
    "skip_nonfinite(MultiSteps(adam, 2))": lambda: og.skip_nonfinite(
        optax.MultiSteps(optax.adam(1e-2), 2).gradient_transformation()),
    "skip_on_spike(chain(adam, reduce_on_plateau))": lambda: _spike(
        optax.chain(optax.adam(1e-2), og.reduce_on_plateau(patience=1))),
    "skip_nonfinite(skip_on_spike(...))": lambda: og.skip_nonfinite(_spike()),
    # guards that are not outermost: the unfused path
    "chain(monitor, skip_nonfinite(adam))": lambda: optax.chain(
        og.monitor(), og.skip_nonfinite(optax.adam(1e-2))),
    "MultiSteps(skip_on_spike, 2)": lambda: optax.MultiSteps(_spike(), 2)
    .gradient_transformation(),
    "inject_hyperparams(skip_on_spike)": lambda: optax.inject_hyperparams(
        og.skip_on_spike, static_args=("window", "min_history"))(
        _inner(), sigma=6.0, window=8, min_history=3),
}


def _unfused(tx, grads, state, params, **extra):
  updates, state = optax.with_extra_args_support(tx).update(grads, state, params, **extra)
  return optax.apply_updates(params, updates), state


def _run(step, tx, gs, values, params):
  state = tx.init(params)
  out = []
  for g, v in zip(gs, values, strict=True):
    params, state = step(g, state, params, value=jnp.float32(v))
    out.append((params, state))
  return out


def _assert_same(a, b, *, exact_floats=False):
  """Float leaves close (or bitwise equal); integer and bool leaves identical."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    if np.issubdtype(x.dtype, np.floating) and not exact_floats:
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    else:
      np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


# ---------------------------------------------------------------------------
# Same result as tx.update + optax.apply_updates
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TXS))
def test_update_and_apply_matches_the_unfused_step(name):
  tx = TXS[name]()
  gs, values = _sequence()
  fused = _run(jax.jit(partial(og.update_and_apply, tx)), tx, gs, values, _params())
  unfused = _run(jax.jit(partial(_unfused, tx)), tx, gs, values, _params())
  for (p1, s1), (p2, s2) in zip(fused, unfused, strict=True):
    _assert_same(p1, p2)
    _assert_same(s1, s2)
  if "skip" in name:  # the faults were skipped, and training went on
    assert og.guard_stats(fused[-1][1])
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(fused[-1][0]))


def test_update_and_apply_eager_equals_jit():
  tx = og.skip_nonfinite(_inner())
  gs, values = _sequence()
  eager = _run(partial(og.update_and_apply, tx), tx, gs[:6], values[:6], _params())
  jitted = _run(jax.jit(partial(og.update_and_apply, tx)), tx, gs[:6], values[:6], _params())
  _assert_same(eager[-1], jitted[-1])


def test_update_and_apply_passes_extras():
  # value= reaches reduce_on_plateau inside the guard; a plain
  # GradientTransformation ignores the extras, as inside optax.chain
  tx = og.skip_nonfinite(optax.chain(optax.sgd(1.0), og.reduce_on_plateau(patience=0)))
  params = _params()
  state = tx.init(params)
  for v in (1.0, 2.0, 3.0):
    params, state = og.update_and_apply(tx, _grads(0), state, params, value=v)
  assert float(og.guard_stats(state)["reduce_on_plateau/scale"]) < 1.0
  sgd = optax.GradientTransformation(*optax.sgd(1.0)[:2])
  p, _ = og.update_and_apply(sgd, _grads(0), sgd.init(params), params, value=1.0)
  chex.assert_trees_all_close(p, jax.tree.map(lambda a, g: a - g, params, _grads(0)))


def test_update_and_apply_rejects_bad_arguments():
  with pytest.raises(TypeError, match=r"update_and_apply\(tx=...\)"):
    og.update_and_apply(optax.adam, _grads(0), None, _params())
  tx = og.skip_nonfinite(optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"update_and_apply\(params=...\)"):
    og.update_and_apply(tx, _grads(0), tx.init(_params()), None)


# ---------------------------------------------------------------------------
# Guards: a skipped step leaves everything untouched
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("guard", ["skip_nonfinite", "skip_on_spike"])
@pytest.mark.parametrize("kind", FAULTS)
def test_update_and_apply_guard_skips_faults_with_params_bitwise_untouched(guard, kind):
  if guard == "skip_nonfinite" and kind == "spike":
    pytest.skip("a finite spike is no fault for skip_nonfinite")
  tx = og.skip_nonfinite(_inner()) if guard == "skip_nonfinite" else _spike()
  step = jax.jit(partial(og.update_and_apply, tx))
  params = _params()
  state = tx.init(params)
  for i in range(4):  # a history for skip_on_spike
    params, state = step(_grads(i), state, params)
  params = {**params, "w": params["w"].at[0, 0].set(-0.0)}  # p + 0 would give +0.0
  new_params, new_state = step(_fault(kind), state, params)
  _assert_same(new_params, params, exact_floats=True)  # -0.0 stays -0.0
  _assert_same(new_state.inner_state, state.inner_state, exact_floats=True)
  assert bool(new_state.last_skipped) and int(new_state.num_skipped) == 1
  assert int(new_state.consecutive_skipped) == 1
  # the next ordinary step is applied
  after, after_state = step(_grads(9), new_state, new_params)
  assert not bool(after_state.last_skipped)
  assert int(after_state.consecutive_skipped) == 0
  assert not np.array_equal(np.asarray(after["w"]), np.asarray(params["w"]))


def test_update_and_apply_nonfinite_value_skips_skip_on_spike():
  tx = _spike()
  params = _params()
  state = tx.init(params)
  new_params, state = og.update_and_apply(tx, _grads(0), state, params, value=jnp.nan)
  _assert_same(new_params, params, exact_floats=True)
  assert bool(state.last_skipped)


def test_update_and_apply_jit_does_not_retrace():
  tx = _spike()
  calls = []

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(g, s, p, value):
    calls.append(1)
    return og.update_and_apply(tx, g, s, p, value=value)

  params = _params()
  state = tx.init(params)
  for i in range(4):
    params, state = step(_grads(i), state, params, jnp.float32(1.0 + i))
  params, state = step(_fault("nan"), state, params, jnp.float32(1.0))
  assert len(calls) == 1


@pytest.mark.parametrize("guard", ["skip_nonfinite", "skip_on_spike"])
def test_update_and_apply_donated_step_runs_on_a_fresh_state(guard):
  # every field of a fresh guard state has its own buffer, so it can be donated
  tx = og.skip_nonfinite(_inner()) if guard == "skip_nonfinite" else _spike()
  step = jax.jit(lambda p, s, g: og.update_and_apply(tx, g, s, p), donate_argnums=(0, 1))
  params = _params()
  state = tx.init(params)
  for i in range(3):
    params, state = step(params, state, _grads(i))
  params, state = step(params, state, _fault("nan"))
  assert int(state.num_skipped) == 1


def test_update_and_apply_guard_stays_an_ordinary_transformation():
  # the guard works as before inside chain and MultiSteps, and its fused step
  # is found through an alias made by with_extra_args_support
  guard = og.skip_nonfinite(_inner())
  assert isinstance(guard, optax.GradientTransformationExtraArgs)
  assert optax.with_extra_args_support(guard) is guard
  params = _params()
  for tx in (optax.chain(guard), optax.MultiSteps(guard, 1).gradient_transformation()):
    state = tx.init(params)
    u, state = tx.update(_fault("nan"), state, params)
    assert not any(bool(jnp.any(x)) for x in jax.tree.leaves(u))


# ---------------------------------------------------------------------------
# vmap, pmap, shard_map
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("guard", ["skip_nonfinite", "skip_on_spike"])
def test_update_and_apply_vmap_over_models(guard):
  """Three models, model 1 sees a NaN: vmapped steps equal one loop per model."""
  tx = og.skip_nonfinite(_inner()) if guard == "skip_nonfinite" else _spike()
  params = [_params(), jax.tree.map(lambda x: 2 * x, _params()), _params()]
  grads = [[_grads(3 * k + i) for k in range(3)] for i in range(5)]
  grads[4][1] = _fault("nan")
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  step = jax.jit(jax.vmap(partial(og.update_and_apply, tx)))
  p, s = stack(params), jax.vmap(tx.init)(stack(params))
  for g in grads:
    p, s = step(stack(g), s, p)
  single = jax.jit(partial(_unfused, tx))
  for k in range(3):
    pk, sk = params[k], tx.init(params[k])
    for g in grads:
      pk, sk = single(g[k], sk, pk)
    _assert_same(jax.tree.map(lambda x, k=k: x[k], (p, s)), (pk, sk))
  assert bool(s.last_skipped[1])  # the NaN step


def _dist_tx(axis_name, guard):
  inner = optax.chain(og.clip_by_global_norm(1.0, axis_name=axis_name), optax.adam(1e-2))
  if guard == "skip_nonfinite":
    return og.skip_nonfinite(inner, axis_name=axis_name)
  return og.skip_on_spike(inner, window=8, min_history=3, axis_name=axis_name)


def _dist_run(tx, params, grads, values):
  """update_and_apply over the stacked steps; returns the parameters per step."""

  def body(carry, xs):
    params, state = og.update_and_apply(tx, xs[0], carry[1], carry[0], value=xs[1])
    return (params, state), (params, state.num_skipped)

  return jax.lax.scan(body, (params, tx.init(params)), (grads, values))[1]


def _dist_inputs():
  gs, _ = _sequence(lead=4 * NDEV)
  # the NaN sits on one device's shard only: every device must skip
  gs[5] = {**gs[4], "w": gs[4]["w"].at[4 * 5 + 1, 0].set(jnp.nan)}
  grads = jax.tree.map(lambda *xs: jnp.stack(xs), *gs)
  values = jnp.linspace(3.0, 1.0, len(gs))
  return _params(4 * NDEV), grads, values


@pytest.mark.parametrize("guard", ["skip_nonfinite", "skip_on_spike"])
def test_update_and_apply_pmap_matches_single_device(guard, devices):
  params, grads, values = _dist_inputs()
  single = jax.jit(partial(_dist_run, _dist_tx(None, guard)))(params, grads, values)
  shard = lambda x: x.reshape((NDEV, x.shape[0] // NDEV) + x.shape[1:])
  shard_steps = lambda x: jnp.moveaxis(
      x.reshape((x.shape[0], NDEV, x.shape[1] // NDEV) + x.shape[2:]), 1, 0)
  (p, skipped) = jax.pmap(
      partial(_dist_run, _dist_tx("d", guard)), axis_name="d", in_axes=(0, 0, None)
  )(jax.tree.map(shard, params), jax.tree.map(shard_steps, grads), values)
  # (dev, step, k, ...) -> (step, dev * k, ...)
  p = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape((x.shape[1], -1) + x.shape[3:]), p)
  chex.assert_trees_all_close(p, single[0], rtol=2e-5, atol=1e-6)
  assert (np.asarray(skipped) == np.asarray(single[1])[None]).all()
  assert int(single[1][-1]) >= 2  # the NaN, the spike (skip_on_spike) and the inf


@pytest.mark.parametrize("guard", ["skip_nonfinite", "skip_on_spike"])
def test_update_and_apply_shard_map_matches_single_device(guard, devices):
  params, grads, values = _dist_inputs()
  single = jax.jit(partial(_dist_run, _dist_tx(None, guard)))(params, grads, values)
  mesh = Mesh(np.array(devices), ("d",))
  fn = jax.jit(jax.shard_map(
      partial(_dist_run, _dist_tx("d", guard)), mesh=mesh,
      in_specs=(P("d"), P(None, "d"), P()), out_specs=(P(None, "d"), P()),
  ))
  p, skipped = fn(params, grads, values)
  chex.assert_trees_all_close(p, single[0], rtol=2e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(skipped), np.asarray(single[1]))


# ---------------------------------------------------------------------------
# Memory (XLA:CPU-specific)
# ---------------------------------------------------------------------------

LEAVES, SHAPE = 4, (512, 512)
LEAF_BYTES = 512 * 512 * 4


def _compiled_step(tx, fused):
  params = {f"w{i}": jax.ShapeDtypeStruct(SHAPE, jnp.float32) for i in range(LEAVES)}
  state = jax.eval_shape(tx.init, params)

  def step(params, state, grads):
    if fused:
      return og.update_and_apply(tx, grads, state, params)
    return _unfused(tx, grads, state, params)

  return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()


@pytest.mark.xla_cpu
@pytest.mark.parametrize("guard", ["skip_nonfinite", "skip_on_spike"])
def test_update_and_apply_donated_guard_step_keeps_no_update_sized_temporary(guard):
  """XLA:CPU-specific: reads the compiled program's temporary allocation.

  The guard's ``cond`` hands the updates out as a buffer in the unfused step;
  the fused step keeps only scalars. Only the fused step's bound is asserted
  (the unfused one is printed), so an XLA upgrade that also fuses the unfused
  step does not fail this test.
  """
  tx = og.skip_nonfinite(_inner()) if guard == "skip_nonfinite" else _spike()
  analysis = _compiled_step(tx, fused=True).memory_analysis()
  if analysis is None:
    pytest.skip("this backend gives no memory analysis")
  fused = int(analysis.temp_size_in_bytes)
  unfused = int(_compiled_step(tx, fused=False).memory_analysis().temp_size_in_bytes)
  print(f"temp bytes: fused {fused}, unfused {unfused}, leaf {LEAF_BYTES}")
  assert fused < LEAF_BYTES // 4


# ---------------------------------------------------------------------------
# Flax: NNX (split/merge) and linen (TrainState), with value=loss
# ---------------------------------------------------------------------------


def _data():
  x = jax.random.normal(jax.random.PRNGKey(5), (16, 3))
  return x, jnp.sin(x @ jnp.array([[1.0], [-2.0], [0.5]]))


def test_update_and_apply_flax_nnx_split_merge_matches_the_unfused_step():
  nnx = pytest.importorskip("flax.nnx")

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(3, 8, rngs=rngs)
      self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.hidden(x)))

  tx = _spike()
  graphdef, params0, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)
  x, y = _data()

  def loss_fn(params, x, y):
    return jnp.mean((nnx.merge(graphdef, params, rest)(x) - y) ** 2)

  def make(fused):
    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      if fused:
        return (*og.update_and_apply(tx, grads, opt_state, params, value=loss), loss)
      return (*_unfused(tx, grads, opt_state, params, value=loss), loss)

    return step

  runs = []
  for fused in (True, False):
    step, params = make(fused), jax.tree.map(jnp.copy, params0)
    opt_state, losses = tx.init(params), []
    for i in range(6):
      xi = x.at[0, 0].set(jnp.nan) if i == 4 else x  # a NaN batch: skipped
      params, opt_state, loss = step(params, opt_state, xi, y)
      losses.append(float(loss))
    runs.append((params, opt_state, losses))
  _assert_same(runs[0][:2], runs[1][:2])
  assert int(runs[0][1].num_skipped) == 1 and runs[0][2][5] < runs[0][2][0]
  model = nnx.merge(graphdef, runs[0][0], rest)  # merges back into a model
  assert model(x).shape == (16, 1)


def test_update_and_apply_flax_linen_train_state_matches_apply_gradients():
  nn = pytest.importorskip("flax.linen")
  from flax.training import train_state

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(nn.relu(nn.Dense(8)(x)))

  x, y = _data()
  model = MLP()
  tx = og.skip_nonfinite(_inner())
  state0 = train_state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.PRNGKey(1), x)["params"], tx=tx)

  def fused_apply_gradients(state, grads, **extra):
    params, opt_state = og.update_and_apply(
        state.tx, grads, state.opt_state, state.params, **extra)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

  def make(fused):
    @jax.jit
    def step(state, x, y):
      def loss_fn(params):
        return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      if fused:
        return fused_apply_gradients(state, grads, value=loss)
      return state.apply_gradients(grads=grads)

    return step

  states = []
  for fused in (True, False):
    step, state = make(fused), state0
    for i in range(6):
      state = step(state, x.at[1, 2].set(jnp.inf) if i == 2 else x, y)
    states.append(state)
  assert int(states[0].step) == int(states[1].step) == 6
  _assert_same((states[0].params, states[0].opt_state), (states[1].params, states[1].opt_state))
  assert int(states[0].opt_state.num_skipped) == 1
