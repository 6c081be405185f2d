"""The cost of arithmetic inside a fused reduction: ``python -m benchmarks.reductions``.

StableAdamW's per-tensor ``RMS`` is one reduction over the gradient and the
second moment. This times, side by side (interleaved rounds, medians), the
sums that differ only in the elementwise arithmetic before the reduction, on
two arrays of ``--size`` x ``--size`` float32 (default 4,096: 64 MiB each),
next to an elementwise map that reads both and writes one, and prints one
line per expression. On XLA:CPU each elementwise operation inside the fused
reduction adds time of its own, and so can their order, so the RMS is
written in the form that measures fastest (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

# name -> f(g, v, bc, floor); bc and floor are traced scalars, as in the optimizer
EXPRESSIONS = {
    "sum(g)": lambda g, v, bc, floor: jnp.sum(g),
    "sum(g * g)": lambda g, v, bc, floor: jnp.sum(g * g),
    "sum(g * g / v)": lambda g, v, bc, floor: jnp.sum(g * g / v),
    "sum(g * (g / maximum(v, floor * bc))) * bc (StableAdamW's RMS)":
        lambda g, v, bc, floor: jnp.sum(g * (g / jnp.maximum(v, floor * bc))) * bc,
    "sum(g * g / maximum(v, floor * bc)) * bc (the same, squared first)":
        lambda g, v, bc, floor: jnp.sum(g * g / jnp.maximum(v, floor * bc)) * bc,
    "sum(g * g / maximum(v / bc, floor)) (the textbook RMS)":
        lambda g, v, bc, floor: jnp.sum(g * g / jnp.maximum(v / bc, floor)),
    "sum(|g| * |g| / maximum(v / bc, floor)) (the RMS before)":
        lambda g, v, bc, floor: jnp.sum(jnp.abs(g) * jnp.abs(g) / jnp.maximum(v / bc, floor)),
    "g * v (a map: two reads, one write)": lambda g, v, bc, floor: g * v,
}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.reductions",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", type=int, default=4096, help="side of the square arrays")
  parser.add_argument("--rounds", type=int, default=9, help="interleaved timed rounds")
  args = parser.parse_args(argv)
  if args.size < 1 or args.rounds < 1:
    parser.error("--size and --rounds must be >= 1")
  shape = (args.size, args.size)
  g = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  v = jnp.abs(jax.random.normal(jax.random.key(1), shape, jnp.float32)) * 1e-3
  bc, floor = jnp.float32(0.001), jnp.float32(1e-16)
  fns = {name: jax.jit(f) for name, f in EXPRESSIONS.items()}
  for f in fns.values():
    jax.block_until_ready(f(g, v, bc, floor))
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(args.rounds):
    for name, f in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(f(g, v, bc, floor))
      times[name].append(time.perf_counter() - start)
  print(f"{jax.devices()[0].platform}, two {args.size} x {args.size} float32 arrays, "
        f"median of {args.rounds} interleaved rounds")
  for name, t in times.items():
    print(f"{np.median(t) * 1e3:8.2f} ms  {name}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
