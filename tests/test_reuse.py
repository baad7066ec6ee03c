"""Trace once, reuse everywhere: repeated BaseHOP calls share one trace.

NOTE [BaseHOP trace reuse] in hopkit/base_hop/_reuse.py. N calls of one body
with equal operand metadata and config give one body module in the Dynamo
graph, one joint trace and one forward and one backward body module in the
AOT graphs, one submodule in the exported program; calls that differ (shapes,
config, closed-over constants, effects) are traced anew; every result and
gradient equals eager's; ``reuse_traces = False`` gives one module per call.
"""

from __future__ import annotations

import gc
import re
import weakref
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import pytest
import torch
from expecttest import assert_expected_inline
from torch._dynamo.testing import AotEagerAndRecordGraphs, EagerAndRecordGraphs
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

import hopkit
from hopkit.base_hop import _reuse
from hopkit.effects import EffectType, register_effectful_op
from repeated_blocks import LAYER, layer, model, reference


class Block(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_test_reuse_block")


class BlockNoReuse(hopkit.BaseHOP):
    reuse_traces = False

    def __init__(self) -> None:
        super().__init__("hopkit_test_reuse_block_off")


block = Block()
block_off = BlockNoReuse()


def operands(n: int = 3, rows: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 4, generator=gen).requires_grad_()
    return [x] + [(torch.randn(4, 4, generator=gen) / 2).requires_grad_() for _ in range(n)]


def grads_of(fn: Callable[..., torch.Tensor], args: list[torch.Tensor]) -> tuple[Any, ...]:
    args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    out = fn(*args)
    out.sum().backward()
    return (out.detach(), *[a.grad for a in args])


def assert_all_close(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)


def normalize(code: str) -> str:
    return re.sub(r"\n\s*\n", "\n", code).strip()


def body_names(gm: torch.fx.GraphModule) -> list[str]:
    """The submodule each HOP node of ``gm`` calls, in order."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, hopkit.BaseHOP):
            names.append(str(node.args[0].target))
    return names


@pytest.fixture
def counts() -> Iterator[Callable[[], dict[str, int]]]:
    before = dict(_reuse.counters)

    def delta() -> dict[str, int]:
        return {k: v - before.get(k, 0) for k, v in _reuse.counters.items()
                if v - before.get(k, 0)}

    yield delta


# ---------------------------------------------------------------------------
# One body for N calls: Dynamo, AOT forward and backward, export
# ---------------------------------------------------------------------------


def test_dynamo_graph_references_one_body(counts: Callable[[], dict[str, int]]) -> None:
    backend = EagerAndRecordGraphs()
    args = operands()
    out = torch.compile(lambda *a: model(block, *a), backend=backend, fullgraph=True)
    assert_all_close(grads_of(out, args), grads_of(reference, args))
    (gm,) = backend.graphs
    assert body_names(gm) == ["subgraph_0"] * 3
    # Speculated once; the two later calls replay it.
    assert counts()["dynamo_installed"] == 1 and counts()["dynamo_replayed"] == 2
    assert_expected_inline(normalize(gm.code), """\
def forward(self, L_a_0_ : torch.Tensor, L_a_1_ : torch.Tensor, L_a_2_ : torch.Tensor, L_a_3_ : torch.Tensor):
    l_a_0_ = L_a_0_
    l_a_1_ = L_a_1_
    l_a_2_ = L_a_2_
    l_a_3_ = L_a_3_
    subgraph_0 = self.subgraph_0
    hopkit_test_reuse_block = torch.ops.higher_order.hopkit_test_reuse_block(subgraph_0, l_a_0_, l_a_1_);  subgraph_0 = l_a_0_ = l_a_1_ = None
    x = hopkit_test_reuse_block[0];  hopkit_test_reuse_block = None
    subgraph_1 = self.subgraph_0
    hopkit_test_reuse_block_1 = torch.ops.higher_order.hopkit_test_reuse_block(subgraph_1, x, l_a_2_);  subgraph_1 = x = l_a_2_ = None
    x_1 = hopkit_test_reuse_block_1[0];  hopkit_test_reuse_block_1 = None
    subgraph_2 = self.subgraph_0
    hopkit_test_reuse_block_2 = torch.ops.higher_order.hopkit_test_reuse_block(subgraph_2, x_1, l_a_3_);  subgraph_2 = x_1 = l_a_3_ = None
    x_2 = hopkit_test_reuse_block_2[0];  hopkit_test_reuse_block_2 = None
    return (x_2,)""")
    assert_expected_inline(normalize(gm.subgraph_0.code), """\
def forward(self, l_a_0_ : torch._subclasses.fake_tensor.FakeTensor, l_a_1_ : torch._subclasses.fake_tensor.FakeTensor):
    matmul = l_a_0_ @ l_a_1_;  l_a_1_ = None
    tanh = torch.tanh(matmul);  matmul = None
    mul = tanh * 0.5;  tanh = None
    add = mul + l_a_0_;  mul = l_a_0_ = None
    return (add,)""")


def test_aot_graphs_share_one_forward_and_one_backward_body(
        counts: Callable[[], dict[str, int]]) -> None:
    backend = AotEagerAndRecordGraphs()
    args = operands()
    out = torch.compile(lambda *a: model(block, *a), backend=backend, fullgraph=True)
    assert_all_close(grads_of(out, args), grads_of(reference, args))
    (fw,), (bw,) = backend.fw_graphs, backend.bw_graphs
    assert body_names(fw) == ["subgraph_0"] * 3
    assert body_names(bw) == ["subgraph_1"] * 3
    # One joint trace per AOTAutograd stage (metadata collection, then the
    # joint trace), however many calls.
    assert counts()["joint_traced"] == 2
    assert_expected_inline(normalize(fw.code), """\
def forward(self, primals_1, primals_2, primals_3, primals_4):
    subgraph_0 = self.subgraph_0
    hopkit_test_reuse_block = torch.ops.higher_order.hopkit_test_reuse_block(subgraph_0, primals_1, primals_2);  subgraph_0 = None
    getitem = hopkit_test_reuse_block[0]
    getitem_1 = hopkit_test_reuse_block[1];  hopkit_test_reuse_block = None
    subgraph_1 = self.subgraph_0
    hopkit_test_reuse_block_1 = torch.ops.higher_order.hopkit_test_reuse_block(subgraph_1, getitem, primals_3);  subgraph_1 = None
    getitem_2 = hopkit_test_reuse_block_1[0]
    getitem_3 = hopkit_test_reuse_block_1[1];  hopkit_test_reuse_block_1 = None
    subgraph_2 = self.subgraph_0
    hopkit_test_reuse_block_2 = torch.ops.higher_order.hopkit_test_reuse_block(subgraph_2, getitem_2, primals_4);  subgraph_2 = None
    getitem_4 = hopkit_test_reuse_block_2[0]
    getitem_5 = hopkit_test_reuse_block_2[1];  hopkit_test_reuse_block_2 = None
    return (getitem_4, primals_1, primals_2, primals_3, primals_4, getitem, getitem_1, getitem_2, getitem_3, getitem_5)""")
    assert_expected_inline(normalize(fw.subgraph_0.code), """\
def forward(self, arg0_1, arg1_1):
    mm = torch.ops.aten.mm.default(arg0_1, arg1_1);  arg1_1 = None
    tanh = torch.ops.aten.tanh.default(mm);  mm = None
    detach = torch.ops.aten.detach.default(tanh)
    mul = torch.ops.aten.mul.Tensor(tanh, 0.5);  tanh = None
    add = torch.ops.aten.add.Tensor(mul, arg0_1);  mul = arg0_1 = None
    return (add, detach)""")
    assert_expected_inline(normalize(bw.code), """\
def forward(self, primals_1, primals_2, primals_3, primals_4, getitem, getitem_1, getitem_2, getitem_3, getitem_5, tangents_1):
    subgraph_3 = self.subgraph_1
    hopkit_test_reuse_block_3 = torch.ops.higher_order.hopkit_test_reuse_block(subgraph_3, getitem_2, primals_4, getitem_5, tangents_1);  subgraph_3 = getitem_2 = primals_4 = getitem_5 = tangents_1 = None
    getitem_6 = hopkit_test_reuse_block_3[0]
    getitem_7 = hopkit_test_reuse_block_3[1];  hopkit_test_reuse_block_3 = None
    subgraph_4 = self.subgraph_1
    hopkit_test_reuse_block_4 = torch.ops.higher_order.hopkit_test_reuse_block(subgraph_4, getitem, primals_3, getitem_3, getitem_6);  subgraph_4 = getitem = primals_3 = getitem_3 = getitem_6 = None
    getitem_8 = hopkit_test_reuse_block_4[0]
    getitem_9 = hopkit_test_reuse_block_4[1];  hopkit_test_reuse_block_4 = None
    subgraph_5 = self.subgraph_1
    hopkit_test_reuse_block_5 = torch.ops.higher_order.hopkit_test_reuse_block(subgraph_5, primals_1, primals_2, getitem_1, getitem_8);  subgraph_5 = primals_1 = primals_2 = getitem_1 = getitem_8 = None
    getitem_10 = hopkit_test_reuse_block_5[0]
    getitem_11 = hopkit_test_reuse_block_5[1];  hopkit_test_reuse_block_5 = None
    return (getitem_10, getitem_11, getitem_9, getitem_7)""")
    assert_expected_inline(normalize(bw.subgraph_1.code), """\
def forward(self, arg0_1, arg1_1, arg2_1, arg3_1):
    mul = torch.ops.aten.mul.Tensor(arg3_1, 0.5)
    detach = torch.ops.aten.detach.default(arg2_1);  arg2_1 = None
    tanh_backward = torch.ops.aten.tanh_backward.default(mul, detach);  mul = detach = None
    t = torch.ops.aten.t.default(arg0_1);  arg0_1 = None
    mm = torch.ops.aten.mm.default(t, tanh_backward);  t = None
    t_1 = torch.ops.aten.t.default(arg1_1);  arg1_1 = None
    mm_1 = torch.ops.aten.mm.default(tanh_backward, t_1);  tanh_backward = t_1 = None
    add = torch.ops.aten.add.Tensor(arg3_1, mm_1);  arg3_1 = mm_1 = None
    return (add, mm)""")


@pytest.mark.parametrize("n", [3, 6])
def test_one_joint_trace_for_n_calls(n: int, counts: Callable[[], dict[str, int]]) -> None:
    args = operands(n)

    def train_step(*a: torch.Tensor) -> Any:
        return torch.autograd.grad(model(block, *a).sum(), a)

    gm = make_fx(train_step, tracing_mode="fake")(*args)
    assert counts() == {"joint_traced": 1, "joint_reused": n - 1,
                        "body_traced": 2, "body_reused": 2 * (n - 1)}
    assert sorted(set(body_names(gm))) == ["subgraph_0", "subgraph_1"]
    ref = torch.autograd.grad(reference(*args).sum(), args)
    assert_all_close(tuple(gm(*args)), tuple(ref))


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
def test_export_has_one_submodule(strict: bool) -> None:
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ws = torch.nn.ParameterList(w.detach() for w in operands()[1:])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for w in self.ws:
                x = block(LAYER, x, w)
            return x

    m = M()
    x = operands()[0].detach()
    ep = torch.export.export(m, (x,), strict=strict)
    gm = ep.graph_module
    assert body_names(gm) == ["subgraph_0"] * 3
    torch.testing.assert_close(ep.module()(x), m(x))
    decomposed = ep.run_decompositions()
    assert len(set(body_names(decomposed.graph_module))) == 1
    torch.testing.assert_close(decomposed.module()(x), m(x))
    if not strict:
        assert_expected_inline(normalize(gm.subgraph_0.code), """\
def forward(self, arg0_1, arg1_1):
    matmul = torch.ops.aten.matmul.default(arg0_1, arg1_1);  arg1_1 = None
    tanh = torch.ops.aten.tanh.default(matmul);  matmul = None
    mul = torch.ops.aten.mul.Tensor(tanh, 0.5);  tanh = None
    add = torch.ops.aten.add.Tensor(mul, arg0_1);  mul = arg0_1 = None
    return add""")
        assert_expected_inline(normalize(gm.code), """\
def forward(self, p_ws_0, p_ws_1, p_ws_2, x):
    subgraph_0 = self.subgraph_0
    hopkit_test_reuse_block = torch.ops.higher_order.hopkit_test_reuse_block(subgraph_0, x, p_ws_0);  subgraph_0 = x = p_ws_0 = None
    subgraph_1 = self.subgraph_0
    hopkit_test_reuse_block_1 = torch.ops.higher_order.hopkit_test_reuse_block(subgraph_1, hopkit_test_reuse_block, p_ws_1);  subgraph_1 = hopkit_test_reuse_block = p_ws_1 = None
    subgraph_2 = self.subgraph_0
    hopkit_test_reuse_block_2 = torch.ops.higher_order.hopkit_test_reuse_block(subgraph_2, hopkit_test_reuse_block_1, p_ws_2);  subgraph_2 = hopkit_test_reuse_block_1 = p_ws_2 = None
    return (hopkit_test_reuse_block_2,)""")


def test_every_backend_matches_eager(backend: str) -> None:
    args = operands()
    out = torch.compile(lambda *a: model(block, *a), backend=backend, fullgraph=True)
    assert_all_close(grads_of(out, args), grads_of(reference, args))


# ---------------------------------------------------------------------------
# Calls that must not share, and those that may
# ---------------------------------------------------------------------------


def test_different_metadata_is_traced_anew(counts: Callable[[], dict[str, int]]) -> None:
    x2, w = operands(1, rows=2)
    x3 = operands(1, rows=3)[0]
    backend = AotEagerAndRecordGraphs()

    def two_shapes(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return block(LAYER, a, v).sum() + block(LAYER, b, v).sum()

    out = torch.compile(two_shapes, backend=backend, fullgraph=True, dynamic=False)
    assert_all_close(grads_of(out, [x2, x3, w]),
                     grads_of(lambda a, b, v: layer(a, v).sum() + layer(b, v).sum(), [x2, x3, w]))
    assert body_names(backend.graphs[0]) == ["subgraph_0", "subgraph_1"]
    assert body_names(backend.fw_graphs[0]) == ["subgraph_0", "subgraph_1"]
    assert counts()["joint_traced"] == 4  # two calls, two AOT stages


def test_different_config_shares_the_dynamo_body_not_the_trace(
        counts: Callable[[], dict[str, int]]) -> None:
    # The Dynamo body is a function of its operands (the configuration is on
    # the node, not in the body), so calls with different configuration may
    # share it; the AOT traces are per configuration.
    x, w = operands(1)
    backend = AotEagerAndRecordGraphs()

    def two_configs(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return block(LAYER, a, v, scheme="a").sum() + block(LAYER, a, v, scheme="b").sum()

    out = torch.compile(two_configs, backend=backend, fullgraph=True)
    assert_all_close(grads_of(out, [x, w]), grads_of(lambda a, v: 2 * layer(a, v).sum(), [x, w]))
    assert body_names(backend.graphs[0]) == ["subgraph_0", "subgraph_0"]
    assert body_names(backend.fw_graphs[0]) == ["subgraph_0", "subgraph_1"]
    assert [n.kwargs for n in backend.fw_graphs[0].graph.nodes
            if isinstance(n.target, hopkit.BaseHOP)] == [{"scheme": "a"}, {"scheme": "b"}]
    assert counts()["joint_traced"] == 4


def test_closed_over_constants_are_traced_anew() -> None:
    x, w = operands(1)
    backend = EagerAndRecordGraphs()

    def two_scales(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs = []
        for scale in (0.5, 2.0):
            outs.append(block(lambda t, u: torch.tanh(t @ u) * scale, a, v))
        return outs[0].sum() + outs[1].sum()

    out = torch.compile(two_scales, backend=backend, fullgraph=True)
    ref = lambda a, v: (torch.tanh(a @ v) * 0.5).sum() + (torch.tanh(a @ v) * 2.0).sum()  # noqa: E731
    assert_all_close(grads_of(out, [x, w]), grads_of(ref, [x, w]))
    assert body_names(backend.graphs[0]) == ["subgraph_0", "subgraph_1"]


def test_closed_over_tensors_are_lifted_and_share_the_body() -> None:
    # Free tensors become operands of the node: each call passes its own, so
    # one body serves both, with each call's values.
    x, w1, w2 = operands(2)
    backend = EagerAndRecordGraphs()

    def two_closures(a: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        y = block(lambda t: torch.tanh(t @ v1), a)
        return block(lambda t: torch.tanh(t @ v2), y)

    out = torch.compile(two_closures, backend=backend, fullgraph=True)
    ref = lambda a, v1, v2: torch.tanh(torch.tanh(a @ v1) @ v2)  # noqa: E731
    assert_all_close(grads_of(out, [x, w1, w2]), grads_of(ref, [x, w1, w2]))
    gm = backend.graphs[0]
    assert body_names(gm) == ["subgraph_0", "subgraph_0"]
    calls = [n for n in gm.graph.nodes if isinstance(n.target, hopkit.BaseHOP)]
    assert [str(a) for a in calls[0].args[1:]] == ["l_a_", "l_v1_"]
    assert [str(a) for a in calls[1].args[1:]] == ["y", "l_v2_"]


_SCALE = 0.5


def scaled_layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ w) * _SCALE


def test_a_global_stored_between_calls_is_read_anew(counts: Callable[[], dict[str, int]]) -> None:
    # The body reads a global the frame rebinds between the calls: each call
    # is speculated (no replay) and sees its own value.
    body = hopkit.FunctionWithNoFreeVars(scaled_layer)
    x, w = operands(1)

    def f(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        global _SCALE
        first = block(body, a, v)
        _SCALE = 2.0
        return first + block(body, a, v)

    backend = EagerAndRecordGraphs()
    try:
        got = grads_of(torch.compile(f, backend=backend, fullgraph=True), [x, w])
    finally:
        globals()["_SCALE"] = 0.5
    ref = grads_of(lambda a, v: torch.tanh(a @ v) * 0.5 + torch.tanh(a @ v) * 2.0, [x, w])
    assert_all_close(got, ref)
    assert counts().get("dynamo_replayed", 0) == 0
    assert body_names(backend.graphs[0]) == ["subgraph_0", "subgraph_1"]


_LOG: list[int] = []
_lib = torch.library.Library("hopkit_test_reuse", "FRAGMENT")
_lib.define("log(Tensor x, int tag) -> Tensor")


def _log(x: torch.Tensor, tag: int) -> torch.Tensor:
    _LOG.append(tag)
    return x.clone()


_lib.impl("log", _log, "CompositeExplicitAutograd")
torch.library.register_fake("hopkit_test_reuse::log", lambda x, tag: torch.empty_like(x), lib=_lib)
torch.library.register_autograd("hopkit_test_reuse::log", lambda ctx, g: (g, None), lib=_lib)
log = torch.ops.hopkit_test_reuse.log.default


@pytest.fixture
def ordered_log() -> Iterator[None]:
    handle = register_effectful_op(log, EffectType.ORDERED)
    _LOG.clear()
    try:
        yield
    finally:
        handle.destroy()
        _LOG.clear()


def logged_layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return log(torch.tanh(x @ w), 1) + x


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_bodies_with_effects_are_traced_per_call(ordered_log: None, backend: str,
                                                  counts: Callable[[], dict[str, int]]) -> None:
    # Each call keeps its own body, and effects between calls keep their place.
    args = operands(3)
    body = hopkit.FunctionWithNoFreeVars(logged_layer)

    def f(x: torch.Tensor, *ws: torch.Tensor) -> torch.Tensor:
        for i, w in enumerate(ws):
            x = log(block(body, x, w), 10 + i)
        return x

    def ref(x: torch.Tensor, *ws: torch.Tensor) -> torch.Tensor:
        for i, w in enumerate(ws):
            x = log(logged_layer(x, w), 10 + i)
        return x

    expected = grads_of(ref, args)
    expected_log = list(_LOG)
    _LOG.clear()
    recorder = AotEagerAndRecordGraphs() if backend == "aot_eager" else backend
    got = grads_of(torch.compile(f, backend=recorder, fullgraph=True), args)
    assert_all_close(got, expected)
    assert _LOG == expected_log == [1, 10, 1, 11, 1, 12]
    assert counts().get("dynamo_reused", 0) == 0
    if isinstance(recorder, AotEagerAndRecordGraphs):
        assert body_names(recorder.graphs[0]) == ["subgraph_0", "subgraph_1", "subgraph_2"]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_random_ops_keep_each_calls_draws(backend: str) -> None:
    def noisy(x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)

    body = hopkit.FunctionWithNoFreeVars(noisy)
    x = torch.zeros(64)

    def f(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return block(body, a), block(body, a)

    torch.manual_seed(0)
    eager = (noisy(x), noisy(x))
    torch.manual_seed(0)
    first, second = torch.compile(f, backend=backend, fullgraph=True)(x)
    assert not torch.equal(first, second)
    if backend == "aot_eager":  # Inductor draws from its own generator
        torch.testing.assert_close((first, second), eager)


# ---------------------------------------------------------------------------
# The switch, the key refinement, eager
# ---------------------------------------------------------------------------


def test_switch_off_traces_every_call() -> None:
    backend = AotEagerAndRecordGraphs()
    args = operands()
    out = torch.compile(lambda *a: model(block_off, *a), backend=backend, fullgraph=True)
    assert_all_close(grads_of(out, args), grads_of(reference, args))
    assert body_names(backend.graphs[0]) == ["subgraph_0", "subgraph_1", "subgraph_2"]
    assert body_names(backend.fw_graphs[0]) == ["subgraph_0", "subgraph_1", "subgraph_2"]
    assert body_names(backend.bw_graphs[0]) == ["subgraph_3", "subgraph_4", "subgraph_5"]


def test_reuse_key_refines(counts: Callable[[], dict[str, int]]) -> None:
    seen: list[tuple[int, ...]] = []

    class Refined(hopkit.BaseHOP):
        def __init__(self) -> None:
            super().__init__("hopkit_test_reuse_refined")

        def reuse_key(self, config: dict[str, Any], /, *ops: Any) -> Hashable | None:
            seen.append(tuple(ops[1].shape))
            return None if config.get("fresh") else ()

    refined = Refined()
    args = operands(3)

    def train_step(*a: torch.Tensor) -> Any:
        x = refined(LAYER, a[0], a[1], fresh=True)
        x = refined(LAYER, x, a[2], fresh=True)
        x = refined(LAYER, x, a[3])
        return torch.autograd.grad(x.sum(), a)

    make_fx(train_step, tracing_mode="fake")(*args)
    assert seen and all(s == (4, 4) for s in seen)
    # The two calls refined to None are traced anew; the third traces too (it
    # is the first of its key).
    assert counts()["joint_traced"] == 3


class Moded(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_test_reuse_moded")


moded = Moded()


class WithRule(TorchDispatchMode):
    """A mode with a rule of its own for ``moded``: in eager, its calls go
    through the autograd rule's plan (NOTE [BaseHOP in eager under modes and
    subclasses])."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


@moded.py_impl(WithRule)
def _moded_with_rule(mode: WithRule, *args: Any, **kwargs: Any) -> Any:
    return moded(*args, **kwargs)


def test_eager_plan_built_once_and_invalidated_on_change(
        counts: Callable[[], dict[str, int]]) -> None:
    gm = torch.fx.symbolic_trace(layer)
    args = operands(1)

    def step() -> tuple[Any, ...]:
        with WithRule():
            return grads_of(lambda a, v: moded(gm, a, v), args)

    for _ in range(3):
        assert_all_close(step(), grads_of(layer, args))
    assert counts()["joint_traced"] == 1
    # Change the subgraph: the plan is traced again, with the new meaning.
    for node in gm.graph.nodes:
        if node.target is torch.tanh:
            node.target = torch.sin
    gm.recompile()
    assert_all_close(step(), grads_of(lambda a, v: torch.sin(a @ v) * 0.5 + a, args))
    assert counts()["joint_traced"] == 2


def test_eager_plans_go_with_their_subgraph() -> None:
    gm = torch.fx.symbolic_trace(layer)
    args = operands(1)
    with WithRule():
        grads_of(lambda a, v: moded(gm, a, v), args)
    assert gm in _reuse._plan_eager._by_anchor
    ref = weakref.ref(gm)
    del gm
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_dynamic_shapes_share_and_match_eager(backend: str) -> None:
    # Symbolic sizes are part of the key (as expressions of the trace's
    # symbols): equal expressions share, and the results are eager's.
    args = operands(3, rows=5)
    recorder = AotEagerAndRecordGraphs() if backend == "aot_eager" else backend
    out = torch.compile(lambda *a: model(block, *a), backend=recorder, fullgraph=True,
                        dynamic=True)
    assert_all_close(grads_of(out, args), grads_of(reference, args))
    if isinstance(recorder, AotEagerAndRecordGraphs):
        assert len(set(body_names(recorder.fw_graphs[0]))) == 1
        assert len(set(body_names(recorder.bw_graphs[0]))) == 1
