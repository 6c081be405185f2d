"""Root conftest: give JAX 8 simulated CPU devices before it initialises.

Also covers the doctests collected from ``optax_guard/`` (see tests/conftest.py
for the test fixtures).
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
