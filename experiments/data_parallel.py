"""The guarded training step on every local device: pmap and sharded jit vs one device.

The same guarded optimizer,
``chain(og.monitor(), og.zclip(), og.skip_on_spike(sgd with momentum))`` fed
the loss as ``value=``, trains the same Flax MLP on the same global batches in
three ways:

* ``single device``: ``jit`` on one device, the whole global batch;
* ``pmap``: ``jax.pmap`` over all local devices, each holding ``batch / n``
  examples; loss and gradients are ``lax.pmean``-ed before the optimizer, so
  every device takes the same (replicated) guard decision, and the guards keep
  ``axis_name=None`` (the updates are replicated, not sharded);
* ``jit + NamedSharding``: ``jit`` on a ``Mesh`` of all local devices with the
  batch sharded along ``"data"`` and the parameters replicated; XLA inserts the
  all-reduce and the norms are already global.

One batch in the middle of training is corrupted (inputs scaled by 30) so that
``skip_on_spike`` really skips a step. The experiment asserts that the loss
curves, the skipped-step counts and the final parameters of both multi-device
runs match the single-device run (``numpy.testing.assert_allclose``, float32
tolerances: the device count changes the order of the reductions).

With ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set by
``experiments/__init__.py`` on CPU) there are 8 simulated devices; on GPU/TPU
hosts the real local devices are used.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_guard as og
from experiments import _common as C
from experiments import deep_mlp

NAME = "data_parallel"
NEEDS = ("monitor", "zclip", "skip_on_spike", "guard_stats")


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of the data-parallel experiment (defaults: the suite's default run)."""

  steps: int = 150
  seeds: int = 1
  depth: int = 4
  width: int = 64
  per_device_batch: int = 16
  learning_rate: float = 0.02
  glitch_step: int = 100
  glitch_scale: float = 30.0
  rtol: float = 1e-4
  atol: float = 1e-5
  defences: tuple[str, ...] = ("single device", "pmap", "jit + NamedSharding")

  @classmethod
  def quick(cls) -> Config:
    return cls(steps=100, glitch_step=60)


def make_tx(config: Config) -> optax.GradientTransformationExtraArgs:
  return optax.chain(
      og.monitor(),
      og.zclip(warmup_steps=10),
      og.skip_on_spike(optax.sgd(config.learning_rate, momentum=0.9), sigma=6.0, window=32,
                       min_history=16),
  )


def _data(config: Config, n_dev: int, seed: int):
  """Global batches ``[steps, batch, ...]`` from the deep-MLP clusters, one glitch."""
  (x, y), _ = deep_mlp.make_data(32, 10, 4096, 2048)
  batch = config.per_device_batch * n_dev
  idx = np.random.default_rng(1000 + seed).integers(0, x.shape[0], (config.steps, batch))
  xb, yb = x[idx].copy(), y[idx]
  if 0 <= config.glitch_step < config.steps:
    xb[config.glitch_step] *= config.glitch_scale
  return xb, yb


def _run_modes(config: Config, seed: int, devices: Sequence[Any], modes: Sequence[str],
               bar) -> dict[str, dict[str, Any]]:
  n = len(devices)
  model = deep_mlp.MLP(config.depth, config.width, 10, init_kind="he")
  params = deep_mlp.init_variables(model, 32, seed)["params"]
  tx = make_tx(config)
  xb, yb = _data(config, n, seed)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def update(params, opt_state, loss, grads):
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    stats = og.guard_stats(opt_state)
    out = (loss, C.first(stats, "monitor/global_norm"), C.skipped_count(opt_state))
    return optax.apply_updates(params, updates), opt_state, out

  def single_step(carry, batch):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    params, opt_state, out = update(params, opt_state, loss, grads)
    return (params, opt_state), out

  def pmap_step(carry, batch):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    loss, grads = jax.lax.pmean((loss, grads), axis_name="data")
    params, opt_state, out = update(params, opt_state, loss, grads)
    return (params, opt_state), out

  results = {}
  for mode in modes:
    with C.Timer() as timer:
      opt_state = tx.init(params)
      if mode == "single device":
        fn = jax.jit(lambda c, xs: jax.lax.scan(single_step, c, xs))
        (p, _), out = fn((params, opt_state), (xb, yb))
      elif mode == "pmap":
        # [steps, n * b, ...] -> [n, steps, b, ...]
        def split(a):
          a = a.reshape(a.shape[0], n, -1, *a.shape[2:])
          return np.swapaxes(a, 0, 1)

        fn = jax.pmap(lambda c, xs: jax.lax.scan(pmap_step, c, xs), axis_name="data",
                      devices=devices)
        rep = jax.tree_util.tree_map(lambda a: np.broadcast_to(np.asarray(a), (n, *np.shape(a))),
                                     (params, opt_state))
        (p, _), out = fn(rep, (split(xb), split(yb)))
        for leaf in jax.tree_util.tree_leaves(p):  # replicas agree bit for bit
          np.testing.assert_array_equal(np.asarray(leaf[0]), np.asarray(leaf[-1]))
        p = jax.tree_util.tree_map(lambda a: a[0], p)
        out = jax.tree_util.tree_map(lambda a: a[0], out)
      elif mode == "jit + NamedSharding":
        mesh = Mesh(np.asarray(devices), ("data",))
        replicated = NamedSharding(mesh, P())
        batch_sharded = NamedSharding(mesh, P(None, "data"))  # [steps, batch, ...]
        carry = jax.device_put((params, opt_state), replicated)
        data = jax.device_put((xb, yb), batch_sharded)
        fn = jax.jit(lambda c, xs: jax.lax.scan(single_step, c, xs),
                     out_shardings=(replicated, replicated))
        (p, _), out = fn(carry, data)
      else:
        raise ValueError(f"data_parallel: unknown mode {mode!r}")
      p, out = jax.device_get((p, out))
    if bar is not None:
      bar.update(1)
    results[mode] = {"params": p, "loss": out[0], "grad_norm": out[1], "skipped": out[2],
                     "wall_s": timer.s}
  return results


def compare(results: dict[str, dict[str, Any]], rtol: float, atol: float) -> dict[str, Any]:
  """Max differences to the single-device run; raises AssertionError if not allclose."""
  ref = results["single device"]
  checks = {}
  for mode, res in results.items():
    if mode == "single device":
      continue
    dloss = float(np.max(np.abs(res["loss"] - ref["loss"])))
    dparam = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(res["params"]), jax.tree_util.tree_leaves(ref["params"]),
        strict=True))
    np.testing.assert_allclose(res["loss"], ref["loss"], rtol=rtol, atol=atol,
                               err_msg=f"{mode}: loss curve differs from single device")
    np.testing.assert_array_equal(res["skipped"], ref["skipped"],
                                  err_msg=f"{mode}: skipped steps differ from single device")
    jax.tree_util.tree_map(
        functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol,
                          err_msg=f"{mode}: final parameters differ from single device"),
        res["params"], ref["params"])
    checks[f"{mode}: max |loss - single|"] = f"{dloss:.2e}"
    checks[f"{mode}: max |param - single|"] = f"{dparam:.2e}"
    checks[f"{mode}: allclose(rtol={rtol:g}, atol={atol:g})"] = True
  return checks


def run(config: Config = Config(), *, guards: Sequence[str] | None = None,
        progress: bool | None = None) -> C.ExperimentResult:
  """Runs the three modes per seed, asserts they agree, one row per mode."""
  del guards  # one fixed guarded optimizer here
  lacking = C.missing(*NEEDS)
  devices = jax.local_devices()
  notes = []
  if lacking:
    notes.append(f"skipped: optax_guard lacks {', '.join(lacking)}")
    return C.ExperimentResult(NAME, "data parallel", dataclasses.asdict(config), [], notes=notes)
  modes = list(config.defences)
  bar = C.progress(len(modes) * config.seeds, NAME, progress)
  per_mode = {m: [] for m in modes}
  checks: dict[str, Any] = {"devices": f"{len(devices)} x {devices[0].device_kind}"}
  with C.Timer() as total:
    for seed in range(config.seeds):
      results = _run_modes(config, seed, devices, modes, bar)
      for m in modes:
        per_mode[m].append(results[m])
      if "single device" in results:
        for k, v in compare(results, config.rtol, config.atol).items():
          checks[k if config.seeds == 1 else f"seed {seed}: {k}"] = v
  bar.close()
  setting = (f"{len(devices)} x {devices[0].platform}, "
             f"global batch {config.per_device_batch * len(devices)}")
  runs = []
  for m in modes:
    rs = per_mode[m]
    runs.append(C.Run(
        setting=setting, defence=m, loss=np.stack([r["loss"] for r in rs]),
        grad_norm=np.stack([r["grad_norm"] for r in rs]),
        skipped=np.asarray([int(r["skipped"][-1]) for r in rs]),
        wall_s=float(np.sum([r["wall_s"] for r in rs])),
        note="matches single device" if m != "single device" and "single device" in modes
        else ""))
  return C.ExperimentResult(
      name=NAME,
      title=(f"Guarded SGD (monitor + zclip + skip_on_spike), {config.depth}-layer MLP, "
             f"{len(devices)} devices: pmap and sharded jit vs one device"),
      config=dataclasses.asdict(config), runs=runs, notes=notes, checks=checks, wall_s=total.s)
