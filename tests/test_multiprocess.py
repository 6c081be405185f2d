"""Two processes, one global mesh: guards decide the same step everywhere.

Two local processes join with ``jax.distributed.initialize`` over gloo CPU
collectives (4 CPU devices each, 8 in the global mesh). Each builds its
optimizers *before* initialize, as a multi-host script does, so this also
checks that no factory or schedule touches the XLA backend when it is built.
They then train a small MLP with the batch sharded across the processes, under
``jit`` on ``NamedSharding`` global arrays (guards with ``axis_name=None``) and
under ``shard_map`` (each device hands its own shard's gradient to guards with
``axis_name="d"``). A NaN in one process's shard at one step and a spike in the
other process's shard at a later step must make both processes skip exactly
those steps and end with bitwise identical parameters. A single-process run on
8 devices must take the same decisions and reach the same parameters up to
float32 rounding (its all-reduce sums in another order). The child program is
``tests/_multiprocess_worker.py``.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
WORKER_PATH = HERE / "_multiprocess_worker.py"
TIMEOUT_S = 180
GLOO_MISSING = 3  # the worker's exit status when gloo collectives are unavailable


def _load_worker():
  spec = importlib.util.spec_from_file_location("_multiprocess_worker", WORKER_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


worker = _load_worker()


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env() -> dict[str, str]:
  env = dict(os.environ)
  flags = [
      f
      for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")
  ]
  flags.append(f"--xla_force_host_platform_device_count={worker.NUM_DEVICES // 2}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  root = str(HERE.parent)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  return env


def _run_two_processes(tmp_path: Path, while_waiting):
  """Runs both workers and ``while_waiting()`` meanwhile.

  Returns the workers' results and ``while_waiting()``'s, or skips when gloo is
  missing.
  """
  port, env = _free_port(), _child_env()
  procs, logs = [], []
  for i in range(2):
    log = open(tmp_path / f"{i}.log", "w+")  # closed below
    logs.append(log)
    procs.append(
        subprocess.Popen(
            [sys.executable, str(WORKER_PATH), str(i), str(port), str(tmp_path)],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    )
  deadline, timed_out = time.monotonic() + TIMEOUT_S, False
  try:
    local_result = while_waiting()
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    timed_out = True
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  report = "\n".join(
      f"--- process {i} (exit status {p.returncode}) ---\n{out[-4000:]}"
      for i, (p, out) in enumerate(zip(procs, outputs, strict=True))
  )
  for p, out in zip(procs, outputs, strict=True):
    if p.returncode == GLOO_MISSING and "GLOO-UNAVAILABLE" in out:
      pytest.skip(f"gloo CPU collectives are unavailable in this jaxlib:\n{report}")
  assert not timed_out, f"the workers were still running after {TIMEOUT_S} s:\n{report}"
  assert all(p.returncode == 0 for p in procs), f"a worker failed:\n{report}"
  return [dict(np.load(tmp_path / f"{i}.npz")) for i in range(2)], local_result


def _skipped_steps(num_skipped):
  """The steps at which the cumulative ``num_skipped`` counter went up."""
  return np.flatnonzero(np.diff(num_skipped, prepend=0)).tolist()


@pytest.mark.slow
def test_two_processes_skip_the_same_steps_and_end_bitwise_identical(tmp_path, devices):
  # the reference runs in this process, on its 8 local devices
  results, reference = _run_two_processes(
      tmp_path, lambda: worker.run_all(worker.build_all())
  )

  p0, p1 = results
  assert sorted(p0) == sorted(p1) == sorted(reference)
  expected_skips = {
      "skip_nonfinite": [worker.NAN_STEP],
      "skip_on_spike": [worker.NAN_STEP, worker.SPIKE_STEP],
  }
  init = worker.init_params()
  for mode in worker.MODES:
    for guard in worker.GUARDS:
      run = f"{mode}/{guard}"
      for r, who in ((p0, "process 0"), (p1, "process 1"), (reference, "reference")):
        assert _skipped_steps(r[f"{run}/num_skipped"]) == expected_skips[guard], (run, who)
      for name in init:
        key = f"{run}/params/{name}"
        a, b = p0[key], p1[key]
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == init[name].shape
        assert a.tobytes() == b.tobytes(), f"{key} differs between the processes"
        assert np.all(np.isfinite(a)), key
        assert not np.array_equal(a, init[name]), f"{key} never changed"
        np.testing.assert_allclose(a, reference[key], rtol=1e-5, atol=1e-6, err_msg=key)

  # under shard_map the guards really saw different gradients on different
  # devices: at the NaN step only the last device's (in process 1) was NaN
  expected_finite = np.ones((worker.STEPS, worker.NUM_DEVICES), bool)
  expected_finite[worker.NAN_STEP, -1] = False
  for guard in worker.GUARDS:
    key = f"shard_map/{guard}/grad_finite"
    np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]], axis=1), expected_finite)
    np.testing.assert_array_equal(reference[key], expected_finite)
