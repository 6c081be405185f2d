"""False skips of ``skip_on_spike``: healthy steps skipped, faults caught.

``python -m benchmarks.false_skips`` trains small models with a guard around
the optimizer and counts, for every case, the *healthy skips* (skipped steps
without an injected fault), the faults skipped out of those injected, and,
over the healthy steps, the ratio of the gradient norm to the median of the
last ``window`` finite norms before it (once ``min_history`` were recorded):
its maximum and its 99.9th percentile. A spike rule that skips only above some
multiple of the window's median never skips a healthy step of these runs when
that multiple is above the largest ratio. Three trials:

* **classifier**: a small ReLU MLP classifier (synthetic data: a random
  linear teacher, 20% of the labels replaced by random ones, so that repeated
  epochs memorize) with ``chain(optax.clip_by_global_norm(1), adam)`` inside
  each guard, in two regimes: *multi-epoch*, ``--batches`` fixed batches
  visited in order, again and again (the window of the guard is shorter than
  an epoch, so a batch's previous visit has left the history when it comes
  back), and *single-epoch*, a fresh batch every step. The guards compared,
  both with ``value=loss`` and the same ``sigma``, ``window`` and
  ``min_history``:

  - ``mean/std``: skip when the norm or the loss is non-finite or above
    ``mean + sigma * std`` of its last ``window`` finite values, OR-combined,
    every finite value recorded (the rule of OLMo-core's and Levanter's
    skip-step optimizers);
  - ``og.skip_on_spike``: this library's guard.

* **hard-batch** (a held-out trial: nothing in the guard was tuned on it): a
  1.1M-parameter GELU MLP (64 -> 1024 -> 1024 -> 1) regressing a noisy
  teacher (a random GELU MLP, outputs scaled to unit variance, plus Gaussian
  noise of standard deviation 0.5), 4,096 samples in 256 batches of 16 that
  recur in the same order every epoch, so the batches with the most noise come
  back as the same hard batches, with
  ``og.skip_on_spike(optax.chain(og.clip_by_global_norm(1.0),
  optax.adamw(1e-3)))`` at its defaults and ``value=loss``.

* **warm-up**: a ReLU MLP (64 -> 256 -> 256 -> 10) on scikit-learn's bundled
  digits (1,792 of the 1,797 images in 56 recurring batches of 32; no
  network needed), clean data, ``og.skip_on_spike(chain(og.clip_by_global_norm(1),
  optax.adamw(schedule)), sigma=6, window=128, min_history=64)`` with
  ``value=loss``, where ``schedule`` warms the learning rate up linearly from
  0 to 1e-3 over 200 steps, then decays it by a cosine to 1e-5: the norm
  trends while the spike test is already on.

The classifier and hard-batch trials run without faults and with
``--fault-rate`` of the steps (after the first ``window``) hit by a fault:
NaN in one gradient element, ``+inf`` in one, every element ``x1e30``, every
element ``x1e4``, in turn; in the hard-batch trial one of the faults is a NaN
loss instead (the gradients left alone). ``--spike-arg NAME=VALUE`` passes an
extra keyword argument to every ``og.skip_on_spike`` (e.g. to try a setting
of its rule).

All runs of one guard and one regime (seeds x fault rates) are one
``vmap``-ed ``lax.scan``; under ``vmap`` the guards' ``lax.cond`` is a select,
which changes the cost, not the results. Runs on the CPU: with the defaults
about 80 s of CPU time (3.4 minutes of wall time on a shared 2-core machine at
load average 10), with ``--quick`` (1,000 steps per run instead of 3,000, a
smoke test too short for memorization to make the lag visible) about 45 s.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og

KINDS = ("NaN", "inf", "x1e30", "x1e4", "NaN loss")  # fault codes 1..5
TRIALS = ("classifier", "hard-batch", "warm-up")
QUICK_STEPS = 1000
# og.skip_on_spike's own window and min_history (the hard-batch trial uses the
# guard's defaults; its ratios are taken over the same window)
SPIKE_WINDOW, SPIKE_MIN_HISTORY = 128, 64


class MeanStdState(NamedTuple):
  """State of :func:`mean_std_guard` (the comparison rule)."""

  inner_state: Any
  num_skipped: jax.Array
  last_skipped: jax.Array
  norms: jax.Array
  norm_count: jax.Array
  values: jax.Array
  value_count: jax.Array


def mean_std_guard(inner, *, sigma=6.0, window=128, min_history=64):
  """The mean + sigma * std rule on the norm and the loss (for comparison only)."""
  inner = optax.with_extra_args_support(inner)

  def threshold(history, count):
    n = jnp.minimum(count, window)
    valid = jnp.arange(window) >= window - n
    d = jnp.maximum(n, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, history, 0.0)) / d
    std = jnp.sqrt(jnp.sum(jnp.where(valid, history - mean, 0.0) ** 2) / d)
    return jnp.where(count >= min_history, mean + sigma * std, jnp.inf)

  def record(history, count, x):
    ok = jnp.isfinite(x)
    shifted = jnp.concatenate([history[1:], x[None]])
    return jnp.where(ok, shifted, history), jnp.where(ok, optax.safe_increment(count), count)

  def init_fn(params):
    h, c = jnp.zeros((window,), jnp.float32), jnp.zeros((), jnp.int32)
    return MeanStdState(inner.init(params), c, jnp.zeros((), bool), h, c, h, c)

  def update_fn(updates, state, params=None, *, value, **extra):
    norm = optax.tree.norm(updates).astype(jnp.float32)
    value = jnp.asarray(value, jnp.float32)
    skip = ~jnp.isfinite(norm) | ~jnp.isfinite(value)
    skip |= norm > threshold(state.norms, state.norm_count)
    skip |= value > threshold(state.values, state.value_count)
    norms, norm_count = record(state.norms, state.norm_count, norm)
    values, value_count = record(state.values, state.value_count, value)
    u, inner_state = jax.lax.cond(
        skip, lambda: (jax.tree.map(jnp.zeros_like, updates), state.inner_state),
        lambda: inner.update(updates, state.inner_state, params, value=value, **extra),
    )
    return u, MeanStdState(inner_state, state.num_skipped + skip, skip, norms, norm_count,
                           values, value_count)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


GUARDS = {
    "mean/std": mean_std_guard,
    "og.skip_on_spike": og.skip_on_spike,
}


class Config(NamedTuple):
  """Sizes of the classifier trial; ``steps``, ``seeds`` and ``fault_rate`` are
  those of every trial, ``sigma``, ``window`` and ``min_history`` those of both
  guards of the classifier trial."""

  steps: int = 3000
  batches: int = 256
  batch_size: int = 16
  dim: int = 32
  width: int = 256
  classes: int = 10
  label_noise: float = 0.2
  learning_rate: float = 3e-3
  fault_rate: float = 0.03
  seeds: int = 1
  sigma: float = 6.0
  window: int = 128
  min_history: int = 64


class HardBatch(NamedTuple):
  """The hard-batch trial (held out: its sizes were fixed before it ran)."""

  samples: int = 4096
  batch_size: int = 16
  dim: int = 64
  width: int = 1024
  teacher_width: int = 256
  noise: float = 0.5
  learning_rate: float = 1e-3


class WarmUp(NamedTuple):
  """The warm-up trial on the digits."""

  batch_size: int = 32
  width: int = 256
  peak_lr: float = 1e-3
  end_lr: float = 1e-5
  warmup_steps: int = 200
  sigma: float = 6.0
  window: int = 128
  min_history: int = 64


# ---------------------------------------------------------------------------
# Faults, norms and the summary of a set of runs


def _fault_codes(steps: int, window: int, seed: int, rate: float,
                 nan_loss: bool = False) -> np.ndarray:
  """Fault code per step (0: none), ``round(rate * steps)`` faults after ``window``.

  Codes 1..4 in turn; with ``nan_loss`` one of them, in the middle of the
  run, is a NaN loss (code 5) instead.
  """
  rng = np.random.default_rng(1000 + seed)
  code = np.zeros(steps, np.int32)
  n = int(round(rate * steps))
  # no fault in the first window: the guards only test spikes after min_history
  hit = rng.choice(np.arange(window, steps), n, replace=False)
  code[hit] = np.arange(n) % 4 + 1
  if nan_loss and n:
    code[np.sort(hit)[n // 2]] = 5
  return code


def _inject(g, code):
  """NaN / +inf in one element, or every element x1e30 / x1e4 (code 0 or 5: unchanged)."""
  bad = jnp.array([0.0, jnp.nan, jnp.inf, 0.0, 0.0, 0.0])[code]
  scale = jnp.array([1.0, 1.0, 1.0, 1e30, 1e4, 1.0])[code]
  g = jax.tree.map(lambda x: x * scale, g)
  first = jnp.where((code == 1) | (code == 2), bad, g["w1"][0, 0])
  return {**g, "w1": g["w1"].at[0, 0].set(first)}


def _norm(tree) -> jax.Array:
  """Global norm accumulated in float32 (what the guards test)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def healthy_ratios(norms: np.ndarray, healthy: np.ndarray, window: int,
                   min_history: int) -> tuple[np.ndarray, np.ndarray]:
  """``(ratios, steps)``: norm / median of the last ``window`` finite norms before it.

  For one run: only healthy steps with at least ``min_history`` finite norms
  recorded before them (every finite norm is recorded, fault or not, as the
  guard does).
  """
  history: list[float] = []
  ratios, steps = [], []
  for t, (n, ok) in enumerate(zip(norms, healthy, strict=True)):
    if ok and len(history) >= min_history and np.isfinite(n):
      ratios.append(n / np.median(history[-window:]))
      steps.append(t)
    if np.isfinite(n):
      history.append(float(n))
      if len(history) > window:
        del history[0]
  return np.asarray(ratios), np.asarray(steps, np.int64)


def summarize(skipped: np.ndarray, codes: np.ndarray, norms: np.ndarray, loss: np.ndarray,
              *, window: int, min_history: int, final: int,
              batches: int | None = None) -> dict[str, Any]:
  """One row of the table from ``(runs, steps)`` arrays of one case.

  ``final``: the final loss is the mean over the last ``final`` steps;
  ``batches``: the epoch length of a multi-epoch run (adds ``repeat visits``,
  the healthy skips of a batch already skipped on its previous visit).
  """
  healthy = codes == 0
  false = skipped & healthy
  row: dict[str, Any] = {
      "runs": int(skipped.shape[0]),
      "healthy skips": int(false.sum()),
      "per 1k healthy steps": 1000.0 * false.sum() / max(int(healthy.sum()), 1),
      "max per run": int(false.sum(axis=1).max()),
  }
  if batches is not None:
    prev = np.zeros_like(skipped)
    prev[:, batches:] = skipped[:, :-batches]
    row["repeat visits"] = int((false & prev).sum())
  faulty = ~healthy
  if faulty.any():
    row["faults skipped"] = f"{int((skipped & faulty).sum())}/{int(faulty.sum())}"
  for k, name in enumerate(KINDS, start=1):
    hit = codes == k
    if hit.any():
      row[name] = f"{int((skipped & hit).sum())}/{int(hit.sum())}"
  ratios, at = [], []
  for i in range(skipped.shape[0]):
    r, s = healthy_ratios(norms[i], healthy[i], window, min_history)
    ratios.append(r)
    at.append(s)
  r, s = np.concatenate(ratios), np.concatenate(at)
  if r.size:
    row["max ratio"] = float(r.max())
    row["at step"] = int(s[np.argmax(r)])
    row["p99.9 ratio"] = float(np.percentile(r, 99.9))
  row["final loss"] = float(np.nanmean(loss[:, -final:]))
  return row


def _scan(tx, setup: Callable, grad_fn: Callable, codes: np.ndarray, keys: jax.Array):
  """Trains one run per lane: ``(skipped, norms, loss)``, each ``(lanes, steps)``.

  ``setup(key) -> (params, data)`` starts the run of a lane (``keys[i]``)
  and ``grad_fn(data, params, t) -> (loss, grads)`` is its step ``t``; step
  ``t`` of lane ``i`` gets the fault ``codes[i, t]``.
  """
  steps = codes.shape[1]

  def one(key, code):
    p0, data = setup(key)

    def step(carry, inp):
      p, s = carry
      t, c = inp
      loss, g = grad_fn(data, p, t)
      g = _inject(g, c)
      loss = jnp.where(c == 5, jnp.nan, loss)
      u, s = tx.update(g, s, p, value=loss)
      return (optax.apply_updates(p, u), s), (s.last_skipped, _norm(g), loss)

    _, out = jax.lax.scan(step, (p0, tx.init(p0)), (jnp.arange(steps), code))
    return out

  skipped, norms, loss = jax.jit(jax.vmap(one))(keys, jnp.asarray(codes))
  return np.asarray(skipped), np.asarray(norms), np.asarray(loss)


def _rows(trial: str, regime: str, guard: str, rates: tuple[float, ...], lanes: list,
          runs: Sequence[np.ndarray], **summary: Any) -> list[dict[str, Any]]:
  """One row per fault rate: ``runs = (skipped, codes, norms, loss)`` of the lanes
  ``(rate, seed)`` at that rate, :func:`summarize`-d with ``summary``."""
  rows = []
  for rate in rates:
    idx = [i for i, (r, _) in enumerate(lanes) if r == rate]
    row = {"trial": trial, "regime": regime, "faults": f"{100 * rate:g}%", "guard": guard}
    row.update(summarize(*(a[idx] for a in runs), **summary))
    rows.append(row)
  return rows


def _dense_init(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  p = {}
  for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True), start=1):
    p[f"w{i}"] = jax.random.normal(k, (a, b)) / np.sqrt(a)
    p[f"b{i}"] = jnp.zeros(b)
  return p


def _mlp(p, x, act):
  n = len(p) // 2
  for i in range(1, n):
    x = act(x @ p[f"w{i}"] + p[f"b{i}"])
  return x @ p[f"w{n}"] + p[f"b{n}"]


# ---------------------------------------------------------------------------
# Trial 1: the classifier, multi-epoch and single-epoch, two guards


def _labels(x, teacher, key, config):
  y = jnp.argmax(x @ teacher, -1)
  k1, k2 = jax.random.split(key)
  flip = jax.random.uniform(k1, y.shape) < config.label_noise
  return jnp.where(flip, jax.random.randint(k2, y.shape, 0, config.classes), y)


def _init_params(key, config):
  k = jax.random.split(key, 3)
  d, h, c = config.dim, config.width, config.classes
  return {"w1": jax.random.normal(k[0], (d, h)) / np.sqrt(d), "b1": jnp.zeros(h),
          "w2": jax.random.normal(k[1], (h, h)) / np.sqrt(h), "b2": jnp.zeros(h),
          "w3": jax.random.normal(k[2], (h, c)) / np.sqrt(h), "b3": jnp.zeros(c)}


def _loss(p, x, y):
  a = jax.nn.relu(x @ p["w1"] + p["b1"])
  a = jax.nn.relu(a @ p["w2"] + p["b2"])
  logits = a @ p["w3"] + p["b3"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _run(guard: str, multi_epoch: bool, config: Config, rates: tuple[float, ...],
         spike_args: dict[str, Any] | None = None):
  """Skipped flags, fault codes, norms, losses ``(len(rates) * seeds, steps)`` and lanes."""
  extra = spike_args if guard == "og.skip_on_spike" else {}
  tx = GUARDS[guard](
      optax.chain(optax.clip_by_global_norm(1.0), optax.adam(config.learning_rate)),
      sigma=config.sigma, window=config.window, min_history=config.min_history,
      **(extra or {}),
  )
  lanes = [(rate, seed) for rate in rates for seed in range(config.seeds)]
  codes = np.stack([_fault_codes(config.steps, config.window, seed, rate)
                    for rate, seed in lanes])
  keys = jnp.stack([jax.random.PRNGKey(seed) for _, seed in lanes])
  shape = (config.batches, config.batch_size)

  def setup(key):
    k_teacher, k_x, k_y, k_params, k_stream = jax.random.split(key, 5)
    teacher = jax.random.normal(k_teacher, (config.dim, config.classes))
    xs = jax.random.normal(k_x, (*shape, config.dim))
    ys = _labels(xs, teacher, k_y, config)
    return _init_params(k_params, config), (teacher, xs, ys, k_stream)

  def grad_fn(data, p, t):
    teacher, xs, ys, k_stream = data
    if multi_epoch:
      x, y = xs[t % config.batches], ys[t % config.batches]
    else:
      k1, k2 = jax.random.split(jax.random.fold_in(k_stream, t))
      x = jax.random.normal(k1, (config.batch_size, config.dim))
      y = _labels(x, teacher, k2, config)
    return jax.value_and_grad(_loss)(p, x, y)

  skipped, norms, loss = _scan(tx, setup, grad_fn, codes, keys)
  return skipped, codes, norms, loss, lanes


def classifier(config: Config, spike_args: dict[str, Any], log) -> list[dict[str, Any]]:
  """Rows of the classifier trial: (regime, fault rate, guard)."""
  rows = []
  rates = (0.0, config.fault_rate)
  for regime in ("multi-epoch", "single-epoch"):
    for guard in GUARDS:
      t0 = time.perf_counter()
      *runs, lanes = _run(guard, regime == "multi-epoch", config, rates, spike_args)
      rows += _rows("classifier", regime, guard, rates, lanes, runs, window=config.window,
                    min_history=config.min_history, final=config.batches,
                    batches=config.batches if regime == "multi-epoch" else None)
      log(f"  classifier, {regime}, {guard}: {time.perf_counter() - t0:.0f} s")
  return rows


# ---------------------------------------------------------------------------
# Trial 2: the recurring hard batch (held out)


def hard_batch(config: Config, spike_args: dict[str, Any], log,
               trial: HardBatch | None = None) -> list[dict[str, Any]]:
  """Rows of the hard-batch trial: no faults and ``config.fault_rate`` of them."""
  trial = trial or HardBatch()
  t0 = time.perf_counter()
  window = int(spike_args.get("window", SPIKE_WINDOW))
  min_history = int(spike_args.get("min_history", SPIKE_MIN_HISTORY))
  tx = og.skip_on_spike(
      optax.chain(og.clip_by_global_norm(1.0), optax.adamw(trial.learning_rate)),
      **spike_args)
  rates = (0.0, config.fault_rate)
  lanes = [(rate, seed) for rate in rates for seed in range(config.seeds)]
  codes = np.stack([_fault_codes(config.steps, window, seed, rate, nan_loss=True)
                    for rate, seed in lanes])
  keys = jnp.stack([jax.random.PRNGKey(100 + seed) for _, seed in lanes])
  batches = trial.samples // trial.batch_size
  gelu = jax.nn.gelu

  def setup(key):
    k_teacher, k_x, k_noise, k_params = jax.random.split(key, 4)
    teacher = _dense_init(k_teacher, (trial.dim, trial.teacher_width, 1))
    x = jax.random.normal(k_x, (trial.samples, trial.dim))
    clean = _mlp(teacher, x, gelu)[:, 0]
    clean = (clean - clean.mean()) / clean.std()
    y = clean + trial.noise * jax.random.normal(k_noise, clean.shape)
    data = (x.reshape(batches, trial.batch_size, trial.dim),
            y.reshape(batches, trial.batch_size))
    return _dense_init(k_params, (trial.dim, trial.width, trial.width, 1)), data

  def loss_fn(p, x, y):
    return jnp.mean((_mlp(p, x, gelu)[:, 0] - y) ** 2)

  def grad_fn(data, p, t):
    xs, ys = data
    return jax.value_and_grad(loss_fn)(p, xs[t % batches], ys[t % batches])

  skipped, norms, loss = _scan(tx, setup, grad_fn, codes, keys)
  rows = _rows("hard-batch", "multi-epoch", "og.skip_on_spike", rates, lanes,
               (skipped, codes, norms, loss), window=window, min_history=min_history,
               final=batches, batches=batches)
  log(f"  hard-batch: {time.perf_counter() - t0:.0f} s")
  return rows


# ---------------------------------------------------------------------------
# Trial 3: a learning-rate warm-up on the digits


def warm_up(config: Config, spike_args: dict[str, Any], log,
            trial: WarmUp | None = None) -> list[dict[str, Any]]:
  """Rows of the warm-up trial (clean data; one row)."""
  trial = trial or WarmUp()
  try:
    from sklearn.datasets import load_digits
  except ImportError:
    log("  warm-up: skipped (needs scikit-learn for its bundled digits)")
    return []
  t0 = time.perf_counter()
  digits = load_digits()
  batches = len(digits.target) // trial.batch_size
  n = batches * trial.batch_size
  order = np.random.default_rng(0).permutation(len(digits.target))[:n]
  xs = jnp.asarray(digits.data[order] / 16.0, jnp.float32).reshape(batches, trial.batch_size, -1)
  ys = jnp.asarray(digits.target[order], jnp.int32).reshape(batches, trial.batch_size)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, trial.peak_lr, trial.warmup_steps, max(config.steps, trial.warmup_steps + 1),
      trial.end_lr)
  kwargs = {"sigma": trial.sigma, "window": trial.window, "min_history": trial.min_history,
            **spike_args}
  tx = og.skip_on_spike(
      optax.chain(og.clip_by_global_norm(1.0), optax.adamw(schedule)), **kwargs)
  codes = np.zeros((config.seeds, config.steps), np.int32)
  keys = jnp.stack([jax.random.PRNGKey(200 + seed) for seed in range(config.seeds)])

  def setup(key):
    return _dense_init(key, (xs.shape[-1], trial.width, trial.width, 10)), (xs, ys)

  def loss_fn(p, x, y):
    logits = _mlp(p, x, jax.nn.relu)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  def grad_fn(data, p, t):
    return jax.value_and_grad(loss_fn)(p, data[0][t % batches], data[1][t % batches])

  skipped, norms, loss = _scan(tx, setup, grad_fn, codes, keys)
  row = {"trial": "warm-up", "regime": "multi-epoch", "faults": "0%",
         "guard": "og.skip_on_spike"}
  window, min_history = int(kwargs["window"]), int(kwargs["min_history"])
  row.update(summarize(skipped, codes, norms, loss, window=window,
                       min_history=min_history, final=batches, batches=batches))
  # the warm-up itself and one window after it, apart from the rest of the run
  end = trial.warmup_steps + window
  early = [healthy_ratios(norms[i, :end], codes[i, :end] == 0, window, min_history)[0]
           for i in range(len(keys))]
  early_max = max((float(r.max()) for r in early if r.size), default=float("nan"))
  row["note"] = (f"warm-up: during the {trial.warmup_steps} warm-up steps and the window "
                 f"after them (steps < {end}): {int(skipped[:, :end].sum())} healthy "
                 f"skip(s), max ratio {early_max:.2f}")
  log(f"  warm-up: {time.perf_counter() - t0:.0f} s")
  return [row]


# ---------------------------------------------------------------------------
# Output and command line


def measure(config: Config | None = None, trials=TRIALS, spike_args=None,
            log=lambda *a: None) -> list[dict[str, Any]]:
  """One row per case of the chosen trials."""
  config = config or Config()
  spike_args = dict(spike_args or {})
  run = {"classifier": classifier, "hard-batch": hard_batch, "warm-up": warm_up}
  rows = []
  for name in TRIALS:
    if name in trials:
      rows += run[name](config, spike_args, log)
  return rows


COLUMNS = ["trial", "regime", "faults", "guard", "runs", "healthy skips",
           "per 1k healthy steps", "max per run", "repeat visits", "faults skipped", *KINDS,
           "max ratio", "at step", "p99.9 ratio", "final loss"]


def table(rows: list[dict[str, Any]]) -> str:
  """A Markdown table of the rows (``-`` where a column does not apply)."""

  def fmt(v):
    return f"{v:.2f}" if isinstance(v, float) else str(v)

  cells = [[fmt(r.get(c, "-")) for c in COLUMNS] for r in rows]
  widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(COLUMNS)]
  line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths, strict=True)) + " |"
  out = [line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  return "\n".join(out + [line(x) for x in cells])


def _spike_arg(text: str) -> tuple[str, Any]:
  name, sep, value = text.partition("=")
  if not sep or not name.isidentifier():
    raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
  try:
    return name, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    raise argparse.ArgumentTypeError(f"{name}: not a Python literal: {value!r}") from None


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
  defaults = Config()
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.false_skips", description=__doc__.split("\n\n")[0],
      epilog="Without --only all three trials run (classifier, hard-batch, warm-up).")
  for field in Config._fields:
    default = getattr(defaults, field)
    parser.add_argument(f"--{field.replace('_', '-')}", type=type(default),
                        default=None if field == "steps" else default)
  parser.add_argument("--quick", action="store_true",
                      help=f"{QUICK_STEPS} steps per run instead of {defaults.steps} "
                      "(a smoke test)")
  parser.add_argument("--only", nargs="+", choices=TRIALS, default=list(TRIALS),
                      help="run only these trials")
  parser.add_argument("--spike-arg", type=_spike_arg, action="append", default=[],
                      metavar="NAME=VALUE",
                      help="extra keyword argument of og.skip_on_spike (repeatable), "
                      "e.g. --spike-arg sigma=8")
  parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
  args = parser.parse_args(argv)
  fields = {f: getattr(args, f) for f in Config._fields}
  if fields["steps"] is None:
    fields["steps"] = QUICK_STEPS if args.quick else defaults.steps
  return Config(**fields), args


def main(argv: list[str] | None = None) -> int:
  config, args = parse_args(argv)
  spike_args = dict(args.spike_arg)
  jax.config.update("jax_platforms", "cpu")
  start = time.perf_counter()
  print(f"{config}\ntrials: {', '.join(args.only)}"
        + (f"; og.skip_on_spike extra arguments: {spike_args}" if spike_args else ""),
        flush=True)
  rows = measure(config, args.only, spike_args, log=lambda *a: print(*a, flush=True))
  print()
  print(table(rows))
  for row in rows:
    if row.get("note"):
      print(f"\n{row['note']}")
  print("\nhealthy skips: skipped steps without an injected fault; max ratio / p99.9 ratio: "
        "over healthy steps, the gradient norm over the median of the window of finite norms "
        "before it (at step: where the max was)")
  print(f"\n{time.perf_counter() - start:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": config._asdict(), "trials": args.only, "spike_args": spike_args,
                 "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
