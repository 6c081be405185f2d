"""Shared numerics: float32-accumulated norms, the safe scale factor, one psum.

Every transformation of optax_guard computes its statistics with these
functions, so that they all agree on precision, on non-finite handling and on
how partial results are combined across devices.

* Norms accumulate in float32 (float64 when the input is float64), whatever
  the dtype of the leaf. Squaring a float16 leaf in float16 overflows at
  ``|x| > 256``; squaring it in float32 after a fused convert does not.
* Reductions produce *partials* (a sum of squares, a sum of absolute values or
  a maximum absolute value). Partials are combined across leaves, then across
  devices with a single collective, and only then turned into a norm. Under
  ``shard_map`` a leaf's partial counts once along the axes the leaf is
  replicated over (:func:`device_shares`), as JAX types it.
* The scale factor is ``min(1, c / max(norm, tiny))``: a multiply by one
  scalar (or per-unit) factor fuses into its consumer, a zero norm gives 1,
  an infinite norm gives 0 and a NaN norm gives NaN. Whether a norm is at or
  under ``c`` is decided by the comparison ``norm <= c``, never by the
  rounding of the quotient (XLA:GPU's float32 division is not correctly
  rounded: ``c / c`` can be ``0.99999994`` there), so updates at or under the
  bound are bitwise unchanged on every backend.
* Stacked (scanned) layers: per-tensor statistics can treat each slice of a
  leaf's leading layer axes as a tensor of its own (:func:`stacked_counts`,
  :func:`tensor_partial`), so a scanned model and its unrolled twin get the
  same updates.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from optax_guard._validation import AxisName, NormOrd, Stacked, UnitAxis


def canonical_ord(ord: NormOrd) -> int | float:  # noqa: A002
  """Maps ``None`` to 2 and ``'inf'``/``numpy.inf`` to ``math.inf``."""
  if ord is None:
    return 2
  if isinstance(ord, str):
    if ord == "inf":
      return math.inf
    raise ValueError(f"ord must be None, 1, 2, inf or 'inf', got {ord!r}")
  return ord


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """float64 for float64 (and complex128) inputs, float32 otherwise."""
  dtype = jnp.dtype(dtype)
  if dtype in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128)):
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def _magnitude(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return jnp.abs(x).astype(accumulation_dtype(x.dtype))


def partial_norm(
    x: jax.Array,
    ord: NormOrd = 2,  # noqa: A002
    axis: UnitAxis = None,
    keepdims: bool = False,
) -> jax.Array:
  """The partial of a norm of ``x`` over ``axis``, accumulated in float32.

  For ``ord`` 2 the sum of squares, for 1 the sum of absolute values, for
  ``inf`` the maximum absolute value (0 for an empty reduction). Partials of
  disjoint pieces combine with :func:`combine_partials` and become a norm with
  :func:`finish_norm`.
  """
  ord = canonical_ord(ord)
  if ord == 2 and axis is None and not keepdims:
    return _sum_of_squares(jnp.asarray(x))
  a = _magnitude(x)
  if ord == 2:
    return jnp.sum(a * a, axis=axis, keepdims=keepdims)
  if ord == 1:
    return jnp.sum(a, axis=axis, keepdims=keepdims)
  return jnp.max(a, axis=axis, keepdims=keepdims, initial=0.0)


def _sum_of_squares(x: jax.Array) -> jax.Array:
  """``sum(x * x)`` of a whole leaf, accumulated in float32 (or float64).

  ``x`` goes through ``lax.optimization_barrier`` first (free for a buffer
  that exists anyway): an optimizer that also squares the gradient (Adam's
  second moment) would otherwise share the ``x * x`` with this reduction
  after XLA's common-subexpression elimination, and XLA:CPU then
  materialises that product as a full-size temporary.
  """
  a = _magnitude(jax.lax.optimization_barrier(x))
  return jnp.sum(a * a)


def combine_partials(partials: Sequence[jax.Array], ord: NormOrd = 2) -> jax.Array:  # noqa: A002
  """Combines partials of disjoint pieces (sum, or max for ``inf``)."""
  ord = canonical_ord(ord)
  if not partials:
    return jnp.zeros((), jnp.float32)
  dtype = jnp.result_type(*partials)
  partials = [p.astype(dtype) for p in partials]
  if ord == math.inf:
    return jnp.max(jnp.stack(partials)) if len(partials) > 1 else partials[0]
  total = partials[0]
  for p in partials[1:]:
    total = total + p
  return total


def finish_norm(partial: jax.Array, ord: NormOrd = 2) -> jax.Array:  # noqa: A002
  """Turns a combined partial into the norm (``sqrt`` for ``ord`` 2)."""
  return jnp.sqrt(partial) if canonical_ord(ord) == 2 else partial


def axes_of(axis_name: AxisName) -> tuple[str, ...]:
  """The mesh axes named by ``axis_name`` as a tuple (``()`` for None)."""
  if axis_name is None:
    return ()
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def varying_axes(x: Any) -> frozenset[str]:
  """The manual mesh axes ``x`` varies over inside ``shard_map`` (else empty).

  Read from the type that the public ``jax.typeof`` gives (an array, a tracer
  or a ``jax.ShapeDtypeStruct``): its ``vma`` where JAX calls it so, else its
  ``manual_axis_type.varying`` (the spelling of JAX 0.10).
  """
  aval = jax.typeof(x)
  if hasattr(aval, "vma"):
    return frozenset(aval.vma)
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(manual.varying) if manual is not None else frozenset()


def tracked_axes(axis_name: AxisName) -> tuple[str, ...]:
  """The axes of ``axis_name`` along which JAX types each value as varying or not.

  Those of a ``jax.shard_map`` with ``check_vma=True`` (the default), where
  ``lax.axis_index`` itself is typed as varying. Under ``jax.pmap``,
  ``shard_map(check_vma=False)``, ``vmap`` or ``make_jaxpr(axis_env=...)``
  nothing is tracked (every value looks replicated), and outside any mapping
  the name is unbound: none of those axes is returned, so that the
  collective treats every device's partial as its own (and raises JAX's
  error for an unbound name).
  """
  tracked = []
  for a in axes_of(axis_name):
    try:
      index = jax.eval_shape(lambda a=a: jax.lax.axis_index(a))
    except NameError:  # unbound: the collective raises JAX's own error
      continue
    if a in varying_axes(index):
      tracked.append(a)
  return tuple(tracked)


def _share(partial: Any, tracked: tuple[str, ...], ord: NormOrd, like: Any) -> jax.Array:  # noqa: A002
  partial = jnp.asarray(partial)
  if not tracked:
    return partial
  own = varying_axes(partial)
  cast = tuple(a for a in tracked if a not in own)
  if cast:
    partial = jax.lax.pcast(partial, cast, to="varying")
  if canonical_ord(ord) == math.inf:  # a maximum: a copy changes nothing
    return partial
  source = own if like is None else varying_axes(like)
  copies = [a for a in tracked if a not in source]
  if not copies:
    return partial
  first = functools.reduce(jnp.logical_and, [jax.lax.axis_index(a) == 0 for a in copies])
  return jnp.where(first, partial, jnp.zeros_like(partial))


def device_shares(partials: Any, axis_name: AxisName, ord: NormOrd = 2, like: Any = None) -> Any:  # noqa: A002
  """Each partial of the tree ``partials`` as this device's share of its total.

  Inside ``shard_map`` (with ``check_vma``), a partial of a leaf that is
  replicated along some axes of ``axis_name`` (JAX's type says it does not
  vary there) is kept on the device at index 0 of those axes and replaced by
  0 on the others (a select: exact), so that a ``psum`` over ``axis_name``
  counts it once, as Megatron counts a replicated parameter once. Maxima are
  kept everywhere (a maximum of copies is the value). Either way the result
  is typed as varying over every tracked axis, as a collective over several
  axes requires. Elsewhere (``pmap``, ``check_vma=False``; see
  :func:`tracked_axes`) nothing is typed, and every device's partial is its
  own, unchanged.

  ``like``: a tree with the structure of ``partials`` whose leaves' varying
  axes decide instead of the partials' own (an element count, a constant,
  belongs to the leaf it counts). Applying this twice changes nothing.
  """
  tracked = tracked_axes(axis_name)
  if like is None:
    return jax.tree.map(lambda p: _share(p, tracked, ord, None), partials)
  return jax.tree.map(lambda p, x: _share(p, tracked, ord, x), partials, like)


def cross_device(partials: Any, ord: NormOrd = 2, axis_name: AxisName = None) -> Any:  # noqa: A002
  """Combines a tree of partials across devices with one collective.

  ``lax.psum`` for sums (``ord`` 1 and 2), ``lax.pmax`` for ``inf``, over one
  axis name or a tuple of them; the identity when ``axis_name`` is None
  (plain ``jit`` on sharded arrays already reduces globally). Each partial
  first becomes this device's share (:func:`device_shares`: under
  ``shard_map`` a partial replicated along an axis counts once), then all go
  through one flat vector per dtype: a collective of a tree of device-varying
  values binds one collective per leaf.
  """
  if axis_name is None:
    return partials
  collective = jax.lax.pmax if canonical_ord(ord) == math.inf else jax.lax.psum
  leaves, treedef = jax.tree.flatten(device_shares(partials, axis_name, ord))
  out = list(leaves)
  for dtype in dict.fromkeys(x.dtype for x in leaves):
    group = [i for i, x in enumerate(leaves) if x.dtype == dtype]
    if len(group) == 1:
      out[group[0]] = collective(leaves[group[0]], axis_name)
      continue
    flat = collective(concat_flat([leaves[i] for i in group]), axis_name)
    for i, piece in zip(group, split_flat(flat, [leaves[i].shape for i in group]), strict=True):
      out[i] = piece
  return jax.tree.unflatten(treedef, out)


def concat_flat(parts: Sequence[jax.Array], dtype: Any = None) -> jax.Array:
  """The arrays ``parts``, raveled and concatenated into one vector (cast to
  ``dtype`` if given); an empty vector for none."""
  if not parts:
    return jnp.zeros((0,), dtype or jnp.float32)
  return jnp.concatenate([jnp.ravel(p) if dtype is None else jnp.ravel(p).astype(dtype)
                          for p in parts])


def split_flat(vector: jax.Array, shapes: Sequence[tuple[int, ...]]) -> list[jax.Array]:
  """:func:`concat_flat`'s vector cut back into pieces of ``shapes``, in order."""
  out, start = [], 0
  for shape in shapes:
    size = math.prod(shape)
    out.append(vector[start:start + size].reshape(shape))
    start += size
  return out


# How many consecutive parts split_rows cuts a segment into per level.
_SPLIT_ARITY = 16


def _split_plan(sizes: Sequence[int]) -> list[list[int]]:
  """``sizes`` cut into at most ``_SPLIT_ARITY`` consecutive runs, each of
  ``ceil(len(sizes) / _SPLIT_ARITY)`` pieces (the last one may have fewer)."""
  step = -(-len(sizes) // _SPLIT_ARITY)
  return [list(sizes[i:i + step]) for i in range(0, len(sizes), step)]


def split_rows(pred: jax.Array, array: jax.Array, sizes: Sequence[int]) -> list[jax.Array]:
  """``array`` cut along its first axis into consecutive pieces of ``sizes``
  rows, each piece a buffer of its own, for a compile time that does not
  grow with the number of pieces.

  A slice at a constant offset compiles to a kernel of its own, and XLA
  shares a kernel between two operations only when their code is the same:
  cutting ``n`` pieces directly compiles ``n`` distinct kernels, and for a
  few hundred tensors those dominate the compile time of the whole step.
  (A slice fused into its consumer instead makes every consumer distinct.)
  Here the pieces are cut by levels: each level cuts every segment into at
  most ``_SPLIT_ARITY`` consecutive runs of pieces, inside a ``lax.cond``
  whose two branches are the same, so that each level's segments are
  buffers XLA cannot see through (it would merge the levels' slices back
  into one slice per piece). The slices of a level repeat a few (length,
  offset) pairs, so the distinct kernels number about ``_SPLIT_ARITY`` per
  distinct segment length. At run time each of the ``ceil(log_16 n)``
  levels copies every row once, in about ``n * 16 / 15`` small copies in
  all. ``pred`` is any traced boolean scalar: both branches are the same, so
  it only chooses which copy of them runs.

  The values are moved, never computed: the pieces are bitwise ``array``'s
  rows.
  """
  sizes = [int(s) for s in sizes]
  if not sizes:
    return []
  if sum(sizes) != array.shape[0]:
    raise ValueError(f"split_rows: sizes add up to {sum(sizes)}, the array has "
                     f"{array.shape[0]} rows")
  segments, buffers = [sizes], (array,)
  while any(len(s) > 1 for s in segments):
    plan = [_split_plan(s) if len(s) > 1 else [s] for s in segments]

    def level(bufs: tuple[jax.Array, ...], plan: list[list[list[int]]] = plan
              ) -> tuple[jax.Array, ...]:
      out = []
      for buf, runs in zip(bufs, plan, strict=True):
        if len(runs) == 1:  # a single piece, or a run this level leaves whole
          out.append(buf)
          continue
        start = 0
        for run in runs:
          out.append(buf[start:start + sum(run)])
          start += sum(run)
      return tuple(out)

    buffers = jax.lax.cond(pred, level, level, buffers)
    segments = [run for runs in plan for run in runs]
  return list(buffers)


# The keyword extra through which a guard hands its measured sum of squares
# to the transformation it wraps (see SharedNorm).
SHARED_NORM = "shared_norm"


class SharedNorm(NamedTuple):
  """The float32 sum of squares a guard measured of the updates it passes on.

  A guard computes the sum of squares of the incoming updates to decide; an
  inner ``clip_by_global_norm`` of the same updates would compute it again
  (XLA does not merge a reduction outside a ``lax.cond`` with the same
  reduction inside a branch). The guard passes this object to its inner
  ``update`` as the keyword extra ``shared_norm=`` (``optax.chain`` hands
  keyword extras to every member, plain ``GradientTransformation`` members
  ignore them), and the transformations that take a global L2 norm ask it
  with :meth:`partial_of` before reading the updates.

  Attributes:
    leaves: the leaves that were measured (the same arrays or tracers).
    partial: their sum of squares, combined over ``axis_name``.
    axis_name: the devices it was combined over.
  """

  leaves: tuple
  partial: jax.Array
  axis_name: AxisName

  @classmethod
  def of(cls, tree: Any, partial: jax.Array, axis_name: AxisName) -> SharedNorm:
    return cls(tuple(jax.tree.leaves(tree)), partial, axis_name)

  def partial_of(self, tree: Any, ord: NormOrd, axis_name: AxisName) -> jax.Array | None:  # noqa: A002
    """The partial if ``tree`` has these very leaves, ``ord`` is 2 and the axes agree."""
    leaves = jax.tree.leaves(tree)
    same = (canonical_ord(ord) == 2 and set(axes_of(self.axis_name)) == set(axes_of(axis_name))
            and len(self.leaves) == len(leaves)
            and all(a is b for a, b in zip(self.leaves, leaves, strict=True)))
    return self.partial if same else None


def global_partial(
    tree: Any,
    ord: NormOrd = None,  # noqa: A002
    axis_name: AxisName = None,
    shared: SharedNorm | None = None,
) -> jax.Array:
  """The combined partial of a whole tree (e.g. its sum of squares).

  Testing this for finiteness is the one-pass non-finite test of the guards:
  it is ``inf``/NaN exactly when an element is, or when the squares exceed
  float32 range (testing ``sqrt`` of it instead can be rewritten by XLA).
  With ``shared`` (what an enclosing guard measured) for the same leaves,
  its partial, without a second pass over the updates.
  """
  known = None if shared is None else shared.partial_of(tree, ord, axis_name)
  if known is not None:
    return known
  return cross_device(local_partial(tree, ord, axis_name), ord, axis_name)


def local_partial(tree: Any, ord: NormOrd = None, axis_name: AxisName = None) -> jax.Array:  # noqa: A002
  """This device's share of the partial of a whole tree, before the collective.

  The leaves' partials each become this device's share (see
  :func:`device_shares`) before they are combined: a replicated leaf must
  count once even where its partial is added to a sharded leaf's.

  Compiled for a CPU platform of one device, the sums of squares of the
  leaves under ``_SMALL_LEAF`` elements are taken over one concatenation of
  them (:func:`_partials`); on other platforms, and when the CPU has several
  devices, leaf by leaf. The two differ only in the rounding of the sum.
  """
  leaves = jax.tree.leaves(tree)
  small = sum(_is_small(x) for x in leaves)
  return _grouped_on_cpu(functools.partial(_partials, leaves, ord, axis_name),
                         canonical_ord(ord) == 2 and small > 1)


# Below this many elements XLA:CPU reduces a leaf with a generic loop: the
# squares are written out and summed by a second kernel, two kernels per leaf
# whose launch costs more than the data they read.
_SMALL_LEAF = 4096


def _is_small(x: jax.Array) -> bool:
  return 0 < jnp.size(x) < _SMALL_LEAF


def _grouped_on_cpu(compute: Callable[..., Any], worth_it: bool) -> Any:
  """``compute(group_small=...)``: grouped where compiled for a one-device CPU.

  ``jax.lax.platform_dependent`` picks the branch at lowering; with
  ``worth_it`` false, or several CPU devices, only the leaf-by-leaf one is
  traced.
  """
  if worth_it and _one_cpu_device():
    return jax.lax.platform_dependent(cpu=lambda: compute(group_small=True),
                                      default=lambda: compute(group_small=False))
  return compute(group_small=False)


def _sum_ready(group: Sequence[jax.Array]) -> jax.Array:
  """The leaves of ``group`` (one dtype) concatenated, in the accumulation dtype.

  Concatenated in their own dtype, since a convert or an ``abs`` per leaf
  would be a kernel per leaf; the optimization barrier keeps XLA from
  splitting a sum over the concatenation back into one sum per leaf.
  """
  flat = jax.lax.optimization_barrier(concat_flat(group))
  return _magnitude(flat) if jnp.iscomplexobj(flat) else flat.astype(
      accumulation_dtype(flat.dtype))


def _one_cpu_device() -> bool:
  """Whether the CPU platform has a single device (in every process together).

  Small leaves are grouped on CPU only then: a concatenation of leaves that
  ``jit`` shards over several devices would gather them first.
  """
  try:
    return len(jax.devices("cpu")) == 1
  except RuntimeError:  # no CPU platform (JAX_PLATFORMS excludes it)
    return False


def _partials(leaves: Sequence[jax.Array], ord: NormOrd, axis_name: AxisName,
              group_small: bool = False) -> jax.Array:
  """The combined device shares of the leaves' partials.

  ``group_small`` (sums of squares on CPU): leaves under ``_SMALL_LEAF``
  elements that share a dtype and, under ``shard_map``, the
  axes they vary over (so the same device share) are concatenated into one
  vector and summed by one reduction: two kernels for any number of small
  leaves, at the price of one copy of them.
  """
  partials: list[jax.Array] = []
  groups: dict[tuple[Any, frozenset[str]], list[jax.Array]] = {}
  for x in leaves:
    if group_small and _is_small(x):
      groups.setdefault((jnp.dtype(x.dtype), varying_axes(x)), []).append(x)
    else:
      partials.append(partial_norm(x, ord))
  for group in groups.values():
    flat = _sum_ready(group)
    partials.append(jnp.sum(flat * flat))  # varies over the axes its leaves vary over
  return combine_partials(device_shares(partials, axis_name, ord), ord)


def global_norm(tree: Any, ord: NormOrd = None, axis_name: AxisName = None,  # noqa: A002
                shared: SharedNorm | None = None) -> jax.Array:
  """The norm of a whole tree, float32-accumulated, across devices if asked.

  Returns a float32 scalar (float64 if a leaf is float64); 0 for an empty tree.
  ``shared``: see :func:`global_partial`.
  """
  return finish_norm(global_partial(tree, ord, axis_name, shared), ord)


def leaf_norms(tree: Any, ord: NormOrd = None, axis_name: AxisName = None) -> Any:  # noqa: A002
  """A tree of per-leaf norms (float32 scalars), one collective for all."""
  partials = jax.tree.map(lambda x: partial_norm(x, ord), tree)
  partials = cross_device(partials, ord, axis_name)
  return jax.tree.map(lambda p: finish_norm(p, ord), partials)


def resolve_unit_axes(
    ndim: int, axis: UnitAxis, lead: int = 0
) -> tuple[int, ...]:
  """The axes a per-unit norm reduces over.

  ``axis=None`` means every axis but the last for ``ndim >= 2`` (the fan-in of
  a Flax ``Dense`` kernel ``(in, out)`` or an HWIO convolution kernel) and
  every axis for scalars and vectors. Negative axes are normalised; an axis
  out of range raises ``ValueError``. With ``lead`` stacked layer axes (see
  :func:`stacked_counts`) ``axis`` refers to the axes of one layer's slice,
  as in the unrolled model, and the result is shifted past the layer axes.
  """
  if lead:
    return tuple(a + lead for a in resolve_unit_axes(ndim - lead, axis))
  if axis is None:
    return tuple(range(ndim - 1)) if ndim >= 2 else tuple(range(ndim))
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  out = []
  for a in axes:
    a = int(a)
    if not -max(ndim, 1) <= a < max(ndim, 1) or ndim == 0:
      raise ValueError(
          f"axis={axis!r} is out of range for a leaf with {ndim} dimensions"
      )
    out.append(a % ndim)
  return tuple(sorted(set(out)))


def unit_norm(
    x: jax.Array,
    axis: UnitAxis = None,
    ord: NormOrd = None,  # noqa: A002
    axis_name: AxisName = None,
    lead: int = 0,
) -> jax.Array:
  """Per-unit norm of ``x`` over ``axis`` (see :func:`resolve_unit_axes`).

  The result keeps the reduced dimensions (size 1), so it broadcasts against
  ``x``. With ``axis_name`` the per-unit partials are summed across devices
  (the reduced axes are split over the devices).
  """
  x = jnp.asarray(x)
  axes = resolve_unit_axes(x.ndim, axis, lead)
  partial = partial_norm(x, ord, axis=axes, keepdims=True)
  return finish_norm(cross_device(partial, ord, axis_name), ord)


def _axes_at(owner: str, path: Any, ndim: int, axis: UnitAxis, lead: int) -> tuple[int, ...]:
  """:func:`resolve_unit_axes` for the leaf at ``path``; an error names ``owner`` and the path."""
  try:
    return resolve_unit_axes(ndim, axis, lead)
  except ValueError as e:
    raise ValueError(f"{owner}: leaf {jax.tree_util.keystr(path) or '(root)'}: {e}") from None


def unit_norm_at(
    owner: str, path: Any, x: jax.Array, axis: UnitAxis, **kwargs: Any
) -> jax.Array:
  """:func:`unit_norm` of the leaf at ``path``; an axis error names ``owner`` and the path."""
  _axes_at(owner, path, np.ndim(x), axis, kwargs.get("lead", 0))
  return unit_norm(x, axis, **kwargs)


def unit_norms(
    owner: str, tree: Any, axis: UnitAxis, leads: Sequence[int], ord: NormOrd = None,  # noqa: A002
    axis_name: AxisName = None,
) -> list[jax.Array]:
  """:func:`unit_norm` of every leaf of ``tree``, with one collective for all.

  ``leads`` comes from :func:`stacked_counts`; an axis error names ``owner``
  and the leaf path.
  """
  partials = []
  for (path, x), lead in zip(jax.tree.flatten_with_path(tree)[0], leads, strict=True):
    x = jnp.asarray(x)
    axes = _axes_at(owner, path, x.ndim, axis, lead)
    partials.append(partial_norm(x, ord, axis=axes, keepdims=True))
  return [finish_norm(p, ord) for p in cross_device(partials, ord, axis_name)]


def safe_factor(bound: Any, norm: jax.Array, *, zero_infinite: bool = False) -> jax.Array:
  """``1`` where ``norm <= bound``, else ``min(1, bound / max(norm, tiny))``.

  In the norm's dtype, elementwise for per-unit norms. The outcome "at or
  under the bound" is decided by the comparison, so such updates are
  multiplied by exactly 1 (bitwise unchanged) on every backend, however the
  division rounds. A zero norm gives 1 (for ``bound >= 0``); an infinite norm
  gives 0 for a finite bound; an infinite bound (a user's off switch) gives
  1 for every norm but NaN; a NaN norm gives NaN. With ``zero_infinite`` an
  infinite norm gives 0 even for an infinite bound: for statistical clips
  whose threshold is ``inf`` on the steps they leave alone.
  """
  norm = jnp.asarray(norm)
  tiny = jnp.finfo(norm.dtype).tiny
  bound = jnp.asarray(bound, norm.dtype)
  quotient = jnp.minimum(1.0, bound / jnp.maximum(norm, tiny)).astype(norm.dtype)
  factor = jnp.where(norm <= bound, jnp.ones((), norm.dtype), quotient)
  if zero_infinite:
    factor = jnp.where(jnp.isposinf(norm), jnp.zeros((), norm.dtype), factor)
  return factor


def scale_leaf(x: jax.Array, factor: jax.Array) -> jax.Array:
  """``x * factor`` computed in the factor's precision, cast back to x.dtype.

  XLA fuses the converts and the multiply into one elementwise pass (or into
  the consumer of the result), so no full-size temporary is created.
  """
  x = jnp.asarray(x)
  factor = jnp.asarray(factor)
  if x.dtype == factor.dtype:
    return x * factor
  wide = jnp.promote_types(x.dtype, factor.dtype)
  return (x.astype(wide) * factor.astype(wide)).astype(x.dtype)


def scale_tree(tree: Any, factor: jax.Array) -> Any:
  """Multiplies every leaf by one scalar factor, keeping each leaf's dtype."""
  return jax.tree.map(lambda x: scale_leaf(x, factor), tree)


def stacked_counts(owner: str, tree: Any, stacked: Stacked) -> list[int]:
  """Per leaf of ``tree`` (in ``jax.tree.leaves`` order), its number of layer axes.

  ``stacked`` says how many *leading* axes of a leaf index stacked layers (a
  model built with ``nnx.scan``/``nn.scan`` keeps every layer's kernel in one
  leaf of shape ``(layers, ...)``): None for no leaf, an int for every leaf,
  a callable ``(path, leaf) -> int``, or a tree of ints (None for 0) that is
  a prefix of ``tree``. A per-tensor statistic then treats each slice
  ``x[i]`` (``x[i, j]`` for two layer axes) as a tensor of its own. A count
  above a leaf's number of dimensions raises ``ValueError`` naming ``owner``
  and the leaf path.
  """
  paths_leaves = jax.tree.flatten_with_path(tree)[0]
  if stacked is None:
    return [0] * len(paths_leaves)
  if callable(stacked):
    counts = [stacked(path, leaf) for path, leaf in paths_leaves]
  elif isinstance(stacked, (int, np.integer)):
    counts = [int(stacked)] * len(paths_leaves)
  else:
    try:
      expanded = jax.tree.map(
          lambda n, sub: jax.tree.map(lambda _: 0 if n is None else int(n), sub),
          stacked, tree, is_leaf=lambda x: x is None,
      )
    except ValueError as e:
      raise ValueError(
          f"{owner}(stacked=...) must be a prefix of the updates tree: {e}"
      ) from None
    counts = jax.tree.leaves(expanded)
  out = []
  for (path, leaf), n in zip(paths_leaves, counts, strict=True):
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
      raise TypeError(
          f"{owner}(stacked=...) gave {n!r} for the leaf "
          f"{jax.tree_util.keystr(path) or '(root)'}; it must be an int >= 0"
      )
    if n > np.ndim(leaf):
      raise ValueError(
          f"{owner}(stacked=...): the leaf {jax.tree_util.keystr(path) or '(root)'} of "
          f"shape {np.shape(leaf)} has fewer than {int(n)} leading layer axes"
      )
    out.append(int(n))
  return out


def tensor_partial(x: jax.Array, lead: int = 0, ord: NormOrd = 2) -> jax.Array:  # noqa: A002
  """:func:`partial_norm` of each layer slice of ``x`` (its first ``lead`` axes).

  ``lead=0`` gives the scalar partial of the whole leaf. Otherwise the
  result has shape ``x.shape[:lead] + (1,) * (x.ndim - lead)``: one partial
  per layer, broadcastable against ``x``.
  """
  x = jnp.asarray(x)
  if lead == 0:
    return partial_norm(x, ord)
  return partial_norm(x, ord, axis=tuple(range(lead, x.ndim)), keepdims=True)


def tensor_partials(
    leaves: Sequence[jax.Array], leads: Sequence[int], ord: NormOrd = 2  # noqa: A002
) -> list[jax.Array]:
  """:func:`tensor_partial` of each leaf, in order.

  Compiled for a CPU platform of one device (as :func:`local_partial`), the
  sums of squares of whole small leaves (``lead`` 0, under ``_SMALL_LEAF``
  elements) of the same size, dtype and varying axes are the row sums of one
  concatenation of them: two kernels for the group instead of two per leaf.
  They differ from the leaf-by-leaf sums only in rounding.
  """
  small = sum(n == 0 and _is_small(x) for x, n in zip(leaves, leads, strict=True))
  return _grouped_on_cpu(functools.partial(_tensor_partials, leaves, leads, ord),
                         canonical_ord(ord) == 2 and small > 1)


def _tensor_partials(leaves: Sequence[jax.Array], leads: Sequence[int], ord: NormOrd,  # noqa: A002
                     group_small: bool = False) -> list[jax.Array]:
  """:func:`tensor_partials` leaf by leaf, or (``group_small``) with the whole
  small leaves of one size, dtype and varying axes summed as rows of one array."""
  out: list[Any] = [None] * len(leaves)
  groups: dict[tuple[Any, int, frozenset[str]], list[int]] = {}
  for i, (x, lead) in enumerate(zip(leaves, leads, strict=True)):
    if group_small and lead == 0 and _is_small(x):
      groups.setdefault((jnp.dtype(x.dtype), jnp.size(x), varying_axes(x)), []).append(i)
    else:
      out[i] = tensor_partial(x, lead, ord)
  for (_, size, _), members in groups.items():
    rows = _sum_ready([leaves[i] for i in members]).reshape(len(members), size)
    sums = jnp.sum(rows * rows, axis=1)
    for j, i in enumerate(members):
      out[i] = sums[j]
  return out


def tensor_norms(
    tree: Any, leads: Sequence[int], ord: NormOrd = None, axis_name: AxisName = None  # noqa: A002
) -> list[jax.Array]:
  """Per-tensor norms of ``tree``'s leaves (one per layer slice), one collective.

  ``leads`` comes from :func:`stacked_counts`; with every count 0 this is
  :func:`leaf_norms` as a list.
  """
  leaves = jax.tree.leaves(tree)
  partials = [tensor_partial(x, n, ord) for x, n in zip(leaves, leads, strict=True)]
  partials = cross_device(partials, ord, axis_name)
  return [finish_norm(p, ord) for p in partials]


def map_tensors(owner: str, stacked: Stacked, fn: Any, tree: Any, *rest: Any) -> Any:
  """``fn(path, lead, leaf, *rest_leaves)`` for every leaf of ``tree``.

  ``lead`` is the leaf's number of stacked layer axes (:func:`stacked_counts`
  of ``tree``); ``rest`` are trees with ``tree``'s structure (the params of
  a weight-side transformation, checked by the caller). Returns a tree like
  ``tree``.
  """
  leads = stacked_counts(owner, tree, stacked)
  paths_leaves, treedef = jax.tree.flatten_with_path(tree)
  others = [jax.tree.leaves(r) for r in rest]
  out = [
      fn(path, lead, x, *[o[i] for o in others])
      for i, ((path, x), lead) in enumerate(zip(paths_leaves, leads, strict=True))
  ]
  return jax.tree.unflatten(treedef, out)


# Relative width of float noise for the statistical rules (spike, z-score,
# percentile): two norms within this fraction of each other are treated as
# equal. Backends and summation orders change a float32 norm by far less
# (about 1e-7 relative for one rounding, 1e-5 for a long reduction); a real
# outlier is far more.
NOISE_RTOL = 1e-3


def noise_floor(scale: jax.Array, level: jax.Array) -> jax.Array:
  """``max(scale, NOISE_RTOL * |level|)``: a spread never narrower than float noise.

  A rule of the form ``x > level + k * scale`` built on a spread estimate
  (a standard deviation, a median absolute deviation) fires on rounding
  noise once the recent observations are equal up to a few ulp (a clip
  ahead of the rule makes every norm equal): the spread is then 0 or one
  ulp. With the floor, such an ``x`` has to exceed ``level`` by
  ``k * NOISE_RTOL`` of it, on every backend alike.
  """
  scale = jnp.asarray(scale)
  return jnp.maximum(scale, jnp.asarray(NOISE_RTOL, scale.dtype) * jnp.abs(level))


def is_finite_scalar(x: jax.Array) -> jax.Array:
  """``jnp.isfinite`` of a scalar statistic (a norm, a loss)."""
  return jnp.isfinite(jnp.asarray(x))



def partial_stats(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(sum of squares, max |x|, number of non-finite elements)`` of ``x``.

  The sum of squares is :func:`partial_norm`'s (float32 accumulation, or
  float64 for float64 inputs). The maximum (NaN-propagating) and the int32
  count share one variadic reduction: both are exact in any order, and on
  CPU the three statistics of a 4096x4096 float32 leaf take 6 ms instead of
  62 ms with separate ``max`` and ``sum(~isfinite)`` reductions (the latter
  materialises an int32 copy of ``x``). A variadic reduction is not
  used for the sum: XLA:CPU runs it as one sequential accumulator, 0.5%
  off for 800k float16 elements of 0.1. An empty ``x`` gives ``(0, 0, 0)``.
  Partials combine across leaves and devices like :func:`partial_norm`'s
  (sum, max, sum).
  """
  x = jnp.asarray(x)
  a = _magnitude(x)
  bad = jnp.logical_not(jnp.isfinite(x)).astype(jnp.int32)

  def combine(p, q):
    return jnp.maximum(p[0], q[0]), p[1] + q[1]

  max_abs, count = jax.lax.reduce(
      (a, bad), (jnp.zeros((), a.dtype), jnp.zeros((), jnp.int32)), combine,
      tuple(range(x.ndim)),
  )
  return partial_norm(x, 2), max_abs, count


def ring_record(
    history: jax.Array, count: jax.Array, x: ArrayLike, ok: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Appends ``x`` to a history buffer if ``ok``; returns ``(history, count)``.

  The buffer is a shift register: the newest observation is always the last
  entry and the ``min(count, len(history))`` last entries hold the most recent
  ones, oldest first (see :func:`ring_valid`). Shifting a window of a few
  hundred floats costs nothing next to a pass over the gradients, and unlike
  a write slot ``count % len(history)`` it keeps rotating after the int32
  count saturates (``optax.safe_increment``). When ``ok`` is False neither
  the buffer nor the count changes, so non-finite observations never enter
  the statistics.
  """
  x = jnp.asarray(x, history.dtype)
  shifted = jnp.concatenate([history[1:], x[None]])
  history = jnp.where(ok, shifted, history)
  return history, jnp.where(ok, optax.safe_increment(count), count)


def ring_valid(history: jax.Array, count: jax.Array) -> jax.Array:
  """The bool mask of the entries of a :func:`ring_record` buffer that hold data."""
  size = history.shape[0]
  return jnp.arange(size) >= size - jnp.minimum(count, size)


def saturating_add(total: jax.Array, n: jax.Array) -> jax.Array:
  """``total + n`` for an int32 running total and a count ``n >= 0`` of this step.

  Saturates at ``2**31 - 1`` instead of wrapping around, as
  ``optax.safe_increment`` does for ``n = 1``: the running totals beside the
  per-step counts of a state (``total_cut``, ``total_clipped``...).
  """
  top = jnp.asarray(np.iinfo(np.int32).max, jnp.int32)
  total, n = jnp.asarray(total, jnp.int32), jnp.asarray(n, jnp.int32)
  return jnp.where(total > top - n, top, total + n)


def ordered_after(value: jax.Array, first: jax.Array) -> jax.Array:
  """``value``, bitwise, computed only once ``first`` (same shape) is.

  For a loop that overwrites a donated buffer in place while an earlier loop,
  the one that produces ``first``, still reads the old buffer: with this
  order in the program XLA writes in place; without it, it keeps a whole copy
  of the old buffer.

  With ``d = f - f`` (``+0`` when ``f`` is finite, NaN when not), the result
  is ``value + d`` where ``d == d`` and ``value`` elsewhere: ``value``
  itself, as ``value`` is ``>= +0`` or NaN (a second moment; a ``-0`` would
  come back ``+0``). XLA folds the integer forms of this identity
  (``f ^ f``) away, and the order with them.

  On a single device ``f`` is one element of ``first``, taken behind an
  optimization barrier so that XLA cannot compute that element from
  ``first``'s inputs instead (which would drop the order): the loop reads no
  more of ``first``. With several devices ``first`` may be sharded, and its first
  element would be sent from one device to all; there ``f`` is ``first``
  elementwise, one more read of it.
  """
  if not jnp.size(first):
    return value
  f = first
  if _single_device():
    f = jax.lax.optimization_barrier(first).reshape(-1)[0]
  d = (f - f).astype(value.dtype)
  return jnp.where(d == d, value + d, value)


def _single_device() -> bool:
  """Whether the default backend has one device (in every process together)."""
  return jax.device_count() == 1
