"""Inductor lowering of every BaseHOP: fuse a pointwise body, compile a shared one once, else inline it.

Registered for each hopkit HOP in torch._inductor.lowering.lowerings (torch
2.11-2.15 look lowerings up there by target; a HOP without one fails with "is
not an OpOverload"), through hopkit._patch, right after Inductor's lowering
module is imported. This module imports no Inductor module at import time (the
registration runs in the middle of Inductor's own import); the fusion itself
is hopkit.inductor.fusion, imported when a HOP is lowered.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hopkit import _compat, _patch

__all__ = ["base_hop_inductor", "inline_subgraph_into_graph_lowering", "register_inductor_lowering"]


_INDUCTOR_LOWERING = "torch._inductor.lowering"


def register_inductor_lowering(hop: Any, rule: Callable[..., Any] | None = None) -> None:
    """Register ``rule`` (default :func:`base_hop_inductor`) as ``hop``'s lowering."""
    lowering_rule = base_hop_inductor if rule is None else rule

    def register(mod: types.ModuleType) -> None:
        previous = mod.lowerings.get(hop)
        mod.register_lowering(hop, type_promotion_kind=None)(functools.partial(lowering_rule, hop))
        # register_lowering wrote the table itself; hand the entry to
        # hopkit._patch so that undoing it restores what was there before.
        registered = mod.lowerings.pop(hop)
        if previous is not None:
            mod.lowerings[hop] = previous
        _patch.set_entry(mod.lowerings, hop, registered,
                         name=f"{_INDUCTOR_LOWERING}.lowerings[{hop.__name__!r}]")

    _patch.when_imported(_INDUCTOR_LOWERING, register,
                         why=f"register the Inductor lowering of {hop.__name__}")
    if _compat.torch_at_least("2.13"):
        _patch.when_imported(_INDUCTOR_FX_UTILS, _teach_fx_utils_hopkit_subgraphs,
                             why="tell Inductor's FakeTensorUpdater about hopkit subgraphs")


_INDUCTOR_FX_UTILS = "torch._inductor.fx_utils"


def _teach_fx_utils_hopkit_subgraphs(mod: types.ModuleType) -> None:
    """Tell Inductor's FakeTensorUpdater which arguments feed a hopkit subgraph.

    torch 2.13+ (through 2.15) list the subgraph HOPs they know in
    `_extract_subgraphs_and_args` and warn ("Please add support for subgraph
    args") for any other. torch 2.11 and 2.12 do not look into subgraphs at
    all, so there is nothing to teach. Can go when torch offers a
    registration for this.
    """
    def make(original: Any) -> Any:
        def extract(node: torch.fx.Node, valid_subgraphs: Any, *args: Any, **kwargs: Any) -> Any:
            target = node.target
            if getattr(target, "__name__", None) == "hopkit_with_effects" and len(args) >= 2:
                target, args = args[1], args[2:]  # the wrapped HOP call, token stripped
            n = getattr(target, "_num_leading", None)
            if n is not None and getattr(target, "_is_hopkit_hop", False):
                subgraph = args[n]
                if isinstance(subgraph, torch.fx.GraphModule):
                    yield subgraph, tuple(args[n + 1 :])
                return
            yield from original(node, valid_subgraphs, *args, **kwargs)

        return extract

    _patch.patch_function(mod.__name__, "_extract_subgraphs_and_args", make,
                          why="tell Inductor's FakeTensorUpdater about hopkit subgraphs")


def inline_subgraph_into_graph_lowering(gm: torch.fx.GraphModule, operands: Sequence[Any]) -> Any:
    """Lower ``gm``'s nodes one by one into the current GraphLowering.

    The subgraph's nodes go through GraphLowering.run_node, as if they had been
    in the outer graph, so Inductor fuses them with their neighbours as usual.
    """
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    graph = V.graph
    placeholders = iter(operands)
    out: Any = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = next(placeholders)
            graph.env[node] = value
            # As GraphLowering.run_node does for a value with several users
            # (NOTE [Pointwise HOP bodies realize like the inlined body] in
            # hopkit/inductor/fusion.py).
            if len(node.users) > 1 and isinstance(value, ir.TensorBox):
                value.mark_reuse(len(node.users))
        elif node.op == "get_attr":
            value = getattr(gm, node.target)
            if isinstance(value, torch.fx.GraphModule):
                graph.env[node] = ir.Subgraph(name=node.target, graph_module=value)
            else:
                graph.env[node] = graph.add_tensor_constant(value)
        elif node.op == "output":
            args, _ = graph.fetch_args_kwargs_from_env(node)
            out = args[0]
        else:
            graph.env[node] = graph.run_node(node)
    return out


def base_hop_inductor(hop: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Lower into the surrounding graph: fuse a pointwise body, compile a body
    several calls share once (NOTE [A shared HOP body compiles once in
    Inductor] in hopkit/inductor/shared_body.py), else inline it."""
    from hopkit.inductor import fusion, shared_body  # import Inductor: only when lowering

    n = hop._num_leading
    subgraph, operands = args[n], args[n + 1 :]
    gm = subgraph.graph_module
    if hop.inductor_mode != "inline":
        lowered = fusion.lower_hop_pointwise(hop, gm, operands, require=hop.inductor_mode == "fuse")
        if lowered is not None:
            return lowered
        if hop.inductor_mode == "auto":
            called = shared_body.lower_shared_body(hop, subgraph, operands)
            if called is not None:
                return called
    return inline_subgraph_into_graph_lowering(gm, operands)
