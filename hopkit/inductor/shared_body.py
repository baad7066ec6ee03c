"""Inductor lowering of a body several HOP calls share: compiled once, called N times.

NOTE [A shared HOP body compiles once in Inductor]
Trace reuse (NOTE [BaseHOP trace reuse] in hopkit/base_hop/_reuse.py) leaves
one forward and one backward body module for N equal HOP calls in the graphs
Inductor receives: every call's node reads the same ``get_attr`` target.
Inlining each call op by op would lower, schedule and generate code for the
same body N times, so Inductor's compile time would still grow with N. When
a body is read by two or more HOP calls of the graph being lowered, hopkit
lowers it once, as a subgraph of its own (a ``SubgraphLowering`` made by
``GraphLowering.make_subgraph``), and each call becomes an
``ir.InvokeSubgraph`` node calling the generated function: the shape torch's
``invoke_subgraph`` (``nested_compile_region``) takes in Inductor, whose IR
and wrapper codegen hopkit uses as they are. ``GraphLowering.get_attr`` hands
every read of one target the same ``ir.Subgraph``, so the lowering done by
the first call serves the others (torch 2.11-2.15 alike).

What a call gives up: fusion across its boundary (a pointwise neighbour
cannot fuse into the body's last kernel), exactly as with
``nested_compile_region``. A pointwise body still fuses (that is tried
first), a body used once is still inlined, and ``inductor_mode = "inline"``
inlines every call. A body is inlined too when the subgraph form would be
unsafe or is unsupported: it mutates or draws random numbers (each call must
keep its own draws, and Inductor's random seeding is done for the outer graph
only), the call is wrapped in an effect token, or it has no tensor operand,
and under Inductor's C++ wrapper (AOTInductor, ``cpp_wrapper``): torch
2.11-2.14 cannot generate the call there ("codegen invoke_subgraph is not
implemented for cpp wrapper"), and 2.15's C++ code for a body called twice
does not compile (its buffers are declared only at the first call).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["lower_shared_body", "shared_body_calls"]


def shared_body_calls(graph: torch.fx.Graph, name: str) -> int:
    """How many call nodes of ``graph`` take the ``get_attr`` of ``name`` as an argument."""
    calls = 0
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == name:
            calls += sum(1 for user in node.users if user.op == "call_function")
    return calls


def _compiles_alone(gm: torch.fx.GraphModule) -> bool:
    """Whether the body may become a subgraph of its own: no mutation, no random op."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return False
        tags = getattr(node.target, "tags", ())
        if torch.Tag.nondeterministic_seeded in tags:
            return False
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            # A nested HOP may hide either; inlining is always correct.
            return False
    return True


def _signature(values: Sequence[Any]) -> list[Any]:
    # Sizes as text: comparing symbolic sizes themselves would add guards.
    return [(str(tuple(v.shape)), str(v.stride()), v.dtype, v.device)
            if isinstance(v, torch.Tensor) else type(v) for v in values]


def lower_shared_body(hop: Any, subgraph: Any, operands: Sequence[Any]) -> list[Any] | None:
    """Lower the current HOP call as a call of its once-compiled body, or None to inline.

    ``subgraph`` is the ``ir.Subgraph`` Inductor made of the body's
    ``get_attr``; ``operands`` are the lowered operands of the call.
    """
    from torch._inductor import ir
    from torch._inductor.lowering import constrain_to_fake_tensor
    from torch._inductor.virtualized import V

    leading: int = hop._num_leading
    node = V.graph.current_node
    if node is None or node.target is not hop or not isinstance(subgraph, ir.Subgraph):
        return None
    if V.graph.cpp_wrapper:
        return None
    if shared_body_calls(V.graph.graph, subgraph.name) < 2:
        return None
    fx_operands = node.args[leading + 1 :]
    if len(fx_operands) != len(operands) or node.kwargs:
        return None
    fakes: list[Any] = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in fx_operands]
    if not any(isinstance(f, torch.Tensor) for f in fakes):
        return None
    if any(isinstance(a, torch.fx.Node) and f is None for a, f in zip(fx_operands, fakes)):
        return None
    if subgraph.graph is None:
        if not _compiles_alone(subgraph.graph_module):
            return None
    elif _signature(subgraph.graph.example_inputs or ()) != _signature(fakes):
        # Compiled for operands laid out otherwise (trace reuse never shares
        # a body so, but a graph built by hand may): this call inlines it.
        return None

    realized = []
    for operand, fake in zip(operands, fakes):
        value = ir.ExternKernel.realize_input(operand)
        if isinstance(fake, torch.Tensor) and not isinstance(value, ir.ShapeAsConstantBuffer):
            # The body was lowered for its operands' strides; an intermediate
            # laid out otherwise is copied into that layout, as torch does.
            value = constrain_to_fake_tensor(value, fake)
        realized.append(value)

    if subgraph.graph is None:
        subgraph.graph = V.graph.make_subgraph(
            gm=subgraph.graph_module, example_inputs=fakes, subgraph_name=subgraph.name
        )
        with V.set_graph_handler(subgraph.graph):
            subgraph.graph.run(*fakes)

    devices = [v.get_device() for v in realized if not isinstance(v, ir.ShapeAsConstantBuffer)]
    device = next(d for d in devices if d is not None)
    call = ir.InvokeSubgraph(subgraph=subgraph, operands=realized,
                             layout=ir.MultiOutputLayout(device=device))
    outputs: list[Any] = []
    for index, out in enumerate(subgraph.graph.graph_outputs):
        if isinstance(out, (ir.ShapeAsConstantBuffer, ir.NoneAsConstantBuffer)):
            outputs.append(out)
            continue
        layout = out.get_layout()
        out_device = out.get_device()
        assert out_device is not None  # a tensor output, as the checks above ensured
        outputs.append(ir.MultiOutput(
            ir.FixedLayout(device=out_device, dtype=out.get_dtype(), size=out.get_size(),
                           stride=out.get_stride(), offset=layout.offset,
                           is_pinned=layout.is_pinned),
            call, [(list, index)], skip_size_stride_alignment_checks=True,
        ))
    call.outputs = outputs
    return [ir.TensorBox.create(out) for out in outputs]
