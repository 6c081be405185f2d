"""False skips of ``skip_on_spike`` in multi-epoch and single-epoch training.

``python -m benchmarks.false_skips`` trains a small MLP classifier (synthetic
data: a random linear teacher, 20% of the labels replaced by random ones, so
that repeated epochs memorize) with ``chain(clip_by_global_norm(1), adam)``
inside a guard, and counts the steps each guard skips:

* **multi-epoch**: ``--batches`` fixed batches visited in order, again and
  again (the window of the guard is shorter than an epoch, so a batch's
  previous visit has left the history when it comes back);
* **single-epoch**: a fresh batch every step;

each without faults and with ``--fault-rate`` of the steps hit by a gradient
fault (NaN, ``+inf``, every element ``x1e30`` and every element ``x1e4``, in
turn; the loss is left alone). A *false skip* is a skipped step without a
fault. The guards compared, both with ``value=loss`` and the same ``sigma``,
``window`` and ``min_history``:

* ``mean/std``: skip when the norm or the loss is non-finite or above
  ``mean + sigma * std`` of its last ``window`` finite values, OR-combined,
  every finite value recorded (the rule of OLMo-core's and Levanter's
  skip-step optimizers, and of ``skip_on_spike`` before it changed);
* ``og.skip_on_spike``: this library's guard.

All runs of one guard and one regime (seeds x fault rates) are one ``vmap``-ed
``lax.scan``; under ``vmap`` the guards' ``lax.cond`` is a select, which
changes the cost, not the results. CPU only: about two minutes with the
defaults on two cores (``--seeds 2`` doubles it, ``--steps 1000`` is a smoke
test that is too short for memorization to make the lag visible).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og

KINDS = ("NaN", "inf", "x1e30", "x1e4")  # fault codes 1..4


class MeanStdState(NamedTuple):
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


def _fault_codes(config: Config, seed: int, rate: float) -> np.ndarray:
  rng = np.random.default_rng(1000 + seed)
  code = np.zeros(config.steps, np.int32)
  n = int(round(rate * config.steps))
  # no fault in the first window: the guards only test spikes after min_history
  hit = rng.choice(np.arange(config.window, config.steps), n, replace=False)
  code[hit] = np.arange(n) % len(KINDS) + 1
  return code


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


def _inject(g, code):
  """NaN / +inf in one element, or every element x1e30 / x1e4 (code 0: unchanged)."""
  bad = jnp.array([0.0, jnp.nan, jnp.inf, 0.0, 0.0])[code]
  scale = jnp.array([1.0, 1.0, 1.0, 1e30, 1e4])[code]
  g = jax.tree.map(lambda x: x * scale, g)
  first = jnp.where((code == 1) | (code == 2), bad, g["w1"][0, 0])
  return {**g, "w1": g["w1"].at[0, 0].set(first)}


def _run(guard: str, multi_epoch: bool, config: Config, rates: tuple[float, ...]):
  """Skipped flags, fault codes and losses, shape ``(len(rates) * seeds, steps)``."""
  tx = GUARDS[guard](
      optax.chain(optax.clip_by_global_norm(1.0), optax.adam(config.learning_rate)),
      sigma=config.sigma, window=config.window, min_history=config.min_history,
  )
  lanes = [(rate, seed) for rate in rates for seed in range(config.seeds)]
  codes = np.stack([_fault_codes(config, seed, rate) for rate, seed in lanes])
  keys = jnp.stack([jax.random.PRNGKey(seed) for _, seed in lanes])
  shape = (config.batches, config.batch_size)

  def one(key, code):
    k_teacher, k_x, k_y, k_params, k_stream = jax.random.split(key, 5)
    teacher = jax.random.normal(k_teacher, (config.dim, config.classes))
    xs = jax.random.normal(k_x, (*shape, config.dim))
    ys = _labels(xs, teacher, k_y, config)
    params = _init_params(k_params, config)

    def batch(t):
      if multi_epoch:
        return xs[t % config.batches], ys[t % config.batches]
      k1, k2 = jax.random.split(jax.random.fold_in(k_stream, t))
      x = jax.random.normal(k1, (config.batch_size, config.dim))
      return x, _labels(x, teacher, k2, config)

    def step(carry, inp):
      p, s = carry
      t, c = inp
      loss, g = jax.value_and_grad(_loss)(p, *batch(t))
      u, s = tx.update(_inject(g, c), s, p, value=loss)
      return (optax.apply_updates(p, u), s), (s.last_skipped, loss)

    _, (skipped, loss) = jax.lax.scan(
        step, (params, tx.init(params)), (jnp.arange(config.steps), code)
    )
    return skipped, loss

  skipped, loss = jax.jit(jax.vmap(one))(keys, jnp.asarray(codes))
  return np.asarray(skipped), codes, np.asarray(loss), lanes


def measure(config: Config | None = None) -> list[dict[str, Any]]:
  """One row per (regime, fault rate, guard): false skips and detected faults."""
  config = config or Config()
  rows = []
  rates = (0.0, config.fault_rate)
  for regime in ("multi-epoch", "single-epoch"):
    for guard in GUARDS:
      skipped, codes, loss, lanes = _run(guard, regime == "multi-epoch", config, rates)
      for rate in rates:
        idx = [i for i, (r, _) in enumerate(lanes) if r == rate]
        s, c = skipped[idx], codes[idx]
        healthy = c == 0
        false = s & healthy
        row = {"regime": regime, "faults": f"{100 * rate:g}%", "guard": guard,
               "runs": len(idx), "false skips": int(false.sum()),
               "per 1k healthy steps": 1000.0 * false.sum() / healthy.sum(),
               "max per run": int(false.sum(axis=1).max()),
               "final loss": float(loss[idx, -config.batches:].mean())}
        # false skips that hit a batch already skipped on its previous visit
        if regime == "multi-epoch":
          prev = np.zeros_like(s)
          prev[:, config.batches:] = s[:, :-config.batches]
          row["repeat visits"] = int((false & prev).sum())
        for k, name in enumerate(KINDS, start=1):
          hit = c == k
          row[name] = f"{int((s & hit).sum())}/{int(hit.sum())}" if hit.any() else "-"
        rows.append(row)
  return rows


def table(rows: list[dict[str, Any]]) -> str:
  cols = ["regime", "faults", "guard", "runs", "false skips", "per 1k healthy steps",
          "max per run", "repeat visits", *KINDS, "final loss"]

  def fmt(v):
    return f"{v:.2f}" if isinstance(v, float) else str(v)

  cells = [[fmt(r.get(c, "-")) for c in cols] for r in rows]
  widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
  line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths, strict=True)) + " |"
  out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  return "\n".join(out + [line(x) for x in cells])


def main(argv: list[str] | None = None) -> int:
  defaults = Config()
  parser = argparse.ArgumentParser(prog="python -m benchmarks.false_skips",
                                   description=__doc__.split("\n\n")[0])
  for field in Config._fields:
    default = getattr(defaults, field)
    parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
  config = Config(**vars(parser.parse_args(argv)))
  jax.config.update("jax_platforms", "cpu")
  start = time.perf_counter()
  rows = measure(config)
  print(f"{config}\n")
  print(table(rows))
  print(f"\n{time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
