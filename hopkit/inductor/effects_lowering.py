"""Inductor lowering of ``hopkit_with_effects``: the op's kernels, chained in effect order.

Registered in torch._inductor.lowering.lowerings (torch 2.11-2.15 look
lowerings up there by target), through hopkit._patch, when (and if)
Inductor's lowering module is imported after hopkit.effects' first use
(hopkit/effects/_torch_integration.py:install). This module imports no
Inductor module at import time: the registration runs in the middle of
Inductor's own import. The version-dependent pieces (``order_after``,
``pin_effectful_inputs``, ``wrap_ir_for_lowering``) are hopkit._compat's.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from hopkit import _compat, _patch
from hopkit.effects._hop import with_effects
from hopkit.effects._registry import get_effect, threads_effects

__all__ = ["register_inductor_lowering"]

_INDUCTOR_LOWERING = "torch._inductor.lowering"
_ENTRY = f"{_INDUCTOR_LOWERING}.lowerings[{with_effects.__name__!r}]"
_registered: _patch.Patch | None = None


def register_inductor_lowering() -> None:
    """Register :func:`lower_with_effects` as ``hopkit_with_effects``' lowering
    when Inductor's lowering module is imported (now, if it is)."""
    _patch.when_imported(_INDUCTOR_LOWERING, _register,
                         why=f"register the Inductor lowering of {with_effects.__name__}")


def _register(mod: types.ModuleType) -> None:
    global _registered
    if _registered is not None and _registered.live:
        return  # installed again (after a partial undo) while still in place
    # register_lowering wraps the rule (argument unpacking, IR checks) and
    # writes it into the table itself; take it out again, so that set_entry
    # records the table as it was and its undo restores exactly that.
    had_entry, previous = with_effects in mod.lowerings, mod.lowerings.get(with_effects)
    mod.register_lowering(with_effects, type_promotion_kind=None)(lower_with_effects)
    registered = mod.lowerings.pop(with_effects)
    if had_entry:
        mod.lowerings[with_effects] = previous
    _registered = _patch.set_entry(mod.lowerings, with_effects, registered, name=_ENTRY)


def lower_with_effects(token: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Lower `op` itself, then chain every operation it created behind the
    previous operation of the same effect (a StarDep) and mark them as having
    side effects, so the scheduler neither reorders nor removes them. Mirrors
    torch's lowering of its with_effects (torch/_inductor/lowering.py)."""
    import torch.utils._pytree as pytree
    from torch._inductor import ir
    from torch._inductor.lowering import lowerings
    from torch._inductor.virtualized import V

    effect = get_effect(op)
    node = V.graph.current_node
    if effect is not None:
        _compat.pin_effectful_inputs(pytree.tree_leaves((args, kwargs)))
    n_before = len(V.graph.operations)
    if op in lowerings:
        result = lowerings[op](*args, **kwargs)
        pytree.tree_map_only(ir.TensorBox, lambda a: a.realize(), result)
    else:
        with _seen_as_torch_with_effects(node):
            kernel_out = ir.FallbackKernel.create(op, *args, **kwargs)
        result = pytree.tree_map(
            lambda x: _compat.wrap_ir_for_lowering(x) if isinstance(x, ir.IRNode) else x,
            kernel_out,
        )
    new_ops: list[Any] = list(V.graph.operations[n_before:])
    if not new_ops:
        raise RuntimeError(
            f"hopkit: lowering {op} inside hopkit_with_effects created no "
            "operation, so its effect cannot be ordered; give the op a lowering "
            "that creates a buffer, or let it fall back (remove its lowering)."
        )
    if effect is not None:
        # Every new operation waits for the previous effect; inside a HOP's
        # inlined subgraph the effectful kernels also wait for each other, in
        # the order the subgraph calls them (NOTE [Effect tokens inside
        # subgraphs] in hopkit/effects/_regions.py). torch's own effectful ops
        # there (aten::_print) count too: they share the token chain (NOTE
        # [One token chain for torch's and hopkit's effects] in
        # hopkit/effects/_registry.py).
        effectful_ops: dict[Any, Any] = V.graph.effectful_ops
        prev = effectful_ops.get(effect)
        for new_op in new_ops:
            new_op.has_side_effects = lambda: True
            if prev is not None:
                _compat.order_after(new_op, prev)
            if threads_effects(getattr(new_op, "op_overload", None)):
                prev = new_op
        effectful_ops[effect] = new_ops[-1]
    # The same framing as the dense rule: a HOP's tuple of outputs is spread,
    # an op's outputs are spread when its schema has several returns.
    if isinstance(op, torch._ops.HigherOrderOperator):
        spread = isinstance(result, (tuple, list))
    else:
        spread = len(op._schema.returns) > 1
    return (token, *result) if spread else (token, result)


class _seen_as_torch_with_effects:
    """FallbackKernel strips the token from the FX node's metadata (for
    unbacked symbols) only when the node's target is torch's with_effects; show
    it that target while the kernel is created, if the node has such symbols."""

    def __init__(self, node: Any) -> None:
        self.node = node if node is not None and node.meta.get("unbacked_bindings") else None
        self.target: Any = None

    def __enter__(self) -> None:
        if self.node is not None:
            self.target = self.node.target
            self.node.target = torch.ops.higher_order.with_effects

    def __exit__(self, *exc: object) -> None:
        if self.node is not None:
            self.node.target = self.target
