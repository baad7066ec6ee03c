"""Sequences of ViewMetas: replay a chain of views, and scatter a new value back.

A list of ViewMetas relates a view to its base the way torch's
functionalization does (``torch._C._functionalization.*_ViewMeta``)::

    apply_view_meta_sequence(base, metas)      # base -> view
    scatter_into_base(base, metas, new_view)   # base with the view replaced

Holds those two functions and the check of their ``metas`` argument.
``apply_view_meta_sequence`` replays plain eager chains as one as_strided
(NOTE [Geometry cache for eager replay] in _replay_cache.py);
``scatter_into_base`` is the piece BaseHOP needs for mutation through a view
of an operand (``x[0].mul_(2)`` inside a subgraph), NOTE [Mutation through a
view of an operand], which lives here.

NOTE [Mutation through a view of an operand]
    Inside a HOP the subgraph runs functionally and produces ``new_view``, the
    value the view ``v = metas(x)`` of operand ``x`` should hold after the
    subgraph. The caller then sees the mutation with::

        new_x = scatter_into_base(x, metas, new_view)   # functional
        x.copy_(new_x)                                   # the one write-back

    ``metas`` come from :func:`record_view_metas` (view ops, replayable on any
    base) or :meth:`ViewMeta.from_view` (one as_strided, replayable on bases
    with the recorded layout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hopkit.functionalization._checks import _a, _not_a_tensor, _view_value_error
from hopkit.functionalization._replay_cache import _geometry_replay_ok, _replay_geometry
from hopkit.functionalization._view_meta import ViewMeta

__all__ = ["apply_view_meta_sequence", "scatter_into_base"]


def apply_view_meta_sequence(base: torch.Tensor, metas: Sequence[ViewMeta]) -> torch.Tensor:
    """Replay ``metas`` on ``base``: ``metas[-1].forward(...metas[0].forward(base))``.

    Like ``torch._C._functionalization.apply_view_meta_sequence(base, seq)``;
    the result is a view of ``base``. A ViewMeta with a recorded geometry
    falls back to a verified ``as_strided`` reconstruction where its op
    cannot be replayed. On plain eager tensors the chain is replayed as one
    ``as_strided`` (NOTE [Geometry cache for eager replay]).
    """
    if type(metas) is not list and type(metas) is not tuple:
        _check_metas(metas, "apply_view_meta_sequence")
    if metas and _geometry_replay_ok(base):
        # The elements are checked only if one lacks a ViewMeta's attributes:
        # this path is the benchmarked one, it runs outside every mode and
        # autograd, and it computes nothing but geometry, so an element found
        # wrong midway leaves nothing behind.
        try:
            out = _replay_geometry(base, metas)
        except AttributeError:
            _check_metas(metas, "apply_view_meta_sequence")
            raise
        if out is not None:
            return out
    _check_metas(metas, "apply_view_meta_sequence")  # before anything is traced
    if not isinstance(base, torch.Tensor):
        raise _not_a_tensor("apply_view_meta_sequence", "base", base)
    for meta in metas:
        base = meta._forward_or_fallback(base)
    return base


def scatter_into_base(
    base: torch.Tensor, metas: Sequence[ViewMeta], new_view_value: torch.Tensor
) -> torch.Tensor:
    """``base`` with the view ``apply_view_meta_sequence(base, metas)`` replaced.

    Returns a new tensor (``base`` is not written; it may alias
    ``new_view_value`` when every view in the chain is bijective). This is
    the functional form of ``apply_view_meta_sequence(base, metas).copy_(v)``;
    see NOTE [Mutation through a view of an operand] for how BaseHOP uses it.
    ``new_view_value`` must have exactly the view's shape and dtype (unlike
    ``copy_``, nothing is broadcast or cast).
    """
    _check_metas(metas, "scatter_into_base")
    if not isinstance(base, torch.Tensor):
        raise _not_a_tensor("scatter_into_base", "base", base)
    if not isinstance(new_view_value, torch.Tensor):
        raise _not_a_tensor("scatter_into_base", "new_view_value", new_view_value)
    chain = [base]  # chain[i + 1] = metas[i].forward(chain[i])
    for meta in metas:
        chain.append(meta._forward_or_fallback(chain[-1]))
    view = chain[-1]
    if new_view_value.shape != view.shape or new_view_value.dtype != view.dtype:
        raise _view_value_error(
            "scatter_into_base",
            "new_view_value",
            new_view_value,
            view.shape,
            view.dtype,
            "the view apply_view_meta_sequence(base, metas) returns",
        )
    # Checked once here: each inverse rule returns a value shaped like its
    # base, which is the view the next one up the chain inverts.
    value = new_view_value
    for i in range(len(metas) - 1, -1, -1):
        value = metas[i]._reverse_checked(chain[i], value, chain[i + 1])
    return value


def _check_metas(metas: object, where: str) -> None:
    """Refuse anything but a sequence of ViewMetas, naming the offending element."""
    if isinstance(metas, (str, bytes)) or not isinstance(metas, Sequence):
        got = type(metas).__name__
        fix = (
            "wrap a single ViewMeta in a list: [meta]"
            if isinstance(metas, ViewMeta)
            else "pass a list, e.g. list(metas)"
        )
        raise TypeError(
            f"hopkit: {where} needs metas to be a sequence (list or tuple) of ViewMetas, "
            f"but got {_a(got)}; {fix}."
        )
    for i, meta in enumerate(metas):
        if isinstance(meta, ViewMeta):
            continue
        cls = type(meta)
        if cls.__module__ == "torch._C._functionalization":
            got = f"torch's {cls.__module__}.{cls.__name__}"
            fix = "convert torch's ViewMetas with ViewMeta.from_torch(m)"
        else:
            got = _a(cls.__name__)
            fix = "build each with ViewMeta(op, args) or record them with record_view_metas"
        raise TypeError(
            f"hopkit: {where} needs metas to be hopkit ViewMetas, but metas[{i}] is {got}; "
            f"{fix}."
        )
