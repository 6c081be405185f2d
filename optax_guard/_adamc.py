"""AdamC: AdamW whose weight decay follows the learning-rate schedule (Defazio, 2025).

For a layer followed by a normalization layer the gradient is orthogonal to
the weights, and weight decay sets the steady-state ratio of gradient norm to
weight norm, about ``sqrt(2 wd / lr_t)`` under AdamW. A schedule that takes
the rate towards 0 raises that ratio, and the gradient norm grows rapidly
near the end of training. :func:`adamc` decays with ``lr_t * (lr_t /
lr_max) * wd`` instead of ``lr_t * wd``, which keeps the ratio where the
peak rate put it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax
from jax.typing import ArrayLike

from optax_guard import _validation as val
from optax_guard._adam_pieces import ScalarOrSchedule


def _corrected_decay(learning_rate: ScalarOrSchedule, weight_decay: ScalarOrSchedule,
                     peak: ArrayLike) -> Callable[[ArrayLike], Any]:
  """The schedule ``count -> wd_t * (lr_t / peak)`` of the corrected decay."""

  def decay(count):
    wd = weight_decay(count) if callable(weight_decay) else weight_decay
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    return wd * (lr / peak)

  return decay


def adamc(
    learning_rate: ScalarOrSchedule,
    b1: ArrayLike = 0.9, b2: ArrayLike = 0.999, eps: ArrayLike = 1e-8, eps_root: ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    nesterov: bool = False,
    peak_learning_rate: ArrayLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamC: ``optax.adamw`` with the weight decay scaled by ``lr_t / lr_max``.

  With :math:`\eta_t` the learning rate of step :math:`t`, :math:`\eta_{max}`
  its peak and :math:`\lambda` the weight decay:

  .. math::
    p \leftarrow p - \eta_t\, \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}}
      + \epsilon} - \eta_t\, \frac{\eta_t}{\eta_{max}}\, \lambda\, p

  where AdamW decays with :math:`\eta_t \lambda p`. For a weight matrix
  followed by a normalization layer (LayerNorm, RMSNorm, BatchNorm) the
  gradient is orthogonal to the weights, and the decay sets the steady
  ratio of gradient norm to weight norm, :math:`\propto
  \sqrt{\lambda_t / \eta_t}` with :math:`\lambda_t` the decay coefficient.
  AdamW's :math:`\lambda_t = \lambda` lets the ratio, and with it the
  gradient norm, grow as a schedule takes :math:`\eta_t` towards 0 at the
  end of training; AdamC's :math:`\lambda_t = \lambda \eta_t / \eta_{max}`
  keeps the ratio constant. For a constant rate the two are the same
  optimizer: :func:`adamc` then runs ``optax.adamw`` itself (bitwise its
  updates and state).

  ``mask`` selects the leaves that decay, as in ``optax.adamw``. The paper
  corrects the decay of the *normalized* layers, the weights feeding a
  normalization layer; its language-model runs count every linear layer
  except the output layer as normalized, and leave biases and the
  normalization layers' own scales undecayed. A mask for that on a
  Flax-style tree (kernels decay, the output head does not):

  .. code-block:: python

    def normalized(params):
      return jax.tree.map_with_path(
          lambda path, p: p.ndim >= 2 and "head" not in jax.tree_util.keystr(path),
          params)

    tx = og.adamc(schedule, weight_decay=0.1, mask=normalized, peak_learning_rate=3e-4)

  To keep AdamW's decay on the layers that are not normalized, give those
  to ``optax.adamw`` through ``optax.multi_transform``.

  Args:
    learning_rate: a number ``>= 0`` or a schedule ``step -> rate``.
    b1, b2, eps, eps_root, mu_dtype: as in ``optax.adamw`` (``b1``, ``b2``
      in ``[0, 1)``, ``eps``, ``eps_root`` finite and ``>= 0``, ``mu_dtype``
      None or a floating dtype).
    weight_decay: :math:`\lambda`, ``>= 0`` or a schedule; 0 switches the
      decay off.
    mask: as in ``optax.adamw``: None, a tree of bools (or a prefix of one),
      or a callable ``params -> tree``, selecting the leaves that decay.
      Under ``optax.inject_hyperparams`` a callable mask needs
      ``static_args=("mask",)``.
    nesterov: as in ``optax.adamw`` (a Python bool).
    peak_learning_rate: :math:`\eta_{max}`, ``> 0`` and finite. Required
      when ``learning_rate`` is a schedule (its peak: for a warm-up and
      cosine schedule, the rate at the end of the warm-up); with a number
      as ``learning_rate`` it defaults to that number. Give it also when
      ``optax.inject_hyperparams`` schedules the rate, which hands
      :func:`adamc` each step's rate as a number. A rate above the peak
      decays by more than AdamW would; the ratio is not clipped.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is the
    ``optax.adamw`` chain's (with the corrected decay as its decay
    schedule); its update needs ``params`` matching the updates.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> lr = optax.linear_schedule(1e-2, 0.0, transition_steps=10)
    >>> tx = og.adamc(lr, weight_decay=0.5, peak_learning_rate=1e-2)
    >>> p = jnp.ones(2)
    >>> state = tx.init(p)
    >>> for _ in range(6):  # lr_t = 1e-2 * (1 - t / 10), t = 0..5
    ...   u, state = tx.update(jnp.zeros(2), state, p)
    >>> u  # the decay alone: -lr_5 * (lr_5 / 1e-2) * 0.5 * p
    Array([-0.00125, -0.00125], dtype=float32)

  References:
    Defazio, 2025, *Why Gradients Rapidly Increase Near the End of
    Training*, https://arxiv.org/abs/2506.02285; Loshchilov, Hutter, 2019,
    *Decoupled Weight Decay Regularization*, https://arxiv.org/abs/1711.05101
  """
  owner = "adamc"
  val.rate(owner, "learning_rate", learning_rate)
  val.adam_betas(owner, b1, b2, eps)
  val.non_negative(owner, "eps_root", eps_root, finite=True)
  mu_dtype = val.float_dtype(owner, "mu_dtype", mu_dtype)
  val.rate(owner, "weight_decay", weight_decay)
  val.mask(owner, mask)
  nesterov = val.flag(owner, "nesterov", nesterov)
  if peak_learning_rate is None:
    if callable(learning_rate):
      raise ValueError(
          "adamc(peak_learning_rate=...) is required when learning_rate is a schedule "
          "(the decay is scaled by lr_t / peak_learning_rate), got None"
      )
    decay = weight_decay  # lr_t / lr_max = 1: exactly optax.adamw
  else:
    val.positive(owner, "peak_learning_rate", peak_learning_rate, finite=True)
    decay = _corrected_decay(learning_rate, weight_decay, peak_learning_rate)
  tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                   mu_dtype=mu_dtype, weight_decay=decay, mask=mask, nesterov=nesterov)

  def update_fn(updates, state, params=None, **extra):
    val.params_and_updates(owner, updates, params)  # errors that name adamc and the leaf
    return tx.update(updates, state, params, **extra)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
