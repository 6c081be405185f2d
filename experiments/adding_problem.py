"""The adding problem with a tanh RNN and SGD: clipping lets it learn, no clipping diverges.

Claim tested: with a recurrent matrix whose spectral radius is above 1, plain
SGD on a vanilla tanh RNN meets exploding gradients; at a learning rate where
the unclipped run diverges to NaN, clipping the global gradient norm (Pascanu,
Mikolov & Bengio 2013, "On the difficulty of training recurrent neural
networks", Algorithm 1) trains the same network to solve the task: at most
10% of fresh test sequences wrong, against 36% for always predicting the mean.

Task (Hochreiter & Schmidhuber 1997, as used by Pascanu et al.): each input is
a sequence of ``T`` pairs ``(value, marker)``, values uniform in ``[0, 1]``,
exactly two markers set to 1, the first in the first ``T/10`` steps and the
second in steps ``[T/10, T/2)``. The target is the mean of the two marked
values (Hochreiter & Schmidhuber's ``0.5 + (X1 + X2) / 4`` for ``X`` uniform in
``[-1, 1]``). A prediction is *wrong* when its squared error is above 0.04;
always predicting 0.5 is then wrong with probability ``(1 - 0.4)**2 = 0.36``
(checked on the test set). Pascanu et al. call a run successful below 1%
wrong.

Model and training as in the paper: a Flax ``SimpleCell``
(``h = tanh(W_x x + W_h h + b)``) of 50 units read out linearly from the last
hidden state, squared error, plain SGD on fresh minibatches of 20 sequences
(the same batches for every defence), gradient norm clipped at 1. The
recurrent matrix starts Gaussian with spectral radius ``spectral_radius``
(1.2): Pascanu et al. show that a largest singular value above 1 is necessary
for the gradients of a tanh RNN to explode.

What we changed, to fit a CPU budget of about a minute: sequences are shorter
(``T = 30`` by default, ``--full`` goes to 50 and 100; the paper reports
``T`` from 50 to 200) and training is far shorter (a few thousand minibatches
instead of up to millions), so the learning rate is higher (0.1 instead of
0.01; unclipped SGD reaches NaN there within a few hundred steps) and is cut
by ``og.multistep_decay`` (x0.3 at 75% and again at 90% of the steps) so the
final weights are not caught mid-oscillation. The paper's regulariser of the
vanishing gradient is not used: only the clipping side is tested.

Defences (before ``optax.sgd``): ``clip_global`` (``og.clip_by_global_norm(1)``,
the paper's), ``clip_value`` (``og.clip_by_value(0.1)``, elementwise, as
Mikolov's earlier work), ``zclip`` (``og.zclip()`` with its defaults: no
clipping during its 25 warm-up steps), ``zclip+max_norm``
(``og.zclip(max_norm=1)``), ``autoclip`` (``og.autoclip(10)``), and, not run by
default, ``clip+plateau`` (global clipping, then ``og.reduce_on_plateau`` fed a
smoothed training loss as ``value=``) and ``skip_nonfinite``. Every
(learning rate, seed) pair of one (length, defence) trains in a single
compiled, ``vmap``-ed ``lax.scan``; batches and initial weights are drawn with
NumPy on the host, so they are the same on every machine. A defence whose
runs all have NaN weights stops early (the rest of its curve is NaN).
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
SOLVED = 0.10  # the target of the default run: at most 10% wrong
PAPER_SOLVED = 0.01  # Pascanu et al.'s success criterion


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of the adding-problem experiment (defaults: the suite's default run)."""

  lengths: tuple[int, ...] = (30,)
  learning_rates: tuple[float, ...] = (0.1,)
  seeds: int = 3
  steps: int = 4000
  batch: int = 20
  hidden: int = 50
  spectral_radius: float = 1.2
  clip_norm: float = 1.0
  clip_value: float = 0.1
  decay_at: tuple[float, ...] = (0.75, 0.9)
  decay_factor: float = 0.3
  test_size: int = 10_000
  plateau_patience: int = 200
  defences: tuple[str, ...] = ("none", "clip_global", "clip_value", "zclip", "zclip+max_norm",
                               "autoclip")

  @classmethod
  def quick(cls) -> Config:
    return cls(lengths=(20,), steps=1500, seeds=2,
               defences=("none", "clip_global", "zclip+max_norm"))

  @classmethod
  def full(cls) -> Config:
    return cls(lengths=(50, 100), seeds=3, steps=30_000,
               defences=("none", "clip_global", "zclip+max_norm"))


def schedule(config: Config, lr) -> optax.Schedule:
  """Constant ``lr``, times ``decay_factor`` at each fraction ``decay_at`` of the steps."""
  marks = [int(f * config.steps) for f in config.decay_at]
  return og.multistep_decay(lr, marks, factor=config.decay_factor)


def defence_factories(config: Config) -> dict[str, Callable]:
  """name -> ``lr -> optimizer`` (all end in SGD with the same schedule)."""

  def sgd(lr):
    return optax.sgd(schedule(config, lr))

  return {
      "none": sgd,
      "clip_global": lambda lr: optax.chain(og.clip_by_global_norm(config.clip_norm), sgd(lr)),
      "clip_value": lambda lr: optax.chain(og.clip_by_value(config.clip_value), sgd(lr)),
      "zclip": lambda lr: optax.chain(og.zclip(), sgd(lr)),
      "zclip+max_norm": lambda lr: optax.chain(og.zclip(max_norm=config.clip_norm), sgd(lr)),
      "autoclip": lambda lr: optax.chain(og.autoclip(10.0), sgd(lr)),
      "clip+plateau": lambda lr: optax.chain(
          og.clip_by_global_norm(config.clip_norm), sgd(lr),
          og.reduce_on_plateau(factor=0.5, patience=config.plateau_patience)),
      "skip_nonfinite": lambda lr: og.skip_nonfinite(sgd(lr)),
  }


class TanhRNN(nn.Module):
  """Vanilla tanh RNN; the last hidden state is read out by a linear layer."""

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.RNN(nn.SimpleCell(self.hidden))(x)
    return nn.Dense(1)(h[:, -1])[:, 0]


@functools.lru_cache(maxsize=16)
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


class Batches:
  """Training batches ``[steps, seeds, batch, T, 2]`` made chunk by chunk, in order.

  One NumPy generator per seed, so seed ``s`` sees the same batches whatever
  the defence and however the steps are chunked (as long as chunks come in
  order, which :func:`experiments._common.scan_loop` guarantees).
  """

  def __init__(self, config: Config, length: int):
    self.config, self.length = config, length
    self.rngs = [np.random.default_rng([s, length]) for s in range(config.seeds)]
    self.next = 0

  def __call__(self, lo: int, hi: int):
    if lo != self.next:
      raise ValueError(f"Batches: chunk [{lo}, {hi}) out of order (expected {self.next})")
    self.next = hi
    steps = [[make_batch(r, self.config.batch, self.length) for r in self.rngs]
             for _ in range(lo, hi)]  # one draw per (step, seed): chunking changes nothing
    x = np.stack([[b[0] for b in row] for row in steps])
    y = np.stack([[b[1] for b in row] for row in steps])
    return x, y


def _train(config: Config, length: int, make_tx: Callable, test, bar) -> dict[str, np.ndarray]:
  model = TanhRNN(config.hidden)
  lrs = np.repeat(np.asarray(config.learning_rates, np.float32), config.seeds)
  seeds = np.tile(np.arange(config.seeds), len(config.learning_rates))
  params = C.stack([init_params(model, length, int(s), config.spectral_radius) for s in seeds])
  test_x, test_y = test

  def loss_fn(params, x, y):
    return jnp.mean((model.apply(params, x) - y) ** 2)

  def tx(lr):
    return optax.with_extra_args_support(make_tx(lr))

  def one(lr, params, opt_state, ema, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    # reduce_on_plateau sees the loss smoothed over ~100 batches (minibatch
    # noise alone would look like a plateau); the other optimizers ignore value=.
    ema = jnp.where(jnp.isnan(ema), loss, 0.99 * ema + 0.01 * loss)
    updates, opt_state = tx(lr).update(grads, opt_state, params, value=ema)
    return (optax.apply_updates(params, updates), opt_state, ema, loss,
            optax.tree.norm(grads), C.guard_curves(opt_state))

  def step(carry, inputs):
    (params, opt_state, ema), (_, (x, y)) = carry, inputs
    params, opt_state, ema, *out = jax.vmap(one)(lrs, params, opt_state, ema, x[seeds],
                                                 y[seeds])
    return (params, opt_state, ema), tuple(out)

  opt_state = jax.jit(jax.vmap(lambda lr, p: tx(lr).init(p)))(lrs, params)
  ema = jnp.full(lrs.shape, jnp.nan, jnp.float32)
  (params, _, _), (loss, gnorm, stats) = C.scan_loop(
      step, (params, opt_state, ema), config.steps, xs=Batches(config, length), bar=bar,
      stop=lambda carry: C.all_nonfinite(carry[0]))
  err = jax.jit(jax.vmap(lambda p, x, y: wrong_fraction(model.apply(p, x), y),
                         in_axes=(0, None, None)))(params, test_x, test_y)
  stats = {k: np.asarray(v).T for k, v in stats.items()}
  skipped = C.skipped_from_curves(stats)
  return {"loss": loss.T, "grad_norm": gnorm.T, "test_error": np.asarray(err),
          "skipped": np.zeros(len(lrs), np.int64) if skipped is None else skipped,
          "stats": stats}


def run(config: Config = Config(), *, guards: Sequence[str] | None = None,
        progress: bool | None = None) -> C.ExperimentResult:
  """Trains every (length, defence) pair; one run row per (length, lr, defence)."""
  factories = defence_factories(config)
  names = C.select(list(factories) if guards else list(config.defences), guards)
  tests = {length: test_set(length, config.test_size) for length in config.lengths}

  # The baseline: always predict the mean target 0.5.
  checks = {}
  for length in config.lengths:
    y = tests[length][1]
    checks[f"mean_predictor_error_T{length}"] = float(np.mean((0.5 - y) ** 2 > ERROR_THRESHOLD))
  base = float(np.mean(list(checks.values())))
  if abs(base - MEAN_PREDICTOR_ERROR) > 4 * math.sqrt(0.36 * 0.64 / config.test_size) + 1e-9:
    raise AssertionError(f"predict-the-mean baseline {base:.4f} != {MEAN_PREDICTOR_ERROR}")
  runs = [C.Run(setting="any T", defence="baseline: predict 0.5",
                loss=np.full((1, 1), np.nan), grad_norm=np.full((1, 1), np.nan),
                skipped=np.zeros(1), metrics={"test_error": [base]},
                note=f"expected {MEAN_PREDICTOR_ERROR}")]

  total_steps = len(config.lengths) * len(names) * config.steps
  jobs = [(length, name) for length in config.lengths for name in names]
  with C.Progress(total_steps, NAME, progress) as bar, C.Timer() as total:
    outs = C.train_all(
        lambda job: _train(config, job[0], factories[job[1]], tests[job[0]], bar), jobs, bar,
        phase=lambda job: f"T={job[0]} {job[1]}")
    for (length, name), (out, wall) in zip(jobs, outs, strict=True):
      per = config.seeds
      for i, lr in enumerate(config.learning_rates):
        sl = slice(i * per, (i + 1) * per)
        r = C.Run(
            setting=f"T={length} lr={lr:g}", defence=name,
            loss=out["loss"][sl], grad_norm=out["grad_norm"][sl], skipped=out["skipped"][sl],
            metrics={"test_error": out["test_error"][sl].tolist()},
            wall_s=wall / len(config.learning_rates),
            extra={k: v[sl] for k, v in out["stats"].items()})
        r.note = r.nan_note()
        runs.append(r)
  runs = [runs[0]] + sorted(runs[1:], key=lambda r: (int(r.setting.split()[0][2:]),
                                                     float(r.setting.split("lr=")[1])))
  for length in config.lengths:
    solved = [r for r in runs[1:] if r.setting.startswith(f"T={length} ")
              and max(r.metrics["test_error"]) <= SOLVED]
    checks[f"T{length}: every seed <= {SOLVED:.0%} wrong"] = sorted(
        {f"{r.defence} ({r.setting.split()[1]})" for r in solved}) or "no defence"
  return C.ExperimentResult(
      name=NAME,
      title=(f"Adding problem, tanh RNN ({config.hidden} units, spectral radius "
             f"{config.spectral_radius:g}), SGD, median of {config.seeds} seeds"),
      config=dataclasses.asdict(config), runs=runs, metric="test_error",
      metric_label="test err", checks=checks, wall_s=total.s)
