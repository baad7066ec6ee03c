"""hopkit.BaseHOP in every mode SPEC §1 names, against calling the subgraph directly."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterator
from typing import Any

from unittest import mock

import pytest
import torch
from expecttest import assert_expected_inline
from torch._dynamo.testing import AotEagerAndRecordGraphs, EagerAndRecordGraphs
from torch.fx.experimental.proxy_tensor import make_fx

import hopkit


class InvokeQuant(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_test_invoke_quant")


invoke_quant = InvokeQuant()


def g(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
    return (x.sin() * y,)


G = hopkit.FunctionWithNoFreeVars(g)


def mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor]:
    return ((x @ w1).relu() @ w2,)


# A body whose real executions we can count: the custom op's Python body runs
# only on real tensors, never under fake tracing.
_calls: list[str] = []


@torch.library.custom_op("hopkit_test_base::count", mutates_args=())
def count(x: torch.Tensor) -> torch.Tensor:
    _calls.append("count")
    return x.clone()


@count.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


count.register_autograd(lambda ctx, grad: grad)


def counted(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
    return (count(x).sin() * y,)


def inputs(device: str, dtype: torch.dtype = torch.float32, requires_grad: bool = True,
           n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen, dtype=dtype).to(device).requires_grad_(requires_grad)
    y = torch.randn(n, generator=gen, dtype=dtype).to(device).requires_grad_(requires_grad)
    return x, y


def grads_of(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    args = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
    out = fn(*args)
    out.sum().backward()
    return out.detach(), [a.grad for a in args]


def normalize(code: str) -> str:
    return re.sub(r"\n\s*\n", "\n", code).strip()


# ---------------------------------------------------------------------------
# eager
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_eager_matches_subgraph(device: str, grad: bool) -> None:
    x, y = inputs(device)
    with torch.set_grad_enabled(grad):
        out = invoke_quant(G, x, y, scheme="nf4")
        ref = g(x, y)
    assert isinstance(out, tuple) and len(out) == 1
    torch.testing.assert_close(out[0], ref[0])
    assert out[0].requires_grad == grad


def test_eager_backward_matches(device: str) -> None:
    out, grads = grads_of(lambda a, b: invoke_quant(G, a, b, scheme="nf4")[0], *inputs(device))
    ref, ref_grads = grads_of(lambda a, b: g(a, b)[0], *inputs(device))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_partial_requires_grad_and_single_tensor_output(device: str) -> None:
    x, _ = inputs(device)
    y = torch.randn(4, device=device)  # no grad
    single = hopkit.FunctionWithNoFreeVars(lambda a, b: (a * b).cos())
    out = invoke_quant(single, x, y)
    assert isinstance(out, torch.Tensor)
    out.sum().backward()
    torch.testing.assert_close(x.grad, -(x * y).sin().detach() * y)
    assert y.grad is None


def test_outputs_that_do_not_need_grad_are_not_differentiable() -> None:
    x = torch.randn(4, requires_grad=True)
    y = torch.randn(4)
    two = hopkit.FunctionWithNoFreeVars(lambda a, b: (a * 2, b + 1))
    a, b = invoke_quant(two, x, y)
    assert a.requires_grad and not b.requires_grad


def test_eager_training_traces_nothing() -> None:
    """Plain eager: autograd records the body as it runs (NOTE [BaseHOP plain-eager fast path])."""
    import torch.fx.experimental.proxy_tensor as proxy_tensor

    traces: list[int] = []
    original = proxy_tensor.make_fx

    def counting_make_fx(*a: Any, **k: Any) -> Any:
        traces.append(1)
        return original(*a, **k)

    x, y = inputs("cpu")
    proxy_tensor.make_fx = counting_make_fx  # type: ignore[assignment]
    try:
        for _ in range(5):
            # A fresh wrapper every step, as user code naturally writes it.
            out = invoke_quant(hopkit.FunctionWithNoFreeVars(g), x, y, scheme="nf4")[0]
            out.sum().backward()
    finally:
        proxy_tensor.make_fx = original
    assert traces == []


def test_compiled_graph_nodes_run_their_body_directly() -> None:
    """A HOP node of an aot_eager graph runs the body hopkit made without the
    dispatcher (NOTE [BaseHOP plain-eager fast path]); under a dispatch mode
    the same node goes through it, and the mode sees the body's ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    dispatched: list[int] = []
    real = torch._ops.HigherOrderOperator.__call__

    def spy(self: Any, *a: Any, **k: Any) -> Any:
        if self is invoke_quant:
            dispatched.append(1)
        return real(self, *a, **k)

    x, y = inputs("cpu")
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(lambda a, b: invoke_quant(G, a, b)[0], backend=backend,
                             fullgraph=True)
    compiled(x, y).sum().backward()  # compile
    forward_graph = backend.fw_graphs[0]
    with mock.patch.object(torch._ops.HigherOrderOperator, "__call__", spy):
        x.grad = y.grad = None
        compiled(x, y).sum().backward()
        assert dispatched == []
        torch.testing.assert_close(x.grad, (x.cos() * y).detach())
        a, b = x.detach(), y.detach()
        recorder = Recorder()
        with recorder:  # torch.compile would skip the frame: run the graph itself
            out = forward_graph(a, b)[0]
        assert dispatched == [1]
    assert "aten.sin.default" in recorder.ops and "aten.mul.Tensor" in recorder.ops
    torch.testing.assert_close(out, a.sin() * b)


def test_no_grad_skips_autograd_entirely() -> None:
    x, y = inputs("cpu", requires_grad=False)
    assert not invoke_quant(G, x, y)[0].requires_grad
    with torch.no_grad():
        out = invoke_quant(G, *inputs("cpu"))[0]
    assert out.grad_fn is None and not out.requires_grad


def test_body_runs_exactly_once_per_forward_call() -> None:
    _calls.clear()
    body = hopkit.FunctionWithNoFreeVars(counted)
    x, y = inputs("cpu")
    for _ in range(5):
        invoke_quant(body, x, y)[0].sum().backward()
    assert len(_calls) == 5
    _calls.clear()
    with torch.no_grad():
        invoke_quant(body, x, y)
    assert len(_calls) == 1


def test_gradcheck_and_gradgradcheck() -> None:
    x, y = inputs("cpu", dtype=torch.float64)

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return invoke_quant(G, a, b, scheme="nf4")[0]

    assert torch.autograd.gradcheck(fn, (x, y))
    assert torch.autograd.gradgradcheck(fn, (x, y))


def test_eager_mlp_body_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=gen, requires_grad=True)
    w1 = torch.randn(16, 16, generator=gen, requires_grad=True)
    w2 = torch.randn(16, 16, generator=gen, requires_grad=True)
    body = hopkit.FunctionWithNoFreeVars(mlp)
    out, grads = grads_of(lambda *a: invoke_quant(body, *a)[0], x, w1, w2)
    ref, ref_grads = grads_of(lambda *a: mlp(*a)[0], x, w1, w2)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# make_fx, FakeTensorMode, functionalize
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tracing_mode", ["real", "fake", "symbolic"])
def test_make_fx_keeps_one_node(tracing_mode: str, device: str) -> None:
    x, y = inputs(device, requires_grad=False)
    gm = make_fx(lambda a, b: invoke_quant(G, a, b, scheme="nf4"), tracing_mode=tracing_mode)(x, y)
    hop_nodes = gm.graph.find_nodes(op="call_function", target=invoke_quant)
    assert len(hop_nodes) == 1
    assert hop_nodes[0].kwargs == {"scheme": "nf4"}
    assert isinstance(gm.subgraph_0, torch.fx.GraphModule)
    torch.testing.assert_close(gm(x, y)[0], g(x, y)[0])
    if tracing_mode == "symbolic" and device == "cpu":
        assert_expected_inline(normalize(gm.code), """\
def forward(self, a_1, b_1):
    subgraph_0 = self.subgraph_0
    hopkit_test_invoke_quant = torch.ops.higher_order.hopkit_test_invoke_quant(subgraph_0, a_1, b_1, scheme = 'nf4');  subgraph_0 = a_1 = b_1 = None
    getitem = hopkit_test_invoke_quant[0];  hopkit_test_invoke_quant = None
    return (getitem,)""")
        assert_expected_inline(normalize(gm.subgraph_0.code), """\
def forward(self, arg0_1, arg1_1):
    sin = torch.ops.aten.sin.default(arg0_1);  arg0_1 = None
    mul = torch.ops.aten.mul.Tensor(sin, arg1_1);  sin = arg1_1 = None
    return (mul,)""")


def test_fake_tensor_mode_gives_output_metadata(device: str) -> None:
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 5, device=device)
        y = torch.empty(3, 5, device=device, dtype=torch.float32)
        (out,) = invoke_quant(G, x, y)
    assert isinstance(out, FakeTensor)
    assert out.shape == (3, 5) and out.dtype == torch.float32 and out.device.type == device


def test_functionalize_matches_and_traces_one_node(device: str) -> None:
    x, y = inputs(device, requires_grad=False)
    fn = torch.func.functionalize(lambda a, b: invoke_quant(G, a, b))
    torch.testing.assert_close(fn(x, y)[0], g(x, y)[0])
    gm = make_fx(fn)(x, y)
    assert len(gm.graph.find_nodes(op="call_function", target=invoke_quant)) == 1


def test_make_fx_of_backward_keeps_hop_nodes() -> None:
    x, y = inputs("cpu")

    def train_step(a: torch.Tensor, b: torch.Tensor) -> Any:
        out = invoke_quant(G, a, b, scheme="nf4")[0]
        return torch.autograd.grad(out.sum(), (a, b))

    gm = make_fx(train_step, tracing_mode="fake")(x, y)
    fw_node, bw_node = gm.graph.find_nodes(op="call_function", target=invoke_quant)
    # The backward node reads the forward node's saved activation: the joint is
    # traced once per call and nothing is recomputed.
    assert any(isinstance(a, torch.fx.Node) and a.target is operator.getitem
               and a.args[0] is fw_node for a in bw_node.args)
    ref = torch.autograd.grad(g(x, y)[0].sum(), (x, y))
    for a, b in zip(gm(x, y), ref):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------


def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return invoke_quant(g, x, y, scheme="nf4")[0].relu() + 1


def f_ref(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return g(x, y)[0].relu() + 1


@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
def test_compile_matches_eager(backend: str, device: str, grad: bool) -> None:
    x, y = inputs(device, requires_grad=grad)
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    if grad:
        out, grads = grads_of(compiled, x, y)
        ref, ref_grads = grads_of(f_ref, x, y)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)
    else:
        out, ref = compiled(x, y), f_ref(x, y)
    torch.testing.assert_close(out, ref)


def test_compile_dynamic_shapes(backend: str) -> None:
    compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=True)
    for n in (3, 5, 7):
        x, y = inputs("cpu", n=n)
        out, grads = grads_of(compiled, x, y)
        ref, ref_grads = grads_of(f_ref, x, y)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(grads[0], ref_grads[0])


def test_dynamo_graph_has_one_hop_node() -> None:
    backend = EagerAndRecordGraphs()
    torch.compile(f, backend=backend, fullgraph=True)(*inputs("cpu"))
    (gm,) = backend.graphs
    assert_expected_inline(normalize(gm.code), """\
def forward(self, L_x_ : torch.Tensor, L_y_ : torch.Tensor):
    l_x_ = L_x_
    l_y_ = L_y_
    subgraph_0 = self.subgraph_0
    hopkit_test_invoke_quant = torch.ops.higher_order.hopkit_test_invoke_quant(subgraph_0, l_x_, l_y_, scheme = 'nf4');  subgraph_0 = l_x_ = l_y_ = None
    getitem = hopkit_test_invoke_quant[0];  hopkit_test_invoke_quant = None
    relu = getitem.relu();  getitem = None
    add = relu + 1;  relu = None
    return (add,)""")


def test_aot_graphs_have_one_hop_node_each_way() -> None:
    backend = AotEagerAndRecordGraphs()
    x, y = inputs("cpu")
    torch.compile(f, backend=backend, fullgraph=True)(x, y).sum().backward()
    (fw,), (bw,) = backend.fw_graphs, backend.bw_graphs
    assert len(fw.graph.find_nodes(op="call_function", target=invoke_quant)) == 1
    assert len(bw.graph.find_nodes(op="call_function", target=invoke_quant)) == 1
    assert_expected_inline(normalize(fw.code), """\
def forward(self, primals_1, primals_2):
    subgraph_0 = self.subgraph_0
    hopkit_test_invoke_quant = torch.ops.higher_order.hopkit_test_invoke_quant(subgraph_0, primals_1, primals_2, scheme = 'nf4');  subgraph_0 = None
    getitem = hopkit_test_invoke_quant[0]
    getitem_1 = hopkit_test_invoke_quant[1];  hopkit_test_invoke_quant = None
    relu = torch.ops.aten.relu.default(getitem);  getitem = None
    detach = torch.ops.aten.detach.default(relu)
    add = torch.ops.aten.add.Tensor(relu, 1);  relu = None
    detach_1 = torch.ops.aten.detach.default(detach);  detach = None
    return (add, primals_1, primals_2, getitem_1, detach_1)""")
    # The forward subgraph is the body plus what backward needs (sin(x));
    # the operands themselves are not returned, the caller already holds them.
    assert_expected_inline(normalize(fw.subgraph_0.code), """\
def forward(self, arg0_1, arg1_1):
    sin = torch.ops.aten.sin.default(arg0_1);  arg0_1 = None
    mul = torch.ops.aten.mul.Tensor(sin, arg1_1);  arg1_1 = None
    return (mul, sin)""")
    # Backward takes the saved activation and does not recompute the forward.
    assert_expected_inline(normalize(bw.code), """\
def forward(self, primals_1, primals_2, getitem_1, detach_1, tangents_1):
    threshold_backward = torch.ops.aten.threshold_backward.default(tangents_1, detach_1, 0);  tangents_1 = detach_1 = None
    subgraph_1 = self.subgraph_1
    hopkit_test_invoke_quant_1 = torch.ops.higher_order.hopkit_test_invoke_quant(subgraph_1, primals_1, primals_2, getitem_1, threshold_backward, scheme = 'nf4');  subgraph_1 = primals_1 = primals_2 = getitem_1 = threshold_backward = None
    getitem_2 = hopkit_test_invoke_quant_1[0]
    getitem_3 = hopkit_test_invoke_quant_1[1];  hopkit_test_invoke_quant_1 = None
    return (getitem_2, getitem_3)""")
    assert_expected_inline(normalize(bw.subgraph_1.code), """\
def forward(self, arg0_1, arg1_1, arg2_1, arg3_1):
    mul = torch.ops.aten.mul.Tensor(arg3_1, arg2_1);  arg2_1 = None
    mul_1 = torch.ops.aten.mul.Tensor(arg3_1, arg1_1);  arg3_1 = arg1_1 = None
    cos = torch.ops.aten.cos.default(arg0_1);  arg0_1 = None
    mul_2 = torch.ops.aten.mul.Tensor(mul_1, cos);  mul_1 = cos = None
    return (mul_2, mul)""")


def test_inductor_post_grad_pass_sees_the_node_and_its_kwargs() -> None:
    seen: list[dict[str, Any]] = []

    def pre_pass(graph: torch.fx.Graph) -> None:
        for node in graph.find_nodes(op="call_function", target=invoke_quant):
            seen.append(dict(node.kwargs))

    with torch._inductor.config.patch(post_grad_custom_pre_pass=pre_pass):
        out = torch.compile(f, backend="inductor", fullgraph=True)(*inputs("cpu", requires_grad=False))
    assert seen == [{"scheme": "nf4"}]
    torch.testing.assert_close(out, f_ref(*inputs("cpu", requires_grad=False)))


def test_compile_training_many_steps_does_not_recompile() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    x, y = inputs("cpu")
    for _ in range(3):
        compiled(x, y).sum().backward()
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------


class Model(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        return invoke_quant(G, x, y, scheme="nf4")


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non_strict"])
def test_export_keeps_one_node(strict: bool, device: str) -> None:
    x, y = inputs(device, requires_grad=False)
    ep = torch.export.export(Model(), (x, y), strict=strict)
    for program in (ep, ep.run_decompositions()):
        nodes = program.graph.find_nodes(op="call_function", target=invoke_quant)
        assert len(nodes) == 1 and nodes[0].kwargs == {"scheme": "nf4"}
    a, b = inputs(device, requires_grad=False, n=4)
    torch.testing.assert_close(ep.module()(a, b)[0], g(a, b)[0])
    torch.testing.assert_close(ep.run_decompositions().module()(a, b)[0], g(a, b)[0])


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non_strict"])
def test_export_of_a_buffer_mutation(strict: bool) -> None:
    def body(x: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor]:
        buf.add_(x)
        return (x * 2,)

    wrapped = hopkit.FunctionWithNoFreeVars(body)

    class WithBuffer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("buf", torch.zeros(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return invoke_quant(wrapped, x, self.buf)[0]

    ep = torch.export.export(WithBuffer(), (torch.ones(3),), strict=strict).run_decompositions()
    assert len(ep.graph.find_nodes(op="call_function", target=invoke_quant)) == 1
    assert [spec.kind.name for spec in ep.graph_signature.output_specs] == [
        "BUFFER_MUTATION", "USER_OUTPUT"]
    module = ep.module()
    module(torch.ones(3))
    torch.testing.assert_close(module(torch.ones(3)), torch.full((3,), 2.0))
    torch.testing.assert_close(module.buf, torch.full((3,), 2.0))


def test_functionalize_an_exported_module(device: str) -> None:
    """The exported graph's subgraph (already checked, hence run directly) also
    goes through the functionalize rule's wrapper."""
    x, y = inputs(device, requires_grad=False)
    ep = torch.export.export(Model(), (x, y))
    out = torch.func.functionalize(ep.module())(x, y)
    torch.testing.assert_close(out[0], g(x, y)[0])


def test_export_graph() -> None:
    ep = torch.export.export(Model(), inputs("cpu", requires_grad=False), strict=True)
    assert_expected_inline(normalize(ep.graph_module.code), """\
def forward(self, x, y):
    subgraph_0 = self.subgraph_0
    hopkit_test_invoke_quant = torch.ops.higher_order.hopkit_test_invoke_quant(subgraph_0, x, y, scheme = 'nf4');  subgraph_0 = x = y = None
    getitem = hopkit_test_invoke_quant[0];  hopkit_test_invoke_quant = None
    return (getitem,)""")


# ---------------------------------------------------------------------------
# Input mutation (also through a view of an operand)
# ---------------------------------------------------------------------------


def mutate(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
    x.add_(1)
    return (x * y,)


def mutate_view(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
    x[0].mul_(2)
    x.t()[1].add_(3)
    return (x * y,)


MUTATORS = [pytest.param(mutate, id="in_place"), pytest.param(mutate_view, id="through_view")]


def _mutation_case(body: Callable[..., Any], device: str) -> tuple[Any, ...]:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 3, generator=gen).to(device)
    y = torch.randn(3, 3, generator=gen).to(device)
    x_ref = x0.clone()
    ref = body(x_ref, y)[0]
    return x0, y, x_ref, ref


@pytest.mark.parametrize("body", MUTATORS)
def test_mutation_eager_and_functionalize(body: Callable[..., Any], device: str) -> None:
    x0, y, x_ref, ref = _mutation_case(body, device)
    wrapped = hopkit.FunctionWithNoFreeVars(body)
    x = x0.clone()
    torch.testing.assert_close(invoke_quant(wrapped, x, y)[0], ref)
    torch.testing.assert_close(x, x_ref)
    x = x0.clone()
    out = torch.func.functionalize(lambda a, b: invoke_quant(wrapped, a, b))(x, y)
    torch.testing.assert_close(out[0], ref)
    torch.testing.assert_close(x, x_ref)


@pytest.mark.parametrize("body", MUTATORS)
def test_mutation_compiled(body: Callable[..., Any], backend: str, device: str) -> None:
    x0, y, x_ref, ref = _mutation_case(body, device)
    x = x0.clone()
    out = torch.compile(lambda a, b: invoke_quant(body, a, b)[0] + 1, backend=backend,
                        fullgraph=True)(x, y)
    torch.testing.assert_close(out, ref + 1)
    torch.testing.assert_close(x, x_ref)


def test_mutation_of_an_operand_that_is_a_view_of_the_callers_tensor(backend: str) -> None:
    base = torch.zeros(3, 4)
    ref = torch.zeros(3, 4)
    ref[1] += 1

    def fn(b: torch.Tensor) -> torch.Tensor:
        return invoke_quant(lambda v: (v.add_(1) * 2,), b[1])[0]

    out = torch.compile(fn, backend=backend, fullgraph=True)(base)
    torch.testing.assert_close(base, ref)
    torch.testing.assert_close(out, torch.full((4,), 2.0))


def test_mutation_graph_is_functional_with_a_copy_epilogue() -> None:
    x0, y, _, _ = _mutation_case(mutate, "cpu")
    wrapped = hopkit.FunctionWithNoFreeVars(mutate)
    gm = make_fx(torch.func.functionalize(lambda a, b: invoke_quant(wrapped, a, b)))(x0, y)
    assert_expected_inline(normalize(gm.code), """\
def forward(self, a_1, b_1):
    subgraph_0 = self.subgraph_0
    hopkit_test_invoke_quant = torch.ops.higher_order.hopkit_test_invoke_quant(subgraph_0, a_1, b_1);  subgraph_0 = b_1 = None
    getitem = hopkit_test_invoke_quant[0]
    getitem_1 = hopkit_test_invoke_quant[1];  hopkit_test_invoke_quant = None
    copy_ = torch.ops.aten.copy_.default(a_1, getitem_1);  a_1 = getitem_1 = copy_ = None
    return (getitem,)""")
    assert_expected_inline(normalize(gm.subgraph_0.code), """\
def forward(self, arg0_1, arg1_1):
    add = torch.ops.aten.add.Tensor(arg0_1, 1)
    mul = torch.ops.aten.mul.Tensor(add, arg1_1);  arg1_1 = None
    copy_ = torch.ops.aten.copy_.default(arg0_1, add);  arg0_1 = copy_ = None
    return (mul, add)""")


def test_mutation_with_grad_on_other_operands() -> None:
    gen = torch.Generator().manual_seed(0)
    buf = torch.randn(4, generator=gen)
    w = torch.randn(4, generator=gen, requires_grad=True)
    ref_buf = buf.clone()
    ref_out = mutate(ref_buf, w)[0]
    out = invoke_quant(hopkit.FunctionWithNoFreeVars(mutate), buf, w)[0]
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(buf, ref_buf)
    (grad,) = torch.autograd.grad(out.sum(), w)
    torch.testing.assert_close(grad, ref_buf)


def test_mutation_of_a_buffer_while_training(backend: str) -> None:
    """A BatchNorm-like body: updates running stats, trains its weight."""

    def body(x: torch.Tensor, w: torch.Tensor, stats: torch.Tensor) -> tuple[torch.Tensor]:
        stats.add_(x.detach().mean(0))
        return ((x @ w).relu(),)

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
            self.register_buffer("stats", torch.zeros(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return invoke_quant(body, x, self.w, self.stats)[0].sum()

    model, ref = M(), M()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        compiled(x).backward()
        body(x, ref.w, ref.stats)[0].sum().backward()
    torch.testing.assert_close(model.stats, ref.stats)
    torch.testing.assert_close(model.w.grad, ref.w.grad)


# Operands that alias each other: NOTE [Operands that alias each other].


def mutate_whole_read_row(x: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor]:
    x.mul_(2)
    return (row + 1,)


def mutate_column_read_whole(x: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor]:
    col.mul_(10)
    return (x + 1,)


ALIASED = [
    pytest.param(mutate_whole_read_row, lambda a: a[0], id="row_of_x"),
    pytest.param(mutate_column_read_whole, lambda a: a.t()[1], id="column_of_x"),
]


@pytest.mark.parametrize("mode", ["eager", "functionalize", "aot_eager", "inductor"])
@pytest.mark.parametrize("body,view", ALIASED)
def test_operands_that_alias_each_other(body: Callable[..., Any], view: Callable[..., Any],
                                        mode: str) -> None:
    x0 = torch.arange(6.0).reshape(2, 3)
    x_ref = x0.clone()
    ref = body(x_ref, view(x_ref))[0]
    x = x0.clone()
    wrapped = hopkit.FunctionWithNoFreeVars(body)
    if mode == "eager":
        out = invoke_quant(wrapped, x, view(x))[0]
    elif mode == "functionalize":
        out = torch.func.functionalize(lambda a: invoke_quant(wrapped, a, view(a)))(x)[0]
    else:
        out = torch.compile(lambda a: invoke_quant(body, a, view(a))[0], backend=mode,
                            fullgraph=True)(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x, x_ref)


def mutate_first_read_second(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor]:
    a.mul_(-1)
    return (b * 1,)


def _run_in_mode(mode: str, body: Callable[..., Any], base: torch.Tensor,
                 views: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """hop(body, *views(base)) in ``mode``; returns the output (base is mutated)."""
    wrapped = hopkit.FunctionWithNoFreeVars(body)
    if mode == "eager":
        return invoke_quant(wrapped, *views(base))[0]
    if mode == "functionalize":
        return torch.func.functionalize(lambda t: invoke_quant(wrapped, *views(t)))(base)[0]
    torch._dynamo.reset()
    return torch.compile(lambda t: invoke_quant(body, *views(t))[0], backend=mode,
                         fullgraph=True)(base)


PARTLY_OVERLAPPING = [
    # A column and a row of one matrix: their element ranges overlap, yet the
    # row does not lie within the column (the case that read out of bounds).
    pytest.param(lambda t: (t[:, 0], t[0]), id="column_and_row"),
    pytest.param(lambda t: (t[0], t[:, 0]), id="row_and_column"),
    pytest.param(lambda t: (t.view(-1)[:7], t.view(-1)[4:]), id="overlapping_slices"),
    pytest.param(lambda t: (t[:, 0], t[:, 1]), id="interleaved_columns"),
    pytest.param(lambda t: (t[0], t[1]), id="disjoint_rows"),
    pytest.param(lambda t: (t.t(), t[1:, 1:]), id="transpose_and_block"),
]


@pytest.mark.parametrize("mode", ["eager", "functionalize", "aot_eager", "inductor"])
@pytest.mark.parametrize("views", PARTLY_OVERLAPPING)
def test_partly_overlapping_operands_with_a_mutation(
        views: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], mode: str) -> None:
    ref_base = torch.arange(12.0).reshape(3, 4) + 1
    ref = mutate_first_read_second(*views(ref_base))[0]
    base = torch.arange(12.0).reshape(3, 4) + 1
    out = _run_in_mode(mode, mutate_first_read_second, base, views)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(base, ref_base)


def test_operands_of_different_dtypes_sharing_memory() -> None:
    # Reading is fine; a mutation cannot be kept in step and is refused.
    x = torch.arange(4, dtype=torch.int32)
    reader = hopkit.FunctionWithNoFreeVars(lambda a, b: (a * 2, b + 1))
    out = torch.func.functionalize(lambda t: invoke_quant(reader, t, t.view(torch.float32)))(x)
    torch.testing.assert_close(out[0], x * 2)
    torch.testing.assert_close(out[1], x.view(torch.float32) + 1)
    writer = hopkit.FunctionWithNoFreeVars(lambda a, b: (a.add_(1), (b * 1,))[1])
    msg = error_of(lambda: torch.func.functionalize(
        lambda t: invoke_quant(writer, t, t.view(torch.float32)))(x.clone()), RuntimeError)
    assert_expected_inline(msg, """hopkit: hopkit_test_invoke_quant's subgraph mutates an operand that shares memory with another of a different dtype (operands 0 and 1: torch.int32 and torch.float32), so functionalization cannot keep them in step; pass one of them and take the other inside the subgraph (x.view(dtype)).""")


_ALIAS_VIEWS: list[Callable[[torch.Tensor], torch.Tensor]] = [
    lambda t: t,                        # the same storage, whole
    lambda t: t[1],                     # a row
    lambda t: t[:, 2],                  # a column
    lambda t: t[1:, 1:3],               # a block
    lambda t: t.view(-1)[3:9],          # a slice of the flat storage
    lambda t: t.view(-1)[::3],          # strided
    lambda t: t.t(),                    # transposed
    lambda t: t[:, ::2],                # every other column
    lambda t: t.view(-1)[10:],          # the tail
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["functionalize", "make_fx", "aot_eager", "inductor"])
def test_property_aliasing_layouts_with_a_mutation(mode: str) -> None:
    # Two operands drawn from views of one 3x4 storage (same storage,
    # overlapping and disjoint slices, rows vs columns, strided); the body
    # mutates one and reads both: every mode agrees with eager.
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    def body(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a.mul_(-2).add_(1)
        return (a.sum() + b * 1, b.flatten()[:1] * 3)

    def swapped(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return body(b, a)

    examples = {"functionalize": 40, "make_fx": 20, "aot_eager": 12, "inductor": 5}[mode]

    @hypothesis.settings(max_examples=examples, deadline=None, derandomize=True)
    @hypothesis.given(st.integers(0, len(_ALIAS_VIEWS) - 1),
                      st.integers(0, len(_ALIAS_VIEWS) - 1), st.booleans())
    def check(i: int, j: int, swap: bool) -> None:
        fn = swapped if swap else body

        def views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _ALIAS_VIEWS[i](t), _ALIAS_VIEWS[j](t)

        ref_base = torch.arange(12.0).reshape(3, 4)
        ref = fn(*views(ref_base))
        base = torch.arange(12.0).reshape(3, 4)
        wrapped = hopkit.FunctionWithNoFreeVars(fn)
        if mode == "functionalize":
            out = torch.func.functionalize(lambda t: invoke_quant(wrapped, *views(t)))(base)
        elif mode == "make_fx":
            gm = make_fx(torch.func.functionalize(lambda t: invoke_quant(wrapped, *views(t))),
                         tracing_mode="fake")(torch.empty(3, 4))
            out = gm(base)
        else:
            torch._dynamo.reset()
            out = torch.compile(lambda t: invoke_quant(fn, *views(t)), backend=mode,
                                fullgraph=True)(base)
        torch.testing.assert_close(tuple(out), ref)
        torch.testing.assert_close(base, ref_base)

    check()


def test_output_aliasing_refused_under_compile() -> None:
    with pytest.raises(Exception, match="returned output 0, which aliases operand 0"):
        torch.compile(lambda a: invoke_quant(lambda v: (v[0],), a)[0], backend="aot_eager",
                      fullgraph=True)(torch.randn(2, 3))


class Outer(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_test_outer")


outer = Outer()


def inner_body(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (x.sin() * 2,)


def outer_body(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
    return (invoke_quant(inner_body, x, scheme="int8")[0] * y,)


def test_nested_hops(backend: str) -> None:
    x, y = inputs("cpu")

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return outer(outer_body, a, b)[0] + 1

    def ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return inner_body(a)[0] * b + 1

    out, grads = grads_of(torch.compile(fn, backend=backend, fullgraph=True), x, y)
    ref_out, ref_grads = grads_of(ref, x, y)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# gen_schema
# ---------------------------------------------------------------------------


def test_gen_schema() -> None:
    x, y = inputs("cpu", requires_grad=False)
    assert_expected_inline(str(invoke_quant.gen_schema(G, x, y, scheme="nf4")), """\
hopkit_test_invoke_quant(Any subgraph, Tensor arg0, Tensor arg1, *, str scheme="nf4") -> ((Tensor))""")
    mutating = hopkit.FunctionWithNoFreeVars(mutate)
    assert_expected_inline(str(invoke_quant.gen_schema(mutating, x.clone(), y, scheme="nf4")), """\
hopkit_test_invoke_quant(Any subgraph, Tensor(a1!) arg0, Tensor arg1, *, str scheme="nf4") -> ((Tensor))""")
    # gen_schema traces with fake tensors: the caller's tensors are untouched.
    x_before = x.clone()
    invoke_quant.gen_schema(mutating, x, y)
    torch.testing.assert_close(x, x_before)


# ---------------------------------------------------------------------------
# Subclass hooks: leading configuration and a subgraph context
# ---------------------------------------------------------------------------


class RunInDtype(hopkit.BaseHOP):
    """A toy HOP: ``run_in_dtype(dtype, subgraph, *operands)`` runs the body
    with the default dtype set, so factory calls inside it follow ``dtype``."""

    leading_config = ("dtype",)

    def __init__(self) -> None:
        super().__init__("hopkit_test_run_in_dtype")

    def subgraph_context(self, config: dict[str, Any]) -> Any:
        return _default_dtype(config["dtype"])


class _default_dtype:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __enter__(self) -> None:
        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.saved)


run_in_dtype = RunInDtype()


def add_ones(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (x + torch.ones(x.shape),)


def test_leading_config_and_context_in_every_rule(backend: str) -> None:
    body = hopkit.FunctionWithNoFreeVars(add_ones)
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (out,) = run_in_dtype(torch.float64, body, x)
    assert out.dtype == torch.float64
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, dtype=torch.float64))
    gm = make_fx(lambda a: run_in_dtype(torch.float64, body, a), tracing_mode="fake")(x.detach())
    (node,) = gm.graph.find_nodes(op="call_function", target=run_in_dtype)
    assert node.args[0] == torch.float64 and isinstance(node.args[1], torch.fx.Node)
    compiled = torch.compile(lambda a: run_in_dtype(torch.float64, add_ones, a)[0],
                             backend=backend, fullgraph=True)
    assert compiled(x.detach()).dtype == torch.float64


# ---------------------------------------------------------------------------
# Errors for bad input
# ---------------------------------------------------------------------------


def error_of(fn: Callable[[], Any], exc: type[BaseException] = Exception) -> str:
    with pytest.raises(exc) as info:
        fn()
    return str(info.value)


def test_error_subgraph_type_outside_compile() -> None:
    x, y = inputs("cpu")
    assert_expected_inline(error_of(lambda: invoke_quant(g, x, y), RuntimeError), """\
hopkit: hopkit_test_invoke_quant was called outside torch.compile with a subgraph of type function, which it cannot trace safely. Outside torch.compile the subgraph must be a torch.fx.GraphModule or a hopkit.FunctionWithNoFreeVars: wrap your function as hopkit.FunctionWithNoFreeVars(fn) (it must not read free variables; pass them as operands), or call the HOP inside torch.compile.""")


def test_error_missing_subgraph() -> None:
    assert_expected_inline(error_of(lambda: invoke_quant(), TypeError), """\
hopkit: hopkit_test_invoke_quant expects (subgraph, *operands, **config), but got no subgraph; pass a torch.fx.GraphModule or a hopkit.FunctionWithNoFreeVars first.""")
    assert_expected_inline(error_of(lambda: run_in_dtype(torch.float32), TypeError), """\
hopkit: hopkit_test_run_in_dtype expects (dtype, subgraph, *operands), but got 1 positional argument(s); pass the subgraph after 1 configuration argument(s).""")


def test_error_function_wrapper_needs_a_callable() -> None:
    assert_expected_inline(error_of(lambda: hopkit.FunctionWithNoFreeVars(3), TypeError), """\
hopkit: FunctionWithNoFreeVars expects a callable, but got int; pass the function that computes the subgraph, e.g. FunctionWithNoFreeVars(lambda x: (x.sin(),)).""")


def test_error_name_clash_with_torch_hop() -> None:
    class Clash(hopkit.BaseHOP):
        def __init__(self) -> None:
            super().__init__("cond")

    msg = error_of(Clash, ValueError)
    assert_expected_inline(msg, """hopkit: the HOP name 'cond' is already taken by torch._higher_order_ops.cond.CondOp (torch.ops.higher_order.cond); give test_base_hop.test_error_name_clash_with_torch_hop.<locals>.Clash another name, e.g. a prefix for your project.""")
    # Nothing was registered: torch's cond is still torch's.
    assert type(torch.ops.higher_order.cond).__name__ == "CondOp"


def test_error_name_clash_with_another_class_but_reload_is_allowed() -> None:
    class Other(hopkit.BaseHOP):
        def __init__(self) -> None:
            super().__init__("hopkit_test_invoke_quant")

    assert f"already taken by {__name__}.InvokeQuant" in error_of(Other, ValueError)
    again = InvokeQuant()  # the same class again, as a module reload does
    assert torch.ops.higher_order.hopkit_test_invoke_quant is again
    globals()["invoke_quant"] = again


def test_error_bad_name() -> None:
    class Bad(hopkit.BaseHOP):
        def __init__(self) -> None:
            super().__init__("not a name")

    assert_expected_inline(error_of(Bad, ValueError), """\
hopkit: a HOP name must be a Python identifier that is not a keyword (it becomes torch.ops.higher_order.<name>), but got 'not a name'; pick a name like 'my_invoke_quant'.""")


def _hop_named(name: str) -> Callable[[], hopkit.BaseHOP]:
    def make() -> hopkit.BaseHOP:
        cls = type("Named", (hopkit.BaseHOP,), {"__init__": lambda self: hopkit.BaseHOP.__init__(self, name)})
        return cls()

    return make


@pytest.mark.parametrize("name", ["_dir", "__class__", "__init__", "__getattr__", "__name__"])
def test_error_name_of_the_namespaces_own_attribute(name: str) -> None:
    # Such a HOP would overwrite torch.ops.higher_order's own state (a HOP
    # named _dir broke every later HOP and make_fx) or never be found there.
    dir_before = torch.ops.higher_order._dir
    msg = error_of(_hop_named(name), ValueError)
    assert msg.startswith(f"hopkit: the HOP name {name!r} is an attribute of the namespace torch.ops.higher_order itself")
    assert torch.ops.higher_order._dir is dir_before
    assert name not in torch._ops._higher_order_ops
    # The namespace still works: a new HOP is found and traces.
    hop = _hop_named("hopkit_test_after_bad_names")()
    assert torch.ops.higher_order.hopkit_test_after_bad_names is hop
    make_fx(lambda t: hop(hopkit.FunctionWithNoFreeVars(lambda a: (a + 1,)), t))(torch.randn(2))


def test_error_name_of_the_namespaces_own_attribute_message() -> None:
    assert_expected_inline(error_of(_hop_named("_dir"), ValueError), """\
hopkit: the HOP name '_dir' is an attribute of the namespace torch.ops.higher_order itself, so torch.ops.higher_order._dir could never be this HOP (and registering it would break the namespace); pick a name that does not start with an underscore, e.g. 'my_dir'.""")
    assert_expected_inline(error_of(_hop_named("if"), ValueError), """\
hopkit: a HOP name must be a Python identifier that is not a keyword (it becomes torch.ops.higher_order.<name>), but got 'if'; pick a name like 'my_invoke_quant'.""")


@pytest.mark.parametrize("bad", [[1], {"a": 1}, None, "s", (1,)], ids=["list", "dict", "None", "str", "tuple"])
def test_error_operands_that_are_not_tensors_or_scalars(bad: Any) -> None:
    a = torch.randn(3)
    body = hopkit.FunctionWithNoFreeVars(lambda t, x: (t * 2,))
    msg = error_of(lambda: invoke_quant(body, a, bad), TypeError)
    assert msg == (
        f"hopkit: hopkit_test_invoke_quant's operands must be Tensors or Python/symbolic "
        f"scalars (int, float, bool), but operands[1] is a {type(bad).__name__}; pass the "
        f"tensors of a list or dict as separate operands (hop(g, *tensors)), close over "
        f"other constants in the subgraph, or pass configuration as a keyword argument."
    )
    # Refused the same way everywhere, before anything is traced.
    assert error_of(lambda: make_fx(lambda t: invoke_quant(body, t, bad), tracing_mode="fake")(a),
                    TypeError) == msg
    assert error_of(lambda: invoke_quant.gen_schema(body, a, bad), TypeError) == msg


def test_error_operands_message() -> None:
    a = torch.randn(3)
    body = hopkit.FunctionWithNoFreeVars(lambda t, x: (t * 2,))
    assert_expected_inline(error_of(lambda: invoke_quant(body, a, [a]), TypeError), """\
hopkit: hopkit_test_invoke_quant's operands must be Tensors or Python/symbolic scalars (int, float, bool), but operands[1] is a list; pass the tensors of a list or dict as separate operands (hop(g, *tensors)), close over other constants in the subgraph, or pass configuration as a keyword argument.""")


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_scalar_operands_through_export(strict: bool) -> None:
    scale = hopkit.FunctionWithNoFreeVars(lambda t, n, f: (t * n + f,))

    class Scaled(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return invoke_quant(scale, t, 3, 0.5)[0]

    a = torch.randn(3)
    ep = torch.export.export(Scaled(), (a,), strict=strict)
    torch.testing.assert_close(ep.module()(a), a * 3 + 0.5)
    nodes = [n for n in ep.graph.nodes if n.target is invoke_quant]
    assert len(nodes) == 1
    torch.testing.assert_close(ep.run_decompositions().module()(a), a * 3 + 0.5)


@pytest.mark.parametrize("mode", ["eager", "make_fx", "aot_eager", "inductor"])
@pytest.mark.parametrize("body", [
    pytest.param(lambda t: (t + 1,), id="add_const"),
    pytest.param(lambda t: (t.clone(),), id="clone"),
    pytest.param(lambda t: (t.sum(),), id="sum_grad_is_expand"),
    pytest.param(lambda t: (t.view(-1) * 1,), id="view_then_mul"),
])
def test_backward_that_is_the_identity_or_a_view(body: Callable[..., Any], mode: str) -> None:
    # The grad of t + 1 is the incoming tangent itself, and that of a sum a
    # view of it: hopkit's backward graph must not hand back an alias.
    x = torch.randn(3, requires_grad=True)
    ref = torch.autograd.grad(body(x)[0].sum(), x)[0]
    wrapped = hopkit.FunctionWithNoFreeVars(body)

    def step(a: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(invoke_quant(wrapped, a)[0].sum(), a)[0]

    if mode == "eager":
        got = step(x)
    elif mode == "make_fx":
        got = make_fx(step)(x)(x)
    else:
        torch._dynamo.reset()
        y = x.detach().clone().requires_grad_()
        torch.compile(lambda a: invoke_quant(body, a)[0], backend=mode, fullgraph=True)(y).sum().backward()
        got = y.grad
    torch.testing.assert_close(got, ref)


def test_dynamo_sees_the_dtype_the_context_gives() -> None:
    # Dynamo traces the body under subgraph_context, as every other rule runs
    # it: a branch on the output dtype takes eager's side.
    from hopkit.export import wrap_with_autocast

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = wrap_with_autocast("cpu", torch.bfloat16, True, False, lambda a, b: (a @ b,), x, w)[0]
        return out * 2 if out.dtype == torch.bfloat16 else out * 3

    x, w = torch.randn(2, 2), torch.randn(2, 2)
    with torch.autocast("cpu", torch.bfloat16):
        ref = (x @ w) * 2
    for backend in ["eager", "aot_eager"]:
        torch._dynamo.reset()
        out = torch.compile(f, backend=backend, fullgraph=True)(x, w)
        assert out.dtype == torch.bfloat16, backend
        torch.testing.assert_close(out, ref)


def test_compile_an_exported_autocast_module() -> None:
    # The same cause: Dynamo saw float32 where the HOP gives bfloat16, and
    # compiling hopkit.export.export(...).module() failed with "Tensor dtype
    # mismatch".
    import hopkit.export

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", torch.bfloat16):
                y = self.lin(x)
            return y.float() + 1

    m, x = M(), torch.randn(3, 2)
    ep = hopkit.export.export(m, (x,))
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(ep.module(), backend="aot_eager")(x), m(x))


def test_error_output_aliases_operand() -> None:
    x = torch.randn(4)
    identity = hopkit.FunctionWithNoFreeVars(lambda a: (a[:2],))
    assert_expected_inline(error_of(lambda: invoke_quant(identity, x), RuntimeError), """\
hopkit: hopkit_test_invoke_quant's subgraph returned output 0, which aliases operand 0 (they share storage). A HOP's outputs must be fresh tensors, or functionalization and compilation cannot keep the aliasing correct; return a copy instead (e.g. x.clone() rather than x or a view of x).""")
    # The same refusal under tracing, never a silent wrong answer.
    with pytest.raises(RuntimeError, match="aliases operand 0"):
        make_fx(lambda a: invoke_quant(identity, a), tracing_mode="fake")(x)


def test_error_outputs_alias_each_other() -> None:
    twice = hopkit.FunctionWithNoFreeVars(lambda a: (a * 2, ) * 2)
    assert_expected_inline(error_of(lambda: invoke_quant(twice, torch.randn(3)), RuntimeError), """\
hopkit: hopkit_test_invoke_quant's subgraph returned output 1, which aliases output 0 (they share storage). A HOP's outputs must be fresh tensors, or functionalization and compilation cannot keep the aliasing correct; return a copy instead (e.g. x.clone() rather than x or a view of x).""")


def test_error_non_tensor_output() -> None:
    bad = hopkit.FunctionWithNoFreeVars(lambda a: (a * 2, 3))
    # The same refusal in eager as under tracing, so eager never accepts what compile would not.
    with pytest.raises(RuntimeError, match="output 1 is a int"):
        make_fx(lambda a: invoke_quant(bad, a), tracing_mode="fake")(torch.randn(3))
    assert_expected_inline(error_of(lambda: invoke_quant(bad, torch.randn(3, requires_grad=True)), RuntimeError), """\
hopkit: hopkit_test_invoke_quant's subgraph must return a Tensor or a tuple/list of Tensors, but output 1 is a int; return tensors (wrap Python numbers with torch.tensor) and keep other values out of the HOP.""")


def test_error_mutating_an_operand_that_requires_grad() -> None:
    w = torch.randn(4, requires_grad=True)
    body = hopkit.FunctionWithNoFreeVars(mutate)
    assert_expected_inline(error_of(lambda: invoke_quant(body, w, torch.randn(4)), RuntimeError), """a leaf Variable that requires grad is being used in an in-place operation.""")


def test_error_metadata_mutation_under_functionalization() -> None:
    body = hopkit.FunctionWithNoFreeVars(lambda a: (a.t_() * 1,))
    msg = error_of(lambda: torch.func.functionalize(lambda a: invoke_quant(body, a))(torch.randn(2, 3)),
                   RuntimeError)
    assert msg.startswith("hopkit: hopkit_test_invoke_quant's subgraph changes the shape or strides of operand 0")


def test_import_hopkit_stays_lean() -> None:
    import subprocess
    import sys

    code = ("import sys, hopkit; "
            "print(any(m.startswith(('torch._inductor', 'torch._dynamo.variables')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(autouse=True)
def _restore_default_dtype() -> Iterator[None]:
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def test_error_traced_mutation_of_an_operand_needing_grad() -> None:
    # Eager computes this (autograd records the body); traced autograd refuses
    # it clearly instead of torch's "a leaf Variable ..." from deep inside.
    body = hopkit.FunctionWithNoFreeVars(lambda t: (t.add_(1), (t * 3,))[1])
    x = torch.randn(3, requires_grad=True)
    eager = invoke_quant(body, x * 2)[0]
    torch.testing.assert_close(eager, (x * 2 + 1) * 3)
    msg = error_of(lambda: make_fx(lambda a: invoke_quant(body, a * 2)[0])(x), RuntimeError)
    assert_expected_inline(msg, """hopkit: hopkit_test_invoke_quant's subgraph mutates operand 0 in place, and operand 0 requires grad. Under traced autograd (make_fx, aot_eager, inductor, export) an in-place update of a HOP operand that requires grad is not supported (eager supports it for a non-leaf); clone it inside the subgraph (x = x.clone()) and return the new value, or pass a tensor that does not require grad.""")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="operand 0 requires grad. Under traced autograd"):
        torch.compile(lambda a: invoke_quant(lambda t: (t.add_(1), (t * 3,))[1], a * 2)[0],
                      backend="aot_eager", fullgraph=True)(x)


def test_error_traced_update_through_a_view_with_a_value_needing_grad() -> None:
    def through_view(buf: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor]:
        buf[1:].add_(x.sum(0)[1:])
        return (buf * 1,)

    def direct(buf: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor]:
        buf.add_(x.sum(0))
        return (buf * 1,)

    x = torch.randn(2, 3, requires_grad=True)
    # The direct update trains under aot_eager, with eager's grads.
    buf, ref_buf = torch.zeros(3), torch.zeros(3)
    ref = direct(ref_buf, x)[0]
    torch._dynamo.reset()
    out = torch.compile(lambda b, a: invoke_quant(direct, b, a)[0], backend="aot_eager",
                        fullgraph=True)(buf, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(buf, ref_buf)
    # Through a view the partitioner cannot split the joint: a clear refusal.
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(lambda b, a: invoke_quant(through_view, b, a)[0], backend="aot_eager",
                      fullgraph=True)(torch.zeros(3), x)
    msg = str(info.value)
    assert "hopkit: under traced autograd (make_fx, aot_eager, inductor, export), hopkit_test_invoke_quant's subgraph updates operand 0 in place with a value that requires grad" in msg
    assert "Update the operand directly rather than through a view" in msg


@pytest.mark.parametrize("result", [None, ()], ids=["None", "empty_tuple"])
@pytest.mark.parametrize("mode", ["eager", "aot_eager"])
def test_subgraph_returning_nothing(result: Any, mode: str) -> None:
    # A body that uses none of its operands and returns nothing: the HOP call
    # is the first node traced (this crashed with a bare StopIteration).
    a = torch.randn(3)
    if mode == "eager":
        out = invoke_quant(hopkit.FunctionWithNoFreeVars(lambda t: result), a)
    else:
        torch._dynamo.reset()
        out = torch.compile(lambda t: invoke_quant(lambda u: result, t), backend=mode)(a)
    assert out == result


@pytest.mark.parametrize("mode", ["eager", "make_fx", "aot_eager"])
def test_config_keys_that_are_parameter_names_of_the_rules(mode: str) -> None:
    # Config named like a rule's own parameter (self, hop, ctx, args) is
    # configuration like any other, not a clash inside hopkit.
    config = {"self": 1, "hop": 2.0, "ctx": None, "args": "a"}
    body = hopkit.FunctionWithNoFreeVars(lambda t: (t * 2,))
    x = torch.randn(3)
    if mode == "eager":
        out = invoke_quant(body, x, **config)[0]
    elif mode == "make_fx":
        gm = make_fx(lambda t: invoke_quant(body, t, **config)[0], tracing_mode="fake")(x)
        (node,) = [n for n in gm.graph.nodes if n.target is invoke_quant]
        assert node.kwargs == config
        out = gm(x)
    else:
        torch._dynamo.reset()
        out = torch.compile(lambda t: invoke_quant(lambda u: (u * 2,), t, **config)[0],
                            backend=mode, fullgraph=True)(x)
    torch.testing.assert_close(out, x * 2)


def test_error_config_names_torch_dispatch_reserves() -> None:
    body = hopkit.FunctionWithNoFreeVars(lambda t: (t * 2,))
    assert_expected_inline(error_of(lambda: invoke_quant(body, torch.randn(2), mode="fast"), TypeError), """\
hopkit: hopkit_test_invoke_quant's configuration may not be named 'mode': torch's higher-order-operator dispatch passes an argument of that name to functionalization rules itself, so the call would fail under torch.compile and torch.func.functionalize; rename it (e.g. mode_='fast').""")


def test_aliasing_operands_under_views_replayed_as_copies() -> None:
    # remove="mutations_and_views" gives view wrappers the layout of copies, so
    # where two operands overlap is unknowable: reading works, a mutation is
    # refused rather than replayed at the wrong offset.
    x = torch.arange(12.0).reshape(3, 4)
    reader = hopkit.FunctionWithNoFreeVars(lambda a, b: (a * 2, b + 1))
    out = torch.func.functionalize(lambda t: invoke_quant(reader, t, t[1]),
                                   remove="mutations_and_views")(x)
    torch.testing.assert_close(out[0], x * 2)
    torch.testing.assert_close(out[1], x[1] + 1)
    writer = hopkit.FunctionWithNoFreeVars(mutate_first_read_second)
    msg = error_of(lambda: torch.func.functionalize(lambda t: invoke_quant(writer, t, t[1]),
                                                    remove="mutations_and_views")(x.clone()),
                   RuntimeError)
    assert_expected_inline(msg, """hopkit: hopkit_test_invoke_quant's subgraph mutates operand 0, which shares memory with operand 1, but this functionalization replays views as copies (e.g. torch.func.functionalize(..., remove='mutations_and_views')), which hides where the two overlap, so the mutation cannot be replayed on both; use remove='mutations', or pass the tensor they are views of as one operand and take the views inside the subgraph.""")
