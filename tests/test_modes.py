"""BaseHOP under user dispatch modes (NOTE [BaseHOP in eager under modes and subclasses])."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import hopkit
import hopkit.base_hop as base_hop


class ModeHop(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_test_modes_hop")


mode_hop = ModeHop()


def body(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
    return (torch.tanh(x @ w),)


BODY = hopkit.FunctionWithNoFreeVars(body)


def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return mode_hop(BODY, x, w)[0]


def plain(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return body(x, w)[0]


class LoggingMode(TorchDispatchMode):
    """Logs every op; ``hops``: whether it declares supports_higher_order_operators."""

    def __init__(self, hops: bool = False) -> None:
        super().__init__()
        self.supports_higher_order_operators = hops
        self.ops: list[str] = []
        self.saw_fake = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        self.saw_fake |= any(isinstance(a, FakeTensor) for a in leaves)
        return func(*args, **(kwargs or {}))


def operands(requires_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=gen).requires_grad_(requires_grad)
    w = torch.randn(5, 3, generator=gen).requires_grad_(requires_grad)
    return x, w


def step(fn: Callable[..., torch.Tensor], x: torch.Tensor, w: torch.Tensor
         ) -> tuple[torch.Tensor, list[Any]]:
    x, w = (t.detach().clone().requires_grad_(t.requires_grad) for t in (x, w))
    out = fn(x, w)
    if out.requires_grad:
        out.sum().backward()
    return out.detach(), [x.grad, w.grad]


@pytest.fixture
def joint_traces(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts hopkit's joint traces (the autograd rule's plans)."""
    calls: list[int] = []
    original = base_hop._build_autograd_plan

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(base_hop, "_build_autograd_plan", counting)
    yield calls


@pytest.mark.parametrize("hops", [False, True], ids=["plain_mode", "hop_aware_mode"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_logging_mode_sees_the_body_ops(hops: bool, grad: bool, joint_traces: list[int]) -> None:
    x, w = operands(requires_grad=grad)
    got_mode, want_mode = LoggingMode(hops), LoggingMode(hops)
    with got_mode:
        got = step(f, x, w)
    with want_mode:
        want = step(plain, x, w)
    torch.testing.assert_close(got, want)
    assert got_mode.ops == want_mode.ops
    assert "aten.mm.default" in got_mode.ops
    assert not got_mode.saw_fake
    assert joint_traces == []


def test_flop_counter_counts_the_body(joint_traces: list[int]) -> None:
    x, w = operands()
    with FlopCounterMode(display=False) as got:
        out, grads = step(f, x, w)
    with FlopCounterMode(display=False) as want:
        ref, ref_grads = step(plain, x, w)
    torch.testing.assert_close((out, grads), (ref, ref_grads))
    assert got.get_total_flops() == want.get_total_flops() > 0
    assert got.get_flop_counts() == want.get_flop_counts()


def test_debug_mode_logs_the_body_ops() -> None:
    debug_mode = pytest.importorskip("torch.utils._debug_mode")
    x, w = operands(requires_grad=False)
    with debug_mode.DebugMode() as got:
        out = f(x, w)
    with debug_mode.DebugMode() as want:
        ref = plain(x, w)
    torch.testing.assert_close(out, ref)
    assert got.debug_string() == want.debug_string()
    assert "aten::mm" in got.debug_string()


def test_five_training_steps_under_a_mode_trace_no_joint(joint_traces: list[int]) -> None:
    x, w = operands()
    mode = LoggingMode()
    with mode:
        for _ in range(5):
            # A fresh wrapper every step, as user code naturally writes it.
            out = mode_hop(hopkit.FunctionWithNoFreeVars(body), x, w)[0]
            out.sum().backward()
    assert joint_traces == []
    assert not mode.saw_fake


def test_a_registered_rule_for_a_mode_is_kept() -> None:
    class Registered(TorchDispatchMode):
        pass

    class OwnRuleHop(hopkit.BaseHOP):
        def __init__(self) -> None:
            super().__init__("hopkit_test_modes_own_rule_hop")

    hop = OwnRuleHop()
    seen: list[str] = []

    @hop.py_impl(Registered)
    def _(mode: Any, subgraph: Any, *ops: Any) -> Any:
        seen.append("rule")
        return hop(subgraph, *ops)

    x, w = operands(requires_grad=False)
    with Registered():
        out = hop(BODY, x, w)[0]
    torch.testing.assert_close(out, plain(x, w))
    assert seen == ["rule"]


def test_tracing_under_a_mode_keeps_the_hop_node() -> None:
    # While make_fx records, dispatch is torch's: one HOP node in the graph.
    x, w = operands(requires_grad=False)
    with LoggingMode(hops=True):
        gm = make_fx(f, tracing_mode="fake")(x, w)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(mode_hop) == 1


def test_a_tensor_subclass_sees_the_body_ops() -> None:
    from torch.testing._internal.two_tensor import TwoTensor

    x, w = operands(requires_grad=False)
    t = TwoTensor(x, x * 2)
    out = mode_hop(BODY, t, w)[0]
    assert isinstance(out, TwoTensor)
    torch.testing.assert_close(out.a, plain(x, w))
    torch.testing.assert_close(out.b, plain(x * 2, w))


def test_selective_activation_checkpointing_around_a_hop() -> None:
    import torch.fx.traceback as fx_traceback
    from torch.utils.checkpoint import (
        CheckpointPolicy,
        checkpoint,
        create_selective_checkpoint_contexts,
    )

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        if op is torch.ops.aten.mm.default:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    x, w = operands()

    def checkpointed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return checkpoint(f, a, b, use_reentrant=False, context_fn=context_fn)  # type: ignore[no-any-return]

    torch.testing.assert_close(step(checkpointed, x, w), step(plain, x, w))
    assert not fx_traceback.has_preserved_node_meta()
    assert fx_traceback.current_meta == {}
