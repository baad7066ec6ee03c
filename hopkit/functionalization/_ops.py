"""Naming and finding operator overloads.

Holds the small facts about an ``OpOverload`` that ViewMeta and its checks
need: its qualified name (``"aten::slice.Tensor"``, what a ViewMeta is keyed
and pickled by) and its repr (``aten.slice.Tensor``), the overload a
qualified name resolves to in this process, the overload of another name
taking the same arguments (in-place view -> out-of-place view, ``_copy``
variant -> view), and whether a schema returns several tensors.

Imports nothing from hopkit.
"""

from __future__ import annotations

import torch
from torch._ops import OpOverload


def _op_repr(op: OpOverload) -> str:
    return f"{op.namespace}.{op._schema.name.split('::', 1)[1]}.{op._overloadname}"


def _qualified_name(op: OpOverload) -> str:
    # "aten::slice.Tensor"; the default overload is spelled ".default".
    return f"{op._schema.name}.{op._overloadname}"


def _resolve_op(op_name: str) -> OpOverload | None:
    """``"aten::slice.Tensor"`` -> ``torch.ops.aten.slice.Tensor`` (None if unknown)."""
    qualified, _, overload = op_name.rpartition(".")
    namespace, _, name = qualified.partition("::")
    try:
        op = getattr(getattr(getattr(torch.ops, namespace), name), overload)
    except (AttributeError, RuntimeError):
        return None
    return op if isinstance(op, OpOverload) else None


def _find_overload(namespace: str, name: str, like: OpOverload) -> OpOverload | None:
    """The overload of ``namespace::name`` taking the same arguments as ``like``."""
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None
    want = [a.name for a in like._schema.arguments]
    for overload in packet.overloads():
        candidate = getattr(packet, overload)
        if [a.name for a in candidate._schema.arguments] == want:
            return candidate
    return None


def _is_multi_output(schema: torch._C.FunctionSchema) -> bool:
    if len(schema.returns) != 1:
        return len(schema.returns) > 1
    return isinstance(schema.returns[0].type, torch._C.ListType)
