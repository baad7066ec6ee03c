"""hopkit.functionalization against its oracles.

* The naming/binding API against torchgen's own ``api/functionalization.py``
  for every view group of ``native_functions.yaml``, and against torch's
  generated ``torch._C._functionalization.*_ViewMeta`` classes.
* ViewMeta.forward against the eager view op, ViewMeta.reverse /
  scatter_into_base against eager mutation through the view (and torch's
  functionalization for ``expand``, which eager cannot write through),
  apply_view_meta_sequence against torch's, property-based over shapes and
  arguments.
* Pickling, the as_strided fallback, tracing (make_fx, fake, functionalize),
  the eager geometry cache, and every user-facing error message.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from expecttest import TestCase
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import hopkit.functionalization as hf
from hopkit.functionalization import (
    ViewGeometry,
    ViewMeta,
    apply_view_meta_sequence,
    record_view_metas,
    scatter_into_base,
)
from hopkit.functionalization import _naming, _torch_classes
from hopkit.functionalization._torchgen import load_native_functions

aten = torch.ops.aten
F: Any = torch._C._functionalization
HYPOTHESIS = settings(max_examples=60, deadline=None, derandomize=True)


# ---------------------------------------------------------------------------
# Naming API vs torchgen (the oracle)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def view_groups() -> list[Any]:
    return hf.view_groups()


@pytest.fixture(scope="module")
def oracle() -> Iterator[Any]:
    from torchgen import local
    from torchgen.api import functionalization

    # The codegen runs these under a per-function context; view ops have no
    # mutable tensors, so the defaults below are what it would set.
    with local.parametrize(
        use_const_ref_for_mutable_tensors=False, use_ilistref_for_tensor_lists=False
    ):
        yield functionalization


def _functions(groups: list[Any]) -> Iterator[Any]:
    for g in groups:
        for f in (g.view, g.view_inplace, g.view_copy):
            if f is not None:
                yield f


def _as_rows(bindings: Sequence[Any]) -> list[tuple[str, str, str | None]]:
    return [(b.name, b.type, b.default) for b in bindings]


def test_view_groups_match_torchgen(view_groups: list[Any]) -> None:
    from torchgen.gen import get_grouped_by_view_native_functions
    from torchgen.model import NativeFunctionsViewGroup

    fs = load_native_functions()
    expected = [
        g for g in get_grouped_by_view_native_functions(fs) if isinstance(g, NativeFunctionsViewGroup)
    ]
    assert view_groups == expected
    assert len(view_groups) > 80


def test_classname_is_multi_output_returns_type(view_groups: list[Any], oracle: Any) -> None:
    for f in _functions(view_groups):
        func = f.func
        for ns in (False, True):
            assert hf.classname(func, with_namespace=ns) == oracle.classname(func, ns)
        assert hf.is_multi_output(func) == oracle.is_multi_output(func), func.name
        assert hf.returns_type(func) == oracle.returns_type(func).cpp_type(), func.name


@pytest.mark.parametrize(
    "fn,args",
    [
        ("base_ctor_arguments", ()),
        ("extra_ctor_arguments", ()),
        ("attributes", (True,)),
        ("attributes", (False,)),
        ("op_arguments", (False,)),
        ("op_arguments", (True,)),
    ],
    ids=lambda v: str(v),
)
def test_bindings_match_torchgen(
    view_groups: list[Any], oracle: Any, fn: str, args: tuple[bool, ...]
) -> None:
    specials = {
        "base",
        "mutated_view",
        "has_symbolic_inputs",
        "out_index",
        "reapply_views",
        "inverse_return_mode",
    }
    mismatches = []
    for f in _functions(view_groups):
        ours = getattr(hf, fn)(f.func, *args)
        theirs = getattr(oracle, fn)(f.func, *args)
        if _as_rows(ours) != _as_rows(theirs):
            mismatches.append((str(f.func.name), _as_rows(ours), _as_rows(theirs)))
        for o, t in zip(ours, theirs):
            if o.name not in specials:
                assert o.argument == t.argument
        assert [b.decl() for b in ours] == [b.decl() for b in theirs]
    assert mismatches == []


def test_names_match_torchgen(view_groups: list[Any], oracle: Any) -> None:
    checked = 0
    for g in view_groups:
        for ns in (True, False):
            assert hf.name(g, is_reverse=True, include_namespace=ns) == oracle.name(
                g, is_reverse=True, include_namespace=ns
            )
        for f in (g.view, g.view_inplace):
            if f is not None:
                for ns in (True, False):
                    assert hf.reverse_name(f, ns) == oracle.reverse_name(f, ns)
        if g.view_copy is not None:
            for reapply in (True, False):
                assert hf.name(
                    g, is_reverse=False, include_namespace=True, reapply_views=reapply
                ) == oracle.name(g, is_reverse=False, include_namespace=True, reapply_views=reapply)
                checked += 1
    assert checked > 50


def test_name_preconditions_raise_where_torchgen_asserts(view_groups: list[Any], oracle: Any) -> None:
    g = next(g for g in view_groups if str(g.view.func.name) == "slice.Tensor")
    for kwargs in (
        dict(is_reverse=False, include_namespace=True, reapply_views=None),
        dict(is_reverse=False, include_namespace=False, reapply_views=True),
    ):
        with pytest.raises(AssertionError):
            oracle.name(g, **kwargs)
        with pytest.raises(ValueError, match="hopkit: "):
            hf.name(g, **kwargs)


def test_dispatcher_types_for_every_native_argument(oracle: Any) -> None:
    # Beyond view ops: the C++ type translation agrees with torchgen's
    # dispatcher API on every argument of every native function.
    from torchgen.api import dispatcher

    bad = []
    for f in hf._torchgen.load_native_functions():  # type: ignore[attr-defined]
        for a in f.func.arguments.flat_all:
            for owning in (True, False):
                theirs = dispatcher.argument(a, remove_non_owning_ref_types=owning).type
                ours = _naming._dispatcher_binding(a, owning=owning).type
                if ours != theirs:
                    bad.append((str(f.func.name), a.name, ours, theirs))
    assert bad == []


# ---------------------------------------------------------------------------
# Naming API vs torch's generated classes
# ---------------------------------------------------------------------------

# Written by hand in torch (not generated from a view group).
HAND_WRITTEN_CLASSES = {"resize__ViewMeta", "_unsafe_view_ViewMeta"}


def _generated_classnames(view_groups: list[Any]) -> dict[str, Any]:
    out = {}
    for g in view_groups:
        if g.composite:
            continue
        for f in (g.view, g.view_inplace):
            if f is not None:
                out[hf.classname(f.func)] = f.func
    return out


def test_classnames_are_torchs_generated_classes(view_groups: list[Any]) -> None:
    ours = set(_generated_classnames(view_groups))
    theirs = {n for n in dir(F) if n.endswith("_ViewMeta")}
    assert ours <= theirs
    assert theirs - ours == HAND_WRITTEN_CLASSES


_PYBIND_TYPES = {
    "bool": "bool",
    "int64_t": "typing.SupportsInt | typing.SupportsIndex",
    "c10::SymInt": "Union[int, torch.SymInt]",
    "at::Tensor": "torch.Tensor",
    "at::ScalarType": "torch.dtype",
    "at::functionalization::InverseReturnMode": "torch._C._functionalization.InverseReturnMode",
}


def _pybind_type(cpp: str) -> str:
    cpp = cpp.removeprefix("const ").removesuffix(" &")
    if cpp.startswith("::std::optional<"):
        return f"{_pybind_type(cpp[len('::std::optional<'):-1])} | None"
    if cpp.startswith("::std::vector<"):
        return f"collections.abc.Sequence[{_pybind_type(cpp[len('::std::vector<'):-1])}]"
    return _PYBIND_TYPES[cpp]


def _pybind_int(printed: str) -> str:
    # The pybind11 inside torch 2.11 prints int64_t as "typing.SupportsInt";
    # 2.12+ print "typing.SupportsInt | typing.SupportsIndex". Same C++ type.
    return printed.replace("typing.SupportsInt | typing.SupportsIndex", "typing.SupportsInt")


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    return parts + [cur.strip()]


def test_ctor_tuple_layout_matches_torchs_classes(view_groups: list[Any]) -> None:
    # Torch's classes take (base_ctor_arguments + attributes) as one tuple;
    # pybind prints its element types in __init__'s signature.
    for cls_name, func in _generated_classnames(view_groups).items():
        doc = getattr(F, cls_name).__init__.__doc__
        m = re.search(r"arg0: tuple\[(.*)\]\) -> None", doc)
        assert m is not None, doc
        theirs = [_pybind_int(t) for t in _split_top_level(m.group(1))]
        bindings = hf.base_ctor_arguments(func) + hf.attributes(func)
        assert [_pybind_int(_pybind_type(b.type)) for b in bindings] == theirs, cls_name


# ---------------------------------------------------------------------------
# ViewMeta: forward/reverse against eager
# ---------------------------------------------------------------------------


def _same_view(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert a.stride() == b.stride()
    assert a.storage_offset() == b.storage_offset()
    assert a.dtype == b.dtype
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert torch.equal(a, b)


def _eager_write_through(
    base: torch.Tensor, view_fn: Callable[[torch.Tensor], torch.Tensor], value: torch.Tensor
) -> torch.Tensor:
    """Eager ``view_fn(base).copy_(value)`` on a copy of base's whole storage."""
    out = torch.empty((), dtype=base.dtype).set_(
        base.untyped_storage().clone(), base.storage_offset(), base.size(), base.stride()
    )
    view_fn(out).copy_(value)
    return out


def check_meta(
    base: torch.Tensor, metas: Sequence[ViewMeta], view_fn: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """forward == eager view; scatter_into_base == eager write through the view."""
    expected = view_fn(base)
    _same_view(apply_view_meta_sequence(base, metas), expected)
    current = base
    for m in metas:
        current = m.forward(current)
    _same_view(current, expected)
    before = base.clone()
    value = torch.randn_like(expected) if expected.is_floating_point() or expected.is_complex() else expected + 7
    got = scatter_into_base(base, metas, value)
    torch.testing.assert_close(base, before, rtol=0, atol=0)  # base untouched
    want = _eager_write_through(base, view_fn, value)
    assert got.shape == base.shape
    # expand's inverse adds the change (base + (new - base)): rounding.
    exact = all(m.op is not aten.expand.default for m in metas)
    torch.testing.assert_close(got, want, **(dict(rtol=0, atol=0) if exact else {}))


CASES: list[tuple[str, Any, tuple[Any, ...], dict[str, Any], int | None, Callable[..., Any]]] = [
    ("slice", aten.slice.Tensor, (1, 1, 4, 2), {}, None, lambda t: t[:, 1:4:2]),
    ("slice_neg", aten.slice.Tensor, (0, -3, None), {}, None, lambda t: t[-3:]),
    ("select", aten.select.int, (1, -1), {}, None, lambda t: t[:, -1]),
    ("diagonal", aten.diagonal.default, (1, 0, 1), {}, None, lambda t: t.diagonal(1)),
    ("transpose", aten.transpose.int, (0, 1), {}, None, lambda t: t.transpose(0, 1)),
    ("t", aten.t.default, (), {}, None, lambda t: t.t()),
    ("permute", aten.permute.default, ([1, 0],), {}, None, lambda t: t.permute(1, 0)),
    ("unsqueeze", aten.unsqueeze.default, (-1,), {}, None, lambda t: t.unsqueeze(-1)),
    ("squeeze", aten.squeeze.default, (), {}, None, lambda t: t.squeeze()),
    ("view", aten.view.default, ([20],), {}, None, lambda t: t.view(20)),
    ("unflatten", aten.unflatten.int, (1, [5, 1]), {}, None, lambda t: t.unflatten(1, [5, 1])),
    ("as_strided", aten.as_strided.default, ([2, 2], [1, 5], 3), {}, None,
     lambda t: t.as_strided([2, 2], [1, 5], 3)),
    ("narrow", aten.narrow.default, (1, -3, 2), {}, None, lambda t: t.narrow(1, -3, 2)),
    ("movedim", aten.movedim.int, (0, 1), {}, None, lambda t: t.movedim(0, 1)),
    ("split", aten.split.Tensor, (2, 1), {}, 2, lambda t: t.split(2, 1)[2]),
    ("split_with_sizes", aten.split_with_sizes.default, ([1, 3], 0), {}, 1,
     lambda t: t.split_with_sizes([1, 3], 0)[1]),
    ("chunk", aten.chunk.default, (3, 1), {}, 1, lambda t: t.chunk(3, 1)[1]),
    ("unbind", aten.unbind.int, (0,), {}, 3, lambda t: t.unbind(0)[3]),
    ("alias", aten.alias.default, (), {}, None, lambda t: t.view_as(t)),
    ("unfold", aten.unfold.default, (1, 2, 2), {}, None, lambda t: t.unfold(1, 2, 2)),
    ("tensor_split", aten.tensor_split.sections, (2, 1), {}, 0, lambda t: t.tensor_split(2, 1)[0]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_reverse_against_eager(case: Any) -> None:
    _, op, args, kwargs, out_index, view_fn = case
    base = torch.randn(4, 5)
    meta = ViewMeta(op, args, kwargs, out_index)
    check_meta(base, [meta], view_fn)


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Any] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_dispatches_exactly_the_op(case: Any) -> None:
    # ViewMeta.forward may call a Tensor method (NOTE [Tensor methods for
    # replay]); it must reach the same aten overload as calling the op.
    _, op, args, kwargs, out_index, _ = case
    base = torch.randn(4, 5)
    meta = ViewMeta(op, args, kwargs, out_index)
    with _OpLog() as ours:
        meta.forward(base)
    with _OpLog() as theirs:
        op(base, *meta.args, **meta.kwargs)
    assert ours.ops == theirs.ops
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd"):
        assert ours.ops == [op]  # composite views dispatch to what they decompose into


METHOD_EXAMPLES: dict[Any, tuple[tuple[Any, ...], int | None]] = {
    aten.select.int: ((2, 1), None),
    aten.transpose.int: ((0, 2), None),
    aten.t.default: ((), None),
    aten.permute.default: (([2, 0, 1],), None),
    aten.unsqueeze.default: ((1,), None),
    aten.squeeze.default: ((), None),
    aten.squeeze.dim: ((1,), None),
    aten.squeeze.dims: (([1, 2],), None),
    aten.view.default: (([4, 3],), None),
    aten.expand.default: (([2, 4, 1, 3],), None),
    aten.diagonal.default: ((0, 0, 2), None),
    aten.as_strided.default: (([2, 2], [1, 2], 1), None),
    aten.unbind.int: ((0,), 1),
    aten.unfold.default: ((0, 2, 1), None),
    aten.split_with_sizes.default: (([1, 3], 0), 1),
}


@pytest.mark.parametrize("op", list(METHOD_EXAMPLES), ids=str)
def test_tensor_method_table_dispatches_exactly_the_op(op: Any) -> None:
    from hopkit.functionalization._tensor_methods import _TENSOR_METHODS

    assert set(_TENSOR_METHODS) == set(METHOD_EXAMPLES)
    args, out_index = METHOD_EXAMPLES[op]
    base = torch.randn(4, 1, 3) if op is not aten.t.default else torch.randn(4, 3)
    meta = ViewMeta(op, args, out_index=out_index)
    with _OpLog() as log:
        out = meta.forward(base)
    assert log.ops == [op]
    want = op(base, *args)
    _same_view(out, want if out_index is None else want[out_index])


OUTPUT_COUNT_EXAMPLES: dict[Any, tuple[Any, ...]] = {
    aten.split.default: ([1, 2, 3], 1),
    aten.split.sizes: ([4, 2], 1),
    aten.split_with_sizes.default: ([0, 6], 1),
    aten.tensor_split.sections: (4, 1),
    aten.tensor_split.indices: ([1, 5], 1),
    aten.hsplit.int: (3,),
    aten.vsplit.int: (2,),
    aten.dsplit.int: (5,),
    aten.hsplit.array: ([2, 4, 9],),
    aten.vsplit.array: ([],),
    aten.dsplit.array: ([1],),
}


@pytest.mark.parametrize("op", list(OUTPUT_COUNT_EXAMPLES), ids=str)
def test_out_index_checked_at_construction_where_the_args_fix_the_count(op: Any) -> None:
    from hopkit.functionalization._checks import _OUTPUT_COUNTS

    assert set(_OUTPUT_COUNTS) == set(OUTPUT_COUNT_EXAMPLES)
    args = OUTPUT_COUNT_EXAMPLES[op]
    base = torch.randn(4, 6, 5)
    n = len(op(base, *args))
    for i in range(n):
        _same_view(ViewMeta(op, args, out_index=i).forward(base), op(base, *args)[i])
    with pytest.raises(IndexError, match=re.escape(f"must be in range({n}) for {op._schema.name}")):
        ViewMeta(op, args, out_index=n)


def test_expand_reverse_matches_torch_functionalization() -> None:
    # Eager refuses to write through an expanded view; torch's functionalization
    # (the behaviour hopkit mirrors) adds each broadcast copy's change.
    base = torch.randn(3, 1)
    delta = torch.randn(2, 3, 4)

    def f(x: torch.Tensor) -> torch.Tensor:
        x.expand(2, 3, 4).add_(delta)
        return x

    want = torch.func.functionalize(f)(base.clone())
    meta = ViewMeta(aten.expand.default, ([2, 3, 4],))
    _same_view(meta.forward(base), base.expand(2, 3, 4))
    got = scatter_into_base(base, [meta], meta.forward(base) + delta)
    torch.testing.assert_close(got, want)


def test_dtype_and_complex_views() -> None:
    z = torch.randn(3, 2, dtype=torch.complex64)
    check_meta(z, [ViewMeta(aten.view_as_real.default)], torch.view_as_real)
    r = torch.randn(3, 2)
    check_meta(r, [ViewMeta(aten.view_as_complex.default)], torch.view_as_complex)
    check_meta(r, [ViewMeta(aten.view.dtype, (torch.int32,))], lambda t: t.view(torch.int32))
    m = ViewMeta(aten._conj.default)
    v = m.forward(z)
    assert v.is_conj()
    torch.testing.assert_close(m.reverse(z, v.resolve_conj()), z)


# One example per inverse rule (and two views without one, inverted through
# as_strided): (base, args, out_index, a shape other than the view's with as
# many elements where possible, which no rule may take for the view's).
_F4x3: Callable[[], torch.Tensor] = lambda: torch.randn(4, 3)
_Z4x3: Callable[[], torch.Tensor] = lambda: torch.randn(4, 3, dtype=torch.complex64)
REVERSE_EXAMPLES: dict[Any, tuple[Callable[[], torch.Tensor], tuple[Any, ...], int | None, list[int]]] = {
    aten.slice.Tensor: (_F4x3, (0, 1, 3), None, [3, 2]),
    aten.narrow.default: (_F4x3, (0, 1, 2), None, [3, 2]),
    aten.select.int: (_F4x3, (0, 1), None, [1, 3]),
    aten.diagonal.default: (_F4x3, (0, 0, 1), None, [1, 3]),
    aten.as_strided.default: (_F4x3, ([2, 2], [1, 2], 1), None, [4]),
    aten.transpose.int: (_F4x3, (0, 1), None, [4, 3]),
    aten.swapaxes.default: (_F4x3, (0, 1), None, [4, 3]),
    aten.swapdims.default: (_F4x3, (0, 1), None, [4, 3]),
    aten.t.default: (_F4x3, (), None, [4, 3]),
    aten.permute.default: (_F4x3, ([1, 0],), None, [4, 3]),
    aten.movedim.int: (_F4x3, (0, 1), None, [4, 3]),
    aten.movedim.intlist: (_F4x3, ([0], [1]), None, [4, 3]),
    aten.moveaxis.int: (_F4x3, (0, 1), None, [4, 3]),
    aten.moveaxis.intlist: (_F4x3, ([0], [1]), None, [4, 3]),
    aten.unsqueeze.default: (_F4x3, (0,), None, [4, 3, 1]),
    aten.squeeze.default: (lambda: torch.randn(4, 1, 3), (), None, [3, 4]),
    aten.squeeze.dim: (lambda: torch.randn(4, 1, 3), (1,), None, [3, 4]),
    aten.squeeze.dims: (lambda: torch.randn(4, 1, 3), ([1],), None, [3, 4]),
    aten.view.default: (_F4x3, ([2, 6],), None, [6, 2]),
    aten._reshape_alias.default: (_F4x3, ([2, 6], [6, 1]), None, [6, 2]),
    aten.unflatten.int: (_F4x3, (1, [3, 1]), None, [4, 1, 3]),
    aten.view.dtype: (_F4x3, (torch.int32,), None, [3, 4]),
    aten.expand.default: (_F4x3, ([2, 4, 3],), None, [2, 3, 4]),
    aten.alias.default: (_F4x3, (), None, [3, 4]),
    aten.detach.default: (_F4x3, (), None, [3, 4]),
    aten.lift_fresh.default: (_F4x3, (), None, [3, 4]),
    aten._conj.default: (_Z4x3, (), None, [3, 4]),
    aten._neg_view.default: (_F4x3, (), None, [3, 4]),
    aten.view_as_real.default: (_Z4x3, (), None, [3, 4, 2]),
    aten.view_as_complex.default: (lambda: torch.randn(4, 3, 2), (), None, [3, 4]),
    aten.split.Tensor: (_F4x3, (2, 0), 1, [3, 2]),
    aten.split_with_sizes.default: (_F4x3, ([1, 3], 0), 1, [1, 9]),
    aten.chunk.default: (_F4x3, (2, 0), 0, [3, 2]),
    aten.unbind.int: (_F4x3, (0,), 1, [1, 3]),
    aten.unfold.default: (_F4x3, (0, 2, 1), None, [2, 3, 3]),  # as_strided inverse
    aten.tensor_split.sections: (_F4x3, (2, 1), 0, [2, 4]),  # as_strided inverse
}


def test_reverse_examples_cover_every_inverse_rule() -> None:
    from hopkit.functionalization._inverse_rules import _REVERSE_RULES

    assert set(_REVERSE_RULES) <= set(REVERSE_EXAMPLES)


@pytest.mark.parametrize("op", list(REVERSE_EXAMPLES), ids=str)
def test_reverse_takes_exactly_the_views_shape_and_dtype(op: Any) -> None:
    # reverse(base, v) is eager forward(base).copy_(v) for a v of the view's
    # shape and dtype, and refuses a v of any other shape, as eager copy_
    # does here, before computing anything (it used to transpose, reshape or
    # squeeze such a v into a wrongly shaped base, or fail inside torch).
    make_base, args, out_index, wrong = REVERSE_EXAMPLES[op]
    base = make_base()
    meta = ViewMeta(op, args, out_index=out_index)
    view = meta.forward(base)
    assert list(view.shape) != wrong
    bad = torch.ones(wrong, dtype=view.dtype)
    with pytest.raises(RuntimeError):
        meta.forward(base.clone()).copy_(bad)
    message = f"but mutated_view has shape {wrong} and dtype {view.dtype};"
    with _OpLog() as forward_ops:
        meta.forward(base)
    with _OpLog() as log, pytest.raises(ValueError) as info:
        meta.reverse(base, bad)
    assert log.ops == forward_ops.ops  # only the view, for its shape
    assert str(info.value).startswith(f"hopkit: {meta!r}.reverse needs mutated_view")
    assert message in str(info.value)
    value = torch.ones(view.shape, dtype=view.dtype) * 3
    if op is not aten.expand.default:  # eager cannot write through expand
        want = _eager_write_through(base, meta.forward, value)
        torch.testing.assert_close(meta.reverse(base, value), want, rtol=0, atol=0)
    else:
        meta.reverse(base, value)
    # Once a plain eager call has seen this layout, the view's size is known
    # (NOTE [View sizes for reverse's check]): no op runs.
    with _OpLog() as log, pytest.raises(ValueError, match=re.escape(message)):
        meta.reverse(base, bad)
    assert log.ops == ([] if meta._view_sizes is not None else forward_ops.ops)


def test_chain_of_views_matches_eager_and_torch() -> None:
    base = torch.randn(6, 4, 5)

    def view_fn(t: torch.Tensor) -> torch.Tensor:
        return t[1:5].transpose(0, 2).select(1, 2).unsqueeze(0)[..., ::2]

    metas = record_view_metas(base, view_fn)
    assert [m.op for m in metas] == [
        aten.slice.Tensor,
        aten.transpose.int,
        aten.select.int,
        aten.unsqueeze.default,
        aten.slice.Tensor,
    ]
    check_meta(base, metas, view_fn)
    theirs = F.apply_view_meta_sequence(base, [m.to_torch() for m in metas])
    _same_view(apply_view_meta_sequence(base, metas), theirs)


@pytest.mark.parametrize(
    "make_base",
    [
        lambda: torch.randn(6, 5),
        lambda: torch.randn(5, 6).t(),
        lambda: torch.randn(8, 5)[2:],
        lambda: torch.randn(6, 10)[:, ::2],
    ],
    ids=["contiguous", "transposed", "offset", "strided"],
)
def test_bases_with_any_layout(make_base: Callable[[], torch.Tensor]) -> None:
    base = make_base()
    for view_fn in (
        lambda t: t[1:4, 2],
        lambda t: t.t()[1:],
        lambda t: t.split(2)[1].diagonal(),
        lambda t: t.unbind(1)[3].unsqueeze(1),
    ):
        check_meta(base, record_view_metas(base, view_fn), view_fn)


# ---------------------------------------------------------------------------
# Property-based: random shapes and arguments
# ---------------------------------------------------------------------------

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4)


@st.composite
def view_step(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[ViewMeta, Callable[..., Any]]:
    """One random view of a tensor of ``shape``: (ViewMeta, eager view fn)."""
    nd = len(shape)
    kinds = ["unsqueeze", "expand", "view"]
    if nd:
        kinds += ["slice", "transpose", "permute"]
    if nd >= 2:
        kinds += ["diagonal"]
    if 1 in shape:
        kinds += ["squeeze"]
    sized = [d for d in range(nd) if shape[d] > 0]
    needs_size = ("select", "split", "unbind", "narrow", "split_with_sizes", "chunk")
    if sized:
        kinds += needs_size
    kind = draw(st.sampled_from(kinds))
    if kind in needs_size:
        dim = draw(st.sampled_from(sized)) - draw(st.sampled_from([0, nd]))
    else:
        dim = draw(st.integers(-nd, nd - 1)) if nd else 0
    size = shape[dim] if nd else 1
    if kind == "slice":
        start = draw(st.none() | st.integers(-size - 1, size + 1))
        end = draw(st.none() | st.integers(-size - 1, size + 1))
        step = draw(st.integers(1, 3))
        return ViewMeta(aten.slice.Tensor, (dim, start, end, step)), lambda t: aten.slice.Tensor(
            t, dim, start, end, step
        )
    if kind == "select":
        i = draw(st.integers(-size, size - 1))
        return ViewMeta(aten.select.int, (dim, i)), lambda t: t.select(dim, i)
    if kind == "narrow":
        start = draw(st.integers(-size, size - 1))
        length = draw(st.integers(0, size - (start % size)))
        return ViewMeta(aten.narrow.default, (dim, start, length)), lambda t: t.narrow(
            dim, start, length
        )
    if kind == "transpose":
        d2 = draw(st.integers(-nd, nd - 1))
        return ViewMeta(aten.transpose.int, (dim, d2)), lambda t: t.transpose(dim, d2)
    if kind == "permute":
        perm = draw(st.permutations(range(nd)))
        return ViewMeta(aten.permute.default, (perm,)), lambda t: t.permute(perm)
    if kind == "diagonal":
        d1, d2 = draw(st.lists(st.integers(0, nd - 1), min_size=2, max_size=2, unique=True))
        off = draw(st.integers(-3, 3))
        return ViewMeta(aten.diagonal.default, (off, d1, d2)), lambda t: t.diagonal(off, d1, d2)
    if kind == "unsqueeze":
        d = draw(st.integers(-nd - 1, nd))
        return ViewMeta(aten.unsqueeze.default, (d,)), lambda t: t.unsqueeze(d)
    if kind == "squeeze":
        ones = [i for i, s in enumerate(shape) if s == 1]
        which = draw(st.sampled_from(["all", "dim", "dims"]))
        if which == "all":
            return ViewMeta(aten.squeeze.default), lambda t: t.squeeze()
        if which == "dim":
            d = draw(st.sampled_from(ones))
            return ViewMeta(aten.squeeze.dim, (d,)), lambda t: t.squeeze(d)
        ds = draw(st.lists(st.sampled_from(ones), min_size=1, unique=True))
        return ViewMeta(aten.squeeze.dims, (ds,)), lambda t: t.squeeze(ds)
    if kind == "expand":
        new = [draw(st.integers(1, 3)) if s == 1 else draw(st.sampled_from([s, -1])) for s in shape]
        new = [draw(st.integers(1, 2)) for _ in range(draw(st.integers(0, 1)))] + new
        return ViewMeta(aten.expand.default, (new,)), lambda t: t.expand(new)
    if kind == "view":
        # Views that need no contiguity: add or drop size-1 dims.
        new = [s for s in shape if s != 1] + [1] * draw(st.integers(0, 1))
        return ViewMeta(aten.view.default, (new,)), lambda t: t.view(new)
    if kind == "split":
        split_size = draw(st.integers(1, size))
        i = draw(st.integers(0, (size + split_size - 1) // split_size - 1))
        return ViewMeta(aten.split.Tensor, (split_size, dim), out_index=i), lambda t: t.split(
            split_size, dim
        )[i]
    if kind == "split_with_sizes":
        cut = sorted(draw(st.lists(st.integers(0, size), max_size=3)))
        sizes = [b - a for a, b in zip([0, *cut], [*cut, size])]
        i = draw(st.integers(0, len(sizes) - 1))
        return ViewMeta(aten.split_with_sizes.default, (sizes, dim), out_index=i), (
            lambda t: t.split_with_sizes(sizes, dim)[i]
        )
    if kind == "chunk":
        chunks = draw(st.integers(1, size))
        n = len(torch.empty(shape).chunk(chunks, dim))
        i = draw(st.integers(0, n - 1))
        return ViewMeta(aten.chunk.default, (chunks, dim), out_index=i), lambda t: t.chunk(
            chunks, dim
        )[i]
    assert kind == "unbind"
    i = draw(st.integers(0, size - 1))
    return ViewMeta(aten.unbind.int, (dim,), out_index=i), lambda t: t.unbind(dim)[i]


@st.composite
def view_chain(
    draw: st.DrawFn,
) -> tuple[torch.Tensor, list[ViewMeta], Callable[[torch.Tensor], torch.Tensor]]:
    shape = tuple(draw(shapes))
    layout = draw(st.sampled_from(["contiguous", "transposed", "offset"]))
    numel = 1
    for s in shape:
        numel *= s
    if layout == "offset":
        base = torch.randn(numel + 3)[3:].view(shape)
    elif layout == "transposed" and len(shape) >= 2:
        base = torch.randn(shape[::-1]).permute(*reversed(range(len(shape))))
    else:
        base = torch.randn(shape)
    metas, fns = [], []
    current = base
    for _ in range(draw(st.integers(1, 4))):
        meta, fn = draw(view_step(tuple(current.shape)))
        metas.append(meta)
        fns.append(fn)
        current = fn(current)

    def view_fn(t: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            t = fn(t)
        return t

    return base, metas, view_fn


def _writes_through_overlap(view: torch.Tensor) -> bool:
    return any(st == 0 and s > 1 for s, st in zip(view.shape, view.stride()))


@HYPOTHESIS
@given(view_chain())
def test_property_chains_round_trip(chain: Any) -> None:
    base, metas, view_fn = chain
    expected = view_fn(base)
    _same_view(apply_view_meta_sequence(base, metas), expected)
    if _writes_through_overlap(expected):
        # Eager cannot write through an expanded view; the reverse is
        # checked against torch's functionalization instead.
        def f(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            view_fn(x).copy_(v)
            return x

        value = torch.randn_like(expected)
        want = torch.func.functionalize(f)(base.clone(), value)
        torch.testing.assert_close(scatter_into_base(base, metas, value), want)
    else:
        check_meta(base, metas, view_fn)


@HYPOTHESIS
@given(view_chain())
def test_property_replay_matches_torch_apply_view_meta_sequence(chain: Any) -> None:
    base, _, view_fn = chain
    metas = record_view_metas(base, view_fn)
    theirs = F.apply_view_meta_sequence(base, [m.to_torch() for m in metas])
    _same_view(apply_view_meta_sequence(base, metas), theirs)
    back = [ViewMeta.from_torch(m.to_torch()) for m in metas]
    assert back == [ViewMeta(m.op, m.args, m.kwargs, m.out_index) for m in metas]  # type: ignore[arg-type]


@st.composite
def as_strided_case(draw: st.DrawFn) -> tuple[torch.Tensor, list[int], list[int], int]:
    """A contiguous base (maybe at an offset) and a non-overlapping as_strided view of it."""
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    order = draw(st.permutations(range(len(sizes))))
    gap = draw(st.integers(1, 2))
    strides = [0] * len(sizes)
    running = gap
    for d in reversed(order):
        strides[d] = running
        running *= sizes[d]
    span = sum((s - 1) * st for s, st in zip(sizes, strides)) + 1
    lead = draw(st.integers(0, 3))
    numel = span + lead + draw(st.integers(0, 3))
    shift = draw(st.integers(0, 2))
    base = torch.randn(numel + shift)[shift:]
    return base, sizes, strides, shift + lead


@HYPOTHESIS
@given(as_strided_case())
def test_property_as_strided(case: Any) -> None:
    base, sizes, strides, offset = case
    meta = ViewMeta(aten.as_strided.default, (sizes, strides, offset))
    check_meta(base, [meta], lambda t: t.as_strided(sizes, strides, offset))
    check_meta(base, [ViewMeta.from_view(base, meta.forward(base))], lambda t: t.as_strided(
        sizes, strides, offset
    ))


@st.composite
def wrong_view_value(
    draw: st.DrawFn,
) -> tuple[torch.Tensor, ViewMeta, list[int], torch.dtype, list[int], torch.dtype]:
    """A base, one random view of it, and a (shape, dtype) other than the view's."""
    shape = tuple(draw(shapes))
    base = torch.randn(shape)
    meta, _ = draw(view_step(shape))
    size = list(meta.forward(base).shape)
    dims = list(range(len(size)))
    how = draw(
        st.sampled_from(["permuted", "grown", "shrunk", "one", "lead", "drop", "flat", "dtype"])
    )
    wrong, dtype = list(size), torch.float32
    if how == "permuted":
        wrong = list(draw(st.permutations(size)))
    elif how == "grown" and dims:
        i = draw(st.sampled_from(dims))
        wrong[i] += draw(st.integers(1, 2))
    elif how == "shrunk" and any(size):
        i = draw(st.sampled_from([d for d in dims if size[d] > 0]))
        wrong[i] -= 1
    elif how == "one" and any(s > 1 for s in size):  # broadcastable: copy_ takes it
        wrong[draw(st.sampled_from([d for d in dims if size[d] > 1]))] = 1
    elif how == "lead":
        wrong = [1, *size]
    elif how == "drop" and dims:  # broadcastable: copy_ takes it
        wrong = size[1:]
    elif how == "flat":
        wrong = [math.prod(size)]
    else:
        dtype = torch.float64
    assume((wrong, dtype) != (size, torch.float32))
    return base, meta, size, torch.float32, wrong, dtype


@HYPOTHESIS
@given(wrong_view_value())
def test_property_reverse_refuses_other_shapes_and_dtypes(case: Any) -> None:
    # reverse takes exactly forward(base)'s shape and dtype (values of those
    # round-trip in test_property_chains_round_trip); every other value,
    # broadcastable or castable ones too, is refused before computing.
    base, meta, size, dtype, wrong, wrong_dtype = case
    before = base.clone()
    with pytest.raises(ValueError) as info:
        meta.reverse(base, torch.zeros(wrong, dtype=wrong_dtype))
    assert str(info.value).startswith(
        f"hopkit: {meta!r}.reverse needs mutated_view with the shape and dtype of the view "
        f"forward(base) returns, {size} and {dtype}, but mutated_view has shape {wrong} "
        f"and dtype {wrong_dtype};"
    )
    torch.testing.assert_close(base, before, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Pickling and the as_strided fallback
# ---------------------------------------------------------------------------


def test_pickle_round_trip() -> None:
    base = torch.randn(4, 6, 5)
    metas = [
        ViewMeta(aten.slice.Tensor, (1, 1, None, 2)),
        ViewMeta(aten.expand.default, ([2, 4, 3, 5],), {"implicit": True}),
        ViewMeta(aten.unbind.int, (1,), out_index=2),
        ViewMeta(aten.view.dtype, (torch.int32,)),
    ]
    back = pickle.loads(pickle.dumps(metas))
    assert back == metas
    assert [m.op for m in back] == [m.op for m in metas]
    assert back[1].kwargs == {"implicit": True}
    _same_view(apply_view_meta_sequence(base, back), apply_view_meta_sequence(base, metas))
    recorded = record_view_metas(base, lambda t: t[1].t()[2:])
    back = pickle.loads(pickle.dumps(recorded))
    assert back == recorded and all(m.geometry is not None for m in back)
    assert hash(back[0]) == hash(recorded[0])


def test_unpickle_a_pickle_written_by_the_single_module_layout() -> None:
    # Written when ViewMeta and ViewGeometry both lived in _view_meta.py: the
    # stream names hopkit.functionalization._view_meta._unpickle_view_meta and
    # ..._view_meta.ViewGeometry, which must keep resolving.
    old = (
        b"\x80\x04\x95\x97\x00\x00\x00\x00\x00\x00\x00\x8c#hopkit.functionalization._view_meta"
        b"\x94\x8c\x13_unpickle_view_meta\x94\x93\x94(\x8c\x12aten::slice.Tensor\x94(K\x00K\x01"
        b"K\x03K\x01t\x94}\x94Nh\x00\x8c\x0cViewGeometry\x94\x93\x94(K\x04K\x06\x86\x94K\x06K"
        b"\x01\x86\x94K\x00K\x02K\x06\x86\x94h\tK\x06t\x94\x81\x94t\x94R\x94."
    )
    geometry = ViewGeometry((4, 6), (6, 1), 0, (2, 6), (6, 1), 6)
    assert pickle.loads(old) == ViewMeta(aten.slice.Tensor, (0, 1, 3), geometry=geometry)


def test_unpickle_unknown_op_replays_through_verified_as_strided() -> None:
    base = torch.randn(4, 5)
    meta = ViewMeta(aten.slice.Tensor, (0, 1, 3)).recorded(base)
    blob = pickle.dumps(meta).replace(b"aten::slice.Tensor", b"hkgone::slc.Tensor")
    ghost = pickle.loads(blob)
    assert ghost.op is None and ghost.op_name == "hkgone::slc.Tensor"
    _same_view(ghost.forward(base), base[1:3])
    _same_view(apply_view_meta_sequence(base, [ghost]), base[1:3])
    other = torch.randn(10, 5)[3:7]  # same sizes and strides, other offset
    _same_view(ghost.forward(other), other[1:3])
    value = torch.randn(2, 5)
    torch.testing.assert_close(
        scatter_into_base(base, [ghost], value), _eager_write_through(base, lambda t: t[1:3], value)
    )


def test_from_view_replays_relative_to_the_base_and_verifies_the_layout() -> None:
    storage = torch.randn(40)
    base = storage[4:24].view(4, 5)
    view = base.t()[1:3, ::2]
    meta = ViewMeta.from_view(base, view)
    assert meta.op is aten.as_strided.default
    _same_view(meta.forward(base), view)
    other = storage[10:30].view(4, 5)  # same layout, another offset
    _same_view(apply_view_meta_sequence(other, [meta]), other.t()[1:3, ::2])
    value = torch.randn(2, 2)
    torch.testing.assert_close(
        scatter_into_base(other, [meta], value),
        _eager_write_through(other, lambda t: t.t()[1:3, ::2], value),
    )
    with pytest.raises(RuntimeError, match=re.escape("(sizes [4, 5], strides [5, 1])")):
        meta.forward(torch.randn(5, 4).t())
    back = pickle.loads(pickle.dumps(meta))
    _same_view(back.forward(other), other.t()[1:3, ::2])


def test_geometry_cache_keeps_conj_and_neg_bits() -> None:
    metas = [ViewMeta(aten.select.int, (0, 1)), ViewMeta(aten.slice.Tensor, (0, 0, 2))]
    z = torch.randn(4, 3, dtype=torch.complex64).conj()
    for _ in range(2):
        out = apply_view_meta_sequence(z, metas)
        assert out.is_conj() and torch.equal(out, z[1, :2])
    n = torch.randn(4, 3)._neg_view()
    assert apply_view_meta_sequence(n, metas).is_neg()


def _custom_view_lib() -> torch.library.Library:
    lib = torch.library.Library("hopkit_test_fz", "FRAGMENT")
    lib.define("mid(Tensor(a) x, int n) -> Tensor(a)")
    lib.impl("mid", lambda x, n: x.narrow(0, 1, n), "CPU")  # no Meta kernel
    return lib


def test_custom_view_op_uses_as_strided_inverse_and_fallback() -> None:
    lib = _custom_view_lib()
    try:
        op = torch.ops.hopkit_test_fz.mid.default
        base = torch.randn(5, 3)
        meta = ViewMeta(op, (2,))
        check_meta(base, [meta], lambda t: t[1:3])
        meta_base = torch.empty(5, 3, device="meta")
        with pytest.raises(NotImplementedError):
            apply_view_meta_sequence(meta_base, [meta])
        recorded = meta.recorded(base)
        out = apply_view_meta_sequence(meta_base, [recorded])
        assert (out.shape, out.stride(), out.storage_offset()) == ((2, 3), (3, 1), 3)
        with pytest.raises(RuntimeError, match="replays only on a base with the layout"):
            apply_view_meta_sequence(torch.empty(3, 5, device="meta").t(), [recorded])
    finally:
        lib._destroy()


# ---------------------------------------------------------------------------
# Tracing, modes, and the eager geometry cache
# ---------------------------------------------------------------------------

METAS_X0 = [ViewMeta(aten.select.int, (0, 0)), ViewMeta(aten.slice.Tensor, (0, 1, 3))]


class TestTracing(TestCase):
    def test_make_fx_graph(self) -> None:
        def f(x, v):  # type: ignore[no-untyped-def]  # annotations would show in gm.code
            return scatter_into_base(x, METAS_X0, v)

        gm = make_fx(f)(torch.randn(3, 4), torch.randn(2))
        self.assertExpectedInline(
            gm.code.strip(),
            """\
def forward(self, x_1, v_1):
    select = torch.ops.aten.select.int(x_1, 0, 0)
    slice_1 = torch.ops.aten.slice.Tensor(select, 0, 1, 3);  slice_1 = None
    slice_scatter = torch.ops.aten.slice_scatter.default(select, v_1, 0, 1, 3);  select = v_1 = None
    select_scatter = torch.ops.aten.select_scatter.default(x_1, slice_scatter, 0, 0);  x_1 = slice_scatter = None
    return select_scatter""",
        )

    def test_symbolic_and_fake(self) -> None:
        def f(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return scatter_into_base(x, METAS_X0, v) + apply_view_meta_sequence(x, METAS_X0).sum()

        x, v = torch.randn(3, 4), torch.randn(2)
        gm = make_fx(f, tracing_mode="symbolic")(x, v)
        torch.testing.assert_close(gm(x, v), f(x, v))
        with FakeTensorMode() as mode:
            out = f(mode.from_tensor(x), mode.from_tensor(v))
        assert out.shape == (3, 4)

    def test_functionalize_and_inference_mode(self) -> None:
        def f(x: torch.Tensor) -> torch.Tensor:
            view = apply_view_meta_sequence(x, METAS_X0)
            x.copy_(scatter_into_base(x, METAS_X0, view * 2))
            return x

        x = torch.randn(3, 4)
        want = x.clone()
        want[0, 1:3] *= 2
        torch.testing.assert_close(torch.func.functionalize(f)(x.clone()), want)
        with torch.inference_mode():
            xi = x.clone()
            torch.testing.assert_close(f(xi), want)


class TestReverseUnderTracing(TestCase):
    def test_symbolic_trace_and_fake(self) -> None:
        # Under tracing the check's view comes from forward: a dead node.
        meta = ViewMeta(aten.transpose.int, (0, 1))
        gm = make_fx(lambda x, v: meta.reverse(x, v), tracing_mode="symbolic")(
            torch.randn(3, 4), torch.randn(4, 3)
        )
        self.assertExpectedInline(
            gm.code.strip(),
            """\
def forward(self, x_1, v_1):
    transpose = torch.ops.aten.transpose.int(x_1, 0, 1);  x_1 = transpose = None
    transpose_1 = torch.ops.aten.transpose.int(v_1, 0, 1);  v_1 = None
    return transpose_1""",
        )
        x, v = torch.randn(2, 5), torch.randn(5, 2)
        torch.testing.assert_close(gm(x, v), v.t())
        with FakeTensorMode() as mode:
            fx = mode.from_tensor(x)
            assert meta.reverse(fx, mode.from_tensor(v)).shape == (2, 5)
            with pytest.raises(ValueError, match=re.escape("but mutated_view has shape [2, 5]")):
                meta.reverse(fx, fx)


class TestRecordUnderTransforms(TestCase):
    # record_view_metas runs on a meta stand-in with the caller's modes off:
    # same ViewMetas everywhere, and nothing recorded into an enclosing trace.
    @staticmethod
    def f(x: torch.Tensor) -> torch.Tensor:
        metas = record_view_metas(x, lambda t: t[1].narrow(0, 0, 2))
        return scatter_into_base(x, metas, apply_view_meta_sequence(x, metas) * 2)

    def want(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[1, :2] *= 2
        return out

    def test_functionalize_and_vmap(self) -> None:
        x = torch.randn(4, 3)
        torch.testing.assert_close(torch.func.functionalize(self.f)(x), self.want(x))
        xs = torch.randn(2, 4, 3)
        torch.testing.assert_close(torch.vmap(self.f)(xs), torch.stack([self.want(t) for t in xs]))

    def test_make_fx_symbolic_records_nothing_extra(self) -> None:
        gm = make_fx(lambda x: self.f(x), tracing_mode="symbolic")(torch.randn(4, 3))
        self.assertExpectedInline(
            gm.code.strip(),
            """\
def forward(self, x_1):
    select = torch.ops.aten.select.int(x_1, 0, 1)
    slice_1 = torch.ops.aten.slice.Tensor(select, 0, 0, 2);  select = None
    mul = torch.ops.aten.mul.Tensor(slice_1, 2);  slice_1 = None
    select_1 = torch.ops.aten.select.int(x_1, 0, 1)
    slice_2 = torch.ops.aten.slice.Tensor(select_1, 0, 0, 2);  slice_2 = None
    slice_scatter = torch.ops.aten.slice_scatter.default(select_1, mul, 0, 0, 2);  select_1 = mul = None
    select_scatter = torch.ops.aten.select_scatter.default(x_1, slice_scatter, 0, 1);  x_1 = slice_scatter = None
    return select_scatter""",
        )

    def test_fake(self) -> None:
        with FakeTensorMode() as mode:
            metas = record_view_metas(mode.from_tensor(torch.randn(4, 6)), lambda t: t.chunk(3, 1)[1])
        assert metas == [ViewMeta(aten.split.Tensor, (2, 1), out_index=1, geometry=metas[0].geometry)]


def test_geometry_cache_gives_the_same_view() -> None:
    base = torch.randn(8, 6)
    metas = record_view_metas(base, lambda t: t[2:7].t()[1:4].select(1, 2))
    for _ in range(3):  # the second call hits the cache
        fast = apply_view_meta_sequence(base, metas)
        _same_view(fast, base[2:7].t()[1:4].select(1, 2))
        assert fast._base is base
    assert all(m._geometry_cache for m in metas)
    # a different base layout is a different cache entry
    other = torch.randn(6, 8).t()
    _same_view(apply_view_meta_sequence(other, metas), other[2:7].t()[1:4].select(1, 2))


def test_geometry_cache_is_skipped_under_autograd_and_modes() -> None:
    base = torch.randn(4, 5, requires_grad=True)
    metas = [ViewMeta(aten.select.int, (0, 1))]
    out = apply_view_meta_sequence(base, metas)
    assert type(out.grad_fn).__name__ == "SelectBackward0"
    with torch.no_grad():
        assert apply_view_meta_sequence(base, metas).grad_fn is None
    with FakeTensorMode():
        fake = torch.empty(4, 5)
        assert apply_view_meta_sequence(fake, metas).shape == (5,)


def test_module_imports_flow_one_way() -> None:
    # Every import statement of hopkit/functionalization, at module level, in a
    # function or under TYPE_CHECKING: its modules form no cycle, only
    # _torchgen imports torchgen, and of the rest of hopkit only the bottom
    # layer (hopkit._compat, hopkit._dispatch) is imported.
    import ast
    import graphlib
    import pathlib

    pkg = pathlib.Path(hf.__file__).parent
    modules = {p.stem for p in pkg.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(pkg.glob("*.py")):
        deps = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0 and node.module, f"{path.name}: relative import"
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "torchgen":
                    assert path.stem == "_torchgen", f"{path.name} imports {name}"
                elif parts[:2] == ["hopkit", "functionalization"]:
                    # a name re-exported by the package itself counts as __init__
                    deps.add(parts[2] if parts[2] in modules else "__init__")
                elif parts[0] == "hopkit":
                    assert ".".join(parts[:2]) in {"hopkit._compat", "hopkit._dispatch"}, (
                        f"{path.name} imports {name}"
                    )
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError, naming the cycle


@pytest.mark.parametrize(
    "make_batch, in_dims",
    [
        (lambda: torch.randn(3, 8, 6), 0),
        (lambda: torch.randn(8, 3, 6), 1),
        (lambda: torch.randn(6, 8, 3).permute(2, 1, 0), 0),
    ],
    ids=["batch-dim-0", "batch-dim-1", "per-example-transposed"],
)
def test_replay_under_vmap_matches_torch_and_skips_the_geometry_cache(
    make_batch: Callable[[], torch.Tensor], in_dims: int
) -> None:
    # A vmap-batched base is not a plain tensor (hopkit._dispatch's
    # nothing_intercepts_dispatch): replay runs op by op through vmap's
    # batching rules and neither reads nor fills the geometry cache.
    def view_fn(t: torch.Tensor) -> torch.Tensor:
        return t[2:7].t()[1:4].select(1, 2)

    xs = make_batch()
    metas = record_view_metas(xs.select(in_dims, 0), view_fn)
    for _ in range(2):
        out = torch.vmap(lambda t: apply_view_meta_sequence(t, metas), in_dims=in_dims)(xs)
        _same_view(out, torch.vmap(view_fn, in_dims=in_dims)(xs))
    assert not any(m._geometry_cache for m in metas)
    apply_view_meta_sequence(xs.select(in_dims, 0), metas)  # plain eager does fill it
    assert all(m._geometry_cache for m in metas)
    out = torch.vmap(lambda t: apply_view_meta_sequence(t, metas), in_dims=in_dims)(xs)
    _same_view(out, torch.vmap(view_fn, in_dims=in_dims)(xs))


# ---------------------------------------------------------------------------
# Error messages (pinned)
# ---------------------------------------------------------------------------


class TestErrors(TestCase):
    def test_not_an_overload(self) -> None:
        self.assertExpectedRaisesInline(
            TypeError,
            # split: its overloads are the same in every torch of the window
            # (select also has a Dimname overload up to torch 2.12).
            lambda: ViewMeta(aten.split),
            """hopkit: ViewMeta needs an OpOverload, but got the overload packet aten.split; pick one of its overloads: aten.split.Tensor, aten.split.sizes, aten.split.str, aten.split.default.""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: ViewMeta("aten::select.int"),  # type: ignore[arg-type]
            """hopkit: ViewMeta needs a view OpOverload such as torch.ops.aten.slice.Tensor, but got 'aten::select.int' of type str.""",
        )

    def test_not_a_view(self) -> None:
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: ViewMeta(aten.add.Tensor, (1,)),
            """hopkit: aten::add.Tensor is not a view op: its schema `aten::add.Tensor(Tensor self, Tensor other, *, Scalar alpha=1) -> Tensor` has no alias annotation tying the output to `Tensor(a) self`, so its output does not share storage with its input. Pass a view op such as torch.ops.aten.slice.Tensor.""",
        )
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: ViewMeta(aten.slice_copy.Tensor, (0, 1, 2)),
            """hopkit: aten::slice_copy.Tensor is not a view op: its schema `aten::slice_copy.Tensor(Tensor self, int dim=0, SymInt? start=None, SymInt? end=None, SymInt step=1) -> Tensor` has no alias annotation tying the output to `Tensor(a) self`, so its output does not share storage with its input. It is the copying variant of a view; pass torch.ops.aten.slice.Tensor.""",
        )

    def test_in_place_view(self) -> None:
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: ViewMeta(aten.transpose_.default, (0, 1)),
            """hopkit: aten::transpose_.default is an in-place op (its schema `aten::transpose_(Tensor(a!) self, int dim0, int dim1) -> Tensor(a!)` writes to an argument); ViewMeta replays out-of-place views. Pass torch.ops.aten.transpose.int instead.""",
        )
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: ViewMeta(aten.add_.Tensor, (1,)),
            """hopkit: aten::add_.Tensor is an in-place op (its schema `aten::add_.Tensor(Tensor(a!) self, Tensor other, *, Scalar alpha=1) -> Tensor(a!)` writes to an argument); ViewMeta replays out-of-place views. Pass torch.ops.aten.add.Tensor instead.""",
        )

    def test_may_copy(self) -> None:
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: ViewMeta(aten.reshape.default, ([4],)),
            """hopkit: aten::reshape.default may return a copy instead of a view, so it cannot be replayed as a view; pass torch.ops.aten.view.default instead, or record the view with ViewMeta.from_view(base, view).""",
        )

    def test_out_index(self) -> None:
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: ViewMeta(aten.split.Tensor, (2,)),
            """hopkit: aten::split.Tensor returns several views; pass out_index=i to pick which output this ViewMeta stands for.""",
        )
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: ViewMeta(aten.select.int, (0, 1), out_index=0),
            """hopkit: aten::select.int returns a single view, but out_index=0 was given; leave out_index=None.""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: ViewMeta(aten.unbind.int, (0,), out_index=-1),
            """hopkit: out_index must be a non-negative int, but got -1 for aten::unbind.int.""",
        )

    def test_arguments(self) -> None:
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: ViewMeta(aten.select.int, (0, 1, 2)),
            """hopkit: aten::select.int takes 2 positional arguments after self (dim, index), but ViewMeta got 3: (0, 1, 2).""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: ViewMeta(aten.select.int, (0,)),
            """hopkit: aten::select.int needs argument 'index' (schema `aten::select.int(Tensor(a) self, int dim, SymInt index) -> Tensor(a)`), but ViewMeta did not get it.""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: ViewMeta(aten.expand.default, ([2],), {"implict": True}),
            """hopkit: aten::expand.default has no argument 'implict'; its arguments after self are size, implicit.""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: ViewMeta(aten.select.int, (0, 1), {"dim": 0}),
            """hopkit: aten::select.int got argument 'dim' both in args and in kwargs.""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: ViewMeta(aten.unsqueeze.default, 0),  # type: ignore[arg-type]
            """hopkit: ViewMeta args must be a tuple of aten::unsqueeze.default's arguments after self, but got int; write args=(0,) for one argument.""",
        )

    def test_geometry_type(self) -> None:
        x = torch.randn(3, 4)
        meta = ViewMeta(aten.select.int, (0, 1), geometry=ViewGeometry.of(x, x[1]))
        assert meta.geometry is not None and meta.geometry.storage_offset == 4
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: ViewMeta(aten.select.int, (0, 1), geometry=(3, 4)),  # type: ignore[arg-type]
            """hopkit: ViewMeta geometry must be a hopkit.functionalization.ViewGeometry or None, but got tuple; build one with ViewGeometry.of(base, view).""",
        )

    def test_as_strided_fallback_layout_mismatch(self) -> None:
        x = torch.randn(4, 5)
        meta = ViewMeta.from_view(x, x.t()[1:3])
        self.assertExpectedRaisesInline(
            RuntimeError,
            lambda: meta.forward(torch.randn(5, 4).t()),
            """hopkit: a recorded as_strided view replays only on a base with the layout it was recorded on (sizes [4, 5], strides [5, 1]), but this base has sizes [4, 5] and strides [1, 4]. Replay on a base with the recorded layout (e.g. .contiguous() if the original was contiguous), or record the view with record_view_metas to replay it on any layout.""",
        )

    def test_inverse_of_dtype_changing_view_without_rule(self) -> None:
        z = torch.randn(3, dtype=torch.complex64)
        meta = ViewMeta(aten.real.default)
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: meta.reverse(z, meta.forward(z) * 2),
            """hopkit: cannot invert ViewMeta(aten.real.default, args=()): it changes dtype or conj/neg bits (torch.complex64 -> torch.float32) and hopkit has no inverse rule for it; express the view with view_as_real/view.dtype/_conj ViewMetas, which do.""",
        )

    def test_scatter_into_base_value(self) -> None:
        x = torch.randn(3, 4)
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: scatter_into_base(x, METAS_X0, torch.randn(3)),
            """hopkit: scatter_into_base needs new_view_value with the shape and dtype of the view apply_view_meta_sequence(base, metas) returns, [2] and torch.float32, but new_view_value has shape [3] and dtype torch.float32; pass a value of exactly that shape and dtype (unlike copy_, it is neither broadcast nor cast: expand it and .to() it first).""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: scatter_into_base([1.0], METAS_X0, torch.randn(2)),  # type: ignore[arg-type]
            """hopkit: scatter_into_base needs base to be a Tensor, but got list; pass the tensor the view is taken of.""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: scatter_into_base(x, METAS_X0, 1.0),  # type: ignore[arg-type]
            """hopkit: scatter_into_base needs new_view_value to be a Tensor with the view's shape, but got float; wrap scalars with torch.full_like(view, value).""",
        )

    def test_reverse_value(self) -> None:
        # The two cases: reverse used to build a [4, 3] base for a
        # [3, 4] one, and to reshape a (6, 2) value into a (2, 6) view.
        t = ViewMeta(aten.transpose.int, (0, 1))
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: t.reverse(torch.randn(3, 4), torch.randn(3, 4)),
            """hopkit: ViewMeta(aten.transpose.int, args=(0, 1)).reverse needs mutated_view with the shape and dtype of the view forward(base) returns, [4, 3] and torch.float32, but mutated_view has shape [3, 4] and dtype torch.float32; pass a value of exactly that shape and dtype (unlike copy_, it is neither broadcast nor cast: expand it and .to() it first).""",
        )
        v = ViewMeta(aten.view.default, ((2, 6),))
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: v.reverse(torch.randn(3, 4), torch.randn(6, 2)),
            """hopkit: ViewMeta(aten.view.default, args=((2, 6),)).reverse needs mutated_view with the shape and dtype of the view forward(base) returns, [2, 6] and torch.float32, but mutated_view has shape [6, 2] and dtype torch.float32; pass a value of exactly that shape and dtype (unlike copy_, it is neither broadcast nor cast: expand it and .to() it first).""",
        )
        # Eager copy_ broadcasts and casts these; reverse takes the view's new
        # value as is (as torch's ViewMeta inverses do), so it refuses them.
        s = ViewMeta(aten.slice.Tensor, (1, 1, 3))
        x = torch.randn(3, 4)
        s.forward(x).copy_(torch.randn(2))
        s.forward(x).copy_(torch.zeros(3, 2, dtype=torch.float64))
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: s.reverse(x, torch.randn(2)),
            """hopkit: ViewMeta(aten.slice.Tensor, args=(1, 1, 3, 1)).reverse needs mutated_view with the shape and dtype of the view forward(base) returns, [3, 2] and torch.float32, but mutated_view has shape [2] and dtype torch.float32; pass a value of exactly that shape and dtype (unlike copy_, it is neither broadcast nor cast: expand it and .to() it first).""",
        )
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: s.reverse(x, torch.zeros(3, 2, dtype=torch.float64)),
            """hopkit: ViewMeta(aten.slice.Tensor, args=(1, 1, 3, 1)).reverse needs mutated_view with the shape and dtype of the view forward(base) returns, [3, 2] and torch.float32, but mutated_view has shape [3, 2] and dtype torch.float64; pass a value of exactly that shape and dtype (unlike copy_, it is neither broadcast nor cast: expand it and .to() it first).""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: s.reverse(x, 1.0),  # type: ignore[arg-type]
            """hopkit: ViewMeta(aten.slice.Tensor, args=(1, 1, 3, 1)).reverse needs mutated_view to be a Tensor with the view's shape, but got float; wrap scalars with torch.full_like(view, value).""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: s.reverse(None, torch.randn(3, 2)),  # type: ignore[arg-type]
            """hopkit: ViewMeta(aten.slice.Tensor, args=(1, 1, 3, 1)).reverse needs base to be a Tensor, but got NoneType; pass the tensor the view is taken of.""",
        )
        # expand: a value shaped like the base is broadcastable to the view,
        # but it is not the view's new value (it used to be returned as is).
        e = ViewMeta(aten.expand.default, ([2, 3, 4],))
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: e.reverse(x, x + 1),
            """hopkit: ViewMeta(aten.expand.default, args=((2, 3, 4),), kwargs={'implicit': False}).reverse needs mutated_view with the shape and dtype of the view forward(base) returns, [2, 3, 4] and torch.float32, but mutated_view has shape [3, 4] and dtype torch.float32; pass a value of exactly that shape and dtype (unlike copy_, it is neither broadcast nor cast: expand it and .to() it first).""",
        )

    def test_out_index_out_of_range(self) -> None:
        # Fixed by the arguments: refused at construction.
        self.assertExpectedRaisesInline(
            IndexError,
            lambda: ViewMeta(aten.split_with_sizes.default, ([1, 3], 0), out_index=2),
            """hopkit: out_index must be in range(2) for aten::split_with_sizes.default with args ((1, 3), 0), which returns 2 views, but out_index=2 was given; pass out_index between 0 and 1.""",
        )
        self.assertExpectedRaisesInline(
            IndexError,
            lambda: ViewMeta(aten.tensor_split.indices, ([2],), out_index=3),
            """hopkit: out_index must be in range(2) for aten::tensor_split.indices with args ((2,), 0), which returns 2 views, but out_index=3 was given; pass out_index between 0 and 1.""",
        )
        self.assertExpectedRaisesInline(
            IndexError,
            lambda: ViewMeta(aten.split_with_sizes.default, ([], 0), out_index=0),
            """hopkit: out_index must be in range(0) for aten::split_with_sizes.default with args ((), 0), which returns 0 views, but out_index=0 was given; no out_index is valid for these arguments.""",
        )
        # Fixed by the base: refused where it is replayed, the same on every path.
        x = torch.randn(3, 4)
        meta = ViewMeta(aten.unbind.int, (0,), out_index=3)
        expected = """hopkit: out_index must be in range(3) for aten::unbind.int with args (0,) on a base of shape [3, 4], which returns 3 views, but out_index=3 was given; replay it on a base where that output exists, or pass out_index between 0 and 2."""
        self.assertExpectedRaisesInline(IndexError, lambda: meta.forward(x), expected)
        for call in (
            lambda: apply_view_meta_sequence(x, [meta]),  # geometry cache
            lambda: apply_view_meta_sequence(x.requires_grad_(), [meta]),  # op by op
            lambda: meta.reverse(x, torch.randn(4)),
            lambda: scatter_into_base(x, [meta], torch.randn(4)),
        ):
            with pytest.raises(IndexError) as info:
                call()
            assert str(info.value) == expected
        assert meta.forward(torch.randn(5, 2)).shape == (2,)  # exists on a longer base
        self.assertExpectedRaisesInline(
            IndexError,
            lambda: ViewMeta(aten.split.Tensor, (2, 1), out_index=2).forward(x),
            """hopkit: out_index must be in range(2) for aten::split.Tensor with args (2, 1) on a base of shape [3, 4], which returns 2 views, but out_index=2 was given; replay it on a base where that output exists, or pass out_index between 0 and 1.""",
        )
        self.assertExpectedRaisesInline(
            IndexError,
            lambda: ViewMeta(aten.unbind.int, (1,), out_index=0).forward(torch.randn(3, 0)),
            """hopkit: out_index must be in range(0) for aten::unbind.int with args (1,) on a base of shape [3, 0], which returns 0 views, but out_index=0 was given; replay it on a base where that output exists.""",
        )

    def test_metas_must_be_view_metas(self) -> None:
        x = torch.randn(3, 4)
        t = ViewMeta(aten.t.default)
        expected = """hopkit: apply_view_meta_sequence needs metas to be hopkit ViewMetas, but metas[2] is a str; build each with ViewMeta(op, args) or record them with record_view_metas."""
        self.assertExpectedRaisesInline(
            TypeError, lambda: apply_view_meta_sequence(x, [t, t, "t"]), expected  # type: ignore[list-item]
        )
        # The same on the op-by-op path, where it is refused before any op runs.
        with _OpLog() as log, pytest.raises(TypeError) as info:
            apply_view_meta_sequence(x, (t, t, "t"))  # type: ignore[arg-type]
        assert str(info.value) == expected and log.ops == []
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: scatter_into_base(x, [t, None], x),  # type: ignore[list-item]
            """hopkit: scatter_into_base needs metas to be hopkit ViewMetas, but metas[1] is a NoneType; build each with ViewMeta(op, args) or record them with record_view_metas.""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: apply_view_meta_sequence(x, [t.to_torch()]),
            """hopkit: apply_view_meta_sequence needs metas to be hopkit ViewMetas, but metas[0] is torch's torch._C._functionalization.t_ViewMeta; convert torch's ViewMetas with ViewMeta.from_torch(m).""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: apply_view_meta_sequence(x, t),  # type: ignore[arg-type]
            """hopkit: apply_view_meta_sequence needs metas to be a sequence (list or tuple) of ViewMetas, but got a ViewMeta; wrap a single ViewMeta in a list: [meta].""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: scatter_into_base(x, (m for m in [t]), x.t()),  # type: ignore[arg-type]
            """hopkit: scatter_into_base needs metas to be a sequence (list or tuple) of ViewMetas, but got a generator; pass a list, e.g. list(metas).""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: apply_view_meta_sequence([[1.0]], [t]),  # type: ignore[arg-type]
            """hopkit: apply_view_meta_sequence needs base to be a Tensor, but got list; pass the tensor the view is taken of.""",
        )

    def test_record_view_metas(self) -> None:
        x = torch.randn(3, 4)
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: record_view_metas(x, lambda t: t + 1),
            """hopkit: record_view_metas: fn returned a tensor that is not a view of its argument (it was computed, not viewed); use view ops only (slicing, select, transpose, view, ...).""",
        )
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: record_view_metas(x, lambda t: t.add_(1)[0]),
            """hopkit: record_view_metas: fn mutated its argument (with aten.add_.Tensor); it must only take views (record the view first, then mutate through scatter_into_base).""",
        )

    def test_from_view(self) -> None:
        x = torch.randn(3, 4)
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: ViewMeta.from_view(x, x[0].clone()),
            """hopkit: ViewMeta.from_view: the view does not share storage with the base, so it is not a view of it; pass the tensor it was viewed from as base.""",
        )
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: ViewMeta.from_view(x, x.view(torch.int32)),
            """hopkit: ViewMeta.from_view: the view has dtype torch.int32 but the base has torch.float32; as_strided cannot change dtype. Record the dtype view with ViewMeta(torch.ops.aten.view.dtype, (dtype,)) and the rest from it.""",
        )

    def test_as_strided_inverse_needs_contiguous_base(self) -> None:
        x = torch.randn(4, 3).t()
        meta = ViewMeta(aten.as_strided.default, ([2], [1], 0))
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: meta.reverse(x, torch.randn(2)),
            """hopkit: cannot invert ViewMeta(aten.as_strided.default, args=((2,), (1,), 0)) through as_strided: the base has sizes [3, 4] and strides [1, 3], which are not contiguous, so the view's strides do not map onto a fresh copy of it. Record the view on a contiguous base, or use view ops that have inverse rules.""",
        )

    def test_torch_conversion(self) -> None:
        self.assertExpectedRaisesInline(
            ValueError,
            lambda: ViewMeta(aten.narrow.default, (0, 0, 1)).to_torch(),
            """hopkit: torch has no generated ViewMeta class narrow_ViewMeta for aten::narrow.default: torch generates them only for non-composite view ops in native_functions.yaml (composite views such as chunk or narrow are recorded as the views they decompose into).""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: ViewMeta.from_torch(object()),
            """hopkit: ViewMeta.from_torch needs one of torch's torch._C._functionalization.*_ViewMeta objects (from get_view_meta_sequence), but got object.""",
        )

    def test_unpickle_unknown_op_without_geometry(self) -> None:
        blob = pickle.dumps(ViewMeta(aten.slice.Tensor, (0, 1, 3)))
        blob = blob.replace(b"aten::slice.Tensor", b"hkgone::slc.Tensor")
        self.assertExpectedRaisesInline(
            RuntimeError,
            lambda: pickle.loads(blob),
            """hopkit: cannot unpickle a ViewMeta of hkgone::slc.Tensor: that operator is not registered in this process. Import or load the library that defines it (torch.ops.load_library / import the module) before unpickling, or pickle ViewMetas recorded with a geometry (ViewMeta.recorded(base)).""",
        )


def test_torch_class_conversion_round_trips_every_generated_class(view_groups: list[Any]) -> None:
    # Every generated class name maps back to its aten op.
    for cls_name, func in _generated_classnames(view_groups).items():
        op = _torch_classes._op_for_classname(cls_name)
        assert hf.classname(_torch_classes.torch_schema(op)) == cls_name
        assert str(func.name) == op._schema.name.split("::")[1] + (
            "" if op._overloadname == "default" else f".{op._overloadname}"
        )
