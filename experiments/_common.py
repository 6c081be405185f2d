"""Shared machinery: training loops, progress, results, files, plots and the summary.

Every experiment returns an :class:`ExperimentResult` holding one :class:`Run`
per (setting, defence) pair. A run stacks the per-step curves of all its seeds
(arrays shaped ``[seeds, steps]``), the number of skipped steps, per-seed
metrics (test error, accuracy, ...), every ``og.guard_stats`` entry as a
per-step curve, and its wall time (compilation included). :func:`save` writes
``<name>.json``, ``<name>.csv`` and ``<name>.png``; :func:`summary_table` and
:func:`summary_records` turn any number of results into the printed /
Markdown table and the rows of ``summary.json``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import threading
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
    setting: what was held fixed, e.g. ``"T=30 lr=0.1"``; the same string for
      every defence compared in one group.
    defence: the defence's name (``"none"`` for the unprotected baseline).
    loss: training loss per step, ``[seeds, steps]`` (NaN once it diverged).
    grad_norm: global norm of the *raw* gradient per step, ``[seeds, steps]``.
    skipped: steps skipped by a guard, per seed.
    metrics: per-seed numbers, e.g. ``{"test_error": [0.01, 0.02]}``.
    wall_s: wall time of the run, compilation included.
    extra: extra per-step curves ``[seeds, steps]``: every ``og.guard_stats``
      entry (``"kind/field"``) and experiment-specific ones (``lr``, ...).
    note: free text shown in the table's last column.
    injected_faults: number of steps whose data was corrupted on purpose.
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
  injected_faults: int = 0

  def __post_init__(self):
    self.loss = np.asarray(self.loss, np.float64).reshape(-1, np.shape(self.loss)[-1])
    self.grad_norm = np.asarray(self.grad_norm, np.float64).reshape(self.loss.shape)
    self.skipped = np.asarray(self.skipped, np.int64).reshape(-1)
    self.extra = {k: np.asarray(v, np.float64).reshape(self.loss.shape)
                  for k, v in self.extra.items()}

  @property
  def seeds(self) -> int:
    return self.loss.shape[0]

  @property
  def steps(self) -> int:
    return self.loss.shape[1]

  @property
  def trained(self) -> bool:
    """False for a reference row (e.g. "predict the mean") that has no curve."""
    return self.steps > 1 or bool(np.isfinite(self.loss).any())

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
    if not self.trained:
      return np.zeros(self.seeds, bool)
    k = max(1, self.steps // 100)
    first = np.mean(self.loss[:, :k], axis=1)
    nonfinite = ~np.isfinite(self.loss).all(axis=1)
    with np.errstate(invalid="ignore"):
      grown = self.final_losses() > DIVERGENCE_FACTOR * np.abs(first)
    return nonfinite | grown

  def first_nonfinite_step(self) -> list[int | None]:
    """Per seed, the first step whose loss is non-finite (None: none, or a reference row)."""
    if not self.trained:
      return [None] * self.seeds
    out = []
    for row in self.loss:
      bad = np.flatnonzero(~np.isfinite(row))
      out.append(int(bad[0]) if bad.size else None)
    return out

  def nan_note(self) -> str:
    """``"NaN at step 12,-"`` when some seed became non-finite, else ``""``."""
    bad = self.first_nonfinite_step()
    if all(b is None for b in bad):
      return ""
    return "NaN at step " + ",".join("-" if b is None else str(b) for b in bad)

  def summary(self) -> dict[str, Any]:
    final = self.final_losses()
    return {
        "setting": self.setting,
        "defence": self.defence,
        "seeds": self.seeds,
        "steps": self.steps if self.trained else 0,
        "final_loss": _json_float(np.mean(final)),
        "final_loss_per_seed": [_json_float(x) for x in final],
        "diverged": int(self.diverged().sum()),
        "first_nonfinite_step": self.first_nonfinite_step(),
        "max_grad_norm": _json_float(_nanmax(self.grad_norm)),
        "skipped": [int(s) for s in self.skipped],
        "metrics": {k: [_json_float(x) for x in v] for k, v in self.metrics.items()},
        "injected_faults": self.injected_faults,
        "wall_s": round(float(self.wall_s), 3),
        "note": self.note,
    }


@dataclasses.dataclass
class ExperimentResult:
  """All runs of one experiment plus its configuration and observations.

  ``metric`` names the per-seed metric of the summary (``"test_error"``,
  ``"test_accuracy"``, ``"val_loss"``); ``data`` is ``"synthetic"`` or the
  dataset's name; ``plot`` (optional) draws the experiment's own figure
  instead of the per-step curves of :func:`plot_runs`.
  """

  name: str
  title: str
  config: dict[str, Any]
  runs: list[Run]
  metric: str | None = None
  metric_label: str | None = None
  data: str = "synthetic"
  notes: list[str] = dataclasses.field(default_factory=list)
  checks: dict[str, Any] = dataclasses.field(default_factory=dict)
  wall_s: float = 0.0
  files: list[str] = dataclasses.field(default_factory=list)
  plot: Callable[[ExperimentResult, str], str | None] | None = None


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
# Progress
# ---------------------------------------------------------------------------

PROGRESS_EVERY_S = 15.0


class Progress:
  """Steps done out of ``total`` for one experiment, shown as it goes.

  In a terminal (stderr is a TTY) this is a tqdm bar. Otherwise (a CI log, a
  pipe) a background thread prints one plain line to stderr every
  ``PROGRESS_EVERY_S`` seconds: experiment, phase, steps done, elapsed time,
  so a long compilation or chunk never leaves the log silent. ``enabled=False``
  shows nothing. Use as a context manager, or call :meth:`close`.
  """

  def __init__(self, total: int, desc: str, enabled: bool | None = None, *,
               every_s: float | None = None, stream: Any = None):
    self.total, self.desc, self.done, self.phase = int(total), desc, 0, ""
    self.t0 = time.perf_counter()
    self.stream = stream if stream is not None else sys.stderr
    self._bar = None
    self._thread = None
    self._stop = threading.Event()
    self._lock = threading.Lock()
    self._running: list[str] = []
    if enabled is False:
      return
    tty = bool(getattr(self.stream, "isatty", lambda: False)())
    if tty and enabled is not False:
      try:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.total, desc=desc, unit="step", leave=False,
                         dynamic_ncols=True, file=self.stream)
        return
      except ImportError:  # pragma: no cover - tqdm is in the experiments extra
        pass
    self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()

  def line(self) -> str:
    with self._lock:
      phase = f" {self.phase}:" if self.phase else ""
      return (f"[{self.desc}]{phase} {self.done}/{self.total} steps, "
              f"{time.perf_counter() - self.t0:.0f}s elapsed")

  def _beat(self) -> None:
    while not self._stop.wait(self.every_s):
      print(self.line(), file=self.stream, flush=True)

  def set_phase(self, phase: str) -> None:
    with self._lock:
      self.phase = phase
    if self._bar is not None:
      self._bar.set_postfix_str(phase, refresh=False)

  @contextlib.contextmanager
  def phase_of(self, name: str):
    """Marks ``name`` as running (several may run at once, see :func:`parallel_map`)."""
    with self._lock:
      self._running.append(name)
      phase = ", ".join(self._running)
    self.set_phase(phase)
    try:
      yield
    finally:
      with self._lock:
        self._running.remove(name)
        phase = ", ".join(self._running)
      self.set_phase(phase)

  def update(self, n: int = 1) -> None:
    with self._lock:
      self.done += int(n)
    if self._bar is not None:
      self._bar.update(n)

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---------------------------------------------------------------------------
# Training loops
# ---------------------------------------------------------------------------

def _usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))  # respects taskset / container CPU sets
  except (AttributeError, OSError):  # pragma: no cover - not on Linux
    return os.cpu_count() or 1


JOBS = max(1, min(4, _usable_cores()))
"""How many independent trainings :func:`parallel_map` runs at once (``--jobs``)."""


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any],
                 jobs: int | None = None) -> list[Any]:
  """``[fn(x) for x in items]``, up to ``jobs`` (default :data:`JOBS`) at a time in threads.

  Each item is one independent training (one defence): XLA runs a small
  computation on one core and releases the GIL while it runs, so two threads
  keep two cores busy. Every computation is the same as when run alone, so
  the results do not depend on ``jobs`` (a test checks this bitwise).
  """
  jobs = JOBS if jobs is None else jobs
  if jobs <= 1 or len(items) <= 1:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    return list(pool.map(fn, items))


def train_all(train: Callable[[Any], Any], items: Sequence[Any], bar: Progress,
              phase: Callable[[Any], str] = str) -> list[tuple[Any, float]]:
  """``[(train(x), wall seconds) for x in items]``, run by :func:`parallel_map`.

  While ``train(x)`` runs, ``bar`` shows ``phase(x)`` among its running phases.
  """

  def one(x):
    with bar.phase_of(phase(x)), Timer() as timer:
      out = train(x)
    return out, timer.s

  return parallel_map(one, items)


def num_chunks(steps: int, target: int = 10) -> int:
  """The largest divisor of ``steps`` that is at most ``target`` (one compile)."""
  for n in range(min(target, steps), 0, -1):
    if steps % n == 0:
      return n
  return 1


def scan_loop(
    step_fn: Callable[[Any, Any], tuple[Any, Any]],
    carry: Any,
    steps: int,
    *,
    xs: Any = None,
    bar: Progress | None = None,
    chunks: int = 10,
    stop: Callable[[Any], Any] | None = None,
) -> tuple[Any, Any]:
  """Runs ``steps`` steps of ``step_fn(carry, (t, x_t)) -> (carry, out)`` with ``lax.scan``.

  ``xs`` (optional) is a tree whose leaves have a leading axis of ``steps``
  (e.g. pre-generated batches) or a callable ``(start, stop) -> tree`` making
  them chunk by chunk; ``x_t`` is the slice for step ``t`` (None without
  ``xs``). The steps run in ``num_chunks(steps, chunks)`` jitted chunks of
  equal length (compiled once), so the progress advances between them. ``out``
  leaves come back as NumPy arrays with the step axis first.

  ``stop(carry)`` (optional, jittable, a scalar bool) is evaluated after each
  chunk; once true the remaining chunks are not run and their outputs are
  filled in: NaN for floating outputs, the last value for the others. Use it
  for runs whose parameters are all NaN already (every later loss is NaN).
  """
  n = num_chunks(steps, chunks)
  size = steps // n
  run = jax.jit(lambda c, ts, x: jax.lax.scan(step_fn, c, (ts, x)))
  check = jax.jit(stop) if stop is not None else None
  outs = []
  for i in range(n):
    lo, hi = i * size, (i + 1) * size
    if xs is None:
      x = None
    elif callable(xs):
      x = xs(lo, hi)
    else:
      x = jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], xs)
    carry, out = run(carry, jnp.arange(lo, hi, dtype=jnp.int32), x)
    outs.append(jax.device_get(out))
    if bar is not None:
      bar.update(size)
    if check is not None and i < n - 1 and bool(check(carry)):
      fill = jax.tree.map(_filler(n - 1 - i, size), outs[-1])
      outs.append(fill)
      if bar is not None:
        bar.update((n - 1 - i) * size)
      break
  jax.block_until_ready(carry)
  out = jax.tree.map(lambda *a: np.concatenate(a, axis=0), *outs)
  return carry, out


def _filler(chunks: int, size: int) -> Callable[[np.ndarray], np.ndarray]:
  def fill(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    shape = (chunks * size, *a.shape[1:])
    if np.issubdtype(a.dtype, np.floating):
      return np.full(shape, np.nan, a.dtype)
    return np.broadcast_to(a[-1], shape).copy()
  return fill


def all_nonfinite(tree: Any) -> jax.Array:
  """True when every leaf of ``tree`` holds a non-finite value in every row.

  With a leading run axis (runs trained under ``vmap``) this asks whether
  *every* run has non-finite parameters.
  """
  leaves = jax.tree.leaves(tree)
  rows = [jnp.reshape(~jnp.isfinite(x), (x.shape[0], -1)).any(axis=1) for x in leaves]
  return jnp.stack(rows).any(axis=0).all()


def guard_curves(opt_state: Any) -> dict[str, jax.Array]:
  """``og.guard_stats(opt_state)`` as float32 values: one CSV column each."""
  return {k: jnp.asarray(v, jnp.float32) for k, v in og.guard_stats(opt_state).items()}


def skipped_count(opt_state: Any) -> jax.Array:
  """Total steps skipped by every guard in ``opt_state`` (0 without guards)."""
  total = jnp.zeros((), jnp.int32)
  for k, v in og.guard_stats(opt_state).items():
    if k.split("/")[-1] == "num_skipped":
      total = total + jnp.asarray(v, jnp.int32)
  return total


def skipped_from_curves(curves: dict[str, np.ndarray]) -> np.ndarray:
  """Per run, the final total of every ``*/num_skipped`` curve (``[runs, steps]``).

  None when there is no such curve (no guard).
  """
  total = None
  for k, v in curves.items():
    if k.split("/")[-1] == "num_skipped":
      last = np.nan_to_num(np.asarray(v)[:, -1]).astype(np.int64)
      total = last if total is None else total + last
  return total


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
  compiling JAX's PRNG for every shape (seconds each on a small CPU), and the
  same on every machine.
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

  return jax.tree.map_with_path(fill, abstract)


def stack(trees: Sequence[Any]) -> Any:
  """Stacks equal-structure trees along a new leading (seed) axis."""
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)


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
  """Writes ``<name>.json``, ``<name>.csv`` and (with matplotlib) ``<name>.png``.

  The CSV has one row per (run, seed, step) with the loss, the raw gradient
  norm and one column per extra curve: every ``og.guard_stats`` entry of the
  run's optimizer state (``kind/field``) and experiment-specific curves; a
  cell is empty where a run has no such curve.
  """
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, result.name)
  files = []

  doc = {
      "experiment": result.name,
      "title": result.title,
      "data": result.data,
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
    draw = result.plot or plot_runs
    png = draw(result, base + ".png")
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


def pyplot():
  """``matplotlib.pyplot`` on the Agg backend, or None without matplotlib."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:  # pragma: no cover - matplotlib is in the experiments extra
    return None
  return plt


def save_figure(fig: Any, path: str, dpi: int = 64) -> str:
  """Saves ``fig`` as a small palette PNG (about 3x smaller than matplotlib's RGBA)."""
  plt = pyplot()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  try:
    from PIL import Image

    with Image.open(path) as im:
      small = im.convert("RGB").quantize(colors=128)
    small.save(path, optimize=True)
  except Exception:  # pragma: no cover - Pillow comes with matplotlib; keep the RGBA file
    pass
  return path


def plot_runs(result: ExperimentResult, path: str, *, max_points: int = 500,
              clip_factor: float = 1e4) -> str | None:
  """Loss and raw gradient norm per step, one line per defence, log scale.

  One row of two panels per setting. Curves are the median over seeds; a run
  that became non-finite ends in an ``x`` at its last finite value. A panel's
  y axis stops at ``clip_factor`` times the median (over its curves) of each
  curve's median level, so one run going to 1e30 does not flatten the others:
  such a curve leaves through the top edge (the title then says "clipped").
  """
  plt = pyplot()
  runs = [r for r in result.runs if r.steps > 1]
  if plt is None or not runs:
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
  return save_figure(fig, path)


# ---------------------------------------------------------------------------
# Summary: table and records
# ---------------------------------------------------------------------------

COLUMNS = ("experiment", "setting", "defence", "final loss (min-max)", "diverged", "skipped",
           "metric: mean (min-max)", "wall s")


def fmt(x: float | None) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "nan"
  if math.isinf(x):
    return "inf"
  if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
    return f"{x:.2e}"
  return f"{x:.4f}" if abs(x) < 10 else f"{x:.1f}"


def _spread(values: np.ndarray) -> str:
  """``"0.0123 (0.0100-0.0150)"``; one value has no range; NaN if any is NaN."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return ""
  with np.errstate(invalid="ignore"):
    mean = float(np.mean(values))
  if values.size == 1 or not np.isfinite(values).all():
    return fmt(mean)
  return f"{fmt(mean)} ({fmt(float(values.min()))}-{fmt(float(values.max()))})"


def summary_rows(results: Sequence[ExperimentResult]) -> list[list[str]]:
  rows = []
  for res in results:
    for run in res.runs:
      metric = ""
      if res.metric and res.metric in run.metrics:
        metric = f"{res.metric_label or res.metric} {_spread(run.metrics[res.metric])}"
      skipped = float(np.mean(run.skipped)) if run.skipped.size else 0.0
      diverged = run.diverged()
      rows.append([
          res.name,
          run.setting,
          run.defence,
          _spread(run.final_losses()) if run.trained else "-",
          f"{'yes' if diverged.any() else 'no'} ({int(diverged.sum())}/{run.seeds})"
          if run.trained else "-",
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
  fmt_ = "  ".join(f"{{:{'<' if i < 3 or i == 6 else '>'}{w}}}" for i, w in enumerate(widths))
  lines = [fmt_.format(*COLUMNS), "  ".join("-" * w for w in widths)]
  lines += [fmt_.format(*r) for r in rows]
  return "\n".join(lines)


def summary_records(results: Sequence[ExperimentResult]) -> list[dict[str, Any]]:
  """The rows of ``summary.json``: one per (experiment, setting, defence).

  Keys: ``experiment``, ``setting``, ``defence`` (``"none"`` when undefended),
  ``data`` (``"synthetic"`` or the dataset), ``seeds``, ``diverged`` (seeds),
  ``final_loss`` (mean over seeds; None if any seed diverged or for a
  reference row without training), ``metric`` (its name), ``value`` (mean
  over seeds), ``values`` (per seed), ``injected_faults`` (corrupted steps, 0
  for natural runs), plus ``min``/``max`` of the values, ``steps``,
  ``skipped`` (per seed), ``wall_s`` and ``note``.
  """
  records = []
  for res in results:
    for run in res.runs:
      values = [_json_float(x) for x in run.metrics.get(res.metric, [])] if res.metric else []
      arr = np.asarray(run.metrics.get(res.metric, []) if res.metric else [], np.float64)
      diverged = int(run.diverged().sum())
      final = run.final_losses()
      records.append({
          "experiment": res.name,
          "setting": run.setting,
          "defence": run.defence,
          "data": res.data,
          "seeds": run.seeds,
          "diverged": diverged,
          "final_loss": (None if diverged or not run.trained or not np.isfinite(final).all()
                         else float(np.mean(final))),
          "metric": res.metric,
          "value": _json_float(np.mean(arr)) if arr.size else None,
          "values": values,
          "min": _json_float(np.min(arr)) if arr.size else None,
          "max": _json_float(np.max(arr)) if arr.size else None,
          "injected_faults": int(run.injected_faults),
          "steps": run.steps if run.trained else 0,
          "skipped": [int(s) for s in run.skipped],
          "wall_s": round(float(run.wall_s), 3),
          "note": run.note,
      })
  return records
