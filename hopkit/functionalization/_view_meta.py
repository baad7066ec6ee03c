"""ViewMeta: one view op, replayable on a new base and invertible.

A :class:`ViewMeta` is one view operation with its arguments::

    m = ViewMeta(torch.ops.aten.slice.Tensor, args=(0, 1, 3))
    m.forward(base)            == base[1:3]                      # a real view
    m.reverse(base, new_view)  == base.slice_scatter(new_view, 0, 1, 3)  # a new base

This module holds the class: construction, ``forward``/``reverse``, the
conversions to and from torch's generated classes, value semantics and the
pickle reconstructor. Its rules live in the modules below it, each cited
where the class uses it: the argument checks (_checks.py), the Tensor
method each op replays with (NOTE [Tensor methods for replay] in
_tensor_methods.py), the inverse rule of each op (_inverse_rules.py), the
verified as_strided fallback (NOTE [Verified as_strided fallback] in
_as_strided.py), the geometry caches (NOTE [Geometry cache for eager
replay] and NOTE [View sizes for reverse's check] in _replay_cache.py),
pickling (_pickle.py) and torch-class conversion (_torch_classes.py).
Sequences of ViewMetas (:func:`apply_view_meta_sequence`,
:func:`scatter_into_base`) are in _sequences.py, recording
(:func:`record_view_metas`) in _record.py.

Everything here is plain torch ops on whatever tensors it is given, so it
traces under ``make_fx``, FakeTensorMode and functionalization.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch._ops import OpOverload

from hopkit.functionalization import _torch_classes
from hopkit.functionalization._as_strided import (
    _AS_STRIDED,
    _forward_from_geometry,
    _reverse_through_view,
    _reverse_via_as_strided,
)
from hopkit.functionalization._checks import (
    _bind,
    _check_geometry,
    _check_is_view_of,
    _check_out_index,
    _check_out_index_in_range,
    _check_view_op,
    _not_a_tensor,
    _out_index_error,
    _view_value_error,
)
# Pickles written before ViewGeometry moved to _geometry.py name it
# hopkit.functionalization._view_meta.ViewGeometry; this import keeps that resolving.
from hopkit.functionalization._geometry import ViewGeometry
from hopkit.functionalization._inverse_rules import _REVERSE_RULES
from hopkit.functionalization._ops import _is_multi_output, _op_repr, _qualified_name
from hopkit.functionalization._pickle import _pickle_state, _rebuild
from hopkit.functionalization._replay_cache import (
    _cached_view_size,
    _remember_view_size,
    _takes_geometry_cache,
)
from hopkit.functionalization._tensor_methods import _TENSOR_METHODS

__all__ = ["ViewMeta"]

aten = torch.ops.aten


class ViewMeta:
    """One view operation, replayable on a new base and invertible.

    Args:
        op: a view ``OpOverload`` (its schema aliases ``self`` to the output
            without writing to it), e.g. ``torch.ops.aten.slice.Tensor``.
        args: the op's arguments after ``self``.
        kwargs: its keyword arguments (keyword-only ones such as expand's
            ``implicit``, or any argument by name).
        out_index: for a view with several outputs (``split``, ``unbind``,
            ``chunk``, ...), which output this ViewMeta stands for; ``None``
            for a single-output view.
        geometry: optionally the :class:`ViewGeometry` the view had when it
            was recorded. With it, replay falls back to a verified
            ``as_strided`` reconstruction where the op cannot be replayed
            (the op is not loaded, or it fails on the new base).

    ``forward(base)`` returns ``op(base, *args, **kwargs)[out_index]``, a view
    sharing ``base``'s storage. ``reverse(base, mutated_view)`` returns a new
    tensor shaped like ``base`` that holds ``mutated_view`` where the view
    was, through the view's inverse (``slice_scatter``, ``select_scatter``,
    transpose back, ...); ``base`` is never written. ``mutated_view`` must
    have exactly the shape and dtype of ``forward(base)`` (unlike ``copy_``,
    reverse neither broadcasts nor casts). For bijective views (transpose,
    permute, view, unsqueeze, ...) the result may alias ``mutated_view``
    (torch's ``InverseReturnMode.AlwaysView``).

    ``out_index`` is checked against the number of outputs when the
    arguments fix it (``split_with_sizes``, ``tensor_split``, ...), else
    when ``forward`` runs on a base (``split``, ``chunk``, ``unbind``).

    ViewMetas compare by value, hash (when their args are hashable) and
    pickle (the op by qualified name and overload).
    """

    __slots__ = (
        "op",
        "op_name",
        "args",
        "kwargs",
        "out_index",
        "geometry",
        "_call_kwargs",
        "_call",
        "_multi",
        "_reverse",
        "_geometry_cache",
        "_view_sizes",
    )

    op: OpOverload | None
    op_name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out_index: int | None
    geometry: ViewGeometry | None

    def __init__(
        self,
        op: OpOverload,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        out_index: int | None = None,
        *,
        geometry: ViewGeometry | None = None,
    ) -> None:
        schema = _check_view_op(op)
        multi = _is_multi_output(schema)
        _check_out_index(op, multi, out_index)
        pos, kw, call_kw = _bind(op, schema, args, kwargs or {})
        if out_index is not None:  # a multi-output view (checked above)
            _check_out_index_in_range(op, schema, pos, out_index)
        self.op = op
        self.op_name = _qualified_name(op)
        self.args = pos
        self.kwargs = kw
        self.out_index = out_index
        self.geometry = _check_geometry(geometry)
        self._call_kwargs = call_kw
        # NOTE [Tensor methods for replay]: the Tensor method reaches the same
        # aten overload as the OpOverload, through the faster unboxed binding.
        self._call: Callable[..., Any] = (
            op if call_kw else _TENSOR_METHODS.get(op, op)
        )
        self._multi = multi
        self._reverse = _REVERSE_RULES.get(op, _reverse_via_as_strided)
        # NOTE [Geometry cache for eager replay], NOTE [View sizes for reverse's check]
        caches = _takes_geometry_cache(op, pos, kw)
        self._geometry_cache: dict[Any, Any] | None = {} if caches else None
        self._view_sizes: dict[Any, torch.Size] | None = {} if caches else None

    # -- construction from recorded views ----------------------------------

    @classmethod
    def from_view(cls, base: torch.Tensor, view: torch.Tensor) -> ViewMeta:
        """Record ``view`` of ``base`` as one ``as_strided`` ViewMeta.

        Works for any view (no need to know the ops that made it), but the
        result replays only on bases with ``base``'s sizes and strides; use
        :func:`record_view_metas` for a sequence of real view ops instead.
        """
        _check_is_view_of(base, view, "ViewMeta.from_view")
        meta = cls(
            aten.as_strided.default,
            (tuple(view.size()), tuple(view.stride()), view.storage_offset()),
            geometry=ViewGeometry.of(base, view),
        )
        return meta

    def recorded(self, base: torch.Tensor) -> ViewMeta:
        """A copy of this ViewMeta carrying the geometry it has on ``base``."""
        view = self.forward(base)
        out = self._copy()
        out.geometry = ViewGeometry.of(base, view)
        return out

    @classmethod
    def from_torch(cls, torch_view_meta: object) -> ViewMeta:
        """Convert one of torch's ``torch._C._functionalization.*_ViewMeta``.

        In-place view classes (``transpose__ViewMeta``) become their
        out-of-place op; ``_unsafe_view`` becomes ``view``.
        """
        return _torch_classes.from_torch(cls, torch_view_meta)

    def to_torch(self, *, reapply_views: bool = True, inverse_return_mode: Any = None) -> Any:
        """Torch's generated ViewMeta object for this view (aten view ops only).

        ``inverse_return_mode`` defaults to
        ``torch._C._functionalization.InverseReturnMode.ViewOrScatterInverse``.
        """
        return _torch_classes.to_torch(self, reapply_views, inverse_return_mode)

    # -- replay --------------------------------------------------------------

    @property
    def is_multi_output(self) -> bool:
        return self._multi

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        """Re-apply the view to ``base``; the result shares ``base``'s storage.

        An ``as_strided`` ViewMeta that carries a recorded geometry (from
        :meth:`from_view` or :func:`record_view_metas`) replays relative to
        ``base`` and only on a base with the recorded sizes and strides,
        rather than at the absolute storage offset it was recorded with.
        """
        if self.op is None or (self.geometry is not None and self.op is _AS_STRIDED):
            return _forward_from_geometry(self, base, None)
        out = self._call(base, *self.args, **self._call_kwargs)
        if self._multi:
            try:
                return out[self.out_index]
            except IndexError:
                raise _out_index_error(self, len(out), base) from None
        return out

    def reverse(self, base: torch.Tensor, mutated_view: torch.Tensor) -> torch.Tensor:
        """A new tensor like ``base`` with ``mutated_view`` written where the view is.

        ``mutated_view`` is the view's new value: it must have the shape and
        dtype of ``forward(base)``. Unlike ``forward(base).copy_(value)``,
        reverse neither broadcasts nor casts, so expand and ``.to()`` a
        value first; any other value is refused before anything is computed.
        """
        if not isinstance(base, torch.Tensor):
            raise _not_a_tensor(f"{self!r}.reverse", "base", base)
        if not isinstance(mutated_view, torch.Tensor):
            raise _not_a_tensor(f"{self!r}.reverse", "mutated_view", mutated_view)
        # The view's shape and dtype: NOTE [View sizes for reverse's check].
        view: torch.Tensor | None = None
        size: Any = _cached_view_size(self, base)
        if size is not None:
            dtype = base.dtype  # _GEOMETRY_ONLY_OPS keep the dtype
        else:
            view = self._forward_or_fallback(base)
            size, dtype = view.shape, view.dtype
            _remember_view_size(self, base, size)
        if mutated_view.shape != size or mutated_view.dtype != dtype:
            raise _view_value_error(
                f"{self!r}.reverse",
                "mutated_view",
                mutated_view,
                size,
                dtype,
                "the view forward(base) returns",
            )
        return self._reverse_checked(base, mutated_view, view)

    def _reverse_checked(
        self, base: torch.Tensor, mutated_view: torch.Tensor, view: torch.Tensor | None
    ) -> torch.Tensor:
        """reverse, once ``mutated_view`` is known to match the view (``view``, if computed)."""
        if view is not None and self._reverse is _reverse_via_as_strided:
            return _reverse_through_view(self, base, mutated_view, view)
        return self._reverse(self, base, mutated_view)

    def _forward_or_fallback(self, base: torch.Tensor) -> torch.Tensor:
        if self.geometry is None:
            return self.forward(base)
        try:
            return self.forward(base)
        except (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError) as e:
            return _forward_from_geometry(self, base, e)

    # -- value semantics -----------------------------------------------------

    def _key(self) -> tuple[Any, ...]:
        return (
            self.op_name,
            _freeze(self.args),
            _freeze(tuple(sorted(self.kwargs.items()))),
            self.out_index,
            self.geometry,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ViewMeta):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _short(self) -> str:
        return self.op_name.removeprefix("aten::")

    def __repr__(self) -> str:
        parts = [self.op_name if self.op is None else _op_repr(self.op)]
        parts.append(f"args={self.args!r}")
        if self.kwargs:
            parts.append(f"kwargs={self.kwargs!r}")
        if self.out_index is not None:
            parts.append(f"out_index={self.out_index}")
        if self.geometry is not None:
            parts.append("geometry=...")
        return f"ViewMeta({', '.join(parts)})"

    def __reduce__(self) -> tuple[Callable[..., ViewMeta], tuple[Any, ...]]:
        return (_unpickle_view_meta, _pickle_state(self))

    def _copy(self) -> ViewMeta:
        out = ViewMeta.__new__(ViewMeta)
        for slot in ViewMeta.__slots__:
            setattr(out, slot, getattr(self, slot))
        out._geometry_cache = None if self._geometry_cache is None else {}
        out._view_sizes = None if self._view_sizes is None else {}
        return out

    @classmethod
    def _unresolved(
        cls,
        op_name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        out_index: int | None,
        geometry: ViewGeometry,
    ) -> ViewMeta:
        """A ViewMeta of an operator this process lacks (unpickled, see _pickle.py).

        It replays only through the verified as_strided fallback.
        """
        meta = cls.__new__(cls)
        meta.op = None
        meta.op_name = op_name
        meta.args = tuple(args)
        meta.kwargs = dict(kwargs)
        meta.out_index = out_index
        meta.geometry = geometry
        meta._call_kwargs = {}
        # Never called: forward() takes the fallback itself when op is None.
        meta._call = functools.partial(_forward_from_geometry, meta)
        meta._multi = out_index is not None
        meta._reverse = _reverse_via_as_strided
        meta._geometry_cache = None
        meta._view_sizes = None
        return meta


def _unpickle_view_meta(
    op_name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out_index: int | None,
    geometry: ViewGeometry | None,
) -> ViewMeta:
    # pickle's reconstructor of ViewMeta: every pickled ViewMeta names it
    # (hopkit.functionalization._view_meta._unpickle_view_meta), so it stays here.
    return _rebuild(
        ViewMeta, ViewMeta._unresolved, op_name, args, kwargs, out_index, geometry
    )


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    return value
