"""Experiments: exploding gradients met naturally and on real data, and each defence at work.

Run the suite with ``python -m experiments`` (``--help`` for the options). Each
module exposes ``Config`` (its sizes; ``Config()`` is the default run,
``Config.quick()`` the ``--quick`` one and ``Config.full()`` the ``--full``
one) and ``run(config, guards=None, progress=None)`` returning an
``experiments._common.ExperimentResult``; its docstring states the claim it
tests, the paper it follows and what we changed.

Importing this package before JAX gives JAX 8 simulated CPU devices (for the
``data_parallel`` experiment) unless ``XLA_FLAGS`` already sets a host device
count or ``JAX_PLATFORMS`` excludes the CPU. The flag only affects the CPU
backend: on a machine with GPUs or TPUs the real devices are used.
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
_platforms = os.environ.get("JAX_PLATFORMS", "")
if (
    _FLAG not in os.environ.get("XLA_FLAGS", "")
    and (not _platforms or "cpu" in _platforms.split(","))
):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()

EXPERIMENTS = ("adding_problem", "transformer_lr_sweep", "deep_mlp", "transformer_injected",
               "transformer_localized_spike", "float16_loss_scale", "data_parallel")
