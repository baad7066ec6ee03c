"""hopkit.testing.hopcheck: passes on working HOPs, names the mode a broken one fails in.

The broken toy HOPs below are BaseHOP subclasses with one rule swapped for a
wrong one (a fake rule with the wrong dtype, a proxy rule that inlines the
subgraph, a backward that doubles the gradient); each is checked only in the
modes that show its bug, to keep Inductor compiles out of this file's runtime.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from expecttest import assert_expected_inline
from torch._C import DispatchKey
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode

import hopkit
from hopkit.testing import MODES, HopCheckError, HopCheckReport, hopcheck

# ---------------------------------------------------------------------------
# Toy HOPs
# ---------------------------------------------------------------------------


class InvokeQuant(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_test_hc_invoke_quant")


invoke_quant = InvokeQuant()


def g(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
    return (x.sin() * y,)


G = hopkit.FunctionWithNoFreeVars(g)


def mutate(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
    x.add_(1)
    return (x * y,)


def operands(dtype: torch.dtype = torch.float64, requires_grad: bool = True,
             n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    y = torch.randn(n, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    return x, y


def replace_rule(hop: hopkit.BaseHOP, key: Any, rule: Callable[..., Any]) -> None:
    """Swap one of ``hop``'s registered rules for ``rule``.

    ``HigherOrderOperator.py_impl`` refuses a key that already has a rule, so
    the old one is removed first: dispatch keys live in ``py_kernels``, modes
    (FakeTensorMode, ProxyTorchDispatchMode) in ``python_key_table``.
    ``py_impl`` clears the dispatch cache.
    """
    table: dict[Any, Any] = hop.py_kernels if isinstance(key, DispatchKey) else hop.python_key_table
    del table[key]
    hop.py_impl(key)(rule)


class WrongFake(hopkit.BaseHOP):
    """Its fake rule claims float64 outputs whatever eager computes."""

    def __init__(self) -> None:
        super().__init__("hopkit_test_hc_wrong_fake")

    def _register_rules(self) -> None:
        super()._register_rules()

        def fake(mode: FakeTensorMode, subgraph: Any, *args: Any, **kwargs: Any) -> Any:
            with mode:
                return tuple(o.to(torch.float64) for o in subgraph(*args))

        replace_rule(self, FakeTensorMode, fake)


class InliningProxy(hopkit.BaseHOP):
    """Its proxy rule traces the subgraph's ops into the caller's graph."""

    def __init__(self) -> None:
        super().__init__("hopkit_test_hc_inlining_proxy")

    def _register_rules(self) -> None:
        super()._register_rules()

        def proxy(mode: ProxyTorchDispatchMode, subgraph: Any, *args: Any, **kwargs: Any) -> Any:
            with mode:
                return subgraph(*args)

        replace_rule(self, ProxyTorchDispatchMode, proxy)


class _DoubledBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hop: Any, subgraph: Any, kwargs: dict[str, Any], *args: Any) -> Any:
        ctx.subgraph = subgraph
        ctx.save_for_backward(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return hop(subgraph, *args, **kwargs)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        args = [a.detach().requires_grad_(a.requires_grad) for a in ctx.saved_tensors]
        with torch.enable_grad():
            outs = ctx.subgraph(*args)
        diff = [a for a in args if a.requires_grad]
        got = iter(torch.autograd.grad(outs, diff, grads, allow_unused=True))
        return (None, None, None, *(2 * next(got) if a.requires_grad else None for a in args))


class WrongBackward(hopkit.BaseHOP):
    """Its autograd rule is an autograd.Function whose backward doubles the grad."""

    def __init__(self) -> None:
        super().__init__("hopkit_test_hc_wrong_backward")

    def _register_rules(self) -> None:
        super()._register_rules()

        def autograd(subgraph: Any, *args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled() and any(a.requires_grad for a in args):
                return _DoubledBackward.apply(self, subgraph, kwargs, *args)
            with torch._C._AutoDispatchBelowAutograd():
                return self(subgraph, *args, **kwargs)

        replace_rule(self, DispatchKey.Autograd, autograd)


wrong_fake = WrongFake()
inlining_proxy = InliningProxy()
wrong_backward = WrongBackward()


def failures(report: HopCheckReport) -> dict[str, str]:
    return {r.mode: r.reason for r in report.failed}


def error_of(fn: Callable[[], Any], exc: type[BaseException]) -> BaseException:
    with pytest.raises(exc) as info:
        fn()
    return info.value


def normalize_seconds(text: str) -> str:
    return re.sub(r"\d+\.\d\d", "0.00", text)


# ---------------------------------------------------------------------------
# Working HOPs pass every mode
# ---------------------------------------------------------------------------


def test_hopcheck_passes_every_mode_on_invoke_quant() -> None:
    report = hopcheck(invoke_quant, G, *operands(), scheme="nf4")
    assert [r.mode for r in report.results] == list(MODES)
    assert report.passed and all(r.status == "passed" for r in report.results), str(report)
    print(report)  # the per-mode timings, with pytest -s


def test_hopcheck_passes_on_a_mutating_subgraph() -> None:
    x, y = operands(torch.float32, requires_grad=False)
    y.requires_grad_(True)  # grads of y; x is mutated, so it must not need grad
    report = hopcheck(invoke_quant, hopkit.FunctionWithNoFreeVars(mutate), x, y)
    assert report.passed, str(report)
    assert report["gradcheck"].status == "skipped"
    # hopcheck ran every mode on clones: the caller's operands are untouched.
    torch.testing.assert_close(x, operands(torch.float32)[0].detach())


def test_hopcheck_accepts_a_graph_module_subgraph() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    x, y = operands(torch.float32, requires_grad=False)
    gm = make_fx(g)(x, y)
    report = hopcheck(invoke_quant, gm, x, y, modes=["eager", "fake", "make_fx_symbolic",
                                                     "functionalize", "export_non_strict"])
    assert report.passed, str(report)


# ---------------------------------------------------------------------------
# Broken HOPs fail in the mode that shows their bug
# ---------------------------------------------------------------------------


def test_wrong_fake_rule_is_caught_under_fake() -> None:
    x, y = operands(torch.float32, requires_grad=False)
    err = error_of(lambda: hopcheck(wrong_fake, G, x, y, modes=["eager", "fake", "make_fx_real"]),
                   HopCheckError)
    assert isinstance(err, HopCheckError)
    assert_expected_inline(str(err), """\
hopkit: hopcheck of torch.ops.higher_order.hopkit_test_hc_wrong_fake failed in 1 of 3 modes:
  fake: AssertionError: output[0] under FakeTensorMode has dtype torch.float64, but torch.float32 in eager
Rerun one with hopcheck(..., modes=['fake']) to debug it; this error's .report lists every mode.""")
    assert_expected_inline(normalize_seconds(str(err.report)), """\
hopcheck(torch.ops.higher_order.hopkit_test_hc_wrong_fake): 2 passed, 1 failed, 0 skipped in 0.00 s
mode          result   seconds  reason
eager         passed      0.00
fake          failed      0.00  AssertionError: output[0] under FakeTensorMode has dtype torch.float64, but torch.float32 in eager
make_fx_real  passed      0.00""")


def test_inlining_proxy_rule_is_caught_under_make_fx() -> None:
    x, y = operands(torch.float32, requires_grad=False)
    err = error_of(
        lambda: hopcheck(inlining_proxy, G, x, y, scheme="nf4",
                         modes=["eager", "fake", "make_fx_real", "make_fx_fake", "make_fx_symbolic"]),
        HopCheckError,
    )
    assert isinstance(err, HopCheckError)
    assert set(failures(err.report)) == {"make_fx_real", "make_fx_fake", "make_fx_symbolic"}
    assert_expected_inline(failures(err.report)["make_fx_real"], """AssertionError: the make_fx('real') graph has 0 calls of torch.ops.higher_order.hopkit_test_hc_inlining_proxy, expected exactly one (the proxy rule must emit one call_function node, not inline the subgraph)""")


def test_wrong_backward_is_caught_under_autograd_and_gradcheck() -> None:
    err = error_of(
        lambda: hopcheck(wrong_backward, G, *operands(), modes=["eager", "autograd", "gradcheck"]),
        HopCheckError,
    )
    assert isinstance(err, HopCheckError)
    reasons = failures(err.report)
    assert set(reasons) == {"autograd", "gradcheck"}
    assert reasons["autograd"].startswith(
        "AssertionError: grad of operands[0] through the HOP differs from eager: "
        "Mismatched elements: 3 / 3 (100.0%); Greatest absolute difference: "
    )
    assert reasons["gradcheck"] == (
        "GradcheckError: Jacobian mismatch for output 0 with respect to input 0"
    )


# ---------------------------------------------------------------------------
# Options and errors
# ---------------------------------------------------------------------------


def test_modes_selects_and_orders() -> None:
    report = hopcheck(invoke_quant, G, *operands(torch.float32), modes=["fake", "eager", "gradcheck"])
    assert [(r.mode, r.status) for r in report.results] == [
        ("eager", "passed"), ("fake", "passed"), ("gradcheck", "skipped")]
    assert report["gradcheck"].reason == "operands that require grad are torch.float32, not float64"


def test_unknown_mode_error() -> None:
    err = error_of(lambda: hopcheck(invoke_quant, G, *operands(),
                                    modes=["fake", "fakes", "export_nonstrict", "dynamo"]),
                   ValueError)
    assert_expected_inline(str(err), """hopkit: hopcheck expects mode names from hopkit.testing.MODES or their aliases, but got 'fakes' (did you mean 'fake'?), 'export_nonstrict' (did you mean 'export_non_strict' or 'export_strict'?), 'dynamo'; valid modes are eager, schema, fake, make_fx_real, make_fx_fake, make_fx_symbolic, functionalize, autograd, gradcheck, compile_eager, compile_aot_eager, compile_inductor, export_strict, export_non_strict; aliases are make_fx (make_fx_real, make_fx_fake, make_fx_symbolic), compile (compile_eager, compile_aot_eager, compile_inductor), aot_eager (compile_aot_eager), inductor (compile_inductor), export (export_strict, export_non_strict); or pass modes=None for all of them.""")


def test_modes_must_be_names() -> None:
    err = error_of(lambda: hopcheck(invoke_quant, G, *operands(), modes=42), TypeError)
    assert_expected_inline(str(err), """hopkit: hopcheck expects modes to be a mode name, a list of mode names or None (every mode), but got int 42; pass e.g. modes=['eager', 'fake'] or modes='make_fx'.""")
    err = error_of(lambda: hopcheck(invoke_quant, G, *operands(), modes=["eager", 3]), TypeError)
    assert_expected_inline(str(err), """hopkit: hopcheck expects modes to hold mode names (str), but modes[1] is int 3; pass names from hopkit.testing.MODES, e.g. modes=['eager', 'fake'].""")
    err = error_of(lambda: hopcheck(invoke_quant, G, *operands(), modes=[]), ValueError)
    assert_expected_inline(str(err), """hopkit: hopcheck expects at least one mode, but modes is empty; name the modes to run (e.g. modes=['eager']), or pass modes=None for all of them.""")


def test_mode_aliases() -> None:
    from hopkit.testing import _select_modes

    assert _select_modes("make_fx") == ["make_fx_real", "make_fx_fake", "make_fx_symbolic"]
    assert _select_modes(["export"]) == ["export_strict", "export_non_strict"]
    assert _select_modes(["inductor", "aot_eager"]) == ["compile_aot_eager", "compile_inductor"]
    assert _select_modes(("compile", "eager")) == [
        "eager", "compile_eager", "compile_aot_eager", "compile_inductor"]
    assert _select_modes({"fake", "make_fx_fake", "make_fx"}) == [
        "fake", "make_fx_real", "make_fx_fake", "make_fx_symbolic"]
    # One name, alias or mode, is one string; hopcheck runs what it stands for.
    x, y = operands(torch.float32, requires_grad=False)
    report = hopcheck(invoke_quant, G, x, y, modes="make_fx")
    assert [r.mode for r in report.results] == ["make_fx_real", "make_fx_fake", "make_fx_symbolic"]
    assert [r.mode for r in hopcheck(invoke_quant, G, x, y, modes="fake").results] == ["fake"]


def test_mode_keyword_for_modes() -> None:
    # mode= would reach the HOP as configuration and run every mode.
    err = error_of(lambda: hopcheck(invoke_quant, G, *operands(), mode=["fake"]), TypeError)
    assert_expected_inline(str(err), """hopkit: hopcheck takes the modes to run as modes=, but got mode=['fake'], which it would pass to hopkit_test_hc_invoke_quant as configuration; write modes=['fake'].""")


def test_hop_that_is_not_a_hop_instance() -> None:
    err = error_of(lambda: hopcheck(InvokeQuant, G, *operands()), TypeError)  # type: ignore[arg-type]
    assert_expected_inline(str(err), """hopkit: hopcheck expects a HigherOrderOperator (e.g. a hopkit.BaseHOP instance) first, but got the class InvokeQuant; pass its instance (e.g. the module-level object that InvokeQuant() returned), not the class.""")
    err = error_of(lambda: hopcheck(g, *operands()), TypeError)  # type: ignore[arg-type]
    assert_expected_inline(str(err), """hopkit: hopcheck expects a HigherOrderOperator (e.g. a hopkit.BaseHOP instance) first, but got the function g; pass the HOP first, then its subgraph: hopcheck(hop, subgraph, *operands) (for an operator, use torch.library.opcheck).""")
    err = error_of(lambda: hopcheck(torch.ops.aten.sin.default, operands()[0]), TypeError)  # type: ignore[arg-type]
    assert_expected_inline(str(err), """hopkit: hopcheck expects a HigherOrderOperator (e.g. a hopkit.BaseHOP instance) first, but got the operator aten.sin.default; check an operator with torch.library.opcheck.""")


def test_configuration_must_be_constants() -> None:
    x, y = operands(torch.float32, requires_grad=False)
    err = error_of(lambda: hopcheck(invoke_quant, G, x, y, scales=(1.0, torch.ones(1))), TypeError)
    assert_expected_inline(str(err), """hopkit: hopcheck passes the configuration of hopkit_test_hc_invoke_quant to every call, and configuration must be constants (str, int, float, bool, None, torch.dtype, torch.device, enums, and tuples, lists or frozen dataclasses of those), but kwargs['scales'][1] is a Tensor; pass tensors as operands after the subgraph, and call functions and modules inside the subgraph.""")
    err = error_of(lambda: hopcheck(invoke_quant, G, x, y, act=torch.nn.ReLU()), TypeError)
    assert_expected_inline(str(err), """hopkit: hopcheck passes the configuration of hopkit_test_hc_invoke_quant to every call, and configuration must be constants (str, int, float, bool, None, torch.dtype, torch.device, enums, and tuples, lists or frozen dataclasses of those), but kwargs['act'] is a torch.nn.Module (ReLU); pass tensors as operands after the subgraph, and call functions and modules inside the subgraph.""")


def test_the_hop_refuses_its_arguments_at_the_call() -> None:
    # wrap_with_autocast's own checks: raised once, before the reference,
    # instead of as a failure of every mode (or a torch error in the reference).
    hx = pytest.importorskip("hopkit.export")
    x, y = operands(torch.float32, requires_grad=False)
    err = error_of(lambda: hopcheck(hx.wrap_with_autocast, "cpu", "bf16", True, None, G, x, y),
                   TypeError)
    assert_expected_inline(str(err), """hopkit: wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *args) takes torch.autocast's arguments: dtype must be a torch.dtype or None, but is 'bf16' (str); pass them as torch.autocast takes them, e.g. ('cpu', torch.bfloat16, True, None).""")
    err = error_of(lambda: hopcheck(hx.wrap_with_autocast, "cpu", torch.bfloat16, True, None, G,
                                    x, y, cache_enabled=False), TypeError)
    assert_expected_inline(str(err), """hopkit: wrap_with_autocast takes no keyword arguments, but got ['cache_enabled']; pass (device_type, dtype, enabled, cache_enabled, subgraph, *args) positionally.""")
    err = error_of(lambda: hopcheck(hx.wrap_with_autocast, "cpu", True, None, G, x, y), TypeError)
    assert_expected_inline(str(err), """hopkit: hopcheck calls hopkit_wrap_with_autocast as hopkit_wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *operands), but the subgraph is argument 3 (cache_enabled); pass all 4 configuration arguments before it.""")


def test_reference_error() -> None:
    # The subgraph raises an error of its own: torch's shape-error wording
    # changes between releases (2.15 prefixes "mm: "), hopkit's framing does not.
    def broken(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor]:
        raise RuntimeError(f"shapes {list(a.shape)} and {list(b.shape)} do not fit")

    bad = hopkit.FunctionWithNoFreeVars(broken)
    err = error_of(lambda: hopcheck(invoke_quant, bad, *operands(), modes=["eager"]), RuntimeError)
    assert_expected_inline(str(err), """hopkit: hopcheck could not compute its reference: calling the subgraph directly raised RuntimeError: shapes [3] and [3] do not fit. Fix the subgraph or the operands first; hopcheck compares every mode with this reference.""")


def test_subgraph_type_error() -> None:
    err = error_of(lambda: hopcheck(invoke_quant, g, *operands()), TypeError)
    assert_expected_inline(str(err), """hopkit: hopcheck calls hopkit_test_hc_invoke_quant outside torch.compile too, so its subgraph must be a torch.fx.GraphModule or a hopkit.FunctionWithNoFreeVars, but got a function; wrap the function: hopcheck(hop, hopkit.FunctionWithNoFreeVars(fn), *operands).""")
    hx = pytest.importorskip("hopkit.export")
    err = error_of(lambda: hopcheck(hx.wrap_with_autocast, "cpu", None, True, None, g, *operands()),
                   TypeError)
    assert_expected_inline(str(err), """hopkit: hopcheck calls hopkit_wrap_with_autocast outside torch.compile too, so its subgraph must be a torch.fx.GraphModule or a hopkit.FunctionWithNoFreeVars, but got a function; wrap the function: hopcheck(hop, device_type, dtype, enabled, cache_enabled, hopkit.FunctionWithNoFreeVars(fn), *operands).""")


def test_import_stays_lean() -> None:
    import subprocess
    import sys

    code = ("import sys, hopkit; before = 'hopkit.testing' in sys.modules; "
            "import hopkit.testing; "
            "print(before, sorted(m for m in sys.modules if m.startswith(('torch._inductor', "
            "'torch._dynamo.variables', 'torch._dynamo.backends'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False []"


# ---------------------------------------------------------------------------
# The HOPs hopkit ships
# ---------------------------------------------------------------------------


def test_hopcheck_wrap_with_autocast() -> None:
    hx = pytest.importorskip("hopkit.export")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, generator=gen, requires_grad=True)
    w = torch.randn(3, 3, generator=gen, requires_grad=True)

    def body(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor]:
        return ((a @ b).relu(),)

    report = hopcheck(hx.wrap_with_autocast, "cpu", torch.bfloat16, True, None,
                      hopkit.FunctionWithNoFreeVars(body), x, w)
    assert report.passed, str(report)


@torch.library.custom_op("hopkit_test_testing::scale", mutates_args=())
def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * factor


@scale.register_fake
def _(x: torch.Tensor, factor: float) -> torch.Tensor:
    return torch.empty_like(x)


def _scale_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.factor = inputs[1]


scale.register_autograd(lambda ctx, grad: (grad * ctx.factor, None), setup_context=_scale_setup)

# with_effects is threaded in by functionalization (AOTAutograd, export's
# run_decompositions) for registered effectful ops; user code never calls it,
# and Dynamo cannot trace a direct call (as for torch's own with_effects).
WITH_EFFECTS_MODES = [m for m in MODES if not m.startswith("compile_") and m != "export_strict"]


def test_hopcheck_with_effects() -> None:
    effects = pytest.importorskip("hopkit.effects")
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    handle = effects.register_effectful_op(torch.ops.hopkit_test_testing.scale.default,
                                           effects.EffectType.ORDERED)
    try:
        report = hopcheck(effects.with_effects, effects.new_token_tensor(),
                          torch.ops.hopkit_test_testing.scale.default, x, 2.0,
                          modes=WITH_EFFECTS_MODES)
    finally:
        handle.destroy()
    assert report.passed, str(report)
    assert report["schema"].status == "skipped"
    # Called directly, Dynamo refuses it: hopcheck says so under the compile modes.
    err = error_of(lambda: hopcheck(effects.with_effects, effects.new_token_tensor(),
                                    torch.ops.hopkit_test_testing.scale.default, x, 2.0,
                                    modes=["compile_eager"]), HopCheckError)
    assert isinstance(err, HopCheckError)
    assert failures(err.report) == {"compile_eager": "Unsupported: unsupported HigherOrderOperator"}


def test_tuple_kwargs_survive_export_load() -> None:
    x, y = operands(torch.float32, requires_grad=False)
    hopcheck(invoke_quant, G, x, y, names=("a", "b"), modes=["export_non_strict"])
