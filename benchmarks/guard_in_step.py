"""Guard cost when the gradients are computed inside the jitted step.

The main runner (``python -m benchmarks``) feeds fixed gradients into the step,
so a ``lax.cond`` guard, whose updates leave the conditional as a full buffer,
pays for a tree-sized temporary that plain Adam does not need. In a real
training step the gradients come out of ``jax.grad`` inside the same program
and are a buffer anyway; this script measures that case side by side:
``adam``, ``chain(og.clip_by_global_norm, adam)``, ``og.skip_nonfinite`` and
``optax.apply_if_finite`` around that chain, with an elementwise model whose
parameters are ``leaves`` float32 matrices of ``size x size``.

    python -m benchmarks.guard_in_step [--leaves 6] [--size 2048] [--rounds 10]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og


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
  variants = {
      "adam": optax.adam(1e-3),
      "chain(og.clip_by_global_norm(1), adam)": inner,
      "og.skip_nonfinite(chain(clip, adam))": og.skip_nonfinite(inner),
      "optax.apply_if_finite(chain(clip, adam), 5)": optax.apply_if_finite(inner, 5),
  }
  steps, state, times = {}, {}, {}
  for name, tx in variants.items():
    def step(p, s, x, tx=tx):
      u, s = tx.update(jax.grad(loss_fn)(p, x), s, p)
      return optax.apply_updates(p, u), s

    steps[name] = jax.jit(step, donate_argnums=(0, 1))
    p = jax.tree_util.tree_map(jnp.copy, params)
    state[name] = (p, jax.tree_util.tree_map(jnp.copy, tx.init(p)))
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
  base = np.median(times["adam"])
  n = args.leaves * args.size * args.size
  print(f"{n:,} float32 parameters, {args.rounds} interleaved rounds, medians")
  print("| step | median ms | over adam |\n|---|---:|---:|")
  for name, ts in times.items():
    med = np.median(ts)
    print(f"| `{name}` | {med * 1e3:.1f} | {100 * (med / base - 1):+.1f}% |")


if __name__ == "__main__":
  main()
