"""ViewMetaLike: the part of a ViewMeta that the modules below the class use.

The ViewMeta class (_view_meta.py) is assembled from the tables of the
modules below it: its constructor picks its inverse rule (_inverse_rules.py),
its Tensor method (_tensor_methods.py) and its replay caches
(_replay_cache.py), and its methods call the as_strided fallback
(_as_strided.py), the pickling helpers (_pickle.py) and the torch-class
conversion (_torch_classes.py). So that imports flow one way, those modules
do not import the class; they take their ``meta`` argument as this protocol,
which ViewMeta satisfies (mypy checks every use).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch._ops import OpOverload

from hopkit.functionalization._geometry import ViewGeometry

__all__ = ["ViewMetaLike"]


class ViewMetaLike(Protocol):
    """A :class:`hopkit.functionalization.ViewMeta`, as its rule modules see it."""

    op: OpOverload | None
    op_name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out_index: int | None
    geometry: ViewGeometry | None
    # NOTE [Geometry cache for eager replay], NOTE [View sizes for reverse's check]
    _geometry_cache: dict[Any, Any] | None
    _view_sizes: dict[Any, torch.Size] | None

    def forward(self, base: torch.Tensor) -> torch.Tensor: ...

    def _forward_or_fallback(self, base: torch.Tensor) -> torch.Tensor: ...

    def _short(self) -> str: ...
