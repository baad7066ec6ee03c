"""FX helpers that several families need, written once.

It imports nothing from hopkit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["fresh_attr_name", "graph_modules", "op_name"]


def fresh_attr_name(root: torch.nn.Module, prefix: str) -> str:
    """``prefix_0``, ``prefix_1``, ...: the first that ``root`` does not have yet."""
    i = 0
    while hasattr(root, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}"


def graph_modules(roots: Iterable[torch.nn.Module]) -> Iterator[torch.fx.GraphModule]:
    """Every GraphModule among ``roots`` and their submodules, each once."""
    seen: set[int] = set()
    for root in roots:
        for mod in root.modules():
            if isinstance(mod, torch.fx.GraphModule) and id(mod) not in seen:
                seen.add(id(mod))
                yield mod


def op_name(op: Any) -> str:
    """How hopkit names an operator in messages: ``mylib::log.default``, a
    HOP's own name, or the object's qualified name."""
    if isinstance(op, torch._ops.OpOverload):
        return f"{op._schema.name}.{op._overloadname}"
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op._qualified_op_name
    if isinstance(op, torch._ops.HigherOrderOperator):
        return op.__name__
    return getattr(op, "__qualname__", None) or type(op).__name__
