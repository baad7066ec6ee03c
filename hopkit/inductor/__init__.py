"""hopkit.inductor: lower pointwise HOP bodies so they fuse with their neighbours.

Every Inductor lowering of a hopkit HOP lives in this package:
``hop_lowering`` (every BaseHOP: fuse or inline), ``fusion`` (the pointwise
fusion), ``effects_lowering`` (``hopkit_with_effects``), built on
``subgraph_lowering`` (``PointwiseSubgraphLowering``).

The public names below import Inductor on first use, so that hopkit can
register its lowerings (``hop_lowering``, ``effects_lowering``) while Inductor
itself is being imported, and ``import hopkit`` never imports Inductor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hopkit.inductor.fusion import lower_hop_pointwise as lower_hop_pointwise
    from hopkit.inductor.subgraph_lowering import InputDescriptor as InputDescriptor
    from hopkit.inductor.subgraph_lowering import LoweredPointwiseFn as LoweredPointwiseFn
    from hopkit.inductor.subgraph_lowering import (
        PointwiseSubgraphLowering as PointwiseSubgraphLowering,
    )
    from hopkit.inductor.subgraph_lowering import (
        SubgraphLoweringException as SubgraphLoweringException,
    )
    from hopkit.inductor.subgraph_lowering import (
        lower_pointwise_subgraph as lower_pointwise_subgraph,
    )

__all__ = [
    "InputDescriptor",
    "LoweredPointwiseFn",
    "PointwiseSubgraphLowering",
    "SubgraphLoweringException",
    "lower_hop_pointwise",
    "lower_pointwise_subgraph",
]

_HOMES = {
    "lower_hop_pointwise": "hopkit.inductor.fusion",
    "InputDescriptor": "hopkit.inductor.subgraph_lowering",
    "LoweredPointwiseFn": "hopkit.inductor.subgraph_lowering",
    "PointwiseSubgraphLowering": "hopkit.inductor.subgraph_lowering",
    "SubgraphLoweringException": "hopkit.inductor.subgraph_lowering",
    "lower_pointwise_subgraph": "hopkit.inductor.subgraph_lowering",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'hopkit.inductor' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
