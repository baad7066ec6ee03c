"""Bridge between hopkit's ViewMeta and torch's generated ``*_ViewMeta`` classes.

Torch's classes (``torch._C._functionalization.slice_Tensor_ViewMeta``) are
built from, and expose through ``as_tuple()``, the tuple
``base_ctor_arguments(func) + attributes(func)`` of the naming API in
:mod:`._naming`; this module uses that layout to convert both ways (e.g.
the sequences torch's functionalization keeps,
``torch._C._functionalization.get_view_meta_sequence(t)``). It implements
``ViewMeta.to_torch`` and ``ViewMeta.from_torch``; it sees the ViewMeta it
converts through :class:`._protocol.ViewMetaLike` and builds one by calling
the class it is given, so that it need not import the class.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch._ops import OpOverload

from hopkit.functionalization._naming import attributes, base_ctor_arguments, classname
from hopkit.functionalization._ops import _find_overload
from hopkit.functionalization._protocol import ViewMetaLike
from hopkit.functionalization._torchgen import FunctionSchema, parse_schema

_M = TypeVar("_M")

_F: Any = torch._C._functionalization  # no type stubs for the generated classes

# Hand-written (not generated) ViewMeta classes in torch, and what they become.
_UNSAFE_VIEW = "_unsafe_view_ViewMeta"  # replays as aten::view
_RESIZE = "resize__ViewMeta"  # a metadata mutation, not a view


def torch_schema(op: OpOverload) -> FunctionSchema:
    """The torchgen ``FunctionSchema`` of ``op`` (for the naming API)."""
    return parse_schema(str(op._schema))


def _layout(op: OpOverload) -> list[str]:
    func = torch_schema(op)
    return [b.name for b in base_ctor_arguments(func) + attributes(func)]


def to_torch(meta: ViewMetaLike, reapply_views: bool, inverse_return_mode: Any) -> Any:
    if meta.op is None:
        raise ValueError(
            f"hopkit: {meta!r} has no operator in this process, so it has no torch "
            "ViewMeta class; load the library that defines it first."
        )
    name = classname(torch_schema(meta.op))
    cls = getattr(_F, name, None)
    if cls is None:
        raise ValueError(
            f"hopkit: torch has no generated ViewMeta class {name} for {meta.op_name}: "
            "torch generates them only for non-composite view ops in "
            "native_functions.yaml (composite views such as chunk or narrow are "
            "recorded as the views they decompose into)."
        )
    if inverse_return_mode is None:
        inverse_return_mode = _F.InverseReturnMode.ViewOrScatterInverse
    values: dict[str, Any] = {
        "has_symbolic_inputs": _has_symbolic(meta.args) or _has_symbolic(meta.kwargs.values()),
        "out_index": meta.out_index,
        "reapply_views": reapply_views,
        "inverse_return_mode": inverse_return_mode,
    }
    params = [a for a in meta.op._schema.arguments[1:] if not a.kwarg_only]
    values.update(zip((p.name for p in params), meta.args))
    values.update(meta.kwargs)
    return cls(tuple(_to_torch_value(values[n]) for n in _layout(meta.op)))


def from_torch(cls: Callable[..., _M], torch_view_meta: object) -> _M:
    name = type(torch_view_meta).__name__
    if not isinstance(torch_view_meta, _F.ViewMeta):
        raise TypeError(
            "hopkit: ViewMeta.from_torch needs one of torch's "
            "torch._C._functionalization.*_ViewMeta objects (from "
            f"get_view_meta_sequence), but got {type(torch_view_meta).__name__}."
        )
    if name == _RESIZE:
        raise ValueError(
            "hopkit: resize__ViewMeta records a resize_ (a metadata mutation), not a "
            "view; it has no out-of-place view to replay."
        )
    values_tuple = torch_view_meta.as_tuple()
    if name == _UNSAFE_VIEW:
        # (has_symbolic_inputs, reapply_views, inverse_return_mode, size)
        return cls(torch.ops.aten.view.default, (tuple(values_tuple[-1]),))
    op = _op_for_classname(name)
    values = dict(zip(_layout(op), values_tuple))
    schema_args = op._schema.arguments[1:]
    args = [values[a.name] for a in schema_args if not a.kwarg_only]
    kwargs = {a.name: values[a.name] for a in schema_args if a.kwarg_only}
    out_index = values.get("out_index")
    if op._schema.is_mutable:
        base_name = op._schema.name.split("::", 1)[1]
        out_of_place = _find_overload(op.namespace, base_name.rstrip("_"), op)
        if out_of_place is None:
            raise ValueError(
                f"hopkit: {name} records the in-place view {op}, which has no "
                "out-of-place overload with the same arguments."
            )
        op = out_of_place
    return cls(op, args, kwargs, out_index)


@functools.cache
def _op_for_classname(name: str) -> OpOverload:
    """``slice_Tensor_ViewMeta`` -> ``torch.ops.aten.slice.Tensor``."""
    if not name.endswith("_ViewMeta"):
        raise ValueError(f"hopkit: {name} is not a ViewMeta class name.")
    unambiguous = name[: -len("_ViewMeta")]
    # unambiguous_name is "<name>_<overload>" or "<name>"; names may contain
    # underscores, so try the whole string first, then each split point.
    candidates = [(unambiguous, "default")]
    for i in range(len(unambiguous) - 1, 0, -1):
        if unambiguous[i] == "_":
            candidates.append((unambiguous[:i], unambiguous[i + 1 :]))
    for op_name, overload in candidates:
        if not overload:
            continue
        try:
            packet = getattr(torch.ops.aten, op_name)
        except (AttributeError, RuntimeError):
            continue
        if overload in packet.overloads():
            op = getattr(packet, overload)
            if classname(torch_schema(op)) == name:
                return op
    raise ValueError(f"hopkit: no aten operator has the ViewMeta class name {name}.")


def _has_symbolic(values: Any) -> bool:
    for v in values:
        if isinstance(v, torch.SymInt):
            return True
        if isinstance(v, (list, tuple)) and any(isinstance(e, torch.SymInt) for e in v):
            return True
    return False


def _to_torch_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
