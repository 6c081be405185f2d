"""The adding problem (Hochreiter & Schmidhuber 1997; Pascanu et al. 2013), vanilla tanh RNN.

Each input is a sequence of ``T`` pairs ``(value, marker)``: values uniform in
``[0, 1]``, exactly two markers set to 1, the first in the first ``T/10``
steps and the second in steps ``[T/10, T/2)``. The target is the mean of the
two marked values, i.e. Hochreiter & Schmidhuber's ``0.5 + (X1 + X2) / 4`` for
``X`` uniform in ``[-1, 1]``. A prediction is *wrong* when its squared error is
above 0.04; always predicting the mean 0.5 is then wrong with probability
``(1 - 0.4)**2 = 0.36`` (checked on the test set below).

The model is a Flax ``SimpleCell`` (``h = tanh(W_x x + W_h h + b)``) with 50
hidden units read out by a ``Dense`` layer, trained with plain SGD on fresh
batches of 20 sequences (the same batches for every defence). The recurrent
matrix starts as a Gaussian matrix with spectral radius ``spectral_radius``
(1.5 by default): Pascanu et al. show that a largest singular value above 1 is
necessary for a tanh RNN's gradients to explode. Every (learning rate, seed)
pair of one (length, defence) trains in a single compiled, ``vmap``-ed
``lax.scan``; batches and initial weights are drawn with NumPy on the host.

Defences (all before ``optax.sgd(lr)``): ``clip_global``
(``og.clip_by_global_norm(1)``, Pascanu et al.'s remedy), ``clip_value``
(``og.clip_by_value(0.1)``, Mikolov's), ``zclip`` (``og.zclip()`` with its
defaults: no clipping during its 25 warm-up steps), ``zclip+max_norm``
(``og.zclip(max_norm=1)``: a hard bound during and after warm-up),
``autoclip`` (``og.autoclip(10)``) and ``clip+plateau`` (global clipping, then
``og.reduce_on_plateau(factor=0.5, patience=30)`` fed the training loss,
smoothed by an exponential moving average over ~10 batches, as ``value=``:
the learning rate halves whenever the loss stops improving).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og
from experiments import _common as C

NAME = "adding_problem"
ERROR_THRESHOLD = 0.04
MEAN_PREDICTOR_ERROR = 0.36  # P(|(U1 + U2)/2 - 1/2| > 0.2) = (1 - 0.4)**2


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of the adding-problem experiment (defaults: the suite's default run)."""

  lengths: tuple[int, ...] = (50, 100)
  learning_rates: tuple[float, ...] = (0.01, 0.1, 0.3)
  seeds: int = 2
  steps: int = 600
  batch: int = 20
  hidden: int = 50
  spectral_radius: float = 1.5
  clip_norm: float = 1.0
  clip_value: float = 0.1
  test_size: int = 10_000
  plateau_patience: int = 30
  defences: tuple[str, ...] = ("none", "clip_global", "clip_value", "zclip", "zclip+max_norm",
                               "autoclip", "clip+plateau")

  @classmethod
  def quick(cls) -> Config:
    return cls(lengths=(50,), steps=300)


def defence_factories(config: Config) -> dict[str, tuple[tuple[str, ...], Callable]]:
  """name -> (optax_guard names it needs, ``lr -> optimizer``)."""
  return {
      "none": ((), lambda lr: optax.sgd(lr)),
      "clip_global": (("clip_by_global_norm",), lambda lr: optax.chain(
          og.clip_by_global_norm(config.clip_norm), optax.sgd(lr))),
      "clip_value": (("clip_by_value",), lambda lr: optax.chain(
          og.clip_by_value(config.clip_value), optax.sgd(lr))),
      "zclip": (("zclip",), lambda lr: optax.chain(og.zclip(), optax.sgd(lr))),
      "zclip+max_norm": (("zclip",), lambda lr: optax.chain(
          og.zclip(max_norm=config.clip_norm), optax.sgd(lr))),
      "autoclip": (("autoclip",), lambda lr: optax.chain(og.autoclip(10.0), optax.sgd(lr))),
      "clip+plateau": (("clip_by_global_norm", "reduce_on_plateau", "guard_stats"),
                       lambda lr: optax.chain(
                           og.clip_by_global_norm(config.clip_norm), optax.sgd(lr),
                           og.reduce_on_plateau(factor=0.5, patience=config.plateau_patience))),
  }


class TanhRNN(nn.Module):
  """Vanilla tanh RNN; the last hidden state is read out by a linear layer."""

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.RNN(nn.SimpleCell(self.hidden))(x)
    return nn.Dense(1)(h[:, -1])[:, 0]


@functools.lru_cache(maxsize=8)
def init_params(model: TanhRNN, length: int, seed: int, radius: float):
  """Input and read-out kernels ``N(0, 1/fan_in)``; recurrent ``N(0, radius**2/hidden)``.

  A ``hidden x hidden`` Gaussian matrix with entries of variance ``r**2/n``
  has spectral radius close to ``r`` (circular law).
  """
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, length, 2)))

  def std(name, shape):
    return (radius if name.endswith("h/kernel") else 1.0) / math.sqrt(shape[-2])

  return C.numpy_init(abstract, seed, std)


def make_batch(rng: np.random.Generator, batch: int | tuple[int, ...],
               length: int) -> tuple[np.ndarray, np.ndarray]:
  """Sequences ``[*batch, length, 2]`` (float32) and their targets ``[*batch]``."""
  batch = (batch,) if isinstance(batch, int) else tuple(batch)
  values = rng.random((*batch, length), dtype=np.float32)
  lo, hi = max(length // 10, 1), max(length // 2, 2)
  first = rng.integers(0, lo, batch)
  second = rng.integers(lo, hi, batch)
  markers = np.zeros_like(values)
  np.put_along_axis(markers, first[..., None], 1.0, axis=-1)
  np.put_along_axis(markers, second[..., None], 1.0, axis=-1)
  target = 0.5 * np.sum(values * markers, axis=-1)
  return np.stack([values, markers], axis=-1), target.astype(np.float32)


def test_set(length: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """``size`` fresh sequences, never used for training (their own seed)."""
  return make_batch(np.random.default_rng(10_000 + length), size, length)


def wrong_fraction(pred, target):
  """Fraction with squared error above 0.04; a non-finite prediction counts as wrong."""
  return jnp.mean(~((pred - target) ** 2 <= ERROR_THRESHOLD))


def _train(config: Config, length: int, make_tx: Callable, data, bar) -> dict[str, np.ndarray]:
  model = TanhRNN(config.hidden)
  lrs = np.repeat(np.asarray(config.learning_rates, np.float32), config.seeds)
  seeds = np.tile(np.arange(config.seeds), len(config.learning_rates))
  params = C.stack([init_params(model, length, int(s), config.spectral_radius) for s in seeds])
  (train_x, train_y), (test_x, test_y) = data

  def loss_fn(params, x, y):
    return jnp.mean((model.apply(params, x) - y) ** 2)

  def tx(lr):
    return optax.with_extra_args_support(make_tx(lr))

  def one(lr, params, opt_state, ema, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    # reduce_on_plateau sees the loss smoothed over ~10 batches (minibatch noise
    # alone would look like a plateau); the other optimizers ignore value=.
    ema = jnp.where(jnp.isnan(ema), loss, 0.9 * ema + 0.1 * loss)
    updates, opt_state = tx(lr).update(grads, opt_state, params, value=ema)
    scale = C.stat(og.guard_stats(opt_state), "reduce_on_plateau/scale", 1.0)
    return (optax.apply_updates(params, updates), opt_state, ema, loss,
            optax.tree.norm(grads), C.skipped_count(opt_state), scale)

  def step(carry, inputs):
    (params, opt_state, ema), (_, (x, y)) = carry, inputs
    params, opt_state, ema, *out = jax.vmap(one)(lrs, params, opt_state, ema, x[seeds], y[seeds])
    return (params, opt_state, ema), tuple(out)

  opt_state = jax.jit(jax.vmap(lambda lr, p: tx(lr).init(p)))(lrs, params)
  ema = jnp.full(lrs.shape, jnp.nan, jnp.float32)
  (params, _, _), (loss, gnorm, skipped, scale) = C.scan_loop(
      step, (params, opt_state, ema), config.steps, xs=(train_x, train_y), bar=bar)
  err = jax.jit(jax.vmap(lambda p, x, y: wrong_fraction(model.apply(p, x), y),
                         in_axes=(0, None, None)))(params, test_x, test_y)
  return {"loss": loss.T, "grad_norm": gnorm.T, "test_error": np.asarray(err),
          "skipped": skipped[-1], "lr_scale": scale.T}


def run(config: Config = Config(), *, guards: Sequence[str] | None = None,
        progress: bool | None = None) -> C.ExperimentResult:
  """Trains every (length, defence) pair; one run row per (length, lr, defence)."""
  factories = defence_factories(config)
  names = C.select(list(factories) if guards else list(config.defences), guards)
  notes, runs = [], []

  # Data: the same training batches for every defence (per seed), fresh test sequences.
  data = {}
  for length in config.lengths:
    per_seed = [make_batch(np.random.default_rng(s), (config.steps, config.batch), length)
                for s in range(config.seeds)]
    train = tuple(np.stack(z, axis=1) for z in zip(*per_seed, strict=True))  # [steps, seeds,..]
    data[length] = (train, test_set(length, config.test_size))

  # The baseline: always predict the mean target 0.5.
  checks = {}
  for length in config.lengths:
    y = data[length][1][1]
    checks[f"mean_predictor_error_T{length}"] = float(np.mean((0.5 - y) ** 2 > ERROR_THRESHOLD))
  base = float(np.mean(list(checks.values())))
  if abs(base - MEAN_PREDICTOR_ERROR) > 4 * math.sqrt(0.36 * 0.64 / config.test_size) + 1e-9:
    raise AssertionError(f"predict-the-mean baseline {base:.4f} != {MEAN_PREDICTOR_ERROR}")
  runs.append(C.Run(setting="any T", defence="baseline: predict 0.5",
                    loss=np.full((1, 1), np.nan), grad_norm=np.full((1, 1), np.nan),
                    skipped=np.zeros(1), metrics={"test_error": [base]},
                    note=f"expected {MEAN_PREDICTOR_ERROR}"))

  todo = []
  for name in names:
    needs, make_tx = factories[name]
    lacking = C.missing(*needs)
    if lacking:
      notes.append(f"{name}: skipped, optax_guard lacks {', '.join(lacking)}")
    else:
      todo.append((name, make_tx))

  chunks = C.num_chunks(config.steps)
  bar = C.progress(len(config.lengths) * len(todo) * chunks, NAME, progress)
  with C.Timer() as total:
    for length in config.lengths:
      for name, make_tx in todo:
        with C.Timer() as timer:
          out = _train(config, length, make_tx, data[length], bar)
        per = config.seeds
        for i, lr in enumerate(config.learning_rates):
          sl = slice(i * per, (i + 1) * per)
          runs.append(C.Run(
              setting=f"T={length} lr={lr:g}", defence=name,
              loss=out["loss"][sl], grad_norm=out["grad_norm"][sl], skipped=out["skipped"][sl],
              metrics={"test_error": out["test_error"][sl].tolist()},
              wall_s=timer.s / len(config.learning_rates),
              extra={"lr_scale": out["lr_scale"][sl]} if "plateau" in name else {}))
  bar.close()
  runs = [runs[0]] + sorted(runs[1:], key=lambda r: (int(r.setting.split()[0][2:]),
                                                     float(r.setting.split("lr=")[1])))
  for r in runs[1:]:
    if "lr_scale" in r.extra:
      r.note = f"final lr scale {float(np.mean(r.extra['lr_scale'][:, -1])):.3g}"
    bad = r.first_nonfinite_step()
    if any(b is not None for b in bad):
      r.note = "NaN at step " + ",".join("-" if b is None else str(b) for b in bad)
  return C.ExperimentResult(
      name=NAME,
      title=(f"Adding problem, tanh RNN ({config.hidden} units, spectral radius "
             f"{config.spectral_radius}), SGD, median of {config.seeds} seeds"),
      config=dataclasses.asdict(config), runs=runs, metric="test_error",
      metric_label="test err", notes=notes, checks=checks, wall_s=total.s)
