"""Checks of hyperparameters (at construction) and of trees (at trace time).

Every check names the function (``owner``), the argument and the value it
got, so a user sees ``clip_by_global_norm(max_norm=...) must be > 0, got
-1.0`` and not an XLA shape error three calls later.

* Types and shapes are static, so they are checked always, even for tracers
  (``optax.inject_hyperparams`` re-calls a factory with traced
  hyperparameters every step): a numeric hyperparameter is a real scalar of
  shape ``()``, never a ``bool``; ``axis_name`` is a string or a tuple of
  strings; a mask is None, a callable or a tree of bools.
* Values (``> 0``, finite, in a range) are checked for Python and NumPy
  numbers. JAX arrays pass the value checks, concrete or traced, so that a
  factory under ``optax.inject_hyperparams`` behaves the same eagerly (where
  it receives concrete arrays) and under ``jit`` (where it receives tracers).
* Options that select an algorithm or a shape (``ord``, ``axis``) must be
  Python values; a JAX array there (what ``inject_hyperparams`` makes of an
  int unless the argument is in ``static_args``) raises a ``TypeError`` that
  says so, eagerly and under ``jit`` alike.
* Trees: leaves must be floating point (integer and bool leaves raise a
  ``TypeError`` naming the leaf path), and a ``params`` tree must match the
  updates leaf for leaf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The accepted spellings of a norm order; ``None`` means 2.
NormOrd = int | float | str | None
# A unit axis: None, an int, or a tuple of ints.
UnitAxis = int | Sequence[int] | None
# The mapped axis of ``pmap``/``shard_map`` to reduce over.
AxisName = str | tuple[str, ...] | None
# Stacked (scanned) layers: how many leading axes of a leaf index layers.
# None (no leaf is stacked), an int for every leaf, a tree of ints (or None)
# that is a prefix of the updates tree, or a callable ``(path, leaf) -> int``.
Stacked = Any


def _fail(owner: str, name: str, value: Any, rule: str) -> ValueError:
  return ValueError(f"{owner}({name}=...) must be {rule}, got {value!r}")


def is_jax(value: Any) -> bool:
  """True for JAX arrays and tracers."""
  return isinstance(value, (jax.Array, jax.core.Tracer))


def _concrete_float(value: Any) -> float | None:
  """The value of a NumPy scalar; None for JAX arrays and tracers."""
  if is_jax(value):
    return None
  return float(np.asarray(value))


def _dtype_kind(owner: str, name: str, value: Any, dtype: Any, *, what: str) -> None:
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    raise TypeError(f"{owner}({name}=...) must be {what}, not a bool, got {value!r}")
  if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(f"{owner}({name}=...) must be {what}, got {value!r} of dtype {dtype}")


def number(owner: str, name: str, value: Any) -> float | None:
  """Checks ``value`` is a real scalar and not NaN; returns it when concrete.

  See :func:`scalar` for what is accepted.
  """
  v = scalar(owner, name, value)
  if v is not None and math.isnan(v):
    raise _fail(owner, name, value, "a number, not NaN")
  return v


def scalar(owner: str, name: str, value: Any) -> float | None:
  """Checks ``value`` is a real scalar (NaN and inf allowed); returns it when concrete.

  Accepts Python ``int``/``float``, NumPy scalars and shape-``()`` arrays, and
  JAX arrays and tracers of shape ``()`` with an integer or float dtype
  (returns None for those: their values are not checked).
  Raises ``TypeError`` for bools, strings, containers, complex numbers and
  ``ValueError`` for arrays with dimensions.
  """
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{owner}({name}=...) must be a number, not a bool, got {value!r}")
  if isinstance(value, (int, float)):
    v: float | None = float(value)
  elif is_jax(value) or isinstance(value, (np.ndarray, np.generic)):
    shape = tuple(np.shape(value))
    if shape != ():
      raise ValueError(
          f"{owner}({name}=...) must be a scalar, got an array of shape {shape}"
      )
    _dtype_kind(owner, name, value, value.dtype, what="a real number")
    v = _concrete_float(value)
  else:
    raise TypeError(
        f"{owner}({name}=...) must be a number, got {value!r} of type {type(value).__name__}"
    )
  return v


def positive(owner: str, name: str, value: Any, *, finite: bool = False) -> None:
  """``value > 0`` (and finite if asked)."""
  v = number(owner, name, value)
  if v is not None and not v > 0:
    raise _fail(owner, name, value, "> 0")
  if v is not None and finite and not math.isfinite(v):
    raise _fail(owner, name, value, "finite")


def non_negative(owner: str, name: str, value: Any, *, finite: bool = False) -> None:
  """``value >= 0`` (and finite if asked)."""
  v = number(owner, name, value)
  if v is not None and not v >= 0:
    raise _fail(owner, name, value, ">= 0")
  if v is not None and finite and not math.isfinite(v):
    raise _fail(owner, name, value, "finite")


def in_range(
    owner: str, name: str, value: Any, lo: float, hi: float,
    *, lo_open: bool = False, hi_open: bool = False, why: str = "",
) -> None:
  """``lo <= value <= hi`` (with open ends if asked); ``why`` explains the bound.

  With ``hi = inf`` (included) the message says ``>= lo`` (``> lo`` if open).
  """
  v = number(owner, name, value)
  if v is None:
    return
  ok_lo = v > lo if lo_open else v >= lo
  ok_hi = v < hi if hi_open else v <= hi
  if not (ok_lo and ok_hi):
    if hi == math.inf and not hi_open:
      raise _fail(owner, name, value, f"{'>' if lo_open else '>='} {lo}{why}")
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    raise _fail(owner, name, value, f"in {left}{lo}, {hi}{right}{why}")


def finite(owner: str, name: str, value: Any) -> None:
  """``value`` is a finite number."""
  v = number(owner, name, value)
  if v is not None and not math.isfinite(v):
    raise _fail(owner, name, value, "finite")


def ordered(
    owner: str, lo_name: str, lo: Any, hi_name: str, hi: Any, *, strict: bool = False,
    why: str = "",
) -> None:
  """``lo <= hi`` (``lo < hi`` if ``strict``) when both are concrete.

  The message names ``lo`` as the argument at fault and ``hi`` with its value,
  then ``why`` (the reason, in parentheses): ``f(min_history=...) must be <=
  window=8, got 9``.
  """
  a, b = number(owner, lo_name, lo), number(owner, hi_name, hi)
  if a is not None and b is not None and (a >= b if strict else a > b):
    relation = "<" if strict else "<="
    raise _fail(owner, lo_name, lo, f"{relation} {hi_name}={hi!r}{why}")


def integer(owner: str, name: str, value: Any, *, minimum: int | None = None) -> None:
  """An integer scalar (Python, NumPy or JAX), at least ``minimum`` when concrete."""
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{owner}({name}=...) must be an int, not a bool, got {value!r}")
  if is_jax(value) or isinstance(value, (np.ndarray, np.generic)):
    shape = tuple(np.shape(value))
    if shape != ():
      raise ValueError(f"{owner}({name}=...) must be a scalar, got an array of shape {shape}")
    if not jnp.issubdtype(value.dtype, jnp.integer) or value.dtype == bool:
      raise TypeError(f"{owner}({name}=...) must be an int, got {value!r} of dtype {value.dtype}")
    v = _concrete_float(value)
  elif isinstance(value, int):
    v = float(value)
  else:
    raise TypeError(f"{owner}({name}=...) must be an int, got {value!r}")
  if v is not None and minimum is not None and v < minimum:
    raise _fail(owner, name, value, f">= {minimum}")


def concrete_size(owner: str, name: str, value: Any) -> int:
  """The int value of a size that fixes a state shape (``window``, ``history_size``).

  Called by ``init``: under ``optax.inject_hyperparams`` inside ``jit`` or
  ``jax.eval_shape`` the size is a tracer, and the error says to list it in
  ``static_args``. Values were range-checked at construction.
  """
  try:
    return int(np.asarray(value))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    raise ValueError(
        f"{owner}({name}=...) must be concrete when init runs (it sets a state shape), "
        f"got a tracer: under optax.inject_hyperparams inside jit/eval_shape pass "
        f"static_args=({name!r},)"
    ) from None


def flag(owner: str, name: str, value: Any) -> bool:
  """A Python or NumPy bool."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{owner}({name}=...) must be a bool, got {value!r}")
  return bool(value)


def choice(owner: str, name: str, value: Any, choices: Sequence[Any]) -> None:
  """``value`` is one of ``choices`` (compared with its type)."""
  if not any(value == c and type(value) is type(c) or value is c for c in choices):
    raise _fail(owner, name, value, f"one of {list(choices)!r}")


def _static_hint(owner: str, name: str, value: Any, accepted: str) -> TypeError:
  return TypeError(
      f"{owner}({name}=...) selects the algorithm and must be a Python value "
      f"({accepted}), got a JAX array {value!r}; optax.inject_hyperparams turns "
      f"numbers into arrays: pass static_args=({name!r},)"
  )


def norm_ord(owner: str, value: Any) -> NormOrd:
  """``ord`` in {None, 1, 2, inf, 'inf'}; returns it unchanged."""
  accepted = "None, 1, 2, inf or 'inf'"
  if is_jax(value):
    raise _static_hint(owner, "ord", value, accepted)
  if value is None:
    return None
  ok = False
  if isinstance(value, str):
    ok = value == "inf"
  elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
      value, (bool, np.bool_)
  ):
    ok = float(value) in (1.0, 2.0, math.inf)
  if not ok:
    raise _fail(owner, "ord", value, f"one of {accepted}")
  return value


def _is_int(a: Any) -> bool:
  return isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_))


def unit_axis(owner: str, value: Any) -> UnitAxis:
  """``axis`` is None, an int or a non-empty tuple/list of ints.

  Returns None, an int or a tuple of ints.
  """
  if is_jax(value):
    raise _static_hint(owner, "axis", value, "None, an int or a tuple of ints such as (0,)")
  if value is None:
    return None
  if _is_int(value):
    return int(value)
  if isinstance(value, (tuple, list)) and value and all(_is_int(a) for a in value):
    return tuple(int(a) for a in value)
  raise _fail(owner, "axis", value, "None, an int or a non-empty tuple of ints")


def axis_name(owner: str, value: Any) -> AxisName:
  """``axis_name`` is None, a string or a non-empty tuple of distinct strings.

  A list is taken as a tuple. Returns the string or the tuple.
  """
  if value is None or isinstance(value, str):
    return value
  if not isinstance(value, (tuple, list)) or not all(isinstance(a, str) for a in value):
    raise TypeError(
        f"{owner}(axis_name=...) must be None, a string or a tuple of strings (the "
        f"mapped axes of pmap/shard_map), got {value!r}"
    )
  if not value or len(set(value)) != len(value):
    raise _fail(owner, "axis_name", value, "a non-empty tuple of distinct axis names")
  return tuple(value)


def stacked(owner: str, value: Any) -> Any:
  """``stacked`` is None, an int ``>= 0``, a callable, or a tree of those ints.

  Returns it unchanged; the per-leaf counts are resolved (and checked against
  each leaf's number of dimensions) by ``_numerics.stacked_counts``.
  """
  if value is None or callable(value):
    return value
  if is_jax(value):
    raise _static_hint(owner, "stacked", value, "None, an int, a tree of ints or a callable")
  for path, leaf in jax.tree.flatten_with_path(value, is_leaf=lambda x: x is None)[0]:
    if leaf is None:
      continue
    if not _is_int(leaf) or int(leaf) < 0:
      where = jax.tree_util.keystr(path)
      raise TypeError(
          f"{owner}(stacked=...) must be None, an int >= 0 (the number of leading "
          f"layer axes), a callable (path, leaf) -> int, or a tree of such ints; "
          f"got {leaf!r}" + (f" at {where}" if where else "")
      )
  return value


def _is_bool_leaf(x: Any) -> bool:
  if isinstance(x, (bool, np.bool_)):
    return True
  return (is_jax(x) or isinstance(x, np.ndarray)) and np.shape(x) == () and x.dtype == bool


def mask_tree(owner: str, mask: Any) -> None:
  """A tree of bools (a mask after a callable mask has been applied)."""
  for path, leaf in jax.tree.flatten_with_path(mask)[0]:
    if not _is_bool_leaf(leaf):
      where = jax.tree_util.keystr(path) or "the mask itself"
      raise TypeError(
          f"{owner}(mask=...) must be None, a callable or a tree of bools; "
          f"{where} is {leaf!r}"
      )


def mask(owner: str, value: Any) -> None:
  """``mask`` is None, a callable (checked when called) or a tree of bools."""
  if value is None or callable(value):
    return
  mask_tree(owner, value)


def callable_(owner: str, name: str, value: Any, *, hint: str = "") -> None:
  """``value`` is callable; ``hint`` is appended to the message."""
  if not callable(value):
    raise TypeError(f"{owner}({name}=...) must be callable, got {value!r}{hint}")


def needs_params(owner: str, params: Any) -> None:
  """Raises if a weight-side transform is updated without ``params``."""
  if params is None:
    raise ValueError(
        f"{owner} needs the current parameters: call "
        f"update(updates, state, params) with params, not None"
    )


def _dtype_of(x: Any) -> np.dtype:
  return np.dtype(x.dtype) if hasattr(x, "dtype") else np.dtype(jnp.result_type(x))


def float_leaves(owner: str, tree: Any, *, what: str = "updates", complex_ok: bool = True) -> None:
  """Every leaf is floating point (or complex if ``complex_ok``).

  Integer and bool leaves would be truncated by a float scale factor (a
  clipped int32 ``[3, 4]`` becomes ``[0, 0]``), so they raise a ``TypeError``
  naming the leaf path. Runs at trace time only (dtypes are static).
  """
  for path, leaf in jax.tree.flatten_with_path(tree)[0]:
    dtype = _dtype_of(leaf)
    if jnp.issubdtype(dtype, jnp.floating):
      continue
    if jnp.issubdtype(dtype, jnp.complexfloating):
      if complex_ok:
        continue
      raise TypeError(
          f"{owner} does not support complex {what}: the leaf "
          f"{jax.tree_util.keystr(path) or '(root)'} has dtype {dtype}"
      )
    raise TypeError(
        f"{owner} needs floating-point {what}: the leaf "
        f"{jax.tree_util.keystr(path) or '(root)'} has dtype {dtype}"
    )


def matching_params(owner: str, updates: Any, params: Any) -> None:
  """``params`` has the tree structure and leaf shapes of ``updates``."""
  needs_params(owner, params)
  u_struct: Any = jax.tree.structure(updates)
  p_struct: Any = jax.tree.structure(params)
  if u_struct != p_struct:
    raise ValueError(
        f"{owner}: params must have the tree structure of the updates, got "
        f"{p_struct.num_leaves} params leaves ({p_struct}) for "
        f"{u_struct.num_leaves} updates leaves ({u_struct})"
    )
  u_leaves = jax.tree.flatten_with_path(updates)[0]
  for (path, u), p in zip(u_leaves, jax.tree.leaves(params), strict=True):
    if np.shape(u) != np.shape(p):
      raise ValueError(
          f"{owner}: the params leaf {jax.tree_util.keystr(path) or '(root)'} has "
          f"shape {np.shape(p)} but its update has shape {np.shape(u)}"
      )


def params_and_updates(owner: str, updates: Any, params: Any, *, complex_ok: bool = True) -> None:
  """The opening checks of a weight-side transform: ``params`` given and matching,
  floating-point updates and params (complex ones too if ``complex_ok``)."""
  matching_params(owner, updates, params)
  float_leaves(owner, updates, complex_ok=complex_ok)
  float_leaves(owner, params, what="params", complex_ok=complex_ok)


def expand_mask(owner: str, mask: Any, params: Any) -> Any:
  """A mask (a tree of bools, a prefix of one, or a callable) as a full tree of
  Python bools matching ``params``."""
  tree = mask(params) if callable(mask) else mask
  mask_tree(owner, tree)
  try:
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub), tree, params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{owner}(mask=...) must have the tree structure of the params or a prefix "
        f"of it; mask {jax.tree.structure(tree)} does not fit params "
        f"{jax.tree.structure(params)} ({e})"
    ) from None
  return full


def rate(owner: str, name: str, value: Any) -> None:
  """A learning rate or weight decay: a schedule, or a finite number ``>= 0``."""
  if callable(value):
    return
  non_negative(owner, name, value, finite=True)


def float_dtype(owner: str, name: str, value: Any) -> Any:
  """None or a floating-point dtype, canonicalised (float64 needs x64)."""
  if value is None:
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    raise TypeError(f"{owner}({name}=...) must be None or a dtype, got {value!r}") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{owner}({name}=...) must be a floating-point dtype, got {value!r}")
  return jax.dtypes.canonicalize_dtype(dtype)


def adam_betas(owner: str, b1: Any, b2: Any, eps: Any) -> None:
  """Adam's moment decays in ``[0, 1)`` and its ``eps >= 0``, finite."""
  in_range(owner, "b1", b1, 0.0, 1.0, hi_open=True)
  in_range(owner, "b2", b2, 0.0, 1.0, hi_open=True)
  non_negative(owner, "eps", eps, finite=True)


def value_box(owner: str, max_value: Any, min_value: Any) -> tuple[Any, Any]:
  """A box ``[min_value, max_value]``; ``min_value`` defaults to ``-max_value``.

  Returns ``(min_value, max_value)``. Infinite bounds are allowed
  (``max_value=inf`` is the unbounded box). A box of zero width
  (``max_value == min_value``, e.g. ``clip_by_value(0.0)``) would replace
  everything with one constant, so it is rejected, as is an empty box.
  """
  number(owner, "max_value", max_value)
  if min_value is None:
    min_value = jnp.negative(max_value) if is_jax(max_value) else -float(max_value)
  else:
    number(owner, "min_value", min_value)
  ordered(owner, "min_value", min_value, "max_value", max_value, strict=True)
  return min_value, max_value


INT32_MAX = 2**31 - 1


def _integral(owner: str, name: str, value: Any, *, what: str) -> Any:
  """An integral float (``1e4``) as a Python int; other values unchanged."""
  if isinstance(value, (float, np.floating)):
    v = float(value)
    number(owner, name, value)  # NaN
    if not (math.isfinite(v) and v == math.floor(v)):
      raise ValueError(f"{owner}({name}=...) must {what}, got {value!r}")
    return int(v)
  return value


def whole(owner: str, name: str, value: Any, *, minimum: int) -> Any:
  """A whole number in ``[minimum, 2**31 - 1]`` (an integral float such as ``1e4`` is fine).

  Returns a Python int for concrete values and the JAX array unchanged.
  """
  if is_jax(value):
    integer(owner, name, value)  # shape and dtype; the value is not read
    return value
  value = _integral(owner, name, value, what="be a whole number")
  integer(owner, name, value, minimum=minimum)
  if value > INT32_MAX:
    raise ValueError(f"{owner}({name}=...) must be <= 2**31 - 1, got {value!r}")
  return int(value)


def milestones(owner: str, value: Any) -> list[int]:
  """A sorted sequence of whole numbers ``>= 0`` (any size), as Python ints."""
  if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
    raise TypeError(f"{owner}(milestones=...) must be a sequence of ints, got {value!r}")
  marks = []
  for m in np.asarray(value, dtype=object).ravel():
    m = _integral(owner, "milestones", m, what="hold whole numbers")
    integer(owner, "milestones", m, minimum=0)
    marks.append(int(m))
  if any(marks[i] > marks[i + 1] for i in range(len(marks) - 1)):
    raise ValueError(f"{owner}(milestones=...) must be sorted, got {list(value)!r}")
  return marks


def scalar_result(owner: str, name: str, value: jax.Array) -> None:
  """What the callable argument ``name`` returned is a scalar (checked at trace time)."""
  if value.ndim != 0:
    raise ValueError(f"{owner}({name}=...) must return a scalar, got shape {value.shape}")


def broadcasts_to(owner: str, name: str, value: jax.Array, shape: tuple[int, ...]) -> None:
  """What the callable argument ``name`` returned broadcasts to a leaf's ``shape``."""
  try:
    ok = jnp.broadcast_shapes(shape, value.shape) == shape
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(
        f"{owner}({name}=...) returned shape {value.shape}, which does "
        f"not broadcast to the leaf shape {shape}"
    )


def _overlap(a: str, b: str) -> bool:
  """Whether the paths ``a`` and ``b`` name a common leaf (one is at or below the other)."""
  return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def param_paths(owner: str, name: str, value: Any) -> tuple[str, ...]:
  """A parameter path ``"blocks/0/attn/query"`` or a non-empty sequence of them.

  Returns the paths without leading and trailing ``/``; a path given twice,
  or one at or below another (``"blocks"`` and ``"blocks/0"`` both name the
  leaves of ``blocks/0``), raises.
  """
  items = (value,) if isinstance(value, str) else value
  ok = isinstance(items, (tuple, list)) and bool(items)
  if not (ok and all(isinstance(p, str) and p.strip("/") for p in items)):
    raise TypeError(
        f"{owner}({name}=...) must be a parameter path such as 'blocks/0/attn/query' "
        f"(or a tuple of them), got {value!r}"
    )
  paths = tuple(p.strip("/") for p in items)
  for i, p in enumerate(paths):
    for q in paths[:i]:
      if _overlap(p, q):
        what = f"{p!r} twice" if p == q else f"{p!r} and {q!r}, one below the other"
        raise _fail(owner, name, value, f"free of repeats ({what})")
  return paths


def disjoint(owner: str, a_name: str, a: Sequence[str], b_name: str, b: Sequence[str]) -> None:
  """The parameter paths ``a`` and ``b`` name no leaf twice: no path of one is
  at or below a path of the other (``f(query=..., key=...) must not both name 'q'``)."""
  for x in a:
    for y in b:
      if _overlap(x, y):
        inner, outer = (x, y) if len(x) >= len(y) else (y, x)
        what = repr(x) if x == y else f"the leaves of {inner!r} (below {outer!r})"
        raise ValueError(
            f"{owner}({a_name}=..., {b_name}=...) must not both name {what}, "
            f"got {a!r} and {b!r}"
        )


def static_int(
    owner: str, name: str, value: Any, *, minimum: int | None = None, none_ok: bool = False
) -> int | None:
  """A Python or NumPy int (None too if ``none_ok``) that fixes a shape: never an array."""
  if value is None and none_ok:
    return None
  if not _is_int(value):
    allowed = "an int or None" if none_ok else "an int"
    raise TypeError(f"{owner}({name}=...) must be {allowed}, got {value!r}")
  if minimum is not None and value < minimum:
    raise _fail(owner, name, value, f">= {minimum}")
  return int(value)


def needs_value(owner: str, value: Any) -> None:
  """Raises if a transform driven by the loss is updated without ``value=``."""
  if value is None:
    raise ValueError(
        f"{owner} needs the monitored loss or metric: call "
        f"update(updates, state, params, value=loss)"
    )


def _is_variable(x: Any) -> bool:
  """A variable wrapper around an array, such as Flax NNX's ``nnx.Param``.

  Recognised by its ``get_value`` method or ``value`` attribute; arrays,
  tuples (``NamedTuple`` states have fields named ``value``) and mappings
  never are.
  """
  if isinstance(x, (tuple, list, Mapping, jax.Array, np.ndarray, np.generic,
                    jax.ShapeDtypeStruct)):
    return False
  return callable(getattr(x, "get_value", None)) or hasattr(x, "value")


def plain_tree(owner: str, name: str, tree: Any) -> None:
  """``tree`` holds arrays, not variable wrappers around them (``nnx.Param``...).

  A tree of Flax NNX variables would only fail later, as a mismatch of tree
  structures several kilobytes long; the message says what to pass instead.
  """
  for path, leaf in jax.tree.flatten_with_path(tree, is_leaf=_is_variable)[0]:
    if _is_variable(leaf):
      raise TypeError(
          f"{owner}({name}=...) holds variables ({type(leaf).__name__} at "
          f"{jax.tree_util.keystr(path) or 'the root'}) where arrays are expected: for Flax "
          f"NNX pass nnx.as_pure(...), e.g. nnx.as_pure(nnx.state(model, nnx.Param)) or "
          f"nnx.as_pure(optimizer.opt_state)"
      )


def array_tree(owner: str, name: str, tree: Any) -> None:
  """A tree (not None) whose leaves are arrays, numbers or ``jax.ShapeDtypeStruct``.

  Variable wrappers are rejected as :func:`plain_tree` does.
  """
  if tree is None:
    raise TypeError(
        f"{owner}({name}=...) must be a tree of arrays (or jax.ShapeDtypeStruct), got None"
    )
  plain_tree(owner, name, tree)
  for path, leaf in jax.tree.flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None and isinstance(leaf, (int, float, complex)):
      continue
    if dtype is None or np.dtype(dtype).kind not in "biufc":
      raise TypeError(
          f"{owner}({name}=...) must be a tree of arrays (or jax.ShapeDtypeStruct); the "
          f"leaf {jax.tree_util.keystr(path) or '(root)'} is {leaf!r}"
      )


def observations(owner: str, name: str, value: Any, *, norms: bool = False) -> jax.Array:
  """A 1-D float32 array of logged observations (losses; with ``norms``, norms).

  Norms cannot be negative: with ``norms`` a finite negative entry raises a
  ``ValueError`` when the values are concrete (not under ``jit``). NaN and
  ``+-inf`` pass: the caller says what they mean.
  """
  if isinstance(value, (bool, np.bool_, str, bytes)):
    raise TypeError(f"{owner}({name}=...) must be a 1-D array of numbers, got {value!r}")
  try:
    arr = jnp.asarray(value)
  except (TypeError, ValueError):
    raise TypeError(
        f"{owner}({name}=...) must be a 1-D array of numbers, got {value!r}"
    ) from None
  if arr.dtype == jnp.bool_ or not (
      jnp.issubdtype(arr.dtype, jnp.integer) or jnp.issubdtype(arr.dtype, jnp.floating)
  ):
    raise TypeError(f"{owner}({name}=...) must hold real numbers, got dtype {arr.dtype}")
  if arr.ndim != 1:
    raise ValueError(f"{owner}({name}=...) must be 1-D (oldest first), got shape {arr.shape}")
  arr = arr.astype(jnp.float32)
  if norms and not isinstance(arr, jax.core.Tracer):
    host = np.asarray(arr)
    (negative,) = np.nonzero(np.isfinite(host) & (host < 0))
    if negative.size:
      i = int(negative[0])
      raise ValueError(
          f"{owner}({name}=...) must hold norms >= 0 (NaN and inf are not recorded), got "
          f"{float(host[i])!r} at index {i}"
      )
  return arr


def step_ranges(owner: str, value: Any) -> tuple[tuple[int, int], ...]:
  """Half-open ``(start, stop)`` ranges of update-call indices, as Python ints.

  A sequence of pairs of ints (Python or NumPy), or of ``range`` objects with
  step 1 (``range(45, 50)`` is ``(45, 50)``), ``0 <= start < stop <= 2**31 -
  1``; a 2-D NumPy array of pairs too. A JAX array is rejected with the hint
  to pass ``static_args`` (``optax.inject_hyperparams`` makes one of a list).
  """
  if is_jax(value):
    raise TypeError(
        f"{owner}(ranges=...) must be a sequence of (start, stop) pairs of Python ints, "
        f"got a JAX array {value!r}; optax.inject_hyperparams turns arrays into "
        f"tracers: pass a list of tuples, or static_args=('ranges',)"
    )
  if isinstance(value, range) or (isinstance(value, (tuple, list)) and len(value) == 2
                                  and all(_is_int(x) for x in value)):
    one = (value.start, value.stop) if isinstance(value, range) else tuple(value)
    raise TypeError(
        f"{owner}(ranges=...) must be a sequence of (start, stop) pairs; one range is "
        f"written [{one!r}], got {value!r}"
    )
  if (isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray))
      or (isinstance(value, np.ndarray) and value.ndim != 2)):
    raise TypeError(
        f"{owner}(ranges=...) must be a sequence of (start, stop) pairs, got {value!r}"
    )
  return tuple(_step_range(owner, pair, value) for pair in value)


def _step_range(owner: str, pair: Any, ranges: Any) -> tuple[int, int]:
  """One entry of :func:`step_ranges` as ``(start, stop)``."""
  if isinstance(pair, range):
    if pair.step != 1:
      raise ValueError(f"{owner}(ranges=...) takes ranges of step 1, got {pair!r}")
    start, stop = pair.start, pair.stop
  elif (isinstance(pair, (str, bytes)) or not isinstance(pair, (Sequence, np.ndarray))
        or len(pair) != 2):
    raise TypeError(
        f"{owner}(ranges=...) must be a sequence of (start, stop) pairs, got the "
        f"entry {pair!r} in {ranges!r}"
    )
  else:
    start, stop = pair
  for x in (start, stop):
    if not _is_int(x):
      raise TypeError(
          f"{owner}(ranges=...) must hold ints (update-call indices), got {x!r} in {pair!r}"
      )
  start, stop = int(start), int(stop)
  if not 0 <= start < stop <= INT32_MAX:
    raise ValueError(
        f"{owner}(ranges=...) needs 0 <= start < stop <= 2**31 - 1 for every half-open "
        f"range (start, stop), got {pair!r}"
    )
  return start, stop


def history_window(owner: str, window: Any, min_history: Any, *, smallest: int) -> None:
  """A window of ``window >= smallest`` recent values, of which ``min_history``
  (``1 <= min_history <= window``; None for a default) are needed first."""
  integer(owner, "window", window, minimum=smallest)
  if min_history is not None:
    integer(owner, "min_history", min_history, minimum=1)
    ordered(owner, "min_history", min_history, "window", window)


def transformation(owner: str, name: str, value: Any) -> Any:
  """``value`` as an ``optax.GradientTransformationExtraArgs``, or a ``TypeError``.

  Takes any ``optax.GradientTransformation`` and an ``optax.MultiSteps``
  (whose ``update`` forwards keyword extras to the optimizer it wraps); a
  plain transformation ignores keyword extras, as inside ``optax.chain``.
  """
  import optax  # the validators above need only jax

  if isinstance(value, optax.MultiSteps):
    return optax.GradientTransformationExtraArgs(value.init, value.update)
  if not isinstance(value, optax.GradientTransformation):
    raise TypeError(
        f"{owner}({name}=...) must be an optax.GradientTransformation or an "
        f"optax.MultiSteps, got {value!r}"
    )
  return optax.with_extra_args_support(value)
