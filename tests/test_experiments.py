"""The experiment suite end to end at a tiny size, plus its measuring pieces.

Each experiment runs through its public ``run(Config(...))`` with a few steps
and small models; the outputs (JSON, CSV, PNG, summary table) must be written
and every guarded run must stay finite. The pieces that decide what the table
says (divergence, spikes, the adding problem's 36% baseline, the chunking of
the training loop) are checked against independent NumPy/Python versions.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _common as C
from experiments import adding_problem, data_parallel, deep_mlp, transformer_spikes
from experiments.__main__ import main

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


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
  trained = [r for r in result.runs if r.steps > 1]
  assert len(rows) == sum(r.seeds * r.steps for r in result.runs)
  assert {row["defence"] for row in rows} >= {r.defence for r in trained}
  table = C.summary_table([result])
  for r in result.runs:
    assert r.defence in table
  md = C.summary_table([result], markdown=True)
  assert md.count("\n") == len(result.runs) + 1
  return doc, rows


def _run(result, defence):
  (run,) = [r for r in result.runs if r.defence == defence]
  return run


def test_adding_problem_tiny_run(tmp_path):
  config = adding_problem.Config(
      lengths=(10,), learning_rates=(0.05, 0.5), seeds=2, steps=24, batch=8, hidden=8,
      test_size=2000, defences=("none", "clip_global", "zclip+max_norm", "clip+plateau"))
  result = adding_problem.run(config, progress=False)
  _check_outputs(result, tmp_path)
  # one baseline row plus one row per (length, lr, defence)
  assert len(result.runs) == 1 + 2 * 4
  for r in result.runs[1:]:
    assert r.loss.shape == (2, 24) and r.grad_norm.shape == (2, 24)
    assert len(r.metrics["test_error"]) == 2
    if r.defence != "none":
      assert np.isfinite(r.loss).all(), r.defence
      assert np.isfinite(r.metrics["test_error"]).all()
    assert all(0.0 <= e <= 1.0 for e in r.metrics["test_error"])
  baseline = result.checks["mean_predictor_error_T10"]
  assert abs(baseline - 0.36) < 4 * math.sqrt(0.36 * 0.64 / 2000)
  plateau = [r for r in result.runs if r.defence == "clip+plateau"]
  assert all(0 < s <= 1 for r in plateau for s in r.extra["lr_scale"][:, -1])


def test_adding_problem_batches_match_the_definition():
  rng = np.random.default_rng(0)
  x, y = adding_problem.make_batch(rng, (3, 50), 20)
  assert x.shape == (3, 50, 20, 2) and y.shape == (3, 50)
  markers = x[..., 1]
  np.testing.assert_array_equal(markers.sum(-1), 2.0)
  first = markers.argmax(-1)
  second = 19 - markers[..., ::-1].argmax(-1)
  assert (first < 2).all() and (second >= 2).all() and (second < 10).all()
  values = x[..., 0]
  expected = 0.5 * (np.take_along_axis(values, first[..., None], -1)[..., 0]
                    + np.take_along_axis(values, second[..., None], -1)[..., 0])
  np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_adding_problem_mean_predictor_is_36_percent_wrong():
  # closed form: P(|(U1 + U2)/2 - 1/2| > 0.2) = (1 - 0.4)**2
  _, y = adding_problem.test_set(50, 40_000)
  wrong = float(adding_problem.wrong_fraction(jnp.full(y.shape, 0.5), jnp.asarray(y)))
  assert abs(wrong - 0.36) < 4 * math.sqrt(0.36 * 0.64 / 40_000)


def test_adding_problem_wrong_fraction_counts_nan_as_wrong():
  pred = jnp.array([0.5, jnp.nan, jnp.inf, 0.9])
  target = jnp.array([0.5, 0.5, 0.5, 0.5])
  assert float(adding_problem.wrong_fraction(pred, target)) == 0.75


def test_deep_mlp_tiny_run_explodes_without_defences(tmp_path):
  config = deep_mlp.Config(steps=12, seeds=1, train_size=256, test_size=128,
                           batch=32, defences=("none", "clip_global", "batchnorm",
                                               "warmup+inv_sqrt", "clip+plateau"))
  result = deep_mlp.run(config, guards=list(config.defences), progress=False)
  _check_outputs(result, tmp_path)
  assert not np.isfinite(_run(result, "none").loss).all()  # the blow-up is reproduced
  assert _run(result, "none").diverged().all()
  for name in ("clip_global", "batchnorm", "warmup+inv_sqrt", "clip+plateau"):
    r = _run(result, name)
    assert np.isfinite(r.loss).all(), name
    assert not r.diverged().any(), name
    assert 0.0 <= r.metrics["test_acc"][0] <= 1.0


def test_deep_mlp_numpy_init_matches_the_named_scales():
  model = deep_mlp.MLP(32, 64, 10, init_kind="bad", gain=1.6)
  params = deep_mlp.init_variables(model, 32, seed=0)["params"]
  kernel = params["ScanBlock_0"]["Dense_0"]["kernel"]
  assert kernel.shape == (31, 64, 64)
  assert abs(kernel.std() - 1.6 / 8) < 0.01
  np.testing.assert_array_equal(params["ScanBlock_0"]["Dense_0"]["bias"], 0.0)
  he = deep_mlp.init_variables(deep_mlp.MLP(32, 64, 10, init_kind="he"), 32, 0)["params"]
  assert abs(he["ScanBlock_0"]["Dense_0"]["kernel"].std() - math.sqrt(2 / 64)) < 0.01


def test_transformer_spikes_tiny_run_logs_guard_stats(tmp_path):
  config = transformer_spikes.Config(
      steps=20, seeds=1, vocab=8, length=8, batch=4, width=16, heads=2, layers=1,
      warmup_steps=4, glitch_every=6, val_size=16,
      defences=("none", "skip_on_spike"))
  result = transformer_spikes.run(config, progress=False)
  _, rows = _check_outputs(result, tmp_path)
  assert result.checks["glitch_steps"] == [3, 9, 15]
  for r in result.runs:
    assert np.isfinite(r.loss).all(), r.defence
    assert "monitor/global_norm" in r.extra
    np.testing.assert_allclose(r.grad_norm, r.extra["monitor/global_norm"])
    assert np.isfinite(r.metrics["val_loss"]).all()
  assert "skip_on_spike/num_skipped" in _run(result, "skip_on_spike").extra
  assert "skip_on_spike/num_skipped" in rows[0]


def test_transformer_spikes_data_is_the_markov_chain():
  table, entropy = transformer_spikes.markov_chain(8, 0.0)
  seq = transformer_spikes.make_sequences(np.random.default_rng(0), (5,), 12, 8, 0.0)
  np.testing.assert_array_equal(seq[:, 2:], table[seq[:, :-2], seq[:, 1:-1]])
  assert entropy == pytest.approx(0.0, abs=1e-12)
  _, h = transformer_spikes.markov_chain(32, 0.1)
  p_top, p = 0.9 + 0.1 / 32, 0.1 / 32
  assert h == pytest.approx(-(p_top * math.log(p_top) + 31 * p * math.log(p)))
  bad = transformer_spikes.corrupt(np.random.default_rng(0), seq, 8)
  assert (bad == bad[:, :1]).all()


def test_data_parallel_tiny_run_matches_single_device(tmp_path):
  config = data_parallel.Config(steps=16, depth=2, width=16, per_device_batch=4,
                                glitch_step=10)
  result = data_parallel.run(config, progress=False)
  _check_outputs(result, tmp_path)
  n = len(jax.local_devices())
  assert result.checks["devices"].startswith(f"{n} x")
  assert result.checks["pmap: allclose(rtol=0.0001, atol=1e-05)"] is True
  assert result.checks["jit + NamedSharding: allclose(rtol=0.0001, atol=1e-05)"] is True
  ref = _run(result, "single device")
  for name in ("pmap", "jit + NamedSharding"):
    r = _run(result, name)
    assert np.isfinite(r.loss).all()
    np.testing.assert_allclose(r.loss, ref.loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(r.skipped, ref.skipped)


def test_data_parallel_compare_rejects_a_mismatch():
  ref = {"loss": np.ones(4), "skipped": np.zeros(4), "params": {"w": np.ones(3)}}
  bad = {"loss": np.ones(4) * 1.01, "skipped": np.zeros(4), "params": {"w": np.ones(3)}}
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


def test_count_spikes_matches_a_direct_loop():
  rng = np.random.default_rng(1)
  loss = 1.0 + 0.05 * rng.random((2, 80))
  loss[0, [30, 31, 60]] = 3.0
  loss[1, 10] = 9.0  # inside the first window: not counted
  np.testing.assert_array_equal(transformer_spikes.count_spikes(loss, 1.5), [3, 0])


def test_num_chunks_divides_steps():
  for steps in (1, 7, 10, 24, 97, 400):
    n = C.num_chunks(steps)
    assert 1 <= n <= 10 and steps % n == 0
    assert all(steps % k for k in range(n + 1, min(steps, 10) + 1))


def test_scan_loop_equals_a_python_loop():
  def step(c, inputs):
    t, x = inputs
    c = c * 0.5 + x + t
    return c, c * 2

  xs = np.arange(12, dtype=np.float32)
  carry, out = C.scan_loop(step, jnp.float32(1.0), 12, xs=xs, chunks=4)
  c, expected = 1.0, []
  for t in range(12):
    c = c * 0.5 + xs[t] + t
    expected.append(2 * c)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  assert float(carry) == pytest.approx(c, rel=1e-6)


def test_main_cli_writes_summary(tmp_path, capsys):
  out = tmp_path / "res"
  rc = main(["--only", "data_parallel", "--steps", "8", "--out", str(out), "--no-progress"])
  assert rc == 0
  text = capsys.readouterr().out
  assert "data_parallel" in text and "wall s" in text
  summary = (out / "summary.md").read_text()
  assert "| data_parallel |" in summary and "pmap" in summary
  assert (out / "data_parallel.json").exists() and (out / "data_parallel.csv").exists()
  assert main(["--list"]) == 0
  assert "adding_problem" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    main(["--help"])
  assert "--quick" in capsys.readouterr().out
