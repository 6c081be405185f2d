"""INJECTED faults: corrupted batches spike a transformer LM's loss; clips bound them, guards skip.

This experiment corrupts data on purpose; it is a test of the defences'
mechanics, not evidence about natural instabilities (for those see
``transformer_lr_sweep``). Its rows say "injected" in their setting and count
the corrupted steps in ``injected_faults``.

Claim tested: when rare batches are broken (as a faulty data pipeline would
produce), the optimizer step they cause is the damage. Two kinds of faults,
each for the defence that exists for it:

* *corrupted batches* (every ``glitch_every`` steps from ``glitch_every/2``):
  each sequence becomes one token repeated, which spikes the gradient norm a
  few times (2.6-4.5x). A clip bounds that step: global clipping, ZClip,
  AutoClip. ``skip_on_spike`` leaves such a moderate outlier alone by design
  (its ratio floor: a hard batch must not be skipped on every visit) and
  expects a clip inside it.
* *x1e4 faults* (every ``fault_every`` steps): a corrupted batch whose
  gradient also arrives ``fault_scale`` (1e4) times too large, as after a
  lost loss-scale division or a broken kernel. Clipping cannot repair it: the
  clipped step is still a full-size step in a garbage direction (and without
  a clip Adam takes the x1e4 gradient into both of its moments, after which
  the run does not recover). ``skip_on_spike`` skips it whole.

None falls in the last 10% of training. The guard around a clip, as the
decision guide recommends (``skip_on_spike(chain(zclip(), adam))``), meets
both. Followed: the practice reported by Chowdhery et al. 2022 (PaLM:
restarting before a spike and skipping the few hundred batches around it),
and the spike rule of OLMo-style trainers (skip a step whose gradient norm is
an outlier of the recent ones). What we changed: instead of waiting for a
natural spike, we corrupt a known set of batches, so every defence sees the
same faults at the same steps; the model is the 2-layer transformer of
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
weights on 256 held-out clean sequences; each row's note counts the loss
spikes and, for a guard, the x1e4 faults and the other steps it skipped.
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
  steps a batch is corrupted, and every ``fault_every`` steps (0: never) a
  corrupted batch's gradient is multiplied by ``fault_scale``; a loss above
  ``spike_ratio`` times the median of the 20 steps before is a spike. The
  other sizes: ``_transformer.LMConfig``.
  """

  steps: int = 240
  warmup_steps: int = 40
  peak_lr: float = 0.03
  spike_ratio: float = 1.5
  glitch_every: int = 40
  fault_every: int = 80
  fault_scale: float = 1e4
  defences: tuple[str, ...] = ("none", "clip_global", "zclip", "autoclip", "skip_on_spike",
                               "skip_on_spike+zclip")

  @classmethod
  def quick(cls) -> Config:
    return cls(steps=160, defences=("none", "skip_on_spike"))

  @classmethod
  def full(cls) -> Config:
    return cls(steps=1000, seeds=3, glitch_every=100, fault_every=200)


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
    # the guard around a clip (a clip before the guard would hide the spikes from it)
    "skip_on_spike+zclip": lambda c: optax.chain(
        og.monitor(), og.skip_on_spike(optax.chain(og.zclip(), _adam(c)), sigma=4.0, window=64,
                                       min_history=32)),
}


def _every(config: Config, start: int, every: int) -> np.ndarray:
  """``start, start + every, ...`` before the last 10% of training (``[]`` for ``every <= 0``)."""
  if every <= 0:
    return np.zeros(0, np.int64)
  steps = np.arange(start, config.steps, every)
  return steps[steps < config.steps - config.steps // 10]


def glitch_steps(config: Config) -> np.ndarray:
  """Steps whose batch is corrupted (``[]`` when ``glitch_every`` is 0)."""
  return _every(config, config.glitch_every // 2, config.glitch_every)


def fault_steps(config: Config) -> np.ndarray:
  """Steps whose batch is corrupted and its gradient multiplied by ``fault_scale``.

  Every ``fault_every`` steps from ``fault_every``, leaving out the glitch
  steps (``[]`` when ``fault_every`` is 0 or ``fault_scale`` is 1).
  """
  if config.fault_scale == 1:
    return np.zeros(0, np.int64)
  steps = _every(config, config.fault_every, config.fault_every)
  return np.setdiff1d(steps, glitch_steps(config))


def _times(scale: float) -> str:
  """``"x1e4"`` for 1e4, ``"x30"`` for 30."""
  return "x" + (f"{scale:.0e}".replace("e+0", "e").replace("e+", "e") if scale >= 1e3
                else f"{scale:g}")


def grad_factors(config: Config) -> np.ndarray:
  """``[steps]`` float32: ``fault_scale`` on the fault steps, 1 elsewhere."""
  factors = np.ones(config.steps, np.float32)
  factors[fault_steps(config)] = config.fault_scale
  return factors


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
  """Batches ``[steps, seeds, batch, length + 1]`` with the glitches and the fault
  steps corrupted, and clean val data."""
  train, val = T.data(config)
  glitches = glitch_steps(config)
  train[glitches] = corrupt(np.random.default_rng(5), train[glitches], config.vocab)
  faults = fault_steps(config)
  train[faults] = corrupt(np.random.default_rng(6), train[faults], config.vocab)
  return train, val


def skips(curves: dict[str, np.ndarray], faults: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per run, ``(x1e4 faults skipped, other steps skipped)`` by the guard (zeros without one).

  Read from ``skip_on_spike/last_skipped`` (``[runs, steps]``).
  """
  flags = curves.get("skip_on_spike/last_skipped")
  if flags is None:
    zeros = np.zeros(len(next(iter(curves.values()))), np.int64)
    return zeros, zeros
  flags = np.nan_to_num(np.asarray(flags)) > 0.5
  on_faults = flags[:, faults].sum(axis=1)
  return on_faults, flags.sum(axis=1) - on_faults


def _train(config: Config, make_tx: Callable, train, val, bar) -> dict[str, Any]:
  graphdef, params = T.init_models(config, range(config.seeds))
  tx = optax.with_extra_args_support(make_tx(config))

  def one(params, opt_state, tokens, factor):
    (loss, diag), grads = jax.value_and_grad(
        lambda p: T.lm_loss(graphdef, p, tokens), has_aux=True)(params)
    grads = jax.tree.map(lambda g: g * factor, grads)  # x fault_scale on a fault step
    # tx.update + optax.apply_updates in one call (fused into a guard's lax.cond
    # when the guard is outermost; here og.monitor() comes first in every row)
    params, opt_state = og.update_and_apply(tx, grads, opt_state, params, value=loss)
    return params, opt_state, loss, C.guard_curves(opt_state)

  def step(carry, inputs):
    params, opt_state = carry
    tokens, factor = inputs[1]
    params, opt_state, loss, stats = jax.vmap(one, in_axes=(0, 0, 0, None))(
        params, opt_state, tokens, factor)
    return (params, opt_state), (loss, stats)

  opt_state = jax.jit(jax.vmap(tx.init))(params)
  xs = (train, grad_factors(config))
  (params, _), (loss, stats) = C.scan_loop(step, (params, opt_state), config.steps, xs=xs,
                                           bar=bar)
  return T.outputs(loss, stats, T.val_losses(graphdef, params, val))


def setting(config: Config) -> str:
  """The setting of every row: ``"INJECTED: 5 corrupted batches + 2 x1e4, peak lr 0.03"``."""
  return (f"INJECTED: {len(glitch_steps(config))} corrupted batches + "
          f"{len(fault_steps(config))} {_times(config.fault_scale)}, peak lr {config.peak_lr:g}")


def run(config: Config = Config(), *, guards: Sequence[str] | None = None,
        progress: bool | None = None) -> C.ExperimentResult:
  """Trains the LM once per defence (all seeds together); one row per defence."""
  names = C.select(list(DEFENCES) if guards else list(config.defences), guards)
  glitches, faults = glitch_steps(config), fault_steps(config)
  train, val = data(config)
  scale = _times(config.fault_scale)
  runs = []
  with C.Progress(len(names) * config.steps, NAME, progress) as bar, C.Timer() as total:
    outs = C.train_all(lambda name: _train(config, DEFENCES[name], train, val, bar), names, bar)
    for name, (out, wall) in zip(names, outs, strict=True):
      spikes = count_spikes(out["loss"], config.spike_ratio)
      on_faults, others = skips(out["curves"], faults)
      r = C.Run(setting=setting(config), defence=name, loss=out["loss"], grad_norm=out["grad_norm"],
                skipped=out["skipped"], wall_s=wall, extra=out["curves"],
                metrics={"val_loss": out["val_loss"].tolist(), "spikes": spikes.tolist(),
                         "faults_skipped": on_faults.tolist(),
                         "other_skipped": others.tolist()},
                injected_faults=len(glitches) + len(faults))
      note = f"loss spikes {np.mean(spikes):g}"
      if "skip_on_spike/last_skipped" in out["curves"]:
        note += (f"; skipped {np.mean(on_faults):g} of {len(faults)} {scale} faults, "
                 f"{np.mean(others):g} other steps")
      r.note = r.nan_note() or note
      runs.append(r)
  return T.result(
      NAME,
      (f"INJECTED faults: transformer LM ({config.layers} layers, width {config.width}), "
       f"Adam to peak lr {config.peak_lr:g}, {len(glitches)} corrupted batches and "
       f"{len(faults)} corrupted {scale}, median of {config.seeds} seeds"),
      config, runs,
      checks={**T.loss_checks(config), "glitch_steps": glitches.tolist(),
              "fault_steps": faults.tolist()},
      wall_s=total.s)
