"""The geometry caches of ViewMeta: eager replay as one as_strided, and reverse's check.

Holds the two NOTEs below and what implements them: the ops whose output
geometry depends on nothing but the input geometry and the arguments
(``_GEOMETRY_ONLY_OPS``), the fast-path check ``_geometry_replay_ok`` (the
shared predicate :func:`hopkit._dispatch.nothing_intercepts_dispatch` plus
the conditions of this path), the replay of a chain from the cache
(``_replay_geometry``, used by :func:`apply_view_meta_sequence`) and the
view-size cache of ``ViewMeta.reverse``.

NOTE [Geometry cache for eager replay]
    Replaying five views op by op costs five trips through the dispatcher.
    For a plain dense tensor outside any mode, a view is pure metadata: its
    sizes, strides and storage offset are a function of the base's. So
    :func:`apply_view_meta_sequence` remembers, per ViewMeta, the output
    geometry for each input geometry it has seen (learned by running the real
    op once) and replays the whole chain as one ``as_strided`` call. The
    result is the same tensor (same storage, dtype, geometry and ``_base``).
    Only ops whose output geometry depends on nothing but the input geometry
    and the arguments take part (_GEOMETRY_ONLY_OPS). The path is taken only
    where nothing intercepts dispatch (hopkit/_dispatch.py: no tensor
    subclass, functional, fake, batched or conjugated tensor, no active
    dispatch or torch-function mode, no functorch transform such as vmap),
    on strided, non-quantized CPU or CUDA tensors, and not on inputs that
    require grad (autograd would record AsStridedBackward instead of the
    views' own backward); everything else takes the op-by-op path.

NOTE [View sizes for reverse's check]
    ``reverse(base, mutated_view)`` refuses a ``mutated_view`` that is not
    shaped like ``forward(base)`` before computing anything, so it needs the
    view's shape. For the ops of _GEOMETRY_ONLY_OPS that shape is a function
    of the base's sizes and strides (and the arguments), so each ViewMeta
    remembers it per (sizes, strides) of plain tensors, learned from the one
    ``forward`` the first call runs; later calls compare sizes and run no op
    (nor trace one). Other views, and bases with symbolic sizes, run
    ``forward`` for it. ``scatter_into_base`` computes the chain's views
    anyway and checks its one value against the last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch._ops import OpOverload

from hopkit._dispatch import nothing_intercepts_dispatch
from hopkit.functionalization._protocol import ViewMetaLike

aten = torch.ops.aten

# Views whose output geometry is a function of the input geometry and the
# arguments only (same dtype, same conj/neg bits): NOTE [Geometry cache for
# eager replay].
_GEOMETRY_ONLY_OPS: frozenset[OpOverload] = frozenset(
    {
        aten.slice.Tensor,
        aten.narrow.default,
        aten.select.int,
        aten.diagonal.default,
        aten.as_strided.default,
        aten.transpose.int,
        aten.swapaxes.default,
        aten.swapdims.default,
        aten.t.default,
        aten.permute.default,
        aten.movedim.int,
        aten.movedim.intlist,
        aten.moveaxis.int,
        aten.moveaxis.intlist,
        aten.unsqueeze.default,
        aten.squeeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.view.default,
        aten._reshape_alias.default,
        aten.unflatten.int,
        aten.expand.default,
        aten.alias.default,
        aten.split.Tensor,
        aten.split_with_sizes.default,
        aten.chunk.default,
        aten.unbind.int,
        aten.unfold.default,
        aten.diagonal.default,
    }
)

_GEOMETRY_CACHE_LIMIT = 256
# Bound once: these run for every call on the fast path.
_grad_enabled = torch.is_grad_enabled
_strided = torch.strided
_Tensor = torch.Tensor


def _takes_geometry_cache(op: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a ViewMeta of ``op`` with these arguments gets the geometry caches."""
    return op in _GEOMETRY_ONLY_OPS and not any(
        isinstance(v, torch.Tensor) for v in (*args, *kwargs.values())
    )


def _geometry_replay_ok(base: object) -> bool:
    """Whether ``base``'s views may be computed from the cached geometry alone."""
    return (
        type(base) is _Tensor
        and base.layout is _strided
        and not (base.requires_grad and _grad_enabled())
        and not base.is_quantized
        and (base.is_cpu or base.is_cuda)
        and nothing_intercepts_dispatch((base,))
    )


def _replay_geometry(base: torch.Tensor, metas: Sequence[ViewMetaLike]) -> torch.Tensor | None:
    """``metas`` replayed on ``base`` as one as_strided; None if one of them has no cache."""
    geometry: Any = (base.size(), base.stride(), base.storage_offset())
    for meta in metas:
        cache = meta._geometry_cache
        if cache is None:
            return None
        out = cache.get(geometry)
        if out is None:
            view = meta.forward(base.as_strided(*geometry))
            out = (view.size(), view.stride(), view.storage_offset())
            if len(cache) >= _GEOMETRY_CACHE_LIMIT:
                cache.clear()
            cache[geometry] = out
        geometry = out
    return base.as_strided(*geometry)


def _cached_view_size(meta: ViewMetaLike, base: torch.Tensor) -> Any:
    """The size of ``meta.forward(base)`` if known without running it, else None."""
    sizes = meta._view_sizes
    if sizes is not None and type(base) is _Tensor:
        try:
            return sizes.get((base.shape, base.stride()))
        except (TypeError, RuntimeError):  # SymInt sizes (unhashable), no strides
            pass
    return None


def _remember_view_size(meta: ViewMetaLike, base: torch.Tensor, size: torch.Size) -> None:
    """Record ``size``, that of ``meta.forward(base)``, for later calls on bases like ``base``."""
    sizes = meta._view_sizes
    if sizes is not None and _geometry_replay_ok(base):
        if len(sizes) >= _GEOMETRY_CACHE_LIMIT:
            sizes.clear()
        sizes[(base.shape, base.stride())] = size
