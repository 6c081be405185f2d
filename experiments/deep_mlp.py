"""A 32-layer ReLU MLP with a too-large initialisation: NaN without defences.

Synthetic classification: 10 Gaussian clusters in 32 dimensions (class means
``N(0, I)``, unit noise), 4096 training and 2048 test examples; plain SGD
(learning rate 0.05) on minibatches of 128.

The model is a Flax ``linen`` MLP of ``depth`` ReLU layers of ``width`` units
whose weights start at ``N(0, gain**2 / fan_in)`` with ``gain = 1.6``; He
initialisation is ``gain = sqrt(2)``, so every layer multiplies the activation
variance by ``1.6**2 / 2 = 1.28`` and the logits start ``~1.28**16 = 52`` times
too large (initial loss 20 to 300 and gradient norm 300 to 4000, depending on
the seed). The first SGD step throws the weights so far that the loss at step 1
is 1e6 to 1e26 and NaN from step 2 on. Each defence changes one thing (two for the combinations):

* ``clip_global`` / ``agc``: ``og.clip_by_global_norm`` / ``og.adaptive_grad_clip``;
* ``skip_nonfinite``: ``og.skip_nonfinite`` alone (it cannot undo the first,
  finite, step that did the damage: shown for honesty);
* ``he_init`` / ``xavier_init``: the right initialisation instead of the bad one;
* ``batchnorm``: the bad initialisation with ``BatchNorm`` after every layer;
* ``l2_penalty``: ``og.add_l2_penalty`` alone (too weak against the first
  step), then with clipping (``clip+l2_penalty``);
* ``warmup+inv_sqrt``: ``og.warmup(og.inverse_sqrt_decay(...))`` learning rate;
  ``exp_decay``: an ``og.exponential_decay`` learning rate alone (it starts at
  the same rate, so it cannot prevent a blow-up at step 1: shown for honesty);
* ``clip+plateau`` (not run by default; ``--guards clip+plateau``): clipping
  then ``og.reduce_on_plateau`` fed the loss as ``value=``. The feedback
  learning rate is shown on the adding problem, where the loss does plateau.

Seeds train together under ``vmap`` in one compiled ``lax.scan`` per defence.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og
from experiments import _common as C

NAME = "deep_mlp"


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of the deep-MLP experiment (defaults: the suite's default run)."""

  steps: int = 400
  seeds: int = 3
  depth: int = 32
  width: int = 64
  inputs: int = 32
  classes: int = 10
  train_size: int = 4096
  test_size: int = 2048
  batch: int = 128
  learning_rate: float = 0.05
  init_gain: float = 1.6
  clip_norm: float = 1.0
  l2_weight: float = 1e-3
  warmup_steps: int = 100
  defences: tuple[str, ...] = (
      "none", "clip_global", "agc", "skip_nonfinite", "he_init", "xavier_init", "batchnorm",
      "l2_penalty", "clip+l2_penalty", "warmup+inv_sqrt", "exp_decay")

  @classmethod
  def quick(cls) -> Config:
    return cls(steps=250, defences=(
        "none", "clip_global", "he_init", "batchnorm", "clip+l2_penalty", "warmup+inv_sqrt"))


@dataclasses.dataclass(frozen=True)
class Defence:
  needs: tuple[str, ...]
  make_tx: Callable[[Config], optax.GradientTransformation]
  init: str = "bad"  # "bad", "he" or "xavier"
  batchnorm: bool = False


def _sgd(config: Config) -> optax.GradientTransformation:
  return optax.sgd(config.learning_rate)


def _clip(config: Config) -> optax.GradientTransformation:
  return og.clip_by_global_norm(config.clip_norm)


def _exp_decay(config: Config):
  return og.exponential_decay(config.learning_rate, max(config.steps // 8, 1), 0.5)


DEFENCES: dict[str, Defence] = {
    "none": Defence((), _sgd),
    "clip_global": Defence(("clip_by_global_norm",), lambda c: optax.chain(_clip(c), _sgd(c))),
    "agc": Defence(("adaptive_grad_clip",),
                   lambda c: optax.chain(og.adaptive_grad_clip(0.05), _sgd(c))),
    "skip_nonfinite": Defence(("skip_nonfinite",), lambda c: og.skip_nonfinite(_sgd(c))),
    "he_init": Defence((), _sgd, init="he"),
    "xavier_init": Defence((), _sgd, init="xavier"),
    "batchnorm": Defence((), _sgd, batchnorm=True),
    "l2_penalty": Defence(("add_l2_penalty",), lambda c: optax.chain(
        og.add_l2_penalty(c.l2_weight), _sgd(c))),
    "clip+l2_penalty": Defence(("clip_by_global_norm", "add_l2_penalty"), lambda c: optax.chain(
        _clip(c), og.add_l2_penalty(c.l2_weight), _sgd(c))),
    "warmup+inv_sqrt": Defence(("warmup", "inverse_sqrt_decay"), lambda c: optax.sgd(
        og.warmup(og.inverse_sqrt_decay(c.learning_rate, timescale=c.warmup_steps),
                  c.warmup_steps))),
    "exp_decay": Defence(("exponential_decay",), lambda c: optax.sgd(_exp_decay(c))),
    "clip+exp_decay": Defence(("clip_by_global_norm", "exponential_decay"), lambda c: optax.chain(
        _clip(c), optax.sgd(_exp_decay(c)))),
    "clip+plateau": Defence(("clip_by_global_norm", "reduce_on_plateau"), lambda c: optax.chain(
        _clip(c), _sgd(c), og.reduce_on_plateau(factor=0.5, patience=max(c.steps // 8, 1),
                                                cooldown=max(c.steps // 20, 0)))),
}


def _kernel_std(kind: str, gain: float, fan_in: int, fan_out: int) -> float:
  """He ``sqrt(2/fan_in)``, Xavier ``sqrt(2/(fan_in+fan_out))``, bad ``gain/sqrt(fan_in)``."""
  if kind == "he":
    return math.sqrt(2.0 / fan_in)
  if kind == "xavier":
    return math.sqrt(2.0 / (fan_in + fan_out))
  return gain / math.sqrt(fan_in)


def _kernel_init(kind: str, gain: float):
  """The Flax initialiser with the same distribution as ``_kernel_std``."""
  if kind == "he":
    return nn.initializers.variance_scaling(2.0, "fan_in", "normal")
  if kind == "xavier":
    return nn.initializers.variance_scaling(1.0, "fan_avg", "normal")
  return nn.initializers.variance_scaling(gain ** 2, "fan_in", "normal")


class Block(nn.Module):
  """Dense -> [BatchNorm] -> ReLU, written for ``nn.scan`` over the depth."""

  width: int
  init_kind: str
  gain: float
  batchnorm: bool
  train: bool

  @nn.compact
  def __call__(self, x: jax.Array, _) -> tuple[jax.Array, None]:
    x = nn.Dense(self.width, kernel_init=_kernel_init(self.init_kind, self.gain))(x)
    if self.batchnorm:
      x = nn.BatchNorm(use_running_average=not self.train, momentum=0.9)(x)
    return nn.relu(x), None


class MLP(nn.Module):
  """Dense input layer, ``depth - 1`` scanned hidden blocks, Dense read-out.

  Hidden blocks are stacked with ``nn.scan`` (one compiled layer body instead
  of ``depth``); the kernels have shape ``[depth - 1, width, width]``.
  """

  depth: int
  width: int
  classes: int
  init_kind: str = "bad"
  gain: float = 1.6
  batchnorm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x, _ = Block(self.width, self.init_kind, self.gain, self.batchnorm, train)(x, None)
    blocks = nn.scan(Block, variable_axes={"params": 0, "batch_stats": 0},
                     split_rngs={"params": True}, length=self.depth - 1)
    x, _ = blocks(self.width, self.init_kind, self.gain, self.batchnorm, train)(x, None)
    return nn.Dense(self.classes, kernel_init=_kernel_init(self.init_kind, self.gain))(x)


@functools.cache
def make_data(inputs: int, classes: int, train_size: int, test_size: int):
  """``(x_train, y_train), (x_test, y_test)``: Gaussian clusters around random means."""
  rng = np.random.default_rng(1234)
  means = rng.standard_normal((classes, inputs))
  y = rng.integers(0, classes, train_size + test_size)
  x = (means[y] + rng.standard_normal((train_size + test_size, inputs))).astype(np.float32)
  return (x[:train_size], y[:train_size]), (x[train_size:], y[train_size:])


def init_variables(model: MLP, inputs: int, seed: int) -> dict[str, Any]:
  """Kernels ``N(0, s**2)`` with ``s`` from the model's ``init_kind`` (see ``_kernel_std``)."""
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, inputs)))

  def std(name, shape):
    return _kernel_std(model.init_kind, model.gain, shape[-2], shape[-1])

  return C.numpy_init(abstract, seed, std)


def _train(config: Config, defence: Defence, bar) -> dict[str, Any]:
  model = MLP(config.depth, config.width, config.classes, defence.init, config.init_gain,
              defence.batchnorm)
  tx = optax.with_extra_args_support(defence.make_tx(config))
  (x_train, y_train), (x_test, y_test) = make_data(
      config.inputs, config.classes, config.train_size, config.test_size)
  variables = C.stack([init_variables(model, config.inputs, s) for s in range(config.seeds)])
  params, stats = variables["params"], variables.get("batch_stats", {})
  # minibatch indices [steps, seeds, batch], the same for every defence
  idx = np.random.default_rng(99).integers(0, config.train_size,
                                           (config.steps, config.seeds, config.batch))

  def one(params, stats, opt_state, x, y):
    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new.get("batch_stats", {})

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    guard = og.guard_stats(opt_state) if hasattr(og, "guard_stats") else {}
    scale = C.stat(guard, "reduce_on_plateau/scale", 1.0)
    return (optax.apply_updates(params, updates), stats, opt_state, loss,
            optax.tree.norm(grads), C.skipped_count(opt_state), scale)

  def step(carry, inputs):
    params, stats, opt_state, (x_all, y_all) = carry
    batch = inputs[1]
    params, stats, opt_state, loss, gnorm, skipped, scale = jax.vmap(one)(
        params, stats, opt_state, x_all[batch], y_all[batch])
    return (params, stats, opt_state, (x_all, y_all)), (loss, gnorm, skipped, scale)

  opt_state = jax.jit(jax.vmap(tx.init))(params)
  carry = (params, stats, opt_state, (x_train, y_train))
  (params, stats, _, _), (loss, gnorm, skipped, scale) = C.scan_loop(
      step, carry, config.steps, xs=idx, bar=bar)

  @jax.jit
  @functools.partial(jax.vmap, in_axes=(0, 0, None, None))
  def accuracy(params, stats, x, y):
    logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
    return jnp.mean(jnp.argmax(logits, -1) == y)

  acc = np.asarray(accuracy(params, stats, x_test, y_test))
  return {"loss": loss.T, "grad_norm": gnorm.T, "skipped": skipped[-1], "accuracy": acc,
          "lr_scale": scale.T}


def run(config: Config = Config(), *, guards: Sequence[str] | None = None,
        progress: bool | None = None) -> C.ExperimentResult:
  """Trains the MLP once per defence (all seeds together); one row per defence."""
  names = C.select(list(DEFENCES) if guards else list(config.defences), guards)
  notes, todo, runs = [], [], []
  for name in names:
    lacking = C.missing(*DEFENCES[name].needs)
    if lacking:
      notes.append(f"{name}: skipped, optax_guard lacks {', '.join(lacking)}")
    else:
      todo.append(name)
  setting = f"depth {config.depth} gain {config.init_gain:g} lr {config.learning_rate:g}"
  bar = C.progress(len(todo) * C.num_chunks(config.steps), NAME, progress)
  with C.Timer() as total:
    for name in todo:
      with C.Timer() as timer:
        out = _train(config, DEFENCES[name], bar)
      r = C.Run(setting=setting, defence=name, loss=out["loss"], grad_norm=out["grad_norm"],
                skipped=out["skipped"], metrics={"test_acc": out["accuracy"].tolist()},
                wall_s=timer.s)
      if name.endswith("plateau"):
        r.extra["lr_scale"] = out["lr_scale"]
        r.note = f"final lr scale {float(np.mean(out['lr_scale'][:, -1])):g}"
      bad = r.first_nonfinite_step()
      if any(b is not None for b in bad):
        r.note = "NaN at step " + ",".join("-" if b is None else str(b) for b in bad)
      runs.append(r)
  bar.close()
  chance = 1.0 / config.classes
  _, (_, y_test) = make_data(config.inputs, config.classes, config.train_size,
                             config.test_size)
  majority = float(np.max(np.bincount(np.asarray(y_test), minlength=config.classes)) /
                   config.test_size)
  return C.ExperimentResult(
      name=NAME,
      title=(f"Deep MLP ({config.depth} ReLU layers x {config.width}, init gain "
             f"{config.init_gain:g} vs He {math.sqrt(2):.3g}), SGD lr {config.learning_rate:g}, "
             f"median of {config.seeds} seeds"),
      config=dataclasses.asdict(config), runs=runs, metric="test_acc", metric_label="test acc",
      notes=notes, checks={"chance_accuracy": chance, "majority_class_accuracy": majority},
      wall_s=total.s)
