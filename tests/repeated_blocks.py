"""The repeated block of the trace-reuse tests: N HOP calls of one layer.

Shared by tests/test_reuse.py and tests/test_inductor_shared_body.py (not a
test module: it defines no HOP, so importing it twice registers nothing).
"""

from __future__ import annotations

from typing import Any

import torch

import hopkit


def layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ w) * 0.5 + x


LAYER = hopkit.FunctionWithNoFreeVars(layer)


def model(hop: Any, x: torch.Tensor, *ws: torch.Tensor) -> torch.Tensor:
    """x through one call of ``hop`` on LAYER per weight."""
    for w in ws:
        x = hop(LAYER, x, w)
    return x


def reference(x: torch.Tensor, *ws: torch.Tensor) -> torch.Tensor:
    """The same without a HOP."""
    for w in ws:
        x = layer(x, w)
    return x
