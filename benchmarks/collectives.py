"""Collectives of a sharded training step, per defence: ``python -m benchmarks.collectives``.

Compiles one jitted and donated step (``tx.update`` then
``optax.apply_updates``, or ``og.update_and_apply`` for the fused variants)
for every step variant of :mod:`benchmarks.cases`, with the parameters, the
gradients and the optimizer state sharded FSDP-style over a 1-D mesh of 8
simulated CPU devices (a ``NamedSharding`` per leaf): each leaf is split
along its first axis that 8 divides, and replicated when none does.
``axis_name`` stays None, as under ``jit`` it should. From the optimized HLO
it counts the all-reduce ops and their operands, and it checks that every
parameter leaves the step with the sharding it came in with (no defence
gathers or reshards a parameter).

Nothing is run or allocated: the step is only compiled for abstract
arrays, so the full GPT-2-small tree costs compile time, not memory.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections import Counter
from typing import Any

NUM_DEVICES = 8
_ALL_REDUCE = re.compile(r"=\s*(\S+|\([^)]*\))\s+all-reduce(?:-start)?\(")
_OTHER = re.compile(r"\b(all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(")


def fsdp(abstract: Any, mesh: Any, shapes: Any = None) -> Any:
  """``abstract`` (a tree of ``jax.ShapeDtypeStruct``) with FSDP shardings over ``mesh``.

  Each leaf is split over the mesh's one axis along its first axis that the
  axis size divides, and replicated when none does (scalars, odd vectors).
  With ``shapes`` (a set of shapes: the parameters'), only leaves of those
  shapes are split (an optimizer state's moments, not its history buffers).
  """
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  (name,), (size,) = mesh.axis_names, mesh.devices.shape

  def spec(shape: tuple[int, ...]) -> Any:
    if shapes is not None and tuple(shape) not in shapes:
      return P()
    for axis, dim in enumerate(shape):
      if dim % size == 0:
        return P(*([None] * axis), name)
    return P()

  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec(x.shape))),
      abstract,
  )


def all_reduces(hlo: str) -> list[str]:
  """The result types of the all-reduce ops of an optimized HLO module's text."""
  return [m.group(1) for m in _ALL_REDUCE.finditer(hlo)]


def other_collectives(hlo: str) -> Counter:
  """How many all-gather, reduce-scatter, collective-permute and all-to-all ops it has."""
  return Counter(m.group(1) for m in _OTHER.finditer(hlo))


def measure(variant: Any, params: Any, mesh: Any) -> dict[str, Any]:
  """Compiles ``variant``'s step on the FSDP-sharded abstract ``params``.

  The gradients are sharded like the parameters, the optimizer state's
  moments too, its other leaves (counts, history buffers) are replicated.
  Returns the all-reduces of the optimized HLO and whether every parameter
  leaves the step with the sharding it came in with.
  """
  import jax
  import jax.numpy as jnp
  import optax

  import optax_guard as og

  tx = optax.with_extra_args_support(variant.build())
  shapes = {tuple(p.shape) for p in jax.tree.leaves(params)}
  opt_state = fsdp(jax.eval_shape(tx.init, params), mesh, shapes)

  def step(params, opt_state, grads, value):
    if variant.fused:
      return og.update_and_apply(tx, grads, opt_state, params, value=value)
    updates, opt_state = tx.update(grads, opt_state, params, value=value)
    return optax.apply_updates(params, updates), opt_state

  value = jax.ShapeDtypeStruct((), jnp.float32)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, params, value).compile()
  kept = all(
      s.is_equivalent_to(p.sharding, len(p.shape))
      for s, p in zip(jax.tree.leaves(compiled.output_shardings[0]), jax.tree.leaves(params),
                      strict=True)
  )
  hlo = compiled.as_text()
  return {"name": variant.name, "code": variant.code, "all_reduces": all_reduces(hlo),
          "others": other_collectives(hlo), "keeps_sharding": kept}


def sharded_tree(tree: str, scale: float, devices: Any) -> tuple[Any, Any]:
  """``(abstract params, mesh)``: a benchmark tree FSDP-sharded over ``devices``."""
  import numpy as np
  from jax.sharding import Mesh

  from benchmarks import trees

  mesh = Mesh(np.array(devices), ("fsdp",))
  return fsdp(trees.abstract_tree(tree, "float32", scale), mesh), mesh


def summary(result: str) -> str:
  """An all-reduce's result type, a tuple counted by type: ``(74 x f32[])``."""
  types = [t.strip() for t in re.sub(r"/\*.*?\*/", "", result).strip("()").split(",")]
  counts = Counter(types)
  return "(" + ", ".join(f"{n} x {t}" for t, n in counts.items()) + ")"


def table(rows: list[dict[str, Any]]) -> str:
  """A Markdown table of :func:`measure` rows."""
  lines = ["| step | all-reduces | their results | other collectives | parameters keep "
           "their sharding |", "| --- | ---: | --- | --- | --- |"]
  for r in rows:
    shapes = ", ".join(summary(x) for x in r["all_reduces"]) or "-"
    others = ", ".join(f"{n} {kind}" for kind, n in sorted(r["others"].items())) or "-"
    kept = "yes" if r["keeps_sharding"] else "**no**"
    lines.append(f"| `{r['code']}` | {len(r['all_reduces'])} | {shapes} | {others} | {kept} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tree", default="gpt2", help="a tree of benchmarks.trees (gpt2)")
  parser.add_argument("--scale", type=float, default=1.0,
                      help="element count factor per leaf (1, the default: the full tree; "
                           "a scaled leaf whose axes 8 no longer divides is replicated)")
  parser.add_argument("--only", nargs="*", help="step variants to compile (default: all)")
  args = parser.parse_args(argv)
  flag = "--xla_force_host_platform_device_count"
  if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {flag}={NUM_DEVICES}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  from benchmarks import cases

  devices = jax.devices()[:NUM_DEVICES]
  params, mesh = sharded_tree(args.tree, args.scale, devices)
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  split = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
  print(f"{args.tree} tree at scale {args.scale}: {n:,} float32 parameters in "
        f"{len(jax.tree.leaves(params))} leaves, {split} of them sharded over {len(devices)} "
        f"{devices[0].platform} devices (the others replicated); jax {jax.__version__}\n")
  rows = [measure(v, params, mesh) for v in cases.step_variants()
          if not cases.missing(v) and (not args.only or v.name in args.only)]
  print(table(rows))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
