"""One process of the two-process training run in ``test_multiprocess.py``.

Run as ``python _multiprocess_worker.py PROCESS_ID PORT OUT_DIR`` with
``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
It builds every optimizer *before* ``jax.distributed.initialize`` (as a
multi-host script does), then trains a small MLP regression on a global mesh of
all 8 devices with the batch sharded across the two processes, once per
``(mode, guard)`` configuration, and writes ``OUT_DIR/<process_id>.npz`` with
the final parameters and the per-step guard decisions.

The training functions are importable: ``run_all`` with ``jax.distributed``
left uninitialised runs the same configurations on one process's 8 devices
(the reference run of the test). Nothing runs at import time.

Data are deterministic: step ``t`` uses a fresh global batch drawn from
``numpy.random.default_rng(t)``; process ``i`` holds its ``i``-th slice of the
rows. At ``NAN_STEP`` one element of the *last* process's slice is NaN, and at
``SPIKE_STEP`` the *first* process's targets are multiplied by ``SPIKE_SCALE``;
every other shard is healthy.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_guard as og

MODES = ("jit", "shard_map")
GUARDS = ("skip_nonfinite", "skip_on_spike")
STEPS = 20
NAN_STEP = 7
SPIKE_STEP = 14
SPIKE_SCALE = 1e4
NUM_DEVICES = 8
PER_DEVICE = 4  # batch rows per device
IN, HIDDEN = 4, 8


def make_optimizers(axis_name):
  """The guarded optimizers, built without touching the XLA backend."""
  head = []
  if axis_name is not None:
    # the guard sees each device's own gradient (a different shard of the
    # batch); the mean over devices is taken inside the guard, on applied steps
    head.append(
        optax.GradientTransformation(
            optax.init_empty_state,
            lambda updates, state, params=None: (_pmean(updates, axis_name), state),
        )
    )

  def inner():
    return optax.chain(
        *head,
        og.clip_by_global_norm(1.0),
        optax.adam(og.warmup(og.linear_decay(1e-2, 100), 5)),
    )

  return {
      "skip_nonfinite": og.skip_nonfinite(inner(), axis_name=axis_name),
      "skip_on_spike": og.skip_on_spike(
          inner(), sigma=6.0, window=8, min_history=4, axis_name=axis_name
      ),
  }


def _pmean(tree, axis_name):
  return jax.tree.map(lambda x: jax.lax.pmean(x, axis_name), tree)


def global_batch(step):
  """The global batch of ``step`` (NumPy), with the injected faults."""
  rng = np.random.default_rng(step)
  rows = NUM_DEVICES * PER_DEVICE
  x = rng.standard_normal((rows, IN)).astype(np.float32)
  w_true = np.arange(1, IN + 1, dtype=np.float32) / IN
  y = (np.tanh(x @ w_true) + 0.1 * rng.standard_normal(rows)).astype(np.float32)[:, None]
  if step == NAN_STEP:
    x[-1, 0] = np.nan  # a row of the last process only
  if step == SPIKE_STEP:
    y[: rows // 2] *= SPIKE_SCALE  # the rows of the first process only
  return x, y


def init_params():
  rng = np.random.default_rng(1234)
  return {
      "w1": (rng.standard_normal((IN, HIDDEN)) / np.sqrt(IN)).astype(np.float32),
      "b1": np.zeros((HIDDEN,), np.float32),
      "w2": (rng.standard_normal((HIDDEN, 1)) / np.sqrt(HIDDEN)).astype(np.float32),
      "b2": np.zeros((1,), np.float32),
  }


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def _host(x):
  """A replicated global array as NumPy, after checking every local copy agrees."""
  copies = [np.asarray(s.data) for s in x.addressable_shards]
  for c in copies[1:]:
    if c.tobytes() != copies[0].tobytes():
      raise AssertionError("the local copies of a replicated array differ")
  return copies[0]


def train(mode, guard, tx):
  """Trains ``STEPS`` steps of ``tx`` under ``mode``.

  Returns a dict of NumPy arrays: the final ``params/<name>`` (replicated: every
  local copy is checked to be identical), ``num_skipped`` (the guard's counter
  after each step) and, for ``shard_map``, ``grad_finite``: per step and per
  local device, whether the gradient that device handed to the guard was
  finite.
  """
  mesh = Mesh(np.array(jax.devices()), ("d",))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("d"))
  nproc, pid = jax.process_count(), jax.process_index()

  def local(a):
    n = a.shape[0] // nproc
    return a[pid * n : (pid + 1) * n]

  def step(params, state, x, y, grad_params):
    grads = jax.grad(loss_fn)(grad_params, x, y)
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    num_skipped = og.guard_stats(state)[f"{guard}/num_skipped"]
    return params, state, num_skipped, jnp.isfinite(optax.tree.norm(grads))[None]

  if mode == "jit":
    # x and y are global arrays sharded over the mesh: the gradient is global
    step_fn = jax.jit(lambda params, state, x, y: step(params, state, x, y, params)[:3])
  else:
    # differentiating with respect to a device-varying copy of the parameters
    # gives each device the gradient of its own shard of the batch (no psum);
    # the guard's axis_name is what makes its decision global
    step_fn = jax.jit(
        jax.shard_map(
            lambda params, state, x, y: step(
                params, state, x, y, jax.lax.pcast(params, "d", to="varying")
            ),
            mesh=mesh,
            in_specs=(P(), P(), P("d"), P("d")),
            out_specs=(P(), P(), P(), P("d")),
        )
    )

  params = jax.device_put(init_params(), replicated)
  state = jax.jit(tx.init, out_shardings=replicated)(params)
  num_skipped, grad_finite = [], []
  for t in range(STEPS):
    x, y = global_batch(t)
    x = jax.make_array_from_process_local_data(batch_sharding, local(x), x.shape)
    y = jax.make_array_from_process_local_data(batch_sharding, local(y), y.shape)
    params, state, skipped, *finite = step_fn(params, state, x, y)
    num_skipped.append(_host(skipped))
    if finite:
      shards = sorted(finite[0].addressable_shards, key=lambda s: s.index[0].start)
      grad_finite.append(np.concatenate([np.asarray(s.data) for s in shards]))
  out = {f"params/{k}": v for k, v in jax.tree.map(_host, params).items()}
  out["num_skipped"] = np.array(num_skipped, np.int32)
  if grad_finite:
    out["grad_finite"] = np.array(grad_finite)
  return out


def run_all(optimizers):
  """Every ``(mode, guard)`` run, as one flat dict of NumPy arrays."""
  out = {}
  for mode in MODES:
    for guard in GUARDS:
      for k, v in train(mode, guard, optimizers[mode][guard]).items():
        out[f"{mode}/{guard}/{k}"] = v
  return out


def build_all():
  return {"jit": make_optimizers(None), "shard_map": make_optimizers("d")}


def main(process_id, port, out_dir):
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception as e:  # an option this jax does not know
    print(f"GLOO-UNAVAILABLE: {e!r}", flush=True)
    return 3

  optimizers = build_all()  # before initialize, on purpose

  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}",
      num_processes=2,
      process_id=process_id,
      initialization_timeout=60,
  )
  try:
    devices = jax.devices()
  except Exception as e:
    if "gloo" in str(e).lower():
      print(f"GLOO-UNAVAILABLE: {e!r}", flush=True)
      return 3
    raise
  assert len(devices) == NUM_DEVICES, devices
  assert len(jax.local_devices()) == NUM_DEVICES // 2, jax.local_devices()

  out = run_all(optimizers)
  np.savez(os.path.join(out_dir, f"{process_id}.npz"), **out)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
