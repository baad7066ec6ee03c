"""Argument checks and error messages of ViewMeta.

Holds every check that ``ViewMeta(op, args, kwargs, out_index, geometry=...)``
and its entry points run on their input, with the messages they raise:
the op must be an out-of-place view that cannot return a copy, the
arguments must bind to its schema, ``out_index`` must pick an existing
output, a value written through a view must have the view's exact shape and
dtype. Each check runs at the entry point, before anything is computed or
traced, and its message says what was expected, what was given and the fix;
the messages are pinned in tests/test_functionalization.py (TestErrors).

The check of a *sequence* of ViewMetas needs the class and lives with the
sequence functions (_sequences.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch._ops import OpOverload, OpOverloadPacket

from hopkit.functionalization._geometry import ViewGeometry, _is_alias_of
from hopkit.functionalization._ops import _find_overload, _op_repr, _qualified_name
from hopkit.functionalization._protocol import ViewMetaLike

aten = torch.ops.aten

# Ops whose schema says "may alias self" but that return a copy when they
# cannot view; a ViewMeta promises a real view, so these are refused.
_MAY_COPY = {
    "reshape": "torch.ops.aten.view.default",
    "reshape_as": "torch.ops.aten.view.default",
    "flatten": "torch.ops.aten.view.default",
    "ravel": "torch.ops.aten.view.default",
    "contiguous": None,
    "to": None,
    "resolve_conj": None,
    "resolve_neg": None,
    "pin_memory": None,
    "coalesce": None,
    "_autocast_to_reduced_precision": None,
    "_autocast_to_full_precision": None,
}


def _check_view_op(op: object) -> torch._C.FunctionSchema:
    if isinstance(op, OpOverloadPacket):
        overloads = ", ".join(f"{op}.{o}" for o in op.overloads())
        raise TypeError(
            f"hopkit: ViewMeta needs an OpOverload, but got the overload packet {op}; "
            f"pick one of its overloads: {overloads}."
        )
    if not isinstance(op, OpOverload):
        raise TypeError(
            "hopkit: ViewMeta needs a view OpOverload such as "
            f"torch.ops.aten.slice.Tensor, but got {op!r} of type {type(op).__name__}."
        )
    schema = op._schema
    name = _qualified_name(op)
    args = schema.arguments
    self_alias = args[0].alias_info if args else None
    if self_alias is not None and self_alias.is_write or schema.is_mutable:
        raise ValueError(
            f"hopkit: {name} is an in-place op (its schema `{schema}` writes to an "
            "argument); ViewMeta replays out-of-place views. "
            f"{_out_of_place_hint(op)}"
        )
    returns_alias = any(r.alias_info is not None for r in schema.returns) or (
        self_alias is not None and "*" in self_alias.after_set
    )
    if self_alias is None or not returns_alias or not args[0].type.isSubtypeOf(
        torch._C.TensorType.get()
    ):
        raise ValueError(
            f"hopkit: {name} is not a view op: its schema `{schema}` has no alias "
            "annotation tying the output to `Tensor(a) self`, so its output does not "
            f"share storage with its input. {_view_hint(op)}"
        )
    base_name = schema.name.split("::", 1)[1]
    if op.namespace == "aten" and base_name in _MAY_COPY:
        instead = _MAY_COPY[base_name]
        fix = f"pass {instead} instead" if instead else "pass the view op it would call"
        raise ValueError(
            f"hopkit: {name} may return a copy instead of a view, so it cannot be "
            f"replayed as a view; {fix}, or record the view with "
            "ViewMeta.from_view(base, view)."
        )
    return schema


def _out_of_place_hint(op: OpOverload) -> str:
    name = op._schema.name.split("::", 1)[1]
    candidate = _find_overload(op.namespace, name.rstrip("_"), op)
    if candidate is not None:
        return f"Pass torch.ops.{_op_repr(candidate)} instead."
    return "Pass the out-of-place view op instead."


def _view_hint(op: OpOverload) -> str:
    name = op._schema.name.split("::", 1)[1]
    if name.endswith("_copy"):
        candidate = _find_overload(op.namespace, name[: -len("_copy")], op)
        if candidate is not None:
            return (
                f"It is the copying variant of a view; pass torch.ops.{_op_repr(candidate)}."
            )
    return "Pass a view op such as torch.ops.aten.slice.Tensor."


def _check_out_index(op: OpOverload, multi: bool, out_index: object) -> None:
    name = _qualified_name(op)
    if multi:
        if out_index is None:
            raise ValueError(
                f"hopkit: {name} returns several views; pass out_index=i to pick "
                "which output this ViewMeta stands for."
            )
        if type(out_index) is not int or out_index < 0:
            raise TypeError(
                f"hopkit: out_index must be a non-negative int, but got {out_index!r} "
                f"for {name}."
            )
    elif out_index is not None:
        raise ValueError(
            f"hopkit: {name} returns a single view, but out_index={out_index!r} was "
            "given; leave out_index=None."
        )


# Multi-output views whose number of outputs follows from their arguments
# (``args`` after self); for the others (split.Tensor, chunk, unbind,
# tensor_split by a tensor) it depends on the base, so out_index is checked
# when forward runs.
_OUTPUT_COUNTS: dict[OpOverload, Callable[[tuple[Any, ...]], Any]] = {
    aten.split.default: lambda args: len(args[0]),
    aten.split.sizes: lambda args: len(args[0]),
    aten.split_with_sizes.default: lambda args: len(args[0]),
    aten.tensor_split.sections: lambda args: args[0],
    aten.tensor_split.indices: lambda args: len(args[0]) + 1,
    aten.hsplit.int: lambda args: args[0],
    aten.vsplit.int: lambda args: args[0],
    aten.dsplit.int: lambda args: args[0],
    aten.hsplit.array: lambda args: len(args[0]) + 1,
    aten.vsplit.array: lambda args: len(args[0]) + 1,
    aten.dsplit.array: lambda args: len(args[0]) + 1,
}


def _check_out_index_in_range(
    op: OpOverload, schema: torch._C.FunctionSchema, args: tuple[Any, ...], out_index: int
) -> None:
    if len(schema.returns) > 1:
        count: Any = len(schema.returns)
    else:
        rule = _OUTPUT_COUNTS.get(op)
        count = rule(args) if rule is not None else None
    if type(count) is int and out_index >= count:  # not a SymInt: no guard
        raise IndexError(
            _out_index_message(
                _qualified_name(op),
                args,
                out_index,
                count,
                "",
                "pass out_index",
                "no out_index is valid for these arguments",
            )
        )


def _out_index_error(meta: ViewMetaLike, count: int, base: torch.Tensor) -> IndexError:
    return IndexError(
        _out_index_message(
            meta.op_name,
            meta.args,
            meta.out_index,
            count,
            f" on a base of shape {list(base.shape)}",
            "replay it on a base where that output exists, or pass out_index",
            "replay it on a base where that output exists",
        )
    )


def _out_index_message(
    name: str,
    args: tuple[Any, ...],
    out_index: object,
    count: int,
    on: str,
    fix: str,
    fix_if_none: str,
) -> str:
    fix = f"{fix} between 0 and {count - 1}" if count > 0 else fix_if_none
    views = "view" if count == 1 else "views"
    return (
        f"hopkit: out_index must be in range({count}) for {name} with args {args!r}"
        f"{on}, which returns {count} {views}, but out_index={out_index!r} was given; "
        f"{fix}."
    )


def _view_value_error(
    where: str, name: str, value: torch.Tensor, size: Sequence[Any], dtype: torch.dtype, of: str
) -> ValueError:
    return ValueError(
        f"hopkit: {where} needs {name} with the shape and dtype of {of}, "
        f"{list(size)} and {dtype}, but {name} has shape {list(value.shape)} and dtype "
        f"{value.dtype}; pass a value of exactly that shape and dtype (unlike copy_, "
        "it is neither broadcast nor cast: expand it and .to() it first)."
    )


def _not_a_tensor(where: str, name: str, value: object) -> TypeError:
    if name == "base":
        what, fix = "a Tensor", "pass the tensor the view is taken of"
    else:
        what, fix = "a Tensor with the view's shape", "wrap scalars with torch.full_like(view, value)"
    return TypeError(
        f"hopkit: {where} needs {name} to be {what}, but got {type(value).__name__}; {fix}."
    )


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _bind(
    op: OpOverload,
    schema: torch._C.FunctionSchema,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
    """Normalize to (all positional args, all keyword-only args, kwargs to call with)."""
    name = _qualified_name(op)
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TypeError(
            f"hopkit: ViewMeta args must be a tuple of {name}'s arguments after self, "
            f"but got {type(args).__name__}; write args=({args!r},) for one argument."
        )
    params = schema.arguments[1:]
    positional = [p for p in params if not p.kwarg_only]
    names = [p.name for p in params]
    if len(args) > len(positional):
        raise TypeError(
            f"hopkit: {name} takes {len(positional)} positional arguments after self "
            f"({', '.join(p.name for p in positional) or 'none'}), but ViewMeta got "
            f"{len(args)}: {tuple(args)!r}."
        )
    values: dict[str, Any] = {p.name: v for p, v in zip(positional, args)}
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(
                f"hopkit: {name} has no argument {key!r}; its arguments after self are "
                f"{', '.join(names) or 'none'}."
            )
        if key in values:
            raise TypeError(f"hopkit: {name} got argument {key!r} both in args and in kwargs.")
        values[key] = value
    call_kwargs: dict[str, Any] = {}
    for p in params:
        if p.name not in values:
            if not p.has_default_value():
                raise TypeError(
                    f"hopkit: {name} needs argument {p.name!r} (schema `{schema}`), "
                    "but ViewMeta did not get it."
                )
            values[p.name] = p.default_value
        elif p.kwarg_only:
            call_kwargs[p.name] = values[p.name]
        values[p.name] = _normalize(values[p.name])
        if p.name in call_kwargs:
            call_kwargs[p.name] = values[p.name]
    pos = tuple(values[p.name] for p in positional)
    kw = {p.name: values[p.name] for p in params if p.kwarg_only}
    return pos, kw, call_kwargs


def _normalize(value: Any) -> Any:
    if isinstance(value, (list, torch.Size)):
        return tuple(value)
    return value


def _check_geometry(geometry: object) -> ViewGeometry | None:
    if geometry is None or isinstance(geometry, ViewGeometry):
        return geometry
    raise TypeError(
        "hopkit: ViewMeta geometry must be a hopkit.functionalization.ViewGeometry "
        f"or None, but got {type(geometry).__name__}; build one with "
        "ViewGeometry.of(base, view)."
    )


def _check_is_view_of(base: object, view: object, where: str) -> None:
    if not isinstance(base, torch.Tensor) or not isinstance(view, torch.Tensor):
        raise TypeError(
            f"hopkit: {where} needs two Tensors (base, view), but got "
            f"({type(base).__name__}, {type(view).__name__})."
        )
    if view.dtype != base.dtype:
        raise ValueError(
            f"hopkit: {where}: the view has dtype {view.dtype} but the base has "
            f"{base.dtype}; as_strided cannot change dtype. Record the dtype view "
            "with ViewMeta(torch.ops.aten.view.dtype, (dtype,)) and the rest from it."
        )
    if not _is_alias_of(view, base):
        raise ValueError(
            f"hopkit: {where}: the view does not share storage with the base, so it "
            "is not a view of it; pass the tensor it was viewed from as base."
        )
