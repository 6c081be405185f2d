"""Construction-time checks of hyperparameters.

Concrete values (Python numbers, NumPy scalars and arrays) are checked and a
``ValueError`` names the function, the argument and the value. JAX arrays and
tracers pass unchecked, so every factory keeps working under
``optax.inject_hyperparams``, which re-calls it with traced values each step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def concrete(value: Any) -> float | None:
  """``float(value)`` for a concrete real scalar, None for arrays/tracers.

  Raises ``TypeError`` for values that are not numbers at all (strings,
  lists), since passing them on would fail obscurely later.
  """
  if isinstance(value, (jax.Array, jax.core.Tracer)):
    return None
  if isinstance(value, bool):
    return float(value)
  if isinstance(value, (int, float, np.integer, np.floating)):
    return float(value)
  if isinstance(value, np.ndarray):
    if value.ndim == 0 and np.issubdtype(value.dtype, np.number):
      return float(value)
    return None
  raise TypeError(f"expected a number, got {value!r} of type {type(value).__name__}")


def _fail(fn: str, name: str, value: Any, rule: str) -> ValueError:
  return ValueError(f"{fn}({name}=...) must be {rule}, got {value!r}")


def number(fn: str, name: str, value: Any) -> float | None:
  """Checks ``value`` is a number (not NaN); returns its float or None."""
  try:
    v = concrete(value)
  except TypeError as e:
    raise TypeError(f"{fn}({name}=...): {e}") from None
  if v is not None and math.isnan(v):
    raise _fail(fn, name, value, "a number, not NaN")
  return v


def positive(fn: str, name: str, value: Any, *, finite: bool = False) -> None:
  """``value > 0`` (and finite if asked)."""
  v = number(fn, name, value)
  if v is not None and not v > 0:
    raise _fail(fn, name, value, "> 0")
  if v is not None and finite and not math.isfinite(v):
    raise _fail(fn, name, value, "finite")


def non_negative(fn: str, name: str, value: Any, *, finite: bool = False) -> None:
  """``value >= 0`` (and finite if asked)."""
  v = number(fn, name, value)
  if v is not None and not v >= 0:
    raise _fail(fn, name, value, ">= 0")
  if v is not None and finite and not math.isfinite(v):
    raise _fail(fn, name, value, "finite")


def in_range(
    fn: str, name: str, value: Any, lo: float, hi: float,
    *, lo_open: bool = False, hi_open: bool = False,
) -> None:
  """``lo <= value <= hi`` (with open ends if asked)."""
  v = number(fn, name, value)
  if v is None:
    return
  ok_lo = v > lo if lo_open else v >= lo
  ok_hi = v < hi if hi_open else v <= hi
  if not (ok_lo and ok_hi):
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    raise _fail(fn, name, value, f"in {left}{lo}, {hi}{right}")


def finite(fn: str, name: str, value: Any) -> None:
  """``value`` is a finite number."""
  v = number(fn, name, value)
  if v is not None and not math.isfinite(v):
    raise _fail(fn, name, value, "finite")


def ordered(fn: str, lo_name: str, lo: Any, hi_name: str, hi: Any) -> None:
  """``lo <= hi`` when both are concrete."""
  a, b = number(fn, lo_name, lo), number(fn, hi_name, hi)
  if a is not None and b is not None and a > b:
    raise ValueError(
        f"{fn}({lo_name}=..., {hi_name}=...) needs {lo_name} <= {hi_name}, "
        f"got {lo_name}={lo!r} > {hi_name}={hi!r}"
    )


def integer(fn: str, name: str, value: Any, *, minimum: int | None = None) -> None:
  """A concrete integer (Python or NumPy), at least ``minimum`` if given."""
  if isinstance(value, (jax.Array, jax.core.Tracer)):
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{fn}({name}=...) must be an int, got {value!r}")
  if minimum is not None and value < minimum:
    raise _fail(fn, name, value, f">= {minimum}")


def choice(fn: str, name: str, value: Any, choices: Sequence[Any]) -> None:
  """``value`` is one of ``choices``."""
  if not any(value == c and type(value) is type(c) or value is c for c in choices):
    raise _fail(fn, name, value, f"one of {list(choices)!r}")


def norm_ord(fn: str, value: Any) -> None:
  """``ord`` in {None, 1, 2, inf}."""
  if value is None or isinstance(value, bool):
    ok = value is None
  elif isinstance(value, str):
    ok = value == "inf"
  else:
    try:
      ok = float(value) in (1.0, 2.0, math.inf)
    except (TypeError, ValueError):
      ok = False
  if not ok:
    raise _fail(fn, "ord", value, "one of None, 1, 2, inf")


def unit_axis(fn: str, value: Any) -> None:
  """``axis`` is None, an int or a tuple/list of ints."""
  if value is None or (isinstance(value, (int, np.integer)) and not isinstance(value, bool)):
    return
  if isinstance(value, (tuple, list)) and value and all(
      isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in value
  ):
    return
  raise _fail(fn, "axis", value, "None, an int or a non-empty tuple of ints")


def callable_(fn: str, name: str, value: Any) -> None:
  if not callable(value):
    raise TypeError(f"{fn}({name}=...) must be callable, got {value!r}")


def needs_params(fn: str, params: Any) -> None:
  """Raises if a weight-side transform is updated without ``params``."""
  if params is None:
    raise ValueError(
        f"{fn} needs the current parameters: call "
        f"update(updates, state, params) with params, not None"
    )
