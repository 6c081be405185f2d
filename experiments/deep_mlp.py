"""A 32-layer ReLU MLP with a too-large initialisation on real data (scikit-learn's digits).

Claim tested: an initialisation slightly above He's makes a deep ReLU network's
activations and gradients grow geometrically with depth, so plain SGD at an
ordinary learning rate blows up on its first step (NaN from step 2); each
defence that bounds the first steps (global clipping, AGC, a warm-up, or
normalisation / the right initialisation) lets the same network learn the
task, measured by test accuracy, while defences that only react to NaN or add
a penalty do not. Followed: He et al. 2015 ("Delving deep into rectifiers",
the variance argument behind ``gain = sqrt(2)``), Pascanu et al. 2013 (global
norm clipping), Brock et al. 2021 (AGC, for networks without normalisation),
Ioffe & Szegedy 2015 (BatchNorm), Goyal et al. 2017 (learning-rate warm-up).

Data: ``sklearn.datasets.load_digits`` (1,797 handwritten digits, 8x8 pixels,
bundled with scikit-learn: nothing is downloaded), pixels divided by 16 and
standardised with the training split's per-pixel mean and standard deviation;
a fixed random split of 1,437 training and 360 test images; SGD with
momentum 0.9 (learning rate 0.01) on minibatches of 128. ``Config(data="clusters")`` uses
the synthetic alternative (10 Gaussian clusters in 32 dimensions).

The model is a Flax ``linen`` MLP of ``depth`` ReLU layers of ``width`` units
whose weights start at ``N(0, gain**2 / fan_in)`` with ``gain = 1.6``; He
initialisation is ``gain = sqrt(2)``, so every layer multiplies the activation
variance by ``1.6**2 / 2 = 1.28`` and the logits start ``~1.28**16 = 52`` times
too large. What we changed from the papers: a deliberately bad initialisation
(to produce the explosion on a small problem) and a small dataset and model,
so a run takes seconds. Each defence changes one thing (two for the
combinations):

* ``clip_global`` / ``agc``: ``og.clip_by_global_norm`` / ``og.adaptive_grad_clip``;
* ``skip_nonfinite``: ``og.skip_nonfinite`` alone (it cannot undo the first,
  finite, step that did the damage: shown for honesty);
* ``he_init``: the right initialisation instead of the bad one;
* ``batchnorm``: the bad initialisation with ``BatchNorm`` after every layer;
* ``clip+l2_penalty``: clipping and ``og.add_l2_penalty``;
* ``warmup+inv_sqrt``: ``og.warmup(og.inverse_sqrt_decay(...))`` learning rate.

Not run by default (``--full`` runs them, ``--guards NAME`` picks them):
``xavier_init`` (removes the explosion but makes the ReLU signal vanish),
``l2_penalty`` alone (too weak against the first step), ``exp_decay`` (an
``og.exponential_decay`` learning rate starts at the same rate, so it cannot
prevent a blow-up at step 1), ``clip+exp_decay`` and ``clip+plateau``
(clipping then ``og.reduce_on_plateau`` fed the loss as ``value=``).

Seeds train together under ``vmap`` in one compiled ``lax.scan`` per defence;
every ``og.guard_stats`` entry is a per-step CSV column.
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
  data: str = "digits"  # or "clusters" (synthetic)
  depth: int = 32
  width: int = 64
  inputs: int = 32  # clusters only (digits have 64 pixels)
  classes: int = 10  # clusters only (digits have 10 classes)
  train_size: int = 4096  # clusters only
  test_size: int = 2048  # clusters only
  batch: int = 128
  learning_rate: float = 0.01
  momentum: float = 0.9
  init_gain: float = 1.6
  clip_norm: float = 1.0
  l2_weight: float = 1e-3
  warmup_steps: int = 100
  defences: tuple[str, ...] = (
      "none", "clip_global", "agc", "skip_nonfinite", "he_init", "batchnorm", "clip+l2_penalty",
      "warmup+inv_sqrt")

  @classmethod
  def quick(cls) -> Config:
    return cls(steps=200, seeds=2, defences=("none", "clip_global", "agc", "batchnorm"))

  @classmethod
  def full(cls) -> Config:
    return cls(steps=2000, seeds=5, defences=tuple(d for d in DEFENCES if d != "clip+exp_decay"))


@dataclasses.dataclass(frozen=True)
class Defence:
  make_tx: Callable[[Config], optax.GradientTransformation]
  init: str = "bad"  # "bad", "he" or "xavier"
  batchnorm: bool = False


def _sgd(config: Config) -> optax.GradientTransformation:
  return optax.sgd(config.learning_rate, momentum=config.momentum or None)


def _clip(config: Config) -> optax.GradientTransformation:
  return og.clip_by_global_norm(config.clip_norm)


def _exp_decay(config: Config):
  return og.exponential_decay(config.learning_rate, max(config.steps // 8, 1), 0.5)


DEFENCES: dict[str, Defence] = {
    "none": Defence(_sgd),
    "clip_global": Defence(lambda c: optax.chain(_clip(c), _sgd(c))),
    "agc": Defence(lambda c: optax.chain(og.adaptive_grad_clip(0.05), _sgd(c))),
    "skip_nonfinite": Defence(lambda c: og.skip_nonfinite(_sgd(c))),
    "he_init": Defence(_sgd, init="he"),
    "xavier_init": Defence(_sgd, init="xavier"),
    "batchnorm": Defence(_sgd, batchnorm=True),
    "l2_penalty": Defence(lambda c: optax.chain(
        og.add_l2_penalty(c.l2_weight), _sgd(c))),
    "clip+l2_penalty": Defence(lambda c: optax.chain(
        _clip(c), og.add_l2_penalty(c.l2_weight), _sgd(c))),
    "warmup+inv_sqrt": Defence(lambda c: optax.sgd(
        og.warmup(og.inverse_sqrt_decay(c.learning_rate, timescale=c.warmup_steps),
                  c.warmup_steps), momentum=c.momentum or None)),
    "exp_decay": Defence(lambda c: optax.sgd(_exp_decay(c), momentum=c.momentum or None)),
    "clip+exp_decay": Defence(lambda c: optax.chain(
        _clip(c), optax.sgd(_exp_decay(c), momentum=c.momentum or None))),
    "clip+plateau": Defence(lambda c: optax.chain(
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


DIGITS_TEST = 360


@functools.cache
def load_digits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """``(x_train, y_train), (x_test, y_test)`` from scikit-learn's bundled digits.

  Pixels ``/ 16``, then standardised per pixel with the training split's mean
  and standard deviation (constant pixels keep scale 1); a fixed permutation
  (seed 0) puts 360 images in the test split.
  """
  try:
    from sklearn.datasets import load_digits as sk_load_digits
  except ImportError as e:  # pragma: no cover - scikit-learn is in the experiments extra
    raise ImportError("the digits data needs scikit-learn: pip install -e '.[experiments]'") from e
  bunch = sk_load_digits()
  x = np.asarray(bunch.data, np.float64) / 16.0
  y = np.asarray(bunch.target, np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  test, train = order[:DIGITS_TEST], order[DIGITS_TEST:]
  mean = x[train].mean(axis=0)
  std = x[train].std(axis=0)
  std = np.where(std > 1e-6, std, 1.0)
  x = ((x - mean) / std).astype(np.float32)
  return (x[train], y[train]), (x[test], y[test])


def dataset(config: Config):
  """The configured data: ``load_digits()`` or the synthetic clusters."""
  if config.data == "digits":
    return load_digits()
  if config.data == "clusters":
    return make_data(config.inputs, config.classes, config.train_size, config.test_size)
  raise ValueError(f"deep_mlp: Config.data must be 'digits' or 'clusters', got {config.data!r}")


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
  (x_train, y_train), (x_test, y_test) = dataset(config)
  inputs, classes = x_train.shape[1], int(max(y_train.max(), y_test.max())) + 1
  model = MLP(config.depth, config.width, classes, defence.init, config.init_gain,
              defence.batchnorm)
  tx = optax.with_extra_args_support(defence.make_tx(config))
  variables = C.stack([init_variables(model, inputs, s) for s in range(config.seeds)])
  params, stats = variables["params"], variables.get("batch_stats", {})
  # minibatch indices [steps, seeds, batch], the same for every defence
  idx = np.random.default_rng(99).integers(0, x_train.shape[0],
                                           (config.steps, config.seeds, config.batch))

  def one(params, stats, opt_state, x, y):
    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new.get("batch_stats", {})

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return (optax.apply_updates(params, updates), stats, opt_state, loss,
            optax.tree.norm(grads), C.guard_curves(opt_state))

  def step(carry, inputs):
    params, stats, opt_state, (x_all, y_all) = carry
    batch = inputs[1]
    params, stats, opt_state, loss, gnorm, curves = jax.vmap(one)(
        params, stats, opt_state, x_all[batch], y_all[batch])
    return (params, stats, opt_state, (x_all, y_all)), (loss, gnorm, curves)

  opt_state = jax.jit(jax.vmap(tx.init))(params)
  carry = (params, stats, opt_state, (x_train, y_train))
  (params, stats, _, _), (loss, gnorm, curves) = C.scan_loop(
      step, carry, config.steps, xs=idx, bar=bar,
      stop=lambda carry: C.all_nonfinite(carry[0]))

  @jax.jit
  @functools.partial(jax.vmap, in_axes=(0, 0, None, None))
  def accuracy(params, stats, x, y):
    logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
    return jnp.mean(jnp.argmax(logits, -1) == y)

  acc = np.asarray(accuracy(params, stats, x_test, y_test))
  curves = {k: np.asarray(v, np.float64).T for k, v in curves.items()}
  skipped = C.skipped_from_curves(curves)
  return {"loss": loss.T, "grad_norm": gnorm.T, "accuracy": acc, "curves": curves,
          "skipped": np.zeros(config.seeds, np.int64) if skipped is None else skipped}


def run(config: Config = Config(), *, guards: Sequence[str] | None = None,
        progress: bool | None = None) -> C.ExperimentResult:
  """Trains the MLP once per defence (all seeds together); one row per defence."""
  names = C.select(list(DEFENCES) if guards else list(config.defences), guards)
  setting = (f"{config.data}, depth {config.depth}, gain {config.init_gain:g}, "
             f"lr {config.learning_rate:g}, momentum {config.momentum:g}")
  runs = []
  with C.Progress(len(names) * config.steps, NAME, progress) as bar, C.Timer() as total:
    outs = C.train_all(lambda name: _train(config, DEFENCES[name], bar), names, bar)
    for name, (out, wall) in zip(names, outs, strict=True):
      r = C.Run(setting=setting, defence=name, loss=out["loss"], grad_norm=out["grad_norm"],
                skipped=out["skipped"], metrics={"test_accuracy": out["accuracy"].tolist()},
                wall_s=wall, extra=out["curves"])
      if name.endswith("plateau"):
        scale = out["curves"]["reduce_on_plateau/scale"][:, -1]
        r.note = f"final lr scale {float(np.mean(scale)):g}"
      r.note = r.nan_note() or r.note
      runs.append(r)
  (_, y_train), (_, y_test) = dataset(config)
  classes = int(max(y_train.max(), y_test.max())) + 1
  majority = float(np.max(np.bincount(np.asarray(y_test), minlength=classes)) / y_test.size)
  return C.ExperimentResult(
      name=NAME,
      title=(f"Deep MLP on {config.data} ({config.depth} ReLU layers x {config.width}, init gain "
             f"{config.init_gain:g} vs He {math.sqrt(2):.3g}), SGD lr {config.learning_rate:g} "
             f"momentum {config.momentum:g}, "
             f"median of {config.seeds} seeds"),
      config=dataclasses.asdict(config), runs=runs, metric="test_accuracy",
      metric_label="test acc", data="load_digits" if config.data == "digits" else "synthetic",
      checks={"chance_accuracy": 1.0 / classes, "majority_class_accuracy": majority,
              "train_size": int(y_train.size), "test_size": int(y_test.size)},
      wall_s=total.s)
