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
import functools
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
  instead of the per-step curves of :func:`plot_runs`, and ``table``
  (optional) writes its own Markdown table for the documentation instead of
  :func:`results_table`.
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
  table: Callable[[ExperimentResult], str] | None = None


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


# Figures are drawn for the documentation column: FIG_WIDTH inches at FIG_DPI
# (1920 px wide). Shown about 900 px wide on a 1400 px screen, 13 pt text
# reads as about 11 pt. Colours: the Okabe-Ito palette (told apart with the
# common colour-vision deficiencies) plus brown and grey; the undefended
# baseline ``none`` is always black and dashed.
FIG_WIDTH = 12.0
FIG_DPI = 160
STYLE = {
    "font.size": 13, "axes.titlesize": 14, "axes.labelsize": 13, "xtick.labelsize": 12,
    "ytick.labelsize": 12, "legend.fontsize": 12, "figure.titlesize": 15,
    "lines.linewidth": 2.0, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False,
}
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#8C510A",
           "#7F7F7F")
LINESTYLES = ("-", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
BASELINE = "none"
METRIC_LABELS = {
    "test_error": "test error",
    "test_accuracy": "test accuracy",
    "val_loss": "held-out loss",
}


def series_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
  """A colour, line style and marker per name, no two alike within ``names``.

  ``none`` is black and dashed; the others take the palette's colours in
  order, solid, dash-dotted and dotted by turns (so that curves that
  coincide still show), each with its own marker.
  """
  styles = {}
  i = 0
  for name in names:
    if name == BASELINE:
      styles[name] = {"color": "black", "ls": "--", "marker": "o", "zorder": 3}
      continue
    styles[name] = {"color": PALETTE[i % len(PALETTE)],
                    "ls": LINESTYLES[(i + i // len(PALETTE)) % len(LINESTYLES)],
                    "marker": MARKERS[i % len(MARKERS)], "zorder": 2}
    i += 1
  return styles


def figure(rows: int, cols: int, *, row_height: float = 4.0, **kwargs: Any):
  """``(fig, axes[rows, cols])`` in :data:`STYLE`, FIG_WIDTH wide, constrained layout."""
  plt = pyplot()
  with plt.rc_context(STYLE):
    fig, axes = plt.subplots(rows, cols, figsize=(FIG_WIDTH, row_height * rows + 1.2),
                             squeeze=False, layout="constrained", **kwargs)
  return fig, axes


def styled(draw: Callable[..., Any]) -> Callable[..., Any]:
  """Runs a figure-drawing function inside :data:`STYLE` (None without matplotlib)."""

  @functools.wraps(draw)
  def wrapped(*args: Any, **kwargs: Any) -> Any:
    plt = pyplot()
    if plt is None:
      return None
    with plt.rc_context(STYLE):
      return draw(*args, **kwargs)

  return wrapped


def title(fig: Any, text: str, width: int = 95) -> None:
  """The figure's title, wrapped to the figure's width."""
  import textwrap

  fig.suptitle("\n".join(textwrap.wrap(text, width)), fontsize=STYLE["figure.titlesize"])


def legend_below(fig: Any, handles: Sequence[Any], labels: Sequence[str],
                 per_row: int = 6) -> None:
  """The figure's legend under its panels, in rows of about equal length."""
  rows = math.ceil(len(labels) / per_row)
  fig.legend(handles, labels, loc="outside lower center", ncol=math.ceil(len(labels) / rows))


def save_figure(fig: Any, path: str, dpi: int = FIG_DPI) -> str:
  """Saves ``fig`` as a palette PNG (about 3x smaller than matplotlib's RGBA)."""
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


def moving_average(y: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
  """``(x, mean of y over window consecutive steps)``, x at the window's centre.

  A non-finite value makes every later mean NaN (a run that diverged stays
  diverged); ``window=1`` returns ``y`` as it is.
  """
  y = np.asarray(y, np.float64)
  if window <= 1 or window >= y.size:
    return np.arange(y.size, dtype=np.float64), y
  with np.errstate(invalid="ignore", over="ignore"):
    c = np.cumsum(np.insert(y, 0, 0.0))
    return np.arange(y.size - window + 1) + (window - 1) / 2, (c[window:] - c[:-window]) / window


def smoothing_window(steps: int) -> int:
  """Steps averaged per plotted point: 1 up to 500 steps, then steps / 250."""
  return 1 if steps <= 500 else steps // 250


def dot_panel(ax: Any, runs: Sequence[Run], key: str, styles: dict[str, dict[str, Any]], *,
              label: str, reference: float | None = None, log: bool | None = None,
              percent: bool = False, names: bool = True) -> None:
  """One row per run: each seed's ``run.metrics[key]`` as a tick, the mean as a marker.

  A run without training (a reference row such as "predict the mean") is a
  grey dotted vertical line instead, named in the axis label; so is
  ``reference``. A run with diverged seeds says how many above its marker. ``log=None`` takes a log
  axis when the positive values span more than a factor 30. Runs whose
  values are all non-finite say "NaN" on their row.
  """
  trained = [r for r in runs if r.trained]
  n = len(trained)
  finite_all = []
  for i, r in enumerate(trained):
    y = n - 1 - i
    v = np.asarray(r.metrics.get(key, []), np.float64)
    s = styles[r.defence]
    ok = v[np.isfinite(v)]
    finite_all.extend(ok.tolist())
    if ok.size == 0:
      ax.text(0.02, y, "NaN (diverged)", transform=ax.get_yaxis_transform(), va="center",
              color=s["color"], fontsize=STYLE["ytick.labelsize"])
      continue
    ax.hlines(y, ok.min(), ok.max(), color=s["color"], lw=3, alpha=0.45)
    ax.plot(ok, np.full(ok.size, y), "|", color=s["color"], ms=14, mew=2)
    ax.plot([ok.mean()], [y], s["marker"], color=s["color"], ms=10, mec="white", mew=0.8)
    diverged = int(r.diverged().sum())
    if diverged:
      ax.annotate(f"{diverged} of {r.seeds} diverged", (ok.mean(), y), xytext=(0, 9),
                  textcoords="offset points", ha="center", va="bottom", color=s["color"],
                  fontsize=STYLE["xtick.labelsize"] - 1)
  references = []
  for r in runs:
    if not r.trained and np.isfinite(r.metrics.get(key, [np.nan])).all():
      value = float(np.mean(r.metrics[key]))
      ax.axvline(value, color="0.45", lw=1.5, ls=":")
      references.append(r.defence)
      finite_all.append(value)
  if references:
    label = f"{label}\n(dotted: {', '.join(references)})"
  if reference is not None:
    ax.axvline(reference, color="0.45", lw=1.5, ls=":")
  positive = [x for x in finite_all if x > 0]
  if log is None:
    log = bool(positive) and len(positive) == len(finite_all) and (
        max(positive) > 30 * min(positive))
  if log:
    ax.set_xscale("log")
  if percent:
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.3g}%"))
  ax.margins(x=0.08)
  ax.set_yticks(range(n))
  if names:  # (a panel that shares the y axis of one with names shows none)
    ax.set_yticklabels([r.defence for r in reversed(trained)])
  ax.set_ylim(-0.6, n - 0.1)
  ax.tick_params(axis="y", length=0)
  ax.grid(False, axis="y")
  ax.set_xlabel(label)


def _curve_panel(ax: Any, runs: Sequence[Run], which: str, styles: dict[str, dict[str, Any]],
                 max_points: int, clip_factor: float) -> bool:
  """Median over seeds of the loss or raw gradient norm per step; True if clipped at the top."""
  curves = []
  for run in runs:
    x, y = moving_average(_nanmedian(run.loss if which == "loss" else run.grad_norm),
                          smoothing_window(run.steps))
    idx, _ = _downsample(y, max_points)
    curves.append((run.defence, x[idx], np.where(y[idx] > 0, y[idx], np.nan)))
  levels = [np.nanmedian(y) for _, _, y in curves if np.isfinite(y).any()]
  top = clip_factor * float(np.median(levels)) if levels else None
  lows = [np.nanmin(y) for _, _, y in curves if np.isfinite(y).any()]
  clipped = False
  for name, x, y in curves:
    s = styles[name]
    # the baseline under the others: a defence that changes nothing hides it, not the reverse
    ax.plot(x, y, ls=s["ls"], color=s["color"], zorder=1.5 if name == BASELINE else 2,
            label=name, lw=2.2 if name == BASELINE else 1.8)
    finite = np.flatnonzero(np.isfinite(y))
    if top is not None and finite.size and np.nanmax(y) > top:
      clipped = True
    if not np.isfinite(y[-1]) and finite.size:  # it ends non-finite: diverged
      last = y[finite[-1]] if top is None else min(y[finite[-1]], top)
      ax.plot(x[finite[-1]], last, "X", color=s["color"], ms=13, mec="white", mew=1,
              clip_on=False, zorder=4)
  ax.set_yscale("log")
  if clipped and lows:
    ax.set_ylim(min(lows) / 1.5, top)
  return clipped


@styled
def plot_runs(result: ExperimentResult, path: str, *, max_points: int = 600,
              clip_factor: float = 1e4) -> str | None:
  """Per setting, a row of three panels: training loss, raw gradient norm, final metric.

  The curves are the median over seeds, log scale, one line per defence
  (colour and line style from :func:`series_styles`); runs longer than 500
  steps are shown as a moving average (the axis label says over how many
  steps). A run that became non-finite ends in an ``X`` at its last finite
  value (a non-finite step in between, such as a skipped overflow, only
  breaks the line). A panel's y axis stops at ``clip_factor`` times the median (over its
  curves) of each curve's median level, so one run going to 1e30 does not
  flatten the others: such a curve leaves through the top edge (the title
  then says "cut"). The third panel (when the result has a ``metric``) shows
  each seed's final metric and their mean per defence.
  """
  runs = [r for r in result.runs if r.steps > 1]
  if not runs:
    return None
  settings = list(dict.fromkeys(r.setting for r in runs))
  defences = list(dict.fromkeys(r.defence for r in runs))
  styles = series_styles(defences)
  cols = 3 if result.metric else 2
  fig, axes = figure(len(settings), cols, row_height=4.2,
                     gridspec_kw={"width_ratios": [1.2, 1.2, 1.1][:cols]})
  for row, setting in enumerate(settings):
    mine = [r for r in runs if r.setting == setting]
    window = smoothing_window(mine[0].steps)
    average = f", mean of {window} steps" if window > 1 else ""
    prefix = f"{setting}: " if len(settings) > 1 else ""
    for col, which in enumerate(("loss", "grad_norm")):
      ax = axes[row, col]
      clipped = _curve_panel(ax, mine, which, styles, max_points, clip_factor)
      label = "training loss" if which == "loss" else "raw gradient norm"
      ax.set_title(f"{prefix}{label}{' (cut at the top)' if clipped else ''}")
      ax.set_xlabel(f"step{average}")
    if result.metric:
      extra = [r for r in result.runs if not r.trained]  # reference rows (no curve)
      dot_panel(axes[row, 2], mine + extra, result.metric, styles,
                label=METRIC_LABELS.get(result.metric, result.metric_label or result.metric),
                percent=result.metric in ("test_error", "test_accuracy"))
      axes[row, 2].set_title(f"{prefix}at the end (ticks: seeds)")
  handles, labels = axes[0, 0].get_legend_handles_labels()
  legend_below(fig, handles, labels)
  title(fig, result.title)
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


# The documentation's tables: one compact table per experiment, in the page's
# section about it (``python -m experiments --update-docs``).

METRIC_COLUMNS = {
    "test_error": ("test error, % wrong", True),
    "test_accuracy": ("test accuracy, %", True),
    "val_loss": ("held-out loss", False),
}


def short(x: float | None, digits: int = 3, percent: bool = False) -> str:
  """``x`` to ``digits`` significant digits (in % with ``percent``); NaN as "NaN"."""
  if x is None or math.isnan(x):
    return "NaN"
  if math.isinf(x):
    return "inf" if x > 0 else "-inf"
  if percent:
    x = 100 * x
  if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
    return f"{x:.2g}"
  if abs(x) >= 10 ** digits:
    return f"{x:.0f}"
  return f"{x:.{digits}g}"


def spread(values: Sequence[float], digits: int = 3, percent: bool = False,
           decimals: int | None = None) -> str:
  """``"mean (min-max)"`` over seeds, to ``digits`` significant digits (or ``decimals``
  places); "NaN" if any value is."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return "-"
  if not np.isfinite(v).all():
    return "NaN"
  one = (lambda x: f"{x:.{decimals}f}") if decimals is not None else (
      lambda x: short(x, digits, percent))
  mean, lo, hi = one(float(v.mean())), one(float(v.min())), one(float(v.max()))
  return mean if lo == hi else f"{mean} ({lo}-{hi})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A Markdown table; ``|`` inside a cell becomes ``/``."""
  cell = lambda c: str(c).replace("|", "/")
  lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
  return "\n".join(lines)


def results_table(result: ExperimentResult) -> str:
  """The experiment's runs as a compact Markdown table for the documentation.

  Columns: (the setting, when there are several), the defence, the metric
  (mean and min-max over seeds), diverged seeds, steps skipped per seed, and
  the final training loss (mean over seeds). A reference row without
  training fills the metric alone.
  """
  metric = result.metric
  name, percent = METRIC_COLUMNS.get(metric, (result.metric_label or metric, False))
  settings = list(dict.fromkeys(r.setting for r in result.runs if r.trained))
  header = ["defence", f"{name} (min-max)", "diverged", "skipped steps", "final training loss"]
  if len(settings) > 1:
    header.insert(0, "setting")
  rows = []
  for run in result.runs:
    values = np.abs(np.asarray(run.metrics.get(metric, []), np.float64))
    small = bool(((values > 0) & (values < 0.1)).any())  # e.g. an MSE of 5e-8: 3 digits
    value = ("-" if metric not in run.metrics else spread(run.metrics[metric], 3, percent)
             if percent or small else spread(run.metrics[metric], decimals=3))
    if run.trained:
      diverged = int(run.diverged().sum())
      skipped = float(np.mean(run.skipped)) if run.skipped.size else 0.0
      final = run.final_losses()
      row = [f"`{run.defence}`", value,
             f"{diverged} of {run.seeds}" if diverged else "-",
             f"{skipped:.3g}" if skipped else "-",
             short(float(np.mean(final))) if np.isfinite(final).all() else "NaN"]
    else:
      row = [run.defence, value, "-", "-", "-"]
    if len(settings) > 1:
      row.insert(0, run.setting)
    rows.append(row)
  return markdown_table(header, rows)


def docs_table(result: ExperimentResult) -> str:
  """The experiment's table for the documentation (``result.table`` or :func:`results_table`)."""
  return (result.table or results_table)(result)


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
