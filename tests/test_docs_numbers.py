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
from experiments import transformer_lr_sweep as sweep

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


# ---------------------------------------------------------------------------
# The learning-rate sweep: tables with a column per learning rate
# ---------------------------------------------------------------------------

SWEEP_TITLE = "## Transformer learning-rate sweep: a natural instability"
PER_TENSOR = ("per_tensor_rates", "per_tensor_rates+qk_clip")


def sweep_tables(text: str, name: str = "transformer_lr_sweep") -> list[dict[str, dict[str, str]]]:
  """Every table between the experiment's own marks: ``{first cell: {column: cell}}``.

  The cells keep the table's text (``"1.583"``, ``"2.138 x"``, ``"1.2k"``); the
  first column's backquotes are dropped.
  """
  start = re.search(rf"<!-- results: {name} \(written by [^>]*-->", text)
  end = f"<!-- results: {name} end -->"
  if not start or end not in text:
    return []
  tables, lines = [], []
  for line in text[start.end():text.index(end)].splitlines() + [""]:
    if line.startswith("|"):
      lines.append(line)
      continue
    if len(lines) >= 3:
      header = _cells(lines[0])
      tables.append({_cells(ln)[0].strip("`"): dict(zip(header[1:], _cells(ln)[1:], strict=True))
                     for ln in lines[2:]})
    lines = []
  return tables


def _says(section: str, pattern: str) -> tuple[str, ...]:
  """:func:`_claim` with any line break of the prose where ``pattern`` has a space."""
  return _claim(section, pattern.replace(" ", r"\s+"))


def _value(cell: str) -> float:
  return float(cell.split()[0])


def _sweep_current(text: str) -> tuple[dict, dict, dict]:
  tables = sweep_tables(text)
  if len(tables) < 3 or not set(PER_TENSOR) <= set(tables[0]):
    pytest.skip(f"the transformer_lr_sweep tables in {PAGE.name} predate the per-tensor rows: "
                "regenerate with python -m experiments --update-docs")
  return tables[0], tables[1], tables[2]


def test_sweep_prose_states_the_per_tensor_configuration():
  text = PAGE.read_text(encoding="utf-8")
  section = _section(text, SWEEP_TITLE)
  config = sweep.Config()
  assert "the embeddings at the peak rate and every other tensor (the\nmatrices" in section
  assert config.other_rate_factor == 0.1  # "a tenth of it"
  assert "`og.qk_clip(10)` after it" in section and config.qk_clip_threshold == 10
  assert set(PER_TENSOR) <= set(config.diagnosed) and "none" in config.diagnosed
  assert config.steps == 300 and config.warmup_steps == 30  # "300 steps", "step 30"
  assert config.width == 32 and config.layers == 2 and config.seeds == 2
  for name in PER_TENSOR:
    assert sweep.rates(config, name) == config.learning_rates


def test_sweep_tables_are_read():
  text = ("<!-- results: transformer_lr_sweep (written by x) -->\n\nHeld-out:\n\n"
          "| defence | lr 0.1 | trains at |\n|---|---|---|\n| `none` | 2.138 x | 0.03 |\n\n"
          "| tensor kind | initial norm |\n|---|---|\n| qkv (kernels, biases) | 13.8 |\n\n"
          "<!-- results: transformer_lr_sweep end -->")
  loss, kinds = sweep_tables(text)
  assert loss == {"none": {"lr 0.1": "2.138 x", "trains at": "0.03"}}
  assert _value(loss["none"]["lr 0.1"]) == 2.138
  assert kinds["qkv (kernels, biases)"]["initial norm"] == "13.8"


def test_sweep_prose_cites_the_per_tensor_rows_of_its_tables():
  text = PAGE.read_text(encoding="utf-8")
  loss, logits, kinds = _sweep_current(text)
  section = _section(text, "### Learning rates per tensor")
  pt, ptq = loss["per_tensor_rates"], loss["per_tensor_rates+qk_clip"]

  a, b, none, fail = _says(section, r"The row trains at 0\.1 and 0\.3 \((\d\.\d+) and (\d\.\d+), "
                                     r"the latter\s+better than the best run of `none`, "
                                     r"(\d\.\d+) at 0\.03\) and fails at 1 \((\d\.\d+)\)")
  assert_cited(a, _value(pt["lr 0.1"]), "per_tensor_rates at 0.1")
  assert_cited(b, _value(pt["lr 0.3"]), "per_tensor_rates at 0.3")
  assert_cited(none, _value(loss["none"]["lr 0.03"]), "none at 0.03")
  assert_cited(fail, _value(pt["lr 1"]), "per_tensor_rates at 1")
  assert pt["trains at"] == "0.1-0.3" and pt["lr 1"].endswith(" x") and float(b) < float(none)
  high, low = _says(section, r"the attention logits grow again \((\d+), against (\d+) at\s+0\.3\)")
  assert (high, low) == (logits["per_tensor_rates"]["lr 1"], logits["per_tensor_rates"]["lr 0.3"])

  assert "**the row\ntrains at every rate from 0.1 to 1**" in section
  assert ptq["trains at"] == "0.1-1" and ptq["fails from"] == "never"
  lo, hi = _says(section, r"its largest logit at (\d+)-(\d+):")
  assert (lo, hi) == (logits["per_tensor_rates+qk_clip"]["lr 0.1"],
                      logits["per_tensor_rates+qk_clip"]["lr 1"])
  c, d, warm, e = _says(section, r"(\d\.\d+) at 0\.1, (\d\.\d+) at 0\.3 \(as good as the best run "
                                  r"of the sweep, the\s+100-step warm-up at 0\.03: (\d\.\d+)\) "
                                  r"and (\d\.\d+) at 1")
  for cited, lr in ((c, "lr 0.1"), (d, "lr 0.3"), (e, "lr 1")):
    assert_cited(cited, _value(ptq[lr]), f"per_tensor_rates+qk_clip at {lr}")
  assert_cited(warm, _value(loss["warmup_100"]["lr 0.03"]), "warmup_100 at 0.03")
  best = min(_value(v) for row in loss.values() for k, v in row.items()
             if k.startswith("lr ") and v != "-")
  assert abs(float(d) - best) <= 0.005, "no longer as good as the best run"
  lo, hi = _says(section, r"one rate for all tensors ends near uniform guessing "
                           r"\((\d\.\d+)-(\d\.\d+)\)")
  single = [_value(row["lr 1"]) for name, row in loss.items()
            if name not in PER_TENSOR and row["lr 1"] != "-"]
  assert_cited(lo, min(single), "the lowest single-rate run at 1")
  assert_cited(hi, max(single), "the highest single-rate run at 1")
  low01, low03 = _says(section, r"Below 0\.1 both rows fail \((\d\.\d+) at 0\.01, "
                                 r"(\d\.\d+) at 0\.03\)")
  for row in (pt, ptq):
    assert_cited(low01, _value(row["lr 0.01"]), "per-tensor rows at 0.01")
    assert_cited(low03, _value(row["lr 0.03"]), "per-tensor rows at 0.03")
    assert row["lr 0.01"].endswith(" x") and row["lr 0.03"].endswith(" x")
  for name in ("none",):
    assert loss[name]["trains at"] == "0.03"
  for name in ("qk_clip", "qk_layernorm", "warmup_100"):
    assert loss[name]["trains at"] == "0.03-0.1", name


def _kind(kinds: dict, word: str) -> dict[str, str]:
  (row,) = [r for k, r in kinds.items() if k.startswith(word)]
  return row


def _column(row: dict[str, str], *words: str) -> float:
  (key,) = [k for k in row if all(w in k for w in words)]
  return float(row[key])


def test_sweep_prose_cites_the_per_tensor_diagnosis():
  text = PAGE.read_text(encoding="utf-8")
  _, _, kinds = _sweep_current(text)
  section = _section(text, "### Learning rates per tensor")
  emb, qkv, lin, head = (_kind(kinds, w) for w in ("embeddings", "qkv", "proj", "head"))
  step = ("relative step", "`none`")
  cited = _says(section, r"update of the\s+embeddings was (\d\.\d+) times the learning rate "
                          r"relative to their norm,\s+against (\d\.\d+) for the qkv layers, "
                          r"(\d\.\d+) for the other linear layers and (\d\.\d+) for the\s+head")
  for c, row, what in zip(cited, (emb, qkv, lin, head), ("emb", "qkv", "linear", "head"),
                          strict=True):
    assert_cited(c, _column(row, *step), f"relative step of {what}")
  lo, hi = _says(section, r"head: (\d)-(\d)x more for the matrices")
  ratios = [_column(r, *step) / _column(emb, *step) for r in (qkv, lin, head)]
  assert int(lo) <= min(ratios) and max(ratios) <= int(hi) + 0.5, ratios
  at03 = ("`none` 0.3",)
  cited = _says(section, r"the qkv layers has grown (\d\.\d+)x, that of the other linear layers "
                          r"(\d\.\d+)x and the\s+head's (\d\.\d+)x, against (\d\.\d+)x for the "
                          r"embeddings")
  for c, row in zip(cited, (qkv, lin, head, emb), strict=True):
    assert_cited(c, _column(row, *at03), "growth at 0.3")
  steps = _says(section, r"pass 100 at steps (\d+)\s+and (\d+) \(the two seeds\)")
  assert f"`none` at 0.3: {steps[0]} and {steps[1]}" in text
  lo, hi, e = _says(section, r"the matrices barely move before the peak\s+"
                              r"\((\d\.\d+)x-(\d\.\d+)x\), but neither do the embeddings "
                              r"\((\d\.\d+)x\)")
  at003 = ("`none` 0.03",)
  assert_cited(lo, min(_column(r, *at003) for r in (qkv, lin)), "matrices at 0.03, lowest")
  assert_cited(hi, max(_column(r, *at003) for r in (qkv, lin)), "matrices at 0.03, highest")
  assert_cited(e, _column(emb, *at003), "embeddings at 0.03")
  e, q, m = _says(section, r"the embeddings grow (\d\.\d+)x by step 30 while every other kind "
                            r"stays as at the\s+single rate 0\.03 \(qkv (\d\.\d+)x, the other "
                            r"linear layers (\d\.\d+)x\)")
  pt = ("`per_tensor_rates` 0.3",)
  for c, row in ((e, emb), (q, qkv), (m, lin)):
    assert_cited(c, _column(row, *pt), "per_tensor_rates growth at 0.3")
  assert "`per_tensor_rates` at 0.3: never and never" in text
