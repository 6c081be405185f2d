"""The reference tables of the docs say what the code does."""

from __future__ import annotations

import pathlib
import re

import jax
from test_contract import TRANSFORMS, _make, _run

import optax_guard as og

ROOT = pathlib.Path(__file__).resolve().parent.parent
MONITOR_PAGE = ROOT / "docs" / "api" / "monitor.md"
_ROW = re.compile(r"^\| (`\w+`(?:, `\w+`)*) \| `([\w/<>]+)` \| (\w+) \| .+ \|$", flags=re.M)


def _documented() -> dict[str, tuple[list[str], str]]:
  """``name -> (transformations, dtype)`` from the table of guard_stats names."""
  rows = _ROW.findall(MONITOR_PAGE.read_text(encoding="utf-8"))
  assert rows, f"no table of guard_stats names in {MONITOR_PAGE}"
  table = {name: (re.findall(r"`(\w+)`", owners), dtype) for owners, name, dtype in rows}
  assert len(table) == len(rows), "a name is listed twice"
  return table


# Fields that hold a tree of scalars, one entry per leaf: "<field>/<path>".
_TREE_FIELDS = ("monitor/leaf_norms", "adagc/gamma")


def _generic(name: str) -> str:
  """``monitor/leaf_norms/dense/kernel`` -> ``monitor/leaf_norms/<path>``."""
  for field in _TREE_FIELDS:
    if name.startswith(field + "/"):
      return field + "/<path>"
  return name


def _produced() -> dict[str, tuple[set[str], str]]:
  """``name -> (factories whose state gives it, dtype)`` over the contract registry.

  Each registered factory runs two steps in its registry configuration (the
  entry of a guard may wrap other stateful transformations: their names count
  for the guard too).
  """
  out: dict[str, tuple[set[str], str]] = {}
  for factory, entry in TRANSFORMS.items():
    _, state = _run(_make(entry), steps=2, jit=False)
    for name, value in og.guard_stats(state).items():
      owners, _ = out.setdefault(_generic(name), (set(), str(jax.numpy.dtype(value.dtype))))
      owners.add(factory)
  return out


def test_guard_stats_table_lists_every_name_with_its_transformation_and_dtype():
  documented = _documented()
  produced = _produced()
  missing = sorted(set(produced) - set(documented))
  assert not missing, f"guard_stats names missing from the table in {MONITOR_PAGE}: {missing}"
  stale = sorted(set(documented) - set(produced))
  assert not stale, f"names in the table that no registered transformation gives: {stale}"
  for name, (listed, dtype) in documented.items():
    owners, actual = produced[name]
    assert set(listed) <= owners, f"{name}: listed under {listed}, given by {sorted(owners)}"
    assert dtype == actual, f"{name}: listed as {dtype}, is {actual}"
