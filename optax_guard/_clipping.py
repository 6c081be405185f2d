"""Stateless clipping: by value, by norm, by global norm, per unit, weights.

All of these are ``optax.GradientTransformation`` with ``optax.EmptyState``.
Norm-based ones scale by multiplying with one factor
``min(1, c / max(norm, tiny))`` computed in float32 (see ``_numerics``), so an
update at or under the bound is returned bitwise unchanged, a zero gradient
stays zero, and the multiply fuses into whatever consumes the result.

Non-finite values are never hidden: a NaN norm gives NaN updates and an
infinite norm gives a factor of 0 (so finite entries become 0 and infinite
entries NaN). Use :func:`optax_guard.skip_nonfinite` to skip such steps.

The per-tensor and per-unit clips take ``stacked``: for a leaf that holds
the layers of a scanned model along its leading axes, each layer's slice is
clipped as the tensor of the unrolled model would be.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from optax_guard import _numerics as num
from optax_guard import _validation as val


def _clamp(x: jax.Array, lo: ArrayLike, hi: ArrayLike) -> jax.Array:
  """``clip(x, lo, hi)`` keeping ``x.dtype`` even for traced float32 bounds.

  Written with comparisons and selects, not ``minimum``/``maximum``: values
  inside the box and NaN come back as they are, bit for bit, on every
  backend (XLA:GPU's ``max`` returns a canonical NaN, not the input's bits).
  """
  x = jnp.asarray(x)
  lo, hi = jnp.asarray(lo).astype(x.dtype), jnp.asarray(hi).astype(x.dtype)
  return jnp.where(x < lo, lo, jnp.where(x > hi, hi, x))


def clip_by_value(
    max_value: ArrayLike, min_value: ArrayLike | None = None
) -> optax.GradientTransformation:
  r"""Clips every update element into ``[min_value, max_value]``.

  .. math::
    g \leftarrow \mathrm{clip}(g, m, M), \qquad m = -M \text{ by default}

  The symmetric default matches ``torch.nn.utils.clip_grad_value_`` and Keras
  ``clipvalue``. NaN stays NaN, ``+inf`` becomes ``max_value`` and ``-inf``
  becomes ``min_value``. Bounds are cast to each leaf's dtype. Complex
  updates have no order and raise a ``TypeError`` (clip their magnitude with
  :func:`clip_by_norm` or :func:`clip_by_axis_norm` instead), as do integer
  ones.

  Off switch: ``max_value=inf`` (with the default ``min_value=-inf``) is the
  unbounded box, and the updates come back bitwise unchanged (``-0.0``, NaN
  and ``+-inf`` included). A box of zero width (``max_value == min_value``,
  such as ``clip_by_value(0.0)``) or an empty one raises ``ValueError``.

  Args:
    max_value: upper bound (any number but NaN, ``inf`` allowed; must be
      ``> min_value``).
    min_value: lower bound; ``-max_value`` when None.

  Returns:
    An ``optax.GradientTransformation`` with ``optax.EmptyState``.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.clip_by_value(1.0)
    >>> tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(None))[0]
    Array([-1. ,  0.5,  1. ], dtype=float32)

  References:
    Mikolov, 2012, *Statistical language models based on neural networks*.
  """
  owner = "clip_by_value"
  lo, hi = val.value_box(owner, max_value, min_value)

  def update_fn(updates, state, params=None):
    del params
    val.float_leaves(owner, updates, complex_ok=False)
    return jax.tree.map(lambda g: _clamp(g, lo, hi), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def truncate_by_value(threshold: ArrayLike) -> optax.GradientTransformation:
  r"""Gradient truncation: zeroes every element outside ``[-threshold, threshold]``.

  .. math::
    g_i \leftarrow \begin{cases} g_i & |g_i| \le t \\ 0 & \text{otherwise}
    \end{cases}

  NaN and ``+-inf`` elements are outside any interval, so they become 0:
  unlike clipping, truncation discards the offending elements instead of
  saturating them. Elements inside the interval are returned bitwise. For
  complex updates ``|g_i|`` is the modulus, so an element is kept or zeroed
  as a whole.

  Off switch: ``threshold=inf`` truncates nothing. The updates then come
  back bitwise unchanged, NaN and ``+-inf`` included (an infinite threshold
  means "no truncation", not "keep what is below infinity").

  Args:
    threshold: ``t > 0`` (``inf`` switches truncation off).

  Returns:
    An ``optax.GradientTransformation`` with ``optax.EmptyState``.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.truncate_by_value(1.0)
    >>> tx.update(jnp.array([-3.0, 0.5, jnp.nan]), tx.init(None))[0]
    Array([0. , 0.5, 0. ], dtype=float32)

  References:
    Mikolov, 2012, *Statistical language models based on neural networks*
    (gradient truncation and clipping for recurrent networks), PhD thesis,
    Brno University of Technology.
  """
  owner = "truncate_by_value"
  val.positive(owner, "threshold", threshold)

  def update_fn(updates, state, params=None):
    del params
    val.float_leaves(owner, updates)
    off = jnp.isposinf(jnp.asarray(threshold))  # a scalar: free in the select

    def leaf(g):
      g = jnp.asarray(g)
      keep = jnp.abs(g).astype(num.accumulation_dtype(g.dtype)) <= threshold
      return jnp.where(keep | off, g, jnp.zeros((), g.dtype))

    return jax.tree.map(leaf, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def clip_by_norm(
    max_norm: ArrayLike,
    *,
    ord: val.NormOrd = None,  # noqa: A002
    axis_name: val.AxisName = None,
    stacked: val.Stacked = None,
) -> optax.GradientTransformation:
  r"""Rescales each leaf separately so that its norm is at most ``max_norm``.

  .. math::
    g_\ell \leftarrow g_\ell \cdot \min\!\left(1,
      \frac{c}{\max(\lVert g_\ell\rVert, \epsilon_{tiny})}\right)

  This is Keras' ``clipnorm`` (per variable). Norms accumulate in float32.

  Off switch: ``max_norm=inf`` never clips: the updates come back bitwise
  unchanged (``-0.0`` and ``+-inf`` elements included). A leaf with a NaN
  norm still becomes NaN, as with any bound.

  Args:
    max_norm: the bound ``c > 0`` (``inf`` switches clipping off).
    ord: None or 2 (L2), 1, or ``inf``.
    axis_name: the mapped axis to ``psum`` the per-leaf partials over (one
      collective for all leaves) when the devices hold different shards of
      every leaf; see :ref:`design-collectives`.
    stacked: leading layer axes of each leaf (None, an int, a prefix tree of
      ints or a callable ``(path, leaf) -> int``); see :ref:`design-stacked`.
      Each layer slice is clipped as a tensor of its own.

  Returns:
    An ``optax.GradientTransformation`` with ``optax.EmptyState``.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.clip_by_norm(1.0)
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.3, 0.4])}
    >>> out, _ = tx.update(g, tx.init(None))
    >>> out["a"], out["b"]
    (Array([0.6, 0.8], dtype=float32), Array([0.3, 0.4], dtype=float32))
    >>> scanned = og.clip_by_norm(1.0, stacked=1)  # two layers in one leaf
    >>> scanned.update(jnp.array([[3.0, 4.0], [0.3, 0.4]]), scanned.init(None))[0]
    Array([[0.6, 0.8],
           [0.3, 0.4]], dtype=float32)

  References:
    Keras, ``clipnorm`` optimizer argument,
    https://keras.io/api/optimizers/#base-optimizer-class
  """
  owner = "clip_by_norm"
  val.positive(owner, "max_norm", max_norm)
  ord = val.norm_ord(owner, ord)  # noqa: A001
  axis_name = val.axis_name(owner, axis_name)
  stacked = val.stacked(owner, stacked)

  def update_fn(updates, state, params=None):
    del params
    val.float_leaves(owner, updates)
    leaves, treedef = jax.tree.flatten(updates)
    # one norm per tensor (per layer slice of a stacked leaf), one collective
    leads = num.stacked_counts(owner, updates, stacked)
    norms = num.tensor_norms(updates, leads, ord, axis_name)
    out = [num.scale_leaf(g, num.safe_factor(max_norm, n))
           for g, n in zip(leaves, norms, strict=True)]
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def clip_by_global_norm(
    max_norm: ArrayLike, *, ord: val.NormOrd = None, axis_name: val.AxisName = None  # noqa: A002
) -> optax.GradientTransformation:
  r"""Rescales the whole update tree so that its global norm is at most ``max_norm``.

  .. math::
    G \leftarrow G \cdot \min\!\left(1,
      \frac{c}{\max(\lVert G\rVert, \epsilon_{tiny})}\right),
    \qquad \lVert G\rVert = \Big(\sum_\ell \lVert g_\ell\rVert^2\Big)^{1/2}

  Equivalent to ``torch.nn.utils.clip_grad_norm_`` and Keras
  ``global_clipnorm``, and to ``optax.clip_by_global_norm`` except that the
  norm accumulates in float32 (optax squares in the leaf dtype, so a large
  float16 tree overflows to ``inf`` and every update is zeroed) and that the
  clip is one multiply (optax's divide materialises a copy of the gradients).

  Non-finite handling: a NaN anywhere gives NaN everywhere; an infinite norm
  (an ``inf`` element, or a sum of squares beyond float32 range) gives factor
  0. Wrap the optimizer in :func:`optax_guard.skip_nonfinite` to skip those.

  Off switch: ``max_norm=inf`` (as in ``torch.nn.utils.clip_grad_norm_``)
  never clips: the updates come back bitwise unchanged (``-0.0`` and
  ``+-inf`` elements included, an infinite norm gives factor 1 here). A NaN
  norm still gives NaN updates, as with any bound.

  Args:
    max_norm: the bound ``c > 0`` (``inf`` switches clipping off).
    ord: None or 2 (L2), 1, or ``inf``.
    axis_name: the mapped axis to ``psum`` the partial sums of the global
      norm over; see :ref:`design-collectives`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``optax.EmptyState``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.clip_by_global_norm(1.0)
    >>> g = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    >>> out, _ = tx.update(g, tx.init(None))
    >>> out["a"], out["b"]
    (Array([0.6], dtype=float32), Array([0.8], dtype=float32))
    >>> opt = optax.chain(og.clip_by_global_norm(1.0), optax.adam(1e-3))

  References:
    Pascanu, Mikolov, Bengio, 2013, *On the difficulty of training recurrent
    neural networks*, https://arxiv.org/abs/1211.5063
  """
  owner = "clip_by_global_norm"
  val.positive(owner, "max_norm", max_norm)
  ord = val.norm_ord(owner, ord)  # noqa: A001
  axis_name = val.axis_name(owner, axis_name)

  def update_fn(updates, state, params=None, **extra_args):
    del params
    val.float_leaves(owner, updates)
    norm = num.global_norm(updates, ord, axis_name, extra_args.get(num.SHARED_NORM))
    return num.scale_tree(updates, num.safe_factor(max_norm, norm)), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def clip_by_axis_norm(
    max_norm: ArrayLike,
    axis: val.UnitAxis = None,
    *,
    axis_name: val.AxisName = None,
    stacked: val.Stacked = None,
) -> optax.GradientTransformation:
  r"""Rescales each *unit* (a slice along ``axis``) to L2 norm at most ``max_norm``.

  .. math::
    g_{u} \leftarrow g_{u} \cdot \min\!\left(1,
      \frac{c}{\max(\lVert g_{u}\rVert, \epsilon_{tiny})}\right)

  where the norm is taken over ``axis`` with the reduced dimensions kept.
  ``axis=None`` reduces over every axis but the last for leaves with
  ``ndim >= 2`` (the fan-in of a Flax ``Dense`` kernel ``(in, out)`` or an
  HWIO convolution kernel: one unit per output feature) and over the whole
  leaf for scalars and vectors (biases). An explicit ``axis`` applies to every
  leaf, so use ``optax.masked``/``multi_transform`` for mixed trees.

  Off switch: ``max_norm=inf`` never clips: the updates come back bitwise
  unchanged (``-0.0`` and ``+-inf`` elements included). A unit with a NaN
  norm still becomes NaN, as with any bound.

  Args:
    max_norm: the bound ``c > 0`` (``inf`` switches clipping off).
    axis: int, tuple of ints, or None (see above).
    axis_name: the mapped axis to ``psum`` the per-unit partial sums over
      when the *reduced* axes of each leaf are split over the devices; see
      :ref:`design-collectives`.
    stacked: leading layer axes of each leaf (None, an int, a prefix tree of
      ints or a callable ``(path, leaf) -> int``); see :ref:`design-stacked`.
      ``axis`` then refers to the axes of one layer's slice.

  Returns:
    An ``optax.GradientTransformation`` with ``optax.EmptyState``.

  Example:
    >>> import jax.numpy as jnp, optax_guard as og
    >>> tx = og.clip_by_axis_norm(1.0)
    >>> kernel = jnp.array([[3.0, 0.1], [4.0, 0.0]])  # (in=2, out=2)
    >>> tx.update(kernel, tx.init(None))[0]
    Array([[0.6, 0.1],
           [0.8, 0. ]], dtype=float32)

  References:
    Brock, De, Smith, Simonyan, 2021, *High-performance large-scale image
    recognition without normalization* (unit-wise norms),
    https://arxiv.org/abs/2102.06171
  """
  owner = "clip_by_axis_norm"
  val.positive(owner, "max_norm", max_norm)
  axis = val.unit_axis(owner, axis)
  axis_name = val.axis_name(owner, axis_name)
  stacked = val.stacked(owner, stacked)

  def update_fn(updates, state, params=None):
    del params
    val.float_leaves(owner, updates)

    leads = num.stacked_counts(owner, updates, stacked)
    norms = num.unit_norms(owner, updates, axis, leads, axis_name=axis_name)  # one collective
    leaves, treedef = jax.tree.flatten(updates)
    out = [num.scale_leaf(g, num.safe_factor(max_norm, n))
           for g, n in zip(leaves, norms, strict=True)]
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def clip_weights(
    max_value: ArrayLike, min_value: ArrayLike | None = None
) -> optax.GradientTransformation:
  r"""Keeps the *weights* inside ``[min_value, max_value]`` after the step.

  .. math::
    u \leftarrow \mathrm{clip}(p + u, m, M) - p, \qquad m = -M \text{ by default}

  so that ``optax.apply_updates(p, u)`` lands in the box, up to the rounding
  of ``w - p`` and of ``p + (w - p)`` in the leaf dtype (about half an ulp of
  ``|w - p|`` in bfloat16). Updates whose new weights are already inside the
  box are returned bitwise unchanged. This is the weight clipping of
  Wasserstein GANs. Put it *last* in the chain, after the optimizer, so ``u``
  is the final update.

  Off switch: ``max_value=inf`` (the unbounded box) returns the updates
  bitwise unchanged, ``-0.0``, NaN and ``+-inf`` included. A box of zero
  width or an empty one raises ``ValueError``. New weights that are NaN
  (a NaN update or parameter) are outside no box, so their update is
  returned as it is: the weights end up NaN either way.

  Args:
    max_value: upper bound of the weights (``inf`` allowed).
    min_value: lower bound; ``-max_value`` when None.

  Returns:
    An ``optax.GradientTransformation`` with ``optax.EmptyState``; its update
    raises ``ValueError`` when ``params`` is None.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.clip_weights(0.01)
    >>> p = jnp.array([0.0, 0.005])
    >>> u, _ = tx.update(jnp.array([0.5, -0.5]), tx.init(p), p)
    >>> optax.apply_updates(p, u)
    Array([ 0.01, -0.01], dtype=float32)

  References:
    Arjovsky, Chintala, Bottou, 2017, *Wasserstein GAN*,
    https://arxiv.org/abs/1701.07875
  """
  owner = "clip_weights"
  lo, hi = val.value_box(owner, max_value, min_value)

  def update_fn(updates, state, params=None):
    val.params_and_updates(owner, updates, params, complex_ok=False)

    def leaf(u, p):
      u = jnp.asarray(u)
      w = p + u
      outside = (w < jnp.asarray(lo).astype(w.dtype)) | (w > jnp.asarray(hi).astype(w.dtype))
      return jnp.where(outside, (_clamp(w, lo, hi) - p).astype(u.dtype), u)

    return jax.tree.map(leaf, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def clip_weights_by_norm(
    max_norm: ArrayLike, axis: val.UnitAxis = None, *, stacked: val.Stacked = None
) -> optax.GradientTransformation:
  r"""Max-norm weight constraint: each unit of the new weights has norm <= ``max_norm``.

  .. math::
    w = p + u, \quad w_u \leftarrow w_u \cdot \min\!\left(1,
      \frac{c}{\max(\lVert w_u\rVert, \epsilon_{tiny})}\right), \quad
    u \leftarrow w - p

  Units as in :func:`clip_by_axis_norm` (``axis=None``: every axis but the
  last, which is Keras ``MaxNorm(axis=0)`` for a ``Dense`` kernel; Keras
  adds ``1e-7`` to the norm, we do not). Units already within the bound get
  their updates back bitwise unchanged. Put it last in the chain.

  Off switch: ``max_norm=inf`` constrains nothing: the updates come back
  bitwise unchanged (``-0.0`` and ``+-inf`` included). A unit whose new
  weights have a NaN norm still becomes NaN, as with any bound.

  Args:
    max_norm: the bound ``c > 0`` (``inf`` switches the constraint off).
    axis: int, tuple of ints, or None.
    stacked: leading layer axes of each leaf (None, an int, a prefix tree of
      ints or a callable ``(path, leaf) -> int``); see :ref:`design-stacked`.
      ``axis`` then refers to the axes of one layer's slice of the weights.

  Returns:
    An ``optax.GradientTransformation`` with ``optax.EmptyState``; its update
    constrains ``params + updates``, so it raises ``ValueError`` when
    ``params`` is None.

  Example:
    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> tx = og.clip_weights_by_norm(1.0)
    >>> p = jnp.zeros((2, 1))
    >>> u, _ = tx.update(jnp.array([[3.0], [4.0]]), tx.init(p), p)
    >>> optax.apply_updates(p, u)
    Array([[0.6],
           [0.8]], dtype=float32)

  References:
    Srivastava et al., 2014, *Dropout: a simple way to prevent neural networks
    from overfitting* (max-norm regularisation), JMLR 15.
  """
  owner = "clip_weights_by_norm"
  val.positive(owner, "max_norm", max_norm)
  axis = val.unit_axis(owner, axis)
  stacked = val.stacked(owner, stacked)

  def update_fn(updates, state, params=None):
    val.params_and_updates(owner, updates, params)

    def leaf(path, lead, u, p):
      u = jnp.asarray(u)
      f = num.safe_factor(max_norm, num.unit_norm_at(owner, path, p + u, axis, lead=lead))
      # (p + u) * f - p; where f == 1 exactly u (the arithmetic would turn
      # -0.0 into +0.0, and give NaN for an infinite parameter)
      wide = jnp.promote_types(u.dtype, f.dtype)
      u32, p32 = u.astype(wide), jnp.asarray(p).astype(wide)
      return jnp.where(f == 1, u, (u32 * f + p32 * (f - 1)).astype(u.dtype))

    return num.map_tensors(owner, stacked, leaf, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
