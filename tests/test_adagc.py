"""Tests of AdaGC (optax_guard/_adagc.py).

Checked against a plain-NumPy float64 reimplementation of Algorithm 1 of
Wang et al. (2025) written here (with the differences the docstring states:
zero and non-finite norms never enter ``gamma``), over sequences with
spikes confined to one tensor, zero gradients and non-finite values.
Properties: a spike in one tensor leaves every other tensor bitwise
unchanged; a scanned tree and its unrolled twin get the same updates.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import assert_bitwise_equal, f64
from flax import serialization
from hypothesis import given
from hypothesis import strategies as st

import optax_guard as og

SHAPES = {"emb": (6, 4), "w": (4, 3), "b": (3,), "s": ()}


def _grads(seed, steps, *, faults=True):
  """Per step a dict of float32 leaves; spikes in one tensor, zeros and non-finite values."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    level = 1.0 / (1.0 + 0.1 * t)
    g = {k: (level * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    kind = rng.choice(["plain", "spike", "zero_leaf", "nan", "inf"] if faults else
                      ["plain", "spike"], p=[0.55, 0.2, 0.1, 0.075, 0.075] if faults else
                      [0.7, 0.3])
    leaf = rng.choice(list(SHAPES))
    if kind == "spike":
      g[leaf] = g[leaf] * np.float32(rng.choice([30.0, 1e3]))
    elif kind == "zero_leaf":
      g[leaf] = np.zeros_like(g[leaf])
    elif kind in ("nan", "inf") and t > 0:
      g[leaf] = np.asarray(g[leaf]).copy()
      g[leaf].reshape(-1)[0] = np.nan if kind == "nan" else np.inf
    out.append({k: jnp.asarray(v) for k, v in g.items()})
  return out


def _np_adagc(grads, *, lambda_abs=1.0, lambda_rel=1.05, beta=0.98, warmup_steps=100):
  """Algorithm 1 of the paper, per tensor, in float64 (zero/non-finite norms not recorded)."""
  count, gamma = 0, {k: 0.0 for k in SHAPES}
  outs, gammas = [], []
  with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
    for g in grads:
      g = {k: f64(v) for k, v in g.items()}
      norms = {k: float(np.sqrt(np.sum(v * v))) for k, v in g.items()}
      total = sum(n * n for n in norms.values())
      finite = np.isfinite(total)
      out = {}
      if count < warmup_steps:
        gnorm = np.sqrt(total)
        h = 1.0 if gnorm <= lambda_abs else lambda_abs / gnorm
        for k, v in g.items():
          out[k] = h * v
          x = h * norms[k]
          if finite and np.isfinite(x) and x > 0:
            gamma[k] = x if gamma[k] == 0 else min(gamma[k], x)
      else:
        for k, v in g.items():
          if gamma[k] == 0:
            h, x = 1.0, norms[k]
          else:
            bound = lambda_rel * gamma[k]
            h = 1.0 if norms[k] <= bound else bound / norms[k]
            x = min(norms[k], bound)
          out[k] = h * v
          if np.isfinite(norms[k]) and x > 0:
            gamma[k] = x if gamma[k] == 0 else beta * gamma[k] + (1 - beta) * x
      if finite:
        count += 1
      outs.append(out)
      gammas.append(dict(gamma))
  return outs, gammas


def _run(tx, grads, jit=True):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(grads[0])
  outs, states = [], []
  for g in grads:
    u, state = update(g, state)
    outs.append(u)
    states.append(state)
  return outs, states


@pytest.mark.parametrize("seed, kwargs", [
    (0, dict(warmup_steps=5)),
    (1, dict(warmup_steps=3, lambda_abs=2.0, lambda_rel=1.2, beta=0.9)),
    (2, dict(warmup_steps=0)),
    (3, dict(warmup_steps=8, lambda_abs=float("inf"))),
], ids=["short_warmup", "other_constants", "no_warmup", "warmup_records_only"])
def test_adagc_matches_numpy_reference(seed, kwargs):
  grads = _grads(seed, 40)
  outs, states = _run(og.adagc(**kwargs), grads)
  want, gammas = _np_adagc(grads, **kwargs)
  for t, (got, ref) in enumerate(zip(outs, want, strict=True)):
    for k in SHAPES:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-30, err_msg=f"{t} {k}")
      np.testing.assert_allclose(states[t].gamma[k], gammas[t][k], rtol=1e-5, err_msg=f"{t} {k}")


def _warmed_up(seed):
  """An adagc state after its warm-up and a few adaptive steps on ordinary gradients."""
  tx = og.adagc(warmup_steps=3)
  grads = _grads(seed, 8, faults=False)
  grads = [{k: v / (1 + 10 * float(jnp.max(jnp.abs(v)))) for k, v in g.items()} for g in grads]
  state = tx.init(grads[0])
  for g in grads:
    _, state = tx.update(g, state)
  return tx, state


@given(st.integers(0, 2**31 - 1), st.sampled_from(list(SHAPES)),
       st.sampled_from([1.5, 30.0, 1e4]), st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_adagc_spike_in_one_tensor_leaves_the_others_bitwise(seed, leaf, factor, dtype):
  tx, state = _warmed_up(seed % 7)
  rng = np.random.default_rng(seed)
  g = {k: jnp.asarray(0.5 * np.asarray(state.gamma[k]) / np.sqrt(max(np.prod(s), 1))
                      * rng.uniform(-1, 1, s), jnp.float32).astype(dtype)
       for k, s in SHAPES.items()}  # every tensor well under its bound
  spiked = {**g, leaf: g[leaf] * jnp.asarray(factor * 1e3, dtype)}
  out, new = tx.update(spiked, state)
  others = [k for k in SHAPES if k != leaf]
  assert_bitwise_equal({k: out[k] for k in others}, {k: spiked[k] for k in others})
  bound = 1.05 * float(state.gamma[leaf])
  norm = float(jnp.linalg.norm(out[leaf].astype(jnp.float32)))
  if float(jnp.linalg.norm(spiked[leaf].astype(jnp.float32))) > 0:
    assert norm == pytest.approx(bound, rel=1e-2 if dtype == jnp.bfloat16 else 1e-5)
    assert int(new.num_clipped) == 1


def test_adagc_versus_global_clipping_on_a_localized_spike():
  tx, state = _warmed_up(3)
  g = {k: jnp.full(s, 1e-3, jnp.float32) for k, s in SHAPES.items()}
  g["emb"] = g["emb"].at[2].set(1e3)  # the rows of one token
  out, _ = tx.update(g, state)
  clip = og.clip_by_global_norm(float(jnp.sqrt(sum(jnp.sum(x * x) for x in state.gamma.values()))))
  glob, _ = clip.update(g, optax.EmptyState())
  for k in ("w", "b", "s"):
    np.testing.assert_array_equal(out[k], g[k])  # untouched by AdaGC
    assert float(jnp.max(jnp.abs(glob[k]))) < 1e-3 * 1e-2  # shrunk by the global clip


def test_adagc_zero_gradient_in_warmup_does_not_freeze_the_tensor():
  tx = og.adagc(warmup_steps=3)
  state = tx.init({"a": jnp.zeros(2), "expert": jnp.zeros(2)})
  for t in range(3):  # the expert gets no tokens in the second warm-up step
    e = jnp.zeros(2) if t == 1 else jnp.array([0.3, 0.4])
    _, state = tx.update({"a": jnp.ones(2), "expert": e}, state)
  # the clipped norm 0.5 / 1.5 of the steps with a gradient; the paper's minimum would be 0
  assert float(state.gamma["expert"]) == pytest.approx(1 / 3, rel=1e-6)
  out, state = tx.update({"a": jnp.ones(2), "expert": jnp.array([0.3, 0.4])}, state)
  assert float(jnp.linalg.norm(out["expert"])) > 0.3


def test_adagc_tensor_without_history_is_not_clipped_and_starts_one():
  tx = og.adagc(warmup_steps=2)
  state = tx.init({"a": jnp.zeros(2), "late": jnp.zeros(2)})
  for _ in range(4):
    _, state = tx.update({"a": jnp.ones(2), "late": jnp.zeros(2)}, state)
  assert float(state.gamma["late"]) == 0.0
  g = {"a": jnp.ones(2), "late": jnp.array([30.0, 40.0])}
  out, state = tx.update(g, state)
  np.testing.assert_array_equal(out["late"], g["late"])
  assert float(state.gamma["late"]) == 50.0


def test_adagc_nonfinite_tensor_is_not_hidden_and_not_recorded():
  tx, state = _warmed_up(4)
  g = {k: jnp.asarray(0.01 * np.ones(s), jnp.float32) for k, s in SHAPES.items()}
  g["w"] = g["w"].at[0, 0].set(jnp.nan)
  g["b"] = g["b"].at[1].set(jnp.inf)
  out, new = tx.update(g, state)
  assert bool(jnp.all(jnp.isnan(out["w"])))
  assert np.isnan(out["b"][1]) and bool(jnp.all(out["b"][jnp.array([0, 2])] == 0))
  np.testing.assert_array_equal(out["emb"], g["emb"])
  for k in ("w", "b"):
    assert float(new.gamma[k]) == float(state.gamma[k])
  assert float(new.gamma["emb"]) != float(state.gamma["emb"])


def test_adagc_nonfinite_step_in_warmup_counts_nothing():
  tx = og.adagc(warmup_steps=3)
  g = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([1.0])}
  state = tx.init(g)
  _, state = tx.update(g, state)
  bad = {"a": jnp.array([jnp.nan, 0.4]), "b": jnp.array([1.0])}
  out, new = tx.update(bad, state)
  assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(out))  # global NaN norm
  chex.assert_trees_all_equal((new.count, new.gamma), (state.count, state.gamma))


# ---------------------------------------------------------------------------
# Stacked layers
# ---------------------------------------------------------------------------


def _scanned(rng, spike_layer=None, t=0):
  """Gradients of a 3-layer scanned model: random directions, each tensor's norm
  ``0.1 * 0.99**t`` (slowly falling, so that only the spike is clipped)."""

  def draw(shape, lead):
    x = rng.standard_normal(shape)
    axes = tuple(range(lead, x.ndim))
    return (0.1 * 0.99**t * x / np.sqrt(np.sum(x * x, axis=axes, keepdims=True))).astype(
        np.float32)

  k, b = draw((3, 4, 5), 1), draw((3, 5), 1)
  if spike_layer is not None:
    k[spike_layer] *= 1e3
  return {"layers": {"kernel": jnp.asarray(k), "bias": jnp.asarray(b)},
          "head": jnp.asarray(draw((5, 2), 0))}


def _unroll(tree):
  out = {"head": tree["head"]}
  for i in range(3):
    out[f"layer{i}"] = jax.tree.map(lambda x, i=i: x[i], tree["layers"])
  return out


@pytest.mark.parametrize("stacked", [
    {"layers": 1, "head": None},
    lambda path, leaf: int("layers" in jax.tree_util.keystr(path)),
], ids=["prefix_tree", "callable"])
def test_adagc_scanned_equals_unrolled(stacked):
  """The same updates, to float32 rounding: the warm-up's global norm adds the same
  per-layer sums of squares in another order (an ulp apart); after the warm-up each
  layer's factor is its own, and a layer that is not clipped is multiplied by 1 alike."""
  rng = np.random.default_rng(0)
  grads = [_scanned(rng, 1 if t in (5, 8) else None, t) for t in range(10)]
  outs_s, states_s = _run(og.adagc(warmup_steps=3, stacked=stacked), grads)
  outs_u, states_u = _run(og.adagc(warmup_steps=3), [_unroll(g) for g in grads])
  for a, b in zip(outs_s, outs_u, strict=True):
    chex.assert_trees_all_close(_unroll(a), b, rtol=1e-6, atol=0)
  assert states_s[-1].gamma["layers"]["kernel"].shape == (3,)
  for i in range(3):
    np.testing.assert_allclose(states_s[-1].gamma["layers"]["kernel"][i],
                               states_u[-1].gamma[f"layer{i}"]["kernel"], rtol=1e-6)
  assert [int(s.num_clipped) for s in states_s] == [int(s.num_clipped) for s in states_u]
  assert int(states_s[5].num_clipped) == 1  # the spiked layer only
  # from the same state, an unclipped layer comes back bitwise in both layouts
  for t in (5, 8):
    for name in ("layer0", "layer2"):
      assert_bitwise_equal(_unroll(outs_s[t])[name], _unroll(grads[t])[name])
      assert_bitwise_equal(outs_u[t][name], _unroll(grads[t])[name])


def test_adagc_stacked_init_on_shape_dtype_struct():
  tree = _scanned(np.random.default_rng(1))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  state = og.adagc(stacked={"layers": 1, "head": 0}).init(abstract)
  assert state.gamma["layers"]["bias"].shape == (3,) and state.gamma["head"].shape == ()


# ---------------------------------------------------------------------------
# Transformations: vmap, guard_stats, checkpoints, defaults, bad inputs
# ---------------------------------------------------------------------------


def test_adagc_vmap_over_independent_runs_equals_a_loop():
  tx = og.adagc(warmup_steps=2)
  runs = [_grads(s, 6, faults=False) for s in range(3)]
  loop = [_run(tx, g)[0] for g in runs]
  state = jax.vmap(tx.init)(jax.tree.map(lambda *x: jnp.stack(x), *[r[0] for r in runs]))
  update = jax.jit(jax.vmap(tx.update))
  for t in range(6):
    u, state = update(jax.tree.map(lambda *x: jnp.stack(x), *[r[t] for r in runs]), state)
    for i in range(3):
      chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], u), loop[i][t], rtol=1e-6)


def test_adagc_total_clipped_adds_up_the_per_step_counts():
  """A logger reading every N steps misses no clip: ``total_clipped`` is the running sum."""
  tx = og.adagc(warmup_steps=2)
  grads = _grads(3, 30)
  state = tx.init(grads[0])
  per_step, totals = [], []
  for g in grads:
    _, state = tx.update(g, state)
    per_step.append(int(state.num_clipped))
    totals.append(int(og.guard_stats(state)["adagc/total_clipped"]))
  assert sum(c > 0 for c in per_step) >= 3  # clips on several steps
  assert totals == np.cumsum(per_step).tolist()
  saturated = state._replace(total_clipped=jnp.int32(2**31 - 2))
  _, new = tx.update({k: 1e3 * v for k, v in grads[0].items()}, saturated)
  assert int(new.num_clipped) >= 2 and int(new.total_clipped) == 2**31 - 1


def test_adagc_guard_stats():
  tx, state = _warmed_up(0)
  stats = og.guard_stats(state)
  assert {"adagc/count", "adagc/norm", "adagc/num_clipped", "adagc/total_clipped",
          "adagc/gamma/emb"} <= set(stats)


def test_adagc_checkpoint_round_trip_and_continuation():
  tx = og.adagc(warmup_steps=3, stacked={"layers": 1, "head": 0})
  rng = np.random.default_rng(2)
  grads = [_scanned(rng, 2 if t == 7 else None, t) for t in range(12)]
  step = jax.jit(tx.update)
  state = tx.init(grads[0])
  for g in grads[:6]:
    _, state = step(g, state)
  restored = serialization.from_bytes(tx.init(grads[0]), serialization.to_bytes(state))
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_dtypes(restored, state)
  a, b = state, restored
  for g in grads[6:]:
    ua, a = step(g, a)
    ub, b = step(g, b)
    assert_bitwise_equal(ua, ub)
  assert_bitwise_equal(a, b)


def test_adagc_defaults_are_the_papers():
  import inspect
  params = inspect.signature(og.adagc).parameters
  assert params["lambda_abs"].default == 1.0 and params["lambda_rel"].default == 1.05
  assert params["beta"].default == 0.98 and params["warmup_steps"].default == 100


@pytest.mark.parametrize("kwargs, match", [
    (dict(lambda_rel=0.9), r"adagc\(lambda_rel=...\) must be >= 1"),
    (dict(lambda_abs=0.0), r"adagc\(lambda_abs=...\)"),
    (dict(beta=1.5), r"adagc\(beta=...\)"),
    (dict(warmup_steps=-1), r"adagc\(warmup_steps=...\)"),
    (dict(stacked=1.5), r"adagc\(stacked=...\)"),
    (dict(axis_name=3), r"adagc\(axis_name=...\)"),
])
def test_adagc_bad_hyperparameters(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    og.adagc(**kwargs)


def test_adagc_stacked_count_above_ndim_names_the_leaf():
  tx = og.adagc(stacked=2)
  g = {"v": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"adagc\(stacked=...\).*\['v'\]"):
    tx.init(g)
