"""hopkit.inductor: lower pointwise HOP bodies so they fuse with their neighbours.

Importing this package imports Inductor; ``import hopkit`` does not.
"""

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
