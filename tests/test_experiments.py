"""The experiment suite: its measuring pieces, and every experiment end to end at a tiny size.

The pieces that decide what the table says (divergence, spikes, the adding
problem's 36% baseline, the learning rate where a defence fails, the rows of
``summary.json``, the chunking of the training loop, the progress output) are
checked against independent NumPy/Python versions and hand-made inputs. The
``slow`` tests run each experiment through its public ``run(Config(...))``
with a few steps and small models: the outputs (JSON, CSV with every
``og.guard_stats`` entry, PNG, summary) must be written, the unprotected runs
must blow up where the experiment says they do and the defended ones must not.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_guard as og
from experiments import _common as C
from experiments import _transformer as T
from experiments import (
    adding_problem,
    data_parallel,
    deep_mlp,
    float16_loss_scale,
    transformer_injected,
    transformer_localized_spike,
    transformer_lr_sweep,
)
from experiments.__main__ import (
    MARK_END,
    MARK_START,
    _default_out,
    main,
    marks,
    update_docs,
)

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_KEYS = {"experiment", "setting", "defence", "data", "seeds", "diverged", "final_loss",
                "metric", "value", "values", "injected_faults"}


def _check_outputs(result, out_dir):
  files = C.save(result, str(out_dir))
  base = os.path.join(str(out_dir), result.name)
  assert base + ".json" in files and os.path.getsize(base + ".json") > 0
  assert base + ".csv" in files and os.path.getsize(base + ".csv") > 0
  if HAVE_MPL:
    assert base + ".png" in files
    with open(base + ".png", "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(base + ".json") as f:
    doc = json.load(f)
  assert doc["experiment"] == result.name
  assert [r["defence"] for r in doc["runs"]] == [r.defence for r in result.runs]
  with open(base + ".csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == sum(r.seeds * r.steps for r in result.runs)
  assert {row["defence"] for row in rows} >= {r.defence for r in result.runs if r.trained}
  table = C.summary_table([result])
  for r in result.runs:
    assert r.defence in table
  md = C.summary_table([result], markdown=True)
  assert md.count("\n") == len(result.runs) + 1
  for rec in C.summary_records([result]):
    assert SUMMARY_KEYS <= set(rec)
  return doc, rows


def _run(result, defence, setting=None):
  (run,) = [r for r in result.runs if r.defence == defence
            and (setting is None or r.setting == setting)]
  return run


def _assert_guard_columns(rows, run, expected_keys):
  """Every ``og.guard_stats`` key of the run's optimizer is a filled CSV column for it."""
  mine = [row for row in rows if row["defence"] == run.defence and row["setting"] == run.setting]
  assert mine, run.defence
  for key in expected_keys:
    assert key in mine[0], (run.defence, key)
    assert all(row[key] != "" for row in mine), (run.defence, key)


# ---------------------------------------------------------------------------
# Measuring pieces (fast)
# ---------------------------------------------------------------------------


def test_adding_problem_batches_match_the_definition():
  rng = np.random.default_rng(0)
  x, y = adding_problem.make_batch(rng, 500, 30)
  assert x.shape == (500, 30, 2) and y.shape == (500,)
  markers = x[..., 1]
  np.testing.assert_array_equal(markers.sum(axis=1), 2)
  first = markers.argmax(axis=1)
  second = 29 - markers[:, ::-1].argmax(axis=1)
  assert (first < 3).all() and (second >= 3).all() and (second < 15).all()
  np.testing.assert_allclose(y, 0.5 * (x[np.arange(500), first, 0] + x[np.arange(500), second, 0]),
                             rtol=1e-6)


def test_adding_problem_mean_predictor_is_36_percent_wrong():
  # P(|(U1 + U2)/2 - 1/2| > 0.2) = (1 - 0.4)**2
  _, y = adding_problem.test_set(50, 40_000)
  wrong = float(adding_problem.wrong_fraction(jnp.full(y.shape, 0.5), jnp.asarray(y)))
  assert abs(wrong - 0.36) < 4 * math.sqrt(0.36 * 0.64 / 40_000)


def test_adding_problem_wrong_fraction_counts_nan_as_wrong():
  pred = jnp.array([0.5, jnp.nan, jnp.inf, 0.9])
  target = jnp.array([0.5, 0.5, 0.5, 0.5])
  assert float(adding_problem.wrong_fraction(pred, target)) == 0.75


def test_adding_problem_batches_do_not_depend_on_the_chunking():
  config = adding_problem.Config(seeds=2, batch=3)
  whole = adding_problem.Batches(config, 10)(0, 6)
  parts = adding_problem.Batches(config, 10)
  pieces = [parts(0, 2), parts(2, 3), parts(3, 6)]
  for i in range(2):
    np.testing.assert_array_equal(whole[i], np.concatenate([p[i] for p in pieces]))
  assert whole[0].shape == (6, 2, 3, 10, 2)
  with pytest.raises(ValueError, match="out of order"):
    parts(0, 1)


def test_adding_problem_schedule_decays_at_the_fractions():
  config = adding_problem.Config(steps=100, decay_at=(0.5, 0.9), decay_factor=0.1)
  sched = adding_problem.schedule(config, 0.2)
  np.testing.assert_allclose([float(sched(t)) for t in (0, 49, 50, 89, 90, 99)],
                             [0.2, 0.2, 0.02, 0.02, 0.002, 0.002], rtol=1e-6)


def test_transformer_data_is_the_markov_chain():
  table, entropy = T.markov_chain(8, 0.0)
  seq = T.make_sequences(np.random.default_rng(0), (5,), 12, 8, 0.0)
  np.testing.assert_array_equal(seq[:, 2:], table[seq[:, :-2], seq[:, 1:-1]])
  assert entropy == pytest.approx(0.0, abs=1e-12)
  _, h = T.markov_chain(32, 0.1)
  p_top, p = 0.9 + 0.1 / 32, 0.1 / 32
  assert h == pytest.approx(-(p_top * math.log(p_top) + 31 * p * math.log(p)))
  bad = transformer_injected.corrupt(np.random.default_rng(0), seq, 8)
  assert (bad == bad[:, :1]).all()


def test_transformer_qk_layernorm_bounds_the_attention_logits():
  # with huge query/key weights, qk-LayerNorm keeps every logit at most sqrt(head dim)
  tokens = jnp.asarray(T.make_sequences(np.random.default_rng(0), (2,), 8, 16, 0.1))
  for qk_norm in (False, True):
    graphdef, params = T.init_params(16, 8, 16, 2, 1, qk_norm, seed=0)
    params = jax.tree.map_with_path(
        lambda path, x: x * 100 if "qkv" in C.path_name(path) else x, params)
    _, diag = T.lm_loss(graphdef, params, tokens)
    top = float(diag["max_attn_logit"])
    if qk_norm:
      assert top <= math.sqrt(8) + 1e-3
    else:
      assert top > 100


def test_transformer_reports_every_heads_largest_logit():
  tokens = jnp.asarray(T.make_sequences(np.random.default_rng(0), (3,), 8, 16, 0.1))
  graphdef, params = T.init_params(16, 8, 16, 2, 3, False, seed=0)
  _, diag = T.lm_loss(graphdef, params, tokens)
  assert diag["attn_max_logits"].shape == (3, 2)  # [layers, heads]
  assert float(jnp.max(diag["attn_max_logits"])) == float(diag["max_attn_logit"])
  grads = jax.grad(lambda p: jnp.sum(T.lm_loss(graphdef, p, tokens)[1]["attn_max_logits"]))(
      params)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


def test_count_spikes_matches_a_direct_loop():
  rng = np.random.default_rng(1)
  loss = 1.0 + 0.05 * rng.random((2, 80))
  loss[0, [30, 31, 60]] = 3.0
  loss[1, 10] = 9.0  # inside the first window: not counted
  np.testing.assert_array_equal(transformer_injected.count_spikes(loss, 1.5), [3, 0])


def test_injected_glitch_steps():
  config = transformer_injected.Config(steps=100, glitch_every=20)
  np.testing.assert_array_equal(transformer_injected.glitch_steps(config), [10, 30, 50, 70])
  assert transformer_injected.glitch_steps(dataclasses.replace(config, glitch_every=0)).size == 0


def test_injected_fault_steps_and_gradient_factors():
  config = transformer_injected.Config(steps=100, glitch_every=20, fault_every=30)
  # every 30 steps from 30, before the last 10% (not 90), never on a glitch step (not 30)
  np.testing.assert_array_equal(transformer_injected.fault_steps(config), [60])
  config = dataclasses.replace(config, fault_every=25)  # 50 is a glitch step
  np.testing.assert_array_equal(transformer_injected.fault_steps(config), [25, 75])
  factors = transformer_injected.grad_factors(config)
  assert factors.dtype == np.float32 and factors.shape == (100,)
  assert set(np.flatnonzero(factors != 1)) == {25, 75} and factors[25] == 1e4
  for off in (dict(fault_every=0), dict(fault_scale=1.0)):
    assert transformer_injected.fault_steps(dataclasses.replace(config, **off)).size == 0
  assert transformer_injected.setting(transformer_injected.Config()) == (
      "INJECTED: 5 corrupted batches + 2 x1e4, peak lr 0.03")


def _sweep_run(lr, defence, val, diverged=False):
  loss = np.ones((2, 10))
  if diverged:
    loss[0, 5:] = np.nan
  return C.Run(f"lr={lr:g}", defence, loss, np.ones_like(loss), np.zeros(2),
               metrics={"val_loss": list(val)})


def test_failing_lr_is_where_every_higher_rate_fails():
  runs = [_sweep_run(0.01, "none", [1.0, 1.0]), _sweep_run(0.1, "none", [1.05, 1.05]),
          _sweep_run(0.3, "none", [2.0, 2.0]), _sweep_run(1.0, "none", [1.0, 1.0], diverged=True),
          _sweep_run(0.01, "qk", [1.0, 1.0]), _sweep_run(0.1, "qk", [2.0, 2.0]),
          _sweep_run(0.3, "qk", [1.0, 1.0]), _sweep_run(1.0, "qk", [1.0, 1.0])]
  assert transformer_lr_sweep.failing_lr(runs, "none", 0.1) == 0.3
  assert transformer_lr_sweep.failing_lr(runs, "qk", 0.1) is None  # recovers at 0.3


def test_failing_lr_compares_with_the_fixed_reference_not_the_best_row():
  runs = [_sweep_run(0.01, "none", [1.0, 1.0]), _sweep_run(0.1, "none", [2.0, 2.0]),
          _sweep_run(0.01, "qk_layernorm", [1.08, 1.08]),
          _sweep_run(0.1, "qk_layernorm", [1.05, 1.05])]
  assert transformer_lr_sweep.reference_loss(runs) == 1.0
  assert transformer_lr_sweep.failing_lr(runs, "qk_layernorm", 0.1) is None
  # a much better new row moves neither the reference nor another row's verdict
  better = runs + [_sweep_run(0.01, "qk_clip", [0.5, 0.5]), _sweep_run(0.1, "qk_clip", [0.6, 0.6])]
  assert transformer_lr_sweep.reference_loss(better) == 1.0
  assert transformer_lr_sweep.failing_lr(better, "qk_layernorm", 0.1) is None
  assert transformer_lr_sweep.failing_lr(better, "none", 0.1) == 0.1


def test_usable_rates_are_the_neighbouring_rates_that_train():
  runs = [_sweep_run(0.01, "none", [1.0, 1.0]), _sweep_run(0.1, "none", [2.0, 2.0]),
          _sweep_run(0.01, "pt", [2.0, 2.0]), _sweep_run(0.1, "pt", [1.05, 1.05]),
          _sweep_run(0.3, "pt", [1.0, 1.0]), _sweep_run(1.0, "pt", [1.0, 1.0], diverged=True),
          _sweep_run(0.01, "gap", [1.0, 1.0]), _sweep_run(0.1, "gap", [3.0, 3.0]),
          _sweep_run(0.3, "gap", [1.0, 1.0])]
  usable = transformer_lr_sweep.usable_rates
  assert usable(runs, "none", 0.1) == [[0.01]]
  assert usable(runs, "pt", 0.1) == [[0.1, 0.3]]
  assert usable(runs, "gap", 0.1) == [[0.01], [0.3]]
  assert transformer_lr_sweep.rate_range(runs, "pt", 0.1) == "0.1-0.3"
  assert transformer_lr_sweep.rate_range(runs, "gap", 0.1) == "0.01, 0.3"
  assert transformer_lr_sweep.rate_range(runs, "pt", 0.01) == "0.3"
  assert transformer_lr_sweep.rate_range(runs[:2], "none", 0.1) == "0.01"
  worse = [_sweep_run(0.01, "none", [1.0, 1.0]), _sweep_run(0.1, "x", [5.0, 5.0])]
  assert transformer_lr_sweep.rate_range(worse, "x", 0.1) == "no rate"


def test_sweep_per_tensor_rows_run_at_every_learning_rate_of_the_sweep():
  config = transformer_lr_sweep.Config()
  for name in ("per_tensor_rates", "per_tensor_rates+qk_clip"):
    assert name in config.defences and name in transformer_lr_sweep.DEFENCES
    assert transformer_lr_sweep.rates(config, name) == config.learning_rates
  assert 1.0 in config.learning_rates
  assert set(config.diagnosed) >= {"none", "per_tensor_rates"}


def _lm_params(seed=0):
  _, params = T.init_params(8, 8, 16, 2, 1, False, seed)
  return jax.tree.map(jnp.asarray, params)


def test_sweep_per_tensor_rates_scale_every_tensor_but_the_embeddings():
  config = transformer_lr_sweep.Config(steps=20, warmup_steps=2)
  params = _lm_params()
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p + 1.0), params)
  _, adam = transformer_lr_sweep.DEFENCES["none"]
  _, per_tensor = transformer_lr_sweep.DEFENCES["per_tensor_rates"]

  def two_steps(tx):
    state = tx.init(params)
    for _ in range(2):
      updates, state = tx.update(grads, state, params)
    return updates

  ref, got = two_steps(adam(config, 0.3)), two_steps(per_tensor(config, 0.3))
  paths = [C.path_name(p) for p, _ in jax.tree.leaves_with_path(params)]
  assert sum("embedding" in p for p in paths) == 2  # token and position tables
  for path, r, g in zip(paths, jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
    factor = 1.0 if "embedding" in path else config.other_rate_factor
    np.testing.assert_allclose(g, factor * r, rtol=1e-6, err_msg=path)
  # with a factor of 1 the row is Adam, bitwise
  same = two_steps(per_tensor(dataclasses.replace(config, other_rate_factor=1.0), 0.3))
  for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(same), strict=True):
    np.testing.assert_array_equal(g, r)


def test_sweep_tensor_stats_per_kind_match_numpy():
  params = _lm_params()
  updates = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
  stats = transformer_lr_sweep.tensor_stats(params, updates)
  assert set(stats) == {f"{w}/{k}" for w in ("tensor_norm", "update_ratio")
                        for k in transformer_lr_sweep.KINDS}
  kinds = {}
  for path, p in jax.tree.leaves_with_path(params):
    kinds.setdefault(transformer_lr_sweep.tensor_kind(path), []).append(
        (C.path_name(path), np.asarray(p, np.float64)))
  assert [n for n, _ in kinds["embeddings"]] == ["pos/embedding/value", "tok/embedding/value"]
  assert {n.split("/")[-2] for n, _ in kinds["qkv"]} == {"kernel", "bias"}
  assert all(n.split("/")[0] == "head" for n, _ in kinds["head"])
  assert all(n.split("/")[-3].startswith("ln") for n, _ in kinds["layernorm"])
  for kind, leaves in kinds.items():
    norm = math.sqrt(sum(float(np.sum(p ** 2)) for _, p in leaves))
    size = sum(p.size for _, p in leaves)
    np.testing.assert_allclose(stats[f"tensor_norm/{kind}"], norm, rtol=1e-5)
    np.testing.assert_allclose(stats[f"update_ratio/{kind}"], 0.01 * math.sqrt(size) / norm,
                               rtol=1e-5)


def _diagnosed_run(defence, lr, steps=40, growth=2.0, logit_from=None):
  kinds = transformer_lr_sweep.KINDS
  t = np.arange(steps)
  extra = {"max_attn_logit": np.tile(np.where(t >= (logit_from or steps), 500.0, 5.0), (2, 1))}
  for i, kind in enumerate(kinds):
    extra[f"tensor_norm/{kind}"] = np.tile((i + 1.0) * (1 + (growth - 1) * t / 10), (2, 1))
    extra[f"update_ratio/{kind}"] = np.full((2, steps), 0.01 * (i + 1))
  run = _sweep_run(lr, defence, [1.0, 1.0])
  run.loss = np.ones((2, steps))
  run.extra = extra
  return run


def test_sweep_diagnose_reads_the_logged_curves():
  config = {"steps": 40, "warmup_steps": 10}
  runs = [_diagnosed_run("none", 0.03), _diagnosed_run("none", 0.3, growth=3.0, logit_from=7),
          _diagnosed_run("per_tensor_rates", 0.3), _sweep_run(0.3, "zclip", [1.0, 1.0])]
  d = transformer_lr_sweep.diagnose(runs, config)
  kinds = list(transformer_lr_sweep.KINDS)
  assert d["initial"] == {k: i + 1.0 for i, k in enumerate(kinds)}
  assert set(d["growth"]) == {("none", 0.03), ("none", 0.3), ("per_tensor_rates", 0.3)}
  assert d["growth"][("none", 0.3)]["qkv"] == pytest.approx(3.0)  # at the peak, step 10
  assert d["growth"][("none", 0.03)]["qkv"] == pytest.approx(2.0)
  assert d["logit_step"][("none", 0.3)] == [7, 7]
  assert d["logit_step"][("none", 0.03)] == [None, None]
  # relative step over steps 1-10 at the smallest rate, per unit of that step's rate
  unit = transformer_lr_sweep.unit_schedule(transformer_lr_sweep.Config(steps=40,
                                                                         warmup_steps=10))
  lr_t = 0.03 * np.asarray([float(unit(i)) for i in range(1, 11)])
  for i, k in enumerate(kinds):
    assert d["step_per_lr"]["none"][k] == pytest.approx(np.mean(0.01 * (i + 1) / lr_t))
  table = transformer_lr_sweep.diagnosis_table(C.ExperimentResult(
      "sweep", "t", {**config, "fail_margin": 0.1}, runs))
  assert "| qkv (kernels, biases) | 2.0 |" in table
  assert "`none` at 0.3: 7 and 7" in table and "`none` at 0.03: never and never" in table


def test_digits_are_bundled_and_standardised():
  (x_train, y_train), (x_test, y_test) = deep_mlp.load_digits()
  assert x_train.shape == (1437, 64) and x_test.shape == (360, 64)
  assert set(np.unique(y_train)) == set(range(10))
  varying = x_train.std(axis=0) > 1e-3
  np.testing.assert_allclose(x_train.mean(axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(x_train.std(axis=0)[varying], 1.0, rtol=1e-4)


def test_deep_mlp_numpy_init_matches_the_named_scales():
  model = deep_mlp.MLP(32, 64, 10, init_kind="bad", gain=1.6)
  params = deep_mlp.init_variables(model, 64, seed=0)["params"]
  kernel = params["ScanBlock_0"]["Dense_0"]["kernel"]
  assert kernel.shape == (31, 64, 64)
  assert abs(kernel.std() - 1.6 / 8) < 0.01
  np.testing.assert_array_equal(params["ScanBlock_0"]["Dense_0"]["bias"], 0.0)
  he = deep_mlp.init_variables(deep_mlp.MLP(32, 64, 10, init_kind="he"), 64, 0)["params"]
  assert abs(he["ScanBlock_0"]["Dense_0"]["kernel"].std() - math.sqrt(2 / 64)) < 0.01


def test_data_parallel_compare_rejects_a_mismatch():
  ref = {"loss": np.ones(4), "skipped": np.zeros(1), "params": {"w": np.ones(3)}}
  bad = {"loss": np.ones(4) * 1.01, "skipped": np.zeros(1), "params": {"w": np.ones(3)}}
  with pytest.raises(AssertionError, match="loss curve"):
    data_parallel.compare({"single device": ref, "pmap": bad}, rtol=1e-4, atol=1e-5)


def test_run_diverged_and_final_losses():
  loss = np.array([[1.0] * 99 + [0.5],        # fine
                   [1.0] * 50 + [np.nan] * 50,  # NaN
                   [1.0] * 90 + [20.0] * 10,    # ended 20x above its start
                   [1.0] * 90 + [5.0] * 10])    # 5x: not diverged
  run = C.Run("s", "d", loss, np.ones_like(loss), np.zeros(4))
  np.testing.assert_array_equal(run.diverged(), [False, True, True, False])
  final = run.final_losses()
  np.testing.assert_allclose(final[[0, 2, 3]], [np.mean([1.0] * 4 + [0.5]), 20.0, 5.0])
  assert np.isnan(final[1])
  assert run.first_nonfinite_step() == [None, 50, None, None]
  assert run.nan_note() == "NaN at step -,50,-,-"


def _fake_result():
  ok = C.Run("T=1 lr=0.1", "clip", np.array([[1.0, 0.5], [1.0, 0.25]]), np.ones((2, 2)),
             [0, 3], metrics={"test_error": [0.02, 0.06]}, injected_faults=4)
  bad = C.Run("T=1 lr=0.1", "none", np.array([[1.0, np.nan], [1.0, 0.5]]), np.ones((2, 2)),
              [0, 0], metrics={"test_error": [1.0, 0.3]})
  ref = C.Run("any T", "baseline", np.full((1, 1), np.nan), np.full((1, 1), np.nan), [0],
              metrics={"test_error": [0.36]})
  return C.ExperimentResult("toy", "toy", {}, [ok, bad, ref], metric="test_error",
                            data="load_digits")


def test_summary_records_have_the_documented_keys_and_values():
  ok, bad, ref = C.summary_records([_fake_result()])
  for rec in (ok, bad, ref):
    assert SUMMARY_KEYS <= set(rec)
    assert rec["experiment"] == "toy" and rec["data"] == "load_digits"
    assert rec["metric"] == "test_error"
  assert ok["defence"] == "clip" and ok["setting"] == bad["setting"] == "T=1 lr=0.1"
  assert ok["seeds"] == 2 and ok["diverged"] == 0
  assert ok["final_loss"] == pytest.approx(np.mean([0.5, 0.25]))
  assert ok["value"] == pytest.approx(0.04) and ok["values"] == pytest.approx([0.02, 0.06])
  assert ok["min"] == pytest.approx(0.02) and ok["max"] == pytest.approx(0.06)
  assert ok["injected_faults"] == 4 and ok["skipped"] == [0, 3]
  assert bad["diverged"] == 1 and bad["final_loss"] is None and bad["injected_faults"] == 0
  assert ref["final_loss"] is None and ref["diverged"] == 0 and ref["steps"] == 0
  json.dumps([ok, bad, ref])  # plain JSON


def test_summary_table_shows_the_spread_over_seeds():
  table = C.summary_table([_fake_result()])
  line = next(ln for ln in table.splitlines() if " clip " in ln)
  assert "0.0400 (0.0200-0.0600)" in line  # metric mean (min-max)
  assert "0.3750 (0.2500-0.5000)" in line  # final loss mean (min-max)
  assert "min-max" in table.splitlines()[0]


def test_num_chunks_divides_steps():
  for steps in (1, 7, 10, 24, 97, 400):
    n = C.num_chunks(steps)
    assert 1 <= n <= 10 and steps % n == 0
    assert all(steps % k for k in range(n + 1, min(steps, 10) + 1))


def _python_loop(steps, xs):
  c, expected = 1.0, []
  for t in range(steps):
    c = c * 0.5 + xs[t] + t
    expected.append(2 * c)
  return c, expected


def _step(c, inputs):
  t, x = inputs
  c = c * 0.5 + x + t
  return c, c * 2


def test_scan_loop_equals_a_python_loop():
  xs = np.arange(12, dtype=np.float32)
  carry, out = C.scan_loop(_step, jnp.float32(1.0), 12, xs=xs, chunks=4)
  c, expected = _python_loop(12, xs)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  assert float(carry) == pytest.approx(c, rel=1e-6)
  # the batches can also come from a callable, chunk by chunk
  calls = []

  def make(lo, hi):
    calls.append((lo, hi))
    return xs[lo:hi]

  _, out2 = C.scan_loop(_step, jnp.float32(1.0), 12, xs=make, chunks=4)
  np.testing.assert_array_equal(out, out2)
  assert calls == [(0, 3), (3, 6), (6, 9), (9, 12)]


def test_scan_loop_stops_once_everything_is_nan():
  def step(c, inputs):
    t, _ = inputs
    c = jnp.where(t == 4, jnp.nan, c + 1.0)
    return c, (c, t)

  bar = C.Progress(20, "t", enabled=False)
  _, (vals, ts) = C.scan_loop(step, jnp.zeros(3), 20, chunks=4, bar=bar,
                              stop=lambda c: C.all_nonfinite({"p": c[None]}))
  assert vals.shape == (20, 3) and ts.shape == (20,)
  np.testing.assert_array_equal(vals[:4, 0], [1, 2, 3, 4])
  assert np.isnan(vals[4:]).all()
  np.testing.assert_array_equal(ts[:5], np.arange(5))  # ran one chunk: NaN everywhere at t=4
  np.testing.assert_array_equal(ts[5:], 4)  # the rest: the last value
  assert bar.done == 20


def test_all_nonfinite_needs_every_run():
  tree = {"a": jnp.array([[1.0, jnp.nan], [jnp.inf, 0.0]]), "b": jnp.array([0.0, 1.0])}
  assert bool(C.all_nonfinite(tree))
  tree = {"a": jnp.array([[1.0, jnp.nan], [2.0, 0.0]]), "b": jnp.array([0.0, 1.0])}
  assert not bool(C.all_nonfinite(tree))


def test_parallel_map_keeps_the_order():
  def slow_square(x):
    time.sleep(0.01 * (5 - x))
    return x * x

  assert C.parallel_map(slow_square, list(range(5)), jobs=3) == [0, 1, 4, 9, 16]
  assert C.parallel_map(slow_square, list(range(5)), jobs=1) == [0, 1, 4, 9, 16]


def test_progress_prints_plain_lines_without_a_terminal():
  stream = io.StringIO()  # not a TTY
  with C.Progress(100, "exp", every_s=0.05, stream=stream) as bar:
    with bar.phase_of("clip_global"):
      bar.update(40)
      time.sleep(0.3)
  lines = stream.getvalue().splitlines()
  assert lines, "no progress line"
  assert all(ln.startswith("[exp]") for ln in lines)
  assert any("clip_global: 40/100 steps" in ln and "elapsed" in ln for ln in lines)
  quiet = io.StringIO()
  with C.Progress(10, "exp", enabled=False, every_s=0.01, stream=quiet) as bar:
    bar.update(5)
    time.sleep(0.05)
  assert quiet.getvalue() == ""


def test_default_output_is_a_new_folder_under_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  first = _default_out()
  assert os.path.dirname(first) == "runs"
  os.makedirs(first)
  second = _default_out()
  assert second != first and second.startswith(first)


def test_runs_folder_is_ignored_by_git():
  with open(os.path.join(ROOT, ".gitignore")) as f:
    assert "runs/" in f.read().split()


def test_update_docs_rewrites_only_the_marked_table(tmp_path):
  page = tmp_path / "docs" / "experiments.md"
  page.parent.mkdir()
  page.write_text(f"# Experiments\n\nintro\n\n{MARK_START}\nold table\n{MARK_END}\n\nafter\n")
  png = tmp_path / "toy.png"
  png.write_bytes(b"\x89PNG")
  res = _fake_result()
  res.files = [str(png), str(tmp_path / "toy.json")]
  written = update_docs([res], "| new | table |", "header", root=str(tmp_path))
  text = page.read_text()
  assert "old table" not in text and "| new | table |" in text and "header" in text
  assert text.startswith("# Experiments\n\nintro\n") and text.endswith("\nafter\n")
  assert (tmp_path / "docs" / "_static" / "experiments" / "toy.png").read_bytes() == b"\x89PNG"
  assert len(written) == 2


def test_update_docs_writes_each_experiments_table_into_its_section(tmp_path):
  page = tmp_path / "docs" / "experiments.md"
  page.parent.mkdir()
  start, end = marks("toy")
  page.write_text(f"# Experiments\n\n## Toy\n\n{start}\nold\n{end}\n\nprose\n\n"
                  f"{MARK_START}\nold header\n{MARK_END}\n")
  res = _fake_result()
  update_docs([res], "legend", "header", root=str(tmp_path))
  text = page.read_text()
  assert "old" not in text and text.endswith("header\n\nlegend\n" + MARK_END + "\n")
  table = text.split(start)[1].split(end)[0]
  lines = table.strip().splitlines()
  assert lines[0].startswith("| defence | test error, % wrong (min-max) | diverged |")
  assert lines[2] == "| `clip` | 4 (2-6) | - | 1.5 | 0.375 |"
  assert lines[3] == "| `none` | 65 (30-100) | 1 of 2 | - | NaN |"
  assert lines[4] == "| baseline | 36 | - | - | - |"
  assert "prose" in text


def test_figures_are_wide_enough_for_the_docs(tmp_path):
  if not HAVE_MPL:
    pytest.skip("matplotlib is not installed")
  from PIL import Image

  res = _fake_result()
  path = C.plot_runs(res, str(tmp_path / "toy.png"))
  with Image.open(path) as im:
    assert im.size[0] >= 1600


def test_main_cli_lists_and_rejects_bad_arguments(capsys):
  assert main(["--list"]) == 0
  text = capsys.readouterr().out
  for name in ("adding_problem", "transformer_lr_sweep", "deep_mlp", "transformer_injected",
               "transformer_localized_spike", "float16_loss_scale", "data_parallel"):
    assert name in text
  with pytest.raises(SystemExit):
    main(["--help"])
  help_text = capsys.readouterr().out
  assert "--quick" in help_text and "--full" in help_text and "--coordinator" in help_text
  assert main(["--steps", "0"]) == 2
  assert main(["--coordinator", "localhost:1"]) == 2
  assert main(["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"]) == 2
  with pytest.raises(SystemExit):
    main(["--quick", "--full"])


def test_every_experiment_documents_claim_paper_and_changes():
  for module in (adding_problem, transformer_lr_sweep, deep_mlp, transformer_injected,
                 transformer_localized_spike, float16_loss_scale, data_parallel):
    doc = module.__doc__
    assert "Claim tested" in doc, module.__name__
    assert "changed" in doc, module.__name__
    assert any(str(y) in doc for y in range(1990, 2030)), module.__name__  # a dated reference
    for profile in ("quick", "full"):
      assert isinstance(getattr(module.Config, profile)(), module.Config)


# ---------------------------------------------------------------------------
# End to end, tiny sizes (slow)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_adding_problem_tiny_run(tmp_path):
  config = adding_problem.Config(lengths=(10,), learning_rates=(0.1, 3.0), seeds=2, steps=60,
                                 hidden=16, test_size=500,
                                 defences=("none", "clip_global", "zclip+max_norm"))
  result = adding_problem.run(config, progress=False)
  _, rows = _check_outputs(result, tmp_path)
  assert result.runs[0].defence.startswith("baseline")
  none = _run(result, "none", "T=10 lr=3")
  assert none.diverged().all() and not np.isfinite(none.loss).all()
  assert none.note.startswith("NaN at step")
  for lr in ("0.1", "3"):
    r = _run(result, "clip_global", f"T=10 lr={lr}")
    assert np.isfinite(r.loss).all()
    assert all(0.0 <= e <= 1.0 for e in r.metrics["test_error"])
  params = adding_problem.init_params(adding_problem.TanhRNN(16), 10, 0, 1.2)
  keys = og.guard_stats(adding_problem.defence_factories(config)["zclip+max_norm"](0.1)
                        .init(params))
  assert keys
  _assert_guard_columns(rows, _run(result, "zclip+max_norm", "T=10 lr=0.1"), keys)


@pytest.mark.slow
def test_transformer_lr_sweep_tiny_run(tmp_path):
  config = transformer_lr_sweep.Config(
      learning_rates=(1e-3, 1.0), steps=12, seeds=2, vocab=8, length=8, batch=4, width=16,
      heads=2, layers=1, warmup_steps=3, val_size=16,
      defences=("none", "zclip", "skip_on_spike", "qk_layernorm", "qk_clip",
                "qk_layernorm+qk_clip", "per_tensor_rates", "per_tensor_rates+qk_clip"))
  result = transformer_lr_sweep.run(config, progress=False)
  _, rows = _check_outputs(result, tmp_path)
  assert len(result.runs) == 2 * 8
  for r in result.runs:  # the per-tensor curves of the diagnosed defences only
    logged = {k for k in r.extra if k.startswith(("tensor_norm/", "update_ratio/"))}
    assert len(logged) == (10 if r.defence in config.diagnosed else 0), r.defence
  assert "Per tensor kind" in transformer_lr_sweep.table(result)  # per_tensor_rates+qk_clip at 1
  assert {r.setting for r in result.runs} == {"lr=0.001", "lr=1"}
  for r in result.runs:
    assert r.injected_faults == 0
    assert np.isfinite(r.extra["max_attn_logit"]).all()
    assert "log_z" in r.extra
    np.testing.assert_allclose(r.grad_norm, r.extra["monitor/global_norm"])
  for name in config.defences:
    qk, make_tx = transformer_lr_sweep.DEFENCES[name]
    _, params = T.init_params(8, 8, 16, 2, 1, qk, 0)
    keys = og.guard_stats(make_tx(config, 0.1).init(params))
    assert "monitor/global_norm" in keys
    _assert_guard_columns(rows, _run(result, name, "lr=1"), keys)
  assert any(k.endswith("fails from lr") for k in result.checks)


@pytest.mark.slow
def test_deep_mlp_tiny_run_explodes_without_defences(tmp_path):
  config = deep_mlp.Config(steps=12, seeds=1, batch=32, defences=(
      "none", "clip_global", "batchnorm", "warmup+inv_sqrt", "skip_nonfinite", "clip+plateau"))
  result = deep_mlp.run(config, guards=list(config.defences), progress=False)
  _, rows = _check_outputs(result, tmp_path)
  assert result.data == "load_digits"
  assert not np.isfinite(_run(result, "none").loss).all()  # the blow-up is reproduced
  assert _run(result, "none").diverged().all()
  for name in ("clip_global", "batchnorm", "warmup+inv_sqrt", "clip+plateau"):
    r = _run(result, name)
    assert np.isfinite(r.loss).all(), name
    assert not r.diverged().any(), name
    assert 0.0 <= r.metrics["test_accuracy"][0] <= 1.0
  for name in ("skip_nonfinite", "clip+plateau"):
    params = deep_mlp.init_variables(deep_mlp.MLP(32, 64, 10), 64, 0)["params"]
    keys = og.guard_stats(deep_mlp.DEFENCES[name].make_tx(config).init(params))
    assert keys
    _assert_guard_columns(rows, _run(result, name), keys)


@pytest.mark.slow
def test_float16_loss_scale_tiny_run(tmp_path):
  config = float16_loss_scale.Config(steps=150, seeds=1, val_size=64)  # the --quick run
  result = float16_loss_scale.run(config, progress=False)
  _, rows = _check_outputs(result, tmp_path)
  by = {r.defence: r for r in result.runs}
  assert list(by) == list(config.defences)
  # float16 without a scale: most gradient entries underflow to 0 by the end, and the loss
  # stalls far above the scaled run's, which stays with float32 while float16 can follow it
  assert by["none"].extra["zero_gradients"][0, -1] > 0.5
  assert by["dynamic_loss_scale"].extra["zero_gradients"].max() < 0.01
  none, scaled = (float(by[n].metrics["val_mse"][0]) for n in ("none", "dynamic_loss_scale"))
  assert none > 30 * scaled
  assert by["dynamic_loss_scale_high_init"].skipped[0] > 0  # 2**30 overflows float16 first
  np.testing.assert_allclose(by["dynamic_loss_scale"].loss[0, :20], by["float32"].loss[0, :20],
                             rtol=0.05)
  tx = float16_loss_scale.DEFENCES["dynamic_loss_scale"].make_tx(config, 1e-3)
  keys = og.guard_stats(tx.init(jnp.zeros((32, 256))))
  assert "dynamic_loss_scale/scale" in keys
  _assert_guard_columns(rows, by["dynamic_loss_scale"], keys)


@pytest.mark.slow
def test_transformer_injected_tiny_run_is_labelled_injected(tmp_path):
  config = transformer_injected.Config(
      steps=40, seeds=1, vocab=8, length=8, batch=4, width=16, heads=2, layers=1,
      warmup_steps=4, glitch_every=6, fault_every=35, val_size=16,
      defences=("none", "skip_on_spike"))
  result = transformer_injected.run(config, progress=False)
  _, rows = _check_outputs(result, tmp_path)
  assert result.checks["glitch_steps"] == [3, 9, 15, 21, 27, 33]
  assert result.checks["fault_steps"] == [35]
  for r in result.runs:
    assert "INJECTED" in r.setting and r.injected_faults == 7
    assert np.isfinite(r.loss).all(), r.defence
    np.testing.assert_allclose(r.grad_norm, r.extra["monitor/global_norm"])
  # the x1e4 fault reaches the gradient norm, and the guard skips it (and nothing else)
  by = {r.defence: r for r in result.runs}
  assert by["none"].grad_norm[0, 35] > 1e3 * np.median(by["none"].grad_norm[0, :35])
  assert by["skip_on_spike"].metrics["faults_skipped"] == [1]
  assert by["skip_on_spike"].metrics["other_skipped"] == [0]
  assert "skipped 1 of 1 x1e4 faults, 0 other steps" in by["skip_on_spike"].note
  _, params = T.init_params(8, 8, 16, 2, 1, False, 0)
  keys = og.guard_stats(transformer_injected.DEFENCES["skip_on_spike"](config).init(params))
  _assert_guard_columns(rows, _run(result, "skip_on_spike"), keys)


@pytest.mark.slow
def test_transformer_localized_spike_tiny_run(tmp_path):
  config = transformer_localized_spike.Config(
      steps=24, seeds=1, vocab=8, length=8, batch=4, width=16, heads=2, layers=1,
      warmup_steps=4, spike_every=6, first_spike=6, adagc_warmup=4, val_size=16,
      defences=("no_spikes", "none", "clip_global", "adagc", "spam", "skip_on_spike"))
  result = transformer_localized_spike.run(config, progress=False)
  _, rows = _check_outputs(result, tmp_path)
  assert result.checks["spike_steps"] == [6, 12, 18]
  by = {r.defence: r for r in result.runs}
  assert by["no_spikes"].injected_faults == 0 and by["none"].injected_faults == 3
  for r in result.runs:
    assert "INJECTED" in r.setting and np.isfinite(r.loss).all(), r.defence
    assert {"unspiked_update_norm", "spiked_update_norm", "rare_row_update_norm"} <= set(r.extra)
  # the spike reaches the gradient norm; AdaGC leaves the other tensors' update alone
  assert by["none"].grad_norm[0, 6] > 5 * by["no_spikes"].grad_norm[0, 6]
  assert by["adagc"].metrics["unspiked_ratio"][0] > by["clip_global"].metrics["unspiked_ratio"][0]
  _, params = T.init_params(8, 8, 16, 2, 1, False, 0)
  keys = og.guard_stats(transformer_localized_spike.DEFENCES["adagc"](config).init(params))
  _assert_guard_columns(rows, _run(result, "adagc"), keys)


@pytest.mark.slow
def test_data_parallel_tiny_run_matches_single_device(tmp_path):
  config = data_parallel.Config(steps=30, depth=2, width=16, global_batch=64)
  result = data_parallel.run(config, progress=False)
  _, rows = _check_outputs(result, tmp_path)
  n = len(jax.devices())
  assert result.checks["devices"].startswith(f"{n} x")
  assert result.checks["pmap: allclose(rtol=0.0001, atol=1e-05)"] is True
  assert result.checks["jit + NamedSharding: allclose(rtol=0.0001, atol=1e-05)"] is True
  ref = _run(result, "single device")
  assert ref.injected_faults == 1
  assert ref.skipped.tolist() == [1]  # the corrupted batch (step 19) was skipped
  for name in ("pmap", "jit + NamedSharding"):
    r = _run(result, name)
    assert np.isfinite(r.loss).all()
    np.testing.assert_allclose(r.loss, ref.loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(r.skipped, ref.skipped)
  assert "skip_on_spike/num_skipped" in rows[0] and "zclip/threshold" in rows[0]


@pytest.mark.slow
def test_results_do_not_depend_on_the_number_of_jobs():
  config = deep_mlp.Config(steps=6, seeds=1, batch=16,
                           defences=("none", "clip_global", "agc"))
  jobs = C.JOBS
  try:
    C.JOBS = 1
    serial = deep_mlp.run(config, progress=False)
    C.JOBS = 3
    threaded = deep_mlp.run(config, progress=False)
  finally:
    C.JOBS = jobs
  for a, b in zip(serial.runs, threaded.runs, strict=True):
    np.testing.assert_array_equal(a.loss, b.loss)
    assert a.metrics == b.metrics


@pytest.mark.slow
def test_main_cli_writes_summary_into_runs_and_never_tracked_files(tmp_path):
  # a fresh process, run from a scratch folder: the default output lands in ./runs/
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, "-m", "experiments", "--only", "data_parallel", "--steps", "8",
       "--no-plots"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert "wall s" in proc.stdout
  (out,) = list((tmp_path / "runs").iterdir())
  summary = (out / "summary.md").read_text()
  assert "| data_parallel |" in summary and "pmap" in summary
  records = json.loads((out / "summary.json").read_text())
  assert [r["defence"] for r in records] == ["single device", "pmap", "jit + NamedSharding"]
  for rec in records:
    assert SUMMARY_KEYS <= set(rec) and rec["data"] == "load_digits"
  info = json.loads((out / "run.json").read_text())
  assert info["wall_s"] > 0 and info["profile"] == "default"
  assert (out / "data_parallel.csv").exists()
  assert sorted(os.listdir(tmp_path)) == ["runs"]


def test_main_reports_a_failing_experiment_and_exits_non_zero(tmp_path, monkeypatch, capsys):
  def broken(config, **kwargs):
    raise AssertionError("pmap: loss curve differs from single device")

  monkeypatch.setattr(data_parallel, "run", broken)
  rc = main(["--only", "data_parallel", "--out", str(tmp_path), "--no-progress"])
  assert rc == 1
  captured = capsys.readouterr()
  assert "[data_parallel] FAILED" in captured.out
  assert "loss curve differs" in captured.err
  assert "data_parallel: FAILED" in (tmp_path / "summary.md").read_text()
  assert json.loads((tmp_path / "run.json").read_text())["failed"] == ["data_parallel"]
