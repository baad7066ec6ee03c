"""The Tensor method that replays each view op: ViewMeta.forward's fast call.

Holds ``_TENSOR_METHODS``, the view ops whose ``torch.Tensor`` method
dispatches to exactly that overload (NOTE [Tensor methods for replay], which
lives here); ``ViewMeta.__init__`` picks its call from it.

Imports nothing from hopkit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._ops import OpOverload

aten = torch.ops.aten

# NOTE [Tensor methods for replay]
#     ``torch.ops.aten.select.int(t, 0, 1)`` goes through the boxed
#     OpOverload call path; ``torch.Tensor.select(t, 0, 1)`` reaches the same
#     aten overload through the generated unboxed binding, about twice as
#     fast. Only methods that dispatch to exactly the overload (a test checks
#     each under a dispatch mode) are listed; a tensor subclass or
#     torch-function mode sees the method call, as it would in user code.
_TENSOR_METHODS: dict[OpOverload, Callable[..., Any]] = {
    aten.select.int: torch.Tensor.select,
    aten.transpose.int: torch.Tensor.transpose,
    aten.t.default: torch.Tensor.t,
    aten.permute.default: torch.Tensor.permute,
    aten.unsqueeze.default: torch.Tensor.unsqueeze,
    aten.squeeze.default: torch.Tensor.squeeze,
    aten.squeeze.dim: torch.Tensor.squeeze,
    aten.squeeze.dims: torch.Tensor.squeeze,
    aten.view.default: torch.Tensor.view,
    aten.expand.default: torch.Tensor.expand,
    aten.diagonal.default: torch.Tensor.diagonal,
    aten.as_strided.default: torch.Tensor.as_strided,
    aten.unbind.int: torch.Tensor.unbind,
    aten.unfold.default: torch.Tensor.unfold,
    aten.split_with_sizes.default: torch.Tensor.split_with_sizes,
}
