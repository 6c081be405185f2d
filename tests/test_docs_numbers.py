"""The numbers the Experiments page's prose cites are those of its results tables.

``python -m experiments --update-docs`` writes the tables of
``docs/experiments.md``; the prose around them is written by hand. Each
claim below is a phrase of the prose with the numbers it cites, and what
gives them: the experiment's rows in the page's table (the held-out loss of
a defence, the steps it skipped) or its configuration (steps, faults). A
table written by an older version of the experiment (other defences, another
setting) cannot be compared: the check skips, saying to regenerate the page,
while the claims on the configuration are checked always.

Two table layouts are read: the summary table with one row per (experiment,
setting, defence), and a table of the experiment's own between its
``<!-- results: <name> ... -->`` marks, in its section.
"""

from __future__ import annotations

import pathlib
import re
from typing import NamedTuple

import pytest

from experiments import transformer_injected as injected

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "experiments.md"
_NUMBER = r"(-?\d+(?:\.\d+)?)"
_SPREAD = re.compile(rf"{_NUMBER}(?: \({_NUMBER}-{_NUMBER}\))?")


class Row(NamedTuple):
  """One defence's results: the metric's mean and min-max over seeds, steps skipped."""

  mean: float
  lo: float
  hi: float
  skipped: float
  setting: str
  note: str


def _cells(line: str) -> list[str]:
  return [c.strip() for c in line.strip().strip("|").split("|")]


def _spread(cell: str) -> tuple[float, float, float]:
  match = _SPREAD.search(cell)
  assert match, f"no 'mean (min-max)' in {cell!r}"
  mean = float(match.group(1))
  lo, hi = (float(match.group(2)), float(match.group(3))) if match.group(2) else (mean, mean)
  return mean, lo, hi


def _skipped(cell: str) -> float:
  return 0.0 if cell in ("-", "") else float(cell)


def _own_table(text: str, name: str) -> dict[str, Row]:
  """Rows of the table between the experiment's own marks (empty if none)."""
  start = re.search(rf"<!-- results: {name} \(written by [^>]*-->", text)
  end = f"<!-- results: {name} end -->"
  if not start or end not in text:
    return {}
  body = text[start.end():text.index(end)]
  lines = [ln for ln in body.splitlines() if ln.startswith("|")]
  if len(lines) < 3:
    return {}
  header = [h.lower() for h in _cells(lines[0])]
  col = lambda word: next(i for i, h in enumerate(header) if word in h)  # noqa: E731
  defence, metric, skipped = col("defence"), col("(min-max)"), col("skipped")
  setting = col("setting") if any("setting" in h for h in header) else None
  rows = {}
  for line in lines[2:]:
    cells = _cells(line)
    rows[cells[defence].strip("`")] = Row(*_spread(cells[metric]), _skipped(cells[skipped]),
                                          "" if setting is None else cells[setting], "")
  return rows


def _summary_rows(text: str, name: str) -> dict[str, Row]:
  """The experiment's rows of the summary table (experiment | setting | defence | ...)."""
  rows = {}
  for line in text.splitlines():
    if line.startswith(f"| {name} |"):
      cells = _cells(line)  # experiment, setting, defence, final, diverged, skipped, metric, wall
      rows[cells[2]] = Row(*_spread(cells[6]), _skipped(cells[5]), cells[1], cells[6])
  return rows


def table_rows(text: str, name: str) -> dict[str, Row]:
  """The experiment's rows in the page, from whichever table holds them."""
  return _own_table(text, name) or _summary_rows(text, name)


def _decimals(s: str) -> int:
  return len(s.split(".")[1]) if "." in s else 0


def assert_cited(cited: str, value: float, what: str) -> None:
  """``cited`` (as the prose writes it) is ``value`` rounded to its decimals."""
  tolerance = 0.5 * 10 ** -_decimals(cited) + 1e-9
  assert abs(float(cited) - value) <= tolerance + 0.5e-4, (  # the table's own rounding
      f"docs/experiments.md cites {cited} for {what}, its table says {value}")


def _section(text: str, title: str) -> str:
  start = text.index(title)
  following = text.find("\n## ", start + 1)
  return text[start:following if following >= 0 else len(text)]


def _claim(section: str, pattern: str) -> tuple[str, ...]:
  match = re.search(pattern, section, flags=re.S)
  assert match, f"the prose of docs/experiments.md no longer says {pattern!r}: update this test"
  return match.groups()


INJECTED_TITLE = "## INJECTED faults: corrupted batches in a transformer LM"
CLIPS = ("clip_global", "zclip", "autoclip")


def test_injected_prose_states_the_configuration_it_describes():
  section = _section(PAGE.read_text(encoding="utf-8"), INJECTED_TITLE)
  for profile, config in (("default profile", injected.Config()),
                          ("--quick", injected.Config.quick())):
    if profile == "default profile":
      steps, glitches, faults, seeds = _claim(
          section, r"\*Result \(default profile: (\d+) steps, (\d+) corrupted batches and (\d+) "
                   r"x1e4 faults, (\d+)\s+seeds\)")
      assert int(seeds) == config.seeds
    else:
      steps, glitches, faults = _claim(
          section, r"`--quick` \((\d+) steps, (\d+) corrupted batches and (\d+) x1e4 fault")
    assert int(steps) == config.steps, profile
    assert int(glitches) == len(injected.glitch_steps(config)), profile
    assert int(faults) == len(injected.fault_steps(config)), profile
  assert injected.Config().fault_scale == 1e4 and "x1e4" in injected.setting(injected.Config())


def test_injected_prose_cites_the_numbers_of_its_table():
  text = PAGE.read_text(encoding="utf-8")
  section = _section(text, INJECTED_TITLE)
  rows = table_rows(text, injected.NAME)
  config = injected.Config()
  current = set(config.defences) == set(rows) and all(
      r.setting in ("", injected.setting(config)) for r in rows.values())
  if not current:
    pytest.skip(f"the {injected.NAME} results in {PAGE.name} predate the experiment "
                f"(rows {sorted(rows)}): regenerate with python -m experiments --update-docs")
  faults = len(injected.fault_steps(config))

  (none,) = _claim(section, r"held-out loss ends at (\d+\.\d+) nats")
  assert_cited(none, rows["none"].mean, "no defence")
  lo, hi = _claim(section, r"Global clipping, ZClip and AutoClip bound both kinds\s+of fault "
                           r"\(held-out (\d+\.\d+)-(\d+\.\d+)\)")
  assert_cited(lo, min(rows[d].mean for d in CLIPS), "the clips' lowest")
  assert_cited(hi, max(rows[d].mean for d in CLIPS), "the clips' highest")
  (guard,) = _claim(section, r"`skip_on_spike` skips both x1e4 faults and\s+no other step "
                             r"\((\d+\.\d+)\)")
  assert_cited(guard, rows["skip_on_spike"].mean, "skip_on_spike")
  (both,) = _claim(section, r"with ZClip inside it skips the same two steps \((\d+\.\d+)\)")
  assert_cited(both, rows["skip_on_spike+zclip"].mean, "skip_on_spike+zclip")
  assert faults == 2  # "both", "the same two"
  for name in ("skip_on_spike", "skip_on_spike+zclip"):
    assert rows[name].skipped == faults, (name, rows[name])
    if rows[name].note:  # the summary table's note says which steps
      assert f"skipped {faults} of {faults} x1e4 faults, 0 other steps" in rows[name].note
  lo, hi = _claim(section, r"within the spread over seeds of one another \(min-max\s+"
                           r"(\d+\.\d+)-(\d+\.\d+)\)")
  defended = [r for name, r in rows.items() if name != "none"]
  assert_cited(lo, min(r.lo for r in defended), "the defended runs' lowest seed")
  assert_cited(hi, max(r.hi for r in defended), "the defended runs' highest seed")


_SUMMARY = """\
| experiment | setting | defence | final loss (min-max) | diverged | skipped | metric: mean (min-max) | wall s |
|---|---|---|---|---|---|---|---|
| transformer_injected | INJECTED: 5 corrupted batches + 2 x1e4, peak lr 0.03 | none | 7.0244 (6.7452-7.3036) | no (0/2) | 0 | val loss 6.9023 (6.8577-6.9469); loss spikes 12.5 | 70.5 |
| transformer_injected | INJECTED: 5 corrupted batches + 2 x1e4, peak lr 0.03 | skip_on_spike | 2.4147 (2.3070-2.5224) | no (0/2) | 2 | val loss 2.3540 (2.2851-2.4229); loss spikes 0; skipped 2 of 2 x1e4 faults, 0 other steps | 92.9 |
"""  # noqa: E501
_OWN = """\
<!-- results: transformer_injected (written by python -m experiments --update-docs) -->

| defence | val loss (min-max) | diverged | skipped steps | final training loss |
|---|---|---|---|---|
| `none` | 6.902 (6.858-6.947) | - | - | 7.02 |
| `skip_on_spike` | 2.354 (2.285-2.423) | - | 2 | 2.41 |

<!-- results: transformer_injected end -->
"""


@pytest.mark.parametrize("layout", ["summary", "own"])
def test_table_rows_reads_both_layouts(layout):
  rows = table_rows(_SUMMARY if layout == "summary" else _OWN, "transformer_injected")
  assert set(rows) == {"none", "skip_on_spike"}
  assert rows["skip_on_spike"].skipped == 2 and rows["none"].skipped == 0
  assert_cited("2.354", rows["skip_on_spike"].mean, "skip_on_spike")
  assert (rows["skip_on_spike"].lo, rows["skip_on_spike"].hi) == pytest.approx((2.285, 2.423),
                                                                              abs=1e-3)
  with pytest.raises(AssertionError, match="cites 2.36"):
    assert_cited("2.36", rows["skip_on_spike"].mean, "skip_on_spike")
  placeholder = _OWN.replace(_OWN.split("\n\n")[1], "(written by the next run)")
  assert table_rows(placeholder, "transformer_injected") == {}
