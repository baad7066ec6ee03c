"""BaseHOP inside torch.utils.checkpoint, eager and compiled (hopkit/base_hop/_checkpoint.py).

NOTE [BaseHOP under activation checkpointing]: in eager the body runs inline
under selective activation checkpointing's modes (the policy sees its ops);
compiled, the HOP stays one node, the policy is asked for the HOP, and a node
tagged for recomputation is recomputed as a whole in backward. A HOP whose
body calls an effectful op is saved whatever the policy prefers, and
MUST_RECOMPUTE for it is refused.

Counting: ``count`` (not registered with hopkit.effects) counts how often the
body runs, forward and recomputation together; ``tick`` (registered ORDERED)
counts the body's side effect, which must read one per call.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.fx.traceback as fx_traceback
from expecttest import assert_expected_inline
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import hopkit
from hopkit._compat import torch_at_least
from hopkit.effects import EffectType, register_effectful_op

NS = "hopkit_test_ckpt_hop"
RUNS = {"count": 0, "tick": 0}


def _counting(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def kernel(x: torch.Tensor) -> torch.Tensor:
        RUNS[name] += 1  # the real kernel only: tracing counts nothing
        return x.clone()

    return kernel


def _grad(ctx: Any, g: torch.Tensor) -> torch.Tensor:
    return g


_lib = torch.library.Library(NS, "FRAGMENT")
for _name in ("count", "tick"):
    _lib.define(f"{_name}(Tensor x) -> Tensor")
    _lib.impl(_name, _counting(_name), "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NS}::{_name}", lambda x: torch.empty_like(x), lib=_lib)
    torch.library.register_autograd(f"{NS}::{_name}", _grad, lib=_lib)

count = torch.ops.hopkit_test_ckpt_hop.count.default
tick = torch.ops.hopkit_test_ckpt_hop.tick.default


class CheckpointedHop(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_test_ckpt_hop")


hop = CheckpointedHop()


def _body(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
    return (count(x @ w).sin(),)


def _effect_body(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
    return (tick(count(x @ w)).sin(),)


BODY = hopkit.FunctionWithNoFreeVars(_body)
EFFECT_BODY = hopkit.FunctionWithNoFreeVars(_effect_body)


@pytest.fixture(scope="module", autouse=True)
def _library() -> Iterator[None]:
    yield
    _lib._destroy()


@pytest.fixture()
def effect() -> Iterator[None]:
    handle = register_effectful_op(tick, EffectType.ORDERED)
    try:
        yield
    finally:
        handle.destroy()


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    RUNS.update(count=0, tick=0)
    yield
    # Nothing may leak into later compiles or tests.
    assert torch._C._len_torch_dispatch_stack() == 0
    assert dict(fx_traceback.current_meta) == {}


# ---------------------------------------------------------------------------
# The checkpointing styles
# ---------------------------------------------------------------------------


def _decide(decision: CheckpointPolicy, seen: list[Any] | None = None) -> Callable[..., Any]:
    """A policy answering ``decision`` for the HOP and for ``count`` (the op
    eager's inline body shows the policy), PREFER_RECOMPUTE for the rest."""

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if seen is not None and not ctx.is_recompute:
            traced = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY)
            seen.append((func, traced is not None))
        return decision if func is hop or func is count else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _sac(policy: Any) -> Callable[[], Any]:
    return functools.partial(create_selective_checkpoint_contexts, policy)


STYLES: dict[str, Callable[[], Any] | None] = {
    "plain": None,  # no context_fn: everything is recomputed
    "save": _sac(_decide(CheckpointPolicy.MUST_SAVE)),
    "recompute": _sac(_decide(CheckpointPolicy.MUST_RECOMPUTE)),
    "save_listed": _sac([hop, count]),
}
# How often the body runs per call (forward + recomputation), eager and compiled.
BODY_RUNS = {"plain": 2, "save": 1, "recompute": 2, "save_listed": 1}


def _checkpointed(body: Any, context_fn: Callable[[], Any] | None) -> Callable[..., torch.Tensor]:
    def region(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return hop(body, x, w)[0].cos() * 2

    def fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if context_fn is None:
            out = checkpoint(region, x, w, use_reentrant=False)
        else:
            out = checkpoint(region, x, w, use_reentrant=False, context_fn=context_fn)
        return out.sum()  # type: ignore[no-any-return]

    return fn


def _reference(body: Any, device: str) -> tuple[torch.Tensor, ...]:
    x, w = _operands(device)
    out = (body(x, w)[0].cos() * 2).sum()
    out.backward()
    RUNS.update(count=0, tick=0)
    return out.detach(), x.grad, w.grad  # type: ignore[return-value]


def _operands(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, generator=gen).to(device).requires_grad_()
    w = torch.randn(3, 3, generator=gen).to(device).requires_grad_()
    return x, w


def _compiled(fn: Callable[..., Any], backend: str) -> Callable[..., Any]:
    return fn if backend == "eager" else torch.compile(fn, backend=backend, fullgraph=True)


def _steps(fn: Callable[..., Any], body: Any, device: str, runs: dict[str, int]) -> None:
    """Two training steps (the second runs what the first compiled), each
    equal to eager's uncheckpointed body and running the body ``runs`` times."""
    ref = _reference(body, device)
    for _ in range(2):
        RUNS.update(count=0, tick=0)
        x, w = _operands(device)
        out = fn(x, w)
        out.backward()
        assert RUNS == runs
        for got, want in zip((out, x.grad, w.grad), ref):
            torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------
# Values, gradients and how often the body runs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("style", list(STYLES))
def test_checkpointed_hop_matches_eager_and_runs_as_the_policy_says(
        style: str, backend: str, device: str) -> None:
    fn = _compiled(_checkpointed(BODY, STYLES[style]), backend)
    _steps(fn, BODY, device, {"count": BODY_RUNS[style], "tick": 0})


@pytest.mark.parametrize("style", ["plain", "save", "save_listed"])
def test_a_body_effect_runs_once_per_call(effect: None, style: str, backend: str,
                                          device: str) -> None:
    # Compiled, a HOP threaded by effect tokens is saved as a whole whatever
    # the policy prefers, so its body runs once; eager recomputes the body's
    # other ops and reuses the effect's saved output.
    runs = BODY_RUNS[style] if backend == "eager" else 1
    fn = _compiled(_checkpointed(EFFECT_BODY, STYLES[style]), backend)
    _steps(fn, EFFECT_BODY, device, {"count": runs, "tick": 1})


def test_eager_recompute_of_a_body_effect_reuses_its_output(effect: None) -> None:
    # Eager's policy sees the body's ops: MUST_RECOMPUTE for count recomputes
    # it, while tick (answered PREFER_RECOMPUTE) is saved, being effectful.
    _steps(_checkpointed(EFFECT_BODY, STYLES["recompute"]), EFFECT_BODY, "cpu",
           {"count": 2, "tick": 1})


@pytest.mark.parametrize("style", ["plain", "recompute"])
def test_dynamo_eager_backend_runs_the_region_as_eager_does(style: str) -> None:
    # backend="eager" runs torch's tag_activation_checkpoint for real: no
    # graph is recorded, so the body runs inline under the modes. (torch
    # 2.11 runs a plain compiled region without checkpointing it, leaving
    # recomputation to the partitioner, which this backend does not run.)
    fn = torch.compile(_checkpointed(BODY, STYLES[style]), backend="eager", fullgraph=True)
    runs = 1 if style == "plain" and not torch_at_least("2.12") else BODY_RUNS[style]
    _steps(fn, BODY, "cpu", {"count": runs, "tick": 0})


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_the_policy_is_asked_for_the_hop_when_compiled_for_its_ops_in_eager(
        backend: str) -> None:
    seen: list[tuple[Any, bool]] = []
    fn = _compiled(_checkpointed(BODY, _sac(_decide(CheckpointPolicy.MUST_SAVE, seen))),
                   backend)
    x, w = _operands("cpu")
    fn(x, w).backward()
    if backend == "eager":
        assert [f for f, _ in seen] == [torch.ops.aten.mm.default, count, torch.ops.aten.sin.default,
                                        torch.ops.aten.cos.default, torch.ops.aten.mul.Tensor]
    else:
        # AOTAutograd's trace asks about the HOP as one op, never about its
        # body's ops (Dynamo's fake run of the region, which records no
        # graph, sees the body inline, as eager does).
        assert [f for f, traced in seen if traced] == [
            hop, torch.ops.aten.cos.default, torch.ops.aten.mul.Tensor]


# ---------------------------------------------------------------------------
# The compiled graphs keep the HOP node
# ---------------------------------------------------------------------------


def _capture(graphs: list[torch.fx.GraphModule]) -> Any:
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm: torch.fx.GraphModule, _: Any) -> Any:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    # aot_eager's and Inductor's partitioner, which does the recomputing.
    return aot_autograd(fw_compiler=keep, bw_compiler=keep,
                        partition_fn=min_cut_rematerialization_partition)


def _hop_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is hop]


def _code(gm: torch.fx.GraphModule) -> str:
    text = gm.print_readable(print_output=False, include_stride=False, include_device=False)
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip() and "#" not in ln]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("style", list(STYLES))
def test_compiled_graphs_keep_the_hop_node(style: str) -> None:
    graphs: list[torch.fx.GraphModule] = []
    fn = torch.compile(_checkpointed(BODY, STYLES[style]), backend=_capture(graphs),
                       fullgraph=True)
    x, w = _operands("cpu")
    fn(x, w).backward()
    fw, bw = graphs
    assert len(_hop_nodes(fw)) == 1
    # The backward holds the backward HOP call, and the forward one again
    # where the HOP was recomputed as a whole.
    recomputed = BODY_RUNS[style] == 2
    assert len(_hop_nodes(bw)) == (2 if recomputed else 1)


def test_compiled_plain_checkpoint_recomputes_the_hop_as_one_node() -> None:
    graphs: list[torch.fx.GraphModule] = []
    fn = torch.compile(_checkpointed(BODY, None), backend=_capture(graphs), fullgraph=True)
    x, w = _operands("cpu")
    fn(x, w).backward()
    fw, bw = graphs
    assert_expected_inline(_code(fw), """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[3, 3]", primals_2: "f32[3, 3]"):
        subgraph_0 = self.subgraph_0
        hopkit_test_ckpt_hop = torch.ops.higher_order.hopkit_test_ckpt_hop(subgraph_0, primals_1, primals_2);  subgraph_0 = None
        getitem: "f32[3, 3]" = hopkit_test_ckpt_hop[0];  hopkit_test_ckpt_hop = None
        cos: "f32[3, 3]" = torch.ops.aten.cos.default(getitem);  getitem = None
        mul: "f32[3, 3]" = torch.ops.aten.mul.Tensor(cos, 2);  cos = None
        sum_1: "f32[]" = torch.ops.aten.sum.default(mul);  mul = None
        return (sum_1, primals_1, primals_2)
    class subgraph_0(torch.nn.Module):
        def forward(self, arg0_1: "f32[3, 3]", arg1_1: "f32[3, 3]"):
            mm: "f32[3, 3]" = torch.ops.aten.mm.default(arg0_1, arg1_1);  arg0_1 = arg1_1 = None
            count: "f32[3, 3]" = torch.ops.hopkit_test_ckpt_hop.count.default(mm);  mm = None
            sin: "f32[3, 3]" = torch.ops.aten.sin.default(count)
            return (sin, count)
""")
    assert_expected_inline(_code(bw), """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_1: "f32[3, 3]", primals_2: "f32[3, 3]", tangents_1: "f32[]"):
        expand: "f32[3, 3]" = torch.ops.aten.expand.default(tangents_1, [3, 3]);  tangents_1 = None
        mul_1: "f32[3, 3]" = torch.ops.aten.mul.Tensor(expand, 2);  expand = None
        subgraph_0 = self.subgraph_0
        hopkit_test_ckpt_hop = torch.ops.higher_order.hopkit_test_ckpt_hop(subgraph_0, primals_1, primals_2);  subgraph_0 = None
        getitem: "f32[3, 3]" = hopkit_test_ckpt_hop[0]
        getitem_1: "f32[3, 3]" = hopkit_test_ckpt_hop[1];  hopkit_test_ckpt_hop = None
        sin: "f32[3, 3]" = torch.ops.aten.sin.default(getitem);  getitem = None
        neg: "f32[3, 3]" = torch.ops.aten.neg.default(sin);  sin = None
        mul_2: "f32[3, 3]" = torch.ops.aten.mul.Tensor(mul_1, neg);  mul_1 = neg = None
        subgraph_1 = self.subgraph_1
        hopkit_test_ckpt_hop_1 = torch.ops.higher_order.hopkit_test_ckpt_hop(subgraph_1, primals_1, primals_2, getitem_1, mul_2);  subgraph_1 = primals_1 = primals_2 = getitem_1 = mul_2 = None
        getitem_2: "f32[3, 3]" = hopkit_test_ckpt_hop_1[0]
        getitem_3: "f32[3, 3]" = hopkit_test_ckpt_hop_1[1];  hopkit_test_ckpt_hop_1 = None
        return (getitem_2, getitem_3)
    class subgraph_0(torch.nn.Module):
        def forward(self, arg0_1: "f32[3, 3]", arg1_1: "f32[3, 3]"):
            mm: "f32[3, 3]" = torch.ops.aten.mm.default(arg0_1, arg1_1);  arg0_1 = arg1_1 = None
            count: "f32[3, 3]" = torch.ops.hopkit_test_ckpt_hop.count.default(mm);  mm = None
            sin: "f32[3, 3]" = torch.ops.aten.sin.default(count)
            return (sin, count)
    class subgraph_1(torch.nn.Module):
        def forward(self, arg0_1: "f32[3, 3]", arg1_1: "f32[3, 3]", arg2_1: "f32[3, 3]", arg3_1: "f32[3, 3]"):
            cos: "f32[3, 3]" = torch.ops.aten.cos.default(arg2_1);  arg2_1 = None
            mul: "f32[3, 3]" = torch.ops.aten.mul.Tensor(arg3_1, cos);  arg3_1 = cos = None
            t: "f32[3, 3]" = torch.ops.aten.t.default(arg0_1);  arg0_1 = None
            mm: "f32[3, 3]" = torch.ops.aten.mm.default(t, mul);  t = None
            t_1: "f32[3, 3]" = torch.ops.aten.t.default(arg1_1);  arg1_1 = None
            mm_1: "f32[3, 3]" = torch.ops.aten.mm.default(mul, t_1);  mul = t_1 = None
            return (mm_1, mm)
""")
    tags = [n.meta.get("recompute") for n in _hop_nodes(fw)]
    assert tags == [CheckpointPolicy.PREFER_RECOMPUTE]


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------


def _message_of(fn: Callable[[], Any]) -> str:
    """The message of the error ``fn`` raises, its traceback (which holds
    checkpoint's suspended generator) dropped, so no mode stays pushed."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - compiled errors arrive wrapped
        message = str(e)
    else:
        raise AssertionError("expected an error")
    gc.collect()
    return message


def test_compiled_must_recompute_of_a_hop_with_an_effect_is_refused(effect: None) -> None:
    fn = torch.compile(_checkpointed(EFFECT_BODY, STYLES["recompute"]), backend="aot_eager",
                       fullgraph=True)
    message = _message_of(lambda: fn(*_operands("cpu")))
    first = message.splitlines()[1]  # after Dynamo's "backend='aot_eager' raised:"
    assert_expected_inline(first, """RuntimeError: hopkit: the selective activation checkpointing policy returned CheckpointPolicy.MUST_RECOMPUTE for hopkit_test_ckpt_hop, whose subgraph calls an effectful op (hopkit_test_ckpt_hop::tick.default); recomputing the HOP would run that side effect again in backward. Return MUST_SAVE or PREFER_SAVE for hopkit_test_ckpt_hop (PREFER_RECOMPUTE keeps its outputs saved too), or move the effectful op out of the checkpointed region.""")
    assert RUNS == {"count": 0, "tick": 0}  # refused while compiling: nothing ran
