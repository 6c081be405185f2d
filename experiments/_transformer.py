"""The small decoder-only transformer and the Markov-chain language of the LM experiments.

Model: a Flax NNX decoder-only transformer (token + position embeddings,
``layers`` pre-LayerNorm blocks of causal multi-head attention and a GELU MLP,
final LayerNorm, untied read-out). With ``qk_norm=True`` the queries and keys
of every head go through their own LayerNorm before the dot product
(Dehghani et al. 2023; Wortsman et al. 2023): the architectural fix for
attention-logit growth. The forward pass also returns the largest attention
logit and the mean log-partition ``log Z`` of the output logits, the two
quantities Wortsman et al. watch for their two instabilities, and, per
layer, the largest logit of every head (under ``stop_gradient``): what
``og.qk_clip`` reads as ``attn_max_logits=``.

Data: token sequences from a fixed random second-order Markov chain over
``vocab`` tokens: with probability ``1 - noise`` the next token is
``table[previous two]``, otherwise uniform. The best achievable loss is the
chain's entropy rate, far below ``log(vocab)``.

Shared by the LM experiments: :class:`LMConfig`, the sizes every one of their
``Config`` classes extends; :func:`data`, their training batches and
validation set; :func:`init_models`, :func:`val_losses` and :func:`outputs`,
the start and end of their training; :func:`loss_checks`, the reference
losses of the language; :func:`result`, their result.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import _common as C


class Block(nnx.Module):
  """Pre-LN block: causal multi-head self-attention (optionally qk-LayerNorm), GELU MLP."""

  def __init__(self, width: int, heads: int, qk_norm: bool, *, rngs: nnx.Rngs):
    self.heads = heads
    head = width // heads
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.q_norm = nnx.LayerNorm(head, rngs=rngs) if qk_norm else None
    self.k_norm = nnx.LayerNorm(head, rngs=rngs) if qk_norm else None
    self.proj = nnx.Linear(width, width, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(width, 4 * width, rngs=rngs)
    self.fc2 = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x, per-head largest attention logit [heads])``."""
    b, n, d = x.shape
    h = self.heads
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    q, k, v = (t.reshape(b, n, h, d // h) for t in (q, k, v))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
    causal = jnp.tril(jnp.ones((n, n), bool))
    # per head, over the batch and every (query, key) pair the mask lets through
    top = jax.lax.stop_gradient(jnp.max(jnp.where(causal, logits, -jnp.inf), axis=(0, 2, 3)))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(b, n, d)
    x = x + self.proj(att)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)))), top


class TransformerLM(nnx.Module):
  """``tokens [batch, length] -> (logits [batch, length, vocab], max logits [layers, heads])``."""

  def __init__(self, vocab: int, length: int, width: int, heads: int, layers: int,
               qk_norm: bool = False, *, rngs: nnx.Rngs):
    self.tok = nnx.Embed(vocab, width, rngs=rngs)
    self.pos = nnx.Embed(length, width, rngs=rngs)
    self.blocks = nnx.List([Block(width, heads, qk_norm, rngs=rngs) for _ in range(layers)])
    self.ln = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, vocab, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = self.tok(tokens) + self.pos(jnp.arange(tokens.shape[1]))
    tops = []
    for block in self.blocks:
      x, top = block(x)
      tops.append(top)
    return self.head(self.ln(x)), jnp.stack(tops)


def init_params(vocab: int, length: int, width: int, heads: int, layers: int, qk_norm: bool,
                seed: int) -> tuple[Any, Any]:
  """``(graphdef, params)``: kernels ``N(0, 1/fan_in)``, embeddings ``N(0, 1)``."""
  abstract = nnx.eval_shape(lambda: TransformerLM(vocab, length, width, heads, layers, qk_norm,
                                                  rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)

  def std(name, shape):
    return 1.0 if name.endswith("embedding") else 1.0 / math.sqrt(shape[-2])

  return graphdef, C.numpy_init(state, seed, std)


def lm_loss(graphdef: Any, params: Any, tokens: jax.Array) -> tuple[jax.Array, dict]:
  """Next-token cross-entropy and its diagnostics.

  The diagnostics: ``"max_attn_logit"`` (the largest attention logit of the
  batch), ``"log_z"`` (the mean log-partition of the output softmax) and
  ``"attn_max_logits"``, every head's largest logit ``[layers, heads]`` (no
  gradient flows through it).
  """
  model = nnx.merge(graphdef, params)
  logits, tops = model(tokens[:, :-1])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  log_z = jnp.mean(jax.nn.logsumexp(logits, axis=-1))
  return loss, {"max_attn_logit": jnp.max(tops), "log_z": log_z, "attn_max_logits": tops}


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


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """The settings every LM experiment has: run (``steps``, set by each experiment,
  and ``seeds``), data (``batch`` sequences of ``length + 1`` tokens from the
  chain over ``vocab`` tokens with ``noise``; ``val_size`` validation
  sequences), model (``width``, ``heads``, ``layers``) and optimizer (the
  learning-rate warm-up's ``warmup_steps``, the global clip's ``clip_norm``).
  Each experiment's ``Config`` extends it."""

  steps: int
  seeds: int = 2
  vocab: int = 32
  length: int = 16
  batch: int = 8
  width: int = 32
  heads: int = 4
  layers: int = 2
  noise: float = 0.1
  warmup_steps: int = 30
  clip_norm: float = 1.0
  val_size: int = 256


def data(config: LMConfig) -> tuple[np.ndarray, np.ndarray]:
  """Training batches ``[steps, seeds, batch, length + 1]`` and the validation sequences
  ``[val_size, length + 1]``."""
  train = np.stack([make_sequences(np.random.default_rng(100 + s),
                                   (config.steps, config.batch), config.length,
                                   config.vocab, config.noise)
                    for s in range(config.seeds)], axis=1)
  val = make_sequences(np.random.default_rng(99), (config.val_size,), config.length,
                       config.vocab, config.noise)
  return train, val


def init_models(config: LMConfig, seeds: Sequence[int], qk_norm: bool = False) -> tuple[Any, Any]:
  """``(graphdef, params)``: the initial parameters of every seed, stacked on a leading axis."""
  inits = [init_params(config.vocab, config.length, config.width, config.heads, config.layers,
                       qk_norm, int(s)) for s in seeds]
  return inits[0][0], C.stack([p for _, p in inits])


def val_losses(graphdef: Any, params: Any, val: np.ndarray) -> np.ndarray:
  """The loss on ``val`` of every model of the stacked ``params``."""
  return np.asarray(jax.jit(jax.vmap(lambda p: lm_loss(graphdef, p, val)[0]))(params))


def outputs(loss: np.ndarray, curves: dict[str, Any], val_loss: np.ndarray) -> dict[str, Any]:
  """What a training returns, per run: ``loss`` and every curve as ``[runs, steps]``
  (the loop's outputs are ``[steps, runs]``), ``grad_norm`` (``og.monitor()``'s),
  ``skipped`` (the final total of every guard's ``num_skipped``) and ``val_loss``."""
  curves = {k: np.asarray(v, np.float64).T for k, v in curves.items()}
  skipped = C.skipped_from_curves(curves)
  return {"loss": loss.T, "grad_norm": curves["monitor/global_norm"], "curves": curves,
          "skipped": np.zeros(len(val_loss), np.int64) if skipped is None else skipped,
          "val_loss": val_loss}


def result(name: str, title: str, config: LMConfig, runs: list[C.Run],
           **kwargs: Any) -> C.ExperimentResult:
  """The result of an LM experiment: its table's metric is the validation loss."""
  return C.ExperimentResult(name=name, title=title, config=dataclasses.asdict(config),
                            runs=runs, metric="val_loss", metric_label="val loss", **kwargs)


def loss_checks(config: LMConfig, uniform: bool = True) -> dict[str, float]:
  """The chain's entropy rate, the loss of a uniform guess (``uniform``) and the best
  possible loss of a sequence (its first token uniform, the rest at the entropy rate)."""
  _, entropy = markov_chain(config.vocab, config.noise)
  checks = {"entropy_rate_nats": round(entropy, 4)}
  if uniform:
    checks["uniform_loss_nats"] = round(math.log(config.vocab), 4)
  checks["best_possible_loss_nats"] = round(
      (math.log(config.vocab) + (config.length - 1) * entropy) / config.length, 4)
  return checks
