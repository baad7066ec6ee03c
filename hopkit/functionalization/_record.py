"""record_view_metas: the view ops by which a function views its input.

Holds :func:`record_view_metas` and the dispatch mode it records with.
``fn`` runs once on a meta-device stand-in for ``base`` (same sizes,
strides, storage offset, dtype and conj/neg bits) under a dispatch mode that
follows every tensor derived from the stand-in by view ops. Running on a
stand-in with the caller's modes switched off means recording works the same
in eager, under FakeTensorMode, make_fx and (torch.func.)functionalize, and
leaves nothing in an enclosing trace. Composite views (``chunk``,
``narrow``, indexing) reach the mode as the primitive views they decompose
into, as in torch's own functionalization. Each ViewMeta carries the geometry
its view had (NOTE [Verified as_strided fallback] in _as_strided.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from hopkit.functionalization._geometry import ViewGeometry
from hopkit.functionalization._view_meta import ViewMeta

__all__ = ["record_view_metas"]


class _ViewRecorder(TorchDispatchMode):
    """Follows views of ``root``: ``chains[id(t)] = (t, metas from root to t)``."""

    def __init__(self, root: torch.Tensor) -> None:
        super().__init__()
        self.chains: dict[int, tuple[torch.Tensor, list[ViewMeta]]] = {id(root): (root, [])}
        self.mutation: str | None = None
        self.failure: Exception | None = None

    def _chain(self, t: object) -> list[ViewMeta] | None:
        entry = self.chains.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        for arg, value in zip(schema.arguments, args):
            written = arg.alias_info is not None and arg.alias_info.is_write
            if written and self._chain(value) is not None and self.mutation is None:
                self.mutation = str(func)
        chain = self._chain(args[0]) if args else None
        self_alias = schema.arguments[0].alias_info if schema.arguments else None
        if chain is None or self_alias is None or schema.is_mutable:
            return out
        multi = isinstance(out, (list, tuple))
        outs = list(out) if multi else [out]
        for i, view in enumerate(outs):
            try:
                meta = ViewMeta(func, args[1:], kwargs, i if multi else None)
            except (TypeError, ValueError) as e:
                self.failure = self.failure or e
                continue
            meta.geometry = ViewGeometry.of(args[0], view)
            self.chains[id(view)] = (view, [*chain, meta])
        return out


def _stand_in(base: torch.Tensor) -> torch.Tensor:
    size, stride, offset = base.size(), base.stride(), base.storage_offset()
    span = offset + 1
    for s, st in zip(size, stride):
        span = span + (s - 1) * st
    if any(s == 0 for s in size):
        span = offset
    storage = torch.empty(span, dtype=base.dtype, device="meta")
    t = storage.as_strided(size, stride, offset)
    if base.is_conj():
        t = t._conj()
    if base.is_neg():
        t = t._neg_view()
    return t


def record_view_metas(
    base: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]
) -> list[ViewMeta]:
    """The view ops by which ``fn(base)`` views ``base``, as ViewMetas.

    ``record_view_metas(x, lambda t: t[0].t())`` gives
    ``[ViewMeta(aten.select.int, (0, 0)), ViewMeta(aten.t.default, ())]``.
    ``fn`` runs once on a meta-device stand-in with ``base``'s layout and
    must pick its views from shapes only; it works the same in eager and
    under fake tensors, make_fx and functionalization, and adds nothing to an
    enclosing trace. Composite views (``chunk``, ``narrow``, indexing) are
    recorded as the primitive views they decompose into. Each ViewMeta
    carries the geometry it had, so replay can fall back to a verified
    as_strided.
    """
    if not isinstance(base, torch.Tensor):
        raise TypeError(
            f"hopkit: record_view_metas needs a Tensor base, but got {type(base).__name__}."
        )
    # Switch off whatever transforms the caller runs under: Python modes
    # (fake, proxy, FunctionalTensorMode), functorch's layers
    # (torch.func.functionalize, vmap, grad) and C++ functionalization.
    functionalize = torch._C.DispatchKeySet(torch._C.DispatchKey.Functionalize)
    with (
        _disable_current_modes(),
        torch._C._DisableFuncTorch(),
        torch._C._ExcludeDispatchKeyGuard(functionalize),
    ):
        with torch.no_grad():
            root = _stand_in(base)
        recorder = _ViewRecorder(root)
        with recorder:
            try:
                out = fn(root)
            except RuntimeError as e:
                raise RuntimeError(
                    "hopkit: record_view_metas runs fn on a meta-device stand-in for the "
                    f"base, and fn failed there: {e}. fn must pick its views from shapes "
                    "only (no reads of tensor values)."
                ) from e
    if recorder.mutation is not None:
        raise ValueError(
            f"hopkit: record_view_metas: fn mutated its argument (with {recorder.mutation}); "
            "it must only take views (record the view first, then mutate through "
            "scatter_into_base)."
        )
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            "hopkit: record_view_metas: fn must return a view of its argument, but it "
            f"returned {type(out).__name__}."
        )
    chain = recorder._chain(out)
    if chain is None:
        detail = f" ({recorder.failure})" if recorder.failure is not None else ""
        raise ValueError(
            "hopkit: record_view_metas: fn returned a tensor that is not a view of its "
            "argument (it was computed, not viewed); use view ops only (slicing, "
            f"select, transpose, view, ...){detail}."
        )
    return chain
