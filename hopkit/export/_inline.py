"""``inline_hops``: replace hopkit HOP calls by their bodies, for consumers that cannot run HOPs.

    ep = hopkit.export.inline_hops(ep)                  # every hopkit HOP call inlined
    gm = hopkit.export.inline_hops(gm, hops=[my_hop])   # only my_hop's calls

In plain Python, a call ``outs = hop(*leading, body, *operands, **config)``
becomes the nodes of ``body`` with its placeholders bound to ``operands``;
``outs[i]`` reads the body's i-th output. ``wrap_with_autocast`` keeps its
autocast state: NOTE [Inlining wrap_with_autocast as enter/exit] below.

The engine (``inline_hop_calls``) is shared with
``hopkit.export.inline_autocast_hops_pass`` (``_export.py``), which is
``inline_hops`` restricted to ``wrap_with_autocast`` on a graph and its
signature.

NOTE [Inlining wrap_with_autocast as enter/exit]
A ``wrap_with_autocast`` call runs its body under ``torch.autocast(...)``
(its dense rule). Its body is either bare (pre-dispatch graphs: the training
IR of ``torch.export.export``, ``make_fx(pre_dispatch=True)``) or already
carries the casts as explicit ops (graphs traced at the aten level:
``run_decompositions``, AOTAutograd); nothing in a graph says which. Two
forms keep the HOP's semantics exactly either way:

* In a GraphModule: ``torch.amp.autocast_mode._enter_autocast(device_type,
  dtype, enabled, cache_enabled)`` before the body's nodes and
  ``_exit_autocast`` after them, what a pre-dispatch graph holds before
  ``replace_autocast_with_hop_pass`` (so this is that pass's inverse, and
  ``inline_autocast_hops_pass`` keeps this form).
* In an ExportedProgram: the body re-traced at the aten level (``make_fx``
  on the fake operands the program recorded, in its fake mode and shape
  environment) under the call's autocast state, so the casts are explicit
  ``_to_copy`` ops and no autocast state is left. Re-tracing a body that
  carries its casts already adds none (autocast casts only what has another
  dtype). The enter/exit form is not usable there: torch's verifier, ``ep.module()``
  and ``run_decompositions`` accept it, but ``torch.export.save`` refuses it
  on every release of the window (2.11: "Failed serializing node
  _enter_autocast"; 2.13-2.15: "symbol '_enter_autocast' not in def_table").

A HOP call threaded by effect tokens (``hopkit_with_effects(token, hop,
...)``, only in graphs after ``run_decompositions``) is not inlined: its body
holds the effectful calls untokened (NOTE [Effect tokens inside subgraphs]),
so inlining it would leave them out of the token chain. Inline the training
IR (before ``run_decompositions``) instead; ``inline_hops`` says so.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx
from torch._ops import HigherOrderOperator
from torch.export.graph_signature import ExportGraphSignature

from hopkit.base_hop import BaseHOP
from hopkit.export._autocast_hop import config_problems, wrap_with_autocast
from hopkit.export._pass import (
    _ENTER,
    _EXIT,
    _check_signature_fits,
    _describe,
    _fix_signature,
    _get_attr_path,
    _type_name,
)

__all__ = ["inline_hops", "inline_hop_calls"]

# Which HOP calls to inline: a set of HOPs, or None for every hopkit HOP.
Selection = frozenset[BaseHOP] | None


def inline_hops(program: Any, hops: Iterable[BaseHOP] | None = None) -> Any:
    """Replace every call of the given hopkit HOPs by the nodes of its body.

    Args:
        program: a ``torch.fx.GraphModule`` or a ``torch.export.ExportedProgram``
            (training IR, or after ``run_decompositions``). It is not mutated.
        hops: the HOPs to inline (``hopkit.BaseHOP`` instances, e.g.
            ``hopkit.export.wrap_with_autocast``); ``None``: every hopkit HOP.

    Returns:
        The same kind as ``program``: a new GraphModule, or a new
        ExportedProgram (same state dict, constants, range constraints and
        verifiers; its graph signature and module call graph follow the new
        output names), computing the same values. Calls nested in a body, in
        the body of a HOP that is not inlined, or in a branch of torch's HOPs
        (``cond``, ...) are inlined too; so are the backward calls of training
        graphs (a backward call is a call of the same HOP). ``wrap_with_autocast``
        becomes ``_enter_autocast`` / body / ``_exit_autocast`` in a
        GraphModule, and its body with the casts as explicit ops in an
        ExportedProgram (NOTE [Inlining wrap_with_autocast as enter/exit]). Without such calls,
        ``program`` itself is returned. ``ep.module()``,
        ``run_decompositions()`` and ``torch.export.save`` / ``load`` work on
        the result.

    Raises:
        TypeError: ``program`` is neither a GraphModule nor an
            ExportedProgram, or ``hops`` is not an iterable of hopkit HOPs.
        ValueError: naming the node, for a call that cannot be inlined (a
            malformed call, a HOP whose ``subgraph_context`` is its own, a
            call threaded by effect tokens); raised before anything is copied.
    """
    selected = _check_inline_args(program, hops)
    if isinstance(program, torch.export.ExportedProgram):
        return _inline_program(program, selected)
    new_gm, _ = inline_hop_calls("inline_hops", program, None, selected)
    return new_gm


def inline_hop_calls(
    fn: str,
    gm: torch.fx.GraphModule,
    graph_signature: ExportGraphSignature | None,
    selected: Selection,
    *,
    autocast_as_casts: bool = False,
) -> tuple[torch.fx.GraphModule, ExportGraphSignature | None]:
    """The engine of ``inline_hops`` and ``inline_autocast_hops_pass`` (named ``fn`` in errors).

    ``gm`` and ``graph_signature`` are checked by the caller's entry point;
    every call is checked here before the first node is copied.
    ``autocast_as_casts``: NOTE [Inlining wrap_with_autocast as enter/exit].
    """
    calls = _hop_calls(gm, selected)
    if not calls:
        return gm, graph_signature
    for module, node in calls:
        _check_call(fn, module, node, selected)
    if graph_signature is not None:
        _check_signature_fits(fn, gm, graph_signature)
    inliner = _Inliner(gm, fn, selected, autocast_as_casts)
    inliner.copy_graph(gm, None)
    new_gm = torch.fx.GraphModule(inliner.attrs, inliner.graph, class_name="GraphModule")
    new_gm.meta = copy.copy(gm.meta)
    new_gm.graph.lint()
    if graph_signature is None:
        return new_gm, None
    return new_gm, _fix_signature(new_gm, graph_signature)


# ---------------------------------------------------------------------------
# Entry checks
# ---------------------------------------------------------------------------


def _check_inline_args(program: Any, hops: Any) -> Selection:
    if not isinstance(program, (torch.fx.GraphModule, torch.export.ExportedProgram)):
        if isinstance(program, torch.fx.Graph):
            fix = "wrap it as torch.fx.GraphModule(root, graph)"
        elif isinstance(program, torch.nn.Module):
            fix = "export it first (hopkit.export.export(model, args) or torch.export.export)"
        else:
            fix = "pass ep or ep.graph_module"
        raise TypeError(
            f"hopkit: inline_hops expects a torch.fx.GraphModule or a "
            f"torch.export.ExportedProgram, but got {_type_name(program)}; {fix}."
        )
    if hops is None:
        return None
    if isinstance(hops, HigherOrderOperator):
        raise TypeError(
            f"hopkit: inline_hops expects hops to be an iterable of hopkit HOPs or None, "
            f"but got the HOP {hops.__name__} itself; pass hops=[{hops.__name__}]."
        )
    if isinstance(hops, (str, bytes)) or not isinstance(hops, Iterable):
        raise TypeError(
            f"hopkit: inline_hops expects hops to be an iterable of hopkit HOPs or None, "
            f"but got {_type_name(hops)}; pass e.g. hops=[hopkit.export.wrap_with_autocast], "
            f"or leave it out to inline every hopkit HOP."
        )
    hops = list(hops)
    for i, hop in enumerate(hops):
        if isinstance(hop, BaseHOP):
            continue
        if isinstance(hop, HigherOrderOperator):
            what = f"torch.ops.higher_order.{hop.__name__}, a HOP that is not hopkit's"
            fix = "leave it out of hops: inline_hops inlines hopkit HOPs only"
        else:
            what = _type_name(hop)
            fix = "pass the HOP objects themselves (instances of hopkit.BaseHOP)"
        raise TypeError(
            f"hopkit: inline_hops expects hops to hold hopkit HOPs (instances of "
            f"hopkit.BaseHOP, such as hopkit.export.wrap_with_autocast), but hops[{i}] "
            f"is {what}; {fix}."
        )
    return frozenset(hops)


def _is_selected(target: Any, selected: Selection) -> bool:
    if not isinstance(target, BaseHOP):
        return False
    return selected is None or target in selected


def _hop_calls(
    gm: torch.fx.GraphModule, selected: Selection
) -> list[tuple[torch.fx.GraphModule, torch.fx.Node]]:
    """Every selected HOP call (or tokened one) in ``gm`` and the GraphModules under it."""
    return [
        (m, n)
        for m in gm.modules()
        if isinstance(m, torch.fx.GraphModule)
        for n in m.graph.nodes
        if n.op == "call_function"
        and (_is_selected(n.target, selected) or _tokened_call(n, selected))
    ]


def _tokened_call(node: torch.fx.Node, selected: Selection) -> bool:
    """``hopkit_with_effects(token, hop, ...)`` of a selected HOP."""
    from hopkit.effects import with_effects

    return (
        node.target is with_effects
        and len(node.args) > 1
        and _is_selected(node.args[1], selected)
    )


def _check_call(
    fn: str, gm: torch.fx.GraphModule, node: torch.fx.Node, selected: Selection
) -> None:
    """Refuse a call the inliner cannot expand, naming the node."""
    if _tokened_call(node, selected):
        tokened = node.args[1]
        assert isinstance(tokened, BaseHOP)
        raise ValueError(
            f"hopkit: {fn} cannot inline {_describe(node)}: it is a call of {tokened._name} "
            f"threaded by effect tokens, whose body's effectful calls would leave the "
            f"token chain; inline the program before run_decompositions (the training "
            f"IR of torch.export.export has no tokens), or leave {tokened._name} out of hops."
        )
    hop = node.target
    assert isinstance(hop, BaseHOP)
    if hop is wrap_with_autocast:
        _check_autocast_call(fn, gm, node)
        return
    if hop._has_context:
        raise ValueError(
            f"hopkit: {fn} cannot inline {_describe(node)}: {type(hop).__qualname__} "
            f"runs its body under its own subgraph_context, which a graph cannot "
            f"express as nodes; leave {hop._name} out of hops (hops=[...] naming the "
            f"others)."
        )
    n = hop._num_leading
    problems = []
    if len(node.args) <= n:
        problems.append(f"it has {len(node.args)} positional argument(s), no subgraph")
    else:
        problems += _body_problems(gm, node, node.args[n], node.args[n + 1 :])
    if problems:
        leading = "".join(f"{c}, " for c in hop.leading_config)
        raise ValueError(
            f"hopkit: {fn} expects {hop._name}({leading}subgraph, *operands, **config) "
            f"calls with a get_attr of a GraphModule as the subgraph, but in "
            f"{_describe(node)} " + "; ".join(problems) + "; fix that node (the calls "
            f"hopkit's HOPs trace have this form)."
        )


def _check_autocast_call(fn: str, gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
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
        problems += _body_problems(gm, node, args[4], args[5:])
    if problems:
        raise ValueError(
            f"hopkit: {fn} expects wrap_with_autocast(device_type, "
            f"dtype, enabled, cache_enabled, subgraph, *operands) calls with constant "
            f"configuration and a get_attr of a GraphModule as the subgraph, but in "
            f"{_describe(node)} " + "; ".join(problems) + "; fix that node (the calls "
            f"replace_autocast_with_hop_pass builds have this form)."
        )


def _body_problems(
    gm: torch.fx.GraphModule, node: torch.fx.Node, body_node: Any, operands: tuple[Any, ...]
) -> list[str]:
    """What is wrong with the subgraph argument of a HOP call and its uses."""
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


# ---------------------------------------------------------------------------
# The copy
# ---------------------------------------------------------------------------

# Node meta that says where a value was computed in the user's code; body
# nodes that lack it take the HOP call's (ONNX name scopes, unflatten).
_WHERE_META = ("nn_module_stack", "stack_trace")


class _Inliner:
    """Copies a graph into ``self.graph``, expanding the selected HOP calls in place."""

    def __init__(
        self, root: torch.fx.GraphModule, fn: str, selected: Selection, autocast_as_casts: bool
    ) -> None:
        old = root.graph
        self.graph = torch.fx.Graph(tracer_cls=old._tracer_cls, tracer_extras=old._tracer_extras)
        self.graph._codegen = copy.deepcopy(old._codegen)
        self.fn = fn
        self.selected = selected
        self.autocast_as_casts = autocast_as_casts
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
        self,
        gm: torch.fx.GraphModule,
        inputs: list[Any] | None,
        call: torch.fx.Node | None = None,
    ) -> tuple[dict[torch.fx.Node, Any], Any]:
        """Copy ``gm``'s nodes; its placeholders become ``inputs`` (top level: copied).

        ``call``: the HOP call whose body ``gm`` is, for the meta its nodes lack.
        """
        env: dict[torch.fx.Node, Any] = {}
        # Results of expanded HOP calls: node -> the body's output values.
        expanded: dict[torch.fx.Node, tuple[Any, ...]] = {}
        placeholders = iter(inputs) if inputs is not None else None
        result: Any = None

        def arg(n: torch.fx.Node) -> Any:
            assert n not in expanded, "only getitem uses it (_body_problems)"
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
            elif node.op == "call_function" and _is_selected(node.target, self.selected):
                outs = self.expand(gm, node, arg)
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
                new = self.graph.node_copy(node, arg)
                if call is not None:
                    for k in _WHERE_META:
                        if k not in new.meta and k in call.meta:
                            new.meta[k] = copy.copy(call.meta[k])
                env[node] = new
        return env, result

    def expand(
        self, gm: torch.fx.GraphModule, node: torch.fx.Node, arg: Callable[[torch.fx.Node], Any]
    ) -> Any:
        """The body of one HOP call copied in place; returns its output values."""
        hop = node.target
        assert isinstance(hop, BaseHOP)
        n = hop._num_leading
        body_node, operands = node.args[n], node.args[n + 1 :]
        assert isinstance(body_node, torch.fx.Node) and isinstance(body_node.target, str)
        body = _get_attr_path(gm, body_node.target)
        inputs = [torch.fx.node.map_arg(o, arg) for o in operands]
        if hop is not wrap_with_autocast:
            _, outs = self.copy_graph(body, inputs, node)
            return outs
        # NOTE [Inlining wrap_with_autocast as enter/exit]
        if self.autocast_as_casts:
            _, outs = self.copy_graph(_traced_under_autocast(body, node), inputs, node)
            return outs
        enter = self.graph.call_function(_ENTER, tuple(node.args[:4]))
        # As pre-dispatch tracing records them; torch's verifier wants a val.
        enter.meta["val"] = None
        for k in _WHERE_META:
            if k in node.meta:
                enter.meta[k] = copy.copy(node.meta[k])
        _, outs = self.copy_graph(body, inputs, node)
        exit_ = self.graph.call_function(_EXIT, (enter,))
        exit_.meta = {k: copy.copy(v) for k, v in enter.meta.items()}
        return outs

    def rewrite_nested(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """A GraphModule under a call that is not inlined (e.g. a cond branch): inline inside it."""
        hit = self.memo.get(id(gm))
        if hit is None:
            hit, _ = inline_hop_calls(
                self.fn, gm, None, self.selected, autocast_as_casts=self.autocast_as_casts
            )
            self.memo[id(gm)] = hit
        return hit


def _traced_under_autocast(body: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.GraphModule:
    """``body`` re-traced at the aten level under the call's autocast state: its casts explicit.

    Traced on the fake values the program recorded for the call's operands,
    in their fake mode (and shape environment, for dynamic shapes).
    """
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    device_type, dtype, enabled, cache_enabled = node.args[:4]
    operands = [o.meta.get("val") if isinstance(o, torch.fx.Node) else o for o in node.args[5:]]
    fake_mode = detect_fake_mode(operands)
    if fake_mode is None or any(
        isinstance(o, torch.fx.Node) and o.meta.get("val") is None for o in node.args[5:]
    ):
        raise ValueError(
            f"hopkit: inline_hops cannot inline {_describe(node)} in an ExportedProgram: "
            f"its operands have no fake values (node.meta['val']) to re-trace its body "
            f"under autocast with; pass the program as exported, or pass ep.graph_module "
            f"to inline it as _enter_autocast / _exit_autocast nodes."
        )

    def under_autocast(*args: Any) -> Any:
        with torch.autocast(
            device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled  # type: ignore[arg-type]
        ):
            return body(*args)

    if fake_mode.shape_env is not None:
        return make_fx(under_autocast, tracing_mode="symbolic")(*operands)
    return make_fx(under_autocast, tracing_mode="fake")(*operands)


# ---------------------------------------------------------------------------
# ExportedProgram
# ---------------------------------------------------------------------------


def _inline_program(
    ep: torch.export.ExportedProgram, selected: Selection
) -> torch.export.ExportedProgram:
    old_outs = _output_names(ep.graph_module)
    new_gm, new_sig = inline_hop_calls(
        "inline_hops", ep.graph_module, ep.graph_signature, selected, autocast_as_casts=True
    )
    if new_gm is ep.graph_module:
        return ep
    assert new_sig is not None
    # The module call graph names the program's inputs and outputs as the
    # signature does; outputs that were getitems of an inlined call now have
    # the names of the body's values.
    renamed = {
        old: new
        for old, new in zip(old_outs, _output_names(new_gm))
        if old is not None and new is not None and old != new
    }
    module_call_graph = copy.deepcopy(ep.module_call_graph)
    for entry in module_call_graph:
        signature = entry.signature
        if signature is None:
            continue
        signature.inputs = [_renamed(a, renamed) for a in signature.inputs]
        signature.outputs = [_renamed(a, renamed) for a in signature.outputs]
    return torch.export.ExportedProgram(
        root=new_gm,
        graph=new_gm.graph,
        graph_signature=new_sig,
        state_dict=ep.state_dict,
        range_constraints=copy.deepcopy(ep.range_constraints),
        module_call_graph=module_call_graph,
        example_inputs=ep.example_inputs,
        constants=ep.constants,
        verifiers=ep.verifiers,
    )


def _output_names(gm: torch.fx.GraphModule) -> list[str | None]:
    out = gm.graph.output_node().args[0]
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [o.name if isinstance(o, torch.fx.Node) else None for o in outs]


def _renamed(spec: Any, renamed: dict[str, str]) -> Any:
    name = getattr(spec, "name", None)
    if name in renamed and dataclasses.is_dataclass(spec):
        return dataclasses.replace(spec, name=renamed[name])  # type: ignore[type-var]
    return spec
