"""hopkit.effects: every effect exactly once, everywhere (SPEC §2, §7).

Forward effects once in forward, backward effects once in backward, in
program order, wherever the effectful op is called (top level, inside a
BaseHOP body, inside a HOP nested in a body, inside a custom
``autograd.Function``'s backward), in every mode (eager, aot_eager, inductor,
export); activation checkpointing of every style never repeats an effect
(NOTE [Effects under activation checkpointing] in
hopkit/effects/_checkpoint.py); torch.func transforms keep order.

The effectful op records its tag into ``LOG`` from its real kernel only (its
fake kernel records nothing), so ``LOG`` is the exact sequence of side
effects; every mode is compared with eager's log, values and gradients.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from expecttest import assert_expected_inline
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import hopkit
from hopkit._compat import torch_at_least
from hopkit.effects import EffectType, register_effectful_op

NS = "hopkit_test_once"
LOG: list[int] = []


def _log(x: torch.Tensor, tag: int) -> torch.Tensor:
    LOG.append(tag)
    return x.clone()


def _setup(ctx: Any, inputs: Any, output: Any) -> None:
    ctx.tag = inputs[1]


def _log_backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
    # The gradient is logged too: an effect of the backward.
    return torch.ops.hopkit_test_once.log(g, ctx.tag + 1000), None


def _plain_backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
    return g, None


_lib = torch.library.Library(NS, "FRAGMENT")
_lib.define("log(Tensor x, int tag) -> Tensor")
_lib.define("unregistered(Tensor x, int tag) -> Tensor")
for _name in ("log", "unregistered"):
    _lib.impl(_name, _log, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NS}::{_name}", lambda x, tag: torch.empty_like(x), lib=_lib)
torch.library.register_autograd(f"{NS}::log", _log_backward, setup_context=_setup, lib=_lib)
torch.library.register_autograd(f"{NS}::unregistered", _plain_backward, setup_context=_setup,
                                lib=_lib)

log = torch.ops.hopkit_test_once.log.default
unregistered = torch.ops.hopkit_test_once.unregistered.default


@pytest.fixture(scope="module", autouse=True)
def _registered() -> Iterator[None]:
    handle = register_effectful_op(log, EffectType.ORDERED)
    try:
        yield
    finally:
        handle.destroy()
        _lib._destroy()


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    LOG.clear()
    torch._dynamo.reset()
    yield
    LOG.clear()


class Region(hopkit.BaseHOP):
    def __init__(self, name: str) -> None:
        super().__init__(name)


outer = Region("hopkit_test_once_outer")
inner = Region("hopkit_test_once_inner")


# ---------------------------------------------------------------------------
# The placements
# ---------------------------------------------------------------------------


class LogInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        log(g, 500)
        return g * 2


class LogSavedInBackward(torch.autograd.Function):
    """Its backward logs a value of the forward only (no tangent): the
    partitioner must still keep that effect out of the forward graph."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return g * log(x, 700)


def _body(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (log(x.sin(), 2).exp(),)


def _inner_body(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (log(x.cos(), 3) * 2,)


def _nested_body(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (inner(hopkit.FunctionWithNoFreeVars(_inner_body), x.sin())[0] + 1,)


def _saved_body(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (LogSavedInBackward.apply(x.sin()) * 2,)


def top(x: torch.Tensor) -> torch.Tensor:
    return log(log(x.sin(), 1).cos(), 2) * x


def in_body(x: torch.Tensor) -> torch.Tensor:
    return log(outer(hopkit.FunctionWithNoFreeVars(_body), log(x, 1))[0], 9)


def nested(x: torch.Tensor) -> torch.Tensor:
    return log(outer(hopkit.FunctionWithNoFreeVars(_nested_body), log(x, 1))[0], 9)


def in_backward(x: torch.Tensor) -> torch.Tensor:
    return log(LogInBackward.apply(log(x.sin(), 1)), 2).cos()


def in_body_backward(x: torch.Tensor) -> torch.Tensor:
    return outer(hopkit.FunctionWithNoFreeVars(_saved_body), log(x, 1))[0]


PLACEMENTS = {
    "top": top,
    "in_body": in_body,
    "nested": nested,
    "in_backward": in_backward,
    "in_body_backward": in_body_backward,
}

# What eager logs, forward then backward: the reference every mode must give.
EAGER_LOGS = {
    "top": ([1, 2], [1002, 1001]),
    "in_body": ([1, 2, 9], [1009, 1002, 1001]),
    "nested": ([1, 3, 9], [1009, 1003, 1001]),
    "in_backward": ([1, 2], [1002, 500, 1001]),
    "in_body_backward": ([1], [700, 1001]),
}


class Program(torch.nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _in_mode(fn: Callable[[torch.Tensor], torch.Tensor], mode: str,
             x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    if mode == "eager":
        return fn
    if mode in ("aot_eager", "inductor"):
        return torch.compile(fn, backend=mode, fullgraph=True)
    ep = torch.export.export(Program(fn), (x,))
    if mode == "export_decomposed":
        ep = ep.run_decompositions()
        # The decomposed program threads the tokens (SPEC §2).
        assert "TOKEN" in [s.kind.name for s in ep.graph_signature.input_specs]
    return ep.module()


def _run(fn: Callable[[torch.Tensor], torch.Tensor], mode: str) -> tuple[Any, ...]:
    x = torch.linspace(-1.0, 1.0, 3, requires_grad=True)
    g = _in_mode(fn, mode, x)
    LOG.clear()
    out = g(x)
    fw = list(LOG)
    LOG.clear()
    out.sum().backward()
    return fw, list(LOG), out.detach(), x.grad


_MODES = ["eager", "aot_eager", "export", "export_decomposed"]


@pytest.mark.parametrize("mode", _MODES)
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_effects_once_in_program_order(placement: str, mode: str) -> None:
    if placement in ("in_backward", "in_body_backward") and mode.startswith("export"):
        pytest.skip("torch.export keeps an autograd.Function's forward only: its custom "
                    "backward is not part of the exported program (torch's semantics)")
    fn = PLACEMENTS[placement]
    ref = _run(fn, "eager")
    assert (ref[0], ref[1]) == EAGER_LOGS[placement]
    fw, bw, out, grad = _run(fn, mode)
    assert fw == ref[0]
    assert bw == ref[1]
    torch.testing.assert_close(out, ref[2])
    torch.testing.assert_close(grad, ref[3])


@pytest.mark.parametrize("placement", ["in_body", "in_backward"])
def test_effects_once_in_program_order_inductor(placement: str) -> None:
    fn = PLACEMENTS[placement]
    ref = _run(fn, "eager")
    fw, bw, out, grad = _run(fn, "inductor")
    assert (fw, bw) == (ref[0], ref[1])
    torch.testing.assert_close(out, ref[2])
    torch.testing.assert_close(grad, ref[3])


def test_backward_nodes_of_a_hop_joint_are_tagged_backward() -> None:
    # The cause of "Node log_1 was invalid, but is output": an effect of the
    # body's backward must be tagged so that the partitioner keeps it there.
    from hopkit.base_hop import _build_autograd_plan

    x = torch.randn(3, requires_grad=True)
    plan = _build_autograd_plan(outer, (), hopkit.FunctionWithNoFreeVars(_body), [x], {})
    tags = [(n.name, n.meta.get("partitioner_tag")) for n in plan.joint.graph.nodes
            if n.op == "call_function" and n.target is log]
    assert tags == [("log", "must_be_in_forward"), ("log_1", "must_be_in_backward")]
    assert [n.args[1] for n in plan.fw.graph.nodes if n.target is log] == [2]
    assert LOG == []  # tracing the joint ran nothing


# ---------------------------------------------------------------------------
# Activation checkpointing: recompute reuses the effect's saved outputs
# ---------------------------------------------------------------------------


def _region(x: torch.Tensor) -> torch.Tensor:
    return log(x.sin(), 1).cos() * 3


def _prefer_recompute(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    return CheckpointPolicy.PREFER_RECOMPUTE


def _recompute_log(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    return CheckpointPolicy.MUST_RECOMPUTE if op is log else CheckpointPolicy.PREFER_RECOMPUTE


def _sac(policy: Any) -> Callable[[], Any]:
    return functools.partial(create_selective_checkpoint_contexts, policy)


STYLES: dict[str, Callable[[Callable[..., Any], torch.Tensor], torch.Tensor]] = {
    "non_reentrant": lambda f, x: checkpoint(f, x, use_reentrant=False),
    "reentrant": lambda f, x: checkpoint(f, x, use_reentrant=True),
    "sac_policy": lambda f, x: checkpoint(f, x, use_reentrant=False,
                                          context_fn=_sac(_prefer_recompute)),
    "sac_list": lambda f, x: checkpoint(f, x, use_reentrant=False,
                                        context_fn=_sac([torch.ops.aten.sin.default])),
}


def _expected_grad(x: torch.Tensor) -> torch.Tensor:
    return -3 * x.cos() * x.sin().sin()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("style", list(STYLES))
def test_checkpointing_runs_each_effect_once(style: str, backend: str) -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return STYLES[style](_region, x).sum()

    g = fn if backend == "eager" else torch.compile(fn, backend=backend, fullgraph=True)
    for _ in range(2):  # the second step runs what the first compiled
        x = torch.randn(4, requires_grad=True)
        LOG.clear()
        out = g(x)
        assert LOG == [1]
        out.backward()
        assert LOG == [1, 1001]  # recompute reused the forward's output
        torch.testing.assert_close(x.grad, _expected_grad(x))


def test_checkpointing_recomputes_an_unregistered_op() -> None:
    # The control: without a registration, eager checkpointing recomputes the
    # op (so the counts above would read 2 if hopkit's hooks did nothing).
    def region(x: torch.Tensor) -> torch.Tensor:
        return unregistered(x.sin(), 1).cos() * 3

    x = torch.randn(4, requires_grad=True)
    checkpoint(region, x, use_reentrant=False).sum().backward()
    assert LOG == [1, 1]


def test_checkpointing_twice_through_retain_graph_never_reruns() -> None:
    x = torch.randn(4, requires_grad=True)
    out = checkpoint(_region, x, use_reentrant=False).sum()
    out.backward(retain_graph=True)
    out.backward()
    assert LOG == [1, 1001, 1001]
    torch.testing.assert_close(x.grad, 2 * _expected_grad(x))


def test_checkpointed_region_with_several_effects_keeps_their_order() -> None:
    def region(x: torch.Tensor) -> torch.Tensor:
        y = log(x.sin(), 1)
        return log(y.cos(), 2) * log(y, 3)

    x = torch.randn(4, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    region(x_ref).sum().backward()
    ref = list(LOG)
    LOG.clear()
    checkpoint(region, x, use_reentrant=False).sum().backward()
    assert LOG == ref == [1, 2, 3, 1003, 1002, 1001]
    torch.testing.assert_close(x.grad, x_ref.grad)


def _message_of(fn: Callable[[], Any], match: str = "") -> str:
    """The message of the error ``fn`` raises. The error (and its traceback,
    which holds checkpoint's suspended generator) is dropped before returning:
    torch 2.11-2.12 exit a checkpoint's forward context only when that
    generator is closed, and a SAC mode left on the stack would leak into
    every later test."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - compiled errors arrive wrapped
        message = str(e)
    else:
        raise AssertionError("expected an error")
    gc.collect()
    assert torch._C._len_torch_dispatch_stack() == 0
    assert match in message
    return message


def test_sac_policy_demanding_recompute_of_an_effect_is_refused() -> None:
    x = torch.randn(4, requires_grad=True)
    message = _message_of(
        lambda: checkpoint(_region, x, use_reentrant=False, context_fn=_sac(_recompute_log))
    )
    assert_expected_inline(message, """\
hopkit: the selective activation checkpointing policy returned CheckpointPolicy.MUST_RECOMPUTE for hopkit_test_once::log.default, which is registered with hopkit.effects as EffectType.ORDERED; recomputing it would run its side effect again in backward. Return MUST_SAVE or PREFER_SAVE for it (PREFER_RECOMPUTE is treated as PREFER_SAVE for effectful ops), or destroy its registration.""")
    # Refused when the policy answers: torch 2.12+ ask it after running the
    # op (its one call has happened), 2.11 before.
    assert LOG == ([1] if torch_at_least("2.12") else [])


def test_compiled_sac_policy_demanding_recompute_of_an_effect_is_refused() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return checkpoint(_region, x, use_reentrant=False, context_fn=_sac(_recompute_log))

    _message_of(
        lambda: torch.compile(fn, backend="aot_eager", fullgraph=True)(
            torch.randn(4, requires_grad=True)),
        match="MUST_RECOMPUTE for hopkit_test_once::log.default, which is registered",
    )
    assert LOG == []  # refused while compiling: nothing ran


def test_recompute_that_diverges_from_the_forward_is_refused() -> None:
    forward = [True]

    def region(x: torch.Tensor) -> torch.Tensor:
        y = x.sin()
        return (y.cos() if forward[0] else log(y, 1).cos()) * 3

    x = torch.randn(4, requires_grad=True)
    out = checkpoint(region, x, use_reentrant=False).sum()
    forward[0] = False  # the recompute now calls log, which the forward did not
    with pytest.raises(RuntimeError) as info:
        out.backward()
    assert LOG == []
    assert_expected_inline(str(info.value), """\
hopkit: activation checkpointing recomputed a call of hopkit_test_once::log.default, which is registered effectful, but the checkpointed forward made no such call at this point (its effectful calls, in order: []). The recomputation must repeat the forward's effectful calls in the same order, so that their saved outputs are reused instead of running the effects again; keep control flow inside the checkpointed function independent of global state.""")


@pytest.mark.parametrize("style", list(STYLES))
def test_eager_checkpointing_of_a_hop_runs_its_body_effect_once(style: str) -> None:
    def region(x: torch.Tensor) -> torch.Tensor:
        return outer(hopkit.FunctionWithNoFreeVars(lambda y: (_region(y),)), x)[0]

    x = torch.randn(4, requires_grad=True)
    STYLES[style](region, x).sum().backward()
    assert LOG == [1, 1001]
    torch.testing.assert_close(x.grad, _expected_grad(x))
    assert dict(torch.fx.traceback.current_meta) == {}  # nothing leaks into later compiles


# ---------------------------------------------------------------------------
# torch.func transforms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_vmap_runs_an_ordered_op_once_per_example_in_order(backend: str) -> None:
    # The documented semantics (register_effectful_op): an op without a vmap
    # rule of its own runs once per example, in example order, as torch's
    # per-example fallback does; eager and compiled agree.
    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(lambda row: log(row * 2, 1) + 1)(x)

    g = fn if backend == "eager" else torch.compile(fn, backend=backend, fullgraph=True)
    x = torch.randn(3, 2)
    g(x)
    LOG.clear()
    out = g(x)
    assert LOG == [1, 1, 1]
    torch.testing.assert_close(out, x * 2 + 1)


class Logged(torch.autograd.Function):
    """``log`` with a functorch-ready autograd formula (torch.library's
    register_autograd is refused by torch.func.grad in torch 2.11-2.15)."""

    @staticmethod
    def forward(x: torch.Tensor, tag: int) -> torch.Tensor:
        return log(x, tag)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.tag = inputs[1]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return log(g, ctx.tag + 1000), None


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_grad_runs_forward_and_backward_effects_once(backend: str) -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(lambda y: Logged.apply(Logged.apply(y.sin(), 1), 2).sum())(x)

    g = fn if backend == "eager" else torch.compile(fn, backend=backend, fullgraph=True)
    x = torch.randn(3)
    g(x)
    LOG.clear()
    out = g(x)
    assert LOG == [1, 2, 1002, 1001]
    torch.testing.assert_close(out, x.cos())


def test_first_import_under_fake_mode_keeps_eager_tokens_real() -> None:
    # hopkit.effects may first be imported lazily while a trace runs (under
    # FakeTensorMode, e.g. inside an export); the token its eager fast path
    # hands out must still be a real tensor.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            import hopkit.effects as effects
        lib = torch.library.Library("hopkit_test_fake_import", "DEF")
        lib.define("f(Tensor x) -> Tensor")
        lib.impl("f", lambda x: x + 1, "CPU")
        op = torch.ops.hopkit_test_fake_import.f.default
        handle = effects.register_effectful_op(op, effects.EffectType.ORDERED)
        out = effects.with_effects(effects.new_token_tensor(), op, torch.ones(2))
        print(sorted({type(o).__name__ for o in out}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "['Tensor']"
