"""Tests for hopkit.export.inline_hops: HOP calls replaced by their bodies.

Reference semantics: the program with its HOP calls, run as it is (eager's
values); the inlined program must give the same values bit for bit, gradients
included, and have no call of the inlined HOPs left.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from typing import Any

import expecttest
import pytest
import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

import hopkit
import hopkit.export as hx
from hopkit.export import inline_autocast_hops_pass, inline_hops, wrap_with_autocast

ENTER = torch.amp.autocast_mode._enter_autocast
EXIT = torch.amp.autocast_mode._exit_autocast
CANONICAL = torch.__version__.startswith("2.13")


class Outer(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("test_inline_outer")


class Inner(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("test_inline_inner")


class WithContext(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("test_inline_with_context")

    def subgraph_context(self, config: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
        return torch.no_grad()


outer = Outer()
inner = Inner()
with_context = WithContext()


def inner_body(x: torch.Tensor) -> torch.Tensor:
    return x.cos() * 2  # one value, not a tuple


def outer_body(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = inner(hopkit.FunctionWithNoFreeVars(inner_body), x)
    return ((x @ w).sin() + c, x + 1)


def f(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = outer(hopkit.FunctionWithNoFreeVars(outer_body), x, w, scheme="nf4")
    return a * b, b.exp()


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = outer(hopkit.FunctionWithNoFreeVars(outer_body), x, self.w, scheme="nf4")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c = a @ b
        return a * b + c.float(), b


def inputs(n: int = 2, requires_grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 3, generator=g).requires_grad_(requires_grad) for _ in range(n)]


def flat(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_same(actual: Any, expected: Any) -> None:
    actual, expected = flat(actual), flat(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def hop_calls(gm: torch.fx.GraphModule) -> list[str]:
    """The names of the HOPs called anywhere in ``gm`` (bodies included)."""
    return sorted(
        n.target.__name__
        for m in gm.modules()
        if isinstance(m, torch.fx.GraphModule)
        for n in m.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)
    )


def autocast_nodes(gm: torch.fx.GraphModule) -> int:
    return sum(
        len(m.graph.find_nodes(op="call_function", target=t))
        for m in gm.modules()
        if isinstance(m, torch.fx.GraphModule)
        for t in (ENTER, EXIT)
    )


def grads(fn: Callable[..., Any], args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    loss = sum(o.sum() for o in flat(fn(*leaves)))
    return list(torch.autograd.grad(loss, leaves))


# ---------------------------------------------------------------------------
# GraphModules
# ---------------------------------------------------------------------------


class TestGraphModule(expecttest.TestCase):
    def test_nested_calls_inlined(self) -> None:
        args = inputs()
        gm = make_fx(f)(*args)
        assert hop_calls(gm) == ["test_inline_inner", "test_inline_outer"]
        new = inline_hops(gm)
        assert isinstance(new, torch.fx.GraphModule)
        assert hop_calls(new) == []
        assert_same(new(*args), gm(*args))
        assert_same(new(*args), f(*args))
        if CANONICAL:
            self.assertExpectedInline(new.code.strip(), """\
def forward(self, x_1, w_1) -> _tuple_torch_Tensor_torch_Tensor_:
    cos = torch.ops.aten.cos.default(x_1)
    mul = torch.ops.aten.mul.Tensor(cos, 2);  cos = None
    mm = torch.ops.aten.mm.default(x_1, w_1);  w_1 = None
    sin = torch.ops.aten.sin.default(mm);  mm = None
    add = torch.ops.aten.add.Tensor(sin, mul);  sin = mul = None
    add_1 = torch.ops.aten.add.Tensor(x_1, 1);  x_1 = None
    mul_1 = torch.ops.aten.mul.Tensor(add, add_1);  add = None
    exp = torch.ops.aten.exp.default(add_1);  add_1 = None
    return (mul_1, exp)""")

    def test_hops_selects_the_calls(self) -> None:
        args = inputs()
        gm = make_fx(f)(*args)
        only_inner = inline_hops(gm, hops=[inner])
        # The outer call stays; the inner call inside its body is inlined.
        assert hop_calls(only_inner) == ["test_inline_outer"]
        assert_same(only_inner(*args), gm(*args))
        only_outer = inline_hops(gm, hops=(outer,))
        assert hop_calls(only_outer) == ["test_inline_inner"]
        assert_same(only_outer(*args), gm(*args))

    def test_nothing_to_inline_returns_the_input(self) -> None:
        gm = make_fx(f)(*inputs())
        assert inline_hops(gm, hops=[wrap_with_autocast]) is gm
        assert inline_hops(gm, hops=[]) is gm
        plain = make_fx(lambda x: x.sin())(*inputs(1))
        assert inline_hops(plain) is plain

    def test_input_not_mutated(self) -> None:
        gm = make_fx(f)(*inputs())
        code = gm.code
        inline_hops(gm)
        assert gm.code == code
        assert hop_calls(gm) == ["test_inline_inner", "test_inline_outer"]

    def test_training_graph_with_backward_calls(self) -> None:
        # make_fx of forward and backward: each HOP call has a backward call
        # (a call of the same HOP on the backward graph); all are inlined.
        def train(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outs = f(x, w)
            loss = sum(o.sum() for o in outs)
            return (*outs, *torch.autograd.grad(loss, [x, w]))

        args = inputs(requires_grad=True)
        gm = make_fx(train)(*args)
        assert hop_calls(gm).count("test_inline_outer") == 2  # forward and backward
        new = inline_hops(gm)
        assert hop_calls(new) == []
        assert_same(new(*args), gm(*args))
        assert_same(new(*args)[2:], grads(f, args))

    def test_autocast_as_enter_exit_in_graph_modules(self) -> None:
        # A GraphModule keeps the autocast state as enter/exit nodes: the
        # inverse of replace_autocast_with_hop_pass, as inline_autocast_hops_pass.
        def g(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = outer(hopkit.FunctionWithNoFreeVars(outer_body), x, w)[0] @ w
            return y.float()

        args = inputs()
        gm = make_fx(g, pre_dispatch=True)(*args)
        hop_gm, _ = hx.replace_autocast_with_hop_pass(gm, None)
        assert "hopkit_wrap_with_autocast" in hop_calls(hop_gm)
        new = inline_hops(hop_gm)
        assert hop_calls(new) == []
        assert autocast_nodes(new) == 2
        assert_same(new(*args), gm(*args))
        with torch.autocast("cpu", enabled=False, cache_enabled=False):
            assert_same(new(*args), g(*args))

    def test_inline_autocast_hops_pass_is_the_autocast_case(self) -> None:
        def g(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = x @ w
                with torch.autocast("cpu", enabled=False):
                    z = y.float() @ w
            return z + y

        args = inputs()
        hop_gm, _ = hx.replace_autocast_with_hop_pass(make_fx(g, pre_dispatch=True)(*args), None)
        by_pass, _ = inline_autocast_hops_pass(hop_gm, None)
        by_inline = inline_hops(hop_gm, hops=[wrap_with_autocast])
        assert by_inline.code == by_pass.code
        assert_same(by_inline(*args), hop_gm(*args))


# ---------------------------------------------------------------------------
# ExportedPrograms
# ---------------------------------------------------------------------------


def _roundtrip(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    return torch.export.load(buf)


class TestExportedProgram(expecttest.TestCase):
    def test_inlined_program_works_everywhere(self) -> None:
        m = Model()
        (x,) = inputs(1)
        ep = hx.export(m, (x,))
        assert hop_calls(ep.graph_module) == [
            "hopkit_wrap_with_autocast", "test_inline_inner", "test_inline_outer"]
        new = inline_hops(ep)
        assert isinstance(new, torch.export.ExportedProgram)
        assert hop_calls(new.graph_module) == []
        # NOTE [Inlining wrap_with_autocast as enter/exit]: explicit casts here.
        assert autocast_nodes(new.graph_module) == 0
        outs = flat(new.graph_module.graph.output_node().args[0])
        assert [s.arg.name for s in new.graph_signature.output_specs] == [o.name for o in outs]  # type: ignore[union-attr]
        expected = m(x)
        assert_same(new.module()(x), expected)
        assert_same(new.run_decompositions().module()(x), expected)
        assert_same(_roundtrip(new).module()(x), expected)
        torch.testing.assert_close(grads(new.module(), [x]), grads(m, [x]), rtol=0, atol=0)
        if CANONICAL:
            self.assertExpectedInline(new.graph_module.code.strip(), """\
def forward(self, p_w, x):
    cos = torch.ops.aten.cos.default(x)
    mul = torch.ops.aten.mul.Tensor(cos, 2);  cos = None
    matmul = torch.ops.aten.matmul.default(x, p_w);  p_w = None
    sin = torch.ops.aten.sin.default(matmul);  matmul = None
    add = torch.ops.aten.add.Tensor(sin, mul);  sin = mul = None
    add_1 = torch.ops.aten.add.Tensor(x, 1);  x = None
    _to_copy = torch.ops.aten._to_copy.default(add_1, dtype = torch.bfloat16)
    _to_copy_1 = torch.ops.aten._to_copy.default(add, dtype = torch.bfloat16)
    mm = torch.ops.aten.mm.default(_to_copy_1, _to_copy);  _to_copy_1 = _to_copy = None
    mul_1 = torch.ops.aten.mul.Tensor(add, add_1);  add = None
    _assert_tensor_metadata_default = torch.ops.aten._assert_tensor_metadata.default(mm, dtype = torch.bfloat16, device = device(type='cpu'), layout = torch.strided);  _assert_tensor_metadata_default = None
    to = torch.ops.aten.to.dtype(mm, torch.float32);  mm = None
    add_2 = torch.ops.aten.add.Tensor(mul_1, to);  mul_1 = to = None
    return (add_2, add_1)""")

    def test_output_names_follow_the_body(self) -> None:
        # An output that was getitem(call, i) now has the body value's name,
        # in the signature and in the module call graph alike.
        class Direct(torch.nn.Module):
            def forward(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return outer(hopkit.FunctionWithNoFreeVars(outer_body), x, w)

        args = tuple(inputs())
        ep = torch.export.export(Direct(), args)
        new = inline_hops(ep, hops=[outer, inner])
        outs = [o.name for o in flat(new.graph_module.graph.output_node().args[0])]
        assert [s.arg.name for s in new.graph_signature.output_specs] == outs  # type: ignore[union-attr]
        sig = new.module_call_graph[0].signature
        if sig is not None and sig.outputs:
            assert [a.name for a in sig.outputs] == outs  # type: ignore[union-attr]
        assert_same(new.module()(*args), Direct()(*args))
        assert_same(_roundtrip(new).module()(*args), Direct()(*args))

    def test_dynamic_shapes(self) -> None:
        class Rows(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.w = torch.nn.Parameter(torch.randn(3, 4))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                (y,) = outer(hopkit.FunctionWithNoFreeVars(lambda t: (inner_body(t) + 1,)), x)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    z = y @ self.w
                return z.float()

        m = Rows()
        ep = hx.export(m, (torch.randn(3, 3),), dynamic_shapes=({0: torch.export.Dim("b")},))
        new = inline_hops(ep)
        assert hop_calls(new.graph_module) == []
        x = torch.randn(5, 3)
        assert_same(new.module()(x), m(x))
        assert_same(_roundtrip(new).module()(x), m(x))

    def test_after_run_decompositions(self) -> None:
        m = Model()
        (x,) = inputs(1)
        decomposed = hx.export(m, (x,)).run_decompositions()
        assert "test_inline_outer" in hop_calls(decomposed.graph_module)
        new = inline_hops(decomposed)
        assert hop_calls(new.graph_module) == []
        assert autocast_nodes(new.graph_module) == 0
        assert_same(new.module()(x), m(x))
        assert_same(_roundtrip(new).module()(x), m(x))

    def test_only_some_hops(self) -> None:
        m = Model()
        (x,) = inputs(1)
        new = inline_hops(hx.export(m, (x,)), hops=[wrap_with_autocast])
        assert hop_calls(new.graph_module) == ["test_inline_inner", "test_inline_outer"]
        assert_same(new.module()(x), m(x))
        assert_same(_roundtrip(new).module()(x), m(x))


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class TestErrors(expecttest.TestCase):
    def test_not_a_program(self) -> None:
        self.assertExpectedRaisesInline(
            TypeError, lambda: inline_hops(Model()),
            """hopkit: inline_hops expects a torch.fx.GraphModule or a torch.export.ExportedProgram, but got a Model; export it first (hopkit.export.export(model, args) or torch.export.export).""")
        self.assertExpectedRaisesInline(
            TypeError, lambda: inline_hops(torch.fx.Graph()),
            """hopkit: inline_hops expects a torch.fx.GraphModule or a torch.export.ExportedProgram, but got a Graph; wrap it as torch.fx.GraphModule(root, graph).""")
        self.assertExpectedRaisesInline(
            TypeError, lambda: inline_hops(3),
            """hopkit: inline_hops expects a torch.fx.GraphModule or a torch.export.ExportedProgram, but got an int; pass ep or ep.graph_module.""")

    def test_bad_hops(self) -> None:
        gm = make_fx(f)(*inputs())
        self.assertExpectedRaisesInline(
            TypeError, lambda: inline_hops(gm, hops=outer),  # type: ignore[arg-type]
            """hopkit: inline_hops expects hops to be an iterable of hopkit HOPs or None, but got the HOP test_inline_outer itself; pass hops=[test_inline_outer].""")
        self.assertExpectedRaisesInline(
            TypeError, lambda: inline_hops(gm, hops="test_inline_outer"),  # type: ignore[arg-type]
            """hopkit: inline_hops expects hops to be an iterable of hopkit HOPs or None, but got a str; pass e.g. hops=[hopkit.export.wrap_with_autocast], or leave it out to inline every hopkit HOP.""")
        self.assertExpectedRaisesInline(
            TypeError, lambda: inline_hops(gm, hops=[outer, torch.ops.higher_order.cond]),  # type: ignore[list-item]
            """hopkit: inline_hops expects hops to hold hopkit HOPs (instances of hopkit.BaseHOP, such as hopkit.export.wrap_with_autocast), but hops[1] is torch.ops.higher_order.cond, a HOP that is not hopkit's; leave it out of hops: inline_hops inlines hopkit HOPs only.""")
        self.assertExpectedRaisesInline(
            TypeError, lambda: inline_hops(gm, hops=["test_inline_outer"]),  # type: ignore[list-item]
            """hopkit: inline_hops expects hops to hold hopkit HOPs (instances of hopkit.BaseHOP, such as hopkit.export.wrap_with_autocast), but hops[0] is a str; pass the HOP objects themselves (instances of hopkit.BaseHOP).""")

    def test_hop_with_its_own_context(self) -> None:
        def g(x: torch.Tensor) -> tuple[torch.Tensor]:
            return with_context(hopkit.FunctionWithNoFreeVars(lambda t: (t.sin(),)), x)

        gm = make_fx(g)(*inputs(1))
        code = gm.code
        self.assertExpectedRaisesInline(
            ValueError, lambda: inline_hops(gm),
            """hopkit: inline_hops cannot inline node 'test_inline_with_context' (%test_inline_with_context : [num_users=1] = call_function[target=torch.ops.higher_order.test_inline_with_context](args = (%subgraph_0, %x_1), kwargs = {})): WithContext runs its body under its own subgraph_context, which a graph cannot express as nodes; leave test_inline_with_context out of hops (hops=[...] naming the others).""")
        assert gm.code == code
        # Leaving it out works.
        assert inline_hops(gm, hops=[outer]) is gm

    def test_malformed_call(self) -> None:
        gm = make_fx(f)(*inputs())
        (node,) = gm.graph.find_nodes(op="call_function", target=outer)
        node.args = node.args[:2]  # one operand fewer than the body takes
        gm.recompile()
        self.assertExpectedRaisesInline(
            ValueError, lambda: inline_hops(gm),
            """hopkit: inline_hops expects test_inline_outer(subgraph, *operands, **config) calls with a get_attr of a GraphModule as the subgraph, but in node 'test_inline_outer' (%test_inline_outer : [num_users=2] = call_function[target=torch.ops.higher_order.test_inline_outer](args = (%subgraph_0, %x_1), kwargs = {scheme: nf4})) its subgraph 'subgraph_0' takes 2 input(s), but the call passes 1 operand(s); fix that node (the calls hopkit's HOPs trace have this form).""")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_values_on_device(device: str) -> None:
    args = [a.to(device) for a in inputs()]
    gm = make_fx(f)(*args)
    assert_same(inline_hops(gm)(*args), f(*args))
