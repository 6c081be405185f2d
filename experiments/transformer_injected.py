"""INJECTED faults: corrupted batches spike a transformer LM's loss; the guards absorb them.

This experiment corrupts data on purpose; it is a test of the guards'
mechanics, not evidence about natural instabilities (for those see
``transformer_lr_sweep``). Its rows say "injected" in their setting and count
the corrupted steps in ``injected_faults``.

Claim tested: when rare batches are broken (as a faulty data pipeline would
produce), the optimizer step they cause is the damage; a guard that skips
steps whose gradient norm (or loss) is a statistical outlier, ``skip_on_spike``,
keeps the model that clean batches trained, and the adaptive clippers bound
the step. Followed: the practice reported by Chowdhery et al. 2022 (PaLM:
restarting before a spike and skipping the few hundred batches around it), and
the spike rule of OLMo-style trainers (skip a step whose gradient norm is more
than ``sigma`` standard deviations above the recent mean). What we changed:
instead of waiting for a natural spike, we corrupt a known set of batches
(every ``glitch_every`` steps from ``glitch_every/2``, none in the last 10% of
training: each sequence becomes one token repeated), so every defence sees
the same faults at the same steps; the model is the 2-layer transformer of
``experiments._transformer`` on the Markov-chain language.

Training: Adam at a high peak learning rate, ``og.warmup`` +
``og.inverse_sqrt_decay``, in the Flax NNX split/merge pattern (a graphdef
and a params tree) with the step written as ``og.update_and_apply(tx, grads,
opt_state, params, value=loss)``: the same result as ``tx.update`` +
``optax.apply_updates``, and the fused step whenever a guard is outermost
(here it is not: every optimizer starts with ``og.monitor()``, so every row
takes the same unfused path and the rows stay comparable). Every optimizer
starts with ``og.monitor()``;
every ``og.guard_stats`` entry is kept as a per-step curve (CSV columns
``monitor/global_norm``, ``zclip/threshold``, ``skip_on_spike/num_skipped``,
...). A *spike* is a step whose loss is more than ``spike_ratio`` times the
median of the 20 steps before it. The table's metric is the loss of the final
weights on 256 held-out clean sequences.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

import optax_guard as og
from experiments import _common as C
from experiments import _transformer as T

NAME = "transformer_injected"


@dataclasses.dataclass(frozen=True)
class Config(T.LMConfig):
  """Sizes of the injected-fault experiment (defaults: the suite's default run).

  Adam's learning rate warms up to ``peak_lr`` over ``warmup_steps``, then
  decays as one over the square root of the step; every ``glitch_every``
  steps a batch is corrupted; a loss above ``spike_ratio`` times the median of
  the 20 steps before is a spike. The other sizes: ``_transformer.LMConfig``.
  """

  steps: int = 240
  warmup_steps: int = 40
  peak_lr: float = 0.03
  spike_ratio: float = 1.5
  glitch_every: int = 40
  defences: tuple[str, ...] = ("none", "clip_global", "zclip", "autoclip", "skip_on_spike")

  @classmethod
  def quick(cls) -> Config:
    return cls(steps=160, defences=("none", "skip_on_spike"))

  @classmethod
  def full(cls) -> Config:
    return cls(steps=1000, seeds=3, glitch_every=100)


def _schedule(c: Config):
  return og.warmup(og.inverse_sqrt_decay(c.peak_lr, timescale=c.warmup_steps), c.warmup_steps)


def _adam(c: Config) -> optax.GradientTransformation:
  return optax.adam(_schedule(c))


DEFENCES: dict[str, Callable[[Config], Any]] = {
    "none": lambda c: optax.chain(og.monitor(), _adam(c)),
    "clip_global": lambda c: optax.chain(og.monitor(), og.clip_by_global_norm(c.clip_norm),
                                         _adam(c)),
    "zclip": lambda c: optax.chain(og.monitor(), og.zclip(), _adam(c)),
    "autoclip": lambda c: optax.chain(og.monitor(), og.autoclip(10.0), _adam(c)),
    "skip_on_spike": lambda c: optax.chain(
        og.monitor(), og.skip_on_spike(_adam(c), sigma=4.0, window=64, min_history=32)),
    "zclip+skip_on_spike": lambda c: optax.chain(
        og.monitor(), og.zclip(), og.skip_on_spike(_adam(c), sigma=4.0, window=64,
                                                   min_history=32)),
}


def glitch_steps(config: Config) -> np.ndarray:
  """Steps whose batch is corrupted (``[]`` when ``glitch_every`` is 0)."""
  if config.glitch_every <= 0:
    return np.zeros(0, np.int64)
  steps = np.arange(config.glitch_every // 2, config.steps, config.glitch_every)
  return steps[steps < config.steps - config.steps // 10]


def corrupt(rng: np.random.Generator, seq: np.ndarray, vocab: int) -> np.ndarray:
  """Each sequence of ``seq [..., length]`` becomes one random token repeated."""
  return np.broadcast_to(rng.integers(0, vocab, seq.shape[:-1])[..., None], seq.shape).copy()


def count_spikes(loss: np.ndarray, ratio: float, window: int = 20) -> np.ndarray:
  """Per row: steps whose loss is above ``ratio`` x the median of the previous ``window``."""
  out = []
  for row in np.atleast_2d(loss):
    n = 0
    for t in range(window, row.shape[0]):
      ref = np.median(row[t - window:t])
      if np.isfinite(row[t]) and np.isfinite(ref) and row[t] > ratio * ref:
        n += 1
    out.append(n)
  return np.asarray(out)


def data(config: Config) -> tuple[np.ndarray, np.ndarray]:
  """Batches ``[steps, seeds, batch, length + 1]`` with the glitches, and clean val data."""
  train, val = T.data(config)
  glitches = glitch_steps(config)
  train[glitches] = corrupt(np.random.default_rng(5), train[glitches], config.vocab)
  return train, val


def _train(config: Config, make_tx: Callable, train, val, bar) -> dict[str, Any]:
  graphdef, params = T.init_models(config, range(config.seeds))
  tx = optax.with_extra_args_support(make_tx(config))

  def one(params, opt_state, tokens):
    (loss, diag), grads = jax.value_and_grad(
        lambda p: T.lm_loss(graphdef, p, tokens), has_aux=True)(params)
    # tx.update + optax.apply_updates in one call (fused into a guard's lax.cond
    # when the guard is outermost; here og.monitor() comes first in every row)
    params, opt_state = og.update_and_apply(tx, grads, opt_state, params, value=loss)
    return params, opt_state, loss, C.guard_curves(opt_state)

  def step(carry, inputs):
    params, opt_state = carry
    params, opt_state, loss, stats = jax.vmap(one)(params, opt_state, inputs[1])
    return (params, opt_state), (loss, stats)

  opt_state = jax.jit(jax.vmap(tx.init))(params)
  (params, _), (loss, stats) = C.scan_loop(step, (params, opt_state), config.steps, xs=train,
                                           bar=bar)
  return T.outputs(loss, stats, T.val_losses(graphdef, params, val))


def run(config: Config = Config(), *, guards: Sequence[str] | None = None,
        progress: bool | None = None) -> C.ExperimentResult:
  """Trains the LM once per defence (all seeds together); one row per defence."""
  names = C.select(list(DEFENCES) if guards else list(config.defences), guards)
  glitches = glitch_steps(config)
  train, val = data(config)
  setting = f"INJECTED: {len(glitches)} corrupted batches, peak lr {config.peak_lr:g}"
  runs = []
  with C.Progress(len(names) * config.steps, NAME, progress) as bar, C.Timer() as total:
    outs = C.train_all(lambda name: _train(config, DEFENCES[name], train, val, bar), names, bar)
    for name, (out, wall) in zip(names, outs, strict=True):
      spikes = count_spikes(out["loss"], config.spike_ratio)
      r = C.Run(setting=setting, defence=name, loss=out["loss"], grad_norm=out["grad_norm"],
                skipped=out["skipped"], wall_s=wall, extra=out["curves"],
                metrics={"val_loss": out["val_loss"].tolist(), "spikes": spikes.tolist()},
                injected_faults=len(glitches))
      r.note = r.nan_note() or f"loss spikes {np.mean(spikes):g}"
      runs.append(r)
  return T.result(
      NAME,
      (f"INJECTED faults: transformer LM ({config.layers} layers, width {config.width}), "
       f"Adam to peak lr {config.peak_lr:g}, {len(glitches)} corrupted batches, "
       f"median of {config.seeds} seeds"),
      config, runs,
      checks={**T.loss_checks(config), "glitch_steps": glitches.tolist()},
      wall_s=total.s)
