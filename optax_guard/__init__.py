"""optax_guard: every defence against exploding gradients, as optax transforms."""

from optax_guard._adagc import (
    AdagcState,
    adagc,
)
from optax_guard._adamc import adamc
from optax_guard._adaptive import (
    AutoClipState,
    ZClipState,
    adaptive_grad_clip,
    autoclip,
    zclip,
)
from optax_guard._apply import update_and_apply
from optax_guard._clipping import (
    clip_by_axis_norm,
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
    clip_weights,
    clip_weights_by_norm,
    truncate_by_value,
)
from optax_guard._guards import (
    DynamicLossScaleState,
    SkipNonfiniteState,
    SkipOnSpikeState,
    SkipStepsState,
    SpikeTracker,
    add_guard_state,
    dynamic_loss_scale,
    loss_scale,
    seed_spike_history,
    skip_nonfinite,
    skip_on_spike,
    skip_steps,
    strip_guard_state,
)
from optax_guard._historical import (
    ClipByHistoricalNormState,
    clip_by_historical_norm,
)
from optax_guard._monitor import MonitorState, monitor
from optax_guard._penalties import add_l1_penalty, add_l2_penalty
from optax_guard._plateau import ReduceOnPlateauState, reduce_on_plateau
from optax_guard._qk_clip import QkClipState, qk_clip, qk_fused, qk_separate
from optax_guard._rates import scale_by_grad_norm, scale_by_parameter
from optax_guard._schedules import (
    exponential_decay,
    inverse_sqrt_decay,
    inverse_time_decay,
    linear_decay,
    multistep_decay,
    polynomial_decay,
    step_decay,
    warmup,
)
from optax_guard._spam import ScaleBySpamState, scale_by_spam, spam
from optax_guard._stable_adam import ScaleByStableAdamState, scale_by_stable_adam, stable_adamw
from optax_guard._stats import guard_stats

__version__ = "0.1.0"

__all__ = [
    "AdagcState",
    "AutoClipState",
    "ClipByHistoricalNormState",
    "DynamicLossScaleState",
    "MonitorState",
    "QkClipState",
    "ReduceOnPlateauState",
    "ScaleBySpamState",
    "ScaleByStableAdamState",
    "SkipNonfiniteState",
    "SkipOnSpikeState",
    "SkipStepsState",
    "SpikeTracker",
    "ZClipState",
    "__version__",
    "adagc",
    "adamc",
    "adaptive_grad_clip",
    "add_guard_state",
    "add_l1_penalty",
    "add_l2_penalty",
    "autoclip",
    "clip_by_axis_norm",
    "clip_by_global_norm",
    "clip_by_historical_norm",
    "clip_by_norm",
    "clip_by_value",
    "clip_weights",
    "clip_weights_by_norm",
    "dynamic_loss_scale",
    "exponential_decay",
    "guard_stats",
    "inverse_sqrt_decay",
    "inverse_time_decay",
    "linear_decay",
    "loss_scale",
    "monitor",
    "multistep_decay",
    "polynomial_decay",
    "qk_clip",
    "qk_fused",
    "qk_separate",
    "reduce_on_plateau",
    "scale_by_grad_norm",
    "scale_by_parameter",
    "scale_by_spam",
    "scale_by_stable_adam",
    "seed_spike_history",
    "skip_nonfinite",
    "skip_on_spike",
    "skip_steps",
    "spam",
    "stable_adamw",
    "step_decay",
    "strip_guard_state",
    "truncate_by_value",
    "update_and_apply",
    "warmup",
    "zclip",
]
