"""QK-clip: the clipped weights against NumPy float64 references for every layout.

The references scale the new weights ``p + u`` head by head with explicit
loops over the heads (no reshapes shared with the implementation), from the
rule: ``gamma_h = 1`` if ``S_h <= tau`` else ``max(tau / S_h, min_factor)``;
query head ``h`` times ``gamma_h ** alpha``; key head ``g`` times
``min(gamma over its query heads) ** (1 - alpha)``.
"""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import assert_bitwise_equal
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import optax_guard as og
from optax_guard import _qk_clip as qk

D, HD = 5, 3  # model width, head width


def _rand(seed, shape, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _gamma(s, tau, floor=1e-6):
  s = np.asarray(s, np.float64)
  return np.where(s <= tau, 1.0, np.maximum(tau / np.where(s > 0, s, 1.0), floor))


def _k_gamma(gamma, num_kv):
  r = len(gamma) // num_kv
  return np.array([min(gamma[g * r:(g + 1) * r]) for g in range(num_kv)])


def _apply(tx, params, grads, maxima, **extra):
  state = tx.init(params)
  u, state = tx.update(grads, state, params, attn_max_logits=maxima, **extra)
  return u, state, optax.apply_updates(params, u)


def _assert_weights(got, want):
  want = np.asarray(want, np.float64)
  tol = 2e-6 * max(1.0, float(np.max(np.abs(want))))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=tol)


def _f64_new(params, grads):
  return jax.tree.map(lambda p, g: np.asarray(p, np.float64) + np.asarray(g, np.float64),
                      params, grads)


# ---------------------------------------------------------------------------
# Layouts against the NumPy reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("heads, kv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_qk_clip_fused_matches_numpy_reference(heads, kv, alpha):
  width = (heads + 2 * kv) * HD
  params = {"attn": {"qkv": {"kernel": _rand(0, (D, width)), "bias": _rand(1, (width,))},
                     "out": {"kernel": _rand(2, (heads * HD, D))}}}
  grads = jax.tree.map(lambda x: 0.1 * x, jax.tree.map(jnp.flip, params))
  maxima = jnp.asarray([[3.0, 50.0, 9.0, 1.0], [20.0, 4.0, 12.0, 2.0]][:2], jnp.float32)
  tau = 10.0
  tx = og.qk_clip(tau, og.qk_fused("attn/qkv", num_kv_heads=None if kv == heads else kv),
                  alpha=alpha)
  u, state, new = _apply(tx, params, grads, maxima)

  gamma = _gamma(np.max(maxima, axis=0), tau)
  kg = _k_gamma(gamma, kv)
  want = _f64_new(params, grads)["attn"]["qkv"]
  for leaf in ("kernel", "bias"):
    w = want[leaf]
    for h in range(heads):
      w[..., h * HD:(h + 1) * HD] *= gamma[h] ** alpha
    for g in range(kv):
      w[..., (heads + g) * HD:(heads + g + 1) * HD] *= kg[g] ** (1 - alpha)
    _assert_weights(new["attn"]["qkv"][leaf], w)
    v = slice((heads + kv) * HD, None)
    assert_bitwise_equal(u["attn"]["qkv"][leaf][..., v], grads["attn"]["qkv"][leaf][..., v])
  assert_bitwise_equal(u["attn"]["out"], grads["attn"]["out"])
  assert int(state.num_clipped) == 3  # heads 0 (20), 1 (50), 2 (12)
  np.testing.assert_allclose(state.smallest_factor, 0.2, rtol=1e-6)
  assert float(state.max_logit) == 50.0


@pytest.mark.parametrize("kv", [4, 2])
def test_qk_separate_dense_general_with_biases(kv):
  heads = 4
  params = {"q": {"kernel": _rand(0, (D, heads, HD)), "bias": _rand(1, (heads, HD))},
            "k": {"kernel": _rand(2, (D, kv, HD)), "bias": _rand(3, (kv, HD))},
            "v": {"kernel": _rand(4, (D, kv, HD))}}
  grads = jax.tree.map(lambda x: -0.2 * x, params)
  maxima = jnp.asarray([15.0, 2.0, 2.0, 40.0])
  tx = og.qk_clip(10.0, og.qk_separate("q", "k", head_axis=-2, num_kv_heads=kv))
  u, state, new = _apply(tx, params, grads, maxima)

  gamma = _gamma(maxima, 10.0)
  kg = _k_gamma(gamma, kv)
  want = _f64_new(params, grads)
  for h in range(heads):
    want["q"]["kernel"][:, h, :] *= np.sqrt(gamma[h])
    want["q"]["bias"][h, :] *= np.sqrt(gamma[h])
  for g in range(kv):
    want["k"]["kernel"][:, g, :] *= np.sqrt(kg[g])
    want["k"]["bias"][g, :] *= np.sqrt(kg[g])
  for proj in ("q", "k"):
    for leaf in ("kernel", "bias"):
      _assert_weights(new[proj][leaf], want[proj][leaf])
  assert_bitwise_equal(u["v"], grads["v"])
  # unclipped query heads 1 and 2 are bitwise untouched
  assert_bitwise_equal(u["q"]["kernel"][:, 1:3], grads["q"]["kernel"][:, 1:3])
  assert int(state.num_clipped) == 2


def test_qk_separate_flat_kernels_head_axis_last():
  heads = 2
  params = {"wq": _rand(0, (D, heads * HD)), "wk": _rand(1, (D, heads * HD))}
  grads = jax.tree.map(lambda x: 0.5 * x, params)
  maxima = jnp.asarray([[30.0, 1.0]])
  tx = og.qk_clip(6.0, og.qk_separate("wq", "wk", head_axis=-1))
  _, _, new = _apply(tx, params, grads, maxima)
  want = _f64_new(params, grads)
  for name in ("wq", "wk"):
    want[name][:, :HD] *= np.sqrt(6.0 / 30.0)
    _assert_weights(new[name], want[name])


def test_qk_separate_shared_parameters_get_the_worst_factor():
  """qk-layernorm: scales and biases shared by every head."""
  params = {"q_norm": {"scale": _rand(0, (HD,)), "bias": _rand(1, (HD,))},
            "k_norm": {"scale": _rand(2, (HD,)), "bias": _rand(3, (HD,))}}
  grads = jax.tree.map(lambda x: 0.1 * x, params)
  maxima = jnp.asarray([12.0, 40.0, 3.0])
  tx = og.qk_clip(10.0, og.qk_separate("q_norm", "k_norm", head_axis=None), alpha=0.25)
  _, state, new = _apply(tx, params, grads, maxima)
  want = _f64_new(params, grads)
  worst = 10.0 / 40.0
  for leaf in ("scale", "bias"):
    _assert_weights(new["q_norm"][leaf], want["q_norm"][leaf] * worst ** 0.25)
    _assert_weights(new["k_norm"][leaf], want["k_norm"][leaf] * worst ** 0.75)
  assert int(state.num_clipped) == 2


def _stacked_model(layers, heads):
  width = 3 * heads * HD
  return {"blocks": {"qkv": {"kernel": _rand(0, (layers, D, width)),
                             "bias": _rand(1, (layers, width))},
                     "mlp": _rand(2, (layers, D, D))},
          "embed": _rand(3, (7, D))}


def test_qk_clip_stacked_layers_match_reference_and_unrolled_twin():
  layers, heads = 3, 2
  params = _stacked_model(layers, heads)
  grads = jax.tree.map(lambda x: 0.3 * x, params)
  maxima = jnp.asarray(np.random.default_rng(5).uniform(0.0, 30.0, (layers, 4, heads)),
                       jnp.float32)
  stacked = lambda path, leaf: 1 if jax.tree_util.keystr(path).startswith("['blocks']") else 0
  tx = og.qk_clip(10.0, og.qk_fused("blocks/qkv"), stacked=stacked)
  u, state, new = _apply(tx, params, grads, maxima)

  s = np.max(np.asarray(maxima, np.float64), axis=1)  # [layers, heads]
  want = _f64_new(params, grads)["blocks"]["qkv"]
  for leaf in ("kernel", "bias"):
    w = want[leaf]
    for layer in range(layers):
      gamma = _gamma(s[layer], 10.0)
      for h in range(heads):
        w[layer, ..., h * HD:(h + 1) * HD] *= np.sqrt(gamma[h])
        w[layer, ..., (heads + h) * HD:(heads + h + 1) * HD] *= np.sqrt(gamma[h])
    _assert_weights(new["blocks"]["qkv"][leaf], w)
  assert_bitwise_equal(u["blocks"]["mlp"], grads["blocks"]["mlp"])
  assert int(state.num_clipped) == int(np.sum(s > 10.0)) > 0

  # the unrolled twin: one layout per layer, one [batch, heads] array each
  unrolled = {f"layer{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"]["qkv"])
              for i in range(layers)}
  ugrads = {f"layer{i}": jax.tree.map(lambda x, i=i: x[i], grads["blocks"]["qkv"])
            for i in range(layers)}
  utx = og.qk_clip(10.0, [og.qk_fused(f"layer{i}") for i in range(layers)])
  uu, ustate, _ = _apply(utx, unrolled, ugrads, [maxima[i] for i in range(layers)])
  for i in range(layers):
    assert_bitwise_equal(uu[f"layer{i}"], jax.tree.map(lambda x, i=i: x[i], u["blocks"]["qkv"]))
  chex.assert_trees_all_equal(ustate, state)


def test_qk_clip_stacked_int_with_layer_maxima_without_batch():
  layers, heads = 2, 2
  params = {"qkv": _rand(0, (layers, D, 3 * heads * HD))}
  grads = {"qkv": _rand(1, (layers, D, 3 * heads * HD), 0.1)}
  maxima = jnp.asarray([[1.0, 20.0], [4.0, 5.0]])  # [layers, heads]
  u, state, new = _apply(og.qk_clip(10.0, og.qk_fused("qkv"), stacked=1), params, grads, maxima)
  assert int(state.num_clipped) == 1
  assert_bitwise_equal(u["qkv"][1], grads["qkv"][1])
  want = _f64_new(params, grads)["qkv"]
  want[0, :, HD:2 * HD] *= np.sqrt(0.5)
  want[0, :, 3 * HD:4 * HD] *= np.sqrt(0.5)
  _assert_weights(new["qkv"], want)


def test_qk_clip_callable_layout_interleaved_heads():
  """GPT-NeoX-style interleaving [d, heads, (q, k, v), head_dim] through a callable."""
  heads = 3
  params = {"attn": {"qkv": {"kernel": _rand(0, (D, heads, 3, HD)),
                             "bias": _rand(1, (heads, 3, HD))}}}
  grads = jax.tree.map(lambda x: 0.2 * x, params)
  maxima = jnp.asarray([25.0, 8.0, 100.0])

  def interleaved(gamma):  # [heads] -> a multiplier [heads, 3, 1]
    s = jnp.sqrt(gamma)
    return {"attn/qkv": jnp.stack([s, s, jnp.ones_like(s)], axis=-1)[..., None]}

  u, state, new = _apply(og.qk_clip(10.0, interleaved), params, grads, maxima)
  gamma = _gamma(maxima, 10.0)
  want = _f64_new(params, grads)["attn"]["qkv"]
  for h in range(heads):
    for part in (0, 1):
      want["kernel"][:, h, part] *= np.sqrt(gamma[h])
      want["bias"][h, part] *= np.sqrt(gamma[h])
  for leaf in ("kernel", "bias"):
    _assert_weights(new["attn"]["qkv"][leaf], want[leaf])
  assert_bitwise_equal(u["attn"]["qkv"]["kernel"][:, 1], grads["attn"]["qkv"]["kernel"][:, 1])
  assert int(state.num_clipped) == 2


def test_qk_clip_callable_layout_for_mla():
  """Kimi K2's MLA rule: rotary query part by gamma, shared rotary key untouched."""
  heads, nope, rope, vdim, rank = 2, 3, 2, 4, 6
  params = {"wq_b": _rand(0, (rank, heads, nope + rope)),
            "wkv_b": _rand(1, (rank, heads, nope + vdim)),
            "wk_rope": _rand(2, (D, rope))}
  grads = jax.tree.map(lambda x: 0.1 * x, params)

  def mla(gamma):
    g = gamma[:, None]
    q = jnp.concatenate([jnp.broadcast_to(jnp.sqrt(g), (heads, nope)),
                         jnp.broadcast_to(g, (heads, rope))], axis=-1)
    k = jnp.concatenate([jnp.broadcast_to(jnp.sqrt(g), (heads, nope)),
                         jnp.ones((heads, vdim))], axis=-1)
    return {"wq_b": q, "wkv_b": k}

  u, _, new = _apply(og.qk_clip(5.0, mla), params, grads, jnp.asarray([20.0, 1.0]))
  want = _f64_new(params, grads)
  want["wq_b"][:, 0, :nope] *= 0.5
  want["wq_b"][:, 0, nope:] *= 0.25
  want["wkv_b"][:, 0, :nope] *= 0.5
  _assert_weights(new["wq_b"], want["wq_b"])
  _assert_weights(new["wkv_b"], want["wkv_b"])
  assert_bitwise_equal(u["wk_rope"], grads["wk_rope"])
  assert_bitwise_equal(u["wkv_b"][..., nope:], grads["wkv_b"][..., nope:])


def test_qk_clip_several_layers_in_a_dict_and_nnx_state_paths():
  """Layouts as a dict; Flax NNX variables' trailing ``.value`` is not part of a path."""
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Dict(a=nnx.Linear(D, 3 * 2 * HD, rngs=nnx.Rngs(0)),
                   b=nnx.Linear(D, 3 * 2 * HD, rngs=nnx.Rngs(1)))
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(lambda x: 0.1 * x, params)
  tx = og.qk_clip(10.0, {"x": og.qk_fused("a"), "y": og.qk_fused("b")})
  u, state, _ = _apply(tx, params, grads, {"x": jnp.asarray([20.0, 1.0]),
                                            "y": jnp.asarray([1.0, 2.0])})
  assert int(state.num_clipped) == 1
  assert_bitwise_equal(u["b"], grads["b"])
  assert not np.array_equal(np.asarray(u["a"]["kernel"][...]),
                            np.asarray(grads["a"]["kernel"][...]))


# ---------------------------------------------------------------------------
# Bitwise identity at or under the threshold
# ---------------------------------------------------------------------------


def _fused_case(heads=2, seed=0):
  width = 3 * heads * HD
  params = {"qkv": {"kernel": _rand(seed, (D, width)), "bias": _rand(seed + 1, (width,))},
            "other": _rand(seed + 2, (4,))}
  grads = jax.tree.map(lambda x: 0.1 * x, params)
  grads["qkv"]["kernel"] = grads["qkv"]["kernel"].at[0, 0].set(-0.0).at[1, 1].set(jnp.nan)
  return params, grads


@given(st.lists(st.sampled_from(["under", "at", "above"]), min_size=3, max_size=3),
       st.floats(0.01, 1e4))
def test_qk_clip_heads_at_or_under_threshold_are_bitwise_untouched(kinds, tau):
  heads = len(kinds)
  params, grads = _fused_case(heads)
  tau32 = float(np.float32(tau))
  value = {"under": np.nextafter(np.float32(tau32), np.float32(0)), "at": np.float32(tau32),
           "above": np.float32(tau32) * np.float32(1.5)}
  maxima = jnp.asarray([value[k] for k in kinds], jnp.float32)
  u, state, _ = _apply(og.qk_clip(tau32, og.qk_fused("qkv")), params, grads, maxima)
  for h, kind in enumerate(kinds):
    for block in (h, heads + h, 2 * heads + h):  # q, k (one kv head per q head), v
      cols = slice(block * HD, (block + 1) * HD)
      if kind != "above" or block >= 2 * heads:
        assert_bitwise_equal(u["qkv"]["kernel"][:, cols], grads["qkv"]["kernel"][:, cols])
        assert_bitwise_equal(u["qkv"]["bias"][cols], grads["qkv"]["bias"][cols])
  assert int(state.num_clipped) == kinds.count("above")
  if "above" not in kinds:
    assert_bitwise_equal(u, grads)
    assert float(state.smallest_factor) == 1.0


@pytest.mark.parametrize("tau", [10.0, float("inf")])
def test_qk_clip_no_head_clipped_returns_updates_bitwise(tau):
  params, grads = _fused_case()
  maxima = jnp.asarray([[10.0, -jnp.inf], [3.0, 9.0]])
  for jit in (False, True):
    tx = og.qk_clip(tau, og.qk_fused("qkv"))
    update = jax.jit(tx.update) if jit else tx.update
    u, state = update(grads, tx.init(params), params, attn_max_logits=maxima)
    assert_bitwise_equal(u, grads)
    assert int(state.num_clipped) == 0


def test_qk_clip_infinite_threshold_is_off_even_for_huge_logits():
  params, grads = _fused_case()
  u, state, _ = _apply(og.qk_clip(float("inf"), og.qk_fused("qkv")), params, grads,
                       jnp.asarray([1e30, 3e38]))
  assert_bitwise_equal(u, grads)
  assert int(state.num_clipped) == 0 and float(state.max_logit) == np.float32(3e38)


# ---------------------------------------------------------------------------
# Faults: non-finite maxima, the floor
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_qk_clip_nonfinite_maximum_scales_nothing_and_counts(bad):
  params, grads = _fused_case()
  tx = og.qk_clip(10.0, [og.qk_fused("qkv")])
  state = tx.init(params)
  step = jax.jit(tx.update)
  u, state = step(grads, state, params, attn_max_logits=[jnp.asarray([50.0, bad])])
  assert_bitwise_equal(u, grads)
  assert int(state.num_nonfinite) == 1 and int(state.num_clipped) == 0
  assert float(state.smallest_factor) == 1.0
  assert np.isnan(state.max_logit) if np.isnan(bad) else state.max_logit == np.inf
  u, state = step(grads, state, params, attn_max_logits=[jnp.asarray([50.0, 1.0])])
  assert int(state.num_nonfinite) == 1 and int(state.num_clipped) == 1
  assert not np.array_equal(np.asarray(u["qkv"]["bias"]), np.asarray(grads["qkv"]["bias"]))


def test_qk_clip_total_clipped_adds_up_the_per_step_counts():
  """A logger reading every N steps misses no clipped head: the running sum of heads."""
  params, grads = _fused_case(heads=3)
  tx = og.qk_clip(10.0, og.qk_fused("qkv"))
  state = tx.init(params)
  step = jax.jit(tx.update)
  maxima = [[50.0, 1.0, 20.0], [1.0, 2.0, 3.0], [11.0, 12.0, 13.0], [jnp.nan, 50.0, 50.0],
            [5.0, 40.0, 1.0]]
  per_step, totals = [], []
  for m in maxima:
    _, state = step(grads, state, params, attn_max_logits=jnp.asarray(m))
    per_step.append(int(state.num_clipped))
    totals.append(int(og.guard_stats(state)["qk_clip/total_clipped"]))
  assert per_step == [2, 0, 3, 0, 1]  # the non-finite step scales (and counts) nothing
  assert totals == np.cumsum(per_step).tolist()
  _, state = step(grads, state._replace(total_clipped=jnp.int32(2**31 - 2)), params,
                  attn_max_logits=jnp.asarray([50.0, 50.0, 50.0]))
  assert int(state.total_clipped) == 2**31 - 1


def test_qk_clip_minus_inf_maximum_is_under_the_threshold():
  params, grads = _fused_case()
  u, state, _ = _apply(og.qk_clip(10.0, og.qk_fused("qkv")), params, grads,
                       jnp.asarray([-jnp.inf, 40.0]))
  assert int(state.num_nonfinite) == 0 and int(state.num_clipped) == 1
  assert_bitwise_equal(u["qkv"]["bias"][:HD], grads["qkv"]["bias"][:HD])


def test_qk_clip_factor_never_below_the_floor():
  params, grads = _fused_case()
  for floor in (1e-6, 0.01):
    tx = og.qk_clip(1.0, og.qk_fused("qkv"), min_factor=floor)
    _, state, new = _apply(tx, params, grads, jnp.asarray([3e38, 1.0]))
    np.testing.assert_allclose(state.smallest_factor, floor, rtol=1e-6)
    want = _f64_new(params, grads)["qkv"]["kernel"]
    want[:, :HD] *= np.sqrt(floor)
    want[:, 2 * HD:3 * HD] *= np.sqrt(floor)
    _assert_weights(new["qkv"]["kernel"], want)
    assert np.all(np.asarray(new["qkv"]["kernel"][:, :HD]) != 0)


def test_qk_clip_alpha_one_scales_only_queries():
  params, grads = _fused_case()
  u, _, new = _apply(og.qk_clip(10.0, og.qk_fused("qkv"), alpha=1.0), params, grads,
                     jnp.asarray([40.0, 1.0]))
  assert_bitwise_equal(u["qkv"]["kernel"][:, 2 * HD:], grads["qkv"]["kernel"][:, 2 * HD:])
  want = _f64_new(params, grads)["qkv"]["kernel"]
  want[:, :HD] *= 0.25
  _assert_weights(new["qkv"]["kernel"], want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_qk_clip_keeps_dtypes(dtype):
  params, grads = _fused_case()
  params, grads = (jax.tree.map(lambda x: x.astype(dtype), t) for t in (params, grads))
  u, _, new = _apply(og.qk_clip(10.0, og.qk_fused("qkv")), params, grads,
                     jnp.asarray([40.0, 1.0], dtype))
  chex.assert_trees_all_equal_shapes_and_dtypes(u, grads)
  want = _f64_new(params, grads)["qkv"]["kernel"]
  want[:, :HD] *= 0.5
  want[:, 2 * HD:3 * HD] *= 0.5
  np.testing.assert_allclose(np.asarray(new["qkv"]["kernel"], np.float64), want,
                             rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------
# State, guard_stats, jit, vmap, guards, update_and_apply
# ---------------------------------------------------------------------------


def test_qk_clip_guard_stats_fields():
  params, grads = _fused_case()
  tx = optax.chain(og.monitor(), optax.sgd(0.1), og.qk_clip(10.0, og.qk_fused("qkv")))
  state = tx.init(params)
  stats = og.guard_stats(state)
  assert float(stats["qk_clip/max_logit"]) == -np.inf
  _, state = tx.update(grads, state, params, attn_max_logits=jnp.asarray([40.0, 20.0]))
  stats = og.guard_stats(state)
  assert {k for k in stats if k.startswith("qk_clip/")} == {
      "qk_clip/num_clipped", "qk_clip/total_clipped", "qk_clip/smallest_factor",
      "qk_clip/max_logit", "qk_clip/num_nonfinite"}
  assert int(stats["qk_clip/num_clipped"]) == 2
  assert float(stats["qk_clip/smallest_factor"]) == 0.25
  assert float(stats["qk_clip/max_logit"]) == 40.0
  assert stats["qk_clip/num_clipped"].dtype == jnp.int32
  assert stats["qk_clip/smallest_factor"].dtype == jnp.float32


def test_qk_clip_jit_no_retrace_and_shape_dtype_struct_init():
  params, grads = _fused_case()
  tx = optax.chain(optax.adam(0.1), og.qk_clip(10.0, og.qk_fused("qkv")))
  traces = []

  @jax.jit
  def step(p, s, g, m):
    traces.append(1)
    u, s = tx.update(g, s, p, attn_max_logits=m)
    return optax.apply_updates(p, u), s

  state = tx.init(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  state = jax.tree.map(jnp.asarray, tx.init(params))
  for i in range(3):
    params, state = step(params, state, grads, jnp.asarray([5.0 + 20 * i, 3.0]))
  assert len(traces) == 1


def test_qk_clip_vmap_over_seeds_equals_each_seed():
  seeds = [_fused_case(seed=10 * i) for i in range(3)]
  maxima = jnp.asarray([[40.0, 1.0], [5.0, 5.0], [12.0, 30.0]])
  tx = og.qk_clip(10.0, og.qk_fused("qkv"))
  params = jax.tree.map(lambda *xs: jnp.stack(xs), *[p for p, _ in seeds])
  grads = jax.tree.map(lambda *xs: jnp.stack(xs), *[g for _, g in seeds])
  u, states = jax.vmap(lambda g, p, m: tx.update(g, tx.init(p), p, attn_max_logits=m))(
      grads, params, maxima)
  for i, (p, g) in enumerate(seeds):
    ui, si = tx.update(g, tx.init(p), p, attn_max_logits=maxima[i])
    assert_bitwise_equal(jax.tree.map(lambda x, i=i: x[i], u), ui)
    chex.assert_trees_all_equal(jax.tree.map(lambda x, i=i: x[i], states), si)


def test_qk_clip_inside_guards_and_update_and_apply():
  params, grads = _fused_case()
  grads = jax.tree.map(lambda x: jnp.nan_to_num(x), grads)
  maxima = jnp.asarray([40.0, 1.0])
  inner = lambda: optax.chain(optax.adam(0.1), og.qk_clip(10.0, og.qk_fused("qkv")))
  plain = inner()
  u, _ = plain.update(grads, plain.init(params), params, attn_max_logits=maxima)
  want = optax.apply_updates(params, u)
  for guard in (og.skip_nonfinite(inner()), og.skip_on_spike(inner(), window=4, min_history=2)):
    state = guard.init(params)
    step = jax.jit(lambda p, s, g, m, guard=guard: og.update_and_apply(
        guard, g, s, p, attn_max_logits=m))
    new, state = step(params, state, grads, maxima)
    chex.assert_trees_all_close(new, want, rtol=1e-6, atol=1e-7)
    assert int(og.guard_stats(state)["qk_clip/num_clipped"]) == 1
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), grads)
    again, state = step(new, state, bad, maxima)
    assert_bitwise_equal(again, new)  # skipped: qk_clip not even called
    assert int(og.guard_stats(state)["qk_clip/num_clipped"]) == 1


# ---------------------------------------------------------------------------
# Devices: one pmax makes every replica scale identically
# ---------------------------------------------------------------------------

NDEV = 8


def _device_case():
  params, grads = _fused_case(heads=2)
  # [batch = 2 per device, heads]; head 0 is above 10 only on device 5
  maxima = np.ones((2 * NDEV, 2), np.float32)
  maxima[11, 0] = 40.0
  maxima[3, 1] = 7.0
  return params, grads, jnp.asarray(maxima)


def test_qk_clip_pmap_matches_single_device(devices):
  params, grads, maxima = _device_case()
  tx = og.qk_clip(10.0, og.qk_fused("qkv"), axis_name="d")
  single = og.qk_clip(10.0, og.qk_fused("qkv"))
  want, want_state = single.update(grads, single.init(params), params, attn_max_logits=maxima)
  out, state = jax.pmap(
      lambda m: tx.update(grads, tx.init(params), params, attn_max_logits=m), axis_name="d",
      devices=devices)(maxima.reshape(NDEV, 2, 2))
  for i in range(NDEV):
    assert_bitwise_equal(jax.tree.map(lambda x, i=i: x[i], out), want)
    chex.assert_trees_all_equal(jax.tree.map(lambda x, i=i: x[i], state), want_state)
  # without the pmax the replicas would disagree
  local = og.qk_clip(10.0, og.qk_fused("qkv"))
  out, _ = jax.pmap(lambda m: local.update(grads, local.init(params), params,
                                           attn_max_logits=m), devices=devices)(
      maxima.reshape(NDEV, 2, 2))
  assert not np.array_equal(np.asarray(out["qkv"]["bias"][0]), np.asarray(out["qkv"]["bias"][5]))


def test_qk_clip_shard_map_matches_single_device(devices):
  params, grads, maxima = _device_case()
  tx = og.qk_clip(10.0, og.qk_fused("qkv"), axis_name="d")
  single = og.qk_clip(10.0, og.qk_fused("qkv"))
  want = single.update(grads, single.init(params), params, attn_max_logits=maxima)
  mesh = Mesh(np.array(devices), ("d",))
  fn = jax.jit(jax.shard_map(
      lambda g, p, m: tx.update(g, tx.init(p), p, attn_max_logits=m),
      mesh=mesh, in_specs=(P(), P(), P("d")), out_specs=P()))
  got = fn(grads, params, maxima)
  assert_bitwise_equal(got[0], want[0])
  chex.assert_trees_all_equal(got[1], want[1])


def test_qk_clip_takes_one_collective_for_every_layer():
  params = {f"l{i}": _rand(i, (D, 3 * 2 * HD)) for i in range(3)}
  tx = og.qk_clip(1.0, [og.qk_fused(f"l{i}") for i in range(3)], axis_name="d")
  jaxpr = jax.make_jaxpr(
      lambda m: tx.update(params, tx.init(params), params, attn_max_logits=m),
      axis_env=[("d", NDEV)])([jnp.ones((4, 2))] * 3)
  assert str(jaxpr).count("pmax[") == 1
  assert "psum" not in str(jaxpr) and "all_gather" not in str(jaxpr)


def test_qk_clip_sharded_jit_is_already_global(devices):
  params, grads, maxima = _device_case()
  tx = og.qk_clip(10.0, og.qk_fused("qkv"))
  want = tx.update(grads, tx.init(params), params, attn_max_logits=maxima)
  mesh = Mesh(np.array(devices), ("d",))
  sharded = jax.device_put(maxima, jax.sharding.NamedSharding(mesh, P("d")))
  got = jax.jit(partial(tx.update, attn_max_logits=sharded))(grads, tx.init(params), params)
  assert_bitwise_equal(got[0], want[0])


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("threshold, error", [
    (0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), (True, TypeError),
    (np.array([1.0, 2.0]), ValueError), ("10", TypeError), (None, TypeError),
])
def test_qk_clip_bad_threshold_names_the_argument(threshold, error):
  with pytest.raises(error, match=r"qk_clip\(threshold=\.\.\.\)"):
    og.qk_clip(threshold, og.qk_fused("qkv"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(layouts=None), r"qk_clip\(layouts=...\) must name at least one"),
    (dict(layouts=[]), r"qk_clip\(layouts=...\) must name at least one"),
    (dict(layouts="attn/qkv"), r"qk_clip\(layouts=...\).*og.qk_fused"),
    (dict(layouts=[og.qk_fused("a"), 3]), r"qk_clip\(layouts=...\)"),
    (dict(alpha=-0.1), r"qk_clip\(alpha=...\)"),
    (dict(alpha=1.5), r"qk_clip\(alpha=...\)"),
    (dict(min_factor=0.0), r"qk_clip\(min_factor=...\)"),
    (dict(min_factor=1.0), r"qk_clip\(min_factor=...\)"),
    (dict(stacked=-1), r"qk_clip\(stacked=...\)"),
    (dict(axis_name=1), r"qk_clip\(axis_name=...\)"),
])
def test_qk_clip_bad_arguments_name_the_argument(kwargs, match):
  args = dict(threshold=1.0, layouts=og.qk_fused("qkv"), **kwargs) if "layouts" not in kwargs \
      else dict(threshold=1.0, **kwargs)
  with pytest.raises((ValueError, TypeError), match=match):
    og.qk_clip(**args)


@pytest.mark.parametrize("call, match", [
    (lambda: og.qk_fused(""), r"qk_fused\(qkv=...\)"),
    (lambda: og.qk_fused(3), r"qk_fused\(qkv=...\)"),
    (lambda: og.qk_fused([]), r"qk_fused\(qkv=...\)"),
    (lambda: og.qk_fused("a", num_kv_heads=0), r"qk_fused\(num_kv_heads=...\)"),
    (lambda: og.qk_fused("a", num_kv_heads=1.5), r"qk_fused\(num_kv_heads=...\)"),
    (lambda: og.qk_fused("a", num_kv_heads=True), r"qk_fused\(num_kv_heads=...\)"),
    (lambda: og.qk_fused("a", head_axis=None), r"qk_fused\(head_axis=...\)"),
    (lambda: og.qk_fused("a", head_axis=1.0), r"qk_fused\(head_axis=...\)"),
])
def test_qk_fused_bad_arguments_name_the_argument(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


@pytest.mark.parametrize("call, match", [
    (lambda: og.qk_separate("q", None, head_axis=-2), r"qk_separate\(key=...\)"),
    (lambda: og.qk_separate(("q", 1), "k", head_axis=-2), r"qk_separate\(query=...\)"),
    (lambda: og.qk_separate("q", "k", head_axis=True), r"qk_separate\(head_axis=...\)"),
    (lambda: og.qk_separate("q", "k", head_axis="heads"), r"qk_separate\(head_axis=...\)"),
    (lambda: og.qk_separate("q", "k", head_axis=-2, num_kv_heads=-1),
     r"qk_separate\(num_kv_heads=...\)"),
])
def test_qk_separate_bad_arguments_name_the_argument(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()


def test_qk_separate_head_axis_is_required():
  with pytest.raises(TypeError, match="head_axis"):
    og.qk_separate("q", "k")  # type: ignore[call-arg]


def _update(tx, params, grads=None, **extra):
  grads = params if grads is None else grads
  return tx.update(grads, tx.init(params), params, **extra)


@pytest.mark.parametrize("layout, params, maxima, error, match", [
    (og.qk_fused("qkv"), {"qkv": jnp.ones((2, 18))}, None, ValueError,
     r"qk_clip needs .*attn_max_logits="),
    (og.qk_fused("qkv"), {"qkv": jnp.ones((2, 18))}, [jnp.ones(2)], ValueError,
     r"qk_clip: attn_max_logits must have the structure of layouts"),
    (og.qk_fused("attn/qkv"), {"qkv": jnp.ones((2, 18))}, jnp.ones(2), ValueError,
     r"qk_clip: no parameter at or below the path 'attn/qkv'.*'qkv'"),
    (og.qk_fused("qkv"), {"qkv": jnp.ones((2, 16))}, jnp.ones(2), ValueError,
     r"qk_clip: the fused leaf 'qkv' of shape \(2, 16\).*2 query \+ 2 key \+ 2 value"),
    (og.qk_fused("qkv", num_kv_heads=2), {"qkv": jnp.ones((2, 21))}, jnp.ones(3), ValueError,
     r"3 query heads, which num_kv_heads=2 does not divide"),
    (og.qk_separate("q", "k", head_axis=-2), {"q": jnp.ones((4, 3, 2)), "k": jnp.ones((4, 2))},
     jnp.ones(3), ValueError, r"qk_clip: the leaf 'k' of shape \(4, 2\)"),
    (og.qk_separate("q", "k", head_axis=2), {"q": jnp.ones((4, 3)), "k": jnp.ones((4, 3))},
     jnp.ones(3), ValueError, r"has no head_axis=2"),
    (og.qk_fused("qkv"), {"qkv": jnp.ones((2, 6), jnp.int32)}, jnp.ones(2), TypeError,
     r"qk_clip needs floating-point .*'qkv' has dtype int32"),
    (og.qk_fused("qkv"), {"qkv": jnp.ones((2, 6))}, jnp.ones(2, jnp.int32), TypeError,
     r"floating-point maxima"),
    (og.qk_fused("qkv"), {"qkv": jnp.ones((2, 6))}, jnp.ones(()), ValueError,
     r"must end in a heads axis"),
])
def test_qk_clip_update_errors_name_the_problem(layout, params, maxima, error, match):
  tx = og.qk_clip(1.0, layout)
  extra = {} if maxima is None else {"attn_max_logits": maxima}
  with pytest.raises(error, match=match):
    _update(tx, params, **extra)


def test_qk_clip_update_errors_for_stacked_mismatch_and_params():
  params = {"a": jnp.ones((3, 2, 6)), "b": jnp.ones((2, 6))}
  tx = og.qk_clip(1.0, og.qk_fused("a"), stacked=1)
  with pytest.raises(ValueError, match=r"attn_max_logits for the parameter 'a'.*\(3,\)"):
    _update(tx, params, attn_max_logits=jnp.ones((2, 2)))
  tx = og.qk_clip(1.0, og.qk_separate("a", "b", head_axis=-1),
                  stacked=lambda path, leaf: leaf.ndim - 2)
  with pytest.raises(ValueError, match=r"different numbers of stacked layer axes"):
    _update(tx, params, attn_max_logits=jnp.ones((3, 2)))
  tx = og.qk_clip(1.0, og.qk_fused("a"))
  with pytest.raises(ValueError, match=r"qk_clip needs the current parameters"):
    tx.update(params, tx.init(params), None, attn_max_logits=jnp.ones(2))
  with pytest.raises(ValueError, match=r"qk_clip: params must have the tree structure"):
    tx.update(params, tx.init(params), {"a": params["a"]}, attn_max_logits=jnp.ones(2))


def test_qk_clip_callable_layout_errors():
  params = {"w": jnp.ones((4, 3))}
  with pytest.raises(TypeError, match=r"must return a dict"):
    _update(og.qk_clip(1.0, lambda g: g), params, attn_max_logits=jnp.ones(3))
  with pytest.raises(ValueError, match=r"multiplier of shape \(5,\) for 'w'"):
    _update(og.qk_clip(1.0, lambda g: {"w": jnp.ones(5)}), params,
            attn_max_logits=jnp.ones(3))


def test_qk_clip_under_inject_hyperparams_follows_a_threshold_schedule():
  params, grads = _fused_case()
  tx = optax.inject_hyperparams(og.qk_clip)(
      threshold=lambda t: 100.0 - 90.0 * jnp.minimum(t, 1), layouts=og.qk_fused("qkv"))
  state = tx.init(params)
  u, state = tx.update(grads, state, params, attn_max_logits=jnp.asarray([40.0, 1.0]))
  assert_bitwise_equal(u, grads)  # threshold 100 at step 0
  u, state = tx.update(grads, state, params, attn_max_logits=jnp.asarray([40.0, 1.0]))
  assert int(state.inner_state.num_clipped) == 1  # threshold 10 at step 1


# ---------------------------------------------------------------------------
# The update's steps alone, and the layout protocol
# ---------------------------------------------------------------------------


def _state():
  return og.qk_clip(1.0, og.qk_fused("qkv")).init({})


def test_qk_factors_step_matches_the_closed_form():
  tau = 10.0
  s = np.array([[3.0, 10.0, 10.5, 40.0], [-np.inf, 1e30, 9.999, 12.0]], np.float32)
  gammas, state = qk._factors([jnp.asarray(s)], jnp.asarray(False), _state(), threshold=tau,
                              min_factor=1e-6)
  want = np.where(s > tau, np.float32(tau) / s, 1.0)
  want = np.maximum(want, np.float32(1e-6)).astype(np.float32)
  assert_bitwise_equal(gammas[0], jnp.asarray(want))
  assert np.all(np.asarray(gammas[0])[s <= tau] == 1.0)
  assert int(state.num_clipped) == 4 and int(state.num_nonfinite) == 0
  assert float(state.max_logit) == np.float32(1e30)
  assert float(state.smallest_factor) == np.float32(1e-6)  # the floor binds for 1e30


def test_qk_factors_step_nonfinite_is_all_ones_and_counts():
  gammas, state = qk._factors([jnp.asarray([40.0, 3.0])], jnp.asarray(True), _state(),
                              threshold=10.0, min_factor=1e-6)
  assert_bitwise_equal(gammas[0], jnp.ones(2))
  assert int(state.num_clipped) == 0 and int(state.num_nonfinite) == 1


@pytest.mark.parametrize("kv", [None, 2])
def test_qk_multipliers_step_is_sqrt_of_tau_over_s(kv):
  """alpha = 0.5: query head h times sqrt(tau / S_h) above tau, exactly 1 otherwise."""
  heads, tau = 4, 10.0
  s = np.array([40.0, 3.0, 10.0, 12.5], np.float32)
  params = {"q": jnp.ones((D, heads * HD)), "k": jnp.ones((D, (kv or heads) * HD))}
  layout = og.qk_separate("q", "k", head_axis=-1, num_kv_heads=kv)
  gammas, _ = qk._factors([jnp.asarray(s)], jnp.asarray(False), _state(), threshold=tau,
                          min_factor=1e-6)
  plan = qk._plan(params, params, {qk.EXTRA: jnp.asarray(s)}, layouts=[layout],
                  treedef=jax.tree.structure(0), stacked=None)
  mults = qk._multipliers([layout], gammas, jnp.asarray(False), plan=plan, alpha=0.5)
  q_want = np.repeat(np.where(s > tau, np.sqrt(tau / s.astype(np.float64)), 1.0), HD)
  k_gamma = _k_gamma(_gamma(s, tau), kv or heads)
  k_want = np.repeat(np.sqrt(k_gamma), HD)
  q, k = (np.asarray(mults[plan.names.index(n)])[0] for n in ("q", "k"))
  np.testing.assert_allclose(q, q_want, rtol=1e-6)
  np.testing.assert_allclose(k, k_want, rtol=1e-6)
  assert np.all(q[q_want == 1.0] == 1.0) and np.all(k[k_want == 1.0] == 1.0)  # exactly


def test_qk_peaks_step_reduces_batch_axes_and_flags_nonfinite():
  m = jnp.asarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4), jnp.bfloat16)
  peaks, bad = qk._peaks([m, jnp.asarray([[1.0, jnp.nan]])], [1, 1], axis_name=None)
  assert peaks[0].dtype == jnp.float32 and peaks[0].shape == (2, 4)
  assert_bitwise_equal(peaks[0], jnp.max(m.astype(jnp.float32), axis=1))
  assert peaks[1].shape == (1, 2) and bool(bad)
  _, bad = qk._peaks([m], [0], axis_name=None)  # [batch, batch, heads]: both reduced
  assert not bool(bad)


def test_qk_plan_step_layer_axes_from_stacked_or_from_the_maxima():
  params = {"a": jnp.ones((3, D, 6)), "w": jnp.ones((D, 2))}
  counts = lambda path, leaf: 1 if jax.tree_util.keystr(path) == "['a']" else 0
  layouts, treedef = qk._as_layouts([og.qk_fused("a"), lambda g: {"w": g}])
  extra = {qk.EXTRA: [jnp.ones((3, 8, 2)), jnp.ones((5, 2))]}
  plan = qk._plan(params, params, extra, layouts=layouts, treedef=treedef, stacked=counts)
  assert plan.layers == (1, 1)  # stacked count of 'a'; every axis but the heads
  assert plan.names == ("a", "w")
  assert all(isinstance(x, qk.QkLayout) for x in layouts) and layouts[1].paths == ()


def test_qk_apply_step_is_bitwise_where_the_multiplier_is_one():
  u = {"a": _rand(0, (4, 3)), "b": _rand(1, (2,))}
  p = {"a": _rand(2, (4, 3)), "b": _rand(3, (2,))}
  m = jnp.asarray([1.0, 0.5, 1.0], jnp.float32)
  out = qk._apply(u, p, {0: m})
  assert_bitwise_equal(out["b"], u["b"])
  assert_bitwise_equal(out["a"][:, 0::2], u["a"][:, 0::2])
  assert_bitwise_equal(out["a"][:, 1], (p["a"][:, 1] + u["a"][:, 1]) * 0.5 - p["a"][:, 1])


def test_qk_layouts_are_not_callable_and_hold_a_layout_function():
  """Not callable: optax.inject_hyperparams would take a callable for a schedule."""
  for layout in (og.qk_fused("qkv"), og.qk_separate("q", "k", head_axis=-2)):
    assert isinstance(layout, qk.QkLayout) and not callable(layout)
    assert callable(layout.fn) and layout.paths


def test_qk_user_layout_with_per_leaf_multipliers_matches_the_built_in():
  """A user function returning per-leaf multipliers takes the built-ins' path, bitwise."""
  params = {"q": {"kernel": _rand(0, (D, 2, HD)), "bias": _rand(1, (2, HD))},
            "k": {"kernel": _rand(2, (D, 2, HD)), "bias": _rand(3, (2, HD))}}
  grads = jax.tree.map(lambda x: 0.3 * x, params)
  maxima = jnp.asarray([30.0, 4.0])

  def by_hand(gamma):
    def q(leaf):
      assert leaf.path in ("q/kernel", "q/bias") and leaf.layers == 0
      f = jnp.where(gamma == 1, 1.0, gamma ** leaf.alpha)
      return f.reshape((2, 1))
    def k(leaf):
      return jnp.where(gamma == 1, 1.0, gamma ** (1 - leaf.alpha)).reshape((2, 1))
    return {"q": q, "k": k}

  built_in = og.qk_clip(10.0, og.qk_separate("q", "k", head_axis=-2), alpha=0.3)
  user = og.qk_clip(10.0, by_hand, alpha=0.3)
  want, want_state, _ = _apply(built_in, params, grads, maxima)
  got, got_state, _ = _apply(user, params, grads, maxima)
  assert_bitwise_equal(got, want)
  chex.assert_trees_all_equal(got_state, want_state)


@pytest.mark.parametrize("call, match", [
    (lambda: og.qk_fused(("a", "a/")), r"qk_fused\(qkv=...\) must be free of repeats"),
    (lambda: og.qk_separate("q", ("k", "q"), head_axis=-1),
     r"qk_separate\(query=..., key=...\) must not both name 'q'"),
    # a path below another names its leaves twice: caught when the layout is built
    (lambda: og.qk_separate("q", "q/kernel", head_axis=-1),
     r"qk_separate\(query=..., key=...\) must not both name the leaves of 'q/kernel' "
     r"\(below 'q'\)"),
    (lambda: og.qk_fused(("blocks/0", "blocks")),
     r"qk_fused\(qkv=...\) must be free of repeats \('blocks' and 'blocks/0', one below"),
    (lambda: og.qk_separate(("q", "q/bias"), "k", head_axis=-1),
     r"qk_separate\(query=...\) must be free of repeats"),
])
def test_qk_layouts_reject_a_path_named_twice(call, match):
  with pytest.raises(ValueError, match=match):
    call()
