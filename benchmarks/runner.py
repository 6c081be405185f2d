"""The benchmark runner: ``python -m benchmarks --help``.

Everything runs in one process. Step variants and standalone operations are
compiled ahead of time, then timed interleaved round-robin (one call of each
case per round, in a fresh seeded random order every round) so that a slow
phase of a shared machine hits all cases alike and no case always follows the
same one; the reported time of a case is the
median over the rounds after ``--warmup`` discarded rounds. Every call is
blocked on with ``jax.block_until_ready``. Parameters and optimizer state are
donated (updated in place); the gradients are fixed and fed to every call.

Memory: when all cases' buffers fit comfortably (``--memory auto``: under 40%
of the available memory, the device's on an accelerator) they stay alive for
the whole run; otherwise each
case creates its parameters and state right before its turn, runs one untimed
step, the timed step(s), and frees them, so only one variant's buffers (plus
the shared gradients) are alive at a time.

The wide tree (``--tree wide``: 8 leaves of 8192 x 8192, 2 GiB per float32
copy) is the bandwidth-bound regime of an accelerator. Without ``--only`` it
times the cases of :data:`WIDE_ONLY` (``--only '*'`` times them all), e.g.
``python -m benchmarks --tree wide --rounds 7 --steps 10 --no-compile``;
``--leaf-size 64`` shrinks it to a CPU-sized smoke run.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og
from benchmarks import cases as cs
from benchmarks import report
from benchmarks import trees as tr

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
KEEP_FRACTION = 0.4
# Fewer timed rounds than this (or a --scale below 1) is a smoke run: its
# targets are labelled NOISY instead of being judged PASS or MISS.
MIN_ROUNDS = 5
MIN_COMPILE_ROUNDS = 3
# The cases of a wide-tree run unless --only says otherwise (the references
# adam, optax's clip and the unfused skip_nonfinite come with them).
WIDE_ONLY = ("og.clip_by_global_norm,og.skip_nonfinite:fused,og.skip_on_spike:fused,"
             "og.skip_on_spike,optax.apply_if_finite,og.monitor,scale (bound)")
# The chains and trees of --compile unless --only / --compile-trees say otherwise
# (each with its compile_ref: the closest optax chain).
COMPILE_ONLY = ("og.clip_by_global_norm,og.skip_on_spike:fused,og.stable_adamw,og.spam,"
                "og.adagc")
COMPILE_TREES = "uniform:250,uniform:500"
# A chain's compile time may grow from the smallest to the largest compile tree
# by at most this much more than its reference's, and take at most
# COMPILE_VS_REF times its reference's on the largest.
COMPILE_GROWTH, COMPILE_VS_REF = 1.25, 1.5


# ----------------------------------------------------------------------------
# Timed cases


def _nbytes(tree: Any) -> int:
  return sum(
      math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
  )


def _delete(tree: Any) -> None:
  for x in jax.tree.leaves(tree):
    if isinstance(x, jax.Array) and not x.is_deleted():
      x.delete()


def _hlo_stats(compiled: Any) -> dict[str, Any]:
  """Temporary bytes, bytes accessed and fusion count of a compiled program."""
  out: dict[str, Any] = {}
  try:
    mem = compiled.memory_analysis()
    out["temp_bytes"] = int(mem.temp_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend reports it
    pass
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["bytes_accessed"] = float(cost["bytes accessed"])
  except Exception:  # noqa: BLE001
    pass
  try:
    text = compiled.as_text()
    out["fusions"] = len(re.findall(r"^\s*(?:ROOT )?\S+ = \S+ fusion\(", text, re.M))
    out["hlo_fingerprint"] = hlo_fingerprint(text)
  except Exception:  # noqa: BLE001
    pass
  return out


def hlo_fingerprint(text: str) -> str:
  """A hash of an optimized HLO text that ignores names and metadata.

  Two steps with the same fingerprint compile to the same program, so any
  difference between their timings is noise.
  """
  lines = []
  for line in text.splitlines():
    if " = " not in line:
      continue
    line = re.sub(r",? (metadata|backend_config|frontend_attributes)=\{.*", "", line)
    line = re.sub(r"%[\w.-]+", "%", line)
    lines.append(line.strip())
  return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def make_step(tx: optax.GradientTransformation, fused: bool = False):
  """The timed training step (a fresh closure every call).

  ``fused``: ``og.update_and_apply(tx, ...)`` instead of ``tx.update``
  followed by ``optax.apply_updates``.
  """
  if fused:
    def fused_step(params, state, grads):
      return og.update_and_apply(tx, grads, state, params)

    return fused_step

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


class Case:
  """What :func:`time_cases` times: one compiled program and the buffers it runs on.

  Per turn of a case: ``setup`` creates its buffers, ``prepare`` (untimed)
  readies them before every ``call`` (the timed call), ``teardown`` frees
  them; ``check`` is the sanity check taken after the last timed call.
  ``section`` names the section of the results the case is reported in,
  ``bytes`` the buffers the case keeps alive besides the shared gradients,
  ``temp_bytes`` the temporary buffers of its compiled program.
  """

  section: str
  compiled: Any
  compile_s: float
  bytes: int
  temp_bytes: int

  def __init__(self, name: str, grads: Any, steps: int):
    self.name = name
    self.grads = grads
    self.steps = steps

  def _compile(self, lower: Any) -> None:
    """Compiles ``lower()`` (a ``jax.stages.Lowered``) into ``compiled``, timed."""
    t0 = time.perf_counter()
    self.compiled = lower().compile()
    self.compile_s = time.perf_counter() - t0
    self.temp_bytes = _hlo_stats(self.compiled).get("temp_bytes", 0)

  def stats(self) -> dict[str, Any]:
    return _hlo_stats(self.compiled)

  def setup(self) -> None:
    pass

  def prepare(self) -> None:
    pass

  def call(self) -> None:
    raise NotImplementedError

  def teardown(self) -> None:
    raise NotImplementedError

  def check(self) -> dict[str, Any]:
    raise NotImplementedError


class StepCase(Case):
  """A full optimizer step, parameters and state donated."""

  section = "step"

  def __init__(self, variant: cs.StepVariant, abstract: Any, grads: Any, steps: int):
    super().__init__(variant.name, grads, steps)
    self.variant = variant
    self.tx = variant.build()
    tx = self.tx

    def create(g):
      params = jax.tree.map(lambda x: (-50 * x).astype(x.dtype), g)
      return params, tx.init(params)

    self._create = jax.jit(create)
    state_abs = jax.eval_shape(tx.init, abstract)
    self._compile(lambda: jax.jit(make_step(tx, variant.fused), donate_argnums=(0, 1))
                  .lower(abstract, state_abs, abstract))
    self.bytes = _nbytes(abstract) + _nbytes(state_abs)
    self.params = self.state = None

  def setup(self) -> None:
    self.params, self.state = self._create(self.grads)
    jax.block_until_ready((self.params, self.state))

  # prepare: nothing, the gradients are fixed: every step clips (global norm ~11 > 1)

  def call(self) -> None:
    self.params, self.state = self.compiled(self.params, self.state, self.grads)
    jax.block_until_ready((self.params, self.state))

  def teardown(self) -> None:
    _delete((self.params, self.state))
    self.params = self.state = None

  def check(self) -> dict[str, Any]:
    """Finite parameters, and how many steps a guard skipped (should be 0)."""
    out = {"finite": bool(jnp.isfinite(optax.tree.norm(self.params)))}
    skipped = _skip_counters(self.state)
    if skipped is not None:
      out["skipped_steps"] = skipped
    return out


def _is_apply_if_finite(node: Any) -> bool:
  return isinstance(node, optax.ApplyIfFiniteState)


def _skip_counters(state: Any) -> int | None:
  """Steps skipped by every guard in a state (None: the state holds no guard).

  The guards of optax_guard declare their skip counters as the
  ``*/num_skipped`` entries of ``og.guard_stats``; ``optax.apply_if_finite``
  counts its skips in ``ApplyIfFiniteState.total_notfinite``.
  """
  found = [int(np.asarray(v)) for k, v in og.guard_stats(state).items()
           if k.endswith("/num_skipped")]
  found += [int(np.asarray(node.total_notfinite))
            for node in jax.tree.leaves(state, is_leaf=_is_apply_if_finite)
            if _is_apply_if_finite(node)]
  return sum(found) if found else None


class StandaloneCase(Case):
  """An operation on the gradient tree alone (a norm, a clip, a scale)."""

  section = "standalone"

  def __init__(self, spec: cs.Standalone, abstract: Any, grads: Any, steps: int):
    super().__init__(spec.name, grads, steps)
    self.spec = spec
    self.c = jnp.float32(0.999)
    if spec.kind == "norm":
      self._compile(lambda: jax.jit(spec.fn).lower(abstract))
      self.bytes = 0
    else:
      self._compile(lambda: jax.jit(spec.fn, donate_argnums=0).lower(abstract, self.c))
      self.bytes = _nbytes(abstract)
      self._copy = jax.jit(lambda g: jax.tree.map(lambda x: -x, g))
      # Refills the donated tree in place with the gradients (no allocation).
      self._refill = jax.jit(
          lambda t, g: jax.tree.map(lambda _, x: -x, t, g), donate_argnums=0
      )
    self.tree = None

  def setup(self) -> None:
    if self.spec.kind == "map":
      self.tree = self._copy(self.grads)
      jax.block_until_ready(self.tree)

  def prepare(self) -> None:
    """Untimed, before every call: a map starts from the gradients again.

    Otherwise a clip would see its own output (norm at the bound, nothing to
    clip) from the second call on, and the compiled select of
    ``optax.clip_by_global_norm`` writes nothing at all in that case.
    """
    if self.spec.kind == "map":
      self.tree = self._refill(self.tree, self.grads)
      jax.block_until_ready(self.tree)

  def call(self) -> None:
    if self.spec.kind == "norm":
      jax.block_until_ready(self.compiled(self.grads))
    else:
      self.tree = self.compiled(self.tree, self.c)
      jax.block_until_ready(self.tree)

  def teardown(self) -> None:
    if self.tree is not None:
      _delete(self.tree)
    self.tree = None

  def check(self) -> dict[str, Any]:
    if self.spec.kind == "norm":
      return {"finite": bool(jnp.isfinite(self.compiled(self.grads)))}
    return {"finite": bool(jnp.isfinite(optax.tree.norm(self.tree)))}


def available_memory() -> int | None:
  """Free bytes where the buffers live: the device's memory on an accelerator
  (None when it does not say), else the host's ``MemAvailable``."""
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    try:
      stats = dev.memory_stats() or {}
      return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    except Exception:  # noqa: BLE001 - not every backend reports it
      return None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def time_cases(
    cases: list[Case], rounds: int, warmup: int, keep: bool, log, seed: int = 0
) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]]]:
  """Round-robin timing.

  Returns each case's per-round seconds (per step) and its sanity check
  (``case.check()``) taken after its last timed call; every case's buffers
  are freed on return.
  """
  times: dict[str, list[float]] = {c.name: [] for c in cases}
  checks: dict[str, dict[str, Any]] = {}
  if keep:
    for c in cases:
      c.setup()
  total = warmup + rounds
  rng = np.random.default_rng(seed)
  for r in range(total):
    t_round = time.perf_counter()
    # A fresh (seeded) order every round, so that no case always follows the
    # same one (e.g. the teardown of a large state) or runs first.
    for i in rng.permutation(len(cases)):
      c = cases[i]
      if not keep:
        c.setup()
        c.prepare()
        c.call()  # untimed: first step on fresh buffers
      elapsed = 0.0
      for _ in range(c.steps):
        c.prepare()
        t0 = time.perf_counter()
        c.call()
        elapsed += time.perf_counter() - t0
      if r >= warmup:
        times[c.name].append(elapsed / c.steps)
      if r == total - 1:
        checks[c.name] = c.check()
      if not keep or r == total - 1:
        c.teardown()
    tag = "warm-up" if r < warmup else "round"
    log(f"  {tag} {r + 1 - (warmup if r >= warmup else 0)}/"
        f"{warmup if r < warmup else rounds}: {time.perf_counter() - t_round:.2f} s")
  return times, checks


# ----------------------------------------------------------------------------
# Compile time


def compile_once(variant: cs.StepVariant, abstract: Any) -> tuple[float, float]:
  """(lower seconds, compile seconds) of a fresh step for ``variant``."""
  tx = variant.build()
  state_abs = jax.eval_shape(tx.init, abstract)
  fn = jax.jit(make_step(tx, variant.fused), donate_argnums=(0, 1))
  t0 = time.perf_counter()
  lowered = fn.lower(abstract, state_abs, abstract)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  return t1 - t0, t2 - t1


def time_compiles(
    variants: list[cs.StepVariant], tree_names: list[str], dtype: str, rounds: int, log
) -> dict[str, Any]:
  out: dict[str, Any] = {}
  jax.config.update("jax_enable_compilation_cache", False)
  for tname in tree_names:
    abstract = tr.abstract_tree(tname, dtype)
    info = tr.describe(abstract)
    samples: dict[str, list[tuple[float, float]]] = {v.name: [] for v in variants}
    log(f"compile time, tree {tname} ({info['leaves']} leaves), {rounds} round(s)")
    for r in range(rounds):
      t_round = time.perf_counter()
      for v in variants:
        samples[v.name].append(compile_once(v, abstract))
        if r == 0:
          log(f"    {v.name}: {sum(samples[v.name][0]):.1f} s")
      log(f"  round {r + 1}/{rounds}: {time.perf_counter() - t_round:.1f} s")
    out[tname] = {
        "tree": tname,
        "leaves": info["leaves"],
        "results": {
            name: {
                "lower_s": statistics.median(s[0] for s in ss),
                "compile_s": statistics.median(s[1] for s in ss),
                "total_s": statistics.median(s[0] + s[1] for s in ss),
                "samples": [list(s) for s in ss],
            }
            for name, ss in samples.items()
        },
    }
  return out


# ----------------------------------------------------------------------------
# Targets


def _ratio(a: float | None, b: float | None) -> float | None:
  if a is None or b is None or b <= 0:
    return None
  return a / b


def smoke_run(config: dict[str, Any]) -> dict[str, bool]:
  """Which sections of a run are too short to judge: ``{"time", "compile"}``.

  Timings are a smoke test with ``--scale`` below 1 (small leaves: per-call
  overheads dominate, and buffer sizes are not those of the real tree) or
  fewer than ``MIN_ROUNDS`` timed rounds; compile times with fewer than
  ``MIN_COMPILE_ROUNDS`` rounds.
  """
  return {
      "time": config.get("scale", 1.0) < 1.0 or config.get("rounds", MIN_ROUNDS) < MIN_ROUNDS,
      "compile": config.get("compile_rounds", MIN_COMPILE_ROUNDS) < MIN_COMPILE_ROUNDS,
  }


def add_compile_targets(comp: dict[str, Any], add: Callable[..., None]) -> None:
  """Each chain with a ``compile_ref``: its compile time on the largest compile
  tree against its reference's (at most ``COMPILE_VS_REF``), and its growth from
  the smallest tree to the largest against its reference's (``COMPILE_GROWTH``)."""
  trees = sorted(comp.values(), key=lambda c: c["leaves"])
  if not trees:
    return
  small, large = trees[0], trees[-1]

  def total(c, name):
    return c["results"].get(name, {}).get("total_s")

  for v in cs.step_variants():
    if not v.compile_ref or total(large, v.name) is None:
      continue
    add(f"compile {v.name} vs {v.compile_ref} ({large['leaves']} leaves)",
        _ratio(total(large, v.name), total(large, v.compile_ref)), COMPILE_VS_REF, "ratio",
        section="compile")
    if small is large:
      continue
    ours = _ratio(total(large, v.name), total(small, v.name))
    ref = _ratio(total(large, v.compile_ref), total(small, v.compile_ref))
    add(f"compile growth {v.name} vs {v.compile_ref} ({small['leaves']} -> "
        f"{large['leaves']} leaves)", _ratio(ours, ref), COMPILE_GROWTH, "ratio",
        section="compile")


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
  """The targets, each PASS / MISS (SKIP when not measured, NOISY in a smoke run).

  A smoke run (:func:`smoke_run`) still reports every measured value, but
  labels it NOISY instead of judging it.
  """
  step = results.get("step", {})
  alone = results.get("standalone", {})
  comp = results.get("compile", {})
  smoke = smoke_run(results.get("config", {}))

  def med(section, name):
    r = section.get(name)
    return r["median_s"] if r else None

  def overhead(name):
    return _ratio(med(step, name), med(step, "adam"))

  targets = []

  def add(name, value, limit, kind, note="", section="time"):
    if value is None:
      status = "SKIP"
    elif smoke[section]:
      status = "NOISY"
    else:
      status = "PASS" if value <= limit else "MISS"
    targets.append({"target": name, "value": value, "limit": limit, "kind": kind,
                    "status": status, "note": note})

  def add_overhead(variant, limit_pct):
    r = overhead(variant)
    add(f"{variant} + adam: overhead over adam", None if r is None else 100 * (r - 1),
        limit_pct, "pct")

  def add_base(variant, limit_pct):
    v = cs.variant(variant)
    r = _ratio(med(step, variant), med(step, v.base))
    add(f"{variant}: overhead over `{cs.variant(v.base).code}`",
        None if r is None else 100 * (r - 1), limit_pct, "pct")

  def add_fused(variant, limit_pct):
    add_base(variant, limit_pct)
    temp = step.get(variant, {}).get("temp_bytes")
    tree = results.get("config", {}).get("tree_bytes")
    add(f"{variant}: XLA temporaries / one copy of the updates",
        _ratio(temp, tree) if temp is not None else None, 0.01, "share")

  add_overhead("og.clip_by_global_norm", 20.0)
  for variant, limit in (("og.spam", 25.0), ("og.stable_adamw", 35.0), ("og.adagc", 20.0)):
    add_base(variant, limit)
  add("og.clip_by_global_norm + adam vs optax.clip_by_global_norm + adam",
      _ratio(med(step, "og.clip_by_global_norm"), med(step, "optax.clip_by_global_norm")),
      0.8, "ratio")
  add_overhead("og.skip_nonfinite", 25.0)
  for v in ("og.zclip", "og.autoclip", "og.skip_on_spike"):
    add_overhead(v, 25.0)
  many = results.get("config", {}).get("tree_leaves", 0) >= 1000
  add_fused("og.skip_nonfinite:fused", 25.0)
  add_fused("og.skip_on_spike:fused", 10.0 if many else 25.0)
  add("standalone global norm (og) vs in-place scale",
      _ratio(med(alone, "norm:og"), med(alone, "scale (bound)")), 1.0, "ratio")
  add("standalone clip (og) vs in-place scale",
      _ratio(med(alone, "clip:og"), med(alone, "scale (bound)")), 2.0, "ratio")
  for ours, theirs in (
      ("og.clip_by_global_norm", "optax.clip_by_global_norm"),
      ("og.clip_by_value", "optax.clip"),
      ("og.skip_nonfinite", "optax.apply_if_finite"),
  ):
    for c in comp.values():
      rs = c["results"]
      a = rs.get(ours, {}).get("total_s")
      b = rs.get(theirs, {}).get("total_s")
      add(f"compile {ours} vs {theirs} ({c['leaves']} leaves)", _ratio(a, b), 1.1, "ratio",
          section="compile")
  add_compile_targets(comp, add)
  # The goal: never slower than optax's equivalent (same semantics).
  for ours, theirs in (("og.clip_by_value", "optax.clip"),
                       ("og.skip_nonfinite", "optax.apply_if_finite")):
    same = step.get(ours, {}).get("same_program_as_equiv")
    add(f"{ours} + adam vs {theirs} + adam (goal: never slower)",
        _ratio(med(step, ours), med(step, theirs)), 1.0, "ratio",
        note="identical compiled program: the difference is noise" if same else "")
  return targets


# ----------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m benchmarks",
      description="Step time, standalone cost and compile time of optax_guard "
      "transforms against adam alone and optax's own clipping.",
  )
  p.add_argument("--tree", default="gpt2",
                 help="gpt2 (124M params, 148 leaves), many (2,000 leaves of 32 x 64), "
                 "uniform:N (N leaves of 32 x 64), wide (8 leaves of 8192x8192, 2 GiB in "
                 "float32; times the cases of WIDE_ONLY unless --only is given) or "
                 "wide:N (default gpt2)")
  p.add_argument("--leaves", type=int, default=None, metavar="N",
                 help="the number of leaves of a many, uniform or wide tree "
                 "(e.g. --tree many --leaves 500)")
  p.add_argument("--leaf-size", type=int, default=None, metavar="N",
                 help="make every leaf of a many, uniform or wide tree N x N "
                 "(e.g. --tree wide --leaf-size 64 for a quick run on a CPU)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--rounds", type=int, default=10,
                 help="timed rounds after warm-up (default 10; use >= 10 for reports)")
  p.add_argument("--warmup", type=int, default=2, help="discarded rounds (default 2)")
  p.add_argument("--steps", type=int, default=1,
                 help="timed calls per case per round, averaged (default 1)")
  p.add_argument("--scale", type=float, default=1.0,
                 help="shrink every leaf's element count by this factor (quick runs)")
  p.add_argument("--only", default=None,
                 help="comma-separated fnmatch patterns of case names, e.g. "
                 "'og.zclip,clip:*' (adam, optax's equivalents and the in-place scale "
                 "are added as references)")
  p.add_argument("--out", default=str(DEFAULT_OUT),
                 help="directory for the JSON and Markdown results")
  p.add_argument("--compile-only", action="store_true", help="only measure compile time")
  p.add_argument("--compile", action="store_true",
                 help="compile time only, of the chains of COMPILE_ONLY and their optax "
                 f"references on the trees {COMPILE_TREES} (2,048 floats a leaf) unless "
                 "--only / --compile-trees say otherwise")
  p.add_argument("--no-compile", action="store_true", help="skip the compile-time section")
  p.add_argument("--compile-trees", default=None,
                 help="trees for the compile-time section (default gpt2,many = "
                 f"148 and 2,000 leaves; with --compile {COMPILE_TREES})")
  p.add_argument("--compile-rounds", type=int, default=3,
                 help="fresh compiles per chain and tree, median (default 3)")
  p.add_argument("--memory", choices=("auto", "keep", "recreate"), default="auto",
                 help="keep every case's buffers alive, or recreate them per turn")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--hlo", default=None,
                 help="directory to write each step's optimized HLO text to")
  p.add_argument("--name", default=None, help="base name of the result files")
  p.add_argument("--quiet", action="store_true")
  args = p.parse_args(argv)
  if args.rounds < 1 or args.warmup < 0 or args.steps < 1 or args.compile_rounds < 1:
    p.error("--rounds, --steps and --compile-rounds must be >= 1, --warmup >= 0")
  if not 0 < args.scale <= 1:
    p.error(f"--scale must be in (0, 1], got {args.scale}")
  if args.compile:
    args.compile_only = True
    args.only = args.only or COMPILE_ONLY
  if args.compile_trees is None:
    args.compile_trees = COMPILE_TREES if args.compile else "gpt2,many"
  for tree, size, leaves in [(args.tree, args.leaf_size, args.leaves),
                             *((t, None, None) for t in args.compile_trees.split(","))]:
    try:
      tr.tree_shapes(tree, size, leaves)
    except ValueError as e:
      p.error(str(e))
  if args.only is None and is_wide(args.tree):
    args.only = WIDE_ONLY
  return args


def is_wide(tree: str) -> bool:
  return tree == "wide" or tree.startswith("wide:")


def _selected(names: list[str], patterns: list[str] | None) -> list[str]:
  if not patterns:
    return names
  return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _select(cases: list[Any], patterns: list[str] | None, always: str,
            refs: Callable[[Any], Iterable[str | None]],
            missing: Callable[[Any], list[str]]) -> tuple[list[Any], list[dict]]:
  """``(kept, skipped)`` of the cases whose names match ``patterns`` (all without).

  A selection also takes the case ``always`` and the cases ``refs(case)``
  names for each chosen case (its references); they keep the order of
  ``cases``. A case is skipped (with its reason) when ``missing(case)`` names
  optax_guard functions that are not exported.
  """
  by_name = {c.name: c for c in cases}
  chosen = set(_selected(list(by_name), patterns))
  if chosen:
    chosen.add(always)
    for n in list(chosen):
      chosen.update(x for x in refs(by_name[n]) if x)
  keep, skipped = [], []
  for c in cases:
    if c.name not in chosen:
      continue
    miss = missing(c)
    if miss:
      skipped.append({"name": c.name, "reason": "og." + ", og.".join(miss) + " not exported"})
    else:
      keep.append(c)
  return keep, skipped


def select_steps(patterns):
  return _select(cs.step_variants(), patterns, "adam",
                 lambda v: (v.equiv, v.base, v.compile_ref, *v.refs), cs.missing)


def select_standalone(patterns):
  return _select(cs.standalone_cases(), patterns, "scale (bound)", lambda s: (s.equiv,),
                 lambda s: [n for n in s.needs if not hasattr(og, n)])


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
  dev = jax.devices()[0]
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "optax_guard": og.__version__,
      "platform": platform.platform(),
      "processor": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "backend": jax.default_backend(),
      "device": getattr(dev, "device_kind", str(dev)),
      "loadavg_start": load,
      "og_exported": sorted(n for n in getattr(og, "__all__", ()) if n != "__version__"),
  }


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
  out = {}
  for name, ts in times.items():
    if not ts:
      continue
    q = np.percentile(ts, [25, 75]) if len(ts) > 1 else [ts[0], ts[0]]
    out[name] = {"median_s": statistics.median(ts), "min_s": min(ts),
                 "p25_s": float(q[0]), "p75_s": float(q[1]), "samples_s": ts}
  return out


def derive(results: dict[str, Any], tree_bytes: int) -> None:
  """Adds overhead %, ratio to optax's equivalent and to the bound, in place."""
  step = results.get("step", {})
  variants = {v.name: v for v in cs.step_variants()}
  adam = step.get("adam", {}).get("median_s")
  adam_bytes = step.get("adam", {}).get("bytes_accessed")
  for name, r in step.items():
    v = variants[name]
    m = r["median_s"]
    r["overhead_pct"] = None if adam is None else 100 * (m / adam - 1)
    base = step.get(v.base, {}).get("median_s") if v.base else None
    r["base"] = v.base
    r["overhead_base_pct"] = None if base is None else 100 * (m / base - 1)
    r["fused"] = v.fused
    r["equiv"] = v.equiv
    r["equiv_exact"] = v.equiv_exact
    r["ratio_equiv"] = _ratio(m, step.get(v.equiv, {}).get("median_s")) if v.equiv else None
    fp = r.get("hlo_fingerprint")
    r["same_program_as_equiv"] = bool(
        v.equiv and fp and fp == step.get(v.equiv, {}).get("hlo_fingerprint"))
    r["extra_passes"] = v.extra_passes
    bound = None if adam is None else adam * (1 + v.extra_passes / cs.ADAM_TRANSFERS)
    r["bound_s"] = bound
    r["ratio_bound"] = _ratio(m, bound)
    r["code"] = v.code
    r["group"] = v.group
    r["traffic_vs_adam"] = _ratio(r.get("bytes_accessed"), adam_bytes)
    # Adam's 7 tree-sized transfers in this time (adam's row: its bandwidth)
    r["gb_per_s"] = cs.ADAM_TRANSFERS * tree_bytes / m / 1e9 if m > 0 else None
  alone = results.get("standalone", {})
  specs = {s.name: s for s in cs.standalone_cases()}
  bound = alone.get("scale (bound)", {}).get("median_s")
  for name, r in alone.items():
    s = specs[name]
    m = r["median_s"]
    traffic = tree_bytes * (1 if s.kind == "norm" else 2)
    r["code"] = s.code
    r["gb_per_s"] = traffic / m / 1e9 if m > 0 else None
    r["equiv"] = s.equiv
    r["ratio_equiv"] = _ratio(m, alone.get(s.equiv, {}).get("median_s")) if s.equiv else None
    r["ratio_bound"] = _ratio(m, bound)


def run(args: argparse.Namespace) -> dict[str, Any]:
  log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
  patterns = [p.strip() for p in args.only.split(",")] if args.only else None
  variants, skipped = select_steps(patterns)
  specs, skipped_alone = select_standalone(patterns)
  skipped += skipped_alone
  for s in skipped:
    log(f"note: skipping {s['name']}: {s['reason']}")

  abstract = tr.abstract_tree(args.tree, args.dtype, args.scale, args.leaf_size, args.leaves)
  info = tr.describe(abstract)
  results: dict[str, Any] = {
      "config": {
          "tree": args.tree, "dtype": args.dtype, "scale": args.scale,
          "leaf_size": args.leaf_size, "leaves": args.leaves,
          "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps,
          "compile_trees": args.compile_trees.split(","),
          "compile_rounds": args.compile_rounds, "compile_only": args.compile_only,
          "only": args.only, "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
          **{f"tree_{k}": v for k, v in info.items()},
      },
      "environment": environment(),
      "skipped": skipped,
  }
  log(f"tree {args.tree} ({info['leaves']} leaves, {info['params']:,} params, "
      f"{info['bytes'] / 2**20:.1f} MiB, {args.dtype}); jax {jax.__version__} on "
      f"{results['environment']['device']}")

  if not args.compile_only:
    log("creating gradients and compiling ...")
    grads = tr.make_gradients(abstract, args.seed)
    jax.block_until_ready(grads)
    all_cases: list[Case] = []
    for v in variants:
      all_cases.append(StepCase(v, abstract, grads, args.steps))
      log(f"  compiled {v.name} ({all_cases[-1].compile_s:.1f} s)")
    for s in specs:
      all_cases.append(StandaloneCase(s, abstract, grads, args.steps))
    need = (sum(c.bytes for c in all_cases) + info["bytes"]
            + max((c.temp_bytes for c in all_cases), default=0))
    avail = available_memory()
    keep = args.memory == "keep" or (
        args.memory == "auto" and avail is not None and need < KEEP_FRACTION * avail)
    results["config"]["memory"] = {
        "mode": "keep" if keep else "recreate", "all_cases_bytes": need,
        "available_bytes": avail,
        "per_case_max_bytes": max((c.bytes + c.temp_bytes for c in all_cases), default=0),
    }
    log(f"memory: all cases need {need / 2**30:.2f} GiB, available "
        f"{'?' if avail is None else f'{avail / 2**30:.1f}'} GiB -> "
        f"{'keep all alive' if keep else 'recreate per turn'}")
    if args.hlo:
      hdir = Path(args.hlo)
      hdir.mkdir(parents=True, exist_ok=True)
      for c in all_cases:
        fname = re.sub(r"[^A-Za-z0-9_.-]+", "_", c.name) + ".hlo.txt"
        (hdir / fname).write_text(c.compiled.as_text())
      log(f"wrote optimized HLO to {hdir}")
    log(f"timing {len(all_cases)} cases: {args.warmup} warm-up + {args.rounds} rounds")
    times, checks = time_cases(all_cases, args.rounds, args.warmup, keep, log, args.seed)
    results["step"] = summarise({c.name: times[c.name] for c in all_cases
                                 if c.section == "step"})
    results["standalone"] = summarise({c.name: times[c.name] for c in all_cases
                                       if c.section == "standalone"})
    for c in all_cases:
      section = results[c.section]
      section[c.name].update(c.stats())
      section[c.name].update(checks[c.name])
      section[c.name]["setup_compile_s"] = c.compile_s
      if not checks[c.name]["finite"]:
        log(f"warning: {c.name} produced non-finite values")
      if c.section == "step" and checks[c.name].get("skipped_steps"):
        log(f"warning: {c.name} skipped {checks[c.name]['skipped_steps']} step(s); "
            "its time is not that of a real step")
    del all_cases, grads
    derive(results, info["bytes"])

  if not args.no_compile:
    results["compile"] = time_compiles(
        variants, results["config"]["compile_trees"], args.dtype, args.compile_rounds, log)

  try:
    results["environment"]["loadavg_end"] = os.getloadavg()
  except OSError:
    pass
  results["smoke"] = smoke_run(results["config"])
  results["targets"] = evaluate_targets(results)
  return results


def base_name(args: argparse.Namespace) -> str:
  if args.name:
    return args.name
  name = f"{args.tree.replace(':', '')}-{args.dtype}"
  if args.leaves is not None:
    name += f"-{args.leaves}leaves"
  if args.leaf_size is not None:
    name += f"-leaf{args.leaf_size}"
  if args.scale != 1:
    name += f"-scale{args.scale:g}"
  if args.compile_only:
    name = f"compile-{args.dtype}"
  return name


def main(argv=None) -> int:
  args = parse_args(argv)
  results = run(args)
  text = report.markdown(results)
  print()
  print(report.console(results))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  name = base_name(args)
  (out / f"{name}.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
  (out / f"{name}.md").write_text(text)
  print(f"\nwrote {out / (name + '.json')} and {out / (name + '.md')}")
  return 0
