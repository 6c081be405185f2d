"""Guards: transformations that skip a whole step.

Every guard is built by one combinator (:mod:`.combinator`) from a decision
function and a state type: :mod:`.nonfinite` (non-finite gradients),
:mod:`.spike` (gradient-norm spikes), :mod:`.steps` (known step ranges),
:mod:`.loss_scale` (dynamic loss scaling).
:mod:`.restart` adds, strips and seeds guard state around checkpoints.
"""

from optax_guard._guards.loss_scale import DynamicLossScaleState, dynamic_loss_scale, loss_scale
from optax_guard._guards.nonfinite import SkipNonfiniteState, skip_nonfinite
from optax_guard._guards.restart import add_guard_state, seed_spike_history, strip_guard_state
from optax_guard._guards.spike import SkipOnSpikeState, SpikeTracker, skip_on_spike
from optax_guard._guards.steps import SkipStepsState, skip_steps

__all__ = [
    "DynamicLossScaleState",
    "SkipNonfiniteState",
    "SkipOnSpikeState",
    "SkipStepsState",
    "SpikeTracker",
    "add_guard_state",
    "dynamic_loss_scale",
    "loss_scale",
    "seed_spike_history",
    "skip_nonfinite",
    "skip_on_spike",
    "skip_steps",
    "strip_guard_state",
]
