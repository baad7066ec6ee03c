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
recursively, in one walk over the nodes. It is ``hopkit.export.inline_hops``
(``_inline.py``) restricted to ``wrap_with_autocast``, taking a graph and its
signature. Consumers that want no autocast at
all can instead run ``ep.run_decompositions()``, which traces the casts into
explicit ops.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.fx
from torch.export.graph_signature import ExportGraphSignature

from hopkit import _patch
from hopkit.export._autocast_hop import wrap_with_autocast
from hopkit.export._inline import inline_hop_calls
from hopkit.export._pass import _check_pass_args, _type_name, replace_autocast_with_hop_pass

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
    # inline_hops restricted to wrap_with_autocast, on a graph and its signature.
    return inline_hop_calls(
        "inline_autocast_hops_pass", gm, graph_signature, frozenset({wrap_with_autocast})
    )
