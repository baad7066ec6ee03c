"""hopkit.effects inside torch's token machinery: the places of AOTAutograd, the
partitioner and torch.export that recognise torch's ``with_effects`` by
identity, taught to accept hopkit's; :func:`install` puts them in place.

See NOTE [hopkit effects inside torch's token machinery] below. Every change
goes through hopkit._patch (NOTE [Changing torch only on use, reversibly] in
hopkit/_patch.py) and is made on first use, never on import.
"""

from __future__ import annotations

import functools
import operator
import threading
import types
from collections.abc import Callable
from typing import Any

import torch

from hopkit import _fx, _patch
from hopkit.effects import _registry, _regions
from hopkit.effects._handle_effects import handle_effects
from hopkit.effects._hop import with_effects

__all__ = ["install", "installed"]

# NOTE [hopkit effects inside torch's token machinery]
# AOTAutograd threads effect tokens itself; it only asks "does this op have an
# effect?" and "thread it" through two functions that FunctionalTensorMode
# imports at call time from torch._higher_order_ops.effects (`has_effects`,
# `handle_effects`). Everything downstream recognises torch's `with_effects`
# HOP by identity. hopkit keeps its own HOP (`hopkit_with_effects`) and makes
# each of those places accept it:
#
#   place (torch 2.11-2.15)                         shim
#   ---------------------------------------------   --------------------------
#   FunctionalTensorMode -> has_effects /           _route_has_effects,
#     handle_effects (torch._higher_order_ops.       _route_handle_effects
#     effects, looked up at call time)
#   _aot_autograd.utils.is_with_effects (min-cut    _is_with_effects
#     partitioner: force-save effectful outputs,
#     never recompute them)
#   partitioners.force_save_effectful_ops (skips    _force_save_effectful_ops
#     activation-checkpointed regions: a torch bug)
#   _aot_autograd.utils.unlift_tokens (Inductor:    _unlift_tokens
#     token inputs/outputs -> _make_token /
#     _sink_tokens)
#   proxy_tensor._should_save_eager_input_vals      _should_save_eager_input_vals
#   Inductor lowering of with_effects (star deps,   hopkit/inductor/
#     has_side_effects, effectful_ops chain)          effects_lowering.py
#   torch.export._remove_effect_tokens (ep.module(), _remove_effect_tokens
#     unflatten)
#
# Each shim is a wrapper that handles hopkit's HOP and ops registered with
# hopkit (hopkit/effects/_registry.py), and everything inside a
# subgraph_effects region (NOTE [Effect tokens inside subgraphs] in
# hopkit/effects/_regions.py), and passes everything else to torch's original
# untouched, so torch's own effectful ops (aten::_print, torchbind) and
# programs without hopkit's HOP behave exactly as without hopkit. Each is
# installed through hopkit._patch.patch_function on the defining module *and*
# on every already-imported module that did `from ... import name`; modules
# imported later pick up the wrapper by that same import; Patch.undo() (or
# hopkit._patch.undo_all()) restores torch's originals everywhere. The
# partitioner's and Inductor's shims are installed when (and if) those
# modules are imported: nothing here imports Inductor or the partitioner.
# Can go when torch dispatches effect handling through a registry of
# with_effects-like HOPs instead of identity checks.

_HOP_EFFECTS = "torch._higher_order_ops.effects"
_AOT_UTILS = "torch._functorch._aot_autograd.utils"
_PARTITIONERS = "torch._functorch.partitioners"
_PROXY_TENSOR = "torch.fx.experimental.proxy_tensor"
_REMOVE_TOKENS = "torch.export._remove_effect_tokens_pass"


def _torch_with_effects() -> Any:
    return torch.ops.higher_order.with_effects


# ---------------------------------------------------------------------------
# Installing, on first use
# ---------------------------------------------------------------------------

# The function patches of the last install; None before the first.
_patches: list[_patch.Patch] | None = None
_install_lock = threading.RLock()  # re-entrant: an import made while installing may use effects


def installed() -> bool:
    """Whether the shims are in place (installed, and not undone since)."""
    patches = _patches
    return patches is not None and all(p.live for p in patches)


def install() -> None:
    """Install the shims of NOTE [hopkit effects inside torch's token
    machinery]. Called on first use (the first register_effectful_op, the
    first traced or functionalized call of with_effects, the first
    subgraph_effects region); idempotent, and installs again what
    hopkit._patch.undo_all() has undone."""
    global _patches
    if installed():
        return
    with _install_lock:
        if installed():
            return
        sites: list[tuple[str, str, Callable[[Any], Any], tuple[str, ...], str]] = [
            (_HOP_EFFECTS, "has_effects", _route_has_effects, (),
             "route FunctionalTensorMode's effect check for hopkit's effectful ops to hopkit"),
            (_HOP_EFFECTS, "handle_effects", _route_handle_effects, (),
             "thread hopkit's effectful ops through hopkit_with_effects"),
            (_AOT_UTILS, "is_with_effects", _is_with_effects, (_PARTITIONERS,),
             "let the min-cut partitioner force-save hopkit_with_effects outputs"),
            (_AOT_UTILS, "unlift_tokens", _unlift_tokens,
             ("torch._functorch._aot_autograd.graph_capture",
              "torch._functorch._aot_autograd.graph_compile"),
             "unlift the effect tokens of hopkit_with_effects for Inductor"),
            (_PROXY_TENSOR, "_should_save_eager_input_vals", _should_save_eager_input_vals, (),
             "lower hopkit_with_effects without eager input values, as torch's with_effects"),
            (_REMOVE_TOKENS, "_remove_effect_tokens", _remove_effect_tokens,
             ("torch.export._unlift", "torch.export.unflatten"),
             "remove hopkit_with_effects' tokens in ep.module() and unflatten"),
        ]
        patches = []
        for module, name, make, consumers, why in sites:
            patch = _patch.patch_function(module, name, make, consumers=consumers, why=why)
            if patch is not None:
                patches.append(patch)
        _patch.when_imported(_PARTITIONERS, _patch_force_save_effectful_ops,
                             why="keep the partitioner from recomputing hopkit's effects")
        # Eager activation checkpointing (NOTE [Effects under activation
        # checkpointing] in hopkit/effects/_checkpoint.py).
        from hopkit.effects._checkpoint import install_checkpoint_hooks

        install_checkpoint_hooks()
        # torch.export.save / load of with_effects nodes (NOTE [Saving hopkit
        # HOP nodes] in hopkit/_serialization.py), also in a program that
        # calls no BaseHOP.
        from hopkit import _serialization
        from hopkit.effects._hop import with_effects

        _serialization.register_serialization(with_effects)
        # Imported here, not at the top: hopkit.inductor sits above
        # hopkit.effects (it lowers this family's HOP), and the lowering is
        # registered only when (and if) Inductor is imported.
        from hopkit.inductor import effects_lowering

        effects_lowering.register_inductor_lowering()
        _patches = patches


# ---------------------------------------------------------------------------
# The shims
# ---------------------------------------------------------------------------


def _route_has_effects(original: Any) -> Any:
    @functools.wraps(original)
    def has_effects(op: Any, *args: Any, **kwargs: Any) -> bool:
        if _registry.owns(op):
            return _registry.threads_effects(op)
        return bool(original(op, *args, **kwargs))

    return has_effects


def _route_handle_effects(original: Any) -> Any:
    @functools.wraps(original)
    def route_handle_effects(
        allow_token_discovery: bool, tokens: Any, op: Any, *args: Any, **kwargs: Any
    ) -> Any:
        # Inside a HOP subgraph hopkit handles torch's own effects too (NOTE
        # [Effect tokens inside subgraphs] in hopkit/effects/_regions.py).
        if _registry.owns(op) or _regions.in_region():
            return handle_effects(allow_token_discovery, tokens, op, *args, **kwargs)
        return original(allow_token_discovery, tokens, op, *args, **kwargs)

    return route_handle_effects


def _is_hopkit_with_effects(node: Any) -> bool:
    return getattr(node, "op", None) == "call_function" and node.target is with_effects


def _is_with_effects(original: Any) -> Any:
    @functools.wraps(original)
    def is_with_effects(node: torch.fx.Node) -> bool:
        return _is_hopkit_with_effects(node) or bool(original(node))

    return is_with_effects


def _patch_force_save_effectful_ops(mod: types.ModuleType) -> None:
    _patch.patch_function(
        mod.__name__, "force_save_effectful_ops", functools.partial(_force_save_effectful_ops, mod),
        why="keep the partitioner from recomputing hopkit's effects",
    )


def _force_save_effectful_ops(mod: types.ModuleType, original: Any) -> Any:
    """torch 2.11-2.15 mark the outputs of effectful nodes MUST_SAVE, except
    in an activation-checkpointed region (recompute tag PREFER_RECOMPUTE), so
    a checkpointed effect runs again in backward. hopkit's effects are never
    recomputed: their tensor outputs are saved even inside a region. Only
    hopkit_with_effects nodes and the plain calls of :func:`_pinned_to_forward`
    are tagged; every other node is left to torch's original. Can go when the
    partitioner force-saves effects regardless of recompute tags."""
    from torch.utils.checkpoint import CheckpointPolicy

    @functools.wraps(original)
    def force_save_effectful_ops(joint_module: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        token_tags: list[tuple[torch.fx.Node, Any]] = []
        for node in joint_module.graph.nodes:
            # hopkit's mark of a BaseHOP joint's backward: the key of
            # tag_traced_nodes_as_backward in hopkit/base_hop/_tracing.py
            # (a string here: base_hop sits above effects).
            if mod._has_tag_is_backward(node) or node.meta.get("hopkit_joint_backward"):
                if _pinned_to_forward(node):
                    # The same kind of call made by the backward (an op's
                    # autograd formula logs its gradient): it is impure too,
                    # so forward extraction would copy it into the forward
                    # whenever it reads forward values only; pin it to the
                    # backward, where it runs once.
                    node.meta["partitioner_tag"] = "must_be_in_backward"
                continue
            if node.meta.get("partitioner_tag") == "must_be_in_backward":
                continue
            if _pinned_to_forward(node):
                # An effectful op called without a token: the joint graph of a
                # HOP's subgraph (step 3 of NOTE [Effect tokens inside
                # subgraphs] in hopkit/effects/_regions.py). It is impure, so
                # backward extraction would copy it into backward whenever its
                # inputs are saved: pin it to the forward and save its outputs
                # instead.
                node.meta["partitioner_tag"] = "must_be_in_forward"
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                continue
            if not _is_hopkit_with_effects(node):
                continue
            # The node itself: the min-cut solver bans recomputing MUST_SAVE
            # nodes (the default partitioner skips multi-output nodes here).
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            for user in node.users:
                if user.target is not operator.getitem:
                    continue
                if user.args[1] == 0:
                    token_tags.append((user, user.meta.get("recompute")))
                elif isinstance(user.meta.get("val"), torch.Tensor):
                    user.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        result = original(joint_module, *args, **kwargs)
        # torch marks the token output MUST_SAVE too. Outside checkpointed
        # regions that only makes the default partitioner save a token that
        # backward never reads (and copy the effect into backward, where its
        # inputs are all saved); untag it there. Inside a region the min-cut
        # solver needs the tag (a recompute-tagged token must be recomputed).
        for user, tag in token_tags:
            if tag is None:
                user.meta.pop("recompute", None)
        return result

    return force_save_effectful_ops


def _pinned_to_forward(node: Any) -> bool:
    """A plain (token-less) call that the partitioner must keep in forward: of
    an op that hopkit's registry gives an effect, anywhere; of one of torch's
    own effectful ops (aten::_print, torchbind), only while a HOP partitions
    its subgraph's joint (``subgraph_joint_partition``). Every other node is
    left to torch's original exactly."""
    target = node.target
    if (
        node.op != "call_function"
        or not isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator))
        or target is with_effects
        or _registry.aliases(target)
    ):
        return False
    if _registry.hopkit_effect(target) is not None:
        return True
    return _regions.in_subgraph_joint_partition() and _registry.threads_effects(target)


def _hopkit_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is with_effects]


def _unlift_tokens(original: Any) -> Any:
    """torch's unlift_tokens finds token inputs/outputs by walking from
    `with_effects` nodes. hopkit's nodes are presented to it as torch's for the
    duration of the call (same calling convention: token first, op second,
    token first in the outputs) and given back their target afterwards."""

    @functools.wraps(original)
    def unlift_tokens(*args: Any, **kwargs: Any) -> Any:
        roots = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.fx.GraphModule)]
        swapped = [(gm, node) for gm in _fx.graph_modules(roots) for node in _hopkit_nodes(gm)]
        if not swapped:
            return original(*args, **kwargs)
        torch_we = _torch_with_effects()
        for _, node in swapped:
            node.target = torch_we
        try:
            return original(*args, **kwargs)
        finally:
            touched: dict[int, torch.fx.GraphModule] = {}
            for gm, node in swapped:
                node.target = with_effects
                touched[id(gm)] = gm
            for gm in touched.values():
                gm.recompile()

    return unlift_tokens


def _should_save_eager_input_vals(original: Any) -> Any:
    # torch answers False for its with_effects (the lowering does not propagate
    # eager input values); hopkit's HOP is lowered the same way.
    @functools.wraps(original)
    def should_save(target: Any, args_kwargs: Any = None) -> bool:
        if target is with_effects:
            return False
        return bool(original(target, args_kwargs))

    return should_save


def _remove_effect_tokens(original: Any) -> Any:
    """ep.module() / unflatten remove effect tokens from a program. First turn
    every hopkit_with_effects(token, op, *args) back into op(*args), joining the
    token chain around it; then let torch's pass handle its own with_effects
    nodes and the graph signature. If no torch effect node is left to carry
    the chain, drop the token inputs/outputs here (torch's pass finds them only
    through its own nodes). A program without hopkit_with_effects goes to
    torch's pass untouched."""

    @functools.wraps(original)
    def remove_effect_tokens(ep: Any) -> Any:
        if any(_hopkit_nodes(m) for m in _fx.graph_modules([ep.graph_module])):
            _inline_hopkit_with_effects(ep)
        return original(ep)

    return remove_effect_tokens


def _inline_hopkit_with_effects(ep: Any) -> None:
    from torch.export.graph_signature import InputKind, OutputKind

    gm = ep.graph_module
    torch_we = _torch_with_effects()
    with gm._set_replace_hook(ep.graph_signature.get_replace_hook()):
        for module in list(_fx.graph_modules([gm])):
            nodes = _hopkit_nodes(module)
            if not nodes:
                continue
            for node in nodes:
                _inline_one(module, node)
            chain_left = any(
                n.op == "call_function"
                and (n.target is torch_we or n.target is torch.ops.higher_order.invoke_subgraph)
                for n in module.graph.nodes
            )
            if module is gm and not chain_left:
                out_names = [
                    s.arg.name for s in ep.graph_signature.output_specs if s.kind == OutputKind.TOKEN
                ]
                in_names = {
                    s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.TOKEN
                }
                output = next(reversed(module.graph.find_nodes(op="output")))
                outs = list(output.args[0])
                head = [getattr(o, "name", None) for o in outs[: len(out_names)]]
                if head != out_names:
                    raise RuntimeError(
                        "hopkit: cannot remove effect tokens: expected the "
                        f"program's first outputs to be its tokens {out_names}, "
                        f"got {head}."
                    )
                output.args = (tuple(outs[len(out_names) :]),)
                for ph in list(module.graph.find_nodes(op="placeholder")):
                    if ph.name in in_names and not ph.users:
                        module.graph.erase_node(ph)
            module.recompile()


def _inline_one(module: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    token, func, *fargs = node.args
    val = node.meta.get("val")
    # As in the dense rule: a HOP's tuple of outputs was spread after the
    # token, an op's outputs were spread when its schema has several returns.
    if isinstance(func, torch._ops.HigherOrderOperator):
        single = False
    else:
        single = len(func._schema.returns) <= 1  # type: ignore[union-attr]
    with module.graph.inserting_before(node):
        new = module.graph.call_function(func, tuple(fargs), dict(node.kwargs))  # type: ignore[arg-type]
    for k, v in node.meta.items():
        new.meta[k] = v
    if "unbacked_bindings" in node.meta:  # drop the token's level of the paths
        new.meta["unbacked_bindings"] = {
            s: path[1:] if path else path for s, path in node.meta["unbacked_bindings"].items()
        }
    if isinstance(val, (tuple, list)):
        new.meta["val"] = val[1] if single else tuple(val[1:])
    for user in list(node.users):
        if user.op != "call_function" or user.target is not operator.getitem:
            raise RuntimeError(
                f"hopkit: unexpected use {user.format_node()} of {node.name}; "
                "with_effects outputs are read with getitem only."
            )
        idx = user.args[1]
        if idx == 0:
            user.replace_all_uses_with(token)  # type: ignore[arg-type]
            module.graph.erase_node(user)
        elif single:
            user.replace_all_uses_with(new)
            module.graph.erase_node(user)
        else:
            user.args = (new, idx - 1)  # type: ignore[operator]
    module.graph.erase_node(node)
