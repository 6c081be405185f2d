"""The Flax drop-ins: optax_guard.flax.Optimizer (NNX) and TrainState (linen)."""

from __future__ import annotations

import functools
import subprocess
import sys
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.training import train_state

import optax_guard as og
import optax_guard.flax as ogf

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _batches(n, *, nan_at=(), features=8):
  """``n`` regression batches; the targets of the steps in ``nan_at`` are NaN.

  A NaN target gives a NaN loss and NaN gradients with a finite forward pass,
  so the BatchNorm statistics of that step stay finite.
  """
  out = []
  for i in range(n):
    x = jax.random.normal(jax.random.key(i), (16, features))
    y = jnp.sum(x[:, :3], axis=-1, keepdims=True)
    if i in nan_at:
      y = y.at[0, 0].set(jnp.nan)
    out.append((x, y))
  return out


def _arrays(tree):
  """The leaves as NumPy arrays (PRNG keys as their key data)."""
  def conv(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return [conv(x) for x in jax.tree.leaves(tree)]


def _snapshot(tree):
  """A copy of the arrays of ``tree`` (a state, or a part of one) that donation cannot delete."""
  return jax.tree.map(jnp.copy, nnx.as_pure(tree))


def _without_kept(optimizer):
  """An ``Optimizer``'s state without the ``keep_on_skip`` copy (``nnx.Optimizer``'s layout)."""
  return nnx.state(optimizer, nnx.Not(nnx.PathContains("kept")))


def _assert_same(a, b, *, exact=False):
  """Same structure; float leaves close (or bitwise equal), other leaves identical."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(_arrays(a), _arrays(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    if np.issubdtype(x.dtype, np.floating) and not exact:
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    else:
      np.testing.assert_array_equal(x, y)


def _guard():
  return og.skip_on_spike(
      optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-2)), window=8, min_history=4
  )


TXS = {
    "skip_on_spike": _guard,
    "skip_nonfinite": lambda: og.skip_nonfinite(optax.adam(1e-2)),
    "skip_steps(skip_nonfinite)": lambda: og.skip_steps(
        og.skip_nonfinite(optax.adam(1e-2)), [(1, 2)]),
    "adamw": lambda: optax.adamw(1e-2),  # not a guard: the unfused path
}

# ---------------------------------------------------------------------------
# NNX models: BatchNorm and Dropout, and the same blocks stacked with nnx.scan
# ---------------------------------------------------------------------------


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    # no bias before BatchNorm: its gradient would be rounding noise, which
    # Adam scales up to full steps whose sign depends on the float rounding
    self.hidden = nnx.Linear(8, 16, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.out = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(nnx.relu(self.bn(self.hidden(x)))))


class Block(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(8, 8, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    return x + self.drop(nnx.relu(self.bn(self.linear(x))))


class Stacked(nnx.Module):
  """Three blocks with stacked parameters, applied with ``nnx.scan``."""

  def __init__(self, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(body(x, self.blocks))


MODELS = {"bn_dropout": MLP, "scan_stacked": Stacked}


def _model(name):
  return MODELS[name](nnx.Rngs(0, dropout=1))


def _loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


@functools.partial(nnx.jit, donate_argnums=(0, 1))
def _nnx_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(_loss)(model, x, y)
  optimizer.update(model, grads, value=loss)
  return loss


def _any_skipped(opt_state):
  """Whether a guard (any of nested ones) skipped the step; None without a guard."""
  flags = [v for k, v in og.guard_stats(opt_state).items() if k.endswith("/last_skipped")]
  return functools.reduce(jnp.logical_or, flags) if flags else None


@functools.partial(nnx.jit, donate_argnums=(0, 1))
def _nnx_ref_step(model, optimizer, x, y):
  """``nnx.Optimizer``'s step, the statistics of a skipped step put back by hand."""
  before = nnx.as_pure(nnx.state(model, nnx.BatchStat))  # arrays: a snapshot
  loss, grads = nnx.value_and_grad(_loss)(model, x, y)
  optimizer.update(model, grads, value=loss)
  skipped = _any_skipped(nnx.as_pure(optimizer.opt_state))
  if skipped is not None:
    after = nnx.as_pure(nnx.state(model, nnx.BatchStat))
    nnx.update(model, jax.tree.map(lambda b, a: jnp.where(skipped, b, a), before, after))
  return loss


def _train_nnx(cls, model_name, tx_name, batches, **kwargs):
  model = _model(model_name)
  optimizer = cls(model, TXS[tx_name](), wrt=nnx.Param, **kwargs)
  step = _nnx_ref_step if cls is nnx.Optimizer else _nnx_step
  for x, y in batches:
    step(model, optimizer, x, y)
  return model, optimizer


# ---------------------------------------------------------------------------
# Packaging
# ---------------------------------------------------------------------------


def test_import_optax_guard_does_not_import_flax():
  code = "import sys, optax_guard; print('flax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
  assert out.stdout.strip() == "False"


def test_flax_module_exports_the_drop_ins():
  assert ogf.__all__ == ["Optimizer", "TrainState"]
  assert issubclass(ogf.Optimizer, nnx.Optimizer)
  assert issubclass(ogf.TrainState, train_state.TrainState)


# ---------------------------------------------------------------------------
# NNX
# ---------------------------------------------------------------------------


# the stacked model with one guard and one plain optimizer
@pytest.mark.parametrize("model_name, tx_name", [
    *(("bn_dropout", name) for name in sorted(TXS)),
    ("scan_stacked", "skip_on_spike"), ("scan_stacked", "adamw"),
])
def test_nnx_optimizer_equals_nnx_optimizer(model_name, tx_name):
  nan_at = () if tx_name == "adamw" else (5,)
  batches = _batches(8, nan_at=nan_at)
  ours = _train_nnx(ogf.Optimizer, model_name, tx_name, batches)
  ref = _train_nnx(nnx.Optimizer, model_name, tx_name, batches)
  _assert_same(nnx.state(ours[0]), nnx.state(ref[0]))
  _assert_same(_without_kept(ours[1]), nnx.state(ref[1]))
  assert int(ours[1].step[...]) == 8
  if nan_at:
    stats = og.guard_stats(ours[1].opt_state)
    skipped = [k for k in stats if k.endswith("num_skipped") and int(stats[k]) > 0]
    assert skipped, stats
    finite = jax.tree.leaves(nnx.state(ours[0], nnx.Param))
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in finite)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_nnx_skipped_step_keeps_parameters_and_batch_statistics(model_name):
  batches = _batches(5, nan_at=(4,))
  model, optimizer = _train_nnx(ogf.Optimizer, model_name, "skip_on_spike", batches[:4])
  params = _snapshot(nnx.state(model, nnx.Param))
  stats = _snapshot(nnx.state(model, nnx.BatchStat))
  counts = _snapshot(nnx.state(model, nnx.RngCount))
  opt_inner = _snapshot(optimizer.opt_state.inner_state)
  _nnx_step(model, optimizer, *batches[4])
  assert bool(optimizer.opt_state.last_skipped[...])
  _assert_same(nnx.as_pure(nnx.state(model, nnx.Param)), params, exact=True)
  _assert_same(nnx.as_pure(optimizer.opt_state.inner_state), opt_inner, exact=True)
  # the batch never happened for the statistics (keep_on_skip=nnx.BatchStat by
  # default); the dropout RNG count, not selected, moved on
  _assert_same(nnx.as_pure(nnx.state(model, nnx.BatchStat)), stats, exact=True)
  assert any(not np.array_equal(a, b) for a, b in zip(
      _arrays(nnx.state(model, nnx.RngCount)), _arrays(counts), strict=True))
  assert int(optimizer.step[...]) == 5
  # and the next applied step continues from there
  _nnx_step(model, optimizer, *batches[0])
  assert not bool(optimizer.opt_state.last_skipped[...])
  assert any(not np.array_equal(a, b) for a, b in zip(
      _arrays(nnx.state(model, nnx.BatchStat)), _arrays(stats), strict=True))


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_nnx_keep_on_skip_none_takes_the_forward_pass_statistics_as_nnx_optimizer(model_name):
  batches = _batches(5, nan_at=(4,))
  model, optimizer = _train_nnx(ogf.Optimizer, model_name, "skip_on_spike", batches,
                                keep_on_skip=None)
  assert bool(optimizer.opt_state.last_skipped[...])
  ref_model = _model(model_name)
  ref = nnx.Optimizer(ref_model, _guard(), wrt=nnx.Param)
  for x, y in batches:
    _nnx_step(ref_model, ref, x, y)  # no restoring: nnx.Optimizer as it is
  _assert_same(nnx.state(model), nnx.state(ref_model))
  _assert_same(nnx.state(optimizer), nnx.state(ref))


def test_nnx_a_nan_input_batch_leaves_the_batch_statistics_finite():
  model = _model("bn_dropout")
  optimizer = ogf.Optimizer(model, _guard(), wrt=nnx.Param)
  x, y = _batches(1)[0]
  _nnx_step(model, optimizer, x, y)
  stats = _snapshot(nnx.state(model, nnx.BatchStat))
  _nnx_step(model, optimizer, x.at[0, 0].set(jnp.nan), y)  # a NaN input: NaN statistics
  assert bool(optimizer.opt_state.last_skipped[...])
  _assert_same(nnx.as_pure(nnx.state(model, nnx.BatchStat)), stats, exact=True)


@pytest.mark.parametrize("tx", [
    lambda: optax.chain(og.skip_nonfinite(optax.adam(1e-2))),
    lambda: optax.MultiSteps(og.skip_nonfinite(optax.adam(1e-2)), 2),
], ids=["chain(guard)", "MultiSteps(guard)"])
def test_nnx_keep_on_skip_needs_the_guard_outermost(tx):
  model = _model("bn_dropout")
  optimizer = ogf.Optimizer(model, tx(), wrt=nnx.Param)
  with pytest.raises(ValueError, match=r"keep_on_skip.*outermost"):
    _nnx_step(model, optimizer, *_batches(1)[0])
  # keep_on_skip=None: the step runs as with nnx.Optimizer
  optimizer = ogf.Optimizer(model, tx(), wrt=nnx.Param, keep_on_skip=None)
  _nnx_step(model, optimizer, *_batches(1)[0])


def test_nnx_accepts_multisteps_with_the_guard_outside():
  batches = _batches(4, nan_at=(1,))
  tx = lambda: og.skip_nonfinite(optax.MultiSteps(optax.adam(1e-2), 2))
  model = nnx.Linear(8, 1, rngs=nnx.Rngs(0))  # no dropout: the same forward passes
  optimizer = ogf.Optimizer(model, tx(), wrt=nnx.Param)
  for x, y in batches:
    _nnx_step(model, optimizer, x, y)
  # micro-batches 0, (NaN: skipped), 2, 3 give what 0, 2, 3 give unguarded
  ref_model = nnx.Linear(8, 1, rngs=nnx.Rngs(0))
  ref = nnx.Optimizer(ref_model, optax.MultiSteps(optax.adam(1e-2), 2), wrt=nnx.Param)
  for i in (0, 2, 3):
    loss, grads = nnx.value_and_grad(_loss)(ref_model, *batches[i])
    ref.update(ref_model, grads)
  _assert_same(nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param))
  assert int(og.guard_stats(optimizer.opt_state)["skip_nonfinite/num_skipped"]) == 1


def test_nnx_jax_jit_on_split_state_with_donation():
  batches = _batches(6, nan_at=(3,))
  model = _model("bn_dropout")
  optimizer = ogf.Optimizer(model, _guard(), wrt=nnx.Param, keep_on_skip=None)
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads, value=loss)
    return nnx.state((model, optimizer)), loss

  for x, y in batches:
    state, _ = step(state, x, y)
  model, optimizer = nnx.merge(graphdef, state)
  ref_model = _model("bn_dropout")
  ref = nnx.Optimizer(ref_model, _guard(), wrt=nnx.Param)
  for x, y in batches:
    _nnx_step(ref_model, ref, x, y)
  _assert_same(nnx.state(model), nnx.state(ref_model))
  _assert_same(nnx.state(optimizer), nnx.state(ref))


def test_nnx_optimizer_eager_update_and_keyword_extras():
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  inner = optax.chain(optax.sgd(0.1), og.reduce_on_plateau(patience=0, factor=0.5))
  optimizer = ogf.Optimizer(model, og.skip_nonfinite(inner), wrt=nnx.Param)
  x = jnp.ones((2, 3))
  for value in (1.0, 2.0):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    assert optimizer.update(model, grads, value=jnp.float32(value)) is None
  assert float(og.guard_stats(optimizer.opt_state)["reduce_on_plateau/scale"]) == 0.5
  with pytest.raises(TypeError):
    optimizer.update(grads)  # the grads-only call of old Flax versions


def test_nnx_optimizer_with_a_filter_updates_only_the_selected_variables():
  model = _model("bn_dropout")
  frozen = _snapshot(nnx.state(model, nnx.PathContains("hidden")))
  wrt = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("hidden")))
  ours = ogf.Optimizer(model, _guard(), wrt=wrt)
  ref_model = _model("bn_dropout")
  ref = nnx.Optimizer(ref_model, _guard(), wrt=wrt)
  for (x, y), (m, o) in zip(_batches(3) * 2, [(model, ours)] * 3 + [(ref_model, ref)] * 3,
                            strict=True):
    diff = nnx.DiffState(0, wrt)
    loss, grads = nnx.value_and_grad(_loss, argnums=diff)(m, x, y)
    o.update(m, grads, value=loss)
  _assert_same(nnx.state(model), nnx.state(ref_model))
  _assert_same(nnx.as_pure(nnx.state(model, nnx.PathContains("hidden"))), frozen, exact=True)


def test_nnx_checkpoint_layout_is_that_of_nnx_optimizer_without_keep_on_skip():
  model = _model("bn_dropout")
  # the default keeps a copy of the batch statistics: one more entry, "kept"
  default = ogf.Optimizer(model, _guard(), wrt=nnx.Param)
  assert sorted(nnx.state(default)) == ["kept", "opt_state", "step"]
  ours = ogf.Optimizer(model, _guard(), wrt=nnx.Param, keep_on_skip=None)
  ref = nnx.Optimizer(model, _guard(), wrt=nnx.Param)
  assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(ref))
  # a state written by one restores into the other
  _nnx_step(model, ours, *_batches(1)[0])
  nnx.update(ref, nnx.state(ours))
  _assert_same(nnx.state(ref), nnx.state(ours), exact=True)


def test_nnx_guard_added_to_a_running_optimizer():
  """An nnx.Optimizer run without a guard continues, guarded, from its state."""
  batches = _batches(8, nan_at=(6,))
  inner = optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-2))
  model, ref_model = _model("bn_dropout"), _model("bn_dropout")
  running = nnx.Optimizer(model, inner, wrt=nnx.Param)
  ref = nnx.Optimizer(ref_model, inner, wrt=nnx.Param)
  for x, y in batches[:4]:
    _nnx_step(model, running, x, y)
    _nnx_step(ref_model, ref, x, y)
  guard = og.skip_nonfinite(inner)
  guarded = ogf.Optimizer(model, guard, wrt=nnx.Param)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  state = og.add_guard_state(guard, nnx.as_pure(running.opt_state), params)
  nnx.update(guarded.opt_state, nnx.state(state))
  guarded.step[...] = running.step[...]
  for x, y in batches[4:6]:
    _nnx_step(model, guarded, x, y)
    _nnx_step(ref_model, ref, x, y)
  _assert_same(nnx.state(model), nnx.state(ref_model))
  _assert_same(nnx.as_pure(guarded.opt_state.inner_state), nnx.as_pure(ref.opt_state))
  assert int(guarded.step[...]) == 6
  _nnx_step(model, guarded, *batches[6])
  assert int(guarded.opt_state.num_skipped[...]) == 1


# ---------------------------------------------------------------------------
# linen
# ---------------------------------------------------------------------------


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Dense(16, use_bias=False)(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
    h = nn.Dropout(0.2, deterministic=not train)(nn.relu(h))
    return nn.Dense(1)(h)


class OursWithStats(ogf.TrainState):
  batch_stats: Any


class FlaxWithStats(train_state.TrainState):
  batch_stats: Any


def _linen_state(cls, tx):
  model = LinenNet()
  variables = model.init(jax.random.key(0), jnp.ones((2, 8)), train=False)
  return cls.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                    batch_stats=variables["batch_stats"])


def _linen_grads(state, x, y, key):
  def loss_fn(params):
    out, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True,
        mutable=["batch_stats"], rngs={"dropout": key})
    return jnp.mean((out - y) ** 2), updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return loss, batch_stats, grads


@functools.partial(jax.jit, donate_argnums=0)
def _linen_step(state, x, y, key):
  loss, batch_stats, grads = _linen_grads(state, x, y, key)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss


@functools.partial(jax.jit, donate_argnums=0)
def _linen_ref_step(state, x, y, key):
  """Flax's ``apply_gradients``, the statistics of a skipped step put back by hand."""
  loss, batch_stats, grads = _linen_grads(state, x, y, key)
  new = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  skipped = _any_skipped(new.opt_state)
  if skipped is not None:
    kept = jax.tree.map(lambda o, n: jnp.where(skipped, o, n), state.batch_stats, batch_stats)
    new = new.replace(batch_stats=kept)
  return new, loss


@functools.partial(jax.jit, donate_argnums=0)
def _linen_step_with_value(state, x, y, key):
  loss, batch_stats, grads = _linen_grads(state, x, y, key)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats, value=loss), loss


def _train_linen(cls, tx_name, batches, step=_linen_step):
  state = _linen_state(cls, TXS[tx_name]())
  for i, (x, y) in enumerate(batches):
    state, _ = step(state, x, y, jax.random.key(100 + i))
  return state


@pytest.mark.parametrize("tx_name", sorted(TXS))
def test_linen_train_state_equals_flax_train_state(tx_name):
  nan_at = () if tx_name == "adamw" else (5,)
  batches = _batches(8, nan_at=nan_at)
  ours = _train_linen(OursWithStats, tx_name, batches)
  ref = _train_linen(FlaxWithStats, tx_name, batches, step=_linen_ref_step)
  assert type(ours) is OursWithStats
  _assert_same(ours.params, ref.params)
  _assert_same(ours.batch_stats, ref.batch_stats)
  _assert_same(ours.opt_state, ref.opt_state)
  assert int(ours.step) == int(ref.step) == 8
  if nan_at:
    skipped = [v for k, v in og.guard_stats(ours.opt_state).items() if k.endswith("num_skipped")]
    assert any(int(v) > 0 for v in skipped)


def test_linen_skipped_step_keeps_params_and_the_fields_passed_as_keywords():
  batches = _batches(5, nan_at=(4,))
  state = _train_linen(OursWithStats, "skip_nonfinite", batches[:4])
  params = jax.tree.map(jnp.copy, state.params)
  opt_inner = jax.tree.map(jnp.copy, state.opt_state.inner_state)
  stats = jax.tree.map(jnp.copy, state.batch_stats)
  state, loss = _linen_step(state, *batches[4], jax.random.key(104))
  assert not bool(jnp.isfinite(loss)) and bool(state.opt_state.last_skipped)
  _assert_same(state.params, params, exact=True)
  _assert_same(state.opt_state.inner_state, opt_inner, exact=True)
  # the batch never happened: batch_stats keep their old values
  _assert_same(state.batch_stats, stats, exact=True)
  assert int(state.step) == 5
  # an applied step takes the new ones
  state, _ = _linen_step(state, *batches[0], jax.random.key(105))
  assert any(not np.array_equal(a, b)
             for a, b in zip(_arrays(state.batch_stats), _arrays(stats), strict=True))


def test_linen_value_is_forwarded_and_fields_are_replaced():
  batches = _batches(3)
  state = _train_linen(OursWithStats, "skip_on_spike", batches, step=_linen_step_with_value)
  assert int(state.opt_state.value.count) == 3  # value= reached skip_on_spike
  # Flax's own TrainState takes every keyword for a field
  ref = _linen_state(FlaxWithStats, _guard())
  _, batch_stats, grads = _linen_grads(ref, *batches[0], jax.random.key(0))
  with pytest.raises(TypeError):
    ref.apply_gradients(grads=grads, batch_stats=batch_stats, value=1.0)


def test_linen_without_extra_fields_and_with_a_plain_optimizer():
  model = nn.Dense(2)
  x = jnp.ones((3, 4))
  params = model.init(jax.random.key(0), x)["params"]
  tx = optax.adam(1e-2)
  ours = ogf.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  ref = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  for _ in range(3):
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(ours.params)
    ours = ours.apply_gradients(grads=grads)
    ref = ref.apply_gradients(grads=grads)
  _assert_same((ours.params, ours.opt_state, ours.step), (ref.params, ref.opt_state, ref.step))


def test_linen_overwrite_with_gradient_params_as_in_flax():
  params = {"params": {"w": jnp.ones(3)}, OVERWRITE_WITH_GRADIENT: {"scale": jnp.ones(())}}
  grads = {"params": {"w": jnp.full(3, 0.5)}, OVERWRITE_WITH_GRADIENT: {"scale": jnp.full((), 7.0)}}
  tx = og.skip_nonfinite(optax.sgd(0.1))
  ours = ogf.TrainState.create(apply_fn=None, params=params, tx=tx).apply_gradients(grads=grads)
  ref = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  ref = ref.apply_gradients(grads=grads)
  _assert_same(ours.params, ref.params, exact=True)
  chex.assert_trees_all_equal(ours.opt_state, ref.opt_state)
