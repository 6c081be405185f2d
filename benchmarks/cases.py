"""What is timed: optimizer steps, standalone tree operations, compilations.

Every step variant is ``adam`` alone or ``adam`` with one defence on top; a
variant whose optax_guard factory is not exported (yet) is skipped with a note,
so the runner works on any checkout.

``extra_passes`` is the number of extra full reads of the gradients that the
variant needs on top of Adam's own traffic, in the ideal fused program: a norm
is one read (the scale by one factor fuses into Adam's read of the gradients),
an elementwise clip is none, a guard around a clip two (its own norm and the
clip's).

Adam reads the gradients, parameters, ``mu`` and ``nu`` and writes the last
three (7 tree-sized transfers), so the traffic bound of a variant is
``adam * (1 + extra_passes / 7)``.

A variant with ``fused=True`` is timed as ``og.update_and_apply(tx, ...)``
instead of ``tx.update`` followed by ``optax.apply_updates``; ``base`` names the
unguarded variant its overhead is measured against (the guard's own cost).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

import optax_guard as og

LEARNING_RATE = 1e-3
MAX_NORM = 1.0
MAX_VALUE = 1e-3
ADAM_TRANSFERS = 7


@dataclasses.dataclass(frozen=True)
class StepVariant:
  """One optimizer, timed as a full jitted and donated training step."""

  name: str
  code: str  # what the user writes, shown in the tables
  build: Callable[[], optax.GradientTransformation]
  needs: tuple[str, ...] = ()  # optax_guard names it uses
  equiv: str | None = None  # name of optax's equivalent variant
  equiv_exact: bool = False  # same semantics (else: the closest optax has)
  extra_passes: int = 1
  group: str = "ours"  # "baseline", "ours" or "optax"
  fused: bool = False  # timed through og.update_and_apply
  base: str | None = None  # the unguarded variant this one wraps
  refs: tuple[str, ...] = ()  # variants selected with this one (--only)
  compile_ref: str | None = None  # the optax chain its compile time is held to


def _adam():
  return optax.adam(LEARNING_RATE)


def _og(name: str) -> Any:
  return getattr(og, name)


def _guarded(guard: str) -> Callable[[], optax.GradientTransformation]:
  return lambda: _og(guard)(optax.chain(_og("clip_by_global_norm")(MAX_NORM), _adam()))


CHAIN = "og.clip_by_global_norm"  # the unguarded chain(og.clip_by_global_norm(1), adam)


def step_variants() -> list[StepVariant]:
  """All step variants, baseline first, then ours, then optax's."""
  adam = _adam
  return [
      StepVariant("adam", "adam", adam, extra_passes=0, group="baseline"),
      StepVariant(
          "og.clip_by_global_norm", "chain(og.clip_by_global_norm(1), adam)",
          lambda: optax.chain(_og("clip_by_global_norm")(MAX_NORM), adam()),
          needs=("clip_by_global_norm",), equiv="optax.clip_by_global_norm",
          equiv_exact=True, compile_ref="optax.clip_by_global_norm",
      ),
      StepVariant(
          "og.clip_by_norm", "chain(og.clip_by_norm(1), adam)",
          lambda: optax.chain(_og("clip_by_norm")(MAX_NORM), adam()),
          needs=("clip_by_norm",),
      ),
      StepVariant(
          "og.clip_by_value", "chain(og.clip_by_value(1e-3), adam)",
          lambda: optax.chain(_og("clip_by_value")(MAX_VALUE), adam()),
          needs=("clip_by_value",), equiv="optax.clip", equiv_exact=True,
          extra_passes=0,
      ),
      StepVariant(
          "og.zclip", "chain(og.zclip(), adam)",
          lambda: optax.chain(_og("zclip")(), adam()),
          needs=("zclip",), equiv="optax.clip_by_global_norm",
      ),
      StepVariant(
          "og.autoclip", "chain(og.autoclip(), adam)",
          lambda: optax.chain(_og("autoclip")(), adam()),
          needs=("autoclip",), equiv="optax.clip_by_global_norm",
      ),
      StepVariant(
          "og.skip_nonfinite", "og.skip_nonfinite(chain(og.clip_by_global_norm(1), adam))",
          _guarded("skip_nonfinite"), needs=("skip_nonfinite", "clip_by_global_norm"),
          equiv="optax.apply_if_finite", equiv_exact=True, extra_passes=2, base=CHAIN,
      ),
      StepVariant(
          "og.skip_nonfinite:fused",
          "og.update_and_apply(og.skip_nonfinite(chain(og.clip_by_global_norm(1), adam)))",
          _guarded("skip_nonfinite"),
          needs=("update_and_apply", "skip_nonfinite", "clip_by_global_norm"),
          equiv="optax.apply_if_finite", equiv_exact=True, extra_passes=2, fused=True,
          base=CHAIN, refs=("og.skip_nonfinite",),
      ),
      StepVariant(
          "og.skip_on_spike", "og.skip_on_spike(chain(og.clip_by_global_norm(1), adam))",
          _guarded("skip_on_spike"), needs=("skip_on_spike", "clip_by_global_norm"),
          equiv="optax.apply_if_finite", extra_passes=2, base=CHAIN,
      ),
      StepVariant(
          "og.skip_on_spike:fused",
          "og.update_and_apply(og.skip_on_spike(chain(og.clip_by_global_norm(1), adam)))",
          _guarded("skip_on_spike"),
          needs=("update_and_apply", "skip_on_spike", "clip_by_global_norm"),
          equiv="optax.apply_if_finite", extra_passes=2, fused=True, base=CHAIN,
          refs=("og.skip_on_spike",), compile_ref="optax.clip_by_global_norm",
      ),
      StepVariant(
          "flat:og.clip_by_global_norm",
          "optax.flatten(chain(og.clip_by_global_norm(1), adam))",
          lambda: optax.flatten(optax.chain(_og("clip_by_global_norm")(MAX_NORM), adam())),
          needs=("clip_by_global_norm",), base=CHAIN,
      ),
      StepVariant(
          "flat:og.skip_on_spike:fused",
          "og.update_and_apply(og.skip_on_spike(optax.flatten(chain(og.clip_by_global_norm(1), "
          "adam))))",
          lambda: _og("skip_on_spike")(
              optax.flatten(optax.chain(_og("clip_by_global_norm")(MAX_NORM), adam()))),
          needs=("update_and_apply", "skip_on_spike", "clip_by_global_norm"), fused=True,
          base=CHAIN, refs=("og.skip_on_spike:fused",),
      ),
      StepVariant(
          "og.monitor", "chain(og.monitor(), adam)",
          lambda: optax.chain(_og("monitor")(), adam()),
          needs=("monitor",),
      ),
      StepVariant(
          "og.stable_adamw", "og.stable_adamw(1e-3, weight_decay=0.1)",
          lambda: _og("stable_adamw")(LEARNING_RATE, weight_decay=0.1),
          needs=("stable_adamw",), equiv="optax.adamw", base="optax.adamw",
          refs=("optax.adamw+clip",), compile_ref="optax.adamw+clip",
      ),
      StepVariant(
          "og.spam", "og.spam(1e-3, weight_decay=0.1)",
          lambda: _og("spam")(LEARNING_RATE, weight_decay=0.1),
          needs=("spam",), equiv="optax.adamw", base="optax.adamw",
          refs=("optax.adamw+clip",), compile_ref="optax.adamw+clip",
      ),
      StepVariant(
          "og.adagc", "chain(og.adagc(), adam)",
          lambda: optax.chain(_og("adagc")(), adam()),
          needs=("adagc",), equiv="optax.clip_by_global_norm", base="adam",
          compile_ref="optax.clip_by_global_norm",
      ),
      StepVariant(
          "og.clip_by_historical_norm",
          "chain(scale_by_adam(), og.clip_by_historical_norm(2), scale_by_learning_rate(1e-3))",
          lambda: optax.chain(optax.scale_by_adam(), _og("clip_by_historical_norm")(2.0),
                              optax.scale_by_learning_rate(LEARNING_RATE)),
          needs=("clip_by_historical_norm",), base="adam",
      ),
      StepVariant(
          "optax.adamw", "optax.adamw(1e-3, weight_decay=0.1)",
          lambda: optax.adamw(LEARNING_RATE, weight_decay=0.1), extra_passes=0, group="optax",
      ),
      StepVariant(
          "optax.adamw+clip", "chain(optax.clip_by_global_norm(1), optax.adamw(1e-3, "
          "weight_decay=0.1))",
          lambda: optax.chain(optax.clip_by_global_norm(MAX_NORM),
                              optax.adamw(LEARNING_RATE, weight_decay=0.1)),
          group="optax",
      ),
      StepVariant(
          "optax.clip_by_global_norm", "chain(optax.clip_by_global_norm(1), adam)",
          lambda: optax.chain(optax.clip_by_global_norm(MAX_NORM), adam()),
          group="optax",
      ),
      StepVariant(
          "optax.clip", "chain(optax.clip(1e-3), adam)",
          lambda: optax.chain(optax.clip(MAX_VALUE), adam()),
          extra_passes=0, group="optax",
      ),
      StepVariant(
          "optax.apply_if_finite",
          "optax.apply_if_finite(chain(optax.clip_by_global_norm(1), adam), 5)",
          lambda: optax.apply_if_finite(
              optax.chain(optax.clip_by_global_norm(MAX_NORM), adam()),
              max_consecutive_errors=5,
          ),
          extra_passes=2, group="optax",
      ),
  ]


def variant(name: str) -> StepVariant:
  """The step variant called ``name``."""
  return next(v for v in step_variants() if v.name == name)


def missing(variant: StepVariant) -> list[str]:
  """The optax_guard names a variant needs that are not exported."""
  exported = set(getattr(og, "__all__", ()))
  return [n for n in variant.needs if n not in exported or not hasattr(og, n)]


@dataclasses.dataclass(frozen=True)
class Standalone:
  """One operation on the gradient tree alone (no optimizer)."""

  name: str
  code: str
  kind: str  # "norm" (reads the tree) or "map" (tree -> tree, donated)
  fn: Callable[..., Any]
  needs: tuple[str, ...] = ()
  equiv: str | None = None
  bound: bool = False  # the practical bandwidth bound of this section


def _og_global_norm(tree):
  from optax_guard import _numerics

  return _numerics.global_norm(tree)


def _og_clip(tree, c):
  del c
  return og.clip_by_global_norm(MAX_NORM).update(tree, optax.EmptyState())[0]


def _optax_clip(tree, c):
  del c
  return optax.clip_by_global_norm(MAX_NORM).update(tree, optax.EmptyState())[0]


def _scale(tree, c):
  return jax.tree.map(lambda x: x * c.astype(x.dtype), tree)


def standalone_cases() -> list[Standalone]:
  return [
      Standalone("norm:og", "og float32 global norm (as in og.clip_by_global_norm)", "norm",
                 _og_global_norm,
                 needs=("clip_by_global_norm",), equiv="norm:optax"),
      Standalone("norm:optax", "optax.tree.norm(g)  (= optax.global_norm)", "norm",
                 lambda t: optax.tree.norm(t)),
      Standalone("clip:og", "og.clip_by_global_norm(1).update(g)", "map", _og_clip,
                 needs=("clip_by_global_norm",), equiv="clip:optax"),
      Standalone("clip:optax", "optax.clip_by_global_norm(1).update(g)", "map",
                 _optax_clip),
      Standalone("scale (bound)", "tree_map(lambda x: x * c.astype(x.dtype), g)", "map", _scale,
                 bound=True),
  ]
