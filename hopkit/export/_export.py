"""Exported programs with hopkit autocast HOPs, and the way back.

    ep = hopkit.export.export(model, args)            # autocast regions are HOP calls
    gm, sig = inline_autocast_hops_pass(gm, sig)      # HOP calls back to enter/exit pairs

``export`` is ``torch.export.export`` with hopkit's
``replace_autocast_with_hop_pass`` in place of torch's in-tree pass (NOTE
[Swapping torch.export's autocast pass, per thread] below). Everything
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
import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch.export.graph_signature import ExportGraphSignature

import threading
from collections.abc import Callable, Iterator
import contextlib

from hopkit import _patch
from hopkit.export._autocast_hop import config_problems, wrap_with_autocast
from hopkit.export._pass import (
    _ENTER,
    _EXIT,
    _check_pass_args,
    _check_signature_fits,
    _describe,
    _fix_signature,
    _get_attr_path,
    _type_name,
    replace_autocast_with_hop_pass,
)

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

    Raises:
        TypeError: ``mod`` is not an ``nn.Module``, ``args`` not a tuple or
            ``kwargs`` not a mapping, before anything is traced.
    """
    _check_export_args(mod, args, kwargs)
    with _hopkit_autocast_pass():
        return torch.export.export(mod, args, kwargs, **export_kwargs)


# NOTE [Swapping torch.export's autocast pass, per thread]
# torch.export (2.11-2.15) runs its autocast pass by importing
# `replace_autocast_with_hop_pass` from
# torch._export.passes.replace_autocast_with_hop_pass when it runs
# (`_produce_aten_artifact` in torch/export/_trace.py); it takes no pass as
# an argument. On the first hopkit.export.export, hopkit._patch replaces that
# module attribute with a dispatcher that runs hopkit's pass on threads inside
# hopkit.export.export and torch's own pass everywhere else, so a plain
# torch.export.export (on another thread, or after ours) gets torch's pass
# exactly. Can go when torch.export accepts the pass as an argument.

_AUTOCAST_PASS_MODULE = "torch._export.passes.replace_autocast_with_hop_pass"
_in_hopkit_export = threading.local()


def _dispatching_pass(original: Callable[..., Any]) -> Callable[..., Any]:
    def replace_autocast_with_hop_pass_for_this_thread(*args: Any, **kwargs: Any) -> Any:
        if getattr(_in_hopkit_export, "depth", 0):
            return replace_autocast_with_hop_pass(*args, **kwargs)
        return original(*args, **kwargs)

    return replace_autocast_with_hop_pass_for_this_thread


@contextlib.contextmanager
def _hopkit_autocast_pass() -> Iterator[None]:
    patch = _patch.patch_function(
        _AUTOCAST_PASS_MODULE, "replace_autocast_with_hop_pass", _dispatching_pass,
        why="run hopkit's autocast pass inside hopkit.export.export",
    )
    if patch is None:
        raise RuntimeError(
            f"hopkit: this torch has no {_AUTOCAST_PASS_MODULE}.replace_autocast_with_hop_pass "
            "for hopkit.export.export to replace; export with torch.export.export and run "
            "hopkit.export.replace_autocast_with_hop_pass on the pre-dispatch graph yourself."
        )
    _in_hopkit_export.depth = getattr(_in_hopkit_export, "depth", 0) + 1
    try:
        yield
    finally:
        _in_hopkit_export.depth -= 1


def _check_export_args(mod: Any, args: Any, kwargs: Any) -> None:
    if not isinstance(mod, torch.nn.Module):
        if isinstance(mod, torch.export.ExportedProgram):
            fix = "export the nn.Module it came from (its autocast regions are rewritten already)"
        else:
            fix = "to export a function, wrap it in a Module whose forward calls it"
        raise TypeError(
            f"hopkit: export expects a torch.nn.Module, but got {_type_name(mod)}; {fix}."
        )
    if not isinstance(args, tuple):
        fix = "pass tuple(args)" if isinstance(args, list) else "pass (x,) for a single input x"
        raise TypeError(
            f"hopkit: export expects args to be a tuple of example inputs (as "
            f"torch.export.export does), but got {_type_name(args)}; {fix}."
        )
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(
            f"hopkit: export expects kwargs to be a dict of example keyword inputs or "
            f"None, but got {_type_name(kwargs)}; pass positional inputs in args."
        )


def _is_autocast_hop(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is wrap_with_autocast


def _check_autocast_hop(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Refuse a ``wrap_with_autocast`` call node the inliner cannot expand, naming it.

    Checked for every call before the first node is copied, so an error never
    leaves a half-built graph behind.
    """
    problems: list[str] = []
    args = node.args
    if node.kwargs:
        problems.append(f"it has keyword arguments {sorted(node.kwargs)}")
    if len(args) < 5:
        problems.append(
            f"it has {len(args)} positional argument(s), fewer than the four "
            f"configuration arguments and the subgraph"
        )
    else:
        names = ("device_type", "dtype", "enabled", "cache_enabled")
        values = [
            f"{name} is the graph value '{a.name}', not a constant"
            for name, a in zip(names, args[:4])
            if isinstance(a, torch.fx.Node)
        ]
        problems += values or config_problems(*args[:4])
        problems += _body_problems(gm, node)
    if problems:
        raise ValueError(
            f"hopkit: inline_autocast_hops_pass expects wrap_with_autocast(device_type, "
            f"dtype, enabled, cache_enabled, subgraph, *operands) calls with constant "
            f"configuration and a get_attr of a GraphModule as the subgraph, but in "
            f"{_describe(node)} " + "; ".join(problems) + "; fix that node (the calls "
            f"replace_autocast_with_hop_pass builds have this form)."
        )


def _body_problems(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[str]:
    """What is wrong with the subgraph argument of an autocast HOP call and its uses."""
    body_node, operands = node.args[4], node.args[5:]
    if not (
        isinstance(body_node, torch.fx.Node)
        and body_node.op == "get_attr"
        and isinstance(body_node.target, str)
    ):
        what = _describe(body_node) if isinstance(body_node, torch.fx.Node) else _type_name(body_node)
        return [f"its subgraph argument is {what}, not a get_attr node"]
    try:
        body = _get_attr_path(gm, body_node.target)
    except AttributeError:
        return [f"its subgraph {body_node.target!r} is not an attribute of the module"]
    if not isinstance(body, torch.fx.GraphModule):
        return [f"its subgraph {body_node.target!r} is {_type_name(body)}, not a torch.fx.GraphModule"]
    problems = []
    num_inputs = len(body.graph.find_nodes(op="placeholder"))
    if num_inputs != len(operands):
        problems.append(
            f"its subgraph {body_node.target!r} takes {num_inputs} input(s), but the "
            f"call passes {len(operands)} operand(s)"
        )
    outs = body.graph.output_node().args[0]
    if isinstance(outs, (tuple, list)):
        n = len(outs)
        for user in node.users:
            if not (
                user.op == "call_function"
                and user.target is operator.getitem
                and len(user.args) == 2
                and user.args[0] is node
                and type(user.args[1]) is int
                and -n <= user.args[1] < n
            ):
                problems.append(
                    f"it is used by {_describe(user)}, but its subgraph returns a "
                    f"tuple of {n}, which only getitem(call, i) with 0 <= i < {n} can take apart"
                )
                break
    return problems


def _autocast_hops(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.GraphModule, torch.fx.Node]]:
    """Every autocast HOP call in ``gm`` and the GraphModules under it, with its module."""
    return [
        (m, n)
        for m in gm.modules()
        if isinstance(m, torch.fx.GraphModule)
        for n in m.graph.find_nodes(op="call_function", target=wrap_with_autocast)
    ]


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
            assert n not in expanded, "only getitem uses it (_check_autocast_hop)"
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
                # The node's form was checked by _check_autocast_hop.
                device, dtype, enabled, cache, body_node, *operands = node.args
                assert isinstance(body_node, torch.fx.Node) and isinstance(body_node.target, str)
                body = _get_attr_path(gm, body_node.target)
                enter = self.graph.call_function(_ENTER, (device, dtype, enabled, cache))
                for k in ("nn_module_stack", "stack_trace"):
                    if k in node.meta:
                        enter.meta[k] = copy.copy(node.meta[k])
                _, outs = self.copy_graph(body, [torch.fx.node.map_arg(o, arg) for o in operands])
                self.graph.call_function(_EXIT, (enter,))
                if isinstance(outs, (tuple, list)):
                    expanded[node] = tuple(outs)
                else:  # a body that returns one value: the call's value is that value
                    env[node] = outs
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

    Raises:
        TypeError: ``gm`` is not a GraphModule or ``graph_signature`` is neither
            an ``ExportGraphSignature`` nor ``None`` (for an ExportedProgram
            ``ep``, pass ``ep.graph_module, ep.graph_signature``).
        ValueError: naming the node, for a malformed ``wrap_with_autocast`` call
            (wrong arguments, a subgraph that is not a get_attr of a
            GraphModule, configuration that is not constant, a tuple result
            used other than through ``getitem``), or a signature whose output
            specs do not match the graph's outputs; raised before anything is
            copied.
    """
    _check_pass_args("inline_autocast_hops_pass", gm, graph_signature)
    hops = _autocast_hops(gm)
    if not hops:
        return gm, graph_signature
    for module, node in hops:
        _check_autocast_hop(module, node)
    if graph_signature is not None:
        _check_signature_fits("inline_autocast_hops_pass", gm, graph_signature)
    inliner = _Inliner(gm)
    inliner.copy_graph(gm, None)
    new_gm = torch.fx.GraphModule(inliner.attrs, inliner.graph, class_name="GraphModule")
    new_gm.meta = copy.copy(gm.meta)
    new_gm.graph.lint()
    if graph_signature is None:
        return new_gm, None
    return new_gm, _fix_signature(new_gm, graph_signature)
