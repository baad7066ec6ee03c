"""Tests for hopkit.export.onnx_translations: hopkit HOPs through torch.onnx.export.

Needs hopkit's onnx extra (onnx, onnxscript, onnxruntime); skipped without it.
Reference semantics: the eager model; onnxruntime's outputs equal it within
float32 tolerance.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from typing import Any

import expecttest
import pytest
import torch

import hopkit
import hopkit.export as hx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

HOP_KEY = "pkg.hopkit.hop"


class OnnxOuter(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("test_onnx_outer")


class OnnxInner(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("test_onnx_inner")


onnx_outer = OnnxOuter()
onnx_inner = OnnxInner()


def inner_body(x: torch.Tensor) -> torch.Tensor:
    return x.cos() * 2  # one value, not a tuple


def outer_body(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = onnx_inner(hopkit.FunctionWithNoFreeVars(inner_body), x)
    return ((x @ w).sin() + c, x + 1)


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = onnx_outer(hopkit.FunctionWithNoFreeVars(outer_body), x, self.w, scheme="nf4")
        return a * b


class AutocastModel(torch.nn.Module):
    """An autocast region (float16: onnxruntime's CPU MatMul has no bfloat16)."""

    def __init__(self) -> None:
        super().__init__()
        # Small integers: the float16 matmul is exact, so eager and
        # onnxruntime agree to float32 tolerance.
        self.w = torch.nn.Parameter(torch.randint(-2, 3, (3, 4)).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (y,) = onnx_outer(hopkit.FunctionWithNoFreeVars(lambda t: (t + 1,)), x)
        with torch.autocast("cpu", dtype=torch.float16):
            z = y @ self.w
        return z.float() * 0.5 + y.sum()


def export(model: torch.nn.Module, args: tuple[Any, ...], **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            model, args, dynamo=True, custom_translation_table=hx.onnx_translations(),
            verbose=False, **kwargs,
        )


def run_ort(onnx_program: Any, *args: torch.Tensor) -> list[torch.Tensor]:
    return [torch.as_tensor(o) for o in onnx_program(*args)]


def hop_tags(model: Any) -> list[tuple[str, str | None]]:
    return [(n.op_type, n.metadata_props.get(HOP_KEY)) for n in model.graph]


class TestOnnx(expecttest.TestCase):
    def test_base_hops_match_eager(self) -> None:
        m = Model()
        x = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
        program = export(m, (x,))
        (got,) = run_ort(program, x)
        torch.testing.assert_close(got, m(x).detach())
        # The exporter inlines local functions; the regions stay as tags.
        tags = hop_tags(program.model)
        assert ("Cos", "test_onnx_inner") in tags
        assert ("Sin", "test_onnx_outer") in tags
        assert tags[-1] == ("Mul", None)

    def test_exported_program_and_dynamic_shapes(self) -> None:
        m = Model()
        ep = hx.export(m, (torch.randn(3, 3),), dynamic_shapes=({0: torch.export.Dim("b")},))
        program = export(ep, (torch.randn(3, 3),))
        x = torch.randn(5, 3)
        (got,) = run_ort(program, x)
        torch.testing.assert_close(got, m(x).detach())

    def test_autocast_matches_eager(self) -> None:
        m = AutocastModel()
        x = torch.randint(-2, 3, (2, 3)).float()
        program = export(hx.export(m, (x,)), (x,))
        (got,) = run_ort(program, x)
        torch.testing.assert_close(got, m(x).detach())
        tags = hop_tags(program.model)
        assert ("MatMul", "hopkit_wrap_with_autocast") in tags
        assert any(op == "Cast" and tag == "hopkit_wrap_with_autocast" for op, tag in tags)

    def test_region_is_a_function_named_after_the_hop(self) -> None:
        # Before torch.onnx.export's version converter inlines local functions
        # (NOTE [hopkit HOPs in the ONNX exporter]), each call is a node
        # pkg.hopkit::<hop> calling its body; the model runs as it is.
        import onnx_ir as ir
        import onnxruntime as ort
        from torch.onnx._internal.exporter import _core, _registration

        m = Model()
        x = torch.randn(3, 3, generator=torch.Generator().manual_seed(2))
        registry = _registration.ONNXRegistry.from_torchlib()
        for hop, fn in hx.onnx_translations().items():
            registry.register_op(hop, fn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(m, (x,)).run_decompositions()
            model = _core.exported_program_to_ir(ep, registry=registry)
        calls = [(n.domain, n.op_type) for n in model.graph if n.domain.startswith("pkg.hopkit")]
        assert calls == [("pkg.hopkit.subgraph_0", "test_onnx_outer")]
        names = sorted((d, n) for d, n, _ in model.functions if d.startswith("pkg.hopkit"))
        assert names == [
            ("pkg.hopkit.subgraph_0", "test_onnx_outer"),
            ("pkg.hopkit.subgraph_0__subgraph_0", "test_onnx_inner"),
        ]
        (call,) = [n for n in model.graph if n.op_type == "test_onnx_outer"]
        assert call.metadata_props["pkg.hopkit.config"] == "{'scheme': 'nf4'}"
        for domain, _, _ in model.functions:
            model.opset_imports.setdefault(domain, 1)
        proto = ir.serde.serialize_model(model)
        onnx.checker.check_model(proto)
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.as_tensor(got), m(x).detach())

    def test_translation_outside_the_exporter(self) -> None:
        translate = hx.onnx_translations()[onnx_outer]
        self.assertExpectedRaisesInline(
            RuntimeError, lambda: translate(lambda t: t, torch.ones(1)),
            """hopkit: the ONNX translation of test_onnx_outer runs inside torch.onnx.export(..., dynamo=True, custom_translation_table=hopkit.export.onnx_translations()) only, where its subgraph is an ONNX function; got function as the subgraph.""")

    def test_missing_onnxscript(self) -> None:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "onnxscript", None)  # import onnxscript raises ImportError
            self.assertExpectedRaisesInline(
                ImportError, hx.onnx_translations,
                """hopkit: onnx_translations needs onnxscript, which is not installed; install hopkit's onnx extra: pip install "hopkit[onnx]" (onnx, onnxscript, onnxruntime).""")

    def test_table_covers_every_hopkit_hop(self) -> None:
        table = hx.onnx_translations()
        assert onnx_outer in table and onnx_inner in table and hx.wrap_with_autocast in table
        assert all(isinstance(hop, hopkit.BaseHOP) for hop in table)


def test_import_hopkit_export_does_not_import_onnx() -> None:
    code = (
        "import sys, hopkit, hopkit.export\n"
        "bad = [m for m in ('onnx', 'onnxscript', 'onnxruntime', 'onnx_ir') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
