"""The self-contained README examples run and do what they say."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _block_containing(marker):
  found = [b for b in _blocks() if marker in b]
  assert found, f"no README python block contains {marker!r}"
  return found[0]


def test_readme_quick_start_trains(capsys):
  ns: dict = {}
  exec(_block_containing("loss_fn = lambda p, x, y"), ns)  # noqa: S102
  assert float(ns["loss"]) < 1e-3
  w = ns["params"]["w"]
  assert abs(float(w[1]) + 2.0) < 1e-2


@pytest.mark.parametrize("marker", ["class MLP(nnx.Module)"])
def test_readme_flax_feedback_loop_runs(marker, capsys):
  ns: dict = {}
  exec(_block_containing(marker), ns)  # noqa: S102
  plateau = ns["optimizer"].opt_state[2]
  assert 0.0 < float(plateau.scale[...]) <= 1.0
  assert "scale" in capsys.readouterr().out
