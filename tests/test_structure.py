"""The shape of the library: one guard combinator, explicit protocols, short functions.

These tests check structure, not numbers: that every guard is built by the one
combinator and reaches the fused step through its own ``update``, that every
state type declares the statistics it reports, that nothing is found through
module-level tables or context variables, and that functions stay short. A
guard written the way the design page describes (a decision and a state)
gets the skip semantics, the fused step, ``guard_stats`` and the checkpoint
helpers with no other code.
"""

from __future__ import annotations

import ast
import io
import pathlib
import tokenize
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard import _stats
from optax_guard._apply import FusedUpdate
from optax_guard._guards.combinator import Decision, GuardUpdate, guard

PACKAGE = pathlib.Path(og.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_CODE_LINES = 60


def _docstring_lines(node: ast.AST) -> set[int]:
  lines: set[int] = set()
  for n in ast.walk(node):
    body = getattr(n, "body", None)
    if (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
        and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)):
      lines.update(range(body[0].lineno, body[0].end_lineno + 1))
  return lines


def _code_lines(source: str, node: ast.AST) -> int:
  """Lines of ``node`` holding code: docstrings, comments and blank lines not counted."""
  skip = _docstring_lines(node)
  lines = set()
  ignored = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
             tokenize.DEDENT, tokenize.ENDMARKER)
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type in ignored:
      continue
    for line in range(tok.start[0], tok.end[0] + 1):
      if node.lineno <= line <= node.end_lineno and line not in skip:
        lines.add(line)
  return len(lines)


def _functions(tree: ast.AST):
  """Top-level functions and methods (nested closures belong to their factory)."""
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node
    elif isinstance(node, ast.ClassDef):
      yield from _functions(node)


def test_code_line_counter_counts_code_only():
  source = ('def f(x):\n  """Doc.\n\n  More doc.\n  """\n  # a comment\n\n'
            '  y = x\n  return (y +\n          1)\n')
  assert _code_lines(source, ast.parse(source).body[0]) == 4


def test_no_function_is_longer_than_sixty_lines_of_code():
  long = []
  for path in SOURCES:
    source = path.read_text()
    for fn in _functions(ast.parse(source)):
      n = _code_lines(source, fn)
      if n > MAX_CODE_LINES:
        long.append(f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name} ({n} lines)")
  assert not long, long


@pytest.mark.parametrize("banned", ["contextvars", "weakref", "__module__", "_PREFIXES"])
def test_nothing_is_found_through_tables_context_variables_or_module_names(banned):
  hits = [str(p.relative_to(PACKAGE)) for p in SOURCES if banned in p.read_text()]
  assert not hits, f"{banned!r} in {hits}"


def test_every_public_state_declares_what_it_reports():
  states = [getattr(og, n) for n in og.__all__
            if isinstance(getattr(og, n), type) and n.endswith("State")]
  assert len(states) >= 12
  for cls in states:
    declared = getattr(cls, "__reports__", None)
    assert isinstance(declared, _stats.Reports), cls.__name__
    assert set(declared.fields) <= set(cls._fields), cls.__name__
    assert declared.guard == ("inner_state" in cls._fields), cls.__name__


def test_a_declaration_must_name_fields_of_the_state():
  class State(NamedTuple):
    count: jax.Array

  with pytest.raises(TypeError, match="not a field"):
    _stats.declare("x", ("count", "missing"))(State)
  with pytest.raises(TypeError, match="inner_state"):
    _stats.declare("x", ("count",), guard=True)(State)


@pytest.mark.parametrize("make", [
    og.skip_nonfinite,
    og.skip_on_spike,
    lambda inner: og.skip_steps(inner, [(1, 2)]),
], ids=["skip_nonfinite", "skip_on_spike", "skip_steps"])
def test_every_guard_carries_its_fused_step_on_its_update(make):
  tx = make(optax.sgd(0.1))
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  assert isinstance(tx.update, GuardUpdate) and isinstance(tx.update, FusedUpdate)
  # an ordinary transformation does not: update_and_apply falls back
  assert not isinstance(optax.sgd(0.1).update, FusedUpdate)


# ---------------------------------------------------------------------------
# A new guard in a few lines, as the design page shows
# ---------------------------------------------------------------------------


@_stats.declare("skip_after", ("count", "last_skipped"), guard=True)
class SkipAfterState(NamedTuple):
  inner_state: optax.OptState
  count: jax.Array
  last_skipped: jax.Array


def skip_after(inner, limit):
  """Applies the first ``limit`` steps, skips every later one."""

  def decide(updates, state, extra):
    del updates, extra
    skip = state.count >= limit
    return Decision(skip, (optax.safe_increment(state.count), skip))

  return guard("skip_after", inner, state_type=SkipAfterState,
               init=lambda params: (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.bool_)),
               decide=decide)


def test_a_guard_written_as_a_decision_and_a_state_gets_everything_else():
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.full(3, 2.0)}
  inner = optax.chain(og.clip_by_global_norm(1.0), optax.adam(0.1))
  tx = skip_after(inner, 2)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: og.update_and_apply(tx, g, s, p))
  p, s = params, state
  history = []
  for _ in range(4):
    p, s = step(grads, s, p)
    history.append(np.asarray(p["w"]).copy())
  # two applied steps, then the parameters and the inner state stay
  assert not np.array_equal(history[0], history[1])
  np.testing.assert_array_equal(history[1], history[2])
  np.testing.assert_array_equal(history[2], history[3])
  # the same as the unguarded optimizer after two steps
  ref_p, ref_s = params, inner.init(params)
  for _ in range(2):
    u, ref_s = inner.update(grads, ref_s, ref_p)
    ref_p = optax.apply_updates(ref_p, u)
  np.testing.assert_allclose(p["w"], ref_p["w"], rtol=1e-6)
  assert og.guard_stats(s) == {"skip_after/count": s.count,
                               "skip_after/last_skipped": s.last_skipped}
  assert int(s.count) == 4
  stripped = og.strip_guard_state(s)
  assert jax.tree.structure(stripped) == jax.tree.structure(ref_s)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stripped, ref_s)
  # unfused, a skipped step gives zero updates
  u, _ = tx.update(grads, s, p)
  np.testing.assert_array_equal(u["w"], np.zeros(3))


def test_guard_stats_ignores_states_without_a_declaration():
  class Undeclared(NamedTuple):
    num_skipped: jax.Array

  state = (Undeclared(jnp.ones((), jnp.int32)), og.monitor().init({"w": jnp.ones(2)}))
  assert sorted(og.guard_stats(state)) == [
      "monitor/global_norm", "monitor/max_abs", "monitor/nonfinite_steps",
      "monitor/num_nonfinite"]
