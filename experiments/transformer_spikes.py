"""Loss spikes in a small transformer LM at a high learning rate, and the guards.

Data: synthetic token sequences from a fixed random second-order Markov chain
over ``vocab`` tokens: with probability ``1 - noise`` the next token is
``table[previous two]``, otherwise uniform. The best achievable loss is the
chain's entropy (printed as a check), far below ``log(vocab)``. Every
``glitch_every`` steps (at steps ``glitch_every/2 + k*glitch_every``, none in
the last 10% of training) the batch is corrupted as a broken data pipeline
would: each sequence is one token repeated. Such batches are what large runs
meet (PaLM's authors got past loss spikes by skipping a few hundred batches);
at this learning rate each one spikes the loss and the gradient norm, and,
unguarded, drags the model towards predicting repeats.

Model: a Flax NNX decoder-only transformer (token + position embeddings,
``layers`` pre-LayerNorm blocks of causal multi-head attention and a GELU MLP,
final LayerNorm, untied read-out), trained with Adam at a peak learning rate of
``peak_lr`` (too high on purpose) with ``og.warmup`` + ``og.inverse_sqrt_decay``.

Every optimizer starts with ``og.monitor()``; ``og.guard_stats(opt_state)`` is
taken every step and each of its entries is kept as a per-step curve (in the
CSV): ``monitor/global_norm``, ``zclip/threshold``, ``autoclip/threshold``,
``skip_on_spike/num_skipped``... A *spike* is a step whose loss is more than
``spike_ratio`` times the median of the 20 steps before it. The table's
metric is the loss of the final weights on 256 held-out clean sequences.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_guard as og
from experiments import _common as C

NAME = "transformer_spikes"


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of the transformer experiment (defaults: the suite's default run)."""

  steps: int = 400
  seeds: int = 2
  vocab: int = 32
  length: int = 32
  batch: int = 16
  width: int = 32
  heads: int = 4
  layers: int = 2
  noise: float = 0.1
  peak_lr: float = 0.03
  warmup_steps: int = 40
  clip_norm: float = 1.0
  spike_ratio: float = 1.5
  glitch_every: int = 40
  val_size: int = 256
  defences: tuple[str, ...] = ("none", "clip_global", "zclip", "autoclip", "skip_on_spike")

  @classmethod
  def quick(cls) -> Config:
    return cls(steps=240, seeds=1, defences=("none", "clip_global", "zclip", "skip_on_spike"))


def _schedule(c: Config):
  return og.warmup(og.inverse_sqrt_decay(c.peak_lr, timescale=c.warmup_steps), c.warmup_steps)


def _adam(c: Config) -> optax.GradientTransformation:
  return optax.adam(_schedule(c))


DEFENCES: dict[str, tuple[tuple[str, ...], Callable[[Config], Any]]] = {
    "none": ((), lambda c: optax.chain(og.monitor(), _adam(c))),
    "clip_global": (("clip_by_global_norm",), lambda c: optax.chain(
        og.monitor(), og.clip_by_global_norm(c.clip_norm), _adam(c))),
    "zclip": (("zclip",), lambda c: optax.chain(og.monitor(), og.zclip(), _adam(c))),
    "autoclip": (("autoclip",), lambda c: optax.chain(og.monitor(), og.autoclip(10.0), _adam(c))),
    "skip_on_spike": (("skip_on_spike",), lambda c: optax.chain(
        og.monitor(), og.skip_on_spike(_adam(c), sigma=4.0, window=64, min_history=32))),
    "zclip+skip_on_spike": (("zclip", "skip_on_spike"), lambda c: optax.chain(
        og.monitor(), og.zclip(),
        og.skip_on_spike(_adam(c), sigma=4.0, window=64, min_history=32))),
}
NEEDS = ("monitor", "guard_stats", "warmup", "inverse_sqrt_decay")


class Block(nnx.Module):
  """Pre-LN transformer block: causal multi-head self-attention, then a GELU MLP."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.proj = nnx.Linear(width, width, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(width, 4 * width, rngs=rngs)
    self.fc2 = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    h = self.heads
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    q, k, v = (t.reshape(b, n, h, d // h) for t in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
    causal = jnp.tril(jnp.ones((n, n), bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(b, n, d)
    x = x + self.proj(att)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class TransformerLM(nnx.Module):
  """Decoder-only LM: ``tokens [batch, length] -> logits [batch, length, vocab]``."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.tok = nnx.Embed(config.vocab, config.width, rngs=rngs)
    self.pos = nnx.Embed(config.length, config.width, rngs=rngs)
    self.blocks = nnx.List([Block(config.width, config.heads, rngs=rngs)
                            for _ in range(config.layers)])
    self.ln = nnx.LayerNorm(config.width, rngs=rngs)
    self.head = nnx.Linear(config.width, config.vocab, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.tok(tokens) + self.pos(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x))


@functools.lru_cache(maxsize=4)
def markov_chain(vocab: int, noise: float, seed: int = 7) -> tuple[np.ndarray, float]:
  """The chain's table ``[vocab, vocab] -> next token`` and its entropy rate (nats)."""
  table = np.random.default_rng(seed).integers(0, vocab, (vocab, vocab))
  p_top = 1 - noise + noise / vocab
  p_other = noise / vocab
  entropy = -sum(n * p * math.log(p) for n, p in ((1, p_top), (vocab - 1, p_other)) if p > 0)
  return table, entropy


def make_sequences(rng: np.random.Generator, shape: tuple[int, ...], length: int, vocab: int,
                   noise: float) -> np.ndarray:
  """Token sequences ``[*shape, length + 1]`` (int32) from the Markov chain."""
  table, _ = markov_chain(vocab, noise)
  seq = np.empty((*shape, length + 1), np.int32)
  seq[..., :2] = rng.integers(0, vocab, (*shape, 2))
  random_tok = rng.integers(0, vocab, (*shape, length + 1))
  use_random = rng.random((*shape, length + 1)) < noise
  for t in range(2, length + 1):
    nxt = table[seq[..., t - 2], seq[..., t - 1]]
    seq[..., t] = np.where(use_random[..., t], random_tok[..., t], nxt)
  return seq


def glitch_steps(config: Config) -> np.ndarray:
  """Steps whose batch is corrupted (``[]`` when ``glitch_every`` is 0)."""
  if config.glitch_every <= 0:
    return np.zeros(0, np.int64)
  steps = np.arange(config.glitch_every // 2, config.steps, config.glitch_every)
  return steps[steps < config.steps - config.steps // 10]


def corrupt(rng: np.random.Generator, seq: np.ndarray, vocab: int) -> np.ndarray:
  """Each sequence of ``seq [..., length]`` becomes one random token repeated."""
  return np.broadcast_to(rng.integers(0, vocab, seq.shape[:-1])[..., None], seq.shape).copy()


def init_params(config: Config, seed: int):
  """``(graphdef, params)``: kernels ``N(0, 1/fan_in)``, embeddings ``N(0, 1)``."""
  abstract = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)

  def std(name, shape):
    return 1.0 if name.endswith("embedding") else 1.0 / math.sqrt(shape[-2])

  return graphdef, C.numpy_init(state, seed, std)


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


def _train(config: Config, make_tx: Callable, bar) -> dict[str, Any]:
  inits = [init_params(config, s) for s in range(config.seeds)]
  graphdef = inits[0][0]
  params = C.stack([p for _, p in inits])
  tx = optax.with_extra_args_support(make_tx(config))
  data = np.stack([make_sequences(np.random.default_rng(100 + s), (config.steps, config.batch),
                                  config.length, config.vocab, config.noise)
                   for s in range(config.seeds)], axis=1)  # [steps, seeds, batch, length+1]
  glitches = glitch_steps(config)
  data[glitches] = corrupt(np.random.default_rng(5), data[glitches], config.vocab)
  val = make_sequences(np.random.default_rng(99), (config.val_size,), config.length,
                       config.vocab, config.noise)

  def loss_fn(params, tokens):
    model = nnx.merge(graphdef, params)
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def one(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    stats = og.guard_stats(opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, stats

  def step(carry, inputs):
    params, opt_state = carry
    params, opt_state, loss, stats = jax.vmap(one)(params, opt_state, inputs[1])
    return (params, opt_state), (loss, stats)

  opt_state = jax.jit(jax.vmap(tx.init))(params)
  (params, _), (loss, stats) = C.scan_loop(step, (params, opt_state), config.steps, xs=data,
                                           bar=bar)
  val_loss = np.asarray(jax.jit(jax.vmap(loss_fn, in_axes=(0, None)))(params, val))
  stats = {k: np.asarray(v, np.float64).T for k, v in stats.items()}
  skipped = np.zeros(config.seeds, np.int64)
  for k, v in stats.items():
    if k.endswith("num_skipped"):
      skipped += v[:, -1].astype(np.int64)
  return {"loss": loss.T, "grad_norm": C.first(stats, "monitor/global_norm"), "stats": stats,
          "skipped": skipped, "val_loss": val_loss}


def run(config: Config = Config(), *, guards: Sequence[str] | None = None,
        progress: bool | None = None) -> C.ExperimentResult:
  """Trains the LM once per defence (all seeds together); one row per defence."""
  names = C.select(list(DEFENCES) if guards else list(config.defences), guards)
  notes, todo, runs = [], [], []
  for name in names:
    lacking = C.missing(*NEEDS, *DEFENCES[name][0])
    if lacking:
      notes.append(f"{name}: skipped, optax_guard lacks {', '.join(lacking)}")
    else:
      todo.append(name)
  _, entropy = markov_chain(config.vocab, config.noise)
  glitches = glitch_steps(config)
  setting = (f"peak lr {config.peak_lr:g}, {len(glitches)} glitch batches")
  bar = C.progress(len(todo) * C.num_chunks(config.steps), NAME, progress)
  with C.Timer() as total:
    for name in todo:
      with C.Timer() as timer:
        out = _train(config, DEFENCES[name][1], bar)
      spikes = count_spikes(out["loss"], config.spike_ratio)
      r = C.Run(setting=setting, defence=name, loss=out["loss"], grad_norm=out["grad_norm"],
                skipped=out["skipped"], wall_s=timer.s, extra=out["stats"],
                metrics={"val_loss": out["val_loss"].tolist(), "spikes": spikes.tolist()})
      bad = r.first_nonfinite_step()
      if any(b is not None for b in bad):
        r.note = "NaN at step " + ",".join("-" if b is None else str(b) for b in bad)
      runs.append(r)
  bar.close()
  return C.ExperimentResult(
      name=NAME,
      title=(f"Transformer LM ({config.layers} layers, width {config.width}), Adam, warmup + "
             f"inverse-sqrt decay to peak lr {config.peak_lr:g}, median of {config.seeds} seeds"),
      config=dataclasses.asdict(config), runs=runs, metric="val_loss", metric_label="val loss",
      notes=notes,
      checks={"entropy_rate_nats": round(entropy, 4),
              "uniform_loss_nats": round(math.log(config.vocab), 4),
              "glitch_steps": glitches.tolist()},
      wall_s=total.s)
