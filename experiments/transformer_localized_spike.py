"""INJECTED localized spike: a x1e3 gradient spike in one tensor's rows of a transformer LM.

This experiment corrupts gradients on purpose; it tests how each defence
handles a spike *confined to one tensor*, not a natural instability (for that
see ``transformer_lr_sweep``). Its rows say "injected" in their setting and
count the spiked steps in ``injected_faults``.

Claim tested: when a gradient spike is confined to one tensor (here the
token-embedding row of the rarest token, multiplied by ``spike`` for one step
every ``spike_every``), a global clip shrinks the update of every *other*
tensor on that step, which did nothing wrong; AdaGC cuts the spiked tensor
alone and SPAM the spiked elements alone, leaving the other tensors' updates
as they would be; ``skip_on_spike`` drops the whole step. Followed: AdaGC
(Wang et al. 2025: per-tensor clipping against each tensor's own history,
their argument against global clipping), SPAM (Huang et al. 2025: spikes of
single elements up to 1000x the usual gradient), the global clip of
Pascanu et al. 2013 and the skip rule of OLMo-style trainers. What we
changed: the spike is injected into the gradient (as a faulty kernel or a
single outlier example would produce), at known steps, so every defence sees
the same spikes; the model is the 2-layer transformer of
``experiments._transformer`` on the Markov-chain language; AdaGC's warm-up
is 30 steps (the paper: 100 of many thousands) so that most spikes come after
it.

Training: Adam (``b1 = 0.9, b2 = 0.95``) with ``og.warmup`` +
``og.inverse_sqrt_decay`` to ``peak_lr``; ``spam`` is ``og.spam`` with the
same betas, ``eps`` and schedule (its defaults otherwise: threshold 5000, no
moment reset within the run). Measured per step: the norm of the update of
every tensor but the spiked one (``unspiked_update_norm``) and of the spiked
tensor (``spiked_update_norm``). The table's metrics: the loss of the final
weights on 256 held-out clean sequences, and on the spike steps the
unspiked tensors' update norm relative to the step before
(``unspiked_ratio``: 1 means untouched, 0 skipped).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og
from experiments import _common as C
from experiments import _transformer as T

NAME = "transformer_localized_spike"
SPIKED = "['tok']['embedding']"  # the spiked tensor: the token embedding


@dataclasses.dataclass(frozen=True)
class Config(T.LMConfig):
  """Sizes of the localized-spike experiment (defaults: the suite's default run).

  Adam's learning rate warms up to ``peak_lr`` over ``warmup_steps``, then
  decays as one over the square root of the step; from step ``first_spike``
  on, every ``spike_every`` steps the rare token's embedding gradient is
  multiplied by ``spike``; AdaGC clips globally for its first ``adagc_warmup``
  steps. The other sizes: ``_transformer.LMConfig``.
  """

  steps: int = 160
  warmup_steps: int = 20
  peak_lr: float = 0.03
  spike: float = 1e3
  spike_every: int = 20
  first_spike: int = 40
  adagc_warmup: int = 30
  defences: tuple[str, ...] = ("no_spikes", "none", "clip_global", "adagc", "spam", "skip_on_spike")

  @classmethod
  def quick(cls) -> Config:
    return cls(steps=100, first_spike=35, defences=("none", "clip_global", "adagc"))

  @classmethod
  def full(cls) -> Config:
    return cls(steps=1000, seeds=3, spike_every=50, first_spike=150, adagc_warmup=100)


def _schedule(c: Config) -> optax.Schedule:
  return og.warmup(og.inverse_sqrt_decay(c.peak_lr, timescale=c.warmup_steps), c.warmup_steps)


def _adam(c: Config) -> optax.GradientTransformation:
  return optax.adam(_schedule(c), b1=0.9, b2=0.95, eps=1e-8)


DEFENCES: dict[str, Callable[[Config], Any]] = {
    "no_spikes": lambda c: optax.chain(og.monitor(), _adam(c)),  # the reference: no injection
    "none": lambda c: optax.chain(og.monitor(), _adam(c)),
    "clip_global": lambda c: optax.chain(og.monitor(), og.clip_by_global_norm(c.clip_norm),
                                         _adam(c)),
    "adagc": lambda c: optax.chain(og.monitor(), og.adagc(warmup_steps=c.adagc_warmup),
                                   _adam(c)),
    "spam": lambda c: optax.chain(og.monitor(), og.spam(_schedule(c), b1=0.9, b2=0.95,
                                                        eps=1e-8)),
    "skip_on_spike": lambda c: optax.chain(
        og.monitor(), og.skip_on_spike(_adam(c), sigma=4.0, window=64, min_history=32)),
    "stable_adamw": lambda c: optax.chain(og.monitor(), og.stable_adamw(
        _schedule(c), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)),
    "zclip": lambda c: optax.chain(og.monitor(), og.zclip(), _adam(c)),
}


# How the documentation's table names each defence.
LABELS = {
    "no_spikes": "no spikes (reference)",
    "none": "`none`",
    "clip_global": "`clip_by_global_norm(1)`",
    "adagc": "`adagc()`",
    "spam": "`spam(...)`",
    "skip_on_spike": "`skip_on_spike(adam)`",
    "stable_adamw": "`stable_adamw(...)`",
    "zclip": "`zclip()`",
}


def spike_steps(config: Config) -> np.ndarray:
  """Steps whose gradient is spiked (none in the last 10% of training)."""
  steps = np.arange(config.first_spike, config.steps, max(config.spike_every, 1))
  return steps[steps < config.steps - config.steps // 10]


def data(config: Config) -> tuple[np.ndarray, np.ndarray, int]:
  """Batches ``[steps, seeds, batch, length + 1]``, clean val data, the rarest token."""
  train, val = T.data(config)
  counts = np.bincount(train[..., :-1].ravel(), minlength=config.vocab)
  return train, val, int(np.argmin(counts))


def _norm(leaves: Sequence[jax.Array]) -> jax.Array:
  return jnp.sqrt(sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves),
                      jnp.zeros((), jnp.float32)))


def _train(config: Config, make_tx: Callable, train, val, rare: int, bar,
           inject_spikes: bool = True) -> dict[str, Any]:
  graphdef, params = T.init_models(config, range(config.seeds))
  tx = optax.with_extra_args_support(make_tx(config))
  spiked = np.zeros(config.steps, np.float32)
  if inject_spikes:
    spiked[spike_steps(config)] = 1.0

  def inject(grads, on):
    def leaf(path, g):
      if jax.tree_util.keystr(path).startswith(SPIKED):  # [vocab, width]: the rare token's row
        row = jnp.where(on > 0, jnp.float32(config.spike), jnp.float32(1.0))
        return g.at[rare].multiply(row.astype(g.dtype))
      return g
    return jax.tree.map_with_path(leaf, grads)

  def one(params, opt_state, tokens, on):
    (loss, _), grads = jax.value_and_grad(
        lambda p: T.lm_loss(graphdef, p, tokens), has_aux=True)(params)
    updates, opt_state = tx.update(inject(grads, on), opt_state, params, value=loss)
    paths = jax.tree.flatten_with_path(updates)[0]
    curves = {**C.guard_curves(opt_state),
              "unspiked_update_norm": _norm([u for p, u in paths
                                             if not jax.tree_util.keystr(p).startswith(SPIKED)]),
              "spiked_update_norm": _norm([u for p, u in paths
                                           if jax.tree_util.keystr(p).startswith(SPIKED)]),
              "rare_row_update_norm": _norm([u[rare] for p, u in paths
                                             if jax.tree_util.keystr(p).startswith(SPIKED)])}
    return optax.apply_updates(params, updates), opt_state, loss, curves

  def step(carry, inputs):
    params, opt_state = carry
    tokens, on = inputs[1]
    params, opt_state, loss, curves = jax.vmap(one, in_axes=(0, 0, 0, None))(
        params, opt_state, tokens, on)
    return (params, opt_state), (loss, curves)

  opt_state = jax.jit(jax.vmap(tx.init))(params)
  (params, _), (loss, curves) = C.scan_loop(step, (params, opt_state), config.steps,
                                            xs=(train, spiked), bar=bar)
  return T.outputs(loss, curves, T.val_losses(graphdef, params, val))


def update_ratios(curves: dict[str, np.ndarray], steps: np.ndarray,
                  after: int = 10) -> dict[str, np.ndarray]:
  """Per seed, means over the spike ``steps`` of update norms relative to the step before.

  ``unspiked`` and ``spiked``: on the spike step itself; ``rare_row_after``: the
  rare token's row over the ``after`` steps that follow (its second moment still
  holds the spike: below 1 means that row has nearly stopped learning).
  """
  out = {}
  with np.errstate(divide="ignore", invalid="ignore"):
    for key in ("unspiked", "spiked"):
      norms = curves[f"{key}_update_norm"]  # [seeds, steps]
      out[key] = np.mean(norms[:, steps] / norms[:, steps - 1], axis=1)
    row = curves["rare_row_update_norm"]
    later = [np.mean(row[:, s + 1:s + 1 + after], axis=1) / row[:, s - 1] for s in steps
             if s + after < row.shape[1]]
    out["rare_row_after"] = np.mean(later, axis=0) if later else np.full(row.shape[0], np.nan)
  return out


def run(config: Config = Config(), *, guards: Sequence[str] | None = None,
        progress: bool | None = None) -> C.ExperimentResult:
  """Trains the LM once per defence (all seeds together); one row per defence."""
  names = C.select(list(DEFENCES) if guards else list(config.defences), guards)
  spikes = spike_steps(config)
  train, val, rare = data(config)
  setting = f"INJECTED: {len(spikes)} x{config.spike:g} spikes in one embedding row"
  runs = []
  with C.Progress(len(names) * config.steps, NAME, progress) as bar, C.Timer() as total:
    outs = C.train_all(lambda name: _train(config, DEFENCES[name], train, val, rare, bar,
                                           inject_spikes=name != "no_spikes"), names, bar)
    for name, (out, wall) in zip(names, outs, strict=True):
      ratios = update_ratios(out["curves"], spikes)
      r = C.Run(setting=setting, defence=name, loss=out["loss"], grad_norm=out["grad_norm"],
                skipped=out["skipped"], wall_s=wall, extra=out["curves"],
                metrics={"val_loss": out["val_loss"].tolist(),
                         "unspiked_ratio": ratios["unspiked"].tolist(),
                         "spiked_ratio": ratios["spiked"].tolist(),
                         "rare_row_after": ratios["rare_row_after"].tolist()},
                injected_faults=0 if name == "no_spikes" else len(spikes))
      r.note = r.nan_note() or (f"on spike steps: other tensors' update x"
                                f"{np.mean(ratios['unspiked']):.3g}, embedding x"
                                f"{np.mean(ratios['spiked']):.3g}; rare row over the next 10 x"
                                f"{np.mean(ratios['rare_row_after']):.3g}")
      runs.append(r)
  checks: dict[str, Any] = {**T.loss_checks(config, uniform=False),
                            "rare_token": rare, "spike_steps": spikes.tolist()}
  for r in runs:
    if "adagc/num_clipped" in r.extra:  # how often AdaGC clips ordinary steps
      ordinary = np.setdiff1d(np.arange(config.adagc_warmup, config.steps), spikes)
      checks[f"{r.defence}: tensors clipped per ordinary step after its warm-up"] = round(
          float(np.mean(r.extra["adagc/num_clipped"][:, ordinary])), 2)
  return T.result(
      NAME,
      (f"INJECTED localized spike: transformer LM ({config.layers} layers, width "
       f"{config.width}), x{config.spike:g} on the embedding row of the rarest token "
       f"every {config.spike_every} steps, {config.seeds} seeds"),
      config, runs,
      notes=["unspiked_ratio: on spike steps, the update norm of every tensor but the spiked "
             "one over the step before (1: untouched, 0: skipped)"],
      checks=checks, wall_s=total.s, plot=plot, table=table)


@C.styled
def plot(result: C.ExperimentResult, path: str) -> str | None:
  """Per defence, three panels: the other tensors' update on a spike step, the spiked
  row's update after it (both relative to the step before; 1: as before), held-out loss."""
  runs = result.runs
  if not runs:
    return None
  styles = C.series_styles([r.defence for r in runs])
  fig, axes = C.figure(1, 3, row_height=4.2, sharey=True)
  panels = (
      ("unspiked_ratio", "other tensors on a spike step", "update / the step before", 1.0),
      ("rare_row_after", "spiked row, next 10 steps", "update / the step before", 1.0),
      ("val_loss", "held-out loss at the end", "held-out loss (nats)", None),
  )
  for col, (key, panel_title, label, ref) in enumerate(panels):
    ax = axes[0, col]
    C.dot_panel(ax, runs, key, styles, label=label, reference=ref, log=False, names=col == 0)
    ax.set_title(panel_title)
  C.title(fig, result.title + "; ticks: seeds, markers: mean; dotted: 1 = as before")
  return C.save_figure(fig, path)


def table(result: C.ExperimentResult) -> str:
  """For the documentation: per defence the held-out loss, the other tensors' update on
  a spike step and the spiked row's over the next 10 (relative to the step before; 1:
  as before, 0: skipped), and the steps skipped per seed."""
  rows = []
  for r in result.runs:
    m = r.metrics
    skipped = float(np.mean(r.skipped)) if r.skipped.size else 0.0
    rows.append([LABELS.get(r.defence, f"`{r.defence}`"), C.spread(m["val_loss"], decimals=3),
                 f"{np.mean(m['unspiked_ratio']):.2f}", f"{np.mean(m['rare_row_after']):.2f}",
                 f"{skipped:g}" if skipped else "-"])
  return C.markdown_table(["defence", "held-out loss (min-max)",
                           "other tensors' update on a spike step",
                           "spiked row, next 10 steps", "skipped steps"], rows)
