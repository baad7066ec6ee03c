"""Version shims, and nothing else: where torch 2.11 through 2.15 differ.

hopkit supports torch 2.11 through 2.15. Each function below papers over one
difference between those releases; its docstring names the releases that
need it and when it can go. Every version check asks :func:`torch_at_least`.
This module is the bottom layer: it imports nothing from hopkit. What hopkit
changes in torch lives in hopkit/_patch.py; how each family plugs into torch
lives with the family.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "TORCH_VERSION",
    "find_inductor_lowering",
    "inductor_falls_back_on_types",
    "order_after",
    "owning_bindings_hold_tensors_by_value",
    "pin_effectful_inputs",
    "torch_at_least",
    "warn_missing_torch_symbol",
    "wrap_ir_for_lowering",
    "wrapped_node_parts",
]


def _release(version: str) -> tuple[int, ...]:
    """``"2.14.1+cu130"`` -> ``(2, 14, 1)``; pre-release tags (``2.15.0a0``) count as the release."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    return tuple(parts)


TORCH_VERSION: tuple[int, ...] = _release(torch.__version__)


def warn_missing_torch_symbol(symbol: str, consequence: str) -> None:
    """A torch internal a shim expected is gone: say so, and carry on without it.

    Raising here would break torch's own import (the shims run from import
    hooks), so hopkit degrades and names the symbol instead.
    """
    warnings.warn(
        f"hopkit: torch {torch.__version__} has no {symbol}, which hopkit expected for "
        f"this release; {consequence}. Please report this to hopkit.",
        RuntimeWarning,
        stacklevel=2,
    )


def torch_at_least(version: str) -> bool:
    """Whether the running torch is release ``version`` or newer (``"2.13"``, ``"2.14.1"``).

    The one version check in hopkit: every shim that differs between releases
    asks this, so the supported window (2.11 through 2.15) is visible in one
    grep. Nightlies count as the release they lead to.
    """
    want = _release(version)
    return TORCH_VERSION[: len(want)] >= want

# ---------------------------------------------------------------------------
# Dynamo
# ---------------------------------------------------------------------------


def wrapped_node_parts(result: Sequence[Any]) -> tuple[Any, Any, Any, Any, Any]:
    """``(proxy_args, proxy_kwargs, example_value, body_r, output_vts)`` of
    ``WrapHigherOrderVariable.create_wrapped_node``'s result.

    torch 2.11 returns 7 values; 2.12-2.15 append a ``tracing_info``. The
    first seven mean the same in every release of the window (the 5th and
    6th, the body's GraphModule and name, are not needed). Can go when hopkit
    requires torch >= 2.12.
    """
    p_args, p_kwargs, example_value, body_r, _, _, output_vts = result[:7]
    return p_args, p_kwargs, example_value, body_r, output_vts


# ---------------------------------------------------------------------------
# Inductor: ordering effectful operations
# ---------------------------------------------------------------------------


def order_after(new_op: Any, prev: Any) -> None:
    """Make the scheduler run Inductor operation ``new_op`` after ``prev``.

    torch 2.11-2.14 express an effect's order as a StarDep
    (`GraphLowering.additional_star_deps`, keyed by the operation's name);
    torch 2.15 removed that table and orders effects with a weak, fake
    dependency (`additional_buffer_deps`, keyed by `get_operation_name()`),
    which does not extend the previous buffer's lifetime. hopkit follows
    whichever the running torch's own with_effects lowering uses.
    """
    from torch._inductor.virtualized import V

    graph: Any = V.graph  # typed Any: each table exists only in some releases
    if torch_at_least("2.15"):
        graph.additional_buffer_deps[new_op.get_operation_name()].add(prev.get_name())
    else:
        graph.additional_star_deps[new_op.get_name()].add(prev.get_name())


def pin_effectful_inputs(leaves: Sequence[Any]) -> None:
    """Never recycle the storage of an effectful op's tensor inputs.

    torch 2.15 does this in its with_effects lowering: an effectful op may keep
    its inputs alive in state Inductor cannot see (a torchbind queue), so
    their buffers must not be reused for other buffers. Older releases have
    no `never_reuse_but_free_buffers` and do not pin.
    """
    from torch._inductor.ir import TensorBox
    from torch._inductor.virtualized import V

    if not torch_at_least("2.15"):
        return
    graph: Any = V.graph  # typed Any: the set exists from torch 2.15 on
    for leaf in leaves:
        if isinstance(leaf, TensorBox):
            leaf.realize()
            graph.never_reuse_but_free_buffers.add(leaf.get_name())


def wrap_ir_for_lowering(node: Any) -> Any:
    """What a lowering returns for a fallback kernel's IR output.

    torch 2.12+ ask the node (`IRNode.wrap_for_lowering`: a TensorBox, or the
    node itself for opaque multi-outputs); torch 2.11 has no such method and
    wraps every IR output in a TensorBox, as its own with_effects lowering
    does. Can go when hopkit requires torch >= 2.12.
    """
    if torch_at_least("2.12"):
        return node.wrap_for_lowering()
    from torch._inductor.ir import TensorBox

    return TensorBox.create(node)



# ---------------------------------------------------------------------------
# inductor (pointwise subgraph lowering)
# ---------------------------------------------------------------------------
# hopkit.inductor reaches Inductor's lowering tables only through these two
# functions. They import Inductor lazily so that ``import hopkit`` stays lean.


def find_inductor_lowering(target: object) -> Callable[..., Any] | None:
    """The lowering Inductor's GraphLowering would run for ``target``, or None.

    torch 2.12+ keep user-registered lowerings in a separate
    ``torch._inductor.lowering.user_lowerings`` table that takes priority and
    may return None to defer to the built-in lowering; torch 2.11 has only
    the built-in table. The branch can go once hopkit requires torch >= 2.12.
    """
    from torch._inductor import lowering

    user_table: dict[Any, Any] = (
        getattr(lowering, "user_lowerings") if torch_at_least("2.12") else {}
    )
    try:
        builtin = lowering.lowerings.get(target)  # type: ignore[call-overload]
        user = user_table.get(target)
    except TypeError:  # an unhashable target has no lowering
        return None
    if user is None:
        return builtin

    def user_then_builtin(*args: Any, **kwargs: Any) -> Any:
        out = user(*args, **kwargs)
        if out is None and builtin is not None:
            out = builtin(*args, **kwargs)
        return out

    return user_then_builtin


def inductor_falls_back_on_types(node: torch.fx.Node) -> bool:
    """Whether GraphLowering would send ``node`` to an eager fallback kernel
    because of its dtypes (complex, ...), before looking at its lowering.

    ``fallback_node_due_to_unsupported_type`` is a private helper of
    ``torch._inductor.lowering`` (present 2.11 through 2.15); without it we
    assume no type-based fallback.
    """
    from torch._inductor import lowering

    check = getattr(lowering, "fallback_node_due_to_unsupported_type", None)
    return bool(check(node)) if check is not None else False


# ---------------------------------------------------------------------------
# functionalization (ViewMeta)
# ---------------------------------------------------------------------------


def owning_bindings_hold_tensors_by_value() -> bool:
    """Whether torchgen's owning C++ bindings (``remove_non_owning_ref_types``,
    the fields of a generated ViewMeta class) spell Tensor, Scalar and their
    optionals by value (``at::Tensor``) rather than as const references.

    torch 2.14 changed this (torchgen/api/cpp.py); 2.11-2.13 keep
    ``const at::Tensor &``. Can go when hopkit requires torch >= 2.14.
    """
    return torch_at_least("2.14")



# ---------------------------------------------------------------------------
# activation checkpointing (hopkit.effects)
# ---------------------------------------------------------------------------


def non_reentrant_checkpoint_generator_name() -> str:
    """The name, in ``torch.utils.checkpoint``, of the generator that sets up
    non-reentrant checkpointing (``context_fn``, recomputation hooks) and that
    ``checkpoint`` looks up at call time.

    torch 2.14 moved the body to ``_checkpoint_without_reentrant_generator_impl``
    (taking the region's args/kwargs as explicit parameters) and kept the old
    name as a shim that ``checkpoint`` no longer calls; 2.11-2.13 have only
    ``_checkpoint_without_reentrant_generator``. Can go when hopkit requires
    torch >= 2.14.
    """
    if torch_at_least("2.14"):
        return "_checkpoint_without_reentrant_generator_impl"
    return "_checkpoint_without_reentrant_generator"


# ---------------------------------------------------------------------------
# FX code generation (hopkit.base_hop configuration)
# ---------------------------------------------------------------------------


def fx_codegen_constant_check_name() -> str:
    """The name under which ``torch.fx.graph`` binds the check its code
    generator asks whether a value is an opaque constant it writes with
    ``get_opaque_obj_repr`` (hopkit rebinds it: hopkit/base_hop/_config.py).

    torch 2.14 renamed it ``is_opaque_constant_type``; 2.11-2.13 call it
    ``is_opaque_value_type``. Can go when hopkit requires torch >= 2.14.
    """
    if torch_at_least("2.14"):
        return "is_opaque_constant_type"
    return "is_opaque_value_type"


def frozen_dataclass_field_variable(vt: Any, name: str) -> Any:
    """The VariableTracker of field ``name`` of Dynamo's ``FrozenDataClassVariable``.

    torch 2.11 keeps the fields' variables in ``vt.fields`` (a dict);
    2.12+ look them up with ``vt._get_field_vt(name)``. Can go when hopkit
    requires torch >= 2.12.
    """
    get = getattr(vt, "_get_field_vt", None)
    if get is not None:
        return get(name)
    return vt.fields[name]
