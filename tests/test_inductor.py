"""Tests for hopkit.inductor: pointwise subgraph lowering and HOP fusion.

Two kinds of tests:

* Direct ones run ``PointwiseSubgraphLowering`` / ``lower_pointwise_subgraph``
  inside a real ``GraphLowering`` (built by ``lowering_context``) without
  generating code: fast, and they pin every error message.
* Compiled ones run ``torch.compile(backend="inductor")`` on programs with a
  ``hopkit.BaseHOP`` and count the generated kernels with
  ``run_and_get_code``; shapes stay tiny, since each compile costs seconds.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import expecttest
import pytest
import sympy
import torch
from torch._inductor import ir
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.graph import GraphLowering
from torch._inductor.lowering import lowerings
from torch._inductor.ops_handler import DefaultHandler
from torch._inductor.utils import run_and_get_code
from torch._inductor import virtualized
from torch._inductor.virtualized import V
from torch.fx.experimental.proxy_tensor import make_fx

import hopkit
from hopkit.inductor import (
    InputDescriptor,
    PointwiseSubgraphLowering,
    SubgraphLoweringException,
    lower_hop_pointwise,
    lower_pointwise_subgraph,
)
from hopkit.inductor import fusion

aten = torch.ops.aten


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def lowering_context(
    *examples: torch.Tensor, tracing_mode: str = "fake"
) -> Iterator[tuple[GraphLowering, list[Any], list[torch.Tensor]]]:
    """A real GraphLowering, mid-lowering: yields (graph, the inputs as
    TensorBoxes, the fake example inputs, with the graph's symbols)."""
    gm = make_fx(lambda *xs: [x.clone() for x in xs], tracing_mode=tracing_mode)(
        *examples
    )
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    fakes = [p.meta["val"] for p in placeholders]
    fake_mode = torch._guards.detect_fake_mode(fakes)
    assert fake_mode is not None
    graph = GraphLowering(gm, example_inputs=fakes, shape_env=fake_mode.shape_env)
    with V.set_graph_handler(graph), V.set_fake_mode(fake_mode):
        graph.run(*fakes)
        boxes = [graph.graph_inputs[p.name] for p in placeholders]
        yield graph, boxes, fakes


def trace(fn: Callable[..., Any], *examples: Any) -> torch.fx.GraphModule:
    """An ATen graph of ``fn`` after Inductor's decompositions, as a HOP body
    reaches Inductor. Fake examples keep their (symbolic) shapes."""
    fake_mode = torch._guards.detect_fake_mode(list(examples))
    ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    with ctx:
        return make_fx(
            fn,
            tracing_mode="real" if fake_mode is not None else "fake",
            decomposition_table=select_decomp_table(),
        )(*examples)


def unrealized(box: Any) -> bool:
    data = box.data
    while isinstance(data, (ir.BaseView, ir.MutableBox)):
        data = data.data
    return isinstance(data, ir.Pointwise)


class EvalHandler(DefaultHandler):
    """An ops handler computing on 0-d tensors, to run scalar functions."""

    FNS: dict[str, Callable[..., Any]] = {
        "add": torch.add,
        "sub": torch.sub,
        "mul": torch.mul,
        "relu": torch.relu,
        "sigmoid": torch.sigmoid,
        "exp": torch.exp,
        "gt": torch.gt,
        "lt": torch.lt,
        "where": torch.where,
        "logical_not": torch.logical_not,
        "maximum": torch.maximum,
        "constant": lambda v, dtype: torch.tensor(v, dtype=dtype),
        "to_dtype": lambda x, dtype, src_dtype=None, use_compute_types=True: x.to(
            dtype
        ),
    }

    def _default(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.FNS[name](*args, **kwargs)

    def masked(self, mask: Any, body: Callable[[], Any], other: Any) -> Any:
        return body() if bool(mask) else torch.tensor(other)


class CountingHandler(DefaultHandler):
    """An ops handler that counts the ops an inner function evaluates."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def _default(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.counts[name] += 1
        return name


def evaluated_ops(box: Any) -> collections.Counter[str]:
    """The ops one evaluation of ``box``'s loader runs, with repeats: a value
    read twice is computed twice unless it was realized."""
    handler = CountingHandler()
    index = [sympy.Symbol(f"i{d}", integer=True) for d in range(len(box.get_size()))]
    with V.set_ops_handler(handler), mock.patch.object(ir.FlexibleLayout, "allow_indexing", True):
        box.make_loader()(index)
    return handler.counts


def kernels(code: str) -> list[str]:
    """Names of the generated kernels (cpp on CPU, triton on CUDA)."""
    return re.findall(r"^(cpp_fused_\w+|triton_\w+) = async_compile", code, re.M)


def kernel_sources(code: str) -> list[str]:
    """Each generated kernel's definition, name and source included."""
    pattern = r"^(?:cpp_fused_|triton_)\w+ = async_compile\.\w+\(.*?^'''\)"
    return re.findall(pattern, code, re.M | re.S)


def compile_and_code(fn: Callable[..., Any], *args: Any, dynamic: bool = False) -> tuple[Any, str]:
    out, codes = run_and_get_code(
        torch.compile(fn, backend="inductor", fullgraph=True, dynamic=dynamic), *args
    )
    return out, "\n".join(codes)


@contextlib.contextmanager
def spy_fusion() -> Iterator[list[bool]]:
    """Records, per call of lower_hop_pointwise, whether it fused."""
    fused: list[bool] = []
    real = fusion.lower_hop_pointwise

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        fused.append(out is not None)
        return out

    with mock.patch.object(fusion, "lower_hop_pointwise", spy):
        yield fused


@contextlib.contextmanager
def scoped_op(name: str, schema: str, impl: Callable[..., Any]) -> Iterator[Any]:
    """A test-only custom op hopkit_test_inductor::<name>, destroyed after."""
    lib = torch.library.Library("hopkit_test_inductor", "FRAGMENT")
    try:
        lib.define(schema)
        lib.impl(name, impl, "CompositeExplicitAutograd")
        yield getattr(torch.ops.hopkit_test_inductor, name).default
    finally:
        lib._destroy()


# Toy HOPs. Each class is a hopkit.BaseHOP; the op names are unique to this file.


class PointwiseHOP(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_test_inductor_auto")


class FusedHOP(hopkit.BaseHOP):
    inductor_mode = "fuse"

    def __init__(self) -> None:
        super().__init__("hopkit_test_inductor_fuse")


pointwise_hop = PointwiseHOP()
fused_hop = FusedHOP()


# ---------------------------------------------------------------------------
# PointwiseSubgraphLowering, used directly
# ---------------------------------------------------------------------------


class TestPointwiseSubgraphLowering(expecttest.TestCase):
    def test_buffer_free_ops_are_admitted(self) -> None:
        # full, where, constant indexing and views lower without a buffer,
        # though none of them is tagged pointwise.
        x, y = torch.randn(4, 8), torch.randn(8)

        def body(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
            filled = torch.full((4, 8), 2.0)
            return (
                torch.where(a > 0, a * b, filled),
                a[1:3, ::2].t(),
                a[0] + b,
            )

        with lowering_context(x, y) as (graph, (a, b), fakes):
            sub = trace(body, *fakes)
            before = len(graph.buffers)
            lowering = PointwiseSubgraphLowering(sub, graph)
            lowering.run(a, b)
            outs = lowering.graph_outputs
            assert outs is not None
            self.assertEqual(len(graph.buffers), before)
            self.assertEqual([list(o.get_size()) for o in outs], [[4, 8], [4, 2], [8]])
            self.assertTrue(all(unrealized(o) or isinstance(o.data, ir.BaseView) for o in outs))

    def test_unrealized_operands_stay_inlined(self) -> None:
        x = torch.randn(4, 8)
        with lowering_context(x) as (graph, (a,), fakes):
            operand = lowerings[aten.sin.default](a)
            sub = trace(lambda t: (t * 2,), *fakes)
            lowering = PointwiseSubgraphLowering(sub, graph)
            lowering.run(operand)
            assert lowering.graph_outputs is not None
            self.assertTrue(unrealized(operand))
            self.assertIn("ops.sin", str(lowering.graph_outputs[0]))

    def test_buffer_error_names_the_op_and_restores_operands(self) -> None:
        x, w = torch.randn(4, 8), torch.randn(8, 8)
        with lowering_context(x, w) as (graph, (a, b), fakes):
            operand = lowerings[aten.sin.default](a)  # an unrealized Pointwise
            sub = trace(lambda t, m: (t @ m + 1,), *fakes)
            before = len(graph.buffers), len(graph.operations)
            with self.assertRaises(SubgraphLoweringException) as cm:
                PointwiseSubgraphLowering(sub, graph).run(operand, b)
            self.assertExpectedInline(
                str(cm.exception),
                """hopkit: cannot lower aten.mm.default (node 'mm') inside a pointwise subgraph: its lowering creates a buffer (a reduction, an extern or fallback kernel, or an input that must be realized first). Move the op out of the subgraph, or lower the subgraph op by op.""",
            )
            e = cm.exception
            self.assertEqual((e.reason, e.op, e.node), ("buffer", aten.mm.default, "mm"))
            self.assertIsInstance(e, torch._inductor.exc.SubgraphLoweringException)
            # mm realized its input before failing: the operand is put back.
            self.assertTrue(unrealized(operand))
            self.assertEqual((len(graph.buffers), len(graph.operations)), before)

    def test_reduction_creates_a_buffer(self) -> None:
        x = torch.randn(4, 8)
        with lowering_context(x) as (graph, (a,), fakes):
            sub = trace(lambda t: (t.sum(-1).exp(),), *fakes)
            with self.assertRaises(SubgraphLoweringException) as cm:
                PointwiseSubgraphLowering(sub, graph).run(a)
            self.assertEqual(cm.exception.reason, "buffer")
            self.assertEqual(cm.exception.op, aten.sum.dim_IntList)

    def test_mutation_error_and_allowed_mutations(self) -> None:
        x = torch.randn(4, 8)

        def body(t: torch.Tensor) -> tuple[torch.Tensor]:
            t.add_(1)
            return (t * 2,)

        with lowering_context(x) as (graph, (a,), fakes):
            sub = make_fx(body)(fakes[0].clone())
            before = len(graph.buffers)
            with self.assertRaises(SubgraphLoweringException) as cm:
                PointwiseSubgraphLowering(sub, graph).run(a)
            self.assertExpectedInline(
                str(cm.exception),
                """hopkit: cannot lower aten.add_.Tensor (node 'add_') inside a pointwise subgraph: it mutates buffer 'arg0_1', and only ops in allowed_mutations may. Make the subgraph functional, or pass the op in allowed_mutations if the mutation is intended.""",
            )
            self.assertEqual(cm.exception.reason, "mutation")
            self.assertEqual(len(graph.buffers), before)

            lowering = PointwiseSubgraphLowering(
                sub, graph, allowed_mutations={aten.add_.Tensor}
            )
            lowering.run(a)
            self.assertEqual(lowering.mutated_buffers, {"arg0_1"})
            self.assertEqual(len(lowering.buffers), 1)
            self.assertEqual(len(graph.buffers), before + 1)

    def test_missing_lowering(self) -> None:
        x = torch.randn(4)
        with scoped_op("twice", "twice(Tensor x) -> Tensor", lambda t: t * 2) as twice:
            with lowering_context(x) as (graph, (a,), fakes):
                sub = make_fx(lambda t: (twice(t) + 1,))(fakes[0])
                with self.assertRaises(SubgraphLoweringException) as cm:
                    PointwiseSubgraphLowering(sub, graph).run(a)
                self.assertExpectedInline(
                    str(cm.exception),
                    """hopkit: cannot lower hopkit_test_inductor.twice.default (node 'twice') inside a pointwise subgraph: Inductor has no lowering for it, and an eager fallback kernel would create a buffer. Pass one in additional_lowerings={op: fn}, or lower the subgraph op by op.""",
                )
                self.assertEqual(cm.exception.reason, "missing_lowering")

                # additional_lowerings fills the gap ...
                def lower_twice(t: Any) -> Any:
                    return lowerings[aten.mul.Tensor](t, 2)

                lowering = PointwiseSubgraphLowering(
                    sub, graph, additional_lowerings={twice: lower_twice}
                )
                lowering.run(a)
                assert lowering.graph_outputs is not None
                self.assertTrue(unrealized(lowering.graph_outputs[0]))

    def test_additional_lowerings_take_precedence(self) -> None:
        x = torch.randn(4)
        with lowering_context(x) as (graph, (a,), fakes):
            sub = trace(lambda t: (torch.relu(t),), *fakes)
            lowering = PointwiseSubgraphLowering(
                sub, graph, additional_lowerings={aten.relu.default: lowerings[aten.exp.default]}
            )
            lowering.run(a)
            assert lowering.graph_outputs is not None
            text = str(lowering.graph_outputs[0])
            self.assertIn("ops.exp", text)
            self.assertNotIn("ops.relu", text)

    def test_error_inside_a_lowering_is_wrapped(self) -> None:
        x = torch.randn(4)

        def broken(t: Any) -> Any:
            raise AssertionError("deep inside")

        with lowering_context(x) as (graph, (a,), fakes):
            sub = trace(lambda t: (torch.relu(t),), *fakes)
            with self.assertRaises(SubgraphLoweringException) as cm:
                PointwiseSubgraphLowering(
                    sub, graph, additional_lowerings={aten.relu.default: broken}
                ).run(a)
            self.assertExpectedInline(
                str(cm.exception),
                """hopkit: cannot lower aten.relu.default (node 'relu') inside a pointwise subgraph: its lowering raised AssertionError: deep inside. Lower the subgraph op by op to see the error in context.""",
            )
            self.assertIsInstance(cm.exception.__cause__, AssertionError)

    def test_unsupported_node_and_arity(self) -> None:
        x = torch.randn(4)
        graph_ = torch.fx.Graph()
        t = graph_.placeholder("t")
        graph_.output((graph_.call_module("inner", (t,)),))
        sub = torch.fx.GraphModule({"inner": torch.nn.ReLU()}, graph_)
        with lowering_context(x) as (graph, (a,), _):
            with self.assertRaises(SubgraphLoweringException) as cm:
                PointwiseSubgraphLowering(sub, graph).run(a)
            self.assertExpectedInline(
                str(cm.exception),
                """hopkit: cannot lower node 'inner' inside a pointwise subgraph: it is a call_module of 'inner', and only placeholder, get_attr, call_function and output nodes can be lowered. Trace the subgraph to ATen ops first (make_fx or torch.compile do).""",
            )
            with self.assertRaises(SubgraphLoweringException) as cm:
                PointwiseSubgraphLowering(sub, graph).run(a, a)
            self.assertExpectedInline(
                str(cm.exception),
                """hopkit: the subgraph takes 1 inputs (t), but 2 were given to PointwiseSubgraphLowering.run.""",
            )

    def test_bad_arguments_are_refused_at_the_entry_point(self) -> None:
        x = torch.randn(4)
        with lowering_context(x) as (graph, (a,), fakes):
            sub = trace(lambda t: (t * 2,), *fakes)
            before = len(graph.buffers), len(graph.operations)
            self.assertExpectedRaisesInline(
                TypeError,
                lambda: PointwiseSubgraphLowering(sub, None),  # type: ignore[arg-type]
                """hopkit: PointwiseSubgraphLowering needs root_graph_lowering to be the GraphLowering being lowered, but got None; pass V.graph from inside an Inductor lowering.""",
            )
            self.assertExpectedRaisesInline(
                TypeError,
                lambda: PointwiseSubgraphLowering(sub, graph, allowed_mutations=5),
                """hopkit: PointwiseSubgraphLowering needs allowed_mutations to be None or a set of ops, but got an int; pass e.g. allowed_mutations={torch.ops.aten.add_.Tensor}.""",
            )
            self.assertExpectedRaisesInline(
                TypeError,
                lambda: PointwiseSubgraphLowering(sub, graph, allowed_mutations=["add_"]),
                """hopkit: PointwiseSubgraphLowering needs allowed_mutations to hold ops (OpOverloads or callables), but element 0 is a str; pass the ops whose mutations are intended, e.g. torch.ops.aten.add_.Tensor.""",
            )
            self.assertExpectedRaisesInline(
                TypeError,
                lambda: PointwiseSubgraphLowering(
                    sub, graph, additional_lowerings=[1]  # type: ignore[arg-type]
                ),
                """hopkit: PointwiseSubgraphLowering needs additional_lowerings to be None or a dict mapping ops to lowering functions, but got a list; pass e.g. additional_lowerings={torch.ops.aten.relu.default: my_lowering}.""",
            )
            self.assertExpectedRaisesInline(
                TypeError,
                lambda: PointwiseSubgraphLowering(
                    sub, graph, additional_lowerings={aten.relu.default: 1}  # type: ignore[dict-item]
                ),
                """hopkit: PointwiseSubgraphLowering needs additional_lowerings to map each op to a lowering function, but additional_lowerings[aten.relu.default] is an int; pass a callable taking the op's lowered arguments.""",
            )
            self.assertExpectedRaisesInline(
                TypeError,
                lambda: PointwiseSubgraphLowering(lambda t: (t * 2,), graph),  # type: ignore[arg-type]
                """hopkit: PointwiseSubgraphLowering needs gm to be a torch.fx.GraphModule, but got a function; trace the function first (make_fx), or pass ir.Subgraph.graph_module for an Inductor subgraph.""",
            )
            self.assertExpectedRaisesInline(
                TypeError,
                lambda: PointwiseSubgraphLowering(
                    ir.Subgraph(name="sub", graph_module=sub), graph  # type: ignore[arg-type]
                ),
                """hopkit: PointwiseSubgraphLowering needs gm to be a torch.fx.GraphModule, but got a Subgraph; pass its graph_module.""",
            )
            self.assertExpectedRaisesInline(
                TypeError,
                lambda: PointwiseSubgraphLowering(sub, graph).run(x),
                """hopkit: PointwiseSubgraphLowering.run takes the subgraph's inputs as Inductor values (TensorBox, int, sympy.Expr), but input 0 (placeholder 't_1') is a torch.Tensor; pass the TensorBoxes the lowering received (V.graph.graph_inputs[name] for a graph input), not example tensors.""",
            )
            self.assertEqual((len(graph.buffers), len(graph.operations)), before)

    def test_packets_stand_for_their_overloads(self) -> None:
        x = torch.randn(4)
        with lowering_context(x) as (graph, (a,), fakes):
            sub = trace(lambda t: (torch.relu(t) * 2,), *fakes)
            lowering = PointwiseSubgraphLowering(
                sub,
                graph,
                allowed_mutations={aten.add_},
                additional_lowerings={
                    aten.relu: lowerings[aten.exp.default],
                    aten.mul: lowerings[aten.maximum.default],
                    aten.mul.Tensor: lowerings[aten.minimum.default],  # wins over its packet
                },
            )
            assert lowering.allowed_mutations is not None
            self.assertIn(aten.add_.Tensor, lowering.allowed_mutations)
            lowering.run(a)
            assert lowering.graph_outputs is not None
            text = str(lowering.graph_outputs[0])
            self.assertIn("ops.exp", text)
            self.assertIn("ops.minimum", text)
            self.assertNotIn("ops.relu", text)
            self.assertNotIn("ops.maximum", text)

    def test_chain_of_hops_computes_each_body_once(self) -> None:
        # NOTE [Pointwise HOP bodies realize like the inlined body]: the body
        # reads t twice, so without Inductor's realize-on-reuse each fused
        # call computed the previous one twice: 2**12 sigmoids for 12 calls.
        # Inlined, Inductor realizes each reused value (sigmoid is a heavy op
        # on CPU in torch 2.11-2.15): one sigmoid per evaluation.
        calls = 12
        x, w = torch.randn(8), torch.randn(8)
        with lowering_context(x, w) as (graph, (a, b), fakes):
            body = trace(lambda t, u: ((t * u).sigmoid() + t,), *fakes)
            before = len(graph.buffers)
            out = a
            for _ in range(calls):
                (out,) = lower_hop_pointwise(None, body, [out, b])
            self.assertTrue(unrealized(out))
            self.assertEqual(evaluated_ops(out)["sigmoid"], 1)
            # Each call's input but the graph's own was realized, as inlined.
            self.assertEqual(len(graph.buffers) - before, calls - 1)

    def test_reused_values_inside_one_body_are_realized(self) -> None:
        # The same chain inside a single body: its reused values are realized
        # in the root graph as GraphLowering.run_node would, and the body
        # still fuses (its output is a fresh, unrealized Pointwise).
        steps = 12
        x, w = torch.randn(8), torch.randn(8)

        def body(t: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor]:
            for _ in range(steps):
                t = (t * u).sigmoid() + t
            return (t,)

        with lowering_context(x, w) as (graph, (a, b), fakes):
            sub = trace(body, *fakes)
            before = len(graph.buffers)
            (out,) = lower_hop_pointwise(fused_hop, sub, [a, b], require=True)
            self.assertTrue(unrealized(out))
            self.assertEqual(evaluated_ops(out)["sigmoid"], 1)
            self.assertEqual(len(graph.buffers) - before, steps - 1)

    def test_hop_outputs_are_fresh_pointwise_nodes(self) -> None:
        # An output that is an operand, or a view of one, must not alias it.
        x = torch.randn(4, 8)
        with lowering_context(x) as (graph, (a,), fakes):
            sub = trace(lambda t: (t, t.t(), t[:, :1].expand(4, 8)), *fakes)
            before = len(graph.buffers)
            out = lower_hop_pointwise(None, sub, [a])
            self.assertIsInstance(out, tuple)
            self.assertTrue(all(isinstance(o.data.data, ir.Pointwise) for o in out))
            self.assertEqual([list(o.get_size()) for o in out], [[4, 8], [8, 4], [4, 8]])
            self.assertEqual(len(graph.buffers), before)

    def test_int_bool_and_dynamic_sizes(self) -> None:
        # Symbolic sizes: the body reads them (sym_size) from its own nodes.
        x = torch.randint(-5, 5, (4, 6), dtype=torch.int32)
        with lowering_context(x, tracing_mode="symbolic") as (graph, (a,), fakes):

            def body(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
                ones = t.new_ones(t.shape[0], t.shape[1])
                return (t * 3 + ones, t > 0)

            sub = trace(body, *fakes)
            self.assertTrue(any(n.target is aten.sym_size.int for n in sub.graph.nodes))
            out = lower_hop_pointwise(None, sub, [a])
            self.assertEqual([o.get_dtype() for o in out], [torch.int32, torch.bool])
            self.assertEqual(out[0].get_size(), [s.node.expr for s in fakes[0].shape])


# ---------------------------------------------------------------------------
# lower_pointwise_subgraph
# ---------------------------------------------------------------------------


class TestLowerPointwiseSubgraph(expecttest.TestCase):
    def test_cse_and_values(self) -> None:
        x, y = torch.tensor(1.5), torch.tensor(-1.0)
        with lowering_context(x, y) as (graph, _, fakes):
            sub = trace(lambda a, b: ((a + b) * (a + b), torch.relu(a + b), a > b), *fakes)
            desc = InputDescriptor(torch.float32, torch.device("cpu"))
            fn = lower_pointwise_subgraph(ir.Subgraph(name="sub", graph_module=sub), [desc, desc])
            self.assertExpectedInline(
                fn.code,
                """\
def inner_fn(input0, input1):
    tmp2 = ops.add(input0, input1)
    tmp3 = ops.mul(tmp2, tmp2)
    tmp4 = ops.relu(tmp2)
    tmp5 = ops.gt(input0, input1)
    return (tmp3, tmp4, tmp5)""",
            )
            a, b = torch.tensor(0.5), torch.tensor(-2.0)
            with V.set_ops_handler(EvalHandler()):
                got = fn(a, b)
            self.assertEqual(got, ((a + b) * (a + b), torch.relu(a + b), a > b))

    def test_int_inputs_are_fixed_and_opsvalues_come_back_wrapped(self) -> None:
        x = torch.tensor(2, dtype=torch.int64)
        with lowering_context(x) as (graph, _, fakes):
            sub = trace(lambda a, k: (a * k,), fakes[0], 3)
            desc = InputDescriptor(torch.int64, "cpu")  # a str device is accepted
            fn = lower_pointwise_subgraph(sub, [desc, 3])
            with V.set_ops_handler(EvalHandler()):
                (raw,) = fn(torch.tensor(5), None)
                (wrapped,) = fn(virtualized.ops.constant(5, torch.int64), None)
            self.assertEqual(raw, torch.tensor(15))
            self.assertEqual(type(wrapped).__name__, "OpsValue")
            with self.assertRaisesRegex(TypeError, "takes 2 inputs, but 1 were given"):
                fn(torch.tensor(5))

    def test_masked_body_is_recorded(self) -> None:
        x = torch.tensor(1.0)
        with scoped_op("pos2", "pos2(Tensor x) -> Tensor", lambda t: torch.where(t > 0, t * 2, 0.0)) as pos2:

            def lower_pos2(t: Any) -> Any:
                load = t.make_loader()

                def inner_fn(index: Sequence[Any]) -> Any:
                    v = load(index)
                    return virtualized.ops.masked(v > virtualized.ops.constant(0.0, torch.float32), lambda: load(index) * virtualized.ops.constant(2.0, torch.float32), 0.0)

                return ir.Pointwise.create(
                    device=t.get_device(), dtype=t.get_dtype(), inner_fn=inner_fn, ranges=t.get_size()
                )

            with lowering_context(x) as (graph, _, fakes):
                sub = make_fx(lambda t: (pos2(t),))(fakes[0])
                desc = InputDescriptor(torch.float32, torch.device("cpu"))
                with mock.patch.dict(lowerings, {pos2: lower_pos2}):
                    fn = lower_pointwise_subgraph(sub, [desc])
                self.assertExpectedInline(
                    fn.code,
                    """\
def inner_fn(input0):
    tmp1 = ops.constant(0.0, torch.float32)
    tmp2 = ops.gt(input0, tmp1)
    def masked_body5():
        tmp3 = ops.constant(2.0, torch.float32)
        tmp4 = ops.mul(input0, tmp3)
        return tmp4
    tmp5 = ops.masked(tmp2, masked_body5, 0.0)
    return (tmp5,)""",
                )
                with V.set_ops_handler(EvalHandler()):
                    self.assertEqual(fn(torch.tensor(3.0)), (torch.tensor(6.0),))
                    self.assertEqual(fn(torch.tensor(-3.0)), (torch.tensor(0.0),))

    def test_outputs_must_be_scalars(self) -> None:
        x = torch.tensor(1.0)
        with lowering_context(x) as (graph, _, fakes):
            sub = trace(lambda a: (a + torch.ones(3),), fakes[0])
            with self.assertRaises(SubgraphLoweringException) as cm:
                lower_pointwise_subgraph(sub, [InputDescriptor(torch.float32, torch.device("cpu"))])
            self.assertExpectedInline(
                str(cm.exception),
                """hopkit: lower_pointwise_subgraph needs scalar (0-d) outputs, but output 0 (node 'add') has size [3]; use PointwiseSubgraphLowering for subgraphs that build tensors.""",
            )

    def test_bad_inputs(self) -> None:
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: InputDescriptor("float32", torch.device("cpu")),  # type: ignore[arg-type]
            """hopkit: InputDescriptor.dtype must be a torch.dtype, but got 'float32'; pass e.g. torch.float32.""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: InputDescriptor(torch.float32, "no-such-device"),
            """hopkit: InputDescriptor.device must be a torch.device or a device string, but got 'no-such-device'; pass e.g. torch.device("cpu").""",
        )
        sub = make_fx(lambda a, b: (a * b,))(torch.ones(()), torch.ones(()))
        desc = InputDescriptor(torch.float32, torch.device("cpu"))
        with self.assertRaisesRegex(RuntimeError, "must be called while Inductor lowers a graph"):
            lower_pointwise_subgraph(sub, [desc, desc])
        # Bad arguments are refused before V.graph is even looked at.
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: lower_pointwise_subgraph(lambda a, b: (a * b,), [desc, desc]),  # type: ignore[arg-type]
            """hopkit: lower_pointwise_subgraph needs subgraph to be an ir.Subgraph or a torch.fx.GraphModule, but got a function; trace the function first (make_fx), or pass the ir.Subgraph Inductor gave the lowering.""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: lower_pointwise_subgraph(sub, desc),  # type: ignore[arg-type]
            """hopkit: lower_pointwise_subgraph needs inputs to be a list with one entry per subgraph input (a_1, b_1), but got an InputDescriptor; pass e.g. [InputDescriptor(torch.float32, torch.device('cpu'))].""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: lower_pointwise_subgraph(sub, [desc, torch.ones(())]),  # type: ignore[list-item]
            """hopkit: lower_pointwise_subgraph needs inputs[1] to be an InputDescriptor, an int or a sympy expression, but it is a torch.Tensor; describe it as InputDescriptor(torch.float32, torch.device('cpu')).""",
        )
        self.assertExpectedRaisesInline(
            TypeError,
            lambda: lower_pointwise_subgraph(sub, [desc, "b"]),  # type: ignore[list-item]
            """hopkit: lower_pointwise_subgraph needs inputs[1] to be an InputDescriptor, an int or a sympy expression, but it is a str; describe a tensor input with InputDescriptor(dtype, device).""",
        )
        self.assertExpectedRaisesInline(
            SubgraphLoweringException,
            lambda: lower_pointwise_subgraph(sub, [desc]),
            """hopkit: lower_pointwise_subgraph needs one input per subgraph input (2: a_1, b_1), but got 1; pass one InputDescriptor, int or sympy expression for each.""",
        )


# ---------------------------------------------------------------------------
# Compiled: hopkit HOPs with pointwise bodies fuse
# ---------------------------------------------------------------------------


def _body(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (torch.sigmoid(x) * 2 + x,)


def test_relu_of_hop_plus_one_is_one_kernel(device: str) -> None:
    x = torch.randn(8, 16, device=device)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(pointwise_hop(_body, x)[0]) + 1

    def inline(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(_body(x)[0]) + 1

    with spy_fusion() as fused:
        out, code = compile_and_code(f, x)
    assert fused == [True]
    assert len(kernels(code)) == 1, kernels(code)
    torch.testing.assert_close(out, inline(x))
    # The very kernel Inductor writes for the body written inline.
    torch._dynamo.reset()
    _, inline_code = compile_and_code(inline, x)
    assert kernel_sources(code) == kernel_sources(inline_code)


def test_sum_of_hop_is_one_kernel(device: str) -> None:
    x = torch.randn(8, 16, device=device)

    def f(x: torch.Tensor) -> torch.Tensor:
        return pointwise_hop(_body, x)[0].sum()

    out, code = compile_and_code(f, x)
    assert len(kernels(code)) == 1, kernels(code)
    torch.testing.assert_close(out, _body(x)[0].sum())


def test_multiple_outputs_int_bool_broadcast_dynamic(device: str) -> None:
    x, y = torch.randn(6, 5, device=device), torch.randn(5, device=device)

    def body(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (torch.sigmoid(a) * b, a > b, a.to(torch.int32) + 3)

    def f(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p, q, r = fused_hop(body, a, b)
        return torch.relu(p) + 1, q.logical_not(), r * 2

    out, code = compile_and_code(f, x, y, dynamic=True)
    assert len(kernels(code)) == 1, kernels(code)
    p, q, r = body(x, y)
    expected = (torch.relu(p) + 1, q.logical_not(), r * 2)
    for got, want in zip(out, expected):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)
    # Another size reuses the dynamic graph.
    x2, y2 = torch.randn(3, 7, device=device), torch.randn(7, device=device)
    torch.testing.assert_close(
        torch.compile(f, backend="inductor", fullgraph=True, dynamic=True)(x2, y2)[0],
        torch.relu(body(x2, y2)[0]) + 1,
    )


def test_full_where_and_constant_indexing_fuse(device: str) -> None:
    x = torch.randn(4, 8, device=device)

    def body(a: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.where(a > 0, a, torch.full_like(a, 0.5)) + a[0],)

    def f(a: torch.Tensor) -> torch.Tensor:
        return fused_hop(body, a)[0] * 3

    out, code = compile_and_code(f, x)
    assert len(kernels(code)) == 1, kernels(code)
    torch.testing.assert_close(out, body(x)[0] * 3)


def _chain_body(t: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor]:
    return ((t * u).tanh() + t,)


def test_chain_of_hops_compiles_like_the_inline_chain(device: str) -> None:
    # NOTE [Pointwise HOP bodies realize like the inlined body]
    x, w = torch.randn(8, device=device), torch.randn(8, device=device)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        for _ in range(4):
            x = pointwise_hop(_chain_body, x, w)[0]
        return x

    def inline(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        for _ in range(4):
            x = _chain_body(x, w)[0]
        return x

    with spy_fusion() as fused:
        out, code = compile_and_code(f, x, w)
    assert fused == [True] * 4
    torch.testing.assert_close(out, inline(x, w))
    torch._dynamo.reset()
    _, inline_code = compile_and_code(inline, x, w)
    assert kernel_sources(code) == kernel_sources(inline_code)


def _count_output_evaluations(calls: int) -> int:
    """How often Inductor evaluates the inner functions of the fused outputs
    while compiling a chain of ``calls`` HOP calls on CPU."""
    evaluations = 0
    real = fusion._fresh_output

    def counting(*args: Any) -> Any:
        box = real(*args)
        pointwise = box.data.data
        inner = pointwise.inner_fn

        def inner_fn(index: Any) -> Any:
            nonlocal evaluations
            evaluations += 1
            return inner(index)

        object.__setattr__(pointwise, "inner_fn", inner_fn)
        return box

    def body(t: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor]:
        return ((t * u).sigmoid() + t,)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        for _ in range(calls):
            x = pointwise_hop(body, x, w)[0]
        return x

    torch._dynamo.reset()
    # A cached graph would skip the lowering this counts.
    with mock.patch.object(fusion, "_fresh_output", counting), torch._inductor.config.patch(
        fx_graph_cache=False
    ):
        torch.compile(f, backend="inductor", fullgraph=True)(torch.randn(8), torch.randn(8))
    return evaluations


def test_chain_of_hops_evaluates_bodies_linearly() -> None:
    # Compile time doubled with each call of the chain (each fused output
    # evaluated the previous one twice); it must grow as the chain does.
    # CPU only: there Inductor realizes a reused sigmoid at once (a heavy op
    # in torch 2.11-2.15; tanh is one only from 2.13), on a GPU only past an
    # op-count threshold; the inline chain does the same.
    short, long = _count_output_evaluations(5), _count_output_evaluations(10)
    assert 0 < short and long <= 2 * short + 5, (short, long)


class TestFusionModes(expecttest.TestCase):
    def test_require_fusion_names_the_op(self) -> None:
        def body(a: torch.Tensor) -> tuple[torch.Tensor]:
            return (a @ a + 1,)

        def f(a: torch.Tensor) -> torch.Tensor:
            return fused_hop(body, a)[0]

        with self.assertRaises(Exception) as cm:
            torch.compile(f, backend="inductor", fullgraph=True)(torch.randn(4, 4))
        message = str(cm.exception)
        self.assertIn(
            "hopkit: torch.ops.higher_order.hopkit_test_inductor_fuse requires its "
            "body to fuse into the surrounding kernel, but aten.mm.default (node "
            "'mm') in it cannot be fused: its lowering creates a buffer",
            message,
        )

    def test_require_fusion_message(self) -> None:
        x = torch.randn(4, 16)  # small reductions unroll into pointwise code
        with lowering_context(x) as (graph, (a,), fakes):
            sub = trace(lambda t: (t.sum(-1),), *fakes)
            with self.assertRaises(SubgraphLoweringException) as cm:
                lower_hop_pointwise(fused_hop, sub, [a], require=True)
            self.assertExpectedInline(
                str(cm.exception),
                """hopkit: torch.ops.higher_order.hopkit_test_inductor_fuse requires its body to fuse into the surrounding kernel, but aten.sum.dim_IntList (node 'sum_1') in it cannot be fused: its lowering creates a buffer (a reduction, an extern or fallback kernel, or an input that must be realized first). Move that op out of the body, or let the HOP lower its body op by op (BaseHOP.inductor_mode = 'auto').""",
            )

    def test_fallback_inlines_and_logs(self) -> None:
        def body(a: torch.Tensor) -> tuple[torch.Tensor]:
            return (torch.relu(a @ a) + 1,)

        def f(a: torch.Tensor) -> torch.Tensor:
            return pointwise_hop(body, a)[0] * 2

        x = torch.randn(4, 4)
        with spy_fusion() as fused, self.assertLogs("hopkit.inductor", logging.INFO) as logs:
            out, code = compile_and_code(f, x)
        self.assertEqual(fused, [False])
        self.assertIn("aten.mm.default (node 'mm') in it cannot be fused", logs.output[0])
        torch.testing.assert_close(out, body(x)[0] * 2)


# ---------------------------------------------------------------------------
# Compiled: lower_pointwise_subgraph inside a reduction's inner function
# ---------------------------------------------------------------------------


def _scalar_body(a: torch.Tensor) -> tuple[torch.Tensor]:
    return (torch.sigmoid(a) * a + 1,)


def _lower_body_sum(body: torch.fx.GraphModule, x: Any) -> Any:
    """A lowering of body_sum(x) == body(x)[0].sum(-1): the body, recorded as
    a scalar function, runs inside the reduction's inner function."""
    fn = lower_pointwise_subgraph(body, [InputDescriptor(x.get_dtype(), x.get_device())])
    load = x.make_loader()
    *batch, last = x.get_size()

    def inner_fn(index: Sequence[Any], rindex: Sequence[Any]) -> Any:
        return fn(load([*index, *rindex]))[0]

    out = ir.Reduction.create(
        device=x.get_device(),
        dst_dtype=x.get_dtype(),
        src_dtype=x.get_dtype(),
        inner_fn=inner_fn,
        ranges=batch,
        reduction_ranges=[last],
        reduction_type="sum",
    )
    out.realize()
    return out


def test_scalar_function_inside_a_reduction(device: str) -> None:
    x = torch.randn(4, 16, device=device)

    def eager(t: torch.Tensor) -> torch.Tensor:
        return _scalar_body(t)[0].sum(-1)

    with scoped_op("body_sum", "body_sum(Tensor x) -> Tensor", eager) as body_sum:

        def f(a: torch.Tensor) -> torch.Tensor:
            return body_sum(torch.relu(a))

        body = trace(_scalar_body, torch.tensor(0.0))
        lowering = functools.partial(_lower_body_sum, body)
        with mock.patch.dict(lowerings, {body_sum: lowering}):
            out, code = compile_and_code(f, x)
    assert len(kernels(code)) == 1, kernels(code)
    torch.testing.assert_close(out, eager(torch.relu(x)))


def test_importing_hopkit_does_not_import_inductor_lowering() -> None:
    import subprocess
    import sys

    code = (
        "import sys, hopkit; "
        "print('torch._inductor.lowering' in sys.modules, 'hopkit.inductor' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out

