"""Guard cost when the gradients are computed inside the jitted step.

The main runner (``python -m benchmarks``) feeds fixed gradients into the step,
so a ``lax.cond`` guard, whose updates leave the conditional as a full buffer,
pays for a tree-sized temporary that plain Adam does not need. In a real
training step the gradients come out of ``jax.grad`` inside the same program
and are a buffer anyway; this script measures that case side by side:
``adam``, ``chain(og.clip_by_global_norm, adam)``, ``og.skip_nonfinite``,
``og.skip_on_spike`` and ``optax.apply_if_finite`` around that chain, the two
guards both as ``tx.update`` + ``optax.apply_updates`` and fused with
``og.update_and_apply``, with an elementwise model whose parameters are
``leaves`` float32 matrices of ``size x size``. Besides the median step time it
prints XLA's bytes accessed (relative to adam's) and the temporary buffers of
each compiled step.

    python -m benchmarks.guard_in_step [--leaves 6] [--size 2048] [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og
from benchmarks.runner import _hlo_stats

CHAIN = "chain(og.clip_by_global_norm(1), adam)"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--leaves", type=int, default=6)
  ap.add_argument("--size", type=int, default=2048)
  ap.add_argument("--rounds", type=int, default=10)
  args = ap.parse_args(argv)
  shape = (args.size, args.size)
  params = {f"w{i}": jnp.full(shape, 0.01) for i in range(args.leaves)}
  x = {k: jnp.full(shape, 0.5) for k in params}

  def loss_fn(p, x):
    return sum(jnp.sum(jnp.tanh(p[k] * x[k]) ** 2) for k in p)

  inner = optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-3))
  # name -> (tx, fused)
  variants = {
      "adam": (optax.adam(1e-3), False),
      CHAIN: (inner, False),
      "og.skip_nonfinite(chain(clip, adam))": (og.skip_nonfinite(inner), False),
      "og.update_and_apply(og.skip_nonfinite(chain(clip, adam)))": (
          og.skip_nonfinite(inner), True),
      "og.skip_on_spike(chain(clip, adam))": (og.skip_on_spike(inner), False),
      "og.update_and_apply(og.skip_on_spike(chain(clip, adam)))": (
          og.skip_on_spike(inner), True),
      "optax.apply_if_finite(chain(clip, adam), 5)": (optax.apply_if_finite(inner, 5), False),
  }
  steps, state, times, stats = {}, {}, {}, {}
  for name, (tx, fused) in variants.items():
    def step(p, s, x, tx=tx, fused=fused):
      g = jax.grad(loss_fn)(p, x)
      if fused:
        return og.update_and_apply(tx, g, s, p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    p = jax.tree.map(jnp.copy, params)
    s = jax.tree.map(jnp.copy, tx.init(p))
    steps[name] = jax.jit(step, donate_argnums=(0, 1)).lower(p, s, x).compile()
    stats[name] = _hlo_stats(steps[name])
    state[name] = (p, s)
    times[name] = []
  rng = np.random.default_rng(0)
  for r in range(args.rounds + 2):
    for name in rng.permutation(list(steps)):
      p, s = state[name]
      t0 = time.perf_counter()
      p, s = steps[name](p, s, x)
      jax.block_until_ready(p)
      if r >= 2:  # warm-up rounds
        times[name].append(time.perf_counter() - t0)
      state[name] = (p, s)
  base, chain = np.median(times["adam"]), np.median(times[CHAIN])
  base_bytes = stats["adam"].get("bytes_accessed")
  n = args.leaves * args.size * args.size
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"{n:,} float32 parameters ({4 * n / 2**20:.0f} MiB), {args.rounds} interleaved "
        f"rounds, medians; load average {load:.1f}")
  print("| step | median ms | over adam | over the unguarded chain | XLA bytes vs adam "
        "| XLA temp MiB |\n|---|---:|---:|---:|---:|---:|")
  for name, ts in times.items():
    med = np.median(ts)
    over_chain = "-" if name in ("adam", CHAIN) else f"{100 * (med / chain - 1):+.1f}%"
    nbytes = stats[name].get("bytes_accessed")
    rel = "-" if nbytes is None or not base_bytes else f"{nbytes / base_bytes:.2f}x"
    temp = stats[name].get("temp_bytes")
    temp_txt = "-" if temp is None else f"{temp / 2**20:.1f}"
    print(f"| `{name}` | {med * 1e3:.1f} | {100 * (med / base - 1):+.1f}% | {over_chain} "
          f"| {rel} | {temp_txt} |")


if __name__ == "__main__":
  main()
