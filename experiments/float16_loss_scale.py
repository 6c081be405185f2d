"""float16 training: small gradients underflow to 0 without a loss scale; a dynamic one trains.

Claim tested (Micikevicius et al. 2018, "Mixed Precision Training"): when the
backward pass runs in float16, gradients below float16's smallest subnormal
(``2**-24``, about ``6e-8``) become 0, and a loss averaged over many outputs
makes every output's gradient small (``2 r / N`` for a squared error over
``N`` outputs); training stalls where the residuals make it underflow.
Scaling the loss (PyTorch's ``GradScaler``: ``og.dynamic_loss_scale``, the
loss multiplied by ``og.loss_scale(opt_state)``) lifts the backward pass into
range, and float16 training follows the float32 run down to the rounding
floor of float16 predictions.

Setup: a linear model with float32 master weights that computes in float16
(inputs and weights cast to float16, as ``torch.autocast``), 32 inputs and
256 outputs, fit by the mean squared error to a float32 linear teacher whose
outputs are of size ``target_scale`` (0.02); a fresh Gaussian batch of 256
inputs every step, so the loss averages 65,536 outputs and an output's
gradient is ``r / 32768``: it underflows once the residual ``r`` is under
about ``1e-3``. Adam with a cosine decay of the learning rate from zero
weights. Rows: ``float32`` (the same model computing in float32), ``none``
(float16, no scale), ``dynamic_loss_scale`` (float16, PyTorch's defaults:
initial scale ``2**16``, factors 2 and 0.5) and
``dynamic_loss_scale_high_init`` (an initial scale of ``2**30``, which
overflows float16 and shows the back-off). The table's metric is the mean
squared error of the final weights on 1,024 held-out inputs, computed as the
model computes (in float16 for the float16 rows); the check
``float16_rounding_floor`` is that error for the teacher itself rounded to
float16, the best a float16 model can reach. Per-step curves: every
``og.guard_stats`` entry (``dynamic_loss_scale/scale``, ...) and
``zero_gradients``, the fraction of gradient entries that are exactly 0;
``grad_norm`` is the norm of the unscaled gradient the optimizer receives.

What we changed from the paper: a linear model and synthetic data instead of
the paper's networks (a small problem where the underflow is the only
difference between the rows, so it runs in seconds on a CPU); the outputs are
small and the loss averages many of them to bring the gradients down to
float16's limit within a short run; ``growth_interval`` is 50 instead of
PyTorch's 2,000, so that the scale's growth shows in 300 steps.
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

NAME = "float16_loss_scale"


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of the float16 experiment (defaults: the suite's default run)."""

  steps: int = 300
  seeds: int = 2
  batch: int = 256
  inputs: int = 32
  outputs: int = 256
  target_scale: float = 0.02
  learning_rate: float = 5e-4
  growth_interval: int = 50
  high_init_scale: float = 2.0**30
  val_size: int = 1024
  defences: tuple[str, ...] = ("float32", "none", "dynamic_loss_scale",
                               "dynamic_loss_scale_high_init")

  @classmethod
  def quick(cls) -> Config:
    return cls(steps=150, seeds=1)

  @classmethod
  def full(cls) -> Config:
    return cls(steps=1000, seeds=5)


@dataclasses.dataclass(frozen=True)
class Defence:
  """``dtype`` of the model's computation; ``make_tx(config, lr)``; ``scaled``: the loss is
  multiplied by ``og.loss_scale``."""

  dtype: Any
  make_tx: Callable[[Config, Any], optax.GradientTransformation]
  scaled: bool = False


DEFENCES: dict[str, Defence] = {
    "float32": Defence(jnp.float32, lambda c, lr: optax.adam(lr)),
    "none": Defence(jnp.float16, lambda c, lr: optax.adam(lr)),
    "dynamic_loss_scale": Defence(
        jnp.float16,
        lambda c, lr: og.dynamic_loss_scale(optax.adam(lr), growth_interval=c.growth_interval),
        scaled=True),
    "dynamic_loss_scale_high_init": Defence(
        jnp.float16,
        lambda c, lr: og.dynamic_loss_scale(optax.adam(lr), init_scale=c.high_init_scale,
                                            growth_interval=c.growth_interval),
        scaled=True),
}


def teacher(config: Config) -> jax.Array:
  """The float32 teacher ``[inputs, outputs]``: outputs of size ``target_scale``."""
  rng = np.random.default_rng(1234)
  w = rng.standard_normal((config.inputs, config.outputs)) * config.target_scale
  return jnp.asarray(w / np.sqrt(config.inputs), jnp.float32)


def predict(w: jax.Array, x: jax.Array, dtype: Any) -> jax.Array:
  """``x @ w`` computed in ``dtype`` (the weights are float32 masters), as float32."""
  return (x.astype(dtype) @ w.astype(dtype)).astype(jnp.float32)


def _inputs(seed: jax.Array, t: jax.Array, config: Config) -> jax.Array:
  key = jax.random.fold_in(jax.random.PRNGKey(seed), t)
  return jax.random.normal(key, (config.batch, config.inputs))


def _val_inputs(config: Config) -> jax.Array:
  return jax.random.normal(jax.random.PRNGKey(10_000), (config.val_size, config.inputs))


def _train(config: Config, defence: Defence, bar) -> dict[str, Any]:
  w_star = teacher(config)
  tx = defence.make_tx(config, optax.cosine_decay_schedule(config.learning_rate, config.steps))

  def one(w, opt_state, seed, t):
    x = _inputs(seed, t, config)
    y = x @ w_star
    scale = og.loss_scale(opt_state) if defence.scaled else jnp.float32(1)

    def scaled_loss(w):
      loss = jnp.mean((predict(w, x, defence.dtype) - y) ** 2)
      return loss * scale, loss

    grads, loss = jax.grad(scaled_loss, has_aux=True)(w)
    w, opt_state = og.update_and_apply(tx, grads, opt_state, w)
    zero = jnp.mean(grads == 0)
    return w, opt_state, loss, optax.tree.norm(grads) / scale, zero, C.guard_curves(opt_state)

  def step(carry, inputs):
    w, opt_state = carry
    t = inputs[0]
    w, opt_state, loss, gnorm, zero, curves = jax.vmap(one, in_axes=(0, 0, 0, None))(
        w, opt_state, jnp.arange(config.seeds), t)
    return (w, opt_state), (loss, gnorm, zero, curves)

  w = jnp.zeros((config.seeds, config.inputs, config.outputs), jnp.float32)
  carry = (w, jax.jit(jax.vmap(tx.init))(w))
  (w, _), (loss, gnorm, zero, curves) = C.scan_loop(step, carry, config.steps, bar=bar)
  x_val = _val_inputs(config)
  val = jax.jit(jax.vmap(
      lambda w: jnp.mean((predict(w, x_val, defence.dtype) - x_val @ w_star) ** 2)))(w)
  curves = {k: np.asarray(v, np.float64).T for k, v in curves.items()}
  curves["zero_gradients"] = np.asarray(zero, np.float64).T
  skipped = C.skipped_from_curves(curves)
  return {"loss": loss.T, "grad_norm": gnorm.T, "val": np.asarray(val, np.float64),
          "curves": curves,
          "skipped": np.zeros(config.seeds, np.int64) if skipped is None else skipped}


def _note(config: Config, name: str, out: dict[str, Any]) -> str:
  """What the row's table cell says: underflowed gradients, or the scale reached."""
  tail = max(1, config.steps // 10)
  zero = float(np.mean(out["curves"]["zero_gradients"][:, -tail:]))
  parts = []
  if DEFENCES[name].dtype == jnp.float16:
    parts.append(f"{100 * zero:.0f}% of gradient entries 0 in the last 10% of steps")
  scales = out["curves"].get("dynamic_loss_scale/scale")
  if scales is not None:
    parts.append(f"scale {np.min(scales):.3g} to {np.max(scales):.3g}, "
                 f"final {np.median(scales[:, -1]):.3g}")
  return "; ".join(parts)


def run(config: Config = Config(), *, guards: Sequence[str] | None = None,
        progress: bool | None = None) -> C.ExperimentResult:
  """Trains the model once per row (all seeds together)."""
  names = C.select(list(DEFENCES) if guards else list(config.defences), guards)
  setting = (f"{config.batch} x {config.outputs} outputs of size {config.target_scale:g}, "
             f"Adam lr {config.learning_rate:g} cosine")
  runs = []
  with C.Progress(len(names) * config.steps, NAME, progress) as bar, C.Timer() as total:
    outs = C.train_all(lambda name: _train(config, DEFENCES[name], bar), names, bar)
    for name, (out, wall) in zip(names, outs, strict=True):
      r = C.Run(setting=setting, defence=name, loss=out["loss"], grad_norm=out["grad_norm"],
                skipped=out["skipped"], metrics={"val_mse": out["val"].tolist()},
                wall_s=wall, extra=out["curves"], note=_note(config, name, out))
      r.note = r.nan_note() or r.note
      runs.append(r)
  w_star, x_val = teacher(config), _val_inputs(config)
  floor = float(jnp.mean((predict(w_star, x_val, jnp.float16) - x_val @ w_star) ** 2))
  return C.ExperimentResult(
      name=NAME,
      title=(f"float16 linear model ({config.inputs} -> {config.outputs}, float32 master "
             f"weights), MSE over {config.batch * config.outputs:,} outputs per step, "
             f"{config.steps} steps, median of {config.seeds} seeds"),
      config=dataclasses.asdict(config), runs=runs, metric="val_mse",
      metric_label="held-out MSE",
      checks={"float16_rounding_floor": floor,
              "outputs_per_loss": config.batch * config.outputs,
              "float16_smallest_subnormal": 2.0**-24},
      wall_s=total.s)
