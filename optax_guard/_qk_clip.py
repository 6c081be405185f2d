"""QK-clip: cap every attention head's largest logit by rescaling its query and key weights.

The forward pass reports, for every attention head, the largest pre-softmax
logit ``S_h`` it computed; after the optimizer step, :func:`qk_clip` scales
the new query and key weights of every head with ``S_h > tau`` so that the
head's logits shrink by ``tau / S_h`` (Kimi K2's MuonClip). It is an ordinary
last-in-the-chain transformation: it returns updates ``u'`` with
``params + u' = clip(params + u)``.

Which parameters hold which heads is described by layouts:

* :func:`qk_fused`: one kernel (and bias) holding the q, k and v projections
  as column blocks ``[q heads | k heads | v heads]``, heads contiguous within
  each block (``nnx.Linear(d, 3 * d)`` split into q, k, v and reshaped to
  heads);
* :func:`qk_separate`: query and key projections of their own with a head
  axis (``nnx.LinearGeneral``/``DenseGeneral`` kernels ``[d, heads,
  head_dim]`` and biases ``[heads, head_dim]``; flat ``[d, heads * head_dim]``
  kernels; or, with ``head_axis=None``, parameters shared by every head, such
  as the scales of a qk-layernorm);
* a callable with the signature below, for anything else.

Grouped-query attention (several query heads sharing one key head) is part
of both built-in layouts (``num_kv_heads``). Stacked layers (``nnx.scan``)
use the library's ``stacked`` argument.

The layout protocol (:class:`QkLayoutFn`). A layout is a function of one
attention layer's per-head logit factors::

    layout(gamma: jax.Array) -> Mapping[str, multiplier]

* ``gamma``: shape ``[*layers, heads]``, the leading layer axes of stacked
  parameters (none for an unstacked layer) and then one entry per query
  head; float32 (float64 for float64 maxima). ``gamma_h = 1`` exactly for a
  head at or under the threshold, and for every head on a step with a
  non-finite maximum; otherwise ``max(tau / S_h, min_factor)``.
* a key: a parameter path (``"blocks/0/attn/query"``, see :func:`qk_fused`);
  its multiplier applies to every leaf at or below it. Those leaves must be
  floating point; a leaf named twice (by one layout or by two) is an error,
  and leaves no layout names keep their updates bitwise.
* a multiplier: an array that broadcasts to each of those leaves (stacked
  leaves keep their leading layer axes), or a function
  ``multiplier(leaf: QkLeaf) -> array`` called once per leaf with the
  leaf's path, its shape, its number of leading layer axes
  (``gamma.ndim - 1``) and :func:`qk_clip`'s ``alpha`` (an array of
  ``gamma``'s dtype), whose result must broadcast to the leaf likewise.
  Entries multiplied by exactly 1 keep their update bitwise.

A leaf of :func:`qk_clip`'s ``layouts`` is such a function or a
:class:`QkLayout`, which :func:`qk_fused` and :func:`qk_separate` return: a
layout function together with the parameter paths it names, known before
the step (``QkLayout.paths``). Those paths fix the layer axes of the
layout's maxima (the ``stacked`` count of its parameters; axes between them
and the heads are batch axes, reduced with ``max``); a plain function names
none, and every axis of its maxima but the last indexes layers. A
:class:`QkLayout` is not callable itself so that ``optax.inject_hyperparams``
does not take it for a schedule; :func:`qk_clip` holds a plain function as
``QkLayout(fn)``, and from there on every layout goes through the same code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from optax_guard import _numerics as num
from optax_guard import _stats
from optax_guard import _validation as val

_OWNER = "qk_clip"
# The keyword extra that carries the forward pass's per-head maxima.
EXTRA = "attn_max_logits"


@_stats.declare(
    "qk_clip", ("num_clipped", "total_clipped", "smallest_factor", "max_logit", "num_nonfinite")
)
class QkClipState(NamedTuple):
  """State of :func:`qk_clip`: what the last step did.

  Attributes:
    num_clipped: int32, how many heads (query heads, summed over layers) had
      a largest logit above the threshold at the last step and were scaled;
      0 on a step with a non-finite maximum.
    total_clipped: int32, the sum of ``num_clipped`` over every step so far
      (saturating at ``2**31 - 1``): a logger that reads the state every N
      steps sees every clipped head in its difference.
    smallest_factor: float32, the smallest logit factor ``gamma`` of the
      last step (1 when no head was clipped).
    max_logit: float32, the largest per-head maximum the last step received
      (after the cross-device ``pmax``); NaN or ``inf`` as received on a
      non-finite step, ``-inf`` before the first step.
    num_nonfinite: int32, how many steps received a NaN or ``+inf``
      maximum and therefore scaled nothing (total, saturating).
  """

  num_clipped: jax.Array
  total_clipped: jax.Array
  smallest_factor: jax.Array
  max_logit: jax.Array
  num_nonfinite: jax.Array


# ---------------------------------------------------------------------------
# The layout protocol
# ---------------------------------------------------------------------------


class QkLeaf(NamedTuple):
  """One parameter leaf, as a layout's per-leaf multiplier function receives it.

  Attributes:
    path: the leaf's path, ``"/"``-separated (``"blocks/qkv/kernel"``).
    shape: the leaf's shape, leading layer axes included.
    layers: how many leading axes of ``shape`` index layers
      (``gamma.ndim - 1``).
    alpha: :func:`qk_clip`'s ``alpha``, an array of ``gamma``'s dtype.
  """

  path: str
  shape: tuple[int, ...]
  layers: int
  alpha: jax.Array


# A layout's multiplier for the leaves below one path.
Multiplier = ArrayLike | Callable[[QkLeaf], ArrayLike]


class QkLayoutFn(Protocol):
  """A layout: ``layout(gamma) -> {path: multiplier}`` (see the module docstring).

  ``gamma`` is one layer's per-head logit factors ``[*layers, heads]``; the
  result maps parameter paths to a multiplier broadcastable to every leaf
  below the path, or to a function :class:`QkLeaf` ``-> array`` giving it.
  """

  def __call__(self, gamma: jax.Array, /) -> Mapping[str, Multiplier]: ...


@dataclasses.dataclass(frozen=True, eq=False)
class QkLayout:
  """A layout and the parameter paths it names up front.

  Returned by :func:`qk_fused` and :func:`qk_separate`; passed to
  :func:`qk_clip` as (a leaf of) its ``layouts``.

  Attributes:
    fn: the layout function, ``gamma -> {path: multiplier}``.
    paths: the paths ``fn`` returns, known before the step: their ``stacked``
      count gives the layer axes of the layout's maxima. Empty for a plain
      function (every axis of its maxima but the last indexes layers).
  """

  fn: QkLayoutFn
  paths: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Fused:
  """The layout function of :func:`qk_fused`: per-leaf ``[q | k | ones]`` head blocks."""

  qkv: tuple[str, ...]
  head_axis: int
  num_kv_heads: int | None

  def __call__(self, gamma: jax.Array, /) -> Mapping[str, Multiplier]:
    k_gamma = _group_min(gamma, self.num_kv_heads, where=f"layout {self.qkv}")
    blocks = functools.partial(_fused_blocks, gamma, k_gamma, axis=self.head_axis)
    return dict.fromkeys(self.qkv, blocks)


@dataclasses.dataclass(frozen=True)
class _Separate:
  """The layout function of :func:`qk_separate`: per-leaf head blocks by role."""

  query: tuple[str, ...]
  key: tuple[str, ...]
  head_axis: int | None
  num_kv_heads: int | None

  def __call__(self, gamma: jax.Array, /) -> Mapping[str, Multiplier]:
    k_gamma = _group_min(gamma, self.num_kv_heads, where=f"layout {self.query + self.key}")
    if self.head_axis is None:  # shared by every head: the layer's worst factor
      gamma = k_gamma = jnp.min(gamma, axis=-1)
    q = functools.partial(_head_blocks, gamma, axis=self.head_axis, query=True)
    k = functools.partial(_head_blocks, k_gamma, axis=self.head_axis, query=False)
    return {**dict.fromkeys(self.query, q), **dict.fromkeys(self.key, k)}


def qk_fused(
    qkv: str | Sequence[str], *, num_kv_heads: int | None = None, head_axis: int = -1
) -> QkLayout:
  """Layout of a fused QKV projection: ``[q heads | k heads | v heads]`` along one axis.

  Every parameter under the path(s) ``qkv`` (a kernel and its bias) is split
  along ``head_axis`` into three blocks, the queries, the keys and the
  values, each made of equal-width heads, one after the other (head-major):
  ``num_heads`` query heads, then ``num_kv_heads`` key heads and as many
  value heads. This is ``nnx.Linear(d, 3 * d)`` (kernel ``[d, 3d]``, bias
  ``[3d]``) followed by ``jnp.split(..., 3, axis=-1)`` and a reshape of each
  part to ``[..., heads, head_dim]``. The number of query heads is the
  length of the last axis of the layer's maxima; the head width is what
  divides the axis evenly. Value heads are never changed. A per-head
  interleaved layout (``[heads, 3, head_dim]``) needs a callable layout
  instead (see :func:`qk_clip`).

  Args:
    qkv: the path of the fused projection (its kernel and bias are found
      below it), ``"/"``-separated as ``jax.tree_util`` keys read (dict keys,
      attribute names, sequence indices), e.g. ``"blocks/0/qkv"``; or a
      tuple of paths. A trailing ``.value`` of Flax NNX variables is not
      part of the path.
    num_kv_heads: the number of key (and value) heads for grouped-query
      attention; None for as many as query heads.
    head_axis: the axis holding the blocks, counted within one layer's slice
      (after the leading layer axes of stacked parameters).

  Returns:
    A layout for :func:`qk_clip`.
  """
  owner = "qk_fused"
  qkv = val.param_paths(owner, "qkv", qkv)
  axis = val.static_int(owner, "head_axis", head_axis)
  kv = val.static_int(owner, "num_kv_heads", num_kv_heads, minimum=1, none_ok=True)
  assert axis is not None  # none_ok=False
  return QkLayout(_Fused(qkv, axis, kv), paths=qkv)


def qk_separate(
    query: str | Sequence[str],
    key: str | Sequence[str],
    *,
    head_axis: int | None,
    num_kv_heads: int | None = None,
) -> QkLayout:
  """Layout of separate query and key projections with a head axis.

  Every parameter under ``query`` holds the query heads along ``head_axis``,
  every parameter under ``key`` the key heads: the axis is split into equal
  contiguous blocks, one per head (head-major). That covers Flax's
  ``nnx.LinearGeneral``/``DenseGeneral`` with ``out_features=(heads,
  head_dim)`` as in ``nnx.MultiHeadAttention`` (kernel ``[d, heads,
  head_dim]``, bias ``[heads, head_dim]``: ``head_axis=-2``, one index per
  head) and flat kernels ``[d, heads * head_dim]`` with biases ``[heads *
  head_dim]`` (``head_axis=-1``). ``head_axis`` has no default because a
  wrong axis whose length happens to divide evenly would scale the wrong
  entries.

  With ``head_axis=None`` the parameters have no head axis: they are shared
  by all heads of the layer, as the scale and bias of a qk-layernorm are,
  and get the factor of the layer's worst head. With qk-layernorm the
  logits scale with the norms' scale and bias, not with the projections
  (the normalisation undoes any scaling of those): name the norms.

  Args:
    query: path(s) of the query parameters (see :func:`qk_fused` for paths).
    key: path(s) of the key parameters.
    head_axis: the head axis of every one of these parameters, counted
      within one layer's slice (after the leading layer axes of stacked
      parameters); None for parameters shared by all heads.
    num_kv_heads: the number of key heads for grouped-query attention
      (query heads ``g * r`` to ``g * r + r - 1`` share key head ``g``, ``r =
      num_heads / num_kv_heads``, as ``jnp.repeat`` of the key heads gives);
      None for as many as query heads.

  Returns:
    A layout for :func:`qk_clip`.
  """
  owner = "qk_separate"
  query, key = val.param_paths(owner, "query", query), val.param_paths(owner, "key", key)
  val.disjoint(owner, "query", query, "key", key)
  axis = val.static_int(owner, "head_axis", head_axis, none_ok=True)
  kv = val.static_int(owner, "num_kv_heads", num_kv_heads, minimum=1, none_ok=True)
  return QkLayout(_Separate(query, key, axis, kv), paths=query + key)


# ---------------------------------------------------------------------------
# The built-in layouts' multipliers
# ---------------------------------------------------------------------------


def _power(gamma: jax.Array, exponent: jax.Array) -> jax.Array:
  """``gamma ** exponent``, exactly 1 where ``gamma`` is 1."""
  return jnp.where(gamma == 1, jnp.ones((), gamma.dtype), gamma ** exponent)


def _group_min(gamma: jax.Array, groups: int | None, *, where: str) -> jax.Array:
  """``[*layers, heads] -> [*layers, groups]``: the smallest factor of each group.

  ``groups=None``: one group per head.
  """
  heads = gamma.shape[-1]
  groups = groups or heads
  if heads % groups:
    raise ValueError(
        f"{_OWNER}: {where}: the maxima give {heads} query heads, which "
        f"num_kv_heads={groups} does not divide"
    )
  return jnp.min(gamma.reshape(*gamma.shape[:-1], groups, heads // groups), axis=-1)


def _along_axis(values: jax.Array, leaf: QkLeaf, *, axis: int | None) -> jax.Array:
  """``values [*layers, n]`` as a multiplier of ``leaf``, ``n`` equal blocks along ``axis``.

  ``axis=None``: ``values [*layers]``, one factor per layer slice.
  """
  shape, lead = leaf.shape, leaf.layers
  inner = len(shape) - lead
  if axis is None:
    return values.reshape(shape[:lead] + (1,) * inner)
  if not -inner <= axis < inner:
    raise ValueError(
        f"{_OWNER}: the leaf {leaf.path!r} of shape {shape} has no head_axis={axis} "
        f"(a layer slice has {inner} dimensions)"
    )
  full = lead + axis % inner
  length, count = shape[full], values.shape[-1]
  if length % count:
    raise ValueError(
        f"{_OWNER}: the leaf {leaf.path!r} of shape {shape} has {length} entries along "
        f"head_axis={axis}, which do not split into {count} equal heads"
    )
  values = jnp.repeat(values, length // count, axis=-1, total_repeat_length=length)
  return values.reshape(shape[:lead] + tuple(length if i == full else 1
                                             for i in range(lead, len(shape))))


def _fused_blocks(gamma: jax.Array, k_gamma: jax.Array, leaf: QkLeaf, *, axis: int) -> jax.Array:
  """The multiplier of a fused leaf: ``[gamma ** alpha | k_gamma ** (1 - alpha) | 1]``."""
  heads, kv = gamma.shape[-1], k_gamma.shape[-1]
  inner = len(leaf.shape) - leaf.layers
  if -inner <= axis < inner and leaf.shape[leaf.layers + axis % inner] % (heads + 2 * kv):
    raise ValueError(
        f"{_OWNER}: the fused leaf {leaf.path!r} of shape {leaf.shape} has "
        f"{leaf.shape[leaf.layers + axis % inner]} entries along head_axis={axis}, which do "
        f"not split into {heads} query + {kv} key + {kv} value heads of one width"
    )
  ones = jnp.ones(gamma.shape[:-1] + (kv,), gamma.dtype)
  blocks = [_power(gamma, leaf.alpha), _power(k_gamma, 1 - leaf.alpha), ones]
  return _along_axis(jnp.concatenate(blocks, axis=-1), leaf, axis=axis)


def _head_blocks(factors: jax.Array, leaf: QkLeaf, *, axis: int | None,
                 query: bool) -> jax.Array:
  """The multiplier of a query (``factors ** alpha``) or key leaf (``** (1 - alpha)``)."""
  exponent = leaf.alpha if query else 1 - leaf.alpha
  return _along_axis(_power(factors, exponent), leaf, axis=axis)


# ---------------------------------------------------------------------------
# Layouts and paths
# ---------------------------------------------------------------------------


def _is_layout_leaf(x: Any) -> bool:
  return isinstance(x, QkLayout) or callable(x)


def _as_layouts(layouts: Any) -> tuple[list[QkLayout], Any]:
  """The leaves of ``layouts`` as :class:`QkLayout` (a plain function as ``QkLayout(fn)``)."""
  leaves, treedef = jax.tree.flatten(layouts, is_leaf=_is_layout_leaf)
  for leaf in leaves:
    if not _is_layout_leaf(leaf):
      hint = " (a path: describe it with og.qk_fused or og.qk_separate)" \
          if isinstance(leaf, str) else ""
      raise TypeError(
          f"{_OWNER}(layouts=...) must be a layout from og.qk_fused/og.qk_separate, a "
          f"callable, or a tree of them, got {leaf!r}{hint}"
      )
  if not leaves:
    raise ValueError(
        f"{_OWNER}(layouts=...) must name at least one attention layer, got {layouts!r}"
    )
  return [x if isinstance(x, QkLayout) else QkLayout(x) for x in leaves], treedef


def _path_str(path: Sequence[Any]) -> str:
  """``"blocks/0/qkv/kernel"`` for a key path; a trailing ``.value`` is dropped."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _select(names: Sequence[str], prefix: str) -> list[int]:
  """Indices of the leaves at ``prefix`` or below it."""
  found = [i for i, n in enumerate(names) if n == prefix or n.startswith(prefix + "/")]
  if not found:
    raise ValueError(
        f"{_OWNER}: no parameter at or below the path {prefix!r}; the parameters are "
        f"{', '.join(repr(n) for n in names[:12])}{' ...' if len(names) > 12 else ''}"
    )
  return found


# ---------------------------------------------------------------------------
# qk_clip
# ---------------------------------------------------------------------------


def qk_clip(
    threshold: ArrayLike,
    layouts: Any,
    *,
    alpha: ArrayLike = 0.5,
    min_factor: ArrayLike = 1e-6,
    stacked: val.Stacked = None,
    axis_name: val.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""QK-clip: scales a head's query and key weights when its largest logit exceeds ``threshold``.

  For every attention head :math:`h` with largest pre-softmax logit
  :math:`S_h` in the forward pass of this step (over the batch, the query and
  the key positions) and threshold :math:`\tau`:

  .. math::
    \gamma_h = \begin{cases} 1 & S_h \le \tau \\
      \max(\tau / S_h,\ \gamma_{\min}) & S_h > \tau \end{cases},\qquad
    W^q_h \leftarrow \gamma_h^{\alpha}\, W^q_h,\qquad
    W^k_g \leftarrow \Big(\min_{h \in g} \gamma_h\Big)^{1 - \alpha} W^k_g

  applied to the *new* weights ``w = params + u``: the returned updates are
  ``w' - params``, so ``optax.apply_updates(params, updates)`` gives the
  clipped weights (up to the rounding of that difference). Since a logit is
  bilinear in the query and key projections (biases included; rotary
  embeddings are linear too), head :math:`h`'s logits shrink by
  :math:`\gamma_h^{\alpha} \gamma_g^{1-\alpha} \le \gamma_h`, so its largest
  one becomes at most :math:`\tau` (exactly :math:`\tau` for the worst head
  of a group, as measured on this step's batch, and unless the floor
  :math:`\gamma_{\min}` binds).

  * **Untouched heads.** A head at or under the threshold is decided by the
    comparison :math:`S_h \le \tau`, never by rounding a quotient, and its
    entries come back bitwise unchanged (a key head shared with a clipped
    query head is scaled, see grouped-query attention below). When no head
    is clipped the updates are returned bitwise as received.
  * **Grouped-query attention.** Every query head gets its own factor; a key
    head shared by several query heads gets the factor of the worst one of
    its group, which keeps every head of the group at or under
    :math:`\tau` while leaving the query weights of its unclipped heads as
    they are.
  * **Non-finite maxima.** A NaN or ``+inf`` maximum means the forward pass
    broke: nothing is scaled at that step (the updates come back bitwise)
    and ``num_nonfinite`` counts it; what to do with the step itself is the
    guards' job (:func:`skip_nonfinite`). ``-inf`` (a head that saw only
    masked positions) is at or under any threshold. Never a head of zeros:
    ``gamma`` is at least ``min_factor``, so a weight factor is at least
    ``min_factor ** alpha`` (query) and ``min_factor ** (1 - alpha)`` (key).
  * **Logits in, never recomputed.** The maxima come from the forward pass,
    as the keyword extra ``attn_max_logits=`` of ``update``: a tree with the
    structure of ``layouts``, holding for each layout an array
    ``[heads]`` or ``[batch, heads]`` (any axes between the layer axes and
    the heads are reduced with ``max``), with the leading layer axes of
    stacked parameters in front: ``[layers, heads]`` or ``[layers, batch,
    heads]``. Report them under ``jax.lax.stop_gradient`` (``nnx.sow`` or an
    auxiliary output of the loss).
  * **Devices.** With ``axis_name`` the per-head maxima are combined with one
    ``pmax`` across devices (inside ``pmap``/``shard_map`` where each device
    saw a different part of the batch), so every replica scales identically;
    the query and key parameters must then be whole on every device. Under
    plain ``jit`` on sharded arrays a ``max`` is already global.

  Put ``qk_clip`` last in the chain, after the learning rate (and after
  weight decay): it needs the final update. It works inside
  :func:`skip_nonfinite` and :func:`skip_on_spike` (on a skipped step it is
  not called at all), under :func:`update_and_apply`, ``jit``, ``vmap`` and
  ``optax.inject_hyperparams`` (a callable ``layouts`` and an int
  ``stacked`` then go in ``static_args``).

  Where this follows and differs from the references: it follows the Kimi K2
  report (per-head factors, query and key each scaled by ``sqrt(gamma)``,
  applied after the optimizer step with the maxima of the step's own forward
  pass). For multi-head latent attention the report scales the head-specific
  rotary query part by ``gamma`` and leaves the shared rotary key alone, and
  MaxText (``use_qk_clip``, MLA only) does the same; here that is a callable
  layout (below). MaxText computes ``min(1, tau / (S + 1e-6))``, which also
  scales heads slightly at ``S == tau`` and gives NaN weights for a NaN
  maximum; here the decision is the comparison, a non-finite maximum scales
  nothing, and ``gamma`` has a floor. Megatron-LM scales every query head of
  a grouped-query group by the group's worst factor; here only the clipped
  query heads and the shared key head change. ``alpha`` is Megatron-LM's
  ``qk_clip_alpha``; 0.5 is the report's even split.

  **Callable layouts.** A leaf of ``layouts`` may be any callable
  ``gamma -> {path: multiplier}``, the protocol the built-in layouts follow
  too: it receives the layer's per-head factors ``gamma`` (float32, shape
  ``[*layers, heads]``, exactly 1 for heads at or under the threshold) and
  returns, for each parameter path, a multiplier broadcastable to every leaf
  below that path (stacked leaves keep their leading layer axes), or a
  function that gives it for each such leaf from the leaf's ``path``,
  ``shape``, number of leading ``layers`` axes and ``alpha``. Every axis of
  its maxima but the last indexes layers (reduce batch axes before passing
  them), and ``alpha`` is applied only where it uses it. Entries multiplied
  by exactly 1 keep their update bitwise. For MLA:
  ``{"attn/wq_b": concat([sqrt(gamma) x nope, gamma x rope]), "attn/wkv_b":
  concat([sqrt(gamma) x nope, 1 x v])}`` per head.

  Args:
    threshold: :math:`\tau > 0`; ``inf`` switches clipping off (the updates
      come back bitwise).
    layouts: a layout (:func:`qk_fused`, :func:`qk_separate`, or a callable),
      or a tree of them (a list with one per attention layer, a dict...);
      ``attn_max_logits`` must have this structure, with the layer's maxima
      in place of each layout.
    alpha: the query's share of the logit factor, in ``[0, 1]``: query
      weights are scaled by ``gamma ** alpha``, key weights by
      ``gamma ** (1 - alpha)``.
    min_factor: the floor :math:`\gamma_{\min}` of a head's logit factor, in
      ``(0, 1)``.
    stacked: leading layer axes of the parameters, as everywhere in the
      library (see :ref:`design-stacked`): the parameters of one layout must
      have the same number of them, and its maxima the same leading axes.
    axis_name: the mapped axis of ``pmap``/``shard_map`` to take the
      ``pmax`` of the maxima over (one collective for every layer).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`QkClipState`;
    its update needs ``params`` and ``attn_max_logits=``.

  Example:
    Two heads of width 1 in a fused kernel ``[d, 6]`` (columns ``q0 q1 k0
    k1 v0 v1``); head 0 saw a logit of 40 against a threshold of 10, so its
    query and key columns are halved (``sqrt(10 / 40)``):

    >>> import jax.numpy as jnp, optax, optax_guard as og
    >>> params = {"qkv": {"kernel": jnp.ones((3, 6)), "bias": jnp.zeros(6)}}
    >>> tx = optax.chain(optax.sgd(0.1), og.qk_clip(10.0, og.qk_fused("qkv")))
    >>> state = tx.init(params)
    >>> grads = {"qkv": {"kernel": jnp.zeros((3, 6)), "bias": jnp.zeros(6)}}
    >>> updates, state = tx.update(grads, state, params,
    ...                            attn_max_logits=jnp.array([40.0, 5.0]))
    >>> optax.apply_updates(params, updates)["qkv"]["kernel"][0]
    Array([0.5, 1. , 0.5, 1. , 1. , 1. ], dtype=float32)
    >>> int(og.guard_stats(state)["qk_clip/num_clipped"])
    1

  References:
    Kimi Team, 2025, *Kimi K2: Open Agentic Intelligence* (MuonClip, QK-Clip),
    https://arxiv.org/abs/2507.20534; MaxText's QK-Clip
    (``use_qk_clip``, ``qk_clip_threshold``),
    https://github.com/AI-Hypercomputer/maxtext
  """
  val.positive(_OWNER, "threshold", threshold)
  layout_list, layout_def = _as_layouts(layouts)
  val.in_range(_OWNER, "alpha", alpha, 0.0, 1.0)
  val.in_range(_OWNER, "min_factor", min_factor, 0.0, 1.0, lo_open=True, hi_open=True)
  stacked = val.stacked(_OWNER, stacked)
  axis_name = val.axis_name(_OWNER, axis_name)

  def init_fn(params):
    del params
    return QkClipState(
        num_clipped=jnp.zeros((), jnp.int32),
        total_clipped=jnp.zeros((), jnp.int32),
        smallest_factor=jnp.ones((), jnp.float32),
        max_logit=jnp.full((), -jnp.inf, jnp.float32),
        num_nonfinite=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra):
    plan = _plan(updates, params, extra, layouts=layout_list, treedef=layout_def,
                 stacked=stacked)
    peaks, nonfinite = _peaks(plan.maxima, plan.layers, axis_name=axis_name)
    gammas, new_state = _factors(peaks, nonfinite, state, threshold=threshold,
                                 min_factor=min_factor)
    mults = _multipliers(layout_list, gammas, nonfinite, plan=plan, alpha=alpha)
    return _apply(updates, params, mults), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# The update, step by step (each a pure function of its arguments):
#   _plan         check params and the maxima; the layer axes of each layout's maxima
#   _peaks        every layout's per-head maxima, across devices in one pmax
#   _factors      every layout's gamma, and the new state's statistics
#   _multipliers  call every layout; resolve and check its paths; one multiplier per leaf
#   _apply        scale the new weights of those leaves
# ---------------------------------------------------------------------------


class _Plan(NamedTuple):
  """What an update works on, read and checked once per trace."""

  names: tuple[str, ...]  # the path of every updates leaf
  leaves: tuple[Any, ...]  # the updates leaves
  maxima: tuple[jax.Array, ...]  # per layout, its maxima as received
  layers: tuple[int, ...]  # per layout, how many leading axes of its maxima index layers


def _plan(updates: Any, params: Any, extra: Mapping[str, Any], *, layouts: Sequence[QkLayout],
          treedef: Any, stacked: val.Stacked) -> _Plan:
  """Checks ``params`` and the ``attn_max_logits`` extra; the layer axes of every layout."""
  val.matching_params(_OWNER, updates, params)
  maxima = _split_maxima(extra.get(EXTRA), treedef)
  flat = jax.tree.flatten_with_path(updates)[0]
  names = tuple(_path_str(path) for path, _ in flat)
  leaves = tuple(leaf for _, leaf in flat)
  counts = num.stacked_counts(_OWNER, updates, stacked)
  layers = tuple(_layers(layout.paths, m, names=names, leaves=leaves, counts=counts)
                 for layout, m in zip(layouts, maxima, strict=True))
  return _Plan(names, leaves, maxima, layers)


def _split_maxima(maxima: Any, treedef: Any) -> tuple[jax.Array, ...]:
  """The maxima tree, one floating-point array ``[..., heads]`` per layout."""
  if maxima is None:
    raise ValueError(
        f"{_OWNER} needs the forward pass's per-head maximum attention logits: call "
        f"update(updates, state, params, {EXTRA}=...) (optax.chain passes it on)"
    )
  try:
    per_layout = treedef.flatten_up_to(maxima)
    if not all(hasattr(m, "shape") and hasattr(m, "dtype") for m in per_layout):
      raise TypeError("a layout's maxima are not an array")
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{_OWNER}: {EXTRA} must have the structure of layouts ({treedef}), one "
        f"array of per-head maxima per layout: {e}"
    ) from None
  out = tuple(jnp.asarray(m) for m in per_layout)
  for m in out:
    if not jnp.issubdtype(m.dtype, jnp.floating):
      raise TypeError(f"{_OWNER}: {EXTRA} must hold floating-point maxima, got dtype {m.dtype}")
    if m.ndim < 1 or m.shape[-1] < 1:
      raise ValueError(
          f"{_OWNER}: {EXTRA} must end in a heads axis ([heads] or [batch, heads]), got "
          f"shape {m.shape}"
      )
  return out


def _layers(paths: Sequence[str], m: jax.Array, *, names: Sequence[str],
            leaves: Sequence[Any], counts: Sequence[int]) -> int:
  """How many leading axes of a layout's maxima ``m`` index layers.

  The ``stacked`` count of the parameters below ``paths`` (the same for all,
  and ``m`` must start with their layer axes); every axis but the last
  without ``paths``.
  """
  if not paths:
    return m.ndim - 1
  found = list(dict.fromkeys(i for prefix in paths for i in _select(names, prefix)))
  leads = {counts[i] for i in found}
  if len(leads) > 1:
    raise ValueError(
        f"{_OWNER}: the parameters {sorted(names[i] for i in found)} of one layout "
        f"have different numbers of stacked layer axes ({sorted(leads)})"
    )
  (lead,) = leads
  for i in found:
    shape = np.shape(leaves[i])
    if m.ndim < lead + 1 or m.shape[:lead] != shape[:lead]:
      raise ValueError(
          f"{_OWNER}: {EXTRA} for the parameter {names[i]!r} of shape {shape} ({lead} "
          f"stacked layer axes) must have shape [*layers, (batch,) heads] with layers "
          f"{shape[:lead]}, got {m.shape}"
      )
  return lead


def _peaks(maxima: Sequence[jax.Array], layers: Sequence[int], *,
           axis_name: val.AxisName) -> tuple[list[jax.Array], jax.Array]:
  """Every layout's per-head maxima ``[*layers, heads]``; whether any is NaN or ``+inf``.

  Axes between the layer axes and the heads are reduced with ``max``, in
  float32 (float64 for float64 maxima); with ``axis_name``, the maxima and
  the flags cross devices in one ``pmax``.
  """
  peaks = []
  for m, lead in zip(maxima, layers, strict=True):
    m = m.astype(num.accumulation_dtype(m.dtype))
    reduce = tuple(range(lead, m.ndim - 1))
    peaks.append(jnp.max(m, axis=reduce) if reduce else m)
  bad = jnp.stack([jnp.any(jnp.isnan(s) | jnp.isposinf(s)) for s in peaks])
  if axis_name is not None:
    peaks, bad = _pmax_once(peaks, bad, axis_name)
  return peaks, jnp.any(bad)


def _pmax_once(peaks: list[jax.Array], bad: jax.Array,
               axis_name: val.AxisName) -> tuple[list[jax.Array], jax.Array]:
  """The maxima of every layer and the non-finite flags, across devices in one ``pmax``.

  ``lax.pmax`` of a tree binds one collective per leaf: everything goes
  through one flat vector instead.
  """
  dtype = jnp.result_type(*peaks)
  flat = jnp.concatenate([s.astype(dtype).ravel() for s in peaks] + [bad.astype(dtype)])
  flat = num.cross_device(flat, "inf", axis_name)
  out, start = [], 0
  for s in peaks:
    out.append(flat[start:start + s.size].reshape(s.shape).astype(s.dtype))
    start += s.size
  return out, flat[start:] > 0


def _factors(peaks: Sequence[jax.Array], nonfinite: jax.Array, state: QkClipState, *,
             threshold: ArrayLike, min_factor: ArrayLike) -> tuple[list[jax.Array], QkClipState]:
  """Every layout's per-head logit factors ``gamma``, and the new state.

  ``gamma = 1`` where ``S <= threshold`` (decided by the comparison) and
  ``max(threshold / S, min_factor)`` above it; 1 everywhere on a non-finite
  step, which counts in ``num_nonfinite``.
  """
  gammas = []
  clipped = jnp.zeros((), jnp.int32)
  smallest = jnp.ones((), jnp.float32)
  top = jnp.full((), -jnp.inf, jnp.float32)
  for s in peaks:
    tau = jnp.asarray(threshold, s.dtype)
    floor = jnp.asarray(min_factor, s.dtype)
    gamma = jnp.where(s <= tau, jnp.ones((), s.dtype), jnp.maximum(tau / s, floor))
    gamma = jnp.where(nonfinite, jnp.ones((), s.dtype), gamma)
    gammas.append(gamma)
    clipped = clipped + jnp.sum((s > tau) & ~nonfinite, dtype=jnp.int32)
    smallest = jnp.minimum(smallest, jnp.min(gamma).astype(jnp.float32))
    top = jnp.maximum(top, jnp.max(s).astype(jnp.float32))
  count = jnp.where(nonfinite, optax.safe_increment(state.num_nonfinite), state.num_nonfinite)
  total = num.saturating_add(state.total_clipped, clipped)
  return gammas, QkClipState(clipped, total, smallest, top, count)


def _multipliers(layouts: Sequence[QkLayout], gammas: Sequence[jax.Array], nonfinite: jax.Array,
                 *, plan: _Plan, alpha: ArrayLike) -> dict[int, jax.Array]:
  """Per updates-leaf index, the multiplier of its new weight (exactly 1 on a non-finite step)."""
  mults: dict[int, jax.Array] = {}
  for layout, gamma in zip(layouts, gammas, strict=True):
    a = jnp.asarray(alpha, gamma.dtype)
    mults.update(_resolve(layout.fn(gamma), gamma, plan=plan, alpha=a, taken=mults))
  return {i: jnp.where(nonfinite, jnp.ones((), m.dtype), m) for i, m in mults.items()}


def _resolve(out: Any, gamma: jax.Array, *, plan: _Plan, alpha: jax.Array,
             taken: Mapping[int, Any]) -> dict[int, jax.Array]:
  """A layout's ``{path: multiplier}`` as one checked multiplier per leaf index."""
  if not isinstance(out, Mapping):
    raise TypeError(f"{_OWNER}: a layout must return a dict {{path: multiplier}}, got {out!r}")
  found: dict[int, jax.Array] = {}
  for prefix, spec in out.items():
    prefix = val.param_paths(_OWNER, "layouts", prefix)[0]
    if not callable(spec):
      spec = jnp.asarray(spec, gamma.dtype)
    for i in _select(plan.names, prefix):
      if i in found or i in taken:
        raise ValueError(f"{_OWNER}: the parameter {plan.names[i]!r} is named twice")
      leaf = _leaf(plan, i, layers=gamma.ndim - 1, alpha=alpha)
      found[i] = _broadcast(spec(leaf) if callable(spec) else spec, leaf, gamma.dtype)
  return found


def _leaf(plan: _Plan, i: int, *, layers: int, alpha: jax.Array) -> QkLeaf:
  """The updates leaf ``i`` as a layout sees it; it must be floating point."""
  dtype = jnp.result_type(plan.leaves[i])
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{_OWNER} needs floating-point query and key parameters: the leaf "
        f"{plan.names[i]!r} has dtype {dtype}"
    )
  return QkLeaf(plan.names[i], tuple(np.shape(plan.leaves[i])), layers, alpha)


def _broadcast(m: ArrayLike, leaf: QkLeaf, dtype: Any) -> jax.Array:
  """``m`` as an array of ``dtype`` that broadcasts to ``leaf`` (and does not enlarge it)."""
  m = jnp.asarray(m, dtype)
  try:
    if jnp.broadcast_shapes(m.shape, leaf.shape) != leaf.shape:
      raise ValueError
  except ValueError:
    raise ValueError(
        f"{_OWNER}: a layout's multiplier of shape {m.shape} for {leaf.path!r} does not "
        f"broadcast to the leaf's shape {leaf.shape}"
    ) from None
  return m


def _apply(updates: Any, params: Any, mults: Mapping[int, jax.Array]) -> Any:
  """``updates`` with leaf ``i`` scaled by ``mults[i]`` (see :func:`_scaled`)."""
  u_leaves, treedef = jax.tree.flatten(updates)
  p_leaves = jax.tree.leaves(params)
  new = [_scaled(u, p, mults[i]) if i in mults else u
         for i, (u, p) in enumerate(zip(u_leaves, p_leaves, strict=True))]
  return jax.tree.unflatten(treedef, new)


def _scaled(u: jax.Array, p: jax.Array, m: jax.Array) -> jax.Array:
  """``(p + u) * m - p`` where ``m != 1``, ``u`` itself (bitwise) where ``m == 1``."""
  u = jnp.asarray(u)
  wide = jnp.promote_types(u.dtype, m.dtype)
  p = jnp.asarray(p).astype(wide)
  new = (p + u.astype(wide)) * m.astype(wide) - p
  return jnp.where(m == 1, u, new.astype(u.dtype))
