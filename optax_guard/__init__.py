"""optax_guard: every defence against exploding gradients, as optax transforms."""

from optax_guard._clipping import (
    clip_by_axis_norm,
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
    clip_weights,
    clip_weights_by_norm,
    truncate_by_value,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "clip_by_axis_norm",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "clip_weights",
    "clip_weights_by_norm",
    "truncate_by_value",
]
