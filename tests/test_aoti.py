"""AOTInductor packages of programs with hopkit HOPs, and hopcheck's "aoti" mode.

A program with a BaseHOP call, ``wrap_with_autocast`` and effect tokens is
compiled with ``torch._inductor.aoti_compile_and_package`` and loaded with
``aoti_load_package``, in this process and in a fresh one, with eager's
results, each side effect exactly once per call, and no Inductor warning about
hopkit's nodes. AOTI compiles are slow: few tests, tiny shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from expecttest import assert_expected_inline

import hopkit
from hopkit.effects import EffectType, register_effectful_op
from hopkit.export import wrap_with_autocast
from hopkit.testing import MODES, OPT_IN_MODES, HopCheckError, hopcheck

SUBPROCESS_TIMEOUT_S = 240

# The effectful op lives in a module of its own, so that a fresh process can
# import it: an AOTInductor package calls a Python custom op through torch.ops.
OP_MODULE = '''
import torch

CALLS = []

@torch.library.custom_op("hopkit_test_aoti::log", mutates_args=())
def log(x: torch.Tensor) -> torch.Tensor:
    CALLS.append(x.sum().item())
    return x.clone()

@log.register_fake
def _(x):
    return torch.empty_like(x)
'''


class AotiHop(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_test_aoti_hop")


aoti_hop = AotiHop()


@pytest.fixture(scope="module")
def op_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ModuleType]]:
    root = tmp_path_factory.mktemp("aoti")
    (root / "aoti_log_op.py").write_text(OP_MODULE)
    sys.path.insert(0, str(root))
    try:
        import aoti_log_op

        yield root, aoti_log_op
    finally:
        sys.path.remove(str(root))


def hop_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught
            if "hopkit" in str(w.message) or "subgraph args" in str(w.message)]


@pytest.mark.slow
def test_package_with_hop_autocast_and_effects_loads_anywhere(
        op_dir: tuple[Path, ModuleType], tmp_path: Path) -> None:
    root, op_module = op_dir
    log = torch.ops.hopkit_test_aoti.log.default
    body = hopkit.FunctionWithNoFreeVars(lambda x, w: (log(x.sin() @ w) * 2,))
    autocast_body = hopkit.FunctionWithNoFreeVars(lambda x, w: (log(x @ w),))

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
            a = log(x + 1)
            (y,) = aoti_hop(body, a, w, scheme="nf4", group=(1, 2))
            (z,) = wrap_with_autocast("cpu", torch.bfloat16, True, None, autocast_body, x, w)
            return y.relu() + 1, z

    x, w = torch.randn(2, 3), torch.randn(3, 3)
    handle = register_effectful_op(log, EffectType.ORDERED)
    try:
        op_module.CALLS.clear()
        expected = M()(x, w)
        eager_calls = list(op_module.CALLS)
        assert len(eager_calls) == 3
        ep = torch.export.export(M(), (x, w))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = torch._inductor.aoti_compile_and_package(
                ep, package_path=str(tmp_path / "model.pt2"))
        assert hop_warnings(caught) == []
    finally:
        handle.destroy()

    # In this process: eager's values, each side effect once per call, in order.
    package = torch._inductor.aoti_load_package(path)
    for _ in range(2):
        op_module.CALLS.clear()
        out = package(x, w)
        # The values each call logged (x.sum()), in eager's order: float32
        # sums of compiled kernels may differ in the last bits.
        torch.testing.assert_close(op_module.CALLS, eager_calls, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out, expected)
    assert out[1].dtype == torch.bfloat16

    # In a fresh process that imported neither hopkit nor this file.
    torch.save({"x": x, "w": w, "expected": expected, "calls": eager_calls},
               tmp_path / "io.pt")
    code = textwrap.dedent(f'''
        import sys, torch
        import aoti_log_op
        data = torch.load({str(tmp_path / "io.pt")!r})
        package = torch._inductor.aoti_load_package({path!r})
        for i in range(2):
            aoti_log_op.CALLS.clear()
            out = package(data["x"], data["w"])
            torch.testing.assert_close(out, data["expected"])
            torch.testing.assert_close(aoti_log_op.CALLS, data["calls"], rtol=1e-4, atol=1e-5)
            print(f"call {{i}}: {{len(aoti_log_op.CALLS)}} side effects, {{out[1].dtype}}")
        print("hopkit imported:", "hopkit" in sys.modules)
    ''')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_expected_inline(run.stdout.strip(), """\
call 0: 3 side effects, torch.bfloat16
call 1: 3 side effects, torch.bfloat16
hopkit imported: False""")


@pytest.mark.slow
def test_hopcheck_aoti_mode_passes_for_a_hop_and_wrap_with_autocast() -> None:
    body = hopkit.FunctionWithNoFreeVars(lambda x, w: (torch.tanh(x @ w), x.cos()))
    x, w = torch.randn(2, 3), torch.randn(3, 2)
    report = hopcheck(aoti_hop, body, x, w, modes=["aoti"], names=("a", "b"))
    assert [(r.mode, r.status) for r in report.results] == [("aoti", "passed")]
    report = hopcheck(wrap_with_autocast, "cpu", torch.bfloat16, True, None, body, x, w,
                      modes=["aoti"])
    assert [(r.mode, r.status) for r in report.results] == [("aoti", "passed")]


def test_aoti_is_opt_in() -> None:
    assert "aoti" not in MODES and OPT_IN_MODES == ("aoti",)


def _fake_aoti(monkeypatch: pytest.MonkeyPatch, package: Any, warn: str | None = None) -> None:
    """Stand-ins for compile and load: hopcheck's comparison, without a compile."""
    import torch._inductor

    def compile_and_package(ep: Any, package_path: str) -> str:
        if warn is not None:
            warnings.warn(warn)
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: package)


def test_hopcheck_aoti_mode_reports_a_wrong_package(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_aoti(monkeypatch, lambda x: (x.sin() + 1,))
    body = hopkit.FunctionWithNoFreeVars(lambda x: (x.sin(),))
    with pytest.raises(HopCheckError) as e:
        hopcheck(aoti_hop, body, torch.ones(3), modes="aoti")
    assert_expected_inline(str(e.value), """\
hopkit: hopcheck of torch.ops.higher_order.hopkit_test_aoti_hop failed in 1 of 1 modes:
  aoti: AssertionError: output[0] from the AOTInductor package differs from eager: Mismatched elements: 3 / 3 (100.0%); Greatest absolute difference: 1.0 at index (0,) (up to 1e-05 allowed)
Rerun one with hopcheck(..., modes=['aoti']) to debug it; this error's .report lists every mode.""")  # noqa: E501


def test_hopcheck_aoti_mode_reports_an_inductor_warning_about_the_hop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_aoti(monkeypatch, lambda x: (x.sin(),),
               warn="Please add support for subgraph args to function hopkit_test_aoti_hop!")
    body = hopkit.FunctionWithNoFreeVars(lambda x: (x.sin(),))
    with pytest.raises(HopCheckError) as e:
        hopcheck(aoti_hop, body, torch.ones(3), modes=["aoti"])
    assert_expected_inline(e.value.report["aoti"].reason, """AssertionError: Inductor warned while compiling the AOTInductor package: Please add support for subgraph args to function hopkit_test_aoti_hop!""")  # noqa: E501
