"""Pickling ViewMetas: by the operator's qualified name, not by the OpOverload.

Holds what ``ViewMeta.__reduce__`` and its reconstructor
(``_view_meta._unpickle_view_meta``, whose name every pickle holds) do: a
ViewMeta pickles as ``(op_name, args, kwargs, out_index, geometry)``, and is
refused if its arguments are symbolic. Unpickling resolves ``op_name`` in the
loading process; where that operator is not registered there, a ViewMeta
that carries a geometry still replays through the verified as_strided
fallback (NOTE [Verified as_strided fallback] in _as_strided.py), and one
without is refused with the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from hopkit.functionalization._geometry import ViewGeometry
from hopkit.functionalization._ops import _resolve_op
from hopkit.functionalization._protocol import ViewMetaLike

_M = TypeVar("_M")

_PickleState = tuple[str, tuple[Any, ...], dict[str, Any], int | None, ViewGeometry | None]


def _pickle_state(meta: ViewMetaLike) -> _PickleState:
    """What ``meta`` pickles as; refuses symbolic arguments."""
    for value in (*meta.args, *meta.kwargs.values()):
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) or (
            isinstance(value, (list, tuple)) and any(isinstance(v, torch.SymInt) for v in value)
        ):
            raise TypeError(
                f"hopkit: cannot pickle {meta!r}: its arguments contain symbolic "
                "values; pickle ViewMetas recorded on concrete shapes."
            )
    return (meta.op_name, meta.args, meta.kwargs, meta.out_index, meta.geometry)


def _rebuild(
    make: Callable[..., _M],
    make_unresolved: Callable[..., _M],
    op_name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out_index: int | None,
    geometry: ViewGeometry | None,
) -> _M:
    """The ViewMeta a pickle holds: ``make(op, ...)``, or ``make_unresolved`` for an unknown op."""
    op = _resolve_op(op_name)
    if op is not None:
        return make(op, args, kwargs, out_index, geometry=geometry)
    if geometry is None:
        raise RuntimeError(
            f"hopkit: cannot unpickle a ViewMeta of {op_name}: that operator is not "
            "registered in this process. Import or load the library that defines it "
            "(torch.ops.load_library / import the module) before unpickling, or "
            "pickle ViewMetas recorded with a geometry (ViewMeta.recorded(base))."
        )
    # Unresolved op: replays only through the verified as_strided fallback.
    return make_unresolved(op_name, args, kwargs, out_index, geometry)
