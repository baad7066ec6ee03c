"""Exported programs with hopkit autocast HOPs, and the way back.

    ep = hopkit.export.export(model, args)            # autocast regions are HOP calls
    gm, sig = inline_autocast_hops_pass(gm, sig)      # HOP calls back to enter/exit pairs

``export`` is ``torch.export.export`` with hopkit's
``replace_autocast_with_hop_pass`` in place of torch's in-tree pass (the
swap is the shim ``hopkit._compat.export_with_autocast_pass``). Everything
else about the export is torch's: the same arguments, the same pre-dispatch
(training) IR, the same verifier.

``inline_autocast_hops_pass`` is the inverse of the pass, for consumers that
cannot run HOPs: every ``wrap_with_autocast`` call becomes
``_enter_autocast(...)``, the body's nodes, ``_exit_autocast(...)`` again,
recursively, in one walk over the nodes. Consumers that want no autocast at
all can instead run ``ep.run_decompositions()``, which traces the casts into
explicit ops.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch.export.graph_signature import ExportGraphSignature

from hopkit import _compat
from hopkit.export._autocast_hop import wrap_with_autocast
from hopkit.export._pass import _ENTER, _EXIT, _get_attr_path, replace_autocast_with_hop_pass

__all__ = ["export", "inline_autocast_hops_pass"]


def export(
    mod: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None = None,
    **export_kwargs: Any,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` whose autocast regions become hopkit HOP calls.

    Takes exactly the arguments of ``torch.export.export`` (``dynamic_shapes``,
    ``strict``, ``preserve_module_call_signature``, ...). Each ``with
    torch.autocast(...)`` block of ``mod`` appears in ``ep.graph_module`` as
    one ``hopkit.export.wrap_with_autocast`` call with the block in a
    submodule, nested blocks as nested calls. ``ep.module()``,
    ``ep.run_decompositions()`` and ``torch.export.save`` / ``load`` work on
    the result (``import hopkit.export`` before loading, so that the HOP is
    registered).

    An exception raised by ``mod`` (inside an autocast block or not)
    propagates unchanged, and torch's own pass is restored afterwards.

    Process-wide note: while this runs, any other ``torch.export.export`` in
    the process also uses hopkit's pass (exports are serialized by a lock).

    ``strict=True``: in torch 2.13 the Dynamo front end records the values of
    an autocast region with their un-autocast dtypes, so ``ep.module()`` fails
    its own dtype asserts ("Tensor dtype mismatch"), with torch's pass exactly
    as with hopkit's. Use the default, non-strict export.
    """
    if not isinstance(mod, torch.nn.Module):
        raise TypeError(
            f"hopkit.export.export: expected a torch.nn.Module, but got "
            f"{type(mod).__name__}; wrap a function in a Module whose forward calls it."
        )
    with _compat.export_with_autocast_pass(replace_autocast_with_hop_pass):
        return torch.export.export(mod, args, kwargs, **export_kwargs)


def _is_autocast_hop(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is wrap_with_autocast


def _needs_inlining(gm: torch.fx.GraphModule) -> bool:
    return any(
        isinstance(m, torch.fx.GraphModule)
        and bool(m.graph.find_nodes(op="call_function", target=wrap_with_autocast))
        for m in gm.modules()
    )


class _Inliner:
    """Copies a graph into ``self.graph``, expanding autocast HOP calls in place."""

    def __init__(self, root: torch.fx.GraphModule) -> None:
        old = root.graph
        self.graph = torch.fx.Graph(tracer_cls=old._tracer_cls, tracer_extras=old._tracer_extras)
        self.graph._codegen = copy.deepcopy(old._codegen)
        self.attrs: dict[str, Any] = {}
        self.memo: dict[int, torch.fx.GraphModule] = {}

    def attr_name(self, target: str, value: Any) -> str:
        """``target`` itself unless it already names a different object."""
        name, k = target, 0
        while name in self.attrs and self.attrs[name] is not value:
            k += 1
            name = f"{target}_{k}"
        self.attrs[name] = value
        return name

    def copy_graph(
        self, gm: torch.fx.GraphModule, inputs: list[Any] | None
    ) -> tuple[dict[torch.fx.Node, Any], Any]:
        """Copy ``gm``'s nodes; its placeholders become ``inputs`` (top level: copied)."""
        env: dict[torch.fx.Node, Any] = {}
        # Results of expanded HOP calls: node -> the body's output values.
        expanded: dict[torch.fx.Node, tuple[Any, ...]] = {}
        placeholders = iter(inputs) if inputs is not None else None
        result: Any = None

        def arg(n: torch.fx.Node) -> Any:
            if n in expanded:
                raise ValueError(
                    f"hopkit.export.inline_autocast_hops_pass: {n.format_node()} is used "
                    f"other than through getitem; cannot inline it."
                )
            if n not in env and n.op == "get_attr":
                # Created on first use, so a body consumed by an expanded call
                # is never copied.
                assert isinstance(n.target, str)
                value = _get_attr_path(gm, n.target)
                if isinstance(value, torch.fx.GraphModule):
                    value = self.rewrite_nested(value)
                target = self.attr_name(n.target, value)
                new = self.graph.create_node("get_attr", target, (), {}, name=n.name)
                new.meta = copy.copy(n.meta)
                env[n] = new
            return env[n]

        for node in gm.graph.nodes:
            if node.op == "placeholder":
                if placeholders is None:
                    env[node] = self.graph.node_copy(node)
                else:
                    env[node] = next(placeholders)
            elif node.op == "output":
                result = torch.fx.node.map_arg(node.args[0], arg)
                if inputs is None:
                    self.graph.output(result, type_expr=node.type).meta = copy.copy(node.meta)
            elif node.op == "get_attr":
                pass  # see arg()
            elif _is_autocast_hop(node):
                device, dtype, enabled, cache, body_node, *operands = node.args
                assert isinstance(body_node, torch.fx.Node) and isinstance(body_node.target, str)
                body = _get_attr_path(gm, body_node.target)
                enter = self.graph.call_function(_ENTER, (device, dtype, enabled, cache))
                for k in ("nn_module_stack", "stack_trace"):
                    if k in node.meta:
                        enter.meta[k] = copy.copy(node.meta[k])
                _, outs = self.copy_graph(body, [torch.fx.node.map_arg(o, arg) for o in operands])
                self.graph.call_function(_EXIT, (enter,))
                expanded[node] = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
            elif (
                node.op == "call_function"
                and node.target is operator.getitem
                and node.args[0] in expanded
            ):
                env[node] = expanded[node.args[0]][node.args[1]]
            else:
                env[node] = self.graph.node_copy(node, arg)
        return env, result

    def rewrite_nested(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """A GraphModule under another HOP (e.g. a cond branch): inline inside it."""
        hit = self.memo.get(id(gm))
        if hit is None:
            hit, _ = inline_autocast_hops_pass(gm, None)
            self.memo[id(gm)] = hit
        return hit


def inline_autocast_hops_pass(
    gm: torch.fx.GraphModule, graph_signature: ExportGraphSignature | None
) -> tuple[torch.fx.GraphModule, ExportGraphSignature | None]:
    """Expand every ``hopkit.export.wrap_with_autocast`` call back into its region.

    The inverse of :func:`replace_autocast_with_hop_pass`: each call becomes
    ``enter = _enter_autocast(device_type, dtype, enabled, cache_enabled)``,
    the body's nodes, ``_exit_autocast(enter)``; nested calls become nested
    regions. The result computes the same values when run. ``gm`` is not
    mutated; without such calls, ``gm`` and ``graph_signature`` are returned as
    they are. The signature's output names follow the new graph.

    Body nodes keep their names where the outer graph does not use them
    already, so ``inline(replace(gm))`` has the names of ``gm``.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(
            f"hopkit.export.inline_autocast_hops_pass: expected a torch.fx.GraphModule, "
            f"but got {type(gm).__name__}."
        )
    if not _needs_inlining(gm):
        return gm, graph_signature
    inliner = _Inliner(gm)
    inliner.copy_graph(gm, None)
    new_gm = torch.fx.GraphModule(inliner.attrs, inliner.graph, class_name="GraphModule")
    new_gm.meta = copy.copy(gm.meta)
    new_gm.graph.lint()
    if graph_signature is None:
        return new_gm, None
    out = new_gm.graph.output_node().args[0]
    flat = list(out) if isinstance(out, (tuple, list)) else [out]
    specs = [
        dataclasses.replace(spec, arg=dataclasses.replace(spec.arg, name=a.name))
        if isinstance(a, torch.fx.Node) and getattr(spec.arg, "name", None) != a.name
        else spec
        for a, spec in zip(flat, graph_signature.output_specs)
    ]
    return new_gm, dataclasses.replace(graph_signature, output_specs=specs)

