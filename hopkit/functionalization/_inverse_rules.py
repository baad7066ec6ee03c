"""Inverse rules: how ``ViewMeta.reverse`` writes a view's new value into its base.

Holds ``_REVERSE_RULES``, one rule per view op, each ``(meta, base,
mutated_view) -> new base``: the ``*_scatter`` op for views that pick
elements (slice, select, diagonal, split, ...), the inverse view for
bijective ones (transpose, permute, unsqueeze, view, ...), which may alias
``mutated_view`` as torch's ``InverseReturnMode.AlwaysView`` does, and
torch's ``expand_inverse`` for expand. A view op without a rule inverts
through its geometry (NOTE [Verified as_strided fallback] in _as_strided.py).
A rule runs once ``mutated_view`` is known to have the view's exact shape and
dtype (``ViewMeta.reverse`` and ``scatter_into_base`` check it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch._ops import OpOverload

from hopkit.functionalization._as_strided import _reverse_via_as_strided
from hopkit.functionalization._protocol import ViewMetaLike

aten = torch.ops.aten

_ReverseRule = Callable[[ViewMetaLike, Tensor, Tensor], Tensor]


def _reverse_slice(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    dim, start, end, step = m.args
    return aten.slice_scatter.default(base, mv, dim, start, end, step)


def _reverse_narrow(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    dim, start, length = m.args
    if start < 0:
        start = start + base.size(dim)
    return aten.slice_scatter.default(base, mv, dim, start, start + length, 1)


def _reverse_select(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    dim, index = m.args
    return aten.select_scatter.default(base, mv, dim, index)


def _reverse_diagonal(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    offset, dim1, dim2 = m.args
    return aten.diagonal_scatter.default(base, mv, offset, dim1, dim2)


def _reverse_transpose(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    dim0, dim1 = m.args
    return aten.transpose.int(mv, dim0, dim1)


def _reverse_t(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    return aten.t.default(mv)


def _reverse_permute(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    (dims,) = m.args
    n = len(dims)
    inverse = [0] * n
    for i, d in enumerate(dims):
        inverse[d % n if n else 0] = i
    return aten.permute.default(mv, inverse)


def _reverse_movedim(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    source, destination = m.args
    return torch.movedim(mv, destination, source)


def _reverse_unsqueeze(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    (dim,) = m.args
    return aten.squeeze.dim(mv, dim)


def _reverse_to_base_shape(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    # squeeze, view, unflatten, _reshape_alias: same elements in base's shape.
    return mv.reshape(base.shape)


def _reverse_view_dtype(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    return aten.view.dtype(mv, base.dtype)


def _reverse_expand(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    # As torch's expand_inverse (ViewOrScatterInverse): every broadcast copy's
    # change is added to the element it copies.
    if mv.shape == base.shape:
        return mv  # nothing was broadcast: the view is the base
    return base + (mv - base).sum_to_size(base.shape)


def _reverse_identity(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    # alias, detach, lift_fresh: the view is the base.
    return mv


def _reverse_conj(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    return torch.conj(mv)


def _reverse_neg_view(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    return aten._neg_view.default(mv)


def _reverse_view_as_real(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    return torch.view_as_complex(mv.contiguous())


def _reverse_view_as_complex(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    return torch.view_as_real(mv)


def _reverse_split(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    split_size, dim = m.args
    assert m.out_index is not None  # checked in __init__ for multi-output ops
    start = m.out_index * split_size
    return aten.slice_scatter.default(base, mv, dim, start, start + mv.size(dim), 1)


def _reverse_split_with_sizes(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    sizes, dim = m.args
    assert m.out_index is not None
    start = sum(sizes[: m.out_index])
    end = start + sizes[m.out_index]
    return aten.slice_scatter.default(base, mv, dim, start, end, 1)


def _reverse_chunk(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    chunks, dim = m.args
    assert m.out_index is not None
    split_size = (base.size(dim) + chunks - 1) // chunks
    start = m.out_index * split_size
    return aten.slice_scatter.default(base, mv, dim, start, start + mv.size(dim), 1)


def _reverse_unbind(m: ViewMetaLike, base: Tensor, mv: Tensor) -> Tensor:
    (dim,) = m.args
    return aten.select_scatter.default(base, mv, dim, m.out_index)


_REVERSE_RULES: dict[OpOverload, _ReverseRule] = {
    aten.slice.Tensor: _reverse_slice,
    aten.narrow.default: _reverse_narrow,
    aten.select.int: _reverse_select,
    aten.diagonal.default: _reverse_diagonal,
    aten.as_strided.default: _reverse_via_as_strided,
    aten.transpose.int: _reverse_transpose,
    aten.swapaxes.default: _reverse_transpose,
    aten.swapdims.default: _reverse_transpose,
    aten.t.default: _reverse_t,
    aten.permute.default: _reverse_permute,
    aten.movedim.int: _reverse_movedim,
    aten.movedim.intlist: _reverse_movedim,
    aten.moveaxis.int: _reverse_movedim,
    aten.moveaxis.intlist: _reverse_movedim,
    aten.unsqueeze.default: _reverse_unsqueeze,
    aten.squeeze.default: _reverse_to_base_shape,
    aten.squeeze.dim: _reverse_to_base_shape,
    aten.squeeze.dims: _reverse_to_base_shape,
    aten.view.default: _reverse_to_base_shape,
    aten._reshape_alias.default: _reverse_to_base_shape,
    aten.unflatten.int: _reverse_to_base_shape,
    aten.view.dtype: _reverse_view_dtype,
    aten.expand.default: _reverse_expand,
    aten.alias.default: _reverse_identity,
    aten.detach.default: _reverse_identity,
    aten.lift_fresh.default: _reverse_identity,
    aten._conj.default: _reverse_conj,
    aten._neg_view.default: _reverse_neg_view,
    aten.view_as_real.default: _reverse_view_as_real,
    aten.view_as_complex.default: _reverse_view_as_complex,
    aten.split.Tensor: _reverse_split,
    aten.split_with_sizes.default: _reverse_split_with_sizes,
    aten.chunk.default: _reverse_chunk,
    aten.unbind.int: _reverse_unbind,
}
