"""Shared machinery: training loops, results, files, plots and the summary table.

Every experiment returns an :class:`ExperimentResult` holding one :class:`Run`
per (setting, defence) pair. A run stacks the per-step curves of all its seeds
(arrays shaped ``[seeds, steps]``), the number of skipped steps, optional
per-seed metrics (test error, accuracy, ...) and its wall time (compilation
included). :func:`save` writes ``<name>.json``, ``<name>.csv`` and
``<name>.png`` for it; :func:`summary_table` turns any number of results into
the table the suite prints and writes as Markdown.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optax_guard as og

# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------

DIVERGENCE_FACTOR = 10.0


@dataclasses.dataclass
class Run:
  """One defence in one setting, all seeds.

  Attributes:
    setting: what was held fixed, e.g. ``"T=50 lr=0.1"``.
    defence: the defence's name (``"none"`` for the unprotected baseline).
    loss: training loss per step, ``[seeds, steps]`` (NaN once it diverged).
    grad_norm: global norm of the *raw* gradient per step, ``[seeds, steps]``.
    skipped: steps skipped by a guard, per seed.
    metrics: extra per-seed numbers, e.g. ``{"test_error": [0.36, 0.35]}``.
    wall_s: wall time of the run, compilation included.
    extra: extra per-step curves ``[seeds, steps]`` (guard statistics, lr, ...).
    note: free text shown in the table's last column.
  """

  setting: str
  defence: str
  loss: np.ndarray
  grad_norm: np.ndarray
  skipped: np.ndarray
  metrics: dict[str, list[float]] = dataclasses.field(default_factory=dict)
  wall_s: float = 0.0
  extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  note: str = ""

  def __post_init__(self):
    self.loss = np.asarray(self.loss, np.float64).reshape(-1, np.shape(self.loss)[-1])
    self.grad_norm = np.asarray(self.grad_norm, np.float64).reshape(self.loss.shape)
    self.skipped = np.asarray(self.skipped, np.int64).reshape(-1)

  @property
  def seeds(self) -> int:
    return self.loss.shape[0]

  @property
  def steps(self) -> int:
    return self.loss.shape[1]

  def final_losses(self) -> np.ndarray:
    """Mean training loss over the last 5% of steps (at least 1), per seed."""
    k = max(1, self.steps // 20)
    tail = self.loss[:, -k:]
    with np.errstate(invalid="ignore", over="ignore"):
      return np.where(np.isfinite(tail).all(axis=1), tail.mean(axis=1), np.nan)

  def diverged(self) -> np.ndarray:
    """Per seed: a non-finite loss at any step, or a final loss 10x the first one.

    The first loss is the mean of the first 1% of steps (at least 1).
    """
    k = max(1, self.steps // 100)
    first = np.mean(self.loss[:, :k], axis=1)
    nonfinite = ~np.isfinite(self.loss).all(axis=1)
    with np.errstate(invalid="ignore"):
      grown = self.final_losses() > DIVERGENCE_FACTOR * np.abs(first)
    return nonfinite | grown

  def first_nonfinite_step(self) -> list[int | None]:
    out = []
    for row in self.loss:
      bad = np.flatnonzero(~np.isfinite(row))
      out.append(int(bad[0]) if bad.size else None)
    return out

  def summary(self) -> dict[str, Any]:
    final = self.final_losses()
    return {
        "setting": self.setting,
        "defence": self.defence,
        "seeds": self.seeds,
        "steps": self.steps,
        "final_loss": _json_float(np.mean(final)),
        "final_loss_per_seed": [_json_float(x) for x in final],
        "diverged": int(self.diverged().sum()),
        "first_nonfinite_step": self.first_nonfinite_step(),
        "max_grad_norm": _json_float(_nanmax(self.grad_norm)),
        "skipped": [int(s) for s in self.skipped],
        "metrics": {k: [_json_float(x) for x in v] for k, v in self.metrics.items()},
        "wall_s": round(float(self.wall_s), 3),
        "note": self.note,
    }


@dataclasses.dataclass
class ExperimentResult:
  """All runs of one experiment plus its configuration and observations."""

  name: str
  title: str
  config: dict[str, Any]
  runs: list[Run]
  metric: str | None = None  # the per-seed metric shown in the summary table
  metric_label: str | None = None
  notes: list[str] = dataclasses.field(default_factory=list)
  checks: dict[str, Any] = dataclasses.field(default_factory=dict)
  wall_s: float = 0.0
  files: list[str] = dataclasses.field(default_factory=list)


def _json_float(x: Any) -> float | str | None:
  x = float(x)
  if math.isnan(x):
    return None
  if math.isinf(x):
    return "inf" if x > 0 else "-inf"
  return x


def _nanmax(x: np.ndarray) -> float:
  finite = x[np.isfinite(x)]
  if finite.size < x.size and np.isinf(x).any():
    return math.inf
  return float(finite.max()) if finite.size else math.nan


# ---------------------------------------------------------------------------
# Progress bars and training loops
# ---------------------------------------------------------------------------


class _NullBar:
  """Stand-in when tqdm is missing or the output is not a terminal."""

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix_str(self, s: str) -> None:
    del s

  def close(self) -> None:
    pass


def progress(total: int, desc: str, enabled: bool | None = None):
  """A tqdm bar over ``total`` units, silent when stderr is not a terminal."""
  if enabled is None:
    enabled = sys.stderr.isatty()
  if not enabled:
    return _NullBar()
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover - tqdm is in the experiments extra
    return _NullBar()
  return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def num_chunks(steps: int, target: int = 10) -> int:
  """The largest divisor of ``steps`` that is at most ``target`` (one compile)."""
  for n in range(min(target, steps), 0, -1):
    if steps % n == 0:
      return n
  return 1


def scan_loop(
    step_fn: Callable[[Any, jax.Array], tuple[Any, Any]],
    carry: Any,
    steps: int,
    *,
    xs: Any = None,
    bar: Any = None,
    chunks: int = 10,
) -> tuple[Any, Any]:
  """Runs ``steps`` steps of ``step_fn(carry, (t, x_t)) -> (carry, out)`` with ``lax.scan``.

  ``xs`` (optional) is a tree whose leaves have a leading axis of ``steps``
  (e.g. pre-generated batches); ``x_t`` is its slice for step ``t`` (None
  without ``xs``). The steps run in ``num_chunks(steps, chunks)`` jitted chunks
  of equal length (compiled once), so a progress bar can advance between
  them. ``out`` leaves come back as NumPy arrays with the step axis first.
  """
  n = num_chunks(steps, chunks)
  size = steps // n
  run = jax.jit(lambda c, ts, x: jax.lax.scan(step_fn, c, (ts, x)))
  outs = []
  for i in range(n):
    x = None if xs is None else jax.tree_util.tree_map(
        lambda a, i=i: a[i * size:(i + 1) * size], xs)
    carry, out = run(carry, jnp.arange(i * size, (i + 1) * size, dtype=jnp.int32), x)
    jax.block_until_ready(carry)
    outs.append(out)
    if bar is not None:
      bar.update(1)
  outs = jax.device_get(outs)
  out = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs, axis=0), *outs)
  return carry, out


class Timer:
  """``with Timer() as t: ...; t.s`` is the elapsed wall time in seconds."""

  def __enter__(self):
    self.t0 = time.perf_counter()
    self.s = 0.0
    return self

  def __exit__(self, *exc):
    self.s = time.perf_counter() - self.t0


def path_name(path: Sequence[Any]) -> str:
  """``"params/Dense_0/kernel"`` for a ``tree_map_with_path`` key path."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def numpy_init(abstract: Any, seed: int,
               kernel_std: Callable[[str, tuple[int, ...]], float]) -> Any:
  """Fills a tree of ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape(model.init, ...)``).

  Leaves named ``kernel`` or ``embedding`` get ``N(0, kernel_std(name, shape)**2)``
  draws; ``bias`` and ``mean`` zeros; ``scale`` and ``var`` ones. The draws come
  from NumPy's PCG64 seeded with ``seed``: the same values as a Flax
  ``variance_scaling(..., "normal")`` initialiser in distribution, without
  compiling JAX's PRNG for every shape (seconds each on a small CPU).
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path_name(path)
    if name.endswith("/value"):  # nnx.Variable
      name = name[: -len("/value")]
    last = name.rsplit("/", 1)[-1]
    if last in ("kernel", "embedding"):
      value = rng.standard_normal(leaf.shape) * kernel_std(name, tuple(leaf.shape))
    elif last in ("bias", "mean"):
      value = np.zeros(leaf.shape)
    elif last in ("scale", "var"):
      value = np.ones(leaf.shape)
    else:
      raise ValueError(f"numpy_init: no rule for {name}")
    return np.asarray(value, dtype=leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def stack(trees: Sequence[Any]) -> Any:
  """Stacks equal-structure trees along a new leading (seed) axis."""
  return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *trees)


def missing(*names: str) -> list[str]:
  """The names among ``names`` that ``optax_guard`` does not export."""
  return [n for n in names if not hasattr(og, n)]


def stat(stats: dict[str, jax.Array], suffix: str, default: float = 0.0) -> jax.Array:
  """The first ``guard_stats`` entry whose key ends with ``suffix`` (else ``default``)."""
  for k, v in stats.items():
    if k.endswith(suffix):
      return jnp.asarray(v)
  return jnp.asarray(default)


def first(curves: dict[str, Any], suffix: str) -> Any:
  """The first entry of ``curves`` whose key ends with ``suffix``."""
  for k, v in curves.items():
    if k.endswith(suffix):
      return v
  raise KeyError(f"no key ending with {suffix!r} in {sorted(curves)}")


def skipped_count(opt_state: Any) -> jax.Array:
  """Total steps skipped by every guard in ``opt_state`` (0 without guards)."""
  if not hasattr(og, "guard_stats"):
    return jnp.zeros((), jnp.int32)
  total = jnp.zeros((), jnp.int32)
  for k, v in og.guard_stats(opt_state).items():
    if k.split("/")[-1] == "num_skipped":
      total = total + jnp.asarray(v, jnp.int32)
  return total


def select(names: Sequence[str], wanted: Iterable[str] | None) -> list[str]:
  """``names`` filtered by the CLI's ``--guards`` (``none`` always kept).

  Experiments pass their default defences when ``wanted`` is empty and every
  defence they know otherwise, so ``--guards`` can also pick extra ones.
  """
  if not wanted:
    return list(names)
  wanted = set(wanted) | {"none"}
  return [n for n in names if n in wanted]


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _downsample(x: np.ndarray, points: int = 400) -> tuple[np.ndarray, np.ndarray]:
  steps = x.shape[-1]
  idx = np.unique(np.linspace(0, steps - 1, min(points, steps)).astype(int))
  return idx, x[..., idx]


def save(result: ExperimentResult, out_dir: str, *, plot: bool = True) -> list[str]:
  """Writes ``<name>.json``, ``<name>.csv`` and (if matplotlib) ``<name>.png``."""
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, result.name)
  files = []

  doc = {
      "experiment": result.name,
      "title": result.title,
      "config": result.config,
      "wall_s": round(result.wall_s, 3),
      "metric": result.metric,
      "notes": result.notes,
      "checks": result.checks,
      "runs": [],
  }
  for run in result.runs:
    entry = run.summary()
    idx, loss = _downsample(run.loss)
    _, gn = _downsample(run.grad_norm)
    entry["curves"] = {
        "step": idx.tolist(),
        "loss_median": [_json_float(x) for x in _nanmedian(loss)],
        "grad_norm_median": [_json_float(x) for x in _nanmedian(gn)],
    }
    doc["runs"].append(entry)
  with open(base + ".json", "w") as f:
    json.dump(doc, f, indent=1)
  files.append(base + ".json")

  extra_keys = sorted({k for run in result.runs for k in run.extra})
  with open(base + ".csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["experiment", "setting", "defence", "seed", "step", "loss", "grad_norm",
                *extra_keys])
    for run in result.runs:
      for s in range(run.seeds):
        cols = [run.extra[k][s] if k in run.extra else None for k in extra_keys]
        for t in range(run.steps):
          w.writerow([result.name, run.setting, run.defence, s, t,
                      f"{run.loss[s, t]:.6g}", f"{run.grad_norm[s, t]:.6g}",
                      *("" if c is None else f"{c[t]:.6g}" for c in cols)])
  files.append(base + ".csv")

  if plot:
    png = plot_runs(result, base + ".png")
    if png:
      files.append(png)
  result.files = files
  return files


def _nanmedian(x: np.ndarray) -> np.ndarray:
  """Median over seeds; a step where any seed is non-finite gives NaN."""
  x = np.asarray(x, np.float64)
  bad = ~np.isfinite(x).all(axis=0)
  with np.errstate(invalid="ignore"):
    m = np.median(np.where(np.isfinite(x), x, 0.0), axis=0)
  return np.where(bad, np.nan, m)


def plot_runs(result: ExperimentResult, path: str, *, max_points: int = 500,
              clip_factor: float = 1e4) -> str | None:
  """Loss and raw gradient norm per step, one line per defence, log scale.

  One row of two panels per setting. Curves are the median over seeds; a run
  that became non-finite ends in an ``x`` at its last finite value. A panel's
  y axis stops at ``clip_factor`` times the median (over its curves) of each
  curve's median level, so one run going to 1e30 does not flatten the others:
  such a curve leaves through the top edge (the title then says "clipped").
  """
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:  # pragma: no cover - matplotlib is in the experiments extra
    return None

  runs = [r for r in result.runs if r.steps > 1]
  if not runs:
    return None
  settings = list(dict.fromkeys(r.setting for r in runs))
  defences = list(dict.fromkeys(r.defence for r in runs))
  cmap = plt.get_cmap("tab10" if len(defences) <= 10 else "tab20")
  colour = {d: cmap(i % cmap.N) for i, d in enumerate(defences)}
  height = max(4.0, 2.4 * len(settings) + 1.4)
  fig, axes = plt.subplots(len(settings), 2, figsize=(10, height), squeeze=False)
  handles = {}
  for row, setting in enumerate(settings):
    for col, label in enumerate(("training loss", "raw gradient norm")):
      ax = axes[row, col]
      curves = []
      for run in (r for r in runs if r.setting == setting):
        idx, y = _downsample(run.loss if col == 0 else run.grad_norm, max_points)
        y = _nanmedian(y)
        curves.append((run.defence, idx, np.where(y > 0, y, np.nan)))
      levels = [np.nanmedian(y) for _, _, y in curves if np.isfinite(y).any()]
      top = clip_factor * float(np.median(levels)) if levels else None
      lows = [np.nanmin(y) for _, _, y in curves if np.isfinite(y).any()]
      clipped = False
      for name, idx, y in curves:
        style = "--" if name == "none" else "-"
        (line,) = ax.plot(idx, y, style, color=colour[name], lw=0.9, label=name)
        handles.setdefault(name, line)
        finite = np.flatnonzero(np.isfinite(y))
        if top is not None and finite.size and np.nanmax(y) > top:
          clipped = True
        if np.isnan(y).any() and finite.size:
          last = y[finite[-1]] if top is None else min(y[finite[-1]], top)
          ax.plot(idx[finite[-1]], last, "x", color=colour[name], ms=8, mew=2, clip_on=False)
      ax.set_yscale("log")
      if clipped and lows:
        ax.set_ylim(min(lows) / 1.5, top)
      title = f"{setting}: {label}" if setting else label
      ax.set_title(title + (" (clipped)" if clipped else ""), fontsize=9)
      ax.grid(True, which="major", alpha=0.3)
      ax.tick_params(labelsize=8)
      if row == len(settings) - 1:
        ax.set_xlabel("step", fontsize=8)
  fig.suptitle(result.title, fontsize=10, y=1 - 0.08 / height, va="top")
  ncol = min(len(handles), 7)
  nrows = math.ceil(len(handles) / ncol)
  fig.legend(handles.values(), handles.keys(), loc="upper center",
             bbox_to_anchor=(0.5, 1 - 0.32 / height), ncol=ncol, fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0, 1, 1 - (0.45 + 0.2 * nrows) / height))
  fig.savefig(path, dpi=64)
  plt.close(fig)
  try:  # a 128-colour palette PNG is ~3x smaller than matplotlib's RGBA one
    from PIL import Image

    with Image.open(path) as im:
      small = im.convert("RGB").quantize(colors=128)
    small.save(path, optimize=True)
  except Exception:  # pragma: no cover - Pillow comes with matplotlib; keep the RGBA file
    pass
  return path


# ---------------------------------------------------------------------------
# Summary table
# ---------------------------------------------------------------------------

COLUMNS = ("experiment", "setting", "defence", "final loss", "diverged", "skipped", "metric",
           "wall s")


def _fmt(x: float) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "nan"
  if math.isinf(x):
    return "inf"
  if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
    return f"{x:.2e}"
  return f"{x:.4f}" if abs(x) < 10 else f"{x:.1f}"


def summary_rows(results: Sequence[ExperimentResult]) -> list[list[str]]:
  rows = []
  for res in results:
    for run in res.runs:
      final = float(np.mean(run.final_losses()))
      metric = ""
      if res.metric and res.metric in run.metrics:
        vals = np.asarray(run.metrics[res.metric], np.float64)
        metric = f"{res.metric_label or res.metric} {_fmt(float(np.mean(vals)))}"
      skipped = float(np.mean(run.skipped)) if run.skipped.size else 0.0
      untrained = run.steps <= 1 and not np.isfinite(run.loss).any()  # a reference row
      rows.append([
          res.name,
          run.setting,
          run.defence,
          "-" if untrained else _fmt(final),
          "-" if untrained else
          f"{'yes' if run.diverged().any() else 'no'} ({int(run.diverged().sum())}/{run.seeds})",
          f"{skipped:.0f}" if skipped == int(skipped) else f"{skipped:.1f}",
          (metric + (f"; {run.note}" if run.note and metric else run.note)).strip(),
          f"{run.wall_s:.1f}",
      ])
  return rows


def summary_table(results: Sequence[ExperimentResult], markdown: bool = False) -> str:
  rows = summary_rows(results)
  if markdown:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)
  widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
            for i, c in enumerate(COLUMNS)]
  fmt = "  ".join(f"{{:{'<' if i < 3 or i == 6 else '>'}{w}}}" for i, w in enumerate(widths))
  lines = [fmt.format(*COLUMNS), "  ".join("-" * w for w in widths)]
  lines += [fmt.format(*r) for r in rows]
  return "\n".join(lines)
