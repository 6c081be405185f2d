"""README.md is short, self-contained, and its examples run and do what they say."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _text() -> str:
  return README.read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
  return re.findall(rf"```{lang}\n(.*?)```", _text(), flags=re.S)


def _block_containing(marker: str) -> str:
  found = [b for b in _blocks("python") if marker in b]
  assert found, f"no README python block contains {marker!r}"
  return found[0]


def _run(block: str) -> dict:
  ns: dict = {"__name__": "__readme__"}
  exec(compile(block, str(README), "exec"), ns)  # noqa: S102
  return ns


def test_readme_is_under_10_kb():
  assert len(_text().encode("utf-8")) < 10_000


def test_readme_starts_with_the_two_commands():
  """The first code block holds the experiments command, then the test command."""
  first = re.search(r"```(\w*)\n(.*?)```", _text(), flags=re.S)
  assert first and first.group(1) == "bash"
  lines = [line for line in first.group(2).splitlines() if line.strip()]
  assert len(lines) == 2
  assert lines[0].endswith('pip install -e ".[experiments]" && python -m experiments')
  assert lines[1].endswith('pip install -e ".[test]" && pytest')


def test_ci_installs_and_tests_as_readme_says():
  ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
  assert re.search(r'^pip install (--quiet )?-e "\.\[test\]"', ci, flags=re.M)
  assert re.search(r"^pytest\s*$", ci, flags=re.M)


def test_readme_links_point_into_the_repository():
  """Relative links and images name files that exist (no dangling references)."""
  targets = re.findall(r"\]\(([^)\s]+)\)", _text())
  local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+://", t)]
  assert local, "expected links to the docs pages"
  missing = [t for t in local if t and not (ROOT / t).exists()]
  assert not missing, f"README links to missing files: {missing}"


def test_readme_quick_start_trains():
  ns = _run(_block_containing("loss_fn = lambda p, x, y"))
  assert float(ns["loss"]) < 1e-3
  w = ns["params"]["w"]
  assert abs(float(w[1]) + 2.0) < 1e-2


def test_readme_flax_nnx_loop_trains_and_the_plateau_sees_the_loss(capsys):
  ns = _run(_block_containing("class MLP(nnx.Module)"))
  assert float(ns["loss"]) < 0.1
  stats = ns["stats"]
  assert int(stats["skip_nonfinite/num_skipped"]) == 0
  assert 0.0 < float(stats["reduce_on_plateau/scale"]) <= 1.0
  # value= reached reduce_on_plateau: its best value is (about) the lowest loss seen
  assert float(stats["reduce_on_plateau/best"]) <= float(ns["loss"]) * (1 + 1e-4)
  assert "skipped 0" in capsys.readouterr().out


def test_every_readme_python_block_is_covered():
  """Each python block is run by one of the tests above (none is left untested)."""
  markers = ("loss_fn = lambda p, x, y", "class MLP(nnx.Module)")
  for block in _blocks("python"):
    assert any(m in block for m in markers), f"untested README block:\n{block[:200]}"
