"""ViewGeometry: where a view sits in its base's storage.

Holds :class:`ViewGeometry` (the sizes, strides and storage offsets of a
base and of a view of it, public as ``hopkit.functionalization.ViewGeometry``)
and the storage-alias test. A ViewMeta may carry the geometry its view had
when it was recorded, from which replay falls back to a verified
``as_strided`` (NOTE [Verified as_strided fallback] in _as_strided.py).

Imports nothing from hopkit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["IntLike", "ViewGeometry"]

IntLike = int | torch.SymInt


def _is_alias_of(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share storage (works for fake and meta tensors)."""
    return bool(torch._C._is_alias_of(a, b))  # type: ignore[attr-defined]


class ViewGeometry(NamedTuple):
    """Sizes, strides and storage offsets of a base and of a view of it."""

    base_size: tuple[IntLike, ...]
    base_stride: tuple[IntLike, ...]
    base_storage_offset: IntLike
    size: tuple[IntLike, ...]
    stride: tuple[IntLike, ...]
    storage_offset: IntLike

    @staticmethod
    def of(base: torch.Tensor, view: torch.Tensor) -> ViewGeometry:
        return ViewGeometry(
            tuple(base.size()),
            tuple(base.stride()),
            base.storage_offset(),
            tuple(view.size()),
            tuple(view.stride()),
            view.storage_offset(),
        )
