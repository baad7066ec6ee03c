"""The verified as_strided fallback: replaying and inverting a view from its geometry.

Holds NOTE [Verified as_strided fallback] and its two halves: the forward
reconstruction of a view from the :class:`ViewGeometry` a ViewMeta recorded
(``_forward_from_geometry``), and the inverse of a view that has no inverse
rule, an ``as_strided_scatter`` through the view's geometry
(``_reverse_via_as_strided``, the default of _inverse_rules.py).

NOTE [Verified as_strided fallback]
    A ViewMeta may carry the :class:`ViewGeometry` its view had when it was
    recorded: :func:`record_view_metas` and :meth:`ViewMeta.recorded` attach
    it, and :meth:`ViewMeta.from_view` records any view as one
    ``as_strided`` with it. Where the op cannot be replayed (it is not
    registered in this process, e.g. after unpickling, or it fails on the
    new base), forward rebuilds the view as one ``as_strided`` relative to
    the new base's storage offset, and only on a base with the recorded
    sizes and strides, so that the reconstruction is the same view; any
    other base is refused with a message naming both layouts. A view without
    an inverse rule (``as_strided``, ``unfold``, custom view ops) inverts
    through the same geometry: an ``as_strided_scatter`` of the view's sizes,
    strides and offset into a contiguous copy of the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hopkit.functionalization._geometry import _is_alias_of
from hopkit.functionalization._protocol import ViewMetaLike

aten = torch.ops.aten
_AS_STRIDED = aten.as_strided.default


def _forward_from_geometry(
    meta: ViewMetaLike, base: torch.Tensor, cause: BaseException | None
) -> torch.Tensor:
    """The verified ``as_strided`` reconstruction of ``meta``'s view on ``base``."""
    g = meta.geometry
    if cause is not None:
        why = f"replaying {meta._short()} failed ({cause}), and the as_strided fallback"
    elif meta.op is None:
        why = f"{meta.op_name} is not available in this process, and the as_strided fallback"
    else:
        why = "a recorded as_strided view"
    if g is None:
        raise RuntimeError(
            f"hopkit: {why} needs a recorded geometry, which this ViewMeta lacks; "
            "record it with ViewMeta.recorded(base) or ViewMeta.from_view(base, view)."
        ) from cause
    if tuple(base.size()) != g.base_size or tuple(base.stride()) != g.base_stride:
        raise RuntimeError(
            f"hopkit: {why} replays only on a base with the layout it was recorded "
            f"on (sizes {list(g.base_size)}, strides {list(g.base_stride)}), but this "
            f"base has sizes {list(base.size())} and strides {list(base.stride())}. "
            "Replay on a base with the recorded layout (e.g. .contiguous() if the "
            "original was contiguous), or record the view with record_view_metas "
            "to replay it on any layout."
        ) from cause
    offset = base.storage_offset() + (g.storage_offset - g.base_storage_offset)
    return base.as_strided(g.size, g.stride, offset)


def _reverse_via_as_strided(
    m: ViewMetaLike, base: torch.Tensor, mv: torch.Tensor
) -> torch.Tensor:
    """as_strided and any view without a rule: scatter through the view's geometry."""
    return _reverse_through_view(m, base, mv, m._forward_or_fallback(base))


def _reverse_through_view(
    m: ViewMetaLike, base: torch.Tensor, mv: torch.Tensor, view: torch.Tensor
) -> torch.Tensor:
    """_reverse_via_as_strided, given ``view = m.forward(base)``."""
    if view.dtype != base.dtype or view.is_conj() != base.is_conj() or view.is_neg() != base.is_neg():
        raise ValueError(
            f"hopkit: cannot invert {m!r}: it changes dtype or conj/neg bits "
            f"({base.dtype} -> {view.dtype}) and hopkit has no inverse rule for it; "
            "express the view with view_as_real/view.dtype/_conj ViewMetas, which do."
        )
    if not _is_alias_of(view, base):
        raise ValueError(
            f"hopkit: cannot invert {m!r}: on this base it returned a tensor that does "
            "not share the base's storage, so there is no view to scatter into."
        )
    return _as_strided_scatter(m, base, mv, view.size(), view.stride(), view.storage_offset())


def _as_strided_scatter(
    m: ViewMetaLike,
    base: torch.Tensor,
    mv: torch.Tensor,
    size: Sequence[Any],
    stride: Sequence[Any],
    storage_offset: Any,
) -> torch.Tensor:
    # as_strided_scatter's storage_offset is read against a clone of base; eager
    # keeps base's storage layout in that clone, Inductor makes it contiguous.
    # Both agree only on a contiguous base at offset 0, so make one.
    if not base.is_contiguous():
        raise ValueError(
            f"hopkit: cannot invert {m!r} through as_strided: the base has sizes "
            f"{list(base.shape)} and strides {list(base.stride())}, which are not "
            "contiguous, so the view's strides do not map onto a fresh copy of it. "
            "Record the view on a contiguous base, or use view ops that have inverse rules."
        )
    offset = storage_offset - base.storage_offset()
    if base.storage_offset() != 0:
        base = base.clone(memory_format=torch.contiguous_format)
    return aten.as_strided_scatter.default(base, mv, list(size), list(stride), offset)
