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
batches of 20 sequences. The recurrent matrix starts as a Gaussian matrix with
spectral radius ``spectral_radius`` (1.5 by default, past the edge of chaos) so
that the gradients can explode, as in Pascanu et al.'s Figure 6; every
(learning rate, seed) pair of one (length, defence) trains in a single
compiled, ``vmap``-ed ``lax.scan``.
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
  defences: tuple[str, ...] = ("none", "clip_global", "clip_value", "zclip", "autoclip")

  @classmethod
  def quick(cls) -> Config:
    return cls(lengths=(50,), learning_rates=(0.01, 0.3), steps=400)


def defence_factories(config: Config) -> dict[str, tuple[tuple[str, ...], Callable]]:
  """name -> (optax_guard names it needs, ``lr -> optimizer``)."""
  return {
      "none": ((), lambda lr: optax.sgd(lr)),
      "clip_global": (("clip_by_global_norm",), lambda lr: optax.chain(
          og.clip_by_global_norm(config.clip_norm), optax.sgd(lr))),
      "clip_value": (("clip_by_value",), lambda lr: optax.chain(
          og.clip_by_value(config.clip_value), optax.sgd(lr))),
      "zclip": (("zclip",), lambda lr: optax.chain(og.zclip(), optax.sgd(lr))),
      "autoclip": (("autoclip",), lambda lr: optax.chain(og.autoclip(10.0), optax.sgd(lr))),
  }


def _recurrent_init(radius: float):
  """Gaussian ``N(0, radius**2 / n)`` matrix: spectral radius ~ ``radius`` (circular law)."""

  def init(key, shape, dtype=jnp.float32):
    return radius * jax.random.normal(key, shape, dtype) / math.sqrt(shape[0])

  return init


class TanhRNN(nn.Module):
  """Vanilla tanh RNN; the last hidden state is read out by a linear layer."""

  hidden: int
  spectral_radius: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    lecun = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    cell = nn.SimpleCell(self.hidden, kernel_init=lecun,
                         recurrent_kernel_init=_recurrent_init(self.spectral_radius))
    h = nn.RNN(cell)(x)
    return nn.Dense(1, kernel_init=lecun)(h[:, -1])[:, 0]


def make_batch(key: jax.Array, batch: int | tuple[int, ...],
               length: int) -> tuple[jax.Array, jax.Array]:
  """Sequences ``[*batch, length, 2]`` and their targets ``[*batch]``."""
  batch = (batch,) if isinstance(batch, int) else tuple(batch)
  u = jax.random.uniform(key, (*batch, length + 2))  # one draw: values, then two positions
  values = u[..., :length]
  lo, hi = max(length // 10, 1), max(length // 2, 2)
  first = jnp.floor(u[..., length] * lo).astype(jnp.int32)  # uniform in [0, lo)
  second = lo + jnp.floor(u[..., length + 1] * (hi - lo)).astype(jnp.int32)  # in [lo, hi)
  markers = jax.nn.one_hot(first, length) + jax.nn.one_hot(second, length)
  target = 0.5 * jnp.sum(values * markers, axis=-1)
  return jnp.stack([values, markers], axis=-1), target


def wrong_fraction(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Fraction with squared error above 0.04; a non-finite prediction counts as wrong."""
  return jnp.mean(~((pred - target) ** 2 <= ERROR_THRESHOLD))


@functools.lru_cache(maxsize=None)
def _model_fns(hidden: int, radius: float, length: int, test_size: int):
  """Jitted pieces shared by every defence of one length (compiled once)."""
  model = TanhRNN(hidden, radius)
  test_x, test_y = jax.jit(make_batch, static_argnums=(1, 2))(
      jax.random.PRNGKey(10_000 + length), test_size, length)

  @jax.jit
  @jax.vmap
  def init_params(seed):
    return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, length, 2)))

  @jax.jit
  @jax.vmap
  def test_error(params):
    return wrong_fraction(model.apply(params, test_x), test_y)

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def train_data(seeds, steps, batch):
    """``[steps, seeds, batch, ...]`` batches: every defence sees the same data."""
    x, y = jax.vmap(lambda s: make_batch(jax.random.fold_in(jax.random.PRNGKey(s), 1),
                                         (steps, batch), length))(seeds)
    return jnp.swapaxes(x, 0, 1), jnp.swapaxes(y, 0, 1)

  return model, init_params, test_error, (test_x, test_y), train_data


def _train(config: Config, length: int, make_tx: Callable, bar) -> dict[str, np.ndarray]:
  model, init_params, test_error, _, train_data = _model_fns(
      config.hidden, config.spectral_radius, length, config.test_size)
  lrs = np.repeat(np.asarray(config.learning_rates, np.float32), config.seeds)
  seeds = np.tile(np.arange(config.seeds), len(config.learning_rates))

  def loss_fn(params, x, y):
    return jnp.mean((model.apply(params, x) - y) ** 2)

  def one(lr, params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = make_tx(lr).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads),
            C.skipped_count(opt_state))

  def step(carry, inputs):
    (params, opt_state), (_, (x, y)) = carry, inputs
    params, opt_state, loss, gnorm, skipped = jax.vmap(one)(
        lrs, params, opt_state, x[seeds], y[seeds])
    return (params, opt_state), (loss, gnorm, skipped)

  params = init_params(seeds)
  opt_state = jax.jit(jax.vmap(lambda lr, p: make_tx(lr).init(p)))(lrs, params)
  data = train_data(jnp.arange(config.seeds), config.steps, config.batch)
  (params, _), (loss, gnorm, skipped) = C.scan_loop(step, (params, opt_state), config.steps,
                                                    xs=data, bar=bar)
  return {"loss": loss.T, "grad_norm": gnorm.T, "test_error": np.asarray(test_error(params)),
          "skipped": skipped[-1]}


def run(config: Config = Config(), *, guards: Sequence[str] | None = None,
        progress: bool | None = None) -> C.ExperimentResult:
  """Trains every (length, defence) pair; one run row per (length, lr, defence)."""
  factories = defence_factories(config)
  names = C.select([d for d in config.defences if d in factories], guards)
  notes, runs = [], []

  # The baseline: always predict the mean target 0.5.
  checks = {}
  for length in config.lengths:
    _, _, _, (x, y), _ = _model_fns(config.hidden, config.spectral_radius, length,
                                 config.test_size)
    checks[f"mean_predictor_error_T{length}"] = float(wrong_fraction(jnp.full_like(y, 0.5), y))
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
          out = _train(config, length, make_tx, bar)
        per = config.seeds
        for i, lr in enumerate(config.learning_rates):
          sl = slice(i * per, (i + 1) * per)
          runs.append(C.Run(
              setting=f"T={length} lr={lr:g}", defence=name,
              loss=out["loss"][sl], grad_norm=out["grad_norm"][sl], skipped=out["skipped"][sl],
              metrics={"test_error": out["test_error"][sl].tolist()},
              wall_s=timer.s / len(config.learning_rates)))
  bar.close()
  runs = [runs[0]] + sorted(runs[1:], key=lambda r: (int(r.setting.split()[0][2:]),
                                                     float(r.setting.split("lr=")[1])))
  for r in runs[1:]:
    bad = r.first_nonfinite_step()
    if any(b is not None for b in bad):
      r.note = "NaN at step " + ",".join("-" if b is None else str(b) for b in bad)
  return C.ExperimentResult(
      name=NAME,
      title=(f"Adding problem, tanh RNN ({config.hidden} units, spectral radius "
             f"{config.spectral_radius}), SGD, median of {config.seeds} seeds"),
      config=dataclasses.asdict(config), runs=runs, metric="test_error",
      metric_label="test err", notes=notes, checks=checks, wall_s=total.s)
