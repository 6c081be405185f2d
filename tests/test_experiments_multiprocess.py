"""``python -m experiments --only data_parallel`` across two local processes over gloo.

Two CPU processes with 4 simulated devices each form one 8-device system
through ``jax.distributed`` (``--coordinator/--num-processes/--process-id``);
a third, single process has 8 devices. All three must report the same
numbers: the same skipped steps and test accuracies, and final losses equal
to float32 tolerance (the all-reduce of gloo adds in another order than the
in-process one).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--only", "data_parallel", "--steps", "30", "--no-plots", "--no-progress"]


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _records(folder) -> dict[str, dict]:
  with open(os.path.join(folder, "summary.json")) as f:
    return {r["defence"]: r for r in json.load(f)}


@pytest.mark.slow
def test_two_processes_report_the_single_process_numbers(tmp_path):
  port = _free_port()
  procs = [
      subprocess.Popen(
          [sys.executable, "-m", "experiments", *ARGS, "--out", str(tmp_path / "multi"),
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
          cwd=tmp_path, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)
  ]
  single = subprocess.run([sys.executable, "-m", "experiments", *ARGS, "--out",
                           str(tmp_path / "single")], cwd=tmp_path, env=_env(8),
                          capture_output=True, text=True, timeout=900)
  logs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=900)
    except subprocess.TimeoutExpired:
      p.kill()
      out, _ = p.communicate()
    logs.append(out)
  assert single.returncode == 0, single.stdout + single.stderr
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log

  ref = _records(tmp_path / "single")
  runs = [_records(tmp_path / "multi" / f"process-{i}") for i in range(2)]
  with open(tmp_path / "multi" / "process-1" / "run.json") as f:
    info = json.load(f)
  assert info["process_count"] == 2 and info["process_index"] == 1
  assert info["devices"].startswith("8 x")
  assert set(ref) == {"single device", "pmap", "jit + NamedSharding"}
  assert ref["single device"]["setting"] == "8 x cpu, global batch 128"
  assert max(ref["single device"]["skipped"]) == 1  # the corrupted batch was skipped
  for mode, r in ref.items():
    for got in runs:
      g = got[mode]
      assert g["setting"] == r["setting"]
      assert g["skipped"] == r["skipped"], mode
      assert g["diverged"] == r["diverged"] == 0, mode
      np.testing.assert_allclose(g["final_loss"], r["final_loss"], rtol=1e-5, err_msg=mode)
      np.testing.assert_allclose(g["values"], r["values"], atol=1 / 360 + 1e-9, err_msg=mode)
  # both processes hold the same replicated results, bit for bit
  for mode in ref:
    for key in ("final_loss", "values", "skipped"):
      assert runs[0][mode][key] == runs[1][mode][key], (mode, key)
