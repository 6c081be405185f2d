"""Learning-rate sensitivity of a small transformer LM: a natural instability, no injected faults.

Claim tested: sweeping the learning rate upward, a small transformer without
qk-layernorm stops training well at high rates (attention logits grow until
the softmax saturates, the loss stalls or diverges), as Wortsman et al. 2023
("Small-scale proxies for large-scale Transformer training instabilities")
show at small scale; qk-layernorm (their architectural fix) moves the failure
to higher rates. The question asked of each optimizer-side defence is whether
it widens the range of learning rates that train (their "LR sensitivity"
figure: final loss against learning rate). Nothing is corrupted: every batch
is clean data, and whatever goes wrong comes from the optimization itself.

Followed from the paper: pre-LayerNorm decoder-only transformer without
qk-layernorm (the baseline) and with it (the reference); Adam with
``b1 = 0.9, b2 = 0.95, eps = 1e-8``; linear warm-up then decay; a learning rate
grid of factors of ~3; the final loss of each run; the largest attention logit
as the diagnostic of attention-logit growth and the mean ``log Z`` of the
output softmax as the diagnostic of output-logit divergence, both logged at
every step (CSV columns ``max_attn_logit`` and ``log_z``).

What we changed, to fit a CPU budget: 2 layers of width 32 (the paper's
smallest models are ~10M parameters) trained for a few hundred steps on
sequences of a synthetic second-order Markov chain instead of C4 (the best
possible loss, from the chain's entropy rate, is printed as a check); no weight decay and no
z-loss; the decay is linear to 0 (the paper: cosine); the learning rates run
up to 1 (small models fail only at higher rates, as the paper finds).

Defences, each in front of the same Adam (``og.monitor()`` first in every
chain, so the raw gradient norm is in ``guard_stats``): ``none``,
``clip_global`` (``og.clip_by_global_norm(1)``), ``zclip`` (``og.zclip()``),
``autoclip`` (``og.autoclip(10)``), ``skip_on_spike`` (``og.skip_on_spike(adam,
sigma=6)`` fed the loss as ``value=``), ``qk_layernorm`` (no optimizer
defence: LayerNorm on queries and keys), ``qk_clip`` (``og.qk_clip(tau)`` after
Adam: Kimi K2's QK-clip of the fused q|k|v kernels, fed every head's largest
logit of the step as ``attn_max_logits=``), ``qk_layernorm+qk_clip`` (the
clip on the qk-LayerNorms' scales and biases, which the heads share) and
``warmup_100`` (no defence, a 100-step warm-up instead of 30: the
schedule-side reference), ``per_tensor_rates`` (learning rates per tensor:
the embeddings at the peak rate, every other tensor at ``other_rate_factor``
(0.1) of it, a masked ``optax.scale`` between ``optax.scale_by_adam`` and the
learning rate), ``per_tensor_rates+qk_clip`` (the same with ``og.qk_clip(tau)``
after it, wired as in ``qk_clip``), and the optimizers of large-scale training at the
same ``b1, b2, eps`` and schedule, without weight decay: ``stable_adamw``
(``og.stable_adamw``), ``spam`` (``og.spam``, defaults: threshold 5000, no
reset within 300 steps) and ``adagc`` (``og.adagc()`` in front of Adam, its
defaults: a global clip at 1 for 100 steps, then per tensor). These three run
the learning rates ``short_rates`` only (0.03, 0.1, 0.3: the last rate that
trains for every defence and the two where they start to fail), to keep the
default run in its time budget. ``tau = 10`` (``Config.qk_clip_threshold``) sits
under the largest logits of the healthy runs without qk-layernorm (15-27 at
learning rates up to 0.03) and above those of qk-layernorm (5-8), so the clip
binds as soon as the logits start to grow. The per-tensor rows come from a
diagnosis of the failure per tensor, which the experiment measures itself:
for ``diagnosed`` defences every step logs, per tensor kind (embeddings, the
qkv layers, the other linear layers, the head, the LayerNorms), the norm of
the parameters and the update's norm relative to it (CSV columns
``tensor_norm/<kind>`` and ``update_ratio/<kind>``); :func:`diagnose` sums
them up (the checks, and a third table). The embeddings start at ``N(0, 1)``,
the kernels at ``N(0, 1/fan_in)``, so Adam's steps of about the learning rate
per element are several times smaller relative to the embeddings than to the
kernels. The table's metric is the loss
of the final weights on 256 held-out sequences; one row per (learning rate,
defence). All learning rates and seeds of a defence train together in one
compiled, ``vmap``-ed ``lax.scan``.

A run *fails* when a seed diverged or its mean validation loss is more than
``fail_margin`` (10%) above a fixed reference: the best mean validation loss
of ``none`` and ``qk_layernorm`` over the sweep. A good new defence
therefore never makes another one fail. Runs at learning rates of 0.1 and
above are chaotic: the same seeds of ``none`` at 0.1 end anywhere between
1.9 and 2.3 from one software version (or batch composition) to the next.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og
from experiments import _common as C
from experiments import _transformer as T

NAME = "transformer_lr_sweep"


@dataclasses.dataclass(frozen=True)
class Config(T.LMConfig):
  """Sizes of the learning-rate sweep (defaults: the suite's default run)."""

  steps: int = 300
  batch: int = 16
  learning_rates: tuple[float, ...] = (1e-2, 3e-2, 0.1, 0.3, 1.0)
  fail_margin: float = 0.1
  qk_clip_threshold: float = 10.0
  long_warmup_steps: int = 100
  # the per-tensor rows: every tensor but the embeddings at this fraction of the peak rate
  other_rate_factor: float = 0.1
  # the rows of the table; add a defence to DEFENCES and its name here
  defences: tuple[str, ...] = ("none", "clip_global", "zclip", "autoclip", "skip_on_spike",
                               "qk_layernorm", "qk_clip", "qk_layernorm+qk_clip", "warmup_100",
                               "per_tensor_rates", "per_tensor_rates+qk_clip",
                               "stable_adamw", "spam", "adagc")
  # defences whose parameter norm and update size per tensor kind are logged every step
  diagnosed: tuple[str, ...] = ("none", "qk_clip", "per_tensor_rates",
                                "per_tensor_rates+qk_clip")
  # defences trained at ``short_rates`` only (fewer learning rates, a shorter run)
  short_defences: tuple[str, ...] = ("stable_adamw", "spam", "adagc")
  short_rates: tuple[float, ...] = (3e-2, 0.1, 0.3)

  @classmethod
  def quick(cls) -> Config:
    return cls(learning_rates=(1e-2, 0.1, 1.0), steps=150, batch=8,
               defences=("none", "clip_global", "qk_layernorm"))

  @classmethod
  def full(cls) -> Config:
    return cls(learning_rates=(1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0), steps=600, seeds=3,
               warmup_steps=60, short_defences=())


def unit_schedule(config: Config) -> optax.Schedule:
  """Linear warm-up from 0 to 1, then linear decay to 0 at the last step."""
  return og.warmup(og.linear_decay(1.0, max(config.steps - config.warmup_steps, 1)),
                   config.warmup_steps)


def _rate(config: Config, lr) -> optax.Schedule:
  unit = unit_schedule(config)
  return lambda t: lr * unit(t)


def _adam(config: Config, lr) -> optax.GradientTransformation:
  return optax.adam(_rate(config, lr), b1=0.9, b2=0.95, eps=1e-8)


def is_embedding(path: Sequence[Any]) -> bool:
  """Whether a ``jax.tree.map_with_path`` key path names an embedding table."""
  return "embedding" in C.path_name(path)


def _per_tensor_adam(config: Config, lr) -> optax.GradientTransformation:
  """Adam whose step is ``other_rate_factor`` times smaller on every tensor but the embeddings.

  The factor sits between ``scale_by_adam`` and the learning rate, so it scales
  the schedule per tensor: the embeddings at the peak rate, the rest at a tenth.
  """
  return optax.chain(optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
                     optax.masked(optax.scale(config.other_rate_factor), _not_embeddings),
                     optax.scale_by_learning_rate(_rate(config, lr)))


def _not_embeddings(params: Any) -> Any:
  """True for every leaf but the embedding tables (the mask of the smaller rate)."""
  return jax.tree.map_with_path(lambda path, _: not is_embedding(path), params)


# The tensor kinds of the per-tensor diagnosis, in its table's order: key -> label.
KINDS = {"embeddings": "embeddings (token, position)", "qkv": "qkv (kernels, biases)",
         "linear": "proj, fc1, fc2 (kernels, biases)", "head": "head (kernel, bias)",
         "layernorm": "LayerNorm (scales, biases)"}


def tensor_kind(path: Sequence[Any]) -> str:
  """The :data:`KINDS` key of a parameter's key path (a linear layer's bias goes with it)."""
  parts = C.path_name(path).removesuffix("/value").split("/")
  if parts[-1] == "embedding":
    return "embeddings"
  module = parts[-2] if len(parts) > 1 else ""
  if parts[0] == "head":
    return "head"
  if module.startswith("ln") or module.endswith("_norm"):
    return "layernorm"
  return "qkv" if module == "qkv" else "linear"


def tensor_stats(params: Any, updates: Any) -> dict[str, jax.Array]:
  """Per tensor kind: ``tensor_norm/<kind>``, the parameters' norm before the step, and
  ``update_ratio/<kind>``, the update's norm over it (every tensor of the kind as one vector)."""
  squares: dict[str, list[jax.Array]] = {}
  for (path, p), u in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(updates),
                          strict=True):
    sums = squares.setdefault(tensor_kind(path), [jnp.float32(0), jnp.float32(0)])
    sums[0] = sums[0] + jnp.sum(jnp.square(p.astype(jnp.float32)))
    sums[1] = sums[1] + jnp.sum(jnp.square(u.astype(jnp.float32)))
  out = {}
  for kind, (p2, u2) in squares.items():
    out[f"tensor_norm/{kind}"] = jnp.sqrt(p2)
    out[f"update_ratio/{kind}"] = jnp.sqrt(u2 / p2)
  return out


def rates(config: Config, name: str) -> tuple[float, ...]:
  """The learning rates a defence is trained at (``short_rates`` for ``short_defences``)."""
  return config.short_rates if name in config.short_defences else config.learning_rates


def _qk_clip(config: Config, qk_norm: bool) -> optax.GradientTransformation:
  """QK-clip of every block: the fused q|k|v kernel, or the qk-LayerNorms the heads share."""
  if qk_norm:  # the LayerNorm undoes any scaling of the projection: clip the norms
    layouts = [og.qk_separate(f"blocks/{i}/q_norm", f"blocks/{i}/k_norm", head_axis=None)
               for i in range(config.layers)]
  else:
    layouts = [og.qk_fused(f"blocks/{i}/qkv") for i in range(config.layers)]
  return og.qk_clip(config.qk_clip_threshold, layouts)


DEFENCES: dict[str, tuple[bool, Callable[[Config, Any], Any]]] = {
    # name -> (qk-layernorm in the model, (config, lr) -> optimizer)
    "none": (False, lambda c, lr: optax.chain(og.monitor(), _adam(c, lr))),
    "clip_global": (False, lambda c, lr: optax.chain(
        og.monitor(), og.clip_by_global_norm(c.clip_norm), _adam(c, lr))),
    "zclip": (False, lambda c, lr: optax.chain(og.monitor(), og.zclip(), _adam(c, lr))),
    "autoclip": (False, lambda c, lr: optax.chain(og.monitor(), og.autoclip(10.0),
                                                  _adam(c, lr))),
    "skip_on_spike": (False, lambda c, lr: optax.chain(
        og.monitor(), og.skip_on_spike(_adam(c, lr), sigma=6.0))),
    "qk_layernorm": (True, lambda c, lr: optax.chain(og.monitor(), _adam(c, lr))),
    "qk_layernorm+clip_global": (True, lambda c, lr: optax.chain(
        og.monitor(), og.clip_by_global_norm(c.clip_norm), _adam(c, lr))),
    "qk_clip": (False, lambda c, lr: optax.chain(og.monitor(), _adam(c, lr),
                                                 _qk_clip(c, False))),
    "qk_layernorm+qk_clip": (True, lambda c, lr: optax.chain(og.monitor(), _adam(c, lr),
                                                             _qk_clip(c, True))),
    "warmup_100": (False, lambda c, lr: optax.chain(
        og.monitor(), _adam(dataclasses.replace(c, warmup_steps=c.long_warmup_steps), lr))),
    "per_tensor_rates": (False, lambda c, lr: optax.chain(og.monitor(), _per_tensor_adam(c, lr))),
    "per_tensor_rates+qk_clip": (False, lambda c, lr: optax.chain(
        og.monitor(), _per_tensor_adam(c, lr), _qk_clip(c, False))),
    "stable_adamw": (False, lambda c, lr: optax.chain(og.monitor(), og.stable_adamw(
        _rate(c, lr), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0))),
    "spam": (False, lambda c, lr: optax.chain(og.monitor(), og.spam(
        _rate(c, lr), b1=0.9, b2=0.95, eps=1e-8))),
    "adagc": (False, lambda c, lr: optax.chain(og.monitor(), og.adagc(), _adam(c, lr))),
}
# The fixed reference of the failure criterion: the best of these rows.
REFERENCE = ("none", "qk_layernorm")


def _train(config: Config, name: str, train, val, bar) -> dict[str, Any]:
  qk_norm, make_tx = DEFENCES[name]
  diagnosed = name in config.diagnosed
  lrs = np.repeat(np.asarray(rates(config, name), np.float32), config.seeds)
  seeds = np.tile(np.arange(config.seeds), len(rates(config, name)))
  graphdef, params = T.init_models(config, seeds, qk_norm)

  def tx(lr):
    return optax.with_extra_args_support(make_tx(config, lr))

  def one(lr, params, opt_state, tokens):
    (loss, diag), grads = jax.value_and_grad(
        lambda p: T.lm_loss(graphdef, p, tokens), has_aux=True)(params)
    maxima = diag.pop("attn_max_logits")  # [layers, heads], for og.qk_clip
    updates, opt_state = tx(lr).update(grads, opt_state, params, value=loss,
                                       attn_max_logits=list(maxima))
    curves = {**C.guard_curves(opt_state), **diag}
    if diagnosed:
      curves.update(tensor_stats(params, updates))
    return optax.apply_updates(params, updates), opt_state, loss, curves

  def step(carry, inputs):
    params, opt_state = carry
    params, opt_state, loss, curves = jax.vmap(one)(lrs, params, opt_state, inputs[1][seeds])
    return (params, opt_state), (loss, curves)

  opt_state = jax.jit(jax.vmap(lambda lr, p: tx(lr).init(p)))(lrs, params)
  (params, _), (loss, curves) = C.scan_loop(
      step, (params, opt_state), config.steps, xs=train, bar=bar,
      stop=lambda carry: C.all_nonfinite(carry[0]))
  return T.outputs(loss, curves, T.val_losses(graphdef, params, val))


def reference_loss(runs: Sequence[C.Run]) -> float:
  """The best mean validation loss of the reference rows (``REFERENCE``) over the sweep.

  Fixed by those rows alone, so adding a defence never moves it. Without any
  finite reference run, the best finite run of the sweep.
  """
  finite = [r for r in runs if np.isfinite(r.metrics["val_loss"]).all()]
  ref = [r for r in finite if r.defence in REFERENCE] or finite
  return min(float(np.mean(r.metrics["val_loss"])) for r in ref)


def failing_lr(runs: Sequence[C.Run], defence: str, margin: float) -> float | None:
  """The smallest learning rate from which on every run of ``defence`` fails.

  A run *fails* when a seed diverged or its mean validation loss is more than
  ``margin`` (relative) above :func:`reference_loss` (the best of ``none`` and
  ``qk_layernorm``). None when the defence trains at every learning rate of
  the sweep.
  """
  best = reference_loss(runs)
  rows = sorted((lr_of(r), r) for r in runs if r.defence == defence)
  fails = [run_fails(r, best, margin) for _, r in rows]
  for i, (lr, _) in enumerate(rows):
    if all(fails[i:]):
      return lr
  return None


def run_fails(run: C.Run, best: float, margin: float) -> bool:
  """A seed diverged, or the mean validation loss is more than ``margin`` above ``best``."""
  return (bool(run.diverged().any()) or not np.isfinite(run.metrics["val_loss"]).all()
          or float(np.mean(run.metrics["val_loss"])) > (1 + margin) * best)


def lr_of(run: C.Run) -> float:
  return float(run.setting.split("lr=")[1])


def usable_rates(runs: Sequence[C.Run], defence: str, margin: float) -> list[list[float]]:
  """The learning rates at which ``defence`` trains (no :func:`run_fails`), as runs of
  neighbouring rates of its sweep: ``[[0.1, 0.3, 1.0]]``, ``[[0.03], [0.3]]``, ``[]``."""
  best = reference_loss(runs)
  groups: list[list[float]] = [[]]
  for lr, r in sorted((lr_of(r), r) for r in runs if r.defence == defence):
    if run_fails(r, best, margin):
      groups.append([])
    else:
      groups[-1].append(lr)
  return [g for g in groups if g]


def rate_range(runs: Sequence[C.Run], defence: str, margin: float) -> str:
  """:func:`usable_rates` as text: ``"0.1-1"``, ``"0.03, 0.3"``, ``"no rate"``."""
  parts = [f"{g[0]:g}" if len(g) == 1 else f"{g[0]:g}-{g[-1]:g}"
           for g in usable_rates(runs, defence, margin)]
  return ", ".join(parts) or "no rate"


def run(config: Config = Config(), *, guards: Sequence[str] | None = None,
        progress: bool | None = None) -> C.ExperimentResult:
  """Trains every defence at every learning rate; one row per (lr, defence)."""
  names = C.select(list(DEFENCES) if guards else list(config.defences), guards)
  train_data, val = T.data(config)
  per: dict[str, list[C.Run]] = {}
  with C.Progress(len(names) * config.steps, NAME, progress) as bar, C.Timer() as total:
    outs = C.train_all(lambda name: _train(config, name, train_data, val, bar), names, bar)
    for name, (out, wall) in zip(names, outs, strict=True):
      per[name] = []
      for i, lr in enumerate(rates(config, name)):
        sl = slice(i * config.seeds, (i + 1) * config.seeds)
        curves = {k: v[sl] for k, v in out["curves"].items()}
        r = C.Run(setting=f"lr={lr:g}", defence=name, loss=out["loss"][sl],
                  grad_norm=out["grad_norm"][sl], skipped=out["skipped"][sl],
                  wall_s=wall / len(rates(config, name)), extra=curves,
                  metrics={"val_loss": out["val_loss"][sl].tolist(),
                           "max_attn_logit": np.nanmax(curves["max_attn_logit"], axis=1).tolist()})
        r.note = r.nan_note() or f"max attn logit {np.nanmax(curves['max_attn_logit']):.3g}"
        per[name].append(r)
  every_rate = sorted({lr for name in names for lr in rates(config, name)})
  runs = [r for lr in every_rate for name in names for r in per[name] if lr_of(r) == lr]
  checks: dict[str, Any] = T.loss_checks(config)
  checks["reference val loss (best of none, qk_layernorm)"] = round(reference_loss(runs), 4)
  if "qk_clip" in names or "qk_layernorm+qk_clip" in names:
    checks["qk_clip threshold"] = config.qk_clip_threshold
  for name in names:
    lr = failing_lr(runs, name, config.fail_margin)
    checks[f"{name}: fails from lr"] = "never (in the sweep)" if lr is None else lr
  d = diagnose(runs, dataclasses.asdict(config))
  for name, ratio in d["step_per_lr"].items():
    checks[f"{name}: update/parameter norm per unit lr, steps 1-10"] = _rounded(ratio)
  for (name, lr), growth in d["growth"].items():
    checks[f"{name} at lr {lr:g}: norm / initial norm at step {config.warmup_steps}"] = (
        _rounded(growth))
    checks[f"{name} at lr {lr:g}: first step with an attention logit > {LOGIT_LIMIT:g}"] = (
        d["logit_step"][(name, lr)])
  return T.result(
      NAME,
      (f"Transformer LM ({config.layers} layers, width {config.width}), Adam, "
       f"{config.steps} steps: final loss vs peak learning rate, {config.seeds} seeds"),
      config, runs,
      notes=[f"fails: a seed diverged or the mean val loss is > {config.fail_margin:.0%} above "
             "the best of none and qk_layernorm, at this and every higher learning rate"],
      checks=checks, wall_s=total.s, plot=plot, table=table)


# The runs the per-tensor diagnosis compares, (defence, learning rate), where trained.
DIAGNOSIS = (("none", 0.03), ("none", 0.3), ("per_tensor_rates", 0.3),
             ("per_tensor_rates+qk_clip", 1.0))
LOGIT_LIMIT = 100.0


def _cell(runs: Sequence[C.Run], name: str, lr: float) -> C.Run | None:
  return next((r for r in runs if r.defence == name and math.isclose(lr_of(r), lr)), None)


def diagnose(runs: Sequence[C.Run], config: dict[str, Any]) -> dict[str, Any]:
  """Per tensor kind, from the runs that log ``tensor_norm/*`` and ``update_ratio/*``.

  Returns ``{"initial": {kind: norm}, "step_per_lr": {defence: {kind: x}},
  "growth": {(defence, lr): {kind: x}}, "logit_step": {(defence, lr): [step per seed]}}``:
  the parameters' initial norm (mean over seeds); the update's norm relative to
  the parameters' divided by the learning rate of the step (so a number of the
  optimizer, not of the schedule), mean over steps 1-10 at the defence's
  smallest learning rate; the norm at the peak of the schedule over the initial
  norm, for each run of :data:`DIAGNOSIS`; and the first step whose largest
  attention logit exceeds :data:`LOGIT_LIMIT` (None: never).
  """
  peak = int(config["warmup_steps"])
  unit = unit_schedule(Config(steps=int(config["steps"]), warmup_steps=peak))
  logged = [r for r in runs if any(k.startswith("tensor_norm/") for k in r.extra)]
  out: dict[str, Any] = {"initial": {}, "step_per_lr": {}, "growth": {}, "logit_step": {}}
  if logged:  # every defence starts from the same parameters
    out["initial"] = {k: float(np.mean(logged[0].extra[f"tensor_norm/{k}"][:, 0])) for k in KINDS}
  for name in dict.fromkeys(r.defence for r in logged):
    lr = min(lr_of(r) for r in logged if r.defence == name)
    r = _cell(logged, name, lr)
    t = np.arange(1, 11)
    lr_t = lr * np.asarray([float(unit(int(i))) for i in t])
    out["step_per_lr"][name] = {
        k: float(np.mean(r.extra[f"update_ratio/{k}"][:, t] / lr_t)) for k in KINDS}
  for name, lr in DIAGNOSIS:
    r = _cell(logged, name, lr)
    if r is None or r.steps <= peak:
      continue
    out["growth"][(name, lr)] = {
        k: float(np.mean(r.extra[f"tensor_norm/{k}"][:, peak] / r.extra[f"tensor_norm/{k}"][:, 0]))
        for k in KINDS}
    above = r.extra["max_attn_logit"] > LOGIT_LIMIT
    out["logit_step"][(name, lr)] = [int(np.argmax(a)) if a.any() else None for a in above]
  return out


def diagnosis_table(result: C.ExperimentResult) -> str:
  """The per-tensor diagnosis (:func:`diagnose`) as a Markdown table and a sentence."""
  d = diagnose(result.runs, result.config)
  if not d["growth"]:
    return ""
  peak = result.config["warmup_steps"]
  names = [n for n in d["step_per_lr"] if n in ("none", "per_tensor_rates")]
  head = ["tensor kind", "initial norm", *(f"relative step per unit lr, `{n}`" for n in names),
          *(f"norm x at step {peak}, `{n}` {lr:g}" for n, lr in d["growth"])]
  rows = [[label, f"{d['initial'][k]:.1f}", *(f"{d['step_per_lr'][n][k]:.2f}" for n in names),
           *(f"{g[k]:.2f}" for g in d["growth"].values())] for k, label in KINDS.items()]

  def when(steps):
    return " and ".join("never" if s is None else str(s) for s in steps)

  logits = "; ".join(f"`{n}` at {lr:g}: {when(s)}" for (n, lr), s in d["logit_step"].items())
  return "\n\n".join([
      f"Per tensor kind (the kinds' tensors as one vector, mean over seeds): the initial norm; "
      f"the update's norm relative to the parameters' per unit of learning rate (steps 1-10, "
      f"at the defence's smallest rate); the norm at the peak of the schedule (step {peak}) "
      f"over the initial norm:",
      C.markdown_table(head, rows),
      f"First step whose largest attention logit exceeds {LOGIT_LIMIT:g}, per seed: {logits}.",
  ])


def _rounded(by_kind: dict[str, float]) -> dict[str, float]:
  return {k: float(f"{v:.3g}") for k, v in by_kind.items()}


def _logit(x: float) -> str:
  """``727``, ``1.3k``, ``140k``, ``9.9M``."""
  if not np.isfinite(x):
    return "NaN"
  for scale, suffix in ((1e6, "M"), (1e3, "k")):
    if x >= scale:
      return f"{x / scale:.2g}{suffix}" if x < 10 * scale else f"{x / scale:.0f}{suffix}"
  return f"{x:.2g}" if x < 10 else f"{x:.0f}"


def table(result: C.ExperimentResult) -> str:
  """Tables for the documentation, a row per defence and a column per learning rate:
  the mean held-out loss over seeds (a failing run marked "x"; "-": not run; the rates
  at which the defence trains, and from which on it fails) and the largest attention
  logit during training (mean over seeds); then the per-tensor diagnosis."""
  runs = result.runs
  margin = result.config.get("fail_margin", 0.1)
  best = reference_loss(runs)
  defences = list(dict.fromkeys(r.defence for r in runs))
  lrs = sorted({lr_of(r) for r in runs})
  cell = {(r.defence, lr_of(r)): r for r in runs}
  loss_rows, logit_rows = [], []
  for name in defences:
    losses, logits = [f"`{name}`"], [f"`{name}`"]
    for lr in lrs:
      r = cell.get((name, lr))
      if r is None:
        losses.append("-")
        logits.append("-")
        continue
      v = np.asarray(r.metrics["val_loss"], np.float64)
      text = f"{np.mean(v):.3f}" if np.isfinite(v).all() else "NaN"
      losses.append(text + (" x" if run_fails(r, best, margin) else ""))
      logits.append(_logit(float(np.mean(r.metrics["max_attn_logit"]))))
    fail = failing_lr(runs, name, margin)
    losses.append(rate_range(runs, name, margin))
    losses.append("never" if fail is None else f"{fail:g}")
    loss_rows.append(losses)
    logit_rows.append(logits)
  head = [f"lr {lr:g}" for lr in lrs]
  diagnosis = diagnosis_table(result)
  return "\n\n".join([
      f"Held-out loss, mean over seeds; x: the run fails (a seed diverged or the loss is "
      f"more than {margin:.0%} above {best:.3f}, the best of `none` and `qk_layernorm`):",
      C.markdown_table(["defence", *head, "trains at", "fails from"], loss_rows),
      "Largest attention logit during training, mean over seeds:",
      C.markdown_table(["defence", *head], logit_rows),
      *([diagnosis] if diagnosis else []),
  ])


# The figure's panels: final loss against the learning rate, a few defences
# each with `none` as the reference in every one; a defence in no group here
# gets a panel of its own kind ("other defences").
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gradient-side defences", ("clip_global", "zclip", "autoclip", "skip_on_spike")),
    ("attention-side defences and a longer warm-up",
     ("qk_layernorm", "qk_clip", "qk_layernorm+qk_clip", "warmup_100")),
    ("optimizers of large-scale training", ("stable_adamw", "spam", "adagc")),
    ("learning rates per tensor", ("qk_clip", "per_tensor_rates", "per_tensor_rates+qk_clip")),
)
# The defences whose largest attention logit the logit panel shows.
LOGIT_PANEL = ("qk_layernorm", "qk_clip", "qk_layernorm+qk_clip", "warmup_100",
               "per_tensor_rates", "per_tensor_rates+qk_clip")
# The runs whose parameter norms per tensor kind the last panel shows: (defence, lr, style).
NORM_PANEL = (("none", 0.3, "-"), ("per_tensor_rates", 0.3, "--"))


def _panels(defences: Sequence[str]) -> list[tuple[str, list[str]]]:
  """``(title, defences)`` per loss panel, each without ``none`` and not empty."""
  panels, placed = [], {"none"}
  for title, group in PANELS:
    members = [d for d in group if d in defences]
    placed.update(members)
    if members:
      panels.append((title, members))
  rest = [d for d in defences if d not in placed]
  if rest:
    panels.append(("other defences", rest))
  return panels


def _sweep_line(ax, rows: Sequence[tuple[float, C.Run]], key: str, style: dict, label: str):
  """Mean over seeds against the learning rate, with a band from the seeds' min to max."""
  lrs = np.asarray([lr for lr, _ in rows])
  vals = np.asarray([r.metrics[key] for _, r in rows], np.float64)  # [lrs, seeds]
  vals = np.where(np.isfinite(vals), vals, np.nan)
  with np.errstate(invalid="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a learning rate whose seeds are all NaN
    mid, lo, hi = np.nanmean(vals, axis=1), np.nanmin(vals, axis=1), np.nanmax(vals, axis=1)
  ax.plot(lrs, mid, ls=style["ls"], marker=style["marker"], ms=8, color=style["color"],
          zorder=style["zorder"], lw=2.4 if label.startswith("none") else 2.0, label=label)
  ax.fill_between(lrs, lo, hi, color=style["color"], alpha=0.12, lw=0)


def _range_panel(ax, runs: Sequence[C.Run], defences: Sequence[str], margin: float) -> None:
  """A line per defence over the learning rates at which it trains; x where a run fails."""
  best = reference_loss(runs)
  styles = C.series_styles(defences)
  for y, name in enumerate(defences):
    rows = sorted((lr_of(r), run_fails(r, best, margin)) for r in runs if r.defence == name)
    ax.plot([lr for lr, _ in rows], [y] * len(rows), color="0.85", lw=1.0, zorder=1)
    for group in usable_rates(runs, name, margin):
      ax.plot(group, [y] * len(group), color=styles[name]["color"], lw=7,
              solid_capstyle="round", marker="o", ms=9, zorder=2)
    failed = [lr for lr, fails in rows if fails]
    ax.plot(failed, [y] * len(failed), ls="none", marker="x", ms=9, mew=2, color="0.35", zorder=2)
  ax.set_yticks(range(len(defences)), defences)
  ax.set_ylim(len(defences) - 0.5, -0.5)
  ax.set_xscale("log")
  ax.set_xlabel("peak learning rate")
  ax.set_title("learning rates at which each defence trains (x: it fails there)")
  ax.grid(axis="y", visible=False)


def _norm_panel(ax, runs: Sequence[tuple[C.Run, str]], peak: int) -> None:
  """Each tensor kind's parameter norm over its initial norm, per step (mean over seeds)."""
  for i, kind in enumerate(KINDS):
    for r, ls in runs:
      norm = r.extra[f"tensor_norm/{kind}"]
      ax.plot(np.mean(norm / norm[:, :1], axis=0), color=C.PALETTE[i], ls=ls, lw=2.0,
              label=f"{KINDS[kind]}" if ls == runs[0][1] else None)
  ax.axvline(peak, color="0.4", lw=1.5, ls=":")
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
  ax.yaxis.set_minor_formatter(lambda v, _: f"{v:g}" if f"{v:g}".lstrip("0.")[:1] in "25" else "")
  ax.set_xlabel("step (dotted: the peak of the schedule)")
  ax.set_ylabel("parameter norm / initial norm")
  ax.set_title(f"norm per tensor kind, {runs[0][0].setting.replace('=', ' ')}\n" + ", ".join(
      f"{'solid' if ls == '-' else 'dashed'}: {r.defence}" for r, ls in runs))
  ax.legend(loc="upper left", fontsize=10)


@C.styled
def plot(result: C.ExperimentResult, path: str) -> str | None:
  """Small multiples: final held-out loss against the learning rate, a few defences a panel.

  Every panel repeats ``none`` (black, dashed) and the failure line (10% above
  the reference loss); each defence's legend entry says at which learning
  rates it trains. Then the largest attention logit of ``none`` and the
  attention-side defences, with the QK-clip threshold; each tensor kind's
  parameter norm per step (:data:`NORM_PANEL`); and, across the figure, the
  range of learning rates at which each defence trains.
  """
  if not result.runs:
    return None
  defences = list(dict.fromkeys(r.defence for r in result.runs))
  margin = result.config.get("fail_margin", 0.1)
  reference = reference_loss(result.runs)
  panels = _panels(defences)
  logit_names = [d for d in ("none", *LOGIT_PANEL) if d in defences]
  norm_runs = [(r, ls) for name, lr, ls in NORM_PANEL
               if (r := _cell(result.runs, name, lr)) is not None and "tensor_norm/qkv" in r.extra]
  count = len(panels) + 1 + bool(norm_runs)
  rows = math.ceil(count / 2)
  fig, axes = C.figure(rows + 1, 2, row_height=4.6)
  flat = list(axes[:-1].flat)
  for ax in axes[-1]:
    ax.remove()
  _range_panel(fig.add_subplot(axes[0, 0].get_gridspec()[-1, :]), result.runs, defences, margin)

  def rows_of(name):
    return sorted((lr_of(r), r) for r in result.runs if r.defence == name)

  def label(name):
    return f"{name} (trains at {rate_range(result.runs, name, margin)})"

  loss_axes = flat[:len(panels)]
  for ax, (title, members) in zip(loss_axes, panels, strict=True):
    styles = C.series_styles(["none", *members])
    for name in [d for d in ("none", *members) if d in defences]:
      _sweep_line(ax, rows_of(name), "val_loss", styles[name], label(name))
    ax.axhline((1 + margin) * reference, color="0.4", lw=1.5, ls=":")
    ax.annotate(f"fails above ({1 + margin:g} x best)", (1.0, (1 + margin) * reference),
                xycoords=("axes fraction", "data"), xytext=(-4, 4),
                textcoords="offset points", ha="right", va="bottom", color="0.3")
    ax.set_title(title)
    ax.set_ylabel("final held-out loss (nats)")
    ax.legend(loc="upper left")
  for ax in loss_axes[1:]:
    ax.sharey(loss_axes[0])
  ax = flat[len(panels)]
  styles = C.series_styles(logit_names)
  for name in logit_names:
    _sweep_line(ax, rows_of(name), "max_attn_logit", styles[name], name)
  if "qk_clip" in defences or "qk_layernorm+qk_clip" in defences:
    tau = result.config.get("qk_clip_threshold")
    ax.axhline(tau, color="0.4", lw=1.5, ls=":")
    ax.annotate(f"QK-clip threshold {tau:g}", (1.0, tau), xycoords=("axes fraction", "data"),
                xytext=(-4, 4), textcoords="offset points", ha="right", va="bottom",
                color="0.3")
  ax.set_yscale("log")
  ax.set_title("largest attention logit during training")
  ax.set_ylabel("largest attention logit")
  ax.legend(loc="upper left")
  for ax in flat[:len(panels) + 1]:
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
  if norm_runs:
    _norm_panel(flat[len(panels) + 1], norm_runs, result.config["warmup_steps"])
  for ax in flat[count:]:
    ax.set_visible(False)
  C.title(fig, result.title + "; bands: min-max over seeds")
  return C.save_figure(fig, path)
