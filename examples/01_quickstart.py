"""hopkit quickstart: define a HOP and watch it stay one node in every graph.

    python examples/01_quickstart.py

``InvokeQuant`` is an ``invoke_quant``-style higher-order operator: it calls a
subgraph on its operands, ``invoke_quant(subgraph, *operands, scheme=...)``
returns ``subgraph(*operands)``, and ``scheme`` is configuration recorded on the
graph node (never passed to the subgraph). This script runs it

1. in eager, forward and backward, against calling the function directly;
2. under ``make_fx`` (the subgraph becomes a submodule called from one node);
3. under ``torch.compile`` with ``backend="aot_eager"`` (the Dynamo graph and the
   AOT forward/backward graphs each hold one HOP node) and ``"inductor"``;
4. through ``torch.export.export`` (``ep.module()`` and
   ``ep.run_decompositions()`` keep the node).

Every result is compared with the plain function, so the script fails loudly
if anything breaks. Shapes are tiny; the whole run takes seconds (Inductor's
first compile is most of it).
"""

from __future__ import annotations

import warnings

import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs, EagerAndRecordGraphs
from torch.fx.experimental.proxy_tensor import make_fx

import hopkit


class InvokeQuant(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("quickstart_invoke_quant")


invoke_quant = InvokeQuant()


def g(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
    """The subgraph: what the HOP computes."""
    return (x.sin() * y,)


# Outside torch.compile the subgraph must be a GraphModule or a function that
# promises to read no free variables.
G = hopkit.FunctionWithNoFreeVars(g)


def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A program that calls the HOP between ordinary ops."""
    (q,) = invoke_quant(G, x, y, scheme="nf4")
    return q.relu() + 1


def f_ref(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same program calling the subgraph directly."""
    (q,) = g(x, y)
    return q.relu() + 1


def header(title: str) -> None:
    print(f"\n{'=' * 72}\n{title}\n{'=' * 72}")


def submodule(gm: torch.fx.GraphModule, name: str) -> torch.fx.GraphModule:
    sub = gm.get_submodule(name)
    assert isinstance(sub, torch.fx.GraphModule)
    return sub


def count_hop_nodes(gm: torch.fx.GraphModule) -> int:
    return len(gm.graph.find_nodes(op="call_function", target=invoke_quant))


def leaves(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in ts]


def forward_backward(fn, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    x, y = leaves(x, y)
    out = fn(x, y)
    out.sum().backward()
    return out.detach(), x.grad, y.grad


def main() -> None:
    # Two warnings torch 2.13 prints by itself, whatever the program: the
    # recording test backend returns an unboxed function, and
    # ep.run_decompositions() pickles a pytree spec. Neither is hopkit's.
    warnings.filterwarnings("ignore", message="Your compiler for AOTAutograd is returning")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    torch.manual_seed(0)
    x, y = torch.randn(4), torch.randn(4)
    print(f"torch {torch.__version__}, hop: torch.ops.higher_order.{invoke_quant._name}")

    # -- 1. eager ----------------------------------------------------------
    header("1. eager: forward and backward equal the plain function")
    got = forward_backward(f, x, y)
    ref = forward_backward(f_ref, x, y)
    for name, a, b in zip(("out", "x.grad", "y.grad"), got, ref):
        torch.testing.assert_close(a, b)
        print(f"{name:<7} hop {a.tolist()}")
        print(f"{'':<7} ref {b.tolist()}")
    with torch.no_grad():
        torch.testing.assert_close(f(x, y), f_ref(x, y))
    print("no_grad: equal")

    # -- 2. make_fx ----------------------------------------------------------
    header("2. make_fx(tracing_mode='fake'): one HOP node, the subgraph a submodule")
    gm = make_fx(f, tracing_mode="fake")(x, y)
    print(gm.code.strip())
    print("--- gm.subgraph_0 ---")
    print(submodule(gm, "subgraph_0").code.strip())
    assert count_hop_nodes(gm) == 1, "make_fx keeps the HOP as one node"
    torch.testing.assert_close(gm(x, y), f_ref(x, y))

    # -- 3a. torch.compile(backend="aot_eager"): the Dynamo graph --------------
    header("3a. torch.compile: the Dynamo graph (one HOP node)")
    torch._dynamo.reset()
    dynamo_graphs = EagerAndRecordGraphs()
    out = torch.compile(f, backend=dynamo_graphs, fullgraph=True)(x, y)
    torch.testing.assert_close(out, f_ref(x, y))
    (dynamo_gm,) = dynamo_graphs.graphs
    print(dynamo_gm.code.strip())
    assert count_hop_nodes(dynamo_gm) == 1, "Dynamo keeps the HOP as one node"

    # -- 3b. aot_eager: the AOT forward and backward graphs --------------------
    header("3b. torch.compile(backend='aot_eager'), training: AOT forward/backward graphs")
    torch._dynamo.reset()
    aot_graphs = AotEagerAndRecordGraphs()
    compiled = torch.compile(f, backend=aot_graphs, fullgraph=True)
    got = forward_backward(compiled, x, y)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    (fw,), (bw,) = aot_graphs.fw_graphs, aot_graphs.bw_graphs
    print("--- forward ---")
    print(fw.code.strip())
    print("--- forward subgraph: the body plus what backward saves ---")
    print(submodule(fw, "subgraph_0").code.strip())
    print("--- backward ---")
    print(bw.code.strip())
    assert count_hop_nodes(fw) == 1 and count_hop_nodes(bw) == 1, "one HOP node each way"
    print("aot_eager forward and gradients: equal to eager")

    # -- 3c. inductor ------------------------------------------------------------
    header("3c. torch.compile(backend='inductor'): no lowering to write")
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    got = forward_backward(compiled, x, y)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    print("inductor forward and gradients: equal to eager")

    # -- 4. torch.export ---------------------------------------------------------
    header("4. torch.export.export: one HOP node, kept by run_decompositions()")

    class Model(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return f(x, y)

    ep = torch.export.export(Model(), (x, y))
    print(ep.graph_module.code.strip())
    decomposed = ep.run_decompositions()
    for program in (ep, decomposed):
        nodes = program.graph.find_nodes(op="call_function", target=invoke_quant)
        assert len(nodes) == 1 and nodes[0].kwargs == {"scheme": "nf4"}, program.graph
    torch.testing.assert_close(ep.module()(x, y), f_ref(x, y))
    torch.testing.assert_close(decomposed.module()(x, y), f_ref(x, y))
    print("ep.module() and ep.run_decompositions().module(): equal to eager; "
          "the node (scheme='nf4') survives decomposition")

    header("all modes agree with the plain function")


if __name__ == "__main__":
    main()
