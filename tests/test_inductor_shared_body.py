"""A body several HOP calls share compiles once in Inductor.

NOTE [A shared HOP body compiles once in Inductor] (hopkit/inductor/shared_body.py):
N equal calls leave one body module in the graphs Inductor gets; it is
lowered once, as a subgraph function of the generated code, and every call
calls it. The tests read the generated code (``run_and_get_code``): one
``def subgraph_N`` for N calls, in the forward and in the backward, with
results and gradients equal to eager; and the cases that stay inlined (one
call, ``inductor_mode="inline"``, a pointwise body, a random body).
Shapes are tiny: every compile costs seconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from expecttest import assert_expected_inline
from torch._inductor.utils import run_and_get_code

import hopkit
from repeated_blocks import model, reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


class Block(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_test_shared_block")


class InlinedBlock(hopkit.BaseHOP):
    inductor_mode = "inline"

    def __init__(self) -> None:
        super().__init__("hopkit_test_shared_block_inline")


block = Block()
inlined_block = InlinedBlock()


def operands(n: int, device: str = "cpu", rows: int = 2,
             requires_grad: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 4, generator=gen)
    ws = [torch.randn(4, 4, generator=gen) / 2 for _ in range(n)]
    return [t.to(device).requires_grad_(requires_grad) for t in [x, *ws]]


def compiled_code(fn: Callable[..., Any], *args: Any, backward: bool = False,
                  dynamic: bool = False) -> tuple[Any, list[str]]:
    """fn compiled by Inductor, run once (and backward), with the generated code."""
    compiled = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=dynamic)

    def run() -> Any:
        out = compiled(*args)
        if backward:
            out.sum().backward()
        return out

    out, codes = run_and_get_code(run)
    return out, codes


def subgraph_lines(code: str) -> str:
    """The lines of generated code that define or call a subgraph function."""
    lines = [line.strip() for line in code.splitlines()
             if re.search(r"\bdef subgraph_\d+\(|= subgraph_\d+\(", line)]
    return "\n".join(lines)


def kernel_count(code: str) -> int:
    return len(re.findall(r"^(?:cpp_fused_|triton_)\w+ = async_compile", code, re.M))


@pytest.mark.parametrize("device", DEVICES)
def test_three_calls_call_one_compiled_body(device: str) -> None:
    args = operands(3, device)
    out, codes = compiled_code(lambda *a: model(block, *a), *args)
    torch.testing.assert_close(out, reference(*args))
    assert len(codes) == 1
    assert_expected_inline(subgraph_lines(codes[0]), """\
def subgraph_0(args):
buf0 = subgraph_0(subgraph_0_args)
buf2 = subgraph_0(subgraph_0_args)
buf4 = subgraph_0(subgraph_0_args)""")
    # One body's code, not three: its matmul is written once (Inductor
    # dedups identical kernels anyway, so count the extern call).
    assert codes[0].count("extern_kernels.mm(") == 1


@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_backward_each_compile_their_body_once(device: str) -> None:
    args = operands(3, device, requires_grad=True)
    out, codes = compiled_code(lambda *a: model(block, *a), *args, backward=True)
    grads = [a.grad for a in args]
    expected_args = [a.detach().clone().requires_grad_() for a in args]
    expected = reference(*expected_args)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, (a.grad for a in expected_args)):
        torch.testing.assert_close(got, want)
    assert len(codes) == 2  # forward, backward
    for code in codes:
        assert len(re.findall(r"\bdef subgraph_\d+\(", code)) == 1, code
        assert len(re.findall(r"= subgraph_\d+\(", code)) == 3, code


def test_dynamic_shapes_share_the_compiled_body() -> None:
    fn = torch.compile(lambda *a: model(block, *a), backend="inductor", fullgraph=True,
                       dynamic=True)
    for rows in (2, 5):
        args = operands(3, rows=rows)
        out, codes = run_and_get_code(fn, *args)
        torch.testing.assert_close(out, reference(*args))
    args = operands(3, rows=3)
    out, codes = run_and_get_code(
        torch.compile(lambda *a: model(block, *a), backend="inductor", fullgraph=True,
                      dynamic=True), *args)
    torch.testing.assert_close(out, reference(*args))
    assert len(re.findall(r"\bdef subgraph_\d+\(", codes[0])) == 1
    assert len(re.findall(r"= subgraph_\d+\(", codes[0])) == 3


def test_one_call_is_inlined() -> None:
    args = operands(1)
    out, codes = compiled_code(lambda *a: model(block, *a), *args)
    torch.testing.assert_close(out, reference(*args))
    assert subgraph_lines(codes[0]) == ""


def test_inline_mode_inlines_every_call() -> None:
    args = operands(3)
    out, codes = compiled_code(lambda *a: model(inlined_block, *a), *args)
    torch.testing.assert_close(out, reference(*args))
    assert subgraph_lines(codes[0]) == ""
    assert codes[0].count("extern_kernels.mm(") == 3


def test_a_shared_pointwise_body_still_fuses() -> None:
    body = hopkit.FunctionWithNoFreeVars(lambda x: (x.sin() * 2,))
    x = torch.randn(8)

    def f(a: torch.Tensor) -> torch.Tensor:
        return block(body, block(body, a)[0])[0] + 1

    out, codes = compiled_code(f, x)
    torch.testing.assert_close(out, (x.sin() * 2).sin() * 2 + 1)
    assert subgraph_lines(codes[0]) == ""
    assert kernel_count(codes[0]) == 1


def test_a_random_body_is_inlined_and_keeps_each_calls_draws() -> None:
    def noisy(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w + torch.rand_like(x)

    body = hopkit.FunctionWithNoFreeVars(noisy)
    x, w = torch.zeros(2, 4), torch.zeros(4, 4)

    def f(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return block(body, a, b), block(body, a, b)

    (first, second), codes = compiled_code(f, x, w)
    assert subgraph_lines(codes[0]) == ""
    assert not torch.equal(first, second)
    assert bool(((first >= 0) & (first < 1)).all())


def test_aoti_package_of_a_shared_body(tmp_path: Path) -> None:
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ws = torch.nn.ParameterList(
                torch.nn.Parameter(w) for w in operands(2)[1:])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return model(block, x, *self.ws)

    m = Model()
    x = operands(0)[0]
    ep = torch.export.export(m, (x,), strict=False)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x, *m.ws))
