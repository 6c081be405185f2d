"""The benchmark runner works end to end and its bookkeeping is right.

No timing assertions: timings depend on the machine. The end-to-end test runs
``python -m benchmarks`` at a tiny scale with two rounds and checks that the
JSON and Markdown it writes are complete and well-formed; the other tests
check the tree shapes, case selection and the PASS/MISS logic on synthetic
numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from benchmarks import cases, report, runner, trees

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# Trees


def test_trees_gpt2_small_shapes():
  abstract = trees.abstract_tree("gpt2", "float32")
  info = trees.describe(abstract)
  assert info["leaves"] == 148
  assert info["params"] == 124_439_808  # GPT-2 small, tied embedding counted once
  assert info["bytes"] == 4 * 124_439_808
  assert abstract["wte"].shape == (50257, 768)
  assert abstract["wpe"].shape == (1024, 768)
  block = abstract["h"]["00"]
  assert block["attn"]["c_attn"]["w"].shape == (768, 2304)
  assert block["mlp"]["c_proj"]["w"].shape == (3072, 768)
  assert len(abstract["h"]) == 12


def test_trees_many_and_uniform():
  info = trees.describe(trees.abstract_tree("many", "bfloat16"))
  assert info == {"leaves": 2000, "params": 2000 * 2048, "bytes": 2000 * 2048 * 2}
  assert trees.describe(trees.abstract_tree("uniform:3", "float32"))["leaves"] == 3
  assert trees.describe(trees.abstract_tree("many", "float32", leaves=250)) == {
      "leaves": 250, "params": 250 * 2048, "bytes": 250 * 2048 * 4}
  assert trees.describe(trees.abstract_tree("uniform:3", "float32", leaves=5))["leaves"] == 5
  for bad in (0, -2):
    with pytest.raises(ValueError, match="leaves must be >= 1"):
      trees.tree_shapes("many", leaves=bad)
  with pytest.raises(ValueError, match="gpt2"):
    trees.tree_shapes("gpt2", leaves=10)
  with pytest.raises(ValueError, match="unknown tree"):
    trees.tree_shapes("resnet")


def test_trees_wide_and_leaf_size():
  info = trees.describe(trees.abstract_tree("wide", "float32"))
  assert info == {"leaves": 8, "params": 8 * 8192**2, "bytes": 2 * 2**30}  # 2 GiB a copy
  small = trees.abstract_tree("wide", "float32", leaf_size=16)
  assert [x.shape for x in jax.tree.leaves(small)] == [(16, 16)] * 8
  assert trees.describe(trees.abstract_tree("wide:3", "bfloat16", leaf_size=4)) == {
      "leaves": 3, "params": 48, "bytes": 96}
  assert trees.describe(trees.abstract_tree("many", "float32", leaf_size=2))["params"] == 8000
  for tree, size in (("gpt2", 8), ("wide", 0), ("wide:0", None), ("uniform:x", None)):
    with pytest.raises(ValueError):
      trees.tree_shapes(tree, size)


def test_trees_scale_keeps_structure():
  full = trees.abstract_tree("gpt2", "float32")
  small = trees.abstract_tree("gpt2", "float32", scale=1e-3)
  assert jax.tree.structure(full) == jax.tree.structure(small)
  ratio = trees.describe(small)["params"] / trees.describe(full)["params"]
  assert 0.5e-3 < ratio < 2e-3
  assert all(min(x.shape) >= 1 for x in jax.tree.leaves(small))


def test_trees_gradients_finite_and_fixed():
  abstract = trees.abstract_tree("uniform:2", "bfloat16", scale=0.01)
  g1 = trees.make_gradients(abstract, seed=3)
  g2 = trees.make_gradients(abstract, seed=3)
  for a, b, s in zip(jax.tree.leaves(g1), jax.tree.leaves(g2),
                     jax.tree.leaves(abstract), strict=True):
    assert a.dtype == s.dtype and a.shape == s.shape
    assert bool(jax.numpy.all(jax.numpy.isfinite(a)))
    assert bool(jax.numpy.array_equal(a, b))


# ---------------------------------------------------------------------------
# Case selection and targets


def test_runner_only_adds_references():
  chosen, skipped = runner.select_steps(["og.clip_by_global_norm"])
  names = [v.name for v in chosen]
  assert names == ["adam", "og.clip_by_global_norm", "optax.clip_by_global_norm"]
  assert skipped == []
  alone, _ = runner.select_standalone(["clip:og"])
  assert [s.name for s in alone] == ["clip:og", "clip:optax", "scale (bound)"]


def test_runner_fused_guard_comes_with_its_unfused_form_and_references():
  chosen, _ = runner.select_steps(["og.skip_nonfinite:fused"])
  assert [v.name for v in chosen] == [
      "adam", "og.clip_by_global_norm", "og.skip_nonfinite", "og.skip_nonfinite:fused",
      "optax.apply_if_finite"]
  assert [v.fused for v in chosen] == [False, False, False, True, False]


def test_runner_fused_step_is_update_and_apply():
  import jax.numpy as jnp
  import optax

  import optax_guard as og

  tx = og.skip_nonfinite(optax.sgd(1.0))
  p = jnp.array([-0.0, 1.0])
  nan = jnp.array([jnp.nan, 1.0])
  fused, _ = runner.make_step(tx, fused=True)(p, tx.init(p), nan)
  unfused, _ = runner.make_step(tx)(p, tx.init(p), nan)
  assert jnp.signbit(fused[0]) and not jnp.signbit(unfused[0])  # p vs p + 0


def test_runner_every_variant_has_valid_references():
  variants = {v.name: v for v in cases.step_variants()}
  assert list(variants)[0] == "adam"
  for v in variants.values():
    assert v.equiv is None or variants[v.equiv].group == "optax"
    assert v.extra_passes in (0, 1, 2)
    assert v.base is None or variants[v.base].base is None
    assert all(r in variants for r in v.refs)
    assert not v.fused or "update_and_apply" in v.needs
  specs = {s.name: s for s in cases.standalone_cases()}
  assert sum(s.bound for s in specs.values()) == 1
  assert all(s.equiv is None or s.equiv in specs for s in specs.values())


def _fake_results(step_ms, alone_ms, compile_s):
  res = {
      "step": {k: {"median_s": v / 1e3} for k, v in step_ms.items()},
      "standalone": {k: {"median_s": v / 1e3} for k, v in alone_ms.items()},
      "compile": {"t": {"leaves": 7, "results": {k: {"total_s": v}
                                                  for k, v in compile_s.items()}}},
  }
  return res


def test_runner_targets_pass_and_miss():
  step = {"adam": 100.0, "og.clip_by_global_norm": 115.0, "optax.clip_by_global_norm": 150.0,
          "og.skip_nonfinite": 130.0, "og.zclip": 120.0, "og.clip_by_value": 101.0,
          "optax.clip": 100.0, "optax.apply_if_finite": 180.0,
          "og.skip_nonfinite:fused": 138.0, "og.skip_on_spike:fused": 150.0}
  alone = {"norm:og": 9.0, "clip:og": 21.0, "scale (bound)": 10.0}
  comp = {"og.clip_by_global_norm": 1.0, "optax.clip_by_global_norm": 1.0,
          "og.clip_by_value": 1.2, "optax.clip": 1.0}
  targets = {t["target"]: t for t in runner.evaluate_targets(_fake_results(step, alone, comp))}
  get = lambda prefix: next(t for k, t in targets.items() if k.startswith(prefix))
  t = get("og.clip_by_global_norm + adam: overhead")
  assert t["status"] == "PASS" and math.isclose(t["value"], 15.0)
  t = get("og.clip_by_global_norm + adam vs optax")
  assert t["status"] == "PASS" and math.isclose(t["value"], 115 / 150)
  assert get("og.skip_nonfinite + adam: overhead")["status"] == "MISS"  # +30% > +25%
  assert get("og.zclip + adam")["status"] == "PASS"
  assert get("og.autoclip + adam")["status"] == "SKIP"  # not measured
  assert get("standalone global norm")["status"] == "PASS"  # 0.9x <= 1.0x
  assert get("standalone clip")["status"] == "MISS"  # 2.1x > 2.0x
  assert get("compile og.clip_by_global_norm")["status"] == "PASS"  # 1.0x <= 1.1x
  assert get("compile og.clip_by_value")["status"] == "MISS"  # 1.2x > 1.1x
  assert get("compile og.skip_nonfinite")["status"] == "SKIP"
  assert get("og.clip_by_value + adam vs optax.clip")["status"] == "MISS"  # 1.01x
  assert get("og.skip_nonfinite + adam vs optax")["status"] == "PASS"
  t = get("og.skip_nonfinite:fused: overhead over `chain(og.clip_by_global_norm(1), adam)`")
  assert t["status"] == "PASS" and math.isclose(t["value"], 20.0)  # 138 / 115
  assert get("og.skip_on_spike:fused: overhead")["status"] == "MISS"  # +30.4%
  assert get("og.skip_nonfinite:fused: XLA temporaries")["status"] == "SKIP"  # not given
  assert {t["status"] for t in targets.values()} <= {"PASS", "MISS", "SKIP"}


def test_runner_smoke_runs_label_targets_noisy_instead_of_miss():
  step = {"adam": 100.0, "og.clip_by_global_norm": 300.0, "og.skip_nonfinite:fused": 900.0}
  res = _fake_results(step, {}, {"og.clip_by_global_norm": 5.0,
                                 "optax.clip_by_global_norm": 1.0})
  res["step"]["og.skip_nonfinite:fused"]["temp_bytes"] = 10**6
  for config, time_noisy, compile_noisy in (
      ({"scale": 0.01, "rounds": 10, "compile_rounds": 3, "tree_bytes": 10**6}, True, False),
      ({"scale": 1.0, "rounds": 2, "compile_rounds": 1, "tree_bytes": 10**6}, True, True),
      ({"scale": 1.0, "rounds": 10, "compile_rounds": 3, "tree_bytes": 10**6}, False, False),
  ):
    res["config"] = config
    assert runner.smoke_run(config) == {"time": time_noisy, "compile": compile_noisy}
    targets = {t["target"]: t for t in runner.evaluate_targets(res)}
    over = targets["og.clip_by_global_norm + adam: overhead over adam"]
    temp = targets["og.skip_nonfinite:fused: XLA temporaries / one copy of the updates"]
    comp = next(t for k, t in targets.items() if k.startswith("compile og.clip_by_global_norm"))
    assert math.isclose(over["value"], 200.0) and temp["value"] == 1.0
    assert over["status"] == temp["status"] == ("NOISY" if time_noisy else "MISS")
    assert comp["status"] == ("NOISY" if compile_noisy else "MISS")
    assert targets["og.zclip + adam: overhead over adam"]["status"] == "SKIP"
    res["smoke"], res["targets"] = runner.smoke_run(config), list(targets.values())
    table = "\n".join(report.targets_table(res))
    assert ("NOISY" in table) == ("Smoke run" in table) == time_noisy


def test_runner_hlo_fingerprint_ignores_names_only():
  a = "%fusion.1 = f32[4]{0} fusion(%p.1), kind=kLoop, metadata={op_name=\"a\"}"
  b = "%fusion.7 = f32[4]{0} fusion(%x.3), kind=kLoop, metadata={op_name=\"b\"}"
  c = "%fusion.1 = f32[8]{0} fusion(%p.1), kind=kLoop, metadata={op_name=\"a\"}"
  assert runner.hlo_fingerprint(a) == runner.hlo_fingerprint(b)
  assert runner.hlo_fingerprint(a) != runner.hlo_fingerprint(c)


def test_runner_rejects_bad_arguments():
  for argv in (["--scale", "0"], ["--scale", "2"], ["--rounds", "0"], ["--tree", "resnet"],
               ["--leaf-size", "8"], ["--tree", "wide", "--leaf-size", "0"]):
    with pytest.raises(SystemExit):
      runner.parse_args(argv)


def test_runner_wide_tree_selects_its_cases_unless_told():
  assert runner.parse_args(["--tree", "wide"]).only == runner.WIDE_ONLY
  assert runner.parse_args(["--tree", "wide:2", "--only", "*"]).only == "*"
  assert runner.parse_args([]).only is None  # the gpt2 tree times everything


WIDE_STEPS = ["adam", "og.clip_by_global_norm", "og.skip_nonfinite", "og.skip_nonfinite:fused",
              "og.skip_on_spike", "og.skip_on_spike:fused", "og.monitor",
              "optax.clip_by_global_norm", "optax.apply_if_finite"]


@pytest.mark.xla_cpu  # asserts on XLA:CPU's temporaries
def test_runner_wide_tree_tiny(tmp_path, capsys):
  """The wide-tree run at 8 leaves of 16 x 16: its rows, GB/s and temporaries."""
  argv = ["--tree", "wide", "--leaf-size", "16", "--rounds", "1", "--warmup", "0",
          "--no-compile", "--out", str(tmp_path), "--quiet"]
  assert runner.main(argv) == 0
  assert "Smoke run" in capsys.readouterr().out
  res = json.loads((tmp_path / "wide-float32-leaf16.json").read_text())
  cfg = res["config"]
  assert (cfg["tree"], cfg["leaf_size"], cfg["tree_leaves"]) == ("wide", 16, 8)
  assert cfg["tree_bytes"] == 8 * 16 * 16 * 4 and cfg["only"] == runner.WIDE_ONLY
  assert sorted(res["step"]) == sorted(WIDE_STEPS)
  assert list(res["standalone"]) == ["scale (bound)"]
  for name, r in res["step"].items():
    assert r["finite"] is True and r["median_s"] > 0, name
    assert math.isclose(r["gb_per_s"], 7 * cfg["tree_bytes"] / r["median_s"] / 1e9)
    assert r.get("skipped_steps", 0) == 0
    assert r["temp_bytes"] >= 0  # XLA:CPU reports its temporaries
  assert res["step"]["og.skip_on_spike:fused"]["fused"] is True
  assert res["standalone"]["scale (bound)"]["gb_per_s"] > 0
  md = (tmp_path / "wide-float32-leaf16.md").read_text()
  assert "GB/s at adam's 7 passes" in md and "`og.update_and_apply(og.skip_on_spike(" in md
  section = md.split("## Optimizer step")[1].split("\n## ")[0]
  step_rows = [line for line in section.splitlines() if line.startswith("|")]
  assert len(step_rows) == 2 + len(WIDE_STEPS)
  assert len({line.count("|") for line in step_rows}) == 1


# ---------------------------------------------------------------------------
# End to end


def _check_section(section: dict, names: list[str], rounds: int) -> None:
  assert sorted(section) == sorted(names)
  for r in section.values():
    assert len(r["samples_s"]) == rounds
    assert all(s > 0 and math.isfinite(s) for s in r["samples_s"])
    assert r["min_s"] <= r["median_s"]
    assert r["finite"] is True
    assert r["ratio_bound"] > 0


@pytest.mark.slow
@pytest.mark.xla_cpu  # asserts on XLA:CPU's temporaries
def test_runner_end_to_end_tiny(tmp_path):
  cmd = [
      sys.executable, "-m", "benchmarks", "--tree", "uniform:4", "--scale", "0.01",
      "--rounds", "2", "--warmup", "1",
      "--only", "og.clip_by_global_norm,og.skip_nonfinite:fused,clip:og", "--compile-trees",
      "uniform:2", "--compile-rounds", "1", "--out", str(tmp_path), "--name", "tiny",
  ]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  # a smoke run (tiny scale, two rounds) labels its targets, it does not judge them
  assert "NOISY" in proc.stdout and "MISS" not in proc.stdout

  res = json.loads((tmp_path / "tiny.json").read_text())
  # 4 leaves of 32 x 64 at 1% of the elements: 3 x 6 each
  assert res["config"]["tree_leaves"] == 4 and res["config"]["tree_params"] == 4 * 3 * 6
  assert res["config"]["rounds"] == 2
  assert res["environment"]["jax"] == jax.__version__
  steps = ["adam", "og.clip_by_global_norm", "optax.clip_by_global_norm",
           "og.skip_nonfinite", "og.skip_nonfinite:fused", "optax.apply_if_finite"]
  _check_section(res["step"], steps, 2)
  assert res["step"]["og.skip_nonfinite"]["skipped_steps"] == 0
  fused = res["step"]["og.skip_nonfinite:fused"]
  assert fused["skipped_steps"] == 0 and fused["fused"] is True
  assert fused["base"] == "og.clip_by_global_norm" and fused["overhead_base_pct"] is not None
  assert fused["temp_bytes"] < res["step"]["og.skip_nonfinite"]["temp_bytes"]
  assert res["step"]["adam"]["overhead_pct"] == 0.0
  assert res["step"]["og.clip_by_global_norm"]["equiv"] == "optax.clip_by_global_norm"
  _check_section(res["standalone"], ["clip:og", "clip:optax", "scale (bound)"], 2)
  comp = res["compile"]["uniform:2"]
  assert comp["leaves"] == 2 and sorted(comp["results"]) == sorted(steps)
  assert all(r["total_s"] > 0 for r in comp["results"].values())
  statuses = {t["target"]: t["status"] for t in res["targets"]}
  assert statuses["og.clip_by_global_norm + adam: overhead over adam"] == "NOISY"
  assert res["smoke"] == {"time": True, "compile": True}
  assert statuses["og.zclip + adam: overhead over adam"] == "SKIP"  # not selected

  md = (tmp_path / "tiny.md").read_text()
  assert md == report.markdown(res)
  for heading in ("## Optimizer step", "## Standalone", "## Compile time", "## Targets"):
    assert heading in md
  assert "`chain(og.clip_by_global_norm(1), adam)`" in md
  assert "`og.update_and_apply(og.skip_nonfinite(chain(" in md and "Smoke run" in md
  rows = [line for line in md.splitlines() if line.startswith("|")]
  assert all(line.endswith("|") for line in rows)
  # Every row of a table has as many cells as its header.
  tables: list[list[str]] = []
  for line in md.splitlines():
    if line.startswith("|"):
      if not tables or not tables[-1]:
        tables.append([])
      tables[-1].append(line)
    elif tables and tables[-1]:
      tables.append([])
  for table in filter(None, tables):
    widths = {line.count("|") for line in table}
    assert len(widths) == 1, table


# ---------------------------------------------------------------------------
# False skips


def test_false_skips_healthy_ratios_use_the_window_of_finite_norms():
  from benchmarks import false_skips as fs

  norms = np.array([1.0, 2.0, np.inf, 3.0, 8.0, np.nan, 2.0])
  healthy = np.array([True, True, False, True, True, False, True])
  ratios, steps = fs.healthy_ratios(norms, healthy, window=2, min_history=2)
  # step 3: median(1, 2); step 4: median(2, 3); step 6: median(3, 8)
  np.testing.assert_allclose(ratios, [3.0 / 1.5, 8.0 / 2.5, 2.0 / 5.5])
  assert steps.tolist() == [3, 4, 6]


def test_false_skips_fault_codes():
  from benchmarks import false_skips as fs

  codes = fs._fault_codes(1000, 128, seed=0, rate=0.03, nan_loss=True)
  assert (codes[:128] == 0).all() and (codes > 0).sum() == 30
  assert (codes == 5).sum() == 1 and all((codes == k).sum() >= 7 for k in (1, 2, 3, 4))
  plain = fs._fault_codes(1000, 128, seed=0, rate=0.03)
  assert (plain == 5).sum() == 0 and ((plain > 0) == (codes > 0)).all()
  assert not fs._fault_codes(1000, 128, seed=0, rate=0.0).any()


def test_false_skips_options():
  from benchmarks import false_skips as fs

  config, args = fs.parse_args(["--quick", "--spike-arg", "sigma=8", "--only", "warm-up"])
  assert config.steps == fs.QUICK_STEPS and args.only == ["warm-up"]
  assert dict(args.spike_arg) == {"sigma": 8}
  assert fs.parse_args(["--quick", "--steps", "500"])[0].steps == 500
  assert fs.parse_args([])[0].steps == 3000
  with pytest.raises(SystemExit):
    fs.parse_args(["--spike-arg", "sigma"])


@pytest.mark.slow
def test_false_skips_end_to_end_tiny(tmp_path, capsys):
  from benchmarks import false_skips as fs

  out = tmp_path / "rows.json"
  argv = ["--steps", "200", "--only", "hard-batch", "warm-up", "--json", str(out)]
  assert fs.main(argv) == 0
  text = capsys.readouterr().out
  assert "| trial" in text and "warm-up: during the 200 warm-up steps" in text
  rows = json.loads(out.read_text())["rows"]
  assert [(r["trial"], r["faults"]) for r in rows] == [
      ("hard-batch", "0%"), ("hard-batch", "3%"), ("warm-up", "0%")]
  for r in rows:
    assert r["healthy skips"] >= 0 and r["max ratio"] >= r["p99.9 ratio"] > 0
    assert r["repeat visits"] <= r["healthy skips"]
  assert rows[1]["faults skipped"] == "6/6" and rows[1]["NaN loss"] == "1/1"
  assert "faults skipped" not in rows[0]


@pytest.mark.slow
def test_guard_in_step_transformer_tiny(capsys):
  from benchmarks import guard_in_step

  guard_in_step.main(["--model", "transformer", "--width", "16", "--layers", "1", "--heads",
                      "2", "--seq", "8", "--vocab", "32", "--batch", "2", "--rounds", "1"])
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith("| `")]
  assert [r.split("`")[1] for r in rows] == list(guard_in_step.transformer_variants())
  assert "decoder-only transformer, width 16, 1 layers" in out


def test_reductions_tiny(capsys):
  from benchmarks import reductions

  assert reductions.main(["--size", "8", "--rounds", "1"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert "two 8 x 8 float32 arrays" in lines[0]
  assert [line.split("ms  ", 1)[1] for line in lines[1:]] == list(reductions.EXPRESSIONS)
  with pytest.raises(SystemExit):
    reductions.main(["--rounds", "0"])


def test_reductions_expressions_agree():
  """The RMS forms are the same sum up to rounding (bias correction folded or not)."""
  from benchmarks import reductions

  rng = np.random.default_rng(0)
  g = jax.numpy.asarray(rng.standard_normal((16, 16)), "float32")
  v = jax.numpy.asarray(rng.random((16, 16)) * 1e-3, "float32")
  bc, floor = jax.numpy.float32(0.001), jax.numpy.float32(1e-16)
  sums = [float(f(g, v, bc, floor)) for name, f in reductions.EXPRESSIONS.items() if "RMS" in name]
  want = float(np.sum(np.float64(g) ** 2 / np.maximum(np.float64(v) / 0.001, 1e-16)))
  np.testing.assert_allclose(sums, [want] * 3, rtol=1e-5)


# ---------------------------------------------------------------------------
# The GPU check script


def _gpu_check(args, tmp_path, **env):
  env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, **env)
  return subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def test_gpu_check_usage(tmp_path):
  proc = _gpu_check(["--help"], tmp_path)
  assert proc.returncode == 0 and "--dry-run" in proc.stdout and "$OUT" in proc.stdout
  assert _gpu_check(["--bogus"], tmp_path).returncode == 2
  assert subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=ROOT).returncode == 0


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
  proc = _gpu_check(["--dry-run"], tmp_path)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = tmp_path / "out"
  files = sorted(p.name for p in out.iterdir())
  assert files == ["bench-gpt2.md", "bench-many.md", "bench-wide.md", "false_skips.log",
                   "gpu_check.log",
                   "pytest.log", "results.tar.gz", "timings.tsv"]  # + the experiments' summary
  rows = [line.split("\t") for line in (out / "timings.tsv").read_text().splitlines()[1:]]
  assert {r[0]: r[1] for r in rows} == {
      "versions": "ok", "bench-gpt2": "ok", "bench-gpt2-bf16": "ok", "bench-wide": "ok",
      "bench-many": "ok", "experiments": "ok", "pytest": "done", "false_skips": "ok"}
  assert "0 failed, 0 errors" in (out / "pytest.log").read_text()
