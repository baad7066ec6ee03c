"""ViewMeta: record a view, replay it on a new base, and scatter a new value back.

A :class:`ViewMeta` is one view operation with its arguments::

    m = ViewMeta(torch.ops.aten.slice.Tensor, args=(0, 1, 3))
    m.forward(base)            == base[1:3]                      # a real view
    m.reverse(base, new_view)  == base.slice_scatter(new_view, 0, 1, 3)  # a new base

and a list of them relates a view to its base the way torch's
functionalization does (``torch._C._functionalization.*_ViewMeta``)::

    apply_view_meta_sequence(base, metas)      # base -> view
    scatter_into_base(base, metas, new_view)   # base with the view replaced

``scatter_into_base`` is the piece BaseHOP needs for mutation through a view
of an operand (``x[0].mul_(2)`` inside a subgraph): see NOTE [Mutation through
a view of an operand].

Everything here is plain torch ops on whatever tensors it is given, so it
traces under ``make_fx``, FakeTensorMode and functionalization.

NOTE [Mutation through a view of an operand]
    Inside a HOP the subgraph runs functionally and produces ``new_view``, the
    value the view ``v = metas(x)`` of operand ``x`` should hold after the
    subgraph. The caller then sees the mutation with::

        new_x = scatter_into_base(x, metas, new_view)   # functional
        x.copy_(new_x)                                   # the one write-back

    ``metas`` come from :func:`record_view_metas` (view ops, replayable on any
    base) or :meth:`ViewMeta.from_view` (one as_strided, replayable on bases
    with the recorded layout).

NOTE [View sizes for reverse's check]
    ``reverse(base, mutated_view)`` refuses a ``mutated_view`` that is not
    shaped like ``forward(base)`` before computing anything, so it needs the
    view's shape. For the ops of _GEOMETRY_ONLY_OPS that shape is a function
    of the base's sizes and strides (and the arguments), so each ViewMeta
    remembers it per (sizes, strides) of plain tensors, learned from the one
    ``forward`` the first call runs; later calls compare sizes and run no op
    (nor trace one). Other views, and bases with symbolic sizes, run
    ``forward`` for it. ``scatter_into_base`` computes the chain's views
    anyway and checks its one value against the last.

NOTE [Geometry cache for eager replay]
    Replaying five views op by op costs five trips through the dispatcher.
    For a plain dense tensor outside any mode, a view is pure metadata: its
    sizes, strides and storage offset are a function of the base's. So
    :func:`apply_view_meta_sequence` remembers, per ViewMeta, the output
    geometry for each input geometry it has seen (learned by running the real
    op once) and replays the whole chain as one ``as_strided`` call. The
    result is the same tensor (same storage, dtype, geometry and ``_base``).
    Only ops whose output geometry depends on nothing but the input geometry
    and the arguments take part (_GEOMETRY_ONLY_OPS); tensor subclasses,
    functional/fake tensors, active dispatch or torch-function modes, and
    inputs that require grad (autograd would record AsStridedBackward instead
    of the views' own backward) take the op-by-op path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch._ops import OpOverload, OpOverloadPacket

__all__ = [
    "ViewGeometry",
    "ViewMeta",
    "apply_view_meta_sequence",
    "record_view_metas",
    "scatter_into_base",
]

aten = torch.ops.aten
_AS_STRIDED = aten.as_strided.default
IntLike = int | torch.SymInt


def _is_alias_of(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share storage (works for fake and meta tensors)."""
    return bool(torch._C._is_alias_of(a, b))  # type: ignore[attr-defined]


class ViewGeometry(NamedTuple):
    """Sizes, strides and storage offsets of a base and of a view of it."""

    base_size: tuple[IntLike, ...]
    base_stride: tuple[IntLike, ...]
    base_storage_offset: IntLike
    size: tuple[IntLike, ...]
    stride: tuple[IntLike, ...]
    storage_offset: IntLike

    @staticmethod
    def of(base: torch.Tensor, view: torch.Tensor) -> ViewGeometry:
        return ViewGeometry(
            tuple(base.size()),
            tuple(base.stride()),
            base.storage_offset(),
            tuple(view.size()),
            tuple(view.stride()),
            view.storage_offset(),
        )


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
        self._geometry_cache: dict[Any, Any] | None = (
            {} if op in _GEOMETRY_ONLY_OPS and not _has_tensor(pos, kw) else None
        )
        self._view_sizes: dict[Any, torch.Size] | None = (
            None if self._geometry_cache is None else {}
        )

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
        from hopkit.functionalization import _torch_classes

        return _torch_classes.from_torch(cls, torch_view_meta)

    def to_torch(self, *, reapply_views: bool = True, inverse_return_mode: Any = None) -> Any:
        """Torch's generated ViewMeta object for this view (aten view ops only).

        ``inverse_return_mode`` defaults to
        ``torch._C._functionalization.InverseReturnMode.ViewOrScatterInverse``.
        """
        from hopkit.functionalization import _torch_classes

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
            return self._forward_from_geometry(base, None)
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
        size: Any = None
        sizes = self._view_sizes
        if sizes is not None and type(base) is _Tensor:
            try:
                size = sizes.get((base.shape, base.stride()))
            except (TypeError, RuntimeError):  # SymInt sizes (unhashable), no strides
                pass
        if size is not None:
            dtype = base.dtype  # _GEOMETRY_ONLY_OPS keep the dtype
        else:
            view = self._forward_or_fallback(base)
            size, dtype = view.shape, view.dtype
            if sizes is not None and _geometry_replay_ok(base):
                if len(sizes) >= _GEOMETRY_CACHE_LIMIT:
                    sizes.clear()
                sizes[(base.shape, base.stride())] = size
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
            return self._forward_from_geometry(base, e)

    def _forward_from_geometry(
        self, base: torch.Tensor, cause: BaseException | None
    ) -> torch.Tensor:
        """The verified ``as_strided`` reconstruction of this view on ``base``."""
        g = self.geometry
        if cause is not None:
            why = f"replaying {self._short()} failed ({cause}), and the as_strided fallback"
        elif self.op is None:
            why = f"{self.op_name} is not available in this process, and the as_strided fallback"
        else:
            why = "a recorded as_strided view"
        if g is None:
            raise RuntimeError(
                f"hopkit: {why} needs a recorded geometry, which this ViewMeta lacks; "
                "record it with ViewMeta.recorded(base) or ViewMeta.from_view(base, view)."
            ) from cause
        if tuple(base.size()) != g.base_size or tuple(base.stride()) != g.base_stride:
            raise RuntimeError(
                f"hopkit: {why} replays only on a base with the layout it was recorded "
                f"on (sizes {list(g.base_size)}, strides {list(g.base_stride)}), but this "
                f"base has sizes {list(base.size())} and strides {list(base.stride())}. "
                "Replay on a base with the recorded layout (e.g. .contiguous() if the "
                "original was contiguous), or record the view with record_view_metas "
                "to replay it on any layout."
            ) from cause
        offset = base.storage_offset() + (g.storage_offset - g.base_storage_offset)
        return base.as_strided(g.size, g.stride, offset)

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
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) or (
                isinstance(value, (list, tuple)) and any(isinstance(v, torch.SymInt) for v in value)
            ):
                raise TypeError(
                    f"hopkit: cannot pickle {self!r}: its arguments contain symbolic "
                    "values; pickle ViewMetas recorded on concrete shapes."
                )
        return (
            _unpickle_view_meta,
            (self.op_name, self.args, self.kwargs, self.out_index, self.geometry),
        )

    def _copy(self) -> ViewMeta:
        out = ViewMeta.__new__(ViewMeta)
        for slot in ViewMeta.__slots__:
            setattr(out, slot, getattr(self, slot))
        out._geometry_cache = None if self._geometry_cache is None else {}
        out._view_sizes = None if self._view_sizes is None else {}
        return out


# ---------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------


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
    from hopkit.functionalization._record import record_view_metas as record

    return record(base, fn)


# ---------------------------------------------------------------------------
# Reverse rules: (meta, base, mutated_view) -> new base
# ---------------------------------------------------------------------------

_ReverseRule = Callable[[ViewMeta, torch.Tensor, torch.Tensor], torch.Tensor]


def _reverse_slice(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    dim, start, end, step = m.args
    return aten.slice_scatter.default(base, mv, dim, start, end, step)


def _reverse_narrow(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    dim, start, length = m.args
    if start < 0:
        start = start + base.size(dim)
    return aten.slice_scatter.default(base, mv, dim, start, start + length, 1)


def _reverse_select(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    dim, index = m.args
    return aten.select_scatter.default(base, mv, dim, index)


def _reverse_diagonal(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    offset, dim1, dim2 = m.args
    return aten.diagonal_scatter.default(base, mv, offset, dim1, dim2)


def _reverse_transpose(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    dim0, dim1 = m.args
    return aten.transpose.int(mv, dim0, dim1)


def _reverse_t(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    return aten.t.default(mv)


def _reverse_permute(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    (dims,) = m.args
    n = len(dims)
    inverse = [0] * n
    for i, d in enumerate(dims):
        inverse[d % n if n else 0] = i
    return aten.permute.default(mv, inverse)


def _reverse_movedim(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    source, destination = m.args
    return torch.movedim(mv, destination, source)


def _reverse_unsqueeze(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    (dim,) = m.args
    return aten.squeeze.dim(mv, dim)


def _reverse_to_base_shape(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    # squeeze, view, unflatten, _reshape_alias: same elements in base's shape.
    return mv.reshape(base.shape)


def _reverse_view_dtype(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    return aten.view.dtype(mv, base.dtype)


def _reverse_expand(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    # As torch's expand_inverse (ViewOrScatterInverse): every broadcast copy's
    # change is added to the element it copies.
    if mv.shape == base.shape:
        return mv  # nothing was broadcast: the view is the base
    return base + (mv - base).sum_to_size(base.shape)


def _reverse_identity(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    # alias, detach, lift_fresh: the view is the base.
    return mv


def _reverse_conj(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    return torch.conj(mv)


def _reverse_neg_view(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    return aten._neg_view.default(mv)


def _reverse_view_as_real(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(mv.contiguous())


def _reverse_view_as_complex(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(mv)


def _reverse_split(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    split_size, dim = m.args
    assert m.out_index is not None  # checked in __init__ for multi-output ops
    start = m.out_index * split_size
    return aten.slice_scatter.default(base, mv, dim, start, start + mv.size(dim), 1)


def _reverse_split_with_sizes(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    sizes, dim = m.args
    assert m.out_index is not None
    start = sum(sizes[: m.out_index])
    end = start + sizes[m.out_index]
    return aten.slice_scatter.default(base, mv, dim, start, end, 1)


def _reverse_chunk(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    chunks, dim = m.args
    assert m.out_index is not None
    split_size = (base.size(dim) + chunks - 1) // chunks
    start = m.out_index * split_size
    return aten.slice_scatter.default(base, mv, dim, start, start + mv.size(dim), 1)


def _reverse_unbind(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    (dim,) = m.args
    return aten.select_scatter.default(base, mv, dim, m.out_index)


def _reverse_via_as_strided(m: ViewMeta, base: torch.Tensor, mv: torch.Tensor) -> torch.Tensor:
    """as_strided and any view without a rule: scatter through the view's geometry."""
    return _reverse_through_view(m, base, mv, m._forward_or_fallback(base))


def _reverse_through_view(
    m: ViewMeta, base: torch.Tensor, mv: torch.Tensor, view: torch.Tensor
) -> torch.Tensor:
    """_reverse_via_as_strided, given ``view = m.forward(base)``."""
    if view.dtype != base.dtype or view.is_conj() != base.is_conj() or view.is_neg() != base.is_neg():
        raise ValueError(
            f"hopkit: cannot invert {m!r}: it changes dtype or conj/neg bits "
            f"({base.dtype} -> {view.dtype}) and hopkit has no inverse rule for it; "
            "express the view with view_as_real/view.dtype/_conj ViewMetas, which do."
        )
    if not _is_alias_of(view, base):
        raise ValueError(
            f"hopkit: cannot invert {m!r}: on this base it returned a tensor that does "
            "not share the base's storage, so there is no view to scatter into."
        )
    return _as_strided_scatter(m, base, mv, view.size(), view.stride(), view.storage_offset())


def _as_strided_scatter(
    m: ViewMeta,
    base: torch.Tensor,
    mv: torch.Tensor,
    size: Sequence[Any],
    stride: Sequence[Any],
    storage_offset: Any,
) -> torch.Tensor:
    # as_strided_scatter's storage_offset is read against a clone of base; eager
    # keeps base's storage layout in that clone, Inductor makes it contiguous.
    # Both agree only on a contiguous base at offset 0, so make one.
    if not base.is_contiguous():
        raise ValueError(
            f"hopkit: cannot invert {m!r} through as_strided: the base has sizes "
            f"{list(base.shape)} and strides {list(base.stride())}, which are not "
            "contiguous, so the view's strides do not map onto a fresh copy of it. "
            "Record the view on a contiguous base, or use view ops that have inverse rules."
        )
    offset = storage_offset - base.storage_offset()
    if base.storage_offset() != 0:
        base = base.clone(memory_format=torch.contiguous_format)
    return aten.as_strided_scatter.default(base, mv, list(size), list(stride), offset)


_REVERSE_RULES: dict[OpOverload, _ReverseRule] = {
    aten.slice.Tensor: _reverse_slice,
    aten.narrow.default: _reverse_narrow,
    aten.select.int: _reverse_select,
    aten.diagonal.default: _reverse_diagonal,
    aten.as_strided.default: _reverse_via_as_strided,
    aten.transpose.int: _reverse_transpose,
    aten.swapaxes.default: _reverse_transpose,
    aten.swapdims.default: _reverse_transpose,
    aten.t.default: _reverse_t,
    aten.permute.default: _reverse_permute,
    aten.movedim.int: _reverse_movedim,
    aten.movedim.intlist: _reverse_movedim,
    aten.moveaxis.int: _reverse_movedim,
    aten.moveaxis.intlist: _reverse_movedim,
    aten.unsqueeze.default: _reverse_unsqueeze,
    aten.squeeze.default: _reverse_to_base_shape,
    aten.squeeze.dim: _reverse_to_base_shape,
    aten.squeeze.dims: _reverse_to_base_shape,
    aten.view.default: _reverse_to_base_shape,
    aten._reshape_alias.default: _reverse_to_base_shape,
    aten.unflatten.int: _reverse_to_base_shape,
    aten.view.dtype: _reverse_view_dtype,
    aten.expand.default: _reverse_expand,
    aten.alias.default: _reverse_identity,
    aten.detach.default: _reverse_identity,
    aten.lift_fresh.default: _reverse_identity,
    aten._conj.default: _reverse_conj,
    aten._neg_view.default: _reverse_neg_view,
    aten.view_as_real.default: _reverse_view_as_real,
    aten.view_as_complex.default: _reverse_view_as_complex,
    aten.split.Tensor: _reverse_split,
    aten.split_with_sizes.default: _reverse_split_with_sizes,
    aten.chunk.default: _reverse_chunk,
    aten.unbind.int: _reverse_unbind,
}

# Views whose output geometry is a function of the input geometry and the
# arguments only (same dtype, same conj/neg bits): NOTE [Geometry cache for
# eager replay].
_GEOMETRY_ONLY_OPS: frozenset[OpOverload] = frozenset(
    {
        aten.slice.Tensor,
        aten.narrow.default,
        aten.select.int,
        aten.diagonal.default,
        aten.as_strided.default,
        aten.transpose.int,
        aten.swapaxes.default,
        aten.swapdims.default,
        aten.t.default,
        aten.permute.default,
        aten.movedim.int,
        aten.movedim.intlist,
        aten.moveaxis.int,
        aten.moveaxis.intlist,
        aten.unsqueeze.default,
        aten.squeeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.view.default,
        aten._reshape_alias.default,
        aten.unflatten.int,
        aten.expand.default,
        aten.alias.default,
        aten.split.Tensor,
        aten.split_with_sizes.default,
        aten.chunk.default,
        aten.unbind.int,
        aten.unfold.default,
        aten.diagonal.default,
    }
)


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


# ---------------------------------------------------------------------------
# NOTE [Geometry cache for eager replay]: implementation
# ---------------------------------------------------------------------------

_GEOMETRY_CACHE_LIMIT = 256
_len_dispatch_stack = torch._C._len_torch_dispatch_stack
_torch_function_mode_on = torch._C._is_torch_function_mode_enabled
_is_functional = torch._is_functional_tensor
_grad_enabled = torch.is_grad_enabled
_strided = torch.strided
_Tensor = torch.Tensor


def _geometry_replay_ok(base: torch.Tensor) -> bool:
    return (
        type(base) is _Tensor
        and base.layout is _strided
        and not (base.requires_grad and _grad_enabled())
        and not _len_dispatch_stack()
        and not _torch_function_mode_on()
        and not _is_functional(base)
        and not base.is_quantized
        and (base.is_cpu or base.is_cuda)
    )


def _replay_geometry(base: torch.Tensor, metas: Sequence[ViewMeta]) -> torch.Tensor | None:
    geometry: Any = (base.size(), base.stride(), base.storage_offset())
    for meta in metas:
        cache = meta._geometry_cache
        if cache is None:
            return None
        out = cache.get(geometry)
        if out is None:
            view = meta.forward(base.as_strided(*geometry))
            out = (view.size(), view.stride(), view.storage_offset())
            if len(cache) >= _GEOMETRY_CACHE_LIMIT:
                cache.clear()
            cache[geometry] = out
        geometry = out
    return base.as_strided(*geometry)


# ---------------------------------------------------------------------------
# Checks and helpers
# ---------------------------------------------------------------------------


def _op_repr(op: OpOverload) -> str:
    return f"{op.namespace}.{op._schema.name.split('::', 1)[1]}.{op._overloadname}"


def _qualified_name(op: OpOverload) -> str:
    # "aten::slice.Tensor"; the default overload is spelled ".default".
    return f"{op._schema.name}.{op._overloadname}"


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


def _out_index_error(meta: ViewMeta, count: int, base: torch.Tensor) -> IndexError:
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


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    return value


def _has_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) for v in (*args, *kwargs.values()))


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


def _resolve_op(op_name: str) -> OpOverload | None:
    """``"aten::slice.Tensor"`` -> ``torch.ops.aten.slice.Tensor`` (None if unknown)."""
    qualified, _, overload = op_name.rpartition(".")
    namespace, _, name = qualified.partition("::")
    try:
        op = getattr(getattr(getattr(torch.ops, namespace), name), overload)
    except (AttributeError, RuntimeError):
        return None
    return op if isinstance(op, OpOverload) else None


def _unpickle_view_meta(
    op_name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out_index: int | None,
    geometry: ViewGeometry | None,
) -> ViewMeta:
    op = _resolve_op(op_name)
    if op is not None:
        return ViewMeta(op, args, kwargs, out_index, geometry=geometry)
    if geometry is None:
        raise RuntimeError(
            f"hopkit: cannot unpickle a ViewMeta of {op_name}: that operator is not "
            "registered in this process. Import or load the library that defines it "
            "(torch.ops.load_library / import the module) before unpickling, or "
            "pickle ViewMetas recorded with a geometry (ViewMeta.recorded(base))."
        )
    # Unresolved op: replays only through the verified as_strided fallback.
    meta = ViewMeta.__new__(ViewMeta)
    meta.op = None
    meta.op_name = op_name
    meta.args = tuple(args)
    meta.kwargs = dict(kwargs)
    meta.out_index = out_index
    meta.geometry = geometry
    meta._call_kwargs = {}
    meta._call = meta._forward_from_geometry
    meta._multi = out_index is not None
    meta._reverse = _reverse_via_as_strided
    meta._geometry_cache = None
    meta._view_sizes = None
    return meta
