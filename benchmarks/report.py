"""Markdown and console rendering of a benchmark result dict."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def _ms(s: float | None) -> str:
  if s is None:
    return "-"
  ms = 1e3 * s
  return f"{ms:.1f}" if ms >= 10 else f"{ms:.3f}"


def _x(r: float | None) -> str:
  return "-" if r is None else f"{r:.2f}x"


def _pct(p: float | None) -> str:
  return "-" if p is None else f"{p:+.1f}%"


def _mib(b: float | None) -> str:
  return "-" if b is None else f"{b / 2**20:.1f}"


def _gbs(r: float | None) -> str:
  return "-" if r is None else f"{r:,.1f}" if r < 100 else f"{r:,.0f}"


def _value(t: dict[str, Any]) -> str:
  if t["value"] is None:
    return "-"
  if t["kind"] == "share":
    return f"{100 * t['value']:.2f}%"
  return _pct(t["value"]) if t["kind"] == "pct" else _x(t["value"])


def _limit(t: dict[str, Any]) -> str:
  if t["kind"] == "share":
    return f"<= {100 * t['limit']:.0f}%"
  return f"<= {t['limit']:+.0f}%" if t["kind"] == "pct" else f"<= {t['limit']:.1f}x"


def _vs_equiv(r: dict[str, Any]) -> str:
  """Time relative to the case's optax equivalent, which it names (``-`` without one)."""
  return "-" if r.get("ratio_equiv") is None else f"{_x(r['ratio_equiv'])} `{r['equiv']}`"


def smoke_note(results: dict[str, Any]) -> str:
  """One sentence when the run is too short to judge its targets, else ''."""
  smoke = results.get("smoke") or {}
  parts = []
  if smoke.get("time"):
    parts.append("timings (`--scale` < 1 or fewer than 5 rounds)")
  if smoke.get("compile") and results.get("compile"):
    parts.append("compile times (fewer than 3 compile rounds)")
  if not parts:
    return ""
  return ("Smoke run: " + " and ".join(parts) + " are noisy; their targets are labelled "
          "NOISY, not judged.")


def _table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
  out = ["| " + " | ".join(header) + " |",
         "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return out


def _section(key: str) -> Callable[[Callable[..., list[str]]], Callable[..., list[str]]]:
  """Decorates ``render(results, section)``, the lines of ``results[key]``, into
  ``render(results)``: no lines when the results have no (or an empty) ``key``."""

  def wrap(render: Callable[..., list[str]]) -> Callable[..., list[str]]:
    @functools.wraps(render)
    def lines(results: dict[str, Any]) -> list[str]:
      section = results.get(key)
      return render(results, section) if section else []

    return lines

  return wrap


def header(results: dict[str, Any]) -> list[str]:
  cfg, env = results["config"], results["environment"]
  lines = [f"# optax_guard benchmarks: `{cfg['tree']}` tree, {cfg['dtype']}", ""]
  load = env.get("loadavg_start")
  load_end = env.get("loadavg_end")
  load_txt = ""
  if load:
    load_txt = f", load average {load[0]:.1f}"
    if load_end:
      load_txt += f" -> {load_end[0]:.1f}"
  lines.append(f"Command: `{cfg['command'].strip()}`  ")
  lines.append(
      f"{env['date']}; jax {env['jax']}, optax {env['optax']}, optax_guard "
      f"{env['optax_guard']}; {env['backend']} {env['device']} ({env['processor']}, "
      f"{env['cpu_count']} cores{load_txt}).  "
  )
  lines.append(
      f"Tree: {cfg['tree_leaves']} leaves, {cfg['tree_params']:,} parameters "
      f"({cfg['tree_bytes'] / 2**20:.1f} MiB per copy)"
      + (f", every leaf scaled by {cfg['scale']:g}" if cfg["scale"] != 1 else "") + "."
  )
  if not cfg.get("compile_only"):
    mem = cfg.get("memory", {})
    lines.append(
        f"Medians of {cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up "
        f"round(s), {cfg['steps']} step(s) per case per round; parameters and optimizer "
        f"state donated; buffers "
        + ("kept alive." if mem.get("mode") == "keep" else "recreated per turn.")
    )
  note = smoke_note(results)
  if note:
    lines += ["", f"**{note}**"]
  return lines


@_section("step")
def step_table(results: dict[str, Any], step: dict[str, Any]) -> list[str]:
  rows = []
  for name, r in step.items():
    eq = _vs_equiv(r)
    if r.get("ratio_equiv") is not None:
      eq += "" if r["equiv_exact"] else " (closest)"
      if r.get("same_program_as_equiv"):
        eq += " (same HLO)"
    rows.append([
        f"`{r['code']}`", _ms(r["median_s"]), _gbs(r.get("gb_per_s")),
        "-" if name == "adam" else _pct(r.get("overhead_pct")),
        _pct(r.get("overhead_base_pct")),
        eq, _x(r.get("ratio_bound")), _x(r.get("traffic_vs_adam")),
        _mib(r.get("temp_bytes")),
    ])
  return [
      "## Optimizer step (`tx.update` + `optax.apply_updates`, jitted, donated)", "",
      *_table(["step", "median ms", "GB/s at adam's 7 passes", "over adam",
               "over the unguarded chain", "vs optax's equivalent", "vs traffic bound",
               "XLA bytes vs adam", "XLA temp MiB"], "lrrrrrrrr", rows),
      "",
      "`og.update_and_apply(tx)` rows time `og.update_and_apply(tx, grads, state, params)` "
      "(the parameter update inside the guard's `lax.cond`); the others `tx.update` "
      "followed by `optax.apply_updates`. Over the unguarded chain: the guarded step "
      "relative to `chain(og.clip_by_global_norm(1), adam)` alone, the guard's own cost.",
      "",
      "Traffic bound: `adam * (1 + k/7)` with `k` the extra full reads of the gradients "
      "the variant needs (1 for a norm, 0 for an elementwise clip, 2 for a guard around a "
      "clip); Adam moves 7 tree-sized "
      "buffers (reads g, p, mu, nu; writes p, mu, nu); GB/s at adam's 7 passes is that "
      "traffic over the step's time (adam's own bandwidth on its row; compare it with the "
      "in-place scale's GB/s below). XLA bytes: bytes accessed by the "
      "compiled step according to XLA's cost model, relative to adam's (deterministic, "
      "unlike the timings). XLA temp: temporary buffers of the compiled step, allocated "
      "(and, on CPU, page-faulted) at every call; a full copy of the gradients shows up "
      "here.",
  ]


@_section("standalone")
def standalone_table(results: dict[str, Any], alone: dict[str, Any]) -> list[str]:
  rows = [[f"`{r['code']}`", _ms(r["median_s"]), _gbs(r.get("gb_per_s")), _vs_equiv(r),
           _x(r.get("ratio_bound")), _mib(r.get("temp_bytes"))] for r in alone.values()]
  return [
      "## Standalone, on the gradient tree alone", "",
      *_table(["operation", "median ms", "GB/s", "vs optax", "vs in-place scale",
               "XLA temp MiB"], "lrrrrr", rows),
      "",
      "GB/s counts one read for a norm, one read and one write for a map; maps are "
      "donated (in place). The in-place scale `x * c` is the practical bandwidth bound.",
  ]


@_section("compile")
def compile_table(results: dict[str, Any], comp: dict[str, Any]) -> list[str]:
  trees = list(comp.values())
  names = list(trees[0]["results"])
  from benchmarks.cases import step_variants

  equiv = {v.name: (v.equiv, v.code) for v in step_variants()}
  head = ["chain"]
  for t in trees:
    head += [f"{t['leaves']} leaves, s", "vs optax"]
  rows = []
  for n in names:
    row = [f"`{equiv.get(n, (None, n))[1]}`"]
    for t in trees:
      rs = t["results"]
      a = rs[n]["total_s"]
      e = equiv.get(n, (None,))[0]
      b = rs.get(e, {}).get("total_s") if e else None
      row += [f"{a:.2f}", "-" if b is None else _x(a / b)]
    rows.append(row)
  rounds = results["config"]["compile_rounds"]
  return [
      f"## Compile time (trace + lower + compile of a fresh step, median of {rounds})", "",
      *_table(head, "l" + "rr" * len(trees), rows),
  ]


@_section("targets")
def targets_table(results: dict[str, Any], ts: list[dict[str, Any]]) -> list[str]:
  rows = [[t["target"] + (f" ({t['note']})" if t.get("note") else ""), _value(t),
           _limit(t), f"**{t['status']}**" if t["status"] == "MISS" else t["status"]]
          for t in ts]
  note = smoke_note(results)
  return ["## Targets", "", *_table(["target", "measured", "limit", "result"],
                                    "lrrl", rows), *(["", note] if note else [])]


@_section("skipped")
def skipped_lines(results: dict[str, Any], sk: list[dict[str, Any]]) -> list[str]:
  return ["## Skipped", ""] + [f"- `{s['name']}`: {s['reason']}" for s in sk]


def markdown(results: dict[str, Any]) -> str:
  parts = [header(results)]
  for fn in (step_table, standalone_table, compile_table, targets_table, skipped_lines):
    lines = fn(results)
    if lines:
      parts.append(lines)
  return "\n\n".join("\n".join(p) for p in parts) + "\n"


def console(results: dict[str, Any]) -> str:
  """The tables, then one PASS/MISS/SKIP line per target."""
  parts = []
  for fn in (step_table, standalone_table, compile_table, skipped_lines):
    lines = fn(results)
    if lines:
      parts.append("\n".join(lines))
  ts = results.get("targets", [])
  note = smoke_note(results)
  if note:
    parts.append(note)
  if ts:
    parts.append("\n".join(
        f"{t['status']:4s}  {t['target']}: {_value(t)} (limit {_limit(t)[3:]})"
        + (f" [{t['note']}]" if t.get("note") else "")
        for t in ts
    ))
  return "\n\n".join(parts)
