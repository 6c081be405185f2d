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
* a callable ``gamma -> {path: multiplier}`` for anything else.

Grouped-query attention (several query heads sharing one key head) is part
of both built-in layouts (``num_kv_heads``). Stacked layers (``nnx.scan``)
use the library's ``stacked`` argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from optax_guard import _numerics as num
from optax_guard import _validation as val

_OWNER = "qk_clip"
# The keyword extra that carries the forward pass's per-head maxima.
EXTRA = "attn_max_logits"


class QkClipState(NamedTuple):
  """State of :func:`qk_clip`: what the last step did.

  Attributes:
    num_clipped: int32, how many heads (query heads, summed over layers) had
      a largest logit above the threshold at the last step and were scaled;
      0 on a step with a non-finite maximum.
    smallest_factor: float32, the smallest logit factor ``gamma`` of the
      last step (1 when no head was clipped).
    max_logit: float32, the largest per-head maximum the last step received
      (after the cross-device ``pmax``); NaN or ``inf`` as received on a
      non-finite step, ``-inf`` before the first step.
    num_nonfinite: int32, how many steps received a NaN or ``+inf``
      maximum and therefore scaled nothing (total, saturating).
  """

  num_clipped: jax.Array
  smallest_factor: jax.Array
  max_logit: jax.Array
  num_nonfinite: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class QkLayout:
  """Where one attention layer keeps its query and key heads.

  Built by :func:`qk_fused` and :func:`qk_separate`; passed to
  :func:`qk_clip` as (a leaf of) its ``layouts``.
  """

  kind: str  # "fused" or "separate"
  query: tuple[str, ...]
  key: tuple[str, ...]
  head_axis: int | None
  num_kv_heads: int | None


def _paths(owner: str, name: str, value: Any) -> tuple[str, ...]:
  """A path ``"blocks/0/attn/query"`` or a non-empty sequence of them, normalised."""
  items = (value,) if isinstance(value, str) else value
  if not isinstance(items, (tuple, list)) or not items:
    raise TypeError(
        f"{owner}({name}=...) must be a parameter path such as 'blocks/0/attn/query' "
        f"(or a tuple of them), got {value!r}"
    )
  out = []
  for item in items:
    if not isinstance(item, str) or not item.strip("/"):
      raise TypeError(
          f"{owner}({name}=...) must be a parameter path such as 'blocks/0/attn/query' "
          f"(or a tuple of them), got {value!r}"
      )
    out.append(item.strip("/"))
  return tuple(out)


def _heads(owner: str, value: Any) -> int | None:
  if value is None:
    return None
  if val.is_jax(value):
    raise TypeError(f"{owner}(num_kv_heads=...) must be None or a Python int, got {value!r}")
  val.integer(owner, "num_kv_heads", value, minimum=1)
  return int(value)


def _axis(owner: str, value: Any, *, none_ok: bool) -> int | None:
  if value is None and none_ok:
    return None
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    allowed = "an int or None" if none_ok else "an int"
    raise TypeError(f"{owner}(head_axis=...) must be {allowed}, got {value!r}")
  return int(value)


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
  return QkLayout("fused", _paths(owner, "qkv", qkv), (), _axis(owner, head_axis, none_ok=False),
                  _heads(owner, num_kv_heads))


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
  return QkLayout("separate", _paths(owner, "query", query), _paths(owner, "key", key),
                  _axis(owner, head_axis, none_ok=True), _heads(owner, num_kv_heads))


def _is_layout(x: Any) -> bool:
  return isinstance(x, QkLayout)


def _check_layouts(layouts: Any) -> Any:
  leaves, treedef = jax.tree.flatten(layouts, is_leaf=_is_layout)
  for leaf in leaves:
    if not (_is_layout(leaf) or callable(leaf)):
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
  return leaves, treedef


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


def _power(gamma: jax.Array, exponent: jax.Array) -> jax.Array:
  """``gamma ** exponent``, exactly 1 where ``gamma`` is 1."""
  return jnp.where(gamma == 1, jnp.ones((), gamma.dtype), gamma ** exponent)


def _group_min(gamma: jax.Array, groups: int, where: str) -> jax.Array:
  """``[*layers, heads] -> [*layers, groups]``: the smallest factor of each group."""
  heads = gamma.shape[-1]
  if heads % groups:
    raise ValueError(
        f"{_OWNER}: {where}: the maxima give {heads} query heads, which "
        f"num_kv_heads={groups} does not divide"
    )
  return jnp.min(gamma.reshape(*gamma.shape[:-1], groups, heads // groups), axis=-1)


def _along_axis(values: jax.Array, shape: tuple[int, ...], lead: int, axis: int | None,
                name: str) -> jax.Array:
  """``values [*layers, n]`` as a multiplier of a leaf of ``shape``, blocks along ``axis``.

  ``axis=None``: ``values [*layers]``, one factor per layer slice.
  """
  inner = len(shape) - lead
  if axis is None:
    return values.reshape(shape[:lead] + (1,) * inner)
  if not -inner <= axis < inner:
    raise ValueError(
        f"{_OWNER}: the leaf {name!r} of shape {shape} has no head_axis={axis} "
        f"(a layer slice has {inner} dimensions)"
    )
  full = lead + axis % inner
  length, count = shape[full], values.shape[-1]
  if length % count:
    raise ValueError(
        f"{_OWNER}: the leaf {name!r} of shape {shape} has {length} entries along "
        f"head_axis={axis}, which do not split into {count} equal heads"
    )
  values = jnp.repeat(values, length // count, axis=-1, total_repeat_length=length)
  return values.reshape(shape[:lead] + tuple(length if i == full else 1
                                             for i in range(lead, len(shape))))


def _layout_multipliers(layout: QkLayout, gamma: jax.Array, alpha: jax.Array,
                        leaves: list[tuple[int, str, tuple[int, ...]]], lead: int,
                        roles: dict[int, str]) -> dict[int, jax.Array]:
  """Per selected leaf index, its multiplier (broadcastable to the leaf)."""
  heads = gamma.shape[-1]
  kv = layout.num_kv_heads or heads
  where = f"layout {layout.query + layout.key}"
  q_factor = _power(gamma, alpha)
  k_factor = _power(_group_min(gamma, kv, where), 1 - alpha)
  out = {}
  for i, name, shape in leaves:
    if layout.kind == "fused":
      ones = jnp.ones(gamma.shape[:-1] + (kv,), gamma.dtype)
      blocks = jnp.concatenate([q_factor, k_factor, ones], axis=-1)
      inner = len(shape) - lead
      axis = layout.head_axis
      assert axis is not None
      if -inner <= axis < inner and shape[lead + axis % inner] % (heads + 2 * kv):
        raise ValueError(
            f"{_OWNER}: the fused leaf {name!r} of shape {shape} has "
            f"{shape[lead + axis % inner]} entries along head_axis={axis}, which do not "
            f"split into {heads} query + {kv} key + {kv} value heads of one width"
        )
      out[i] = _along_axis(blocks, shape, lead, axis, name)
    elif layout.head_axis is None:
      worst = jnp.min(gamma, axis=-1)
      exponent = alpha if roles[i] == "query" else 1 - alpha
      out[i] = _along_axis(_power(worst, exponent), shape, lead, None, name)
    else:
      factor = q_factor if roles[i] == "query" else k_factor
      out[i] = _along_axis(factor, shape, lead, layout.head_axis, name)
  return out


def _scaled(u: jax.Array, p: jax.Array, m: jax.Array) -> jax.Array:
  """``(p + u) * m - p`` where ``m != 1``, ``u`` itself (bitwise) where ``m == 1``."""
  u = jnp.asarray(u)
  wide = jnp.promote_types(u.dtype, m.dtype)
  p = jnp.asarray(p).astype(wide)
  new = (p + u.astype(wide)) * m.astype(wide) - p
  return jnp.where(m == 1, u, new.astype(u.dtype))


def qk_clip(
    threshold: ArrayLike,
    layouts: Any,
    *,
    alpha: ArrayLike = 0.5,
    min_factor: ArrayLike = 1e-6,
    stacked: val.Stacked = None,
    axis_name: val.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""QK-clip: scales a head's query and key weights when its largest logit exceeds ``tau``.

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

  **Callable layouts.** A leaf of ``layouts`` may be a callable
  ``gamma -> {path: multiplier}``: it receives the layer's per-head factors
  ``gamma`` (float32, shape ``[*layers, heads]``, exactly 1 for heads at or
  under the threshold) and returns, for each parameter path, a multiplier
  broadcastable to every leaf below that path (stacked leaves keep their
  leading layer axes). Every axis of its maxima but the last indexes layers
  (reduce batch axes before passing them), and ``alpha`` is not applied for
  it. Entries multiplied by exactly 1 keep their update bitwise. For MLA:
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
    stacked: leading layer axes of the parameters (None, an int, a tree
      prefix of ints, or a callable ``(path, leaf) -> int``, as everywhere in
      the library): the parameters of one layout must have the same number
      of them, and its maxima the same leading axes.
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
  layout_leaves, layout_def = _check_layouts(layouts)
  val.in_range(_OWNER, "alpha", alpha, 0.0, 1.0)
  val.in_range(_OWNER, "min_factor", min_factor, 0.0, 1.0, lo_open=True, hi_open=True)
  stacked = val.stacked(_OWNER, stacked)
  axis_name = val.axis_name(_OWNER, axis_name)

  def init_fn(params):
    del params
    return QkClipState(
        num_clipped=jnp.zeros((), jnp.int32),
        smallest_factor=jnp.ones((), jnp.float32),
        max_logit=jnp.full((), -jnp.inf, jnp.float32),
        num_nonfinite=jnp.zeros((), jnp.int32),
    )

  def update_fn(updates, state, params=None, **extra):
    val.matching_params(_OWNER, updates, params)
    maxima = extra.get(EXTRA)
    if maxima is None:
      raise ValueError(
          f"{_OWNER} needs the forward pass's per-head maximum attention logits: call "
          f"update(updates, state, params, {EXTRA}=...) (optax.chain passes it on)"
      )
    try:
      per_layout = layout_def.flatten_up_to(maxima)
      if not all(hasattr(m, "shape") and hasattr(m, "dtype") for m in per_layout):
        raise TypeError("a layout's maxima are not an array")
    except (ValueError, TypeError) as e:
      raise ValueError(
          f"{_OWNER}: {EXTRA} must have the structure of layouts ({layout_def}), one "
          f"array of per-head maxima per layout: {e}"
      ) from None

    flat, u_def = jax.tree.flatten_with_path(updates)
    names = [_path_str(path) for path, _ in flat]
    u_leaves = [leaf for _, leaf in flat]
    p_leaves = jax.tree.leaves(params)
    leads = num.stacked_counts(_OWNER, updates, stacked)

    # 1. every layout's maxima reduced to [*layers, heads]; its leaves.
    plans, peaks = [], []
    owner_of: dict[int, str] = {}
    for layout, m in zip(layout_leaves, per_layout, strict=True):
      m = jnp.asarray(m)
      if not jnp.issubdtype(m.dtype, jnp.floating):
        raise TypeError(
            f"{_OWNER}: {EXTRA} must hold floating-point maxima, got dtype {m.dtype}"
        )
      if m.ndim < 1 or m.shape[-1] < 1:
        raise ValueError(
            f"{_OWNER}: {EXTRA} must end in a heads axis ([heads] or [batch, heads]), got "
            f"shape {m.shape}"
        )
      roles: dict[int, str] = {}
      if _is_layout(layout):
        for role, prefixes in (("query", layout.query), ("key", layout.key)):
          for prefix in prefixes:
            for i in _select(names, prefix):
              if i in roles or i in owner_of:
                raise ValueError(f"{_OWNER}: the parameter {names[i]!r} is named twice")
              roles[i] = role
        counts = {leads[i] for i in roles}
        if len(counts) > 1:
          raise ValueError(
              f"{_OWNER}: the parameters {sorted(names[i] for i in roles)} of one layout "
              f"have different numbers of stacked layer axes ({sorted(counts)})"
          )
        lead = counts.pop()
        for i in roles:
          if not jnp.issubdtype(jnp.result_type(u_leaves[i]), jnp.floating):
            raise TypeError(
                f"{_OWNER} needs floating-point query and key parameters: the leaf "
                f"{names[i]!r} has dtype {jnp.result_type(u_leaves[i])}"
            )
          if m.ndim < lead + 1 or m.shape[:lead] != np.shape(u_leaves[i])[:lead]:
            raise ValueError(
                f"{_OWNER}: {EXTRA} for the parameter {names[i]!r} of shape "
                f"{np.shape(u_leaves[i])} ({lead} stacked layer axes) must have shape "
                f"[*layers, (batch,) heads] with layers {np.shape(u_leaves[i])[:lead]}, "
                f"got {m.shape}"
            )
      else:
        lead = max(m.ndim - 1, 0)
      for i in roles:
        owner_of[i] = roles[i]
      m = m.astype(num.accumulation_dtype(m.dtype))
      reduce = tuple(range(lead, m.ndim - 1))
      peaks.append(jnp.max(m, axis=reduce) if reduce else m)
      plans.append((layout, roles, lead))

    # 2. one collective for every layer; the per-head factors.
    bad = jnp.stack([jnp.any(jnp.isnan(s) | jnp.isposinf(s)) for s in peaks])
    if axis_name is not None:
      peaks, bad = _pmax_once(peaks, bad, axis_name)
    nonfinite = jnp.any(bad)
    clipped_total = jnp.zeros((), jnp.int32)
    smallest = jnp.ones((), jnp.float32)
    top = jnp.full((), -jnp.inf, jnp.float32)
    mults: dict[int, jax.Array] = {}
    for (layout, roles, lead), s in zip(plans, peaks, strict=True):
      tau = jnp.asarray(threshold, s.dtype)
      floor = jnp.asarray(min_factor, s.dtype)
      a = jnp.asarray(alpha, s.dtype)
      gamma = jnp.where(s <= tau, jnp.ones((), s.dtype), jnp.maximum(tau / s, floor))
      gamma = jnp.where(nonfinite, jnp.ones((), s.dtype), gamma)
      clipped = (s > tau) & ~nonfinite
      clipped_total = clipped_total + jnp.sum(clipped, dtype=jnp.int32)
      smallest = jnp.minimum(smallest, jnp.min(gamma).astype(jnp.float32))
      top = jnp.maximum(top, jnp.max(s).astype(jnp.float32))
      if _is_layout(layout):
        shapes = [(i, names[i], tuple(np.shape(u_leaves[i]))) for i in roles]
        found = _layout_multipliers(layout, gamma, a, shapes, lead, roles)
      else:
        found = _call_layout(layout, gamma, names, u_leaves, owner_of)
      for i, m in found.items():
        mults[i] = jnp.where(nonfinite, jnp.ones((), m.dtype), m)

    new_leaves = [_scaled(u, p, mults[i]) if i in mults else u
                  for i, (u, p) in enumerate(zip(u_leaves, p_leaves, strict=True))]
    new_state = QkClipState(
        num_clipped=clipped_total,
        smallest_factor=smallest,
        max_logit=top,
        num_nonfinite=jnp.where(nonfinite, optax.safe_increment(state.num_nonfinite),
                                state.num_nonfinite),
    )
    return jax.tree.unflatten(u_def, new_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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


def _call_layout(fn: Callable[..., Any], gamma: jax.Array, names: Sequence[str],
                 u_leaves: Sequence[Any], owner_of: dict[int, str]) -> dict[int, jax.Array]:
  """Runs a callable layout; its multipliers per leaf index, checked."""
  out = fn(gamma)
  if not isinstance(out, Mapping):
    raise TypeError(
        f"{_OWNER}: a callable layout must return a dict {{path: multiplier}}, got {out!r}"
    )
  found: dict[int, jax.Array] = {}
  for prefix, m in out.items():
    prefix = _paths(_OWNER, "layouts", prefix)[0]
    m = jnp.asarray(m, gamma.dtype)
    for i in _select(names, prefix):
      if i in found or i in owner_of:
        raise ValueError(f"{_OWNER}: the parameter {names[i]!r} is named twice")
      shape = tuple(np.shape(u_leaves[i]))
      if not jnp.issubdtype(jnp.result_type(u_leaves[i]), jnp.floating):
        raise TypeError(
            f"{_OWNER} needs floating-point query and key parameters: the leaf "
            f"{names[i]!r} has dtype {jnp.result_type(u_leaves[i])}"
        )
      try:
        if jnp.broadcast_shapes(m.shape, shape) != shape:
          raise ValueError
      except ValueError:
        raise ValueError(
            f"{_OWNER}: a callable layout's multiplier of shape {m.shape} for "
            f"{names[i]!r} does not broadcast to the leaf's shape {shape}"
        ) from None
      found[i] = m
      owner_of[i] = "callable"
  return found
