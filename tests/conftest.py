"""Test setup: 8 simulated CPU devices, set before JAX initialises.

The suite runs on whatever backend JAX is given: ``pytest`` runs on CPU with
8 simulated devices, ``JAX_PLATFORMS=cuda pytest`` (or ``tpu``) on the
accelerator. What cannot run there is skipped with a reason:

* tests that take the ``devices`` fixture need 8 devices (pmap, shard_map and
  sharded ``jit`` over a mesh of 8);
* tests marked ``xla_cpu`` read the buffer structure of programs compiled
  by XLA:CPU (the temporary bytes of a step), which other backends lay out
  differently.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    derandomize=True,  # CI runs are reproducible; run with --hypothesis-seed to explore
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

NUM_DEVICES = 8
NEEDS_DEVICES = (
    f"needs {NUM_DEVICES} devices: run on CPU, where tests/conftest.py simulates "
    f"{NUM_DEVICES} with XLA_FLAGS=--xla_force_host_platform_device_count={NUM_DEVICES}"
)
XLA_CPU_ONLY = (
    "reads the buffer structure of XLA:CPU programs: run on CPU (the default, "
    "JAX_PLATFORMS=cpu)"
)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "xla_cpu: reads XLA:CPU-specific program structure; skipped on other backends"
  )


def pytest_runtest_setup(item):
  if item.get_closest_marker("xla_cpu") is not None and jax.default_backend() != "cpu":
    pytest.skip(f"{XLA_CPU_ONLY}; this run is on {jax.default_backend()}")


@pytest.fixture(scope="session")
def devices():
  """The first 8 devices; skips the test when there are fewer."""
  devs = jax.devices()
  if len(devs) < NUM_DEVICES:
    pytest.skip(f"{NEEDS_DEVICES}; this run has {len(devs)} {jax.default_backend()} device(s)")
  return devs[:NUM_DEVICES]
