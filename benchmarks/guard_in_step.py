"""Guard cost when the gradients are computed inside the jitted step.

The main runner (``python -m benchmarks``) feeds fixed gradients into the step,
so a ``lax.cond`` guard, whose updates leave the conditional as a full buffer,
pays for a tree-sized temporary that plain Adam does not need. In a real
training step the gradients come out of ``jax.grad`` inside the same program
and are a buffer anyway; this script measures that case side by side, every
step jitted with the parameters and the optimizer state donated, interleaved
in a fresh random order every round, medians after 2 warm-up rounds. Besides
the median step time it prints XLA's bytes accessed (relative to the first
row's) and the temporary buffers of each compiled step.

Two models:

* ``--model elementwise`` (default): parameters are ``--leaves`` float32
  matrices of ``--size x --size`` and the loss is elementwise, so the step is
  all optimizer. Rows: ``adam``, ``chain(og.clip_by_global_norm, adam)``,
  ``og.skip_nonfinite``, ``og.skip_on_spike`` and ``optax.apply_if_finite``
  around that chain, the two guards both as ``tx.update`` +
  ``optax.apply_updates`` and fused with ``og.update_and_apply``.
* ``--model transformer``: the experiments' decoder-only transformer (Flax
  NNX, untied read-out) on random tokens, forward, backward and update; the
  defaults are GPT-2-small sized (width 768, 12 layers, 12 heads, sequence
  1024, vocabulary 50257: 163.1M parameters), batch 8. Rows: ``adamw``,
  ``chain(og.clip_by_global_norm(1), adamw)``, ``og.skip_on_spike`` of that
  chain fused and unfused (both with ``value=loss``) and
  ``optax.apply_if_finite(chain, 5)``. Meant for an accelerator; on a CPU use
  small sizes (``--width 64 --layers 2 --heads 2 --seq 32 --vocab 256``).

    python -m benchmarks.guard_in_step [--leaves 6] [--size 2048] [--rounds 10]
    python -m benchmarks.guard_in_step --model transformer --rounds 7 --steps 5
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og
from benchmarks.runner import _hlo_stats

CHAIN = "chain(og.clip_by_global_norm(1), adam)"
ADAMW_CHAIN = "chain(og.clip_by_global_norm(1), adamw)"


def elementwise_variants() -> dict[str, tuple[optax.GradientTransformation, bool]]:
  """name -> (tx, fused) of the elementwise model."""
  inner = optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-3))
  return {
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


def transformer_variants() -> dict[str, tuple[optax.GradientTransformation, bool]]:
  """name -> (tx, fused) of the transformer (``value=loss`` reaches every tx)."""
  inner = optax.chain(og.clip_by_global_norm(1.0), optax.adamw(1e-4))
  return {
      "adamw": (optax.adamw(1e-4), False),
      ADAMW_CHAIN: (inner, False),
      "og.update_and_apply(og.skip_on_spike(chain)), value=loss": (
          og.skip_on_spike(inner), True),
      "og.skip_on_spike(chain), unfused, value=loss": (og.skip_on_spike(inner), False),
      "optax.apply_if_finite(chain, 5)": (optax.apply_if_finite(inner, 5), False),
  }


def elementwise_model(args) -> tuple[Any, Any, Callable, str]:
  """``(params, batch, value_and_grad, description)`` of the elementwise model."""
  shape = (args.size, args.size)
  params = {f"w{i}": jnp.full(shape, 0.01) for i in range(args.leaves)}
  x = {k: jnp.full(shape, 0.5) for k in params}

  def loss_fn(p, x):
    return sum(jnp.sum(jnp.tanh(p[k] * x[k]) ** 2) for k in p)

  n = args.leaves * args.size * args.size
  desc = f"{n:,} float32 parameters ({4 * n / 2**20:.0f} MiB)"
  return params, x, jax.value_and_grad(loss_fn), desc


def transformer_model(args) -> tuple[Any, Any, Callable, str]:
  """``(params, tokens, value_and_grad, description)`` of the decoder-only transformer."""
  flag = "--xla_force_host_platform_device_count"
  if flag not in os.environ.get("XLA_FLAGS", ""):  # one CPU device, as for the other model
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {flag}=1").strip()
  from experiments import _transformer as T

  graphdef, params = T.init_params(args.vocab, args.seq, args.width, args.heads, args.layers,
                                   False, seed=0)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq + 1)), jnp.int32)

  def loss_fn(p, tokens):
    return T.lm_loss(graphdef, p, tokens)[0]

  n = sum(x.size for x in jax.tree.leaves(params))
  desc = (f"decoder-only transformer, width {args.width}, {args.layers} layers, {args.heads} "
          f"heads, sequence {args.seq}, vocabulary {args.vocab}: {n:,} float32 parameters "
          f"({n / 1e6:.1f}M); batch {args.batch}")
  return params, tokens, jax.value_and_grad(loss_fn), desc


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m benchmarks.guard_in_step",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--model", choices=("elementwise", "transformer"), default="elementwise")
  ap.add_argument("--leaves", type=int, default=6, help="elementwise: number of matrices")
  ap.add_argument("--size", type=int, default=2048, help="elementwise: matrix side")
  ap.add_argument("--width", type=int, default=768, help="transformer: model width")
  ap.add_argument("--layers", type=int, default=12, help="transformer: blocks")
  ap.add_argument("--heads", type=int, default=12, help="transformer: attention heads")
  ap.add_argument("--seq", type=int, default=1024, help="transformer: sequence length")
  ap.add_argument("--vocab", type=int, default=50257, help="transformer: vocabulary")
  ap.add_argument("--batch", type=int, default=8, help="transformer: sequences per step")
  ap.add_argument("--rounds", type=int, default=10, help="timed rounds (after 2 warm-up)")
  ap.add_argument("--steps", type=int, default=1,
                  help="steps per case per round, timed together (default 1)")
  args = ap.parse_args(argv)
  if args.rounds < 1 or args.steps < 1:
    ap.error("--rounds and --steps must be >= 1")
  return args


def measure(args) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]], str]:
  """Per-step seconds of every round, XLA statistics of every variant, the model."""
  if args.model == "transformer":
    params, batch, value_and_grad, desc = transformer_model(args)
    variants = transformer_variants()
  else:
    params, batch, value_and_grad, desc = elementwise_model(args)
    variants = elementwise_variants()
  # the transformer's guards see the loss, as in training (value=loss)
  with_loss = args.model == "transformer"
  steps, state, times, stats = {}, {}, {}, {}
  for name, (tx, fused) in variants.items():
    plain = optax.with_extra_args_support(tx)

    def step(p, s, batch, tx=tx, plain=plain, fused=fused):
      loss, g = value_and_grad(p, batch)
      extra = {"value": loss} if with_loss else {}
      if fused:
        return og.update_and_apply(tx, g, s, p, **extra)
      u, s = plain.update(g, s, p, **extra)
      return optax.apply_updates(p, u), s

    p = jax.tree.map(jnp.copy, params)
    s = jax.tree.map(jnp.copy, tx.init(p))
    steps[name] = jax.jit(step, donate_argnums=(0, 1)).lower(p, s, batch).compile()
    stats[name] = _hlo_stats(steps[name])
    state[name] = (p, s)
    times[name] = []
  jax.tree.map(lambda x: x.delete() if isinstance(x, jax.Array) else None, params)
  rng = np.random.default_rng(0)
  for r in range(args.rounds + 2):
    for name in rng.permutation(list(steps)):
      p, s = state[name]
      t0 = time.perf_counter()
      for _ in range(args.steps):
        p, s = steps[name](p, s, batch)
      jax.block_until_ready((p, s))
      if r >= 2:  # warm-up rounds
        times[name].append((time.perf_counter() - t0) / args.steps)
      state[name] = (p, s)
  return times, stats, desc


def main(argv=None):
  args = parse_args(argv)
  times, stats, desc = measure(args)
  names = list(times)
  base, chain = np.median(times[names[0]]), np.median(times[names[1]])
  base_bytes = stats[names[0]].get("bytes_accessed")
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  dev = jax.devices()[0]
  print(f"{desc}; {args.rounds} interleaved rounds of {args.steps} step(s), medians; "
        f"jax {jax.__version__} on {getattr(dev, 'device_kind', dev)}; load average {load:.1f}")
  print(f"| step | median ms | over {names[0]} | over the unguarded chain | "
        f"XLA bytes vs {names[0]} | XLA temp MiB |\n|---|---:|---:|---:|---:|---:|")
  for name, ts in times.items():
    med = np.median(ts)
    over_chain = "-" if name in names[:2] else f"{100 * (med / chain - 1):+.1f}%"
    nbytes = stats[name].get("bytes_accessed")
    rel = "-" if nbytes is None or not base_bytes else f"{nbytes / base_bytes:.2f}x"
    temp = stats[name].get("temp_bytes")
    temp_txt = "-" if temp is None else f"{temp / 2**20:.1f}"
    over_base = "-" if name == names[0] else f"{100 * (med / base - 1):+.1f}%"
    print(f"| `{name}` | {med * 1e3:.2f} | {over_base} | {over_chain} | {rel} | {temp_txt} |")


if __name__ == "__main__":
  main()
