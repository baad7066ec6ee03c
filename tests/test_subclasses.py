"""BaseHOP on tensor subclass operands (NOTE [BaseHOP on tensor subclasses]).

TwoTensor (torch's test wrapper subclass: two tensors, every op applied to
both) in eager, under torch.compile (aot_eager, inductor), make_fx and
torch.export: results and grads equal to the body called on the same
TwoTensors, the HOP one node on the inner tensors in the AOT graphs, a
subclass's own rule (``hop.py_impl(SubclassType)``), and the refusal of a
subclass hopkit cannot see into. DTensor and tensor parallelism:
tests/test_distributed.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from expecttest import assert_expected_inline
from torch.fx.experimental.proxy_tensor import make_fx
from torch.testing._internal.two_tensor import TwoTensor

import hopkit
from hopkit.export import wrap_with_autocast


class SubclassHop(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_test_subclasses_hop")


sub_hop = SubclassHop()


def body(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tanh(x @ w), x.sin() * 2)


BODY = hopkit.FunctionWithNoFreeVars(body)


def two(*shape: int, grad: bool = True) -> TwoTensor:
    a = torch.randn(*shape, dtype=torch.float64)
    t = TwoTensor(a, torch.randn(*shape, dtype=torch.float64))
    return t.requires_grad_(grad)


def operands() -> tuple[TwoTensor, TwoTensor]:
    torch.manual_seed(0)
    return two(2, 3), two(3, 4)


def assert_two_close(got: Any, ref: Any) -> None:
    assert type(got) is TwoTensor, type(got)
    torch.testing.assert_close(got.a, ref.a)
    torch.testing.assert_close(got.b, ref.b)


def run_and_grad(fn: Callable[..., Any], x: torch.Tensor, w: torch.Tensor
                 ) -> tuple[Any, Any, Any]:
    out = fn(x, w)
    (out[0].sum() + out[1].sum()).backward()
    return out, x.grad, w.grad


def test_two_tensor_matches_the_body(backend: str) -> None:
    ref_out, ref_gx, ref_gw = run_and_grad(body, *operands())
    fn = lambda x, w: sub_hop(BODY, x, w)  # noqa: E731
    if backend != "eager":
        fn = torch.compile(fn, backend=backend, fullgraph=True)
    out, gx, gw = run_and_grad(fn, *operands())
    for got, ref in zip((*out, gx, gw), (*ref_out, ref_gx, ref_gw)):
        assert_two_close(got, ref)


def _aot_capture(graphs: list[torch.fx.GraphModule]) -> Any:
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm: torch.fx.GraphModule, _: Any) -> Any:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def _hop_nodes(gm: torch.fx.GraphModule, hop: Any = sub_hop) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is hop]


def test_aot_graphs_hold_one_hop_node_on_the_inner_tensors() -> None:
    graphs: list[torch.fx.GraphModule] = []
    fn = torch.compile(lambda x, w: sub_hop(BODY, x, w), backend=_aot_capture(graphs),
                       fullgraph=True)
    run_and_grad(fn, *operands())
    fw, bw = graphs
    assert len(_hop_nodes(fw)) == 1 and len(_hop_nodes(bw)) == 1
    for gm in (fw, bw):
        for node in _hop_nodes(gm):
            vals = [a.meta["val"] for a in node.args[1:]]
            assert all(type(v) is not TwoTensor for v in vals), vals
    assert_expected_inline(fw.code.strip(), """\
def forward(self, primals_1, primals_2, primals_3, primals_4):
    subgraph_0 = self.subgraph_0
    hopkit_test_subclasses_hop = torch.ops.higher_order.hopkit_test_subclasses_hop(subgraph_0, primals_1, primals_2, primals_3, primals_4);  subgraph_0 = None
    getitem = hopkit_test_subclasses_hop[0]
    getitem_1 = hopkit_test_subclasses_hop[1]
    getitem_2 = hopkit_test_subclasses_hop[2]
    getitem_3 = hopkit_test_subclasses_hop[3]
    getitem_4 = hopkit_test_subclasses_hop[4]
    getitem_5 = hopkit_test_subclasses_hop[5];  hopkit_test_subclasses_hop = None
    return (getitem, getitem_1, getitem_2, getitem_3, primals_1, primals_2, primals_3, primals_4, getitem_4, getitem_5)""")
    assert_expected_inline(fw.subgraph_0.code.strip(), """\
def forward(self, arg0_1, arg1_1, arg2_1, arg3_1):
    mm = torch.ops.aten.mm.default(arg0_1, arg2_1);  arg2_1 = None
    mm_1 = torch.ops.aten.mm.default(arg1_1, arg3_1);  arg3_1 = None
    tanh = torch.ops.aten.tanh.default(mm);  mm = None
    tanh_1 = torch.ops.aten.tanh.default(mm_1);  mm_1 = None
    detach = torch.ops.aten.detach.default(tanh)
    detach_1 = torch.ops.aten.detach.default(tanh_1)
    sin = torch.ops.aten.sin.default(arg0_1);  arg0_1 = None
    sin_1 = torch.ops.aten.sin.default(arg1_1);  arg1_1 = None
    mul = torch.ops.aten.mul.Tensor(sin, 2);  sin = None
    mul_1 = torch.ops.aten.mul.Tensor(sin_1, 2);  sin_1 = None
    return (tanh, tanh_1, mul, mul_1, detach, detach_1)""")


def test_nested_two_tensor_under_aot_eager() -> None:
    torch.manual_seed(0)

    def nested(*shape: int) -> TwoTensor:
        return TwoTensor(two(*shape, grad=False), two(*shape, grad=False)).requires_grad_()

    x, w = nested(2, 3), nested(3, 4)
    xr, wr = (t.detach().clone().requires_grad_() for t in (x, w))
    ref_out, ref_gx, _ = run_and_grad(body, xr, wr)
    graphs: list[torch.fx.GraphModule] = []
    fn = torch.compile(lambda x, w: sub_hop(BODY, x, w), backend=_aot_capture(graphs),
                       fullgraph=True)
    out, gx, _ = run_and_grad(fn, x, w)
    for got, ref in ((out[0], ref_out[0]), (gx, ref_gx)):
        assert type(got.a) is TwoTensor
        assert_two_close(got.a, ref.a)
        assert_two_close(got.b, ref.b)
    # One node in each graph, on the four plain tensors inside each operand.
    assert [len(_hop_nodes(g)) for g in graphs] == [1, 1]
    assert len(_hop_nodes(graphs[0])[0].args) == 1 + 8


def test_make_fx_records_the_hop_on_the_traced_subclass() -> None:
    # make_fx records aten ops on subclass placeholders at the subclass level;
    # a HOP call on them is recorded the same way.
    x, w = (t.detach() for t in operands())
    gm = make_fx(lambda x, w: sub_hop(BODY, x, w), tracing_mode="fake")(x, w)
    assert_expected_inline(gm.code.strip(), """\
def forward(self, x_1, w_1):
    subgraph_0 = self.subgraph_0
    hopkit_test_subclasses_hop = torch.ops.higher_order.hopkit_test_subclasses_hop(subgraph_0, x_1, w_1);  subgraph_0 = x_1 = w_1 = None
    getitem = hopkit_test_subclasses_hop[0]
    getitem_1 = hopkit_test_subclasses_hop[1];  hopkit_test_subclasses_hop = None
    return (getitem, getitem_1)""")
    out = gm(x, w)
    for got, ref in zip(out, body(x, w)):
        assert_two_close(got, ref)


class WithSubclassWeight(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(two(3, 4, grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sub_hop(BODY, x, self.w)[0]


def test_export_with_a_subclass_parameter() -> None:
    # torch.export of subclass *inputs* fails in torch itself (2.13:
    # run_decompositions raises IndexError in set_missing_meta_vals even
    # without a HOP), so the subclass is a parameter, as in a quantized model.
    m = WithSubclassWeight()
    x = torch.randn(2, 3, dtype=torch.float64)
    ep = torch.export.export(m, (x,), strict=False)
    assert len(_hop_nodes(ep.graph_module)) == 1
    ref = body(x, m.w)[0]
    assert_two_close(ep.module()(x), ref)
    decomposed = ep.run_decompositions()
    (node,) = _hop_nodes(decomposed.graph_module)
    vals = [a.meta["val"] for a in node.args[1:]]
    assert len(vals) == 3 and all(type(v) is not TwoTensor for v in vals), vals
    # The decomposed program's module() fails on subclass parameters in torch
    # itself (2.13: a pytree length mismatch, also without a HOP); its graph
    # takes and returns the inner tensors.
    got = decomposed.graph_module(m.w.a, m.w.b, x)
    torch.testing.assert_close(got[0], ref.a)
    torch.testing.assert_close(got[1], ref.b)


# -- a subclass's own rule ----------------------------------------------------


def _componentwise_hop(name: str, calls: list[str]) -> hopkit.BaseHOP:
    """A HOP whose TwoTensor rule runs the HOP once per component."""

    class ComponentwiseHop(hopkit.BaseHOP):
        def __init__(self) -> None:
            super().__init__(name)

    hop = ComponentwiseHop()

    @hop.py_impl(TwoTensor)
    def two_tensor_rule(subgraph: Any, *ops: Any, **config: Any) -> Any:
        calls.append("rule")
        a = hop(subgraph, *[o.a if isinstance(o, TwoTensor) else o for o in ops], **config)
        b = hop(subgraph, *[o.b if isinstance(o, TwoTensor) else o for o in ops], **config)
        return tuple(TwoTensor(p, q) for p, q in zip(a, b))

    return hop


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_subclass_rule_is_honoured(backend: str) -> None:
    calls: list[str] = []
    hop = _componentwise_hop(f"hopkit_test_subclasses_rule_{backend}", calls)
    ref_out, ref_gx, ref_gw = run_and_grad(body, *operands())
    graphs: list[torch.fx.GraphModule] = []
    fn = lambda x, w: hop(BODY, x, w)  # noqa: E731
    if backend != "eager":
        fn = torch.compile(fn, backend=_aot_capture(graphs), fullgraph=True)
    out, gx, gw = run_and_grad(fn, *operands())
    for got, ref in zip((*out, gx, gw), (*ref_out, ref_gx, ref_gw)):
        assert_two_close(got, ref)
    assert calls, "the rule was not called"
    if graphs:  # the rule's two calls, one per component, in forward and backward
        assert [len(_hop_nodes(g, hop)) for g in graphs] == [2, 2]


# -- what hopkit cannot handle ----------------------------------------------------


class Opaque(torch.Tensor):
    """A __torch_dispatch__ wrapper with no __tensor_flatten__: not traceable."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> Opaque:
        t = torch.Tensor._make_wrapper_subclass(cls, elem.shape, dtype=elem.dtype)
        t.elem = elem
        return t

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        import torch.utils._pytree as pytree

        unwrapped = pytree.tree_map_only(Opaque, lambda t: t.elem, (args, kwargs or {}))
        out = func(*unwrapped[0], **unwrapped[1])
        return pytree.tree_map_only(torch.Tensor, Opaque, out)


def test_an_untraceable_subclass_is_refused_under_tracing() -> None:
    def f(x: torch.Tensor, w: torch.Tensor) -> Any:
        return sub_hop(BODY, Opaque(x), w)

    x, w = torch.randn(2, 3), torch.randn(3, 4)
    with pytest.raises(NotImplementedError) as info:
        make_fx(f)(x, w)
    assert_expected_inline(str(info.value), """\
hopkit: hopkit_test_subclasses_hop was called on an operand of the tensor subclass test_subclasses.Opaque while a graph is traced, and Opaque is neither a traceable wrapper subclass (it has __torch_dispatch__ but no __tensor_flatten__ / __tensor_unflatten__, so hopkit cannot see its inner tensors) nor given a rule for this HOP. Implement __tensor_flatten__ and __tensor_unflatten__ on Opaque, or register a rule: @hopkit_test_subclasses_hop.py_impl(Opaque) def rule(subgraph, *operands, **config): ... (it receives the call's arguments and returns its outputs).""")
    # In eager, the body runs on it op by op.
    out = sub_hop(BODY, Opaque(x), w)
    torch.testing.assert_close(out[0].elem, body(x, w)[0])


# -- wrap_with_autocast --------------------------------------------------------


def _matmul(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
    return (x @ w,)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_wrap_with_autocast_on_two_tensors(backend: str) -> None:
    def make() -> tuple[TwoTensor, TwoTensor]:
        torch.manual_seed(0)
        return (TwoTensor(torch.randn(2, 3), torch.randn(2, 3)).requires_grad_(),
                TwoTensor(torch.randn(3, 4), torch.randn(3, 4)).requires_grad_())

    x, w = make()
    with torch.autocast("cpu", torch.bfloat16):
        ref = _matmul(x, w)[0]
    ref.float().sum().backward()
    ref_grads = (x.grad, w.grad)
    fn = lambda x, w: wrap_with_autocast(  # noqa: E731
        "cpu", torch.bfloat16, True, None, hopkit.FunctionWithNoFreeVars(_matmul), x, w)[0]
    if backend != "eager":
        fn = torch.compile(fn, backend=backend, fullgraph=True)
    x, w = make()
    out = fn(x, w)
    assert out.dtype is torch.bfloat16 and out.a.dtype is torch.bfloat16
    assert_two_close(out, ref)
    out.float().sum().backward()
    for got, want in zip((x.grad, w.grad), ref_grads):
        assert_two_close(got, want)
