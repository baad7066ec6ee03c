"""BaseHOP inside activation checkpointing (torch.utils.checkpoint): the rules.

    checkpoint(region, x, use_reentrant=False, context_fn=...)  # region calls hop(g, x)

The rules of a BaseHOP under selective activation checkpointing's two
dispatch modes, ``_CachingTorchDispatchMode`` (the region's forward) and
``_CachedTorchDispatchMode`` (its recomputation in backward), which torch's
``tag_activation_checkpoint`` also pushes for a plain ``checkpoint`` under
``torch.compile`` (2.12+). See NOTE [BaseHOP under activation checkpointing].
Registered by ``BaseHOP._register_rules`` through ``register_checkpoint_rules``.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree

from hopkit import _dispatch, _patch

__all__ = ["register_checkpoint_rules", "inlines_in_eager", "without_checkpoint_tags"]

# NOTE [BaseHOP under activation checkpointing]
# Selective activation checkpointing (SAC) runs a checkpointed region under a
# caching dispatch mode that asks a policy, per op, whether to save the op's
# outputs or recompute the op in backward, and the recomputation under a
# cached mode that hands saved outputs back. Under torch.compile the same
# modes run while AOTAutograd traces the region (torch's
# tag_activation_checkpoint pushes them, from 2.12 on also for a plain
# ``checkpoint`` with an always-recompute policy); there the policy's answer
# becomes each node's ``meta["recompute"]`` (with ``meta["ac_graph_id"]``)
# and the partitioner does the recomputing.
#
# A BaseHOP call under these modes:
#
# * where nothing traces (eager), the body runs inline under the mode, as for
#   any mode without a rule (NOTE [BaseHOP in eager under modes and
#   subclasses] in hopkit/base_hop): the policy sees each of the body's ops,
#   and effectful ops among them are handled as anywhere else in eager (NOTE
#   [Effects under activation checkpointing] in hopkit/effects/_checkpoint.py).
#   ``inlines_in_eager`` tells BaseHOP's autograd rule so.
# * while a trace records (torch.compile, make_fx, export), the HOP goes
#   through the mode's own ``__torch_dispatch__`` with the HOP as ``func``, as
#   torch does for its own HOPs (flex_attention, invoke_subgraph): the HOP
#   stays one node, the policy is asked once for the whole call
#   (``policy(ctx, hop, *args, **config)``), and the node gets its answer as
#   its recompute tag. A HOP node tagged for recomputation is recomputed as a
#   whole in backward (the partitioner duplicates the node, so its body runs
#   again); one tagged to be saved keeps its outputs.
# * a HOP whose body calls an effectful op is threaded by effect tokens
#   (NOTE [Effect tokens inside subgraphs] in hopkit/effects/_regions.py): its
#   node is a with_effects node, which the partitioner always saves
#   (_force_save_effectful_ops in hopkit/effects/_torch_integration.py), so
#   the effect runs once per call whatever the policy prefers; a policy that
#   answers MUST_RECOMPUTE for such a HOP is refused with an error naming the
#   HOP, as it is for an effectful op.
# * hopkit's own traces inside the call (the joint graph of NOTE [BaseHOP
#   autograd: one joint trace, partitioned]) are recorded without the
#   region's tags (``without_checkpoint_tags``): that joint is partitioned
#   with no recomputation, and a "recompute" tag on its nodes (torch 2.11
#   puts one on every node of a plain compiled ``checkpoint`` region, through
#   fx.traceback's preserved node meta) would send it to the min-cut
#   partitioner, which cannot split it. Recomputing is decided once, for the
#   HOP node of the outer graph.

_CHECKPOINT = "torch.utils.checkpoint"

# torch.utils.checkpoint's SAC mode types, once it is imported.
_sac_modes: tuple[type, ...] = ()


def inlines_in_eager(mode: Any) -> bool:
    """Whether ``mode`` has a BaseHOP rule that only applies while a trace records.

    Where nothing traces, BaseHOP runs its body inline under such a mode, as
    under a mode with no rule (NOTE [BaseHOP under activation checkpointing]).
    """
    return bool(_sac_modes) and type(mode) in _sac_modes


_TAGS = ("recompute", "ac_graph_id")


@contextlib.contextmanager
def without_checkpoint_tags() -> Iterator[None]:
    """Trace hopkit's own graphs with no activation checkpointing tags.

    NOTE [BaseHOP under activation checkpointing]. The tags go back on
    ``torch.fx.traceback.current_meta`` afterwards, for the nodes of the
    outer graph that follow.
    """
    import torch.fx.traceback as fx_traceback

    meta = fx_traceback.current_meta
    saved = {k: meta.pop(k) for k in _TAGS if k in meta}
    try:
        yield
    finally:
        meta.update(saved)


def register_checkpoint_rules(hop: Any) -> None:
    """Register ``hop``'s rules for torch's selective checkpointing modes.

    NOTE [BaseHOP under activation checkpointing]. torch.utils.checkpoint is
    imported by ``import torch`` in 2.11-2.15; the rules go in when (and if)
    it is, without importing anything new.
    """
    _patch.when_imported(_CHECKPOINT, functools.partial(_register, hop),
                         why="give hopkit HOPs rules under selective activation checkpointing")


def _register(hop: Any, mod: types.ModuleType) -> None:
    global _sac_modes
    caching = getattr(mod, "_CachingTorchDispatchMode", None)
    cached = getattr(mod, "_CachedTorchDispatchMode", None)
    if caching is None or cached is None:
        return  # not in torch 2.11-2.15; then no such mode can reach the HOP
    _sac_modes = (caching, cached)
    hop.py_impl(caching)(functools.partial(base_hop_sac_forward, hop))
    hop.py_impl(cached)(functools.partial(base_hop_sac_recompute, hop))


# ---------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------


def base_hop_sac_forward(hop: Any, mode: Any, /, *args: Any, **kwargs: Any) -> Any:
    """The call in a checkpointed region's forward (``mode`` popped by torch).

    Eager: the body inline under ``mode``. Traced: one node, tagged with the
    policy's answer for the HOP.
    """
    if not _dispatch.tracing_underway():
        return _inline(hop, mode, args, kwargs)
    tracer = _tracer()
    before = len(tracer.graph.nodes) if tracer is not None else 0
    out = mode.__torch_dispatch__(hop, [], args, kwargs)
    if tracer is not None:
        _refuse_recomputing_effects(hop, tracer, before)
    return out


def base_hop_sac_recompute(hop: Any, mode: Any, /, *args: Any, **kwargs: Any) -> Any:
    """The call in a checkpointed region's recomputation (``mode`` popped).

    Eager: the body inline under ``mode`` (each op replayed or recomputed as
    the forward's policy said). Traced: the HOP's saved outputs, or the HOP
    called again, as the mode decides for any op.
    """
    if not _dispatch.tracing_underway():
        return _inline(hop, mode, args, kwargs)
    return mode.__torch_dispatch__(hop, [], args, kwargs)


def _inline(hop: Any, mode: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # A function-level import: hopkit.base_hop imports this module.
    from hopkit.base_hop import base_hop_dense

    with mode:
        return base_hop_dense(hop, *args, **kwargs)


def _tracer() -> Any:
    """The tracer of the graph being recorded (make_fx's PythonKeyTracer), if any."""
    mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY)
    tracer = getattr(mode, "tracer", None)
    return tracer if isinstance(getattr(tracer, "graph", None), torch.fx.Graph) else None


def _refuse_recomputing_effects(hop: Any, tracer: Any, before: int) -> None:
    """A HOP threaded by effect tokens must not be tagged MUST_RECOMPUTE.

    The call's nodes are those the trace recorded since ``before``; torch has
    tagged them with the policy's answer by now.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    for node in list(tracer.graph.nodes)[before:]:
        if node.op != "call_function" or not _is_with_effects(node.target):
            continue
        if node.meta.get("recompute") == CheckpointPolicy.MUST_RECOMPUTE:
            raise RuntimeError(
                f"hopkit: the selective activation checkpointing policy returned "
                f"CheckpointPolicy.MUST_RECOMPUTE for {hop._name}, whose subgraph "
                f"calls an effectful op ({_effect_names(tracer.root, node)}); "
                f"recomputing the HOP would run that side effect again in "
                f"backward. Return MUST_SAVE or PREFER_SAVE for {hop._name} "
                f"(PREFER_RECOMPUTE keeps its outputs saved too), or move the "
                f"effectful op out of the checkpointed region."
            )


def _is_with_effects(target: Any) -> bool:
    from hopkit.effects._hop import with_effects

    return target is with_effects or target is getattr(
        torch.ops.higher_order, "with_effects", None)


def _effect_names(root: Any, node: torch.fx.Node) -> str:
    """The effectful ops a with_effects(token, hop, subgraph, ...) node's body calls."""
    from hopkit.effects._registry import display_name, get_effect

    names: list[str] = []

    def visit(gm: Any) -> None:
        if not isinstance(gm, torch.fx.GraphModule):
            return
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                visit(getattr(gm, str(n.target), None))
            elif n.op == "call_function" and get_effect(n.target) is not None:
                names.append(display_name(n.target))

    for arg in pytree.tree_leaves(node.args):
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            visit(getattr(root, str(arg.target), None))
    return ", ".join(dict.fromkeys(names)) or "an effectful call"
