"""Two-dimensional meshes: sharded and replicated leaves under ``shard_map``.

On a 2 x 4 mesh ``("data", "model")`` of the 8 simulated CPU devices, a
tensor-parallel tree holds kernels sharded over ``"model"`` (by columns or by
rows), a bias and a scalar replicated everywhere, and FSDP leaves sharded over
``"data"``. Under ``jax.jit(jax.shard_map(...))`` with ``axis_name`` naming
one axis or both, every transformation must give what it gives on one device
for the whole tree: a replicated leaf counts once (JAX types every value as
varying along some mesh axes or not), with one collective per transformation.
Under ``pmap`` and ``shard_map(check_vma=False)``, where JAX tracks nothing,
every device's partial is summed, as before.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import all_eqns, scan_steps
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import optax_guard as og

STEPS = 6
BOTH = ("data", "model")

def _split(spec: P) -> set[str]:
  """The mesh axes a spec shards over."""
  return {a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ())}


# Each layout: leaf -> (shape, spec). Per-unit statistics (clip_by_axis_norm)
# need every split on a reduced axis ("rows"); adaptive_grad_clip, which has no
# axis_name, needs every unit whole on a device ("cols").
LAYOUTS = {
    "mixed": {
        "cols": ((16, 8), P(None, "model")),  # column-parallel kernel
        "rows": ((8, 12), P("model", None)),  # row-parallel kernel
        "bias": ((12,), P()),  # replicated over both axes
        "fsdp": ((8, 6), P("data", None)),  # sharded over the FSDP axis
        "both": ((4, 8), P("data", "model")),
        "scale": ((), P()),
    },
    "rows": {
        "rows": ((8, 12), P("model", None)),
        "bias": ((12,), P()),
        "fsdp": ((8, 6), P("data", None)),
        "deep": ((8, 3, 5), P(BOTH, None, None)),  # the fan-in split over both axes
        "scale": ((), P()),
    },
    "cols": {
        "cols": ((6, 8), P(None, "model")),
        "bias": ((8,), P()),
        "scale": ((), P()),
    },
}


# Over "model" alone, the leaves sharded over "data" would stay per data shard.
LAYOUTS.update({
    f"{name}/model": {k: v for k, v in leaves.items() if "data" not in _split(v[1])}
    for name, leaves in list(LAYOUTS.items())
})


def _specs(layout: str) -> dict:
  return {k: spec for k, (_, spec) in LAYOUTS[layout].items()}


def _draw(layout: str, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(shape), jnp.float32)
          for k, (shape, _) in LAYOUTS[layout].items()}


def _inputs(layout: str, nonfinite: bool = False):
  """``(params, grads [STEPS, ...], values [STEPS])`` with a spike (and a NaN, an inf)."""
  params = _draw(layout, 0)
  grads = [_draw(layout, 10 + i) for i in range(STEPS)]
  grads[3] = jax.tree.map(lambda x: 40.0 * x, grads[3])
  if nonfinite:  # a NaN in a replicated leaf, an inf in a sharded one
    grads[1]["bias"] = grads[1]["bias"].at[2].set(jnp.nan)
    first = next(k for k in grads[4] if k != "bias" and grads[4][k].ndim)
    grads[4][first] = grads[4][first].at[(1,) * grads[4][first].ndim].set(jnp.inf)
  grads = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)
  values = jnp.linspace(3.0, 1.0, STEPS).at[3].set(50.0)
  return params, grads, values


def _run(tx, probe, params, grads, values):
  """init + STEPS updates: ``(stacked updates, probe(final state))``."""
  state, updates = scan_steps(tx, params, grads, values)
  return updates, probe(state)


def _mesh(devices) -> Mesh:
  return Mesh(np.array(devices).reshape(2, 4), BOTH)


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def _sharded(fn, specs, mesh, *, check_vma=True, value_spec=None):
  """``jit(shard_map(fn))`` for ``fn(params, grads, values) -> (updates, stats)``."""
  stepped = jax.tree.map(lambda s: P(None, *s), specs, is_leaf=_is_spec)
  return jax.jit(jax.shard_map(
      fn, mesh=mesh, in_specs=(specs, stepped, value_spec or P()), out_specs=(stepped, P()),
      check_vma=check_vma,
  ))


@dataclasses.dataclass(frozen=True)
class Case:
  """``make(axis_name)`` builds the transformation; ``probe(state)`` reads replicated numbers."""

  make: Callable[[Any], optax.GradientTransformation]
  layout: str = "mixed"
  probe: Callable[[Any], Any] = og.guard_stats
  nonfinite: bool = False


def _spike_probe(state):
  return {**og.guard_stats(state), "norms": state.norm.history, "values": state.value.history}


def _guarded(guard, a, **kw):
  return guard(optax.chain(og.clip_by_global_norm(0.5, axis_name=a), optax.adam(0.1)),
               axis_name=a, **kw)


CASES: dict[str, Case] = {
    "clip_by_global_norm": Case(lambda a: og.clip_by_global_norm(0.5, axis_name=a)),
    "clip_by_global_norm/ord=1": Case(lambda a: og.clip_by_global_norm(3.0, ord=1, axis_name=a)),
    "clip_by_global_norm/ord=inf": Case(
        lambda a: og.clip_by_global_norm(0.5, ord="inf", axis_name=a)),
    "clip_by_norm": Case(lambda a: og.clip_by_norm(0.5, axis_name=a)),
    "clip_by_axis_norm": Case(lambda a: og.clip_by_axis_norm(0.3, axis_name=a), layout="rows"),
    "adaptive_grad_clip": Case(lambda a: og.adaptive_grad_clip(0.05), layout="cols"),
    "skip_nonfinite": Case(lambda a: _guarded(og.skip_nonfinite, a), nonfinite=True),
    "skip_on_spike": Case(lambda a: _guarded(og.skip_on_spike, a, window=4, min_history=2),
                          probe=_spike_probe, nonfinite=True),
    "adagc": Case(lambda a: og.adagc(warmup_steps=2, axis_name=a)),
    "stable_adamw": Case(lambda a: og.stable_adamw(0.1, weight_decay=0.1, axis_name=a)),
    "monitor": Case(lambda a: og.monitor(per_leaf=True, axis_name=a), nonfinite=True),
    "zclip": Case(lambda a: og.zclip(warmup_steps=2, axis_name=a)),
    "autoclip": Case(lambda a: og.autoclip(50.0, history_size=4, axis_name=a)),
    "clip_by_historical_norm": Case(
        lambda a: og.clip_by_historical_norm(1.0, window=4, min_history=2, axis_name=a)),
    "scale_by_grad_norm": Case(
        lambda a: og.scale_by_grad_norm(lambda n: 1.0 / (1.0 + n), axis_name=a)),
}


def _layout(name: str, axis_name: Any) -> str:
  layout = CASES[name].layout
  return layout if "data" in (axis_name or ()) else f"{layout}/model"


@functools.cache
def _single(name: str, layout: str):
  """The single-device result on the whole tree (once per case and layout)."""
  case = CASES[name]
  return jax.jit(partial(_run, case.make(None), case.probe))(*_inputs(layout, case.nonfinite))


def _on_mesh(name: str, axis_name: Any, devices, **kw):
  case = CASES[name]
  layout = _layout(name, axis_name)
  fn = partial(_run, case.make(axis_name), case.probe)
  return _sharded(fn, _specs(layout), _mesh(devices), **kw)(*_inputs(layout, case.nonfinite))


def _assert_matches_single(out, name, axis_name):
  want = _single(name, _layout(name, axis_name))
  chex.assert_trees_all_close(out, want, rtol=2e-5, atol=1e-6)
  # counts and decisions are exact
  ints = lambda t: {k: v for k, v in t.items() if not jnp.issubdtype(v.dtype, jnp.floating)}
  chex.assert_trees_all_equal(ints(out[1]), ints(want[1]))


@pytest.mark.parametrize("axis_name", ["model", BOTH, ("model", "data")], ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_shard_map_on_2d_mesh_matches_single_device(name, axis_name, devices):
  if name == "adaptive_grad_clip" and axis_name != BOTH:
    pytest.skip("no axis_name: one run is enough")
  _assert_matches_single(_on_mesh(name, axis_name, devices), name, axis_name)


def test_spike_guard_decides_on_the_global_norm_and_mean_loss(devices):
  """The norm history, the skips and the loss history equal the single-device run."""
  out = _on_mesh("skip_on_spike", BOTH, devices)
  want = _single("skip_on_spike", "mixed")
  stats = out[1]
  assert int(stats["skip_on_spike/num_skipped"]) == int(want[1]["skip_on_spike/num_skipped"]) > 0
  np.testing.assert_allclose(stats["norms"], want[1]["norms"], rtol=2e-6)
  np.testing.assert_array_equal(stats["values"], want[1]["values"])


def test_spike_guard_averages_a_loss_that_varies_over_data(devices):
  """A loss per data shard (the same on the model shards of one) averages over the data shards."""
  case = CASES["skip_on_spike"]
  params, grads, values = _inputs("mixed")
  per_shard = jnp.stack([values, values + 1.0], axis=1)  # [steps, data]
  fn = partial(_run, case.make(BOTH), case.probe)
  sharded = _sharded(lambda p, g, v: fn(p, g, v[:, 0]), _specs("mixed"), _mesh(devices),
                     value_spec=P(None, "data"))
  out = sharded(params, grads, per_shard)
  want = jax.jit(partial(_run, case.make(None), case.probe))(params, grads, values + 0.5)
  np.testing.assert_allclose(out[1]["values"], want[1]["values"], rtol=1e-7)
  chex.assert_trees_all_close(out, want, rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# The reproduction: a row-parallel layer with a replicated bias
# ---------------------------------------------------------------------------


def _row_parallel():
  kernel = jnp.full((8, 21), 2.5, jnp.float32)  # sum of squares 1050
  bias = jnp.zeros((21,), jnp.float32).at[:3].set(7.0)  # sum of squares 147
  return {"kernel": kernel, "bias": bias}, {"kernel": P("model", None), "bias": P()}


def _implied_norm(axis_name, devices, check_vma=True):
  """The norm ``clip_by_global_norm(1.0)`` clipped by, read from the bias it scaled."""
  g, specs = _row_parallel()
  tx = og.clip_by_global_norm(1.0, axis_name=axis_name)
  fn = jax.jit(jax.shard_map(lambda g: tx.update(g, tx.init(g))[0], mesh=_mesh(devices),
                             in_specs=(specs,), out_specs=specs, check_vma=check_vma))
  u = fn(g)
  return float(g["bias"][0] / u["bias"][0])


@pytest.mark.parametrize("axis_name", ["model", BOTH, ("model", "data"), ["data", "model"]],
                         ids=str)
def test_replicated_bias_counts_once(axis_name, devices):
  """sqrt(1050 + 147) = 34.6, not sqrt(1050 + 4 * 147) = 40.5 (the bias once per model shard)."""
  norm = _implied_norm(axis_name, devices)
  np.testing.assert_allclose(norm, math.sqrt(1197.0), rtol=1e-6)
  assert round(norm, 1) == 34.6


def test_check_vma_false_sums_every_device(devices):
  """Without JAX's varying types, every device's partial is summed (as under pmap)."""
  np.testing.assert_allclose(_implied_norm("model", devices, check_vma=False),
                             math.sqrt(1050.0 + 4 * 147.0), rtol=1e-6)  # 40.5
  # over both axes: the kernel twice (once per data row), the bias 8 times
  np.testing.assert_allclose(_implied_norm(BOTH, devices, check_vma=False),
                             math.sqrt(2 * 1050.0 + 8 * 147.0), rtol=1e-6)


def test_an_axis_no_leaf_varies_along_is_a_no_op(devices):
  """Naming "data" for a tree replicated over "data" changes nothing: one copy counts."""
  assert _implied_norm(BOTH, devices) == _implied_norm("model", devices)


def test_pmap_values_are_not_masked(devices):
  """pmap types nothing as replicated: a leaf given to every device counts once per device."""
  g, _ = _row_parallel()
  tx = og.clip_by_global_norm(1.0, axis_name="d")
  kernel = g["kernel"].reshape(8, 1, 21)  # one row per device

  def update(k, b):
    made = jnp.full((2,), 3.0)  # built on every device: its own value there
    u, _ = tx.update({"kernel": k, "bias": b, "made": made}, tx.init({"kernel": k, "bias": b,
                                                                     "made": made}))
    return u["bias"]

  u = jax.pmap(update, axis_name="d", in_axes=(0, None))(kernel, g["bias"])
  np.testing.assert_allclose(g["bias"][0] / u[0][0],
                             math.sqrt(1050.0 + 8 * 147.0 + 8 * 18.0), rtol=1e-6)


def test_unbound_axis_name_raises_jaxs_error():
  tx = og.clip_by_global_norm(1.0, axis_name=("data", "model"))
  g = {"w": jnp.ones(3)}
  with pytest.raises(NameError, match="unbound axis name"):
    jax.jit(lambda g: tx.update(g, tx.init(g)))(g)


# ---------------------------------------------------------------------------
# One collective per transformation
# ---------------------------------------------------------------------------


def _collectives(make: Callable, layout: str, axis_name: Any, devices) -> dict[str, int]:
  """How many psum / pmax / all_gather equations one update of ``make(axis_name)`` binds."""
  tx = optax.with_extra_args_support(make(axis_name))
  params, grads, _ = _inputs(layout)
  grads = jax.tree.map(lambda x: x[0], grads)
  specs = _specs(layout)

  def update(p, g):
    return tx.update(g, tx.init(p), p, value=jnp.float32(1.0))[0]

  fn = jax.shard_map(update, mesh=_mesh(devices), in_specs=(specs, specs), out_specs=specs)
  counts: dict[str, int] = {}
  for eqn in all_eqns(jax.make_jaxpr(fn)(params, grads).jaxpr):
    kind = eqn.primitive.name.split("_")[0]  # psum_invariant is a psum
    if kind in ("psum", "pmax", "all"):
      counts[kind] = counts.get(kind, 0) + 1
  return counts


@pytest.mark.parametrize("name", sorted(set(CASES) - {"adaptive_grad_clip"}))
def test_one_collective_per_transformation(name, devices):
  want = {"psum": 1}
  if name == "monitor":  # the sums and counts, and the maximum
    want = {"psum": 1, "pmax": 1}
  elif name == "clip_by_global_norm/ord=inf":
    want = {"pmax": 1}
  case = CASES[name]
  assert _collectives(case.make, case.layout, BOTH, devices) == want


@pytest.mark.parametrize("guard", [og.skip_nonfinite, og.skip_on_spike])
def test_a_guard_shares_its_norm_whatever_the_order_of_the_axes(guard, devices):
  """The clip inside names the axes in another order: still the guard's one psum."""
  make = lambda a: guard(
      optax.chain(og.clip_by_global_norm(0.5, axis_name=("model", "data")), optax.adam(0.1)),
      axis_name=a)
  assert _collectives(make, "mixed", BOTH, devices) == {"psum": 1}


def test_qk_clip_maxima_over_both_axes(devices):
  """Maxima per data shard (replicated over model), the fused kernel FSDP-sharded: one pmax."""
  heads, hd, d = 2, 4, 8
  rng = np.random.default_rng(0)
  params = {"qkv": jnp.asarray(rng.standard_normal((d, 3 * heads * hd)), jnp.float32)}
  grads = jax.tree.map(lambda x: 0.1 * x, params)
  maxima = np.ones((2, heads), np.float32)  # [batch = one per data shard, heads]
  maxima[1, 0] = 40.0
  maxima = jnp.asarray(maxima)
  make = lambda a: og.qk_clip(10.0, og.qk_fused("qkv"), axis_name=a)
  single = make(None)
  want = single.update(grads, single.init(params), params, attn_max_logits=maxima)
  tx = make(BOTH)
  specs = {"qkv": P("data", None)}

  def update(g, p, m):
    return tx.update(g, tx.init(p), p, attn_max_logits=m)

  fn = jax.shard_map(update, mesh=_mesh(devices), in_specs=(specs, specs, P("data")),
                     out_specs=(specs, P()))
  got = jax.jit(fn)(grads, params, maxima)
  chex.assert_trees_all_equal(got, want)
  names = [e.primitive.name for e in all_eqns(jax.make_jaxpr(fn)(grads, params, maxima).jaxpr)]
  assert sum(n.startswith("pmax") for n in names) == 1
  assert not any(n.startswith(("psum", "all_gather")) for n in names)


# ---------------------------------------------------------------------------
# axis_name validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad, error", [
    ((), ValueError), (("data", "data"), ValueError), (("data", 1), TypeError),
    (1, TypeError), (True, TypeError),
])
def test_axis_name_validation(bad, error):
  with pytest.raises(error, match=r"clip_by_global_norm\(axis_name=\.\.\.\)"):
    og.clip_by_global_norm(1.0, axis_name=bad)


# ---------------------------------------------------------------------------
# Sharded jit: what python -m benchmarks.collectives reports
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["og.skip_on_spike", "chain(og.monitor(), adam)"])
def test_sharded_jit_step_adds_one_all_reduce_and_keeps_shardings(variant, devices):
  """FSDP over 8 devices, axis_name=None: one all-reduce of scalars, no parameter resharded."""
  from benchmarks import cases, collectives

  chosen = next(v for v in cases.step_variants() if variant in (v.name, v.code))
  mesh = Mesh(np.array(devices), ("fsdp",))
  shapes = {"w": (64, 32), "b": (32,), "odd": (3, 5), "conv": (3, 3, 16, 8)}
  params = collectives.fsdp(
      {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}, mesh)
  assert [x.sharding.spec for x in jax.tree.leaves(params)] == [
      P("fsdp"), P(None, None, "fsdp"), P(), P("fsdp")]
  row = collectives.measure(chosen, params, mesh)
  assert row["keeps_sharding"]
  assert len(row["all_reduces"]) == 1, row["all_reduces"]
  if "monitor" not in variant:  # its one-pass max-and-count reduction is gathered
    assert not row["others"]
  assert re.fullmatch(r"\(\d+ x f32\[\]\)", collectives.summary(row["all_reduces"][0]))
