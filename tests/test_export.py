"""Tests for hopkit.export: the autocast pass, its inverse, the HOP, and export.

Reference semantics: the original pre-dispatch graph run as it is (its
``_enter_autocast`` / ``_exit_autocast`` nodes switch autocast for real), which
equals the traced function run under autocast with the weight cache off (make_fx
records ``cache_enabled=False``). Values, dtypes and gradients are compared
bit for bit.
"""

from __future__ import annotations

import io
import operator
from collections.abc import Callable, Sequence
from typing import Any

import expecttest
import pytest
import torch
import torch.fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._export.passes.replace_autocast_with_hop_pass import (
    replace_autocast_with_hop_pass as intree_pass,
)
from torch._higher_order_ops.wrap import wrap_with_autocast as torch_wrap_with_autocast
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    TensorArgument,
)
from torch.fx.experimental.proxy_tensor import make_fx

import hopkit
import hopkit.export as hx
from hopkit.export import (
    inline_autocast_hops_pass,
    replace_autocast_with_hop_pass,
    wrap_with_autocast,
)

BF16 = torch.bfloat16
ENTER = torch.amp.autocast_mode._enter_autocast
EXIT = torch.amp.autocast_mode._exit_autocast


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def trace(f: Callable[..., Any], *args: torch.Tensor) -> torch.fx.GraphModule:
    return make_fx(f, pre_dispatch=True)(*args)


def inputs(n: int = 2, requires_grad: bool = True, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(3, 3, generator=g) * 0.5).requires_grad_(requires_grad) for _ in range(n)
    ]


def flat(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_same(actual: Any, expected: Any) -> None:
    """Equal values and dtypes, bit for bit (NaN equal to NaN)."""
    actual, expected = flat(actual), flat(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)


def grads(fn: Callable[..., Any], args: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    outs = [o for o in flat(fn(*leaves)) if isinstance(o, torch.Tensor) and o.requires_grad]
    if not outs:
        return [None for _ in leaves]
    loss = sum(o.float().sum() for o in outs)
    return list(torch.autograd.grad(loss, leaves, allow_unused=True))


def reference(f: Callable[..., Any], *args: torch.Tensor) -> Any:
    """``f`` under autocast as make_fx records it: weight cache off."""
    with torch.autocast("cpu", enabled=False, cache_enabled=False):
        return f(*args)


def check_semantics(
    f: Callable[..., Any], args: Sequence[torch.Tensor], backward: bool = True
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """Trace ``f``, run the pass, and compare with the original, fwd and bwd."""
    gm = trace(f, *args)
    new_gm, _ = replace_autocast_with_hop_pass(gm, None)
    for m in new_gm.modules():
        if isinstance(m, torch.fx.GraphModule):
            assert not m.graph.find_nodes(op="call_function", target=ENTER)
            assert not m.graph.find_nodes(op="call_function", target=EXIT)
    expected = gm(*args)
    assert_same(expected, reference(f, *args))
    assert_same(new_gm(*args), expected)
    if backward:
        for a, e in zip(grads(new_gm, args), grads(gm, args)):
            if e is None:
                assert a is None
            else:
                torch.testing.assert_close(a, e, rtol=0, atol=0)
    return gm, new_gm


def structure(gm: torch.fx.GraphModule) -> list[Any]:
    """Nodes as targets; autocast calls as (state, #operands, body structure).

    Dead calls (no users, no side effects in the body) are left out.
    """
    out: list[Any] = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        if n.target in (wrap_with_autocast, torch_wrap_with_autocast):
            body = getattr(gm, n.args[4].target)
            if not n.users and not any(
                m.is_impure() for m in body.graph.nodes if m.op == "call_function"
            ):
                continue  # a dead region: torch's pass keeps it, hopkit's drops it
            out.append(("autocast", tuple(n.args[:4]), len(n.args) - 5, structure(body)))
        elif n.target is operator.getitem:
            out.append(("getitem", n.args[1]))
        else:
            out.append(str(n.target))
    return out


def graph_text(gm: torch.fx.GraphModule) -> str:
    """print_readable without the 'no stacktrace' comments."""
    text = gm.print_readable(print_output=False)
    lines = [ln.rstrip() for ln in text.splitlines() if "No stacktrace found" not in ln]
    return "\n".join(ln for ln in lines if ln) + "\n"


# ---------------------------------------------------------------------------
# Programs with autocast regions (x, w: 3x3 float32)
# ---------------------------------------------------------------------------


def f_one(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    a = x.relu()
    with torch.autocast("cpu", dtype=BF16):
        b = (a @ w).sin()
    return b.float() + 1


def f_several(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=BF16):
        a = x @ w
    b = a.float().cos()
    with torch.autocast("cpu", dtype=torch.float16):
        c = b @ w
    with torch.autocast("cpu", enabled=False):
        d = c.float() @ w
    return d + a


def f_nested3(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast("cpu", dtype=BF16):
        a = x @ w
        with torch.autocast("cpu", enabled=False):
            b = a.float() @ w
            with torch.autocast("cpu", dtype=torch.float16):
                c = b @ w
            d = c.float() * b
        e = d @ w
    return e, a


def f_inner_disabled(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=BF16):
        a = x @ w
        with torch.autocast("cpu", enabled=False):
            b = a.float() @ w
        c = b @ w
    return c.sum()


def f_first_last(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast("cpu", dtype=BF16):
        a = x @ w
    b = a.float().relu()
    with torch.autocast("cpu", dtype=BF16):
        c = b @ w
        d = c.sin()
    return d, c


def f_empty(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    a = x.sin()
    with torch.autocast("cpu", dtype=BF16):
        pass
    return a @ w


def f_multi_output(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=BF16):
        a = x @ w
        b = a.sin()
        c = x.relu() @ b
    return a.float() + b.float() * c.float()


def f_unused(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=BF16):
        a = x @ w
        b = a.cos()  # used inside only
        c = b @ w  # used outside
        d = c.exp()  # unused everywhere
    with torch.autocast("cpu", dtype=BF16):
        e = x @ x  # a whole region nobody reads: dropped
    return c.float() * 2


def f_redundant(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=BF16):
        a = x @ w
        with torch.autocast("cpu", dtype=BF16):  # the same state: not wrapped
            b = a @ w
        c = b.sin()
    return c


def f_views(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.autocast("cpu", dtype=BF16):
        a = x.t()  # a view of an operand
        b = x.float()  # a no-op conversion: returns the operand itself
        c = a @ w
        d = c.view(-1)  # views of a fresh result, which is
        e = c.t()  # not an output itself
    return a + 1, b * 2, d, e


CASES = {
    "one": f_one,
    "several": f_several,
    "nested3": f_nested3,
    "inner_disabled": f_inner_disabled,
    "first_last": f_first_last,
    "empty": f_empty,
    "multi_output": f_multi_output,
    "unused": f_unused,
    "redundant": f_redundant,
    "views": f_views,
}

# NOTE [Backward of nested autocast regions]
# Where hopkit.BaseHOP traces a HOP's joint (make_fx, AOTAutograd: the
# aot_eager and inductor backends), eager autograd runs the backward of a
# region outside every autocast block, also for a region nested in another of
# a different state. WrapWithAutocast.backward_config turns autocast off for
# the backward HOP call, and BaseHOP traces the joint's backward under that
# same configuration, so traced gradients equal eager's bit for bit.


@pytest.mark.parametrize("name", sorted(CASES))
def test_semantics_forward(name: str) -> None:
    check_semantics(CASES[name], inputs(), backward=False)


@pytest.mark.parametrize("name", sorted(CASES))
def test_semantics_backward(name: str) -> None:
    check_semantics(CASES[name], inputs(), backward=True)


@pytest.mark.parametrize(
    "name",
    [
        n for n in sorted(CASES)
    ],
)
def test_semantics_aot_eager(name: str) -> None:
    """The rewritten graph under torch.compile(backend="aot_eager"), fwd and bwd."""
    args = inputs()
    gm = trace(CASES[name], *args)
    new_gm, _ = replace_autocast_with_hop_pass(gm, None)
    compiled = torch.compile(new_gm, backend="aot_eager", fullgraph=True)
    assert_same(compiled(*args), gm(*args))
    for a, e in zip(grads(compiled, args), grads(gm, args)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"redundant", "empty", "views"}))
def test_structure_matches_intree_pass(name: str) -> None:
    f = CASES[name]
    gm = trace(f, *inputs())
    ours, _ = replace_autocast_with_hop_pass(gm, None)
    theirs, _ = intree_pass(trace(f, *inputs()), None)
    assert structure(ours) == structure(theirs)


def test_empty_region_is_dropped() -> None:
    """torch's pass keeps an empty region as a call of an empty body."""
    gm = trace(f_empty, *inputs())
    ours, _ = replace_autocast_with_hop_pass(gm, None)
    theirs, _ = intree_pass(trace(f_empty, *inputs()), None)
    assert structure(ours) == ["aten.sin.default", "aten.matmul.default"]
    assert len(theirs.graph.find_nodes(op="call_function", target=torch_wrap_with_autocast)) == 1


def test_redundant_region_is_not_wrapped() -> None:
    """NOTE [Redundant autocast regions]: torch's pass wraps the inner region too."""
    gm = trace(f_redundant, *inputs())
    ours, _ = replace_autocast_with_hop_pass(gm, None)
    theirs, _ = intree_pass(trace(f_redundant, *inputs()), None)
    state = ("cpu", BF16, True, False)
    assert structure(ours) == [
        ("autocast", state, 2, ["aten.matmul.default", "aten.matmul.default", "aten.sin.default"]),
        ("getitem", 0),
    ]
    (their_call, _) = structure(theirs)
    assert [s[0] for s in their_call[3] if isinstance(s, tuple)] == ["autocast", "getitem"]


def test_view_with_sizes_computed_inside_is_returned_as_a_copy() -> None:
    """NOTE [Region outputs that alias]: the one case that returns a clone."""

    def f(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=BF16):
            a = x.view(x.shape[0] * x.shape[1])  # sizes from sym_size nodes inside
            b = x @ w
        return a * 2, b

    args = inputs()
    gm = make_fx(f, pre_dispatch=True, tracing_mode="symbolic")(*args)
    new_gm, _ = replace_autocast_with_hop_pass(gm, None)
    (call,) = structure(new_gm)[:1]
    assert call[3][-1] == "aten.clone.default"
    assert [n.name for n in new_gm.graph.nodes if n.target is operator.getitem] == ["view", "matmul"]
    assert_same(new_gm(*args), gm(*args))
    for a, e in zip(grads(new_gm, args), grads(gm, args)):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_input_graph_and_signature_are_not_mutated() -> None:
    gm = trace(f_nested3, *inputs())
    before = graph_text(gm)
    sig = _signature_for(gm)
    spec_names = [s.arg.name for s in sig.output_specs]  # type: ignore[union-attr]
    new_gm, new_sig = replace_autocast_with_hop_pass(gm, sig)
    assert graph_text(gm) == before
    assert [s.arg.name for s in sig.output_specs] == spec_names  # type: ignore[union-attr]
    assert new_sig is not sig and new_sig is not None
    outs = flat(new_gm.graph.output_node().args[0])
    assert [s.arg.name for s in new_sig.output_specs] == [o.name for o in outs]  # type: ignore[union-attr]


def test_no_autocast_returns_inputs_unchanged() -> None:
    gm = trace(lambda x: x.sin(), *inputs(1))
    sig = _signature_for(gm)
    assert replace_autocast_with_hop_pass(gm, sig) == (gm, sig)
    assert inline_autocast_hops_pass(gm, sig) == (gm, sig)


def test_meta_val_on_synthesized_nodes() -> None:
    gm = trace(f_nested3, *inputs())
    new_gm, _ = replace_autocast_with_hop_pass(gm, None)
    for m in new_gm.modules():
        if not isinstance(m, torch.fx.GraphModule):
            continue
        for n in m.graph.nodes:
            if n.op in ("call_function", "placeholder") and n.target is not EXIT:
                assert "val" in n.meta, n.format_node()
            if n.target is wrap_with_autocast:
                assert isinstance(n.meta["val"], tuple)


def test_linear_one_recompile_per_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTE [Linear autocast pass]: each new graph is compiled exactly once."""

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        for _ in range(20):
            with torch.autocast("cpu", dtype=BF16):
                x = x @ w
                with torch.autocast("cpu", enabled=False):
                    x = x.float().sin()
        return x

    gm = trace(f, *inputs())
    count = 0
    original = torch.fx.GraphModule.recompile

    def counting(self: torch.fx.GraphModule) -> Any:
        nonlocal count
        count += 1
        return original(self)

    monkeypatch.setattr(torch.fx.GraphModule, "recompile", counting)
    new_gm, _ = replace_autocast_with_hop_pass(gm, None)
    graphs = sum(isinstance(m, torch.fx.GraphModule) for m in new_gm.modules())
    assert graphs == 1 + 20 + 20
    assert count == graphs


def _nested_side_effect(x: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=BF16):
        y = x @ x
        with torch.autocast("cpu", enabled=False):
            counter.add_(1)  # a region with no output, only an effect
    return y


@pytest.mark.parametrize("backend", [None])
def test_nested_region_with_only_side_effects(backend: str | None) -> None:
    (x,) = inputs(1)
    gm = trace(_nested_side_effect, x, torch.zeros(3))
    new_gm, _ = replace_autocast_with_hop_pass(gm, None)
    run = new_gm if backend is None else torch.compile(new_gm, backend=backend)
    c1, c2 = torch.zeros(3), torch.zeros(3)
    out = run(x, c1)
    assert_same(out, gm(x, c2))
    assert torch.equal(c1, c2) and c1.eq(1).all()
    out.float().sum().backward()


def test_nested_region_with_only_side_effects_is_refused_under_traced_autograd() -> None:
    """hopkit.BaseHOP traces its joint without functionalization, so a nested
    call that only mutates would be dropped by the partitioner: it is refused
    with a clear error instead of a crash or a lost update."""
    (x,) = inputs(1)
    gm = trace(_nested_side_effect, x, torch.zeros(3))
    new_gm, _ = replace_autocast_with_hop_pass(gm, None)
    with pytest.raises(Exception, match="the partitioner would drop that mutation"):
        torch.compile(new_gm, backend="aot_eager")(x, torch.zeros(3))


def test_region_with_only_side_effects() -> None:
    def f(x: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=BF16):
            counter.add_(1)  # no output, but must run
        return x.sin()

    (x,) = inputs(1, requires_grad=False)
    gm = trace(f, x, torch.zeros(3))
    new_gm, _ = replace_autocast_with_hop_pass(gm, None)
    (call,) = new_gm.graph.find_nodes(op="call_function", target=wrap_with_autocast)
    assert not call.users
    c1, c2 = torch.zeros(3), torch.zeros(3)
    assert_same(new_gm(x, c1), gm(x, c2))
    assert torch.equal(c1, c2) and c1.eq(1).all()


# ---------------------------------------------------------------------------
# Pinned graphs
# ---------------------------------------------------------------------------


class TestPinnedGraphs(expecttest.TestCase):
    def test_nested(self) -> None:
        gm = trace(f_inner_disabled, *inputs())
        new_gm, _ = replace_autocast_with_hop_pass(gm, None)
        self.assertExpectedInline(graph_text(new_gm), """\
class GraphModule(torch.nn.Module):
    def forward(self, x_1: "f32[3, 3]", w_1: "f32[3, 3]") -> _torch_Tensor_:
        autocast_body_0 = self.autocast_body_0
        wrap_with_autocast_0 = torch.ops.higher_order.hopkit_wrap_with_autocast('cpu', torch.bfloat16, True, False, autocast_body_0, x_1, w_1);  autocast_body_0 = x_1 = w_1 = None
        matmul_2: "bf16[3, 3]" = wrap_with_autocast_0[0];  wrap_with_autocast_0 = None
        sum_1: "bf16[]" = torch.ops.aten.sum.default(matmul_2);  matmul_2 = None
        return sum_1
    class autocast_body_0(torch.nn.Module):
        def forward(self, x_1: "f32[3, 3]", w_1: "f32[3, 3]"):
            matmul: "bf16[3, 3]" = torch.ops.aten.matmul.default(x_1, w_1);  x_1 = None
            autocast_body_1 = self.autocast_body_1
            wrap_with_autocast_1 = torch.ops.higher_order.hopkit_wrap_with_autocast('cpu', torch.bfloat16, False, False, autocast_body_1, matmul, w_1);  autocast_body_1 = matmul = None
            matmul_1: "f32[3, 3]" = wrap_with_autocast_1[0];  wrap_with_autocast_1 = None
            matmul_2: "bf16[3, 3]" = torch.ops.aten.matmul.default(matmul_1, w_1);  matmul_1 = w_1 = None
            return (matmul_2,)
        class autocast_body_1(torch.nn.Module):
            def forward(self, matmul: "bf16[3, 3]", w_1: "f32[3, 3]"):
                to: "f32[3, 3]" = torch.ops.aten.to.dtype(matmul, torch.float32);  matmul = None
                matmul_1: "f32[3, 3]" = torch.ops.aten.matmul.default(to, w_1);  to = w_1 = None
                return (matmul_1,)
""")

    def test_multi_output_and_unused(self) -> None:
        new_gm, _ = replace_autocast_with_hop_pass(trace(f_unused, *inputs()), None)
        self.assertExpectedInline(graph_text(new_gm), """\
class GraphModule(torch.nn.Module):
    def forward(self, x_1: "f32[3, 3]", w_1: "f32[3, 3]") -> _torch_Tensor_:
        autocast_body_0 = self.autocast_body_0
        wrap_with_autocast_0 = torch.ops.higher_order.hopkit_wrap_with_autocast('cpu', torch.bfloat16, True, False, autocast_body_0, x_1, w_1);  autocast_body_0 = x_1 = w_1 = None
        matmul_1: "bf16[3, 3]" = wrap_with_autocast_0[0];  wrap_with_autocast_0 = None
        to: "f32[3, 3]" = torch.ops.aten.to.dtype(matmul_1, torch.float32);  matmul_1 = None
        mul: "f32[3, 3]" = torch.ops.aten.mul.Tensor(to, 2);  to = None
        return mul
    class autocast_body_0(torch.nn.Module):
        def forward(self, x_1: "f32[3, 3]", w_1: "f32[3, 3]"):
            matmul: "bf16[3, 3]" = torch.ops.aten.matmul.default(x_1, w_1);  x_1 = None
            cos: "bf16[3, 3]" = torch.ops.aten.cos.default(matmul);  matmul = None
            matmul_1: "bf16[3, 3]" = torch.ops.aten.matmul.default(cos, w_1);  cos = w_1 = None
            exp: "bf16[3, 3]" = torch.ops.aten.exp.default(matmul_1);  exp = None
            return (matmul_1,)
""")

    def test_outputs_that_alias_are_rebuilt_outside(self) -> None:
        # NOTE [Region outputs that alias]: a HOP output may not alias an
        # operand or another output, so views leave the region.
        new_gm, _ = replace_autocast_with_hop_pass(trace(f_views, *inputs()), None)
        self.assertExpectedInline(graph_text(new_gm), """\
class GraphModule(torch.nn.Module):
    def forward(self, x_1: "f32[3, 3]", w_1: "f32[3, 3]") -> _tuple_torch_Tensor_:
        autocast_body_0 = self.autocast_body_0
        wrap_with_autocast_0 = torch.ops.higher_order.hopkit_wrap_with_autocast('cpu', torch.bfloat16, True, False, autocast_body_0, x_1, w_1);  autocast_body_0 = w_1 = None
        matmul: "bf16[3, 3]" = wrap_with_autocast_0[0];  wrap_with_autocast_0 = None
        t: "f32[3, 3]" = torch.ops.aten.t.default(x_1)
        to: "f32[3, 3]" = torch.ops.aten.to.dtype(x_1, torch.float32);  x_1 = None
        view: "bf16[9]" = torch.ops.aten.view.default(matmul, [-1])
        t_1: "bf16[3, 3]" = torch.ops.aten.t.default(matmul);  matmul = None
        add: "f32[3, 3]" = torch.ops.aten.add.Tensor(t, 1);  t = None
        mul: "f32[3, 3]" = torch.ops.aten.mul.Tensor(to, 2);  to = None
        return (add, mul, view, t_1)
    class autocast_body_0(torch.nn.Module):
        def forward(self, x_1: "f32[3, 3]", w_1: "f32[3, 3]"):
            t: "f32[3, 3]" = torch.ops.aten.t.default(x_1);  x_1 = None
            matmul: "bf16[3, 3]" = torch.ops.aten.matmul.default(t, w_1);  t = w_1 = None
            return (matmul,)
""")

    def test_inverse_restores_the_original(self) -> None:
        gm = trace(f_nested3, *inputs())
        new_gm, _ = replace_autocast_with_hop_pass(gm, None)
        back, _ = inline_autocast_hops_pass(new_gm, None)
        self.assertEqual(back.code, gm.code)
        self.assertExpectedInline(back.code.strip(), """\
def forward(self, x_1, w_1) -> _tuple_torch_Tensor_torch_Tensor_:
    _enter_autocast = torch.amp.autocast_mode._enter_autocast('cpu', torch.bfloat16, True, False)
    matmul = torch.ops.aten.matmul.default(x_1, w_1);  x_1 = None
    _enter_autocast_1 = torch.amp.autocast_mode._enter_autocast('cpu', torch.bfloat16, False, False)
    to = torch.ops.aten.to.dtype(matmul, torch.float32)
    matmul_1 = torch.ops.aten.matmul.default(to, w_1);  to = None
    _enter_autocast_2 = torch.amp.autocast_mode._enter_autocast('cpu', torch.float16, True, False)
    matmul_2 = torch.ops.aten.matmul.default(matmul_1, w_1)
    _exit_autocast = torch.amp.autocast_mode._exit_autocast(_enter_autocast_2);  _enter_autocast_2 = _exit_autocast = None
    to_1 = torch.ops.aten.to.dtype(matmul_2, torch.float32);  matmul_2 = None
    mul = torch.ops.aten.mul.Tensor(to_1, matmul_1);  to_1 = matmul_1 = None
    _exit_autocast_1 = torch.amp.autocast_mode._exit_autocast(_enter_autocast_1);  _enter_autocast_1 = _exit_autocast_1 = None
    matmul_3 = torch.ops.aten.matmul.default(mul, w_1);  mul = w_1 = None
    _exit_autocast_2 = torch.amp.autocast_mode._exit_autocast(_enter_autocast);  _enter_autocast = _exit_autocast_2 = None
    return (matmul_3, matmul)""")

    def test_retraced_rewritten_graph(self) -> None:
        # A rewritten graph traced again at pre-dispatch keeps its HOP calls,
        # and the pass leaves them as they are.
        args = inputs()
        new_gm, _ = replace_autocast_with_hop_pass(trace(f_inner_disabled, *args), None)
        again = make_fx(new_gm, pre_dispatch=True, tracing_mode="fake")(*args)
        assert structure(again) == structure(new_gm)
        assert replace_autocast_with_hop_pass(again, None)[0] is again
        assert_same(again(*args), new_gm(*args))


def test_retraced_meta_val_has_autocast_dtypes() -> None:
    args = inputs()
    new_gm, _ = replace_autocast_with_hop_pass(trace(f_one, *args), None)
    again = make_fx(new_gm, pre_dispatch=True, tracing_mode="fake")(*args)
    (call,) = again.graph.find_nodes(op="call_function", target=wrap_with_autocast)
    assert [v.dtype for v in call.meta["val"]] == [BF16]


def test_retraced_real_mode_keeps_the_hop() -> None:
    args = inputs()
    new_gm, _ = replace_autocast_with_hop_pass(trace(f_one, *args), None)
    again = trace(new_gm, *args)
    assert structure(again) == structure(new_gm)


# ---------------------------------------------------------------------------
# Malformed graphs
# ---------------------------------------------------------------------------


def _module(build: Callable[[torch.fx.Graph, torch.fx.Node], torch.fx.Node]) -> torch.fx.GraphModule:
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output((build(g, x),))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def _enter(g: torch.fx.Graph, name: str, enabled: bool = True) -> torch.fx.Node:
    return g.create_node("call_function", ENTER, ("cpu", BF16, enabled, False), {}, name=name)


def _exit(g: torch.fx.Graph, enter: torch.fx.Node, name: str) -> torch.fx.Node:
    return g.create_node("call_function", EXIT, (enter,), {}, name=name)


def _exit_without_enter(g: torch.fx.Graph, x: torch.fx.Node) -> torch.fx.Node:
    y = g.call_function(torch.ops.aten.sin.default, (x,))
    g.create_node("call_function", EXIT, (x,), {}, name="stray_exit")
    return y


def _exited_twice(g: torch.fx.Graph, x: torch.fx.Node) -> torch.fx.Node:
    e = _enter(g, "enter")
    y = g.call_function(torch.ops.aten.sin.default, (x,))
    _exit(g, e, "exit")
    _exit(g, e, "exit_again")
    return y


def _never_exited(g: torch.fx.Graph, x: torch.fx.Node) -> torch.fx.Node:
    _enter(g, "outer")
    e = _enter(g, "inner", enabled=False)
    y = g.call_function(torch.ops.aten.sin.default, (x,))
    _exit(g, e, "inner_exit")
    return y


def _mismatched(g: torch.fx.Graph, x: torch.fx.Node) -> torch.fx.Node:
    outer = _enter(g, "outer")
    inner = _enter(g, "inner", enabled=False)
    y = g.call_function(torch.ops.aten.sin.default, (x,))
    _exit(g, outer, "outer_exit")
    _exit(g, inner, "inner_exit")
    return y


class TestMalformed(expecttest.TestCase):
    def test_exit_without_enter(self) -> None:
        self.assertExpectedRaisesInline(
            ValueError, lambda: replace_autocast_with_hop_pass(_module(_exit_without_enter), None), """hopkit.export: exit without enter: node 'stray_exit' (%stray_exit : [num_users=0] = call_function[target=torch.amp.autocast_mode._exit_autocast](args = (%x,), kwargs = {})) does not take the result of an _enter_autocast node as its only argument."""
        )

    def test_exited_twice(self) -> None:
        self.assertExpectedRaisesInline(
            ValueError, lambda: replace_autocast_with_hop_pass(_module(_exited_twice), None), """hopkit.export: exit without enter: node 'exit_again' (%exit_again : [num_users=0] = call_function[target=torch.amp.autocast_mode._exit_autocast](args = (%enter,), kwargs = {})) exits the region entered at 'enter', which was already exited."""
        )

    def test_unbalanced(self) -> None:
        self.assertExpectedRaisesInline(
            ValueError, lambda: replace_autocast_with_hop_pass(_module(_never_exited), None), """hopkit.export: unbalanced autocast regions: the region entered at node 'outer' (%outer : [num_users=0] = call_function[target=torch.amp.autocast_mode._enter_autocast](args = (cpu, torch.bfloat16, True, False), kwargs = {})) is never exited."""
        )

    def test_mismatched_exit(self) -> None:
        self.assertExpectedRaisesInline(
            ValueError, lambda: replace_autocast_with_hop_pass(_module(_mismatched), None), """hopkit.export: mismatched exit: node 'outer_exit' (%outer_exit : [num_users=0] = call_function[target=torch.amp.autocast_mode._exit_autocast](args = (%outer,), kwargs = {})) exits the region entered at 'outer', but the innermost open region was entered at 'inner' (open regions, outermost first: 'outer', 'inner'); autocast regions must nest."""
        )

    def test_not_a_graph_module(self) -> None:
        self.assertExpectedRaisesInline(
            TypeError, lambda: replace_autocast_with_hop_pass(f_one, None), """hopkit: replace_autocast_with_hop_pass expects a torch.fx.GraphModule, but got a function; trace it first, e.g. with make_fx(f, pre_dispatch=True), or export a module with hopkit.export.export(model, args)."""  # type: ignore[arg-type]
        )
        gm = trace(f_one, *inputs())
        self.assertExpectedRaisesInline(
            TypeError, lambda: replace_autocast_with_hop_pass(gm.graph, None), """hopkit: replace_autocast_with_hop_pass expects a torch.fx.GraphModule, but got a Graph; wrap it as torch.fx.GraphModule(root, graph)."""  # type: ignore[arg-type]
        )

    def test_bad_hop_config(self) -> None:
        body = hopkit.FunctionWithNoFreeVars(lambda x: (x.sin(),))
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: wrap_with_autocast(torch.device("cpu"), "bf16", 1, None, body, torch.ones(2)),
            """hopkit: wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *args) takes torch.autocast's arguments: device_type must be a str such as 'cpu', but is a torch.device (use its .type, 'cpu'); dtype must be a torch.dtype or None, but is 'bf16' (str); enabled must be a bool, but is 1 (int); pass them as torch.autocast takes them, e.g. ('cpu', torch.bfloat16, True, None).""",
        )


class _Small(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sin()


def _small_program() -> torch.export.ExportedProgram:
    return torch.export.export(_Small(), (torch.ones(2),))


class TestPassArguments(expecttest.TestCase):
    """Both passes refuse what is not (GraphModule, ExportGraphSignature | None)."""

    def test_signature_of_the_wrong_type(self) -> None:
        gm = trace(f_one, *inputs())
        ep = _small_program()
        self.assertExpectedRaisesInline(
            TypeError, lambda: replace_autocast_with_hop_pass(gm, {}), """hopkit: replace_autocast_with_hop_pass expects graph_signature to be a torch.export.ExportGraphSignature or None, but got a dict; pass the graph's ExportGraphSignature (ep.graph_signature), or None for a graph without one."""  # type: ignore[arg-type]
        )
        self.assertExpectedRaisesInline(
            TypeError, lambda: replace_autocast_with_hop_pass(gm, ep), """hopkit: replace_autocast_with_hop_pass expects graph_signature to be a torch.export.ExportGraphSignature or None, but got an ExportedProgram; pass ep.graph_signature, with ep.graph_module as the graph."""  # type: ignore[arg-type]
        )
        new_gm, _ = replace_autocast_with_hop_pass(gm, None)
        self.assertExpectedRaisesInline(
            TypeError, lambda: inline_autocast_hops_pass(new_gm, [ep.graph_signature]), """hopkit: inline_autocast_hops_pass expects graph_signature to be a torch.export.ExportGraphSignature or None, but got a list; pass the graph's ExportGraphSignature (ep.graph_signature), or None for a graph without one."""  # type: ignore[arg-type]
        )

    def test_exported_program_instead_of_its_graph(self) -> None:
        ep = _small_program()
        self.assertExpectedRaisesInline(
            TypeError, lambda: replace_autocast_with_hop_pass(ep, ep.graph_signature), """hopkit: replace_autocast_with_hop_pass expects a torch.fx.GraphModule and its ExportGraphSignature (or None), but got an ExportedProgram; pass ep.graph_module and ep.graph_signature, or export the model with hopkit.export.export(model, args), which runs this pass for you."""  # type: ignore[arg-type]
        )
        self.assertExpectedRaisesInline(
            TypeError, lambda: inline_autocast_hops_pass(ep, None), """hopkit: inline_autocast_hops_pass expects a torch.fx.GraphModule and its ExportGraphSignature (or None), but got an ExportedProgram; pass ep.graph_module and ep.graph_signature."""  # type: ignore[arg-type]
        )

    def test_signature_of_another_graph(self) -> None:
        gm = trace(f_first_last, *inputs())  # two outputs
        sig = _signature_for(trace(f_one, *inputs()))  # one output spec
        self.assertExpectedRaisesInline(
            ValueError, lambda: replace_autocast_with_hop_pass(gm, sig), """hopkit: replace_autocast_with_hop_pass expects the graph signature of this graph, but the graph returns 2 value(s) and the signature has 1 output spec(s); pass the signature that belongs to this graph, or None."""
        )
        new_gm, _ = replace_autocast_with_hop_pass(gm, None)
        # The inverse used to drop the output specs that had no output.
        self.assertExpectedRaisesInline(
            ValueError, lambda: inline_autocast_hops_pass(new_gm, sig), """hopkit: inline_autocast_hops_pass expects the graph signature of this graph, but the graph returns 2 value(s) and the signature has 1 output spec(s); pass the signature that belongs to this graph, or None."""
        )


def _hop_module(
    args: Callable[[torch.fx.Graph, torch.fx.Node, torch.fx.Node], tuple[Any, ...]],
    use: str = "getitem",
    kwargs: dict[str, Any] | None = None,
    body_outputs: str = "tuple",
) -> torch.fx.GraphModule:
    """``out = wrap_with_autocast(*args(g, x, body)); return (out[0],)``, args built by hand."""
    body_graph = torch.fx.Graph()
    a = body_graph.placeholder("a")
    sin = body_graph.call_function(torch.ops.aten.sin.default, (a,))
    body_graph.output((sin,) if body_outputs == "tuple" else sin)
    root = torch.nn.Module()
    root.body = torch.fx.GraphModule(torch.nn.Module(), body_graph)
    root.weight = torch.nn.Parameter(torch.ones(3))
    g = torch.fx.Graph()
    x = g.placeholder("x")
    body = g.create_node("get_attr", "body", name="body")
    call = g.create_node("call_function", wrap_with_autocast, args(g, x, body), kwargs or {}, name="wrap")
    if use == "getitem":
        g.output((g.call_function(operator.getitem, (call, 0)),))
    else:
        g.output((call,))
    return torch.fx.GraphModule(root, g)


_CONFIG = ("cpu", BF16, True, False)


class TestMalformedHopCalls(expecttest.TestCase):
    """inline_autocast_hops_pass names a malformed wrap_with_autocast node before copying any."""

    def check(self, gm: torch.fx.GraphModule, expected: str) -> None:
        code = gm.code
        with self.assertRaises(ValueError) as info:
            inline_autocast_hops_pass(gm, None)
        self.assertEqual(gm.code, code)  # untouched
        self.assertExpectedInline(str(info.exception), expected, skip=1)

    def test_too_few_arguments(self) -> None:
        self.check(_hop_module(lambda g, x, body: ("cpu", BF16, body, x)), """hopkit: inline_autocast_hops_pass expects wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *operands) calls with constant configuration and a get_attr of a GraphModule as the subgraph, but in node 'wrap' (%wrap : [num_users=1] = call_function[target=torch.ops.higher_order.hopkit_wrap_with_autocast](args = (cpu, torch.bfloat16, %body, %x), kwargs = {})) it has 4 positional argument(s), fewer than the four configuration arguments and the subgraph; fix that node (the calls replace_autocast_with_hop_pass builds have this form).""")

    def test_keyword_arguments(self) -> None:
        self.check(
            _hop_module(lambda g, x, body: (*_CONFIG, body, x), kwargs={"dtype": BF16}), """hopkit: inline_autocast_hops_pass expects wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *operands) calls with constant configuration and a get_attr of a GraphModule as the subgraph, but in node 'wrap' (%wrap : [num_users=1] = call_function[target=torch.ops.higher_order.hopkit_wrap_with_autocast](args = (cpu, torch.bfloat16, True, False, %body, %x), kwargs = {dtype: torch.bfloat16})) it has keyword arguments ['dtype']; fix that node (the calls replace_autocast_with_hop_pass builds have this form)."""
        )

    def test_subgraph_not_a_get_attr(self) -> None:
        self.check(_hop_module(lambda g, x, body: (*_CONFIG, x, x)), """hopkit: inline_autocast_hops_pass expects wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *operands) calls with constant configuration and a get_attr of a GraphModule as the subgraph, but in node 'wrap' (%wrap : [num_users=1] = call_function[target=torch.ops.higher_order.hopkit_wrap_with_autocast](args = (cpu, torch.bfloat16, True, False, %x, %x), kwargs = {})) its subgraph argument is node 'x' (%x : [num_users=1] = placeholder[target=x]), not a get_attr node; fix that node (the calls replace_autocast_with_hop_pass builds have this form).""")

    def test_subgraph_not_a_graph_module(self) -> None:
        def args(g: torch.fx.Graph, x: torch.fx.Node, body: torch.fx.Node) -> tuple[Any, ...]:
            return (*_CONFIG, g.create_node("get_attr", "weight", name="weight"), x)

        self.check(_hop_module(args), """hopkit: inline_autocast_hops_pass expects wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *operands) calls with constant configuration and a get_attr of a GraphModule as the subgraph, but in node 'wrap' (%wrap : [num_users=1] = call_function[target=torch.ops.higher_order.hopkit_wrap_with_autocast](args = (cpu, torch.bfloat16, True, False, %weight, %x), kwargs = {})) its subgraph 'weight' is a Parameter, not a torch.fx.GraphModule; fix that node (the calls replace_autocast_with_hop_pass builds have this form).""")

    def test_config_not_constant(self) -> None:
        self.check(_hop_module(lambda g, x, body: ("cpu", x, True, False, body, x)), """hopkit: inline_autocast_hops_pass expects wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *operands) calls with constant configuration and a get_attr of a GraphModule as the subgraph, but in node 'wrap' (%wrap : [num_users=1] = call_function[target=torch.ops.higher_order.hopkit_wrap_with_autocast](args = (cpu, %x, True, False, %body, %x), kwargs = {})) dtype is the graph value 'x', not a constant; fix that node (the calls replace_autocast_with_hop_pass builds have this form).""")

    def test_config_of_the_wrong_type(self) -> None:
        self.check(_hop_module(lambda g, x, body: ("gpu", "bf16", 1, False, body, x)), """hopkit: inline_autocast_hops_pass expects wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *operands) calls with constant configuration and a get_attr of a GraphModule as the subgraph, but in node 'wrap' (%wrap : [num_users=1] = call_function[target=torch.ops.higher_order.hopkit_wrap_with_autocast](args = (gpu, bf16, 1, False, %body, %x), kwargs = {})) device_type must be a device type that autocast supports, such as 'cpu' or 'cuda', but is 'gpu'; dtype must be a torch.dtype or None, but is 'bf16' (str); enabled must be a bool, but is 1 (int); fix that node (the calls replace_autocast_with_hop_pass builds have this form).""")

    def test_operands_do_not_fit_the_subgraph(self) -> None:
        self.check(_hop_module(lambda g, x, body: (*_CONFIG, body, x, x)), """hopkit: inline_autocast_hops_pass expects wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *operands) calls with constant configuration and a get_attr of a GraphModule as the subgraph, but in node 'wrap' (%wrap : [num_users=1] = call_function[target=torch.ops.higher_order.hopkit_wrap_with_autocast](args = (cpu, torch.bfloat16, True, False, %body, %x, %x), kwargs = {})) its subgraph 'body' takes 1 input(s), but the call passes 2 operand(s); fix that node (the calls replace_autocast_with_hop_pass builds have this form).""")

    def test_tuple_result_used_directly(self) -> None:
        self.check(_hop_module(lambda g, x, body: (*_CONFIG, body, x), use="direct"), """hopkit: inline_autocast_hops_pass expects wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *operands) calls with constant configuration and a get_attr of a GraphModule as the subgraph, but in node 'wrap' (%wrap : [num_users=1] = call_function[target=torch.ops.higher_order.hopkit_wrap_with_autocast](args = (cpu, torch.bfloat16, True, False, %body, %x), kwargs = {})) it is used by node 'output' (return (wrap,)), but its subgraph returns a tuple of 1, which only getitem(call, i) with 0 <= i < 1 can take apart; fix that node (the calls replace_autocast_with_hop_pass builds have this form).""")


def test_inline_body_that_returns_one_value() -> None:
    # The call's value is the body's value itself, so out[0] indexes it: the
    # inliner used to take out[0] for the whole value.
    gm = _hop_module(lambda g, x, body: (*_CONFIG, body, x), body_outputs="single")
    back, _ = inline_autocast_hops_pass(gm, None)
    (x,) = inputs(1, requires_grad=False)
    assert_same(back(x), gm(x))
    assert back(x)[0].shape == (3,)


class TestHopArguments(expecttest.TestCase):
    """wrap_with_autocast refuses a bad call before dispatching anything."""

    def test_unknown_device_type(self) -> None:
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: wrap_with_autocast("gpu", BF16, True, None, BODY, *inputs()),
            """hopkit: wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *args) takes torch.autocast's arguments: device_type must be a device type that autocast supports, such as 'cpu' or 'cuda', but is 'gpu'; pass them as torch.autocast takes them, e.g. ('cpu', torch.bfloat16, True, None).""",
        )

    def test_device_object(self) -> None:
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: wrap_with_autocast(torch.device("cpu"), BF16, True, None, BODY, *inputs()),
            """hopkit: wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *args) takes torch.autocast's arguments: device_type must be a str such as 'cpu', but is a torch.device (use its .type, 'cpu'); pass them as torch.autocast takes them, e.g. ('cpu', torch.bfloat16, True, None).""",
        )

    def test_configuration_left_out(self) -> None:
        self.assertExpectedRaisesInline(
            TypeError, lambda: wrap_with_autocast("cpu", BODY, *inputs()), """hopkit: wrap_with_autocast expects (device_type, dtype, enabled, cache_enabled, subgraph, *args), but argument 1 (dtype) is a FunctionWithNoFreeVars; pass all four configuration arguments before the subgraph, e.g. wrap_with_autocast('cpu', torch.bfloat16, True, None, subgraph, *args)."""
        )

    def test_keyword_arguments(self) -> None:
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: wrap_with_autocast("cpu", BF16, True, None, BODY, *inputs(), enabled=True),
            """hopkit: wrap_with_autocast takes no keyword arguments, but got ['enabled']; pass (device_type, dtype, enabled, cache_enabled, subgraph, *args) positionally.""",
        )


class TestExportArguments(expecttest.TestCase):
    """hopkit.export.export refuses bad arguments before swapping the pass or tracing."""

    def test_not_a_module(self) -> None:
        self.assertExpectedRaisesInline(
            TypeError, lambda: hx.export(f_one, tuple(inputs())), """hopkit: export expects a torch.nn.Module, but got a function; to export a function, wrap it in a Module whose forward calls it."""  # type: ignore[arg-type]
        )
        ep = _small_program()
        self.assertExpectedRaisesInline(
            TypeError, lambda: hx.export(ep, (torch.ones(2),)), """hopkit: export expects a torch.nn.Module, but got an ExportedProgram; export the nn.Module it came from (its autocast regions are rewritten already)."""  # type: ignore[arg-type]
        )

    def test_args_not_a_tuple(self) -> None:
        self.assertExpectedRaisesInline(
            TypeError, lambda: hx.export(_Small(), torch.ones(2)), """hopkit: export expects args to be a tuple of example inputs (as torch.export.export does), but got a Tensor; pass (x,) for a single input x."""  # type: ignore[arg-type]
        )
        self.assertExpectedRaisesInline(
            TypeError, lambda: hx.export(_Small(), [torch.ones(2)]), """hopkit: export expects args to be a tuple of example inputs (as torch.export.export does), but got a list; pass tuple(args)."""  # type: ignore[arg-type]
        )

    def test_kwargs_not_a_mapping(self) -> None:
        self.assertExpectedRaisesInline(
            TypeError, lambda: hx.export(_Small(), (), [torch.ones(2)]), """hopkit: export expects kwargs to be a dict of example keyword inputs or None, but got a list; pass positional inputs in args."""  # type: ignore[arg-type]
        )


# ---------------------------------------------------------------------------
# Property: random programs with random nested regions
# ---------------------------------------------------------------------------

STATES = [(BF16, True), (BF16, False), (torch.float16, True)]
OPS = ["sin", "relu", "mm", "add", "mul", "float", "bf16"]

_op = st.tuples(st.just("op"), st.sampled_from(OPS), st.integers(0, 63), st.integers(0, 63))


def _region(depth: int) -> st.SearchStrategy[Any]:
    return st.tuples(st.just("region"), st.integers(0, len(STATES) - 1), _items(depth))


def _items(depth: int) -> st.SearchStrategy[list[Any]]:
    if depth == 0:
        return st.lists(_op, max_size=3)
    return st.lists(st.one_of(_op, _op, _region(depth - 1)), max_size=3)


# Ops, at least one region (nested up to three deep), more ops and regions.
_programs = st.builds(
    lambda before, region, after: [*before, region, *after],
    st.lists(_op, max_size=2),
    _region(2),
    _items(1),
)


def _apply(op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if op == "sin":
        return a.sin()
    if op == "relu":
        return a.relu()
    if op == "mm":
        return torch.mm(a, b.to(a.dtype))
    if op == "add":
        return a + b
    if op == "mul":
        return a * b
    if op == "float":
        return a.float()
    return a.to(BF16)


def _interpret(program: list[Any], pool: list[torch.Tensor]) -> None:
    for item in program:
        if item[0] == "op":
            _, op, i, j = item
            pool.append(_apply(op, pool[i % len(pool)], pool[j % len(pool)]))
        else:
            dtype, enabled = STATES[item[1]]
            with torch.autocast("cpu", dtype=dtype, enabled=enabled):
                _interpret(item[2], pool)




@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    program=_programs,
    picks=st.lists(st.integers(0, 7), min_size=1, max_size=3),
    return_all=st.booleans(),
)
def test_property_random_programs(program: list[Any], picks: list[int], return_all: bool) -> None:
    def f(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pool = [x, w]
        _interpret(program, pool)
        if return_all and len(pool) > 2:  # every region live
            return tuple(pool[2:])
        # A few recent values: some regions are dead code.
        return tuple(pool[-1 - i % len(pool)] for i in picks)

    args = inputs()
    gm, new_gm = check_semantics(f, args, backward=True)
    back, _ = inline_autocast_hops_pass(new_gm, None)
    assert_same(back(*args), gm(*args))
    # The pass is idempotent on its own output's inverse.
    again, _ = replace_autocast_with_hop_pass(back, None)
    assert structure(again) == structure(new_gm)


# ---------------------------------------------------------------------------
# The HOP itself
# ---------------------------------------------------------------------------


def _body(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = x @ w
    return (y.sin(), y.float() * 2)


BODY = hopkit.FunctionWithNoFreeVars(_body)


def _eager_autocast(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast("cpu", dtype=BF16, cache_enabled=False):
        return _body(x, w)


def test_hop_eager_and_registered() -> None:
    x, w = inputs(requires_grad=False)
    out = wrap_with_autocast("cpu", BF16, True, False, BODY, x, w)
    assert_same(out, _eager_autocast(x, w))
    assert out[0].dtype == BF16
    assert torch.ops.higher_order.hopkit_wrap_with_autocast is wrap_with_autocast
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
def test_hop_make_fx(mode: str) -> None:
    x, w = inputs(requires_grad=False)

    def f(x: torch.Tensor, w: torch.Tensor) -> Any:
        return wrap_with_autocast("cpu", BF16, True, False, BODY, x, w)

    gm = make_fx(f, tracing_mode=mode)(x, w)
    calls = gm.graph.find_nodes(op="call_function", target=wrap_with_autocast)
    assert len(calls) == 1
    assert calls[0].args[:4] == ("cpu", BF16, True, False)
    assert_same(gm(x, w), _eager_autocast(x, w))


def test_hop_fake_and_functionalize() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w = inputs(requires_grad=False)
    with FakeTensorMode() as mode:
        fx_, fw = mode.from_tensor(x), mode.from_tensor(w)
        out = wrap_with_autocast("cpu", BF16, True, False, BODY, fx_, fw)
        assert [o.dtype for o in out] == [BF16, torch.float32]

    def mutating(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
        x.add_(1)
        return (x @ w,)

    def f(x: torch.Tensor, w: torch.Tensor) -> Any:
        return wrap_with_autocast(
            "cpu", BF16, True, False, hopkit.FunctionWithNoFreeVars(mutating), x, w
        )

    x1, x2 = x.clone(), x.clone()
    expected = f(x1, w)
    got = torch.func.functionalize(f)(x2, w)
    assert_same(got, expected)
    assert torch.equal(x1, x2)


def test_hop_autograd_matches_eager() -> None:
    x, w = inputs()
    got = grads(lambda x, w: wrap_with_autocast("cpu", BF16, True, False, BODY, x, w), [x, w])
    want = grads(_eager_autocast, [x, w])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_hop_gradcheck_float64() -> None:
    x, w = (t.double().detach().requires_grad_(True) for t in inputs())

    # CPU autocast leaves float64 alone, so this checks the HOP's gradients.
    body = hopkit.FunctionWithNoFreeVars(lambda x, w: ((x @ w).sin(), x * w.cos()))

    def f(x: torch.Tensor, w: torch.Tensor) -> Any:
        return wrap_with_autocast("cpu", BF16, True, None, body, x, w)

    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_hop_torch_compile(backend: str) -> None:
    x, w = inputs()

    def f(x: torch.Tensor, w: torch.Tensor) -> Any:
        return wrap_with_autocast("cpu", BF16, True, False, lambda a, b: _body(a, b), x, w)

    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    out = torch.compile(f, backend=capture, fullgraph=True)(x, w)
    assert_same(out, _eager_autocast(x, w))
    (dynamo_graph,) = graphs
    hops = [n for n in dynamo_graph.graph.nodes if n.target is wrap_with_autocast]
    assert len(hops) == 1
    for a, e in zip(grads(torch.compile(f, backend=backend, fullgraph=True), [x, w]),
                    grads(_eager_autocast, [x, w])):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.slow
def test_hopcheck_float64_every_mode() -> None:
    """CPU autocast leaves float64 alone: every mode must agree exactly."""
    from hopkit.testing import hopcheck

    x, w = (t.double().detach().requires_grad_(True) for t in inputs())
    body = hopkit.FunctionWithNoFreeVars(lambda x, w: ((x @ w).sin(), x * w.cos()))
    hopcheck(wrap_with_autocast, "cpu", BF16, True, None, body, x, w)


def test_hopcheck_bfloat16() -> None:
    # Inductor computes bf16 pointwise math in float32 and rounds once, so its
    # bf16 gradients differ from eager's in the last bits, exactly as for the
    # same code compiled without a HOP; that mode is covered by the test above
    # and test_rewritten_graph_under_inductor.
    from hopkit.testing import MODES, hopcheck

    x, w = inputs()
    modes = [m for m in MODES if m != "compile_inductor"]
    hopcheck(wrap_with_autocast, "cpu", BF16, True, False, BODY, x, w, modes=modes)


@pytest.mark.slow
def test_rewritten_graph_under_inductor() -> None:
    args = inputs()
    gm = trace(f_multi_output, *args)
    new_gm, _ = replace_autocast_with_hop_pass(gm, None)
    compiled = torch.compile(new_gm, backend="inductor", fullgraph=True)
    out = compiled(*args)
    expected = gm(*args)
    # Inductor fuses the bf16 arithmetic, so values may differ in the last bits.
    for a, e in zip(flat(out), flat(expected)):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------
# hopkit.export.export
# ---------------------------------------------------------------------------


class Nested(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.lin2 = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = x.relu()
        with torch.autocast("cpu", dtype=BF16):
            b = self.lin(a)
            with torch.autocast("cpu", enabled=False):
                c = self.lin2(b.float())
            d = c @ c
        return d.sum(), b


def _hops_in(gm: torch.fx.GraphModule) -> int:
    return sum(
        len(m.graph.find_nodes(op="call_function", target=wrap_with_autocast))
        for m in gm.modules()
        if isinstance(m, torch.fx.GraphModule)
    )


def test_export_roundtrip() -> None:
    torch.manual_seed(0)
    m = Nested()
    (x,) = inputs(1, requires_grad=False)
    ep = hx.export(m, (x,))
    assert _hops_in(ep.graph_module) == 2
    outs = flat(ep.graph_module.graph.output_node().args[0])
    assert [s.arg.name for s in ep.graph_signature.output_specs] == [o.name for o in outs]  # type: ignore[union-attr]
    expected = reference(m, x)
    assert_same(ep.module()(x), expected)

    decomposed = ep.run_decompositions()
    assert _hops_in(decomposed.graph_module) == 2
    assert_same(decomposed.module()(x), expected)

    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    assert _hops_in(loaded.graph_module) == 2
    assert_same(loaded.module()(x), expected)

    gm, sig = inline_autocast_hops_pass(ep.graph_module, ep.graph_signature)
    assert _hops_in(gm) == 0
    assert len(gm.graph.find_nodes(op="call_function", target=ENTER)) == 2
    assert sig is not None


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=BF16):
            y = self.lin(x).relu()
        return y.float().sum(dim=-1)


def test_export_dynamic_shapes_and_training() -> None:
    torch.manual_seed(0)
    m = Block()
    ep = hx.export(m, (torch.randn(2, 3),), dynamic_shapes=({0: torch.export.Dim("b")},))
    assert _hops_in(ep.graph_module) == 1
    x = torch.randn(5, 3)
    assert_same(ep.module()(x), reference(m, x))
    got = grads(ep.module(), [x])
    want = grads(lambda t: reference(m, t), [x])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


def test_export_error_inside_region_propagates_unchanged() -> None:
    class Boom(Exception):
        pass

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=BF16):
                y = x.sin()
                raise Boom("raised inside an autocast region")
            return y

    module = __import__(
        "torch._export.passes.replace_autocast_with_hop_pass", fromlist=["x"]
    )
    original = module.replace_autocast_with_hop_pass
    with pytest.raises(Boom, match="raised inside an autocast region") as info:
        hx.export(M(), (torch.ones(2),))
    assert type(info.value) is Boom
    assert module.replace_autocast_with_hop_pass is original
    assert not torch.is_autocast_enabled("cpu")


# ---------------------------------------------------------------------------
# Signatures
# ---------------------------------------------------------------------------


def _signature_for(gm: torch.fx.GraphModule) -> ExportGraphSignature:
    return ExportGraphSignature(
        input_specs=[
            InputSpec(InputKind.USER_INPUT, TensorArgument(n.name), None)
            for n in gm.graph.find_nodes(op="placeholder")
        ],
        output_specs=[
            OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(n.name), None)
            for n in flat(gm.graph.output_node().args[0])
        ],
    )


def test_signature_names_follow_the_graph() -> None:
    gm = trace(f_first_last, *inputs())
    new_gm, sig = replace_autocast_with_hop_pass(gm, _signature_for(gm))
    assert sig is not None
    outs = flat(new_gm.graph.output_node().args[0])
    assert [s.arg.name for s in sig.output_specs] == [o.name for o in outs]  # type: ignore[union-attr]
    # The region's outputs keep their names, so the names did not change.
    assert [s.arg.name for s in sig.output_specs] == ["sin", "matmul_1"]  # type: ignore[union-attr]
