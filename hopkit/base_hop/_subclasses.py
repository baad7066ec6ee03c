"""BaseHOP calls on tensor subclass operands: rules, desugaring, fake stand-ins.

    hop(subgraph, TwoTensor(a, b), y)      # while a trace records, becomes
    a2, b2, out = hop(desugared, a, b, y)  # one node on the inner tensors
    # with desugared(a, b, y) = flatten(subgraph(TwoTensor(a, b), y))

What lives here: the Python-key rule for operands that are tensor subclasses
(``python_key_rule``, called from ``BaseHOP.dispatch``), the desugaring of a
call into a call on inner tensors, the fake stand-ins of subclass operands
(``fresh_example``) and the autograd plan traced on them
(``trace_autograd_plan``, called from ``_build_autograd_plan``). The rules
themselves stay in hopkit/base_hop/__init__.py.

NOTE [BaseHOP on tensor subclasses]
A tensor subclass with a ``__torch_dispatch__`` (torch's TwoTensor, DTensor, a
quantized weight) reaches a HOP call at the Python key. Where nothing traces,
the HOP runs its body right there (NOTE [BaseHOP in eager under modes and
subclasses] in hopkit/base_hop), so the subclass sees the body's ops as it
would the plain body's. Where a trace records (make_fx, AOTAutograd, export),
the HOP must stay one node, on plain tensors:

- A subclass with a rule of its own (``hop.py_impl(SubclassType)(rule)``,
  torch's ``python_key_table``) gets it, in eager and traced, before any of
  torch's modes' rules (as FakeTensorMode and ProxyTorchDispatchMode let a
  subclass handle an aten op first). The rule is called as torch calls one,
  ``rule(*leading, subgraph, *operands, **config)``, and may return
  NotImplemented to pass.
- A traceable wrapper subclass (``__tensor_flatten__`` /
  ``__tensor_unflatten__``) with no rule is desugared: each such operand is
  flattened into its inner tensors (recursively), the HOP is called on them
  with a body that rebuilds the subclasses (``__tensor_unflatten__`` with the
  recorded context, outer size and stride), runs the subgraph and flattens its
  outputs, and the outputs are rebuilt from the structure that body recorded
  when it ran (every rule of the inner call runs or traces its body once; the
  body is a fresh object, which trace reuse never serves from a cache). The
  inner call is an ordinary HOP call on plain (functional, fake) tensors, so
  the AOT graph holds one HOP node on the inner tensors, exactly as
  AOTAutograd's own subclass handling desugars aten ops.
- Any other subclass (a ``__torch_dispatch__`` subclass without
  ``__tensor_flatten__``) is refused under tracing with an error naming the
  HOP, the subclass and the hook.

Autograd: the subclass is what requires grad (its inner tensors do not), so
the joint of a traced call is traced on fake subclass stand-ins of the
operands (``fresh_example``: fresh fake inner tensors, rebuilt with the
operand's own flatten context), with tangents shaped like the outputs (the
same subclass). make_fx records such a trace at the subclass level (its
placeholders are the subclasses), and the body's Python sees the subclass (a
DTensor's ``placements``, ``redistribute``). The partitioned forward and
backward graphs are then called on the subclass operands, and those calls
desugar as above. A joint on subclass stand-ins is never shared between calls
(trace reuse cannot describe a subclass's state, e.g. a DTensor's placements).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

if TYPE_CHECKING:
    from hopkit.base_hop import BaseHOP, _AutogradPlan

__all__ = [
    "fresh_example",
    "has_wrapper_subclass",
    "python_key_rule",
    "trace_autograd_plan",
    "user_subclasses",
]


def _torch_infra_types() -> tuple[type, ...]:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return (FakeTensor, FunctionalTensor)


def _is_user_subclass(x: Any, infra: tuple[type, ...]) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and type(x) not in (torch.Tensor, torch.nn.Parameter)
        and not isinstance(x, infra)
        and type(x).__torch_dispatch__ is not torch._C._disabled_torch_dispatch_impl
    )


def user_subclasses(operands: Sequence[Any]) -> list[type]:
    """The types of operands that are a user's ``__torch_dispatch__`` subclass, in order."""
    infra = _torch_infra_types()
    found: list[type] = []
    for x in operands:
        if _is_user_subclass(x, infra) and type(x) not in found:
            found.append(type(x))
    return found


def has_wrapper_subclass(operands: Sequence[Any]) -> bool:
    """Whether an operand is a traceable wrapper subclass (not fake, not functional)."""
    infra = _torch_infra_types()
    return any(_is_user_subclass(x, infra) and is_traceable_wrapper_subclass(x) for x in operands)


# ---------------------------------------------------------------------------
# The Python key
# ---------------------------------------------------------------------------


def python_key_rule(hop: BaseHOP, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The call at the Python key for subclass operands, or NotImplemented.

    NotImplemented where no operand is a user's subclass, or where a user's
    dispatch mode is the current mode (torch's dispatch gives it its rule
    first, and the eager rule handles the rest): NOTE [BaseHOP on tensor
    subclasses].
    """
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    mode = _get_current_dispatch_mode()
    if mode is not None and getattr(mode, "_mode_key", None) is None:
        return NotImplemented
    leading, subgraph, operands = hop._split(args)
    types = user_subclasses(operands)
    if not types:
        return NotImplemented
    if _tracked_by_tracer(operands):
        # make_fx (also torch.export's pre-dispatch stage) traces these
        # subclass values themselves, as it records aten ops on them: the
        # proxy rule records the HOP at the subclass level too.
        return NotImplemented
    table = hop.python_key_table
    for t in types:
        rule = table.get(t)
        if rule is not None:
            res = rule(*args, **kwargs)
            if res is not NotImplemented:
                return res
    unruled = [t for t in types if t not in table]
    if not unruled:
        return NotImplemented  # every rule passed: torch's dispatch says so
    refused = [t for t in unruled if not _is_traceable_type(t)]
    if refused:
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        from hopkit import _dispatch

        if not (_dispatch.tracing_underway() or isinstance(mode, FunctionalTensorMode)):
            return NotImplemented  # no trace records: torch's own dispatch
        raise _refusal(hop, refused[0])
    flatten = {i for i, x in enumerate(operands) if type(x) in unruled}
    return _desugared_call(hop, leading, subgraph, operands, kwargs, flatten)


def _tracked_by_tracer(operands: Sequence[Any]) -> bool:
    """Whether the recording tracer has a proxy for a subclass operand itself."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode, has_proxy_slot

    mode = get_proxy_mode()
    if mode is None:
        return False
    infra = _torch_infra_types()
    return any(_is_user_subclass(x, infra) and has_proxy_slot(x, mode.tracer) for x in operands)


def _is_traceable_type(t: type) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass_type as check

    return bool(check(t))


def _refusal(hop: BaseHOP, t: type) -> NotImplementedError:
    name = f"{t.__module__}.{t.__qualname__}"
    return NotImplementedError(
        f"hopkit: {hop._name} was called on an operand of the tensor subclass {name} "
        f"while a graph is traced, and {t.__qualname__} is neither a traceable wrapper "
        f"subclass (it has __torch_dispatch__ but no __tensor_flatten__ / "
        f"__tensor_unflatten__, so hopkit cannot see its inner tensors) nor given a rule "
        f"for this HOP. Implement __tensor_flatten__ and __tensor_unflatten__ on "
        f"{t.__qualname__}, or register a rule: "
        f"@{hop._name}.py_impl({t.__qualname__}) def rule(subgraph, *operands, **config): ... "
        f"(it receives the call's arguments and returns its outputs)."
    )


# ---------------------------------------------------------------------------
# Desugaring: the call on inner tensors
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Structure:
    """How to rebuild one subclass tensor from its flattened inner tensors."""

    cls: Any  # a traceable wrapper subclass (torch types its protocol loosely)
    attrs: tuple[str, ...]
    ctx: Any
    outer_size: Any
    outer_stride: Any
    # None: a plain inner tensor; _Constant: an inner value that is not a
    # tensor (a DTensor's device mesh, an opaque object under tracing), which
    # the desugared body closes over rather than taking as an operand
    inner: tuple[_Structure | _Constant | None, ...]


@dataclasses.dataclass(frozen=True)
class _Constant:
    value: Any


def _flatten(t: Any, leaves: list[Any]) -> _Structure | None:
    """Append ``t``'s plain tensors to ``leaves``; its structure (None: plain)."""
    if not (isinstance(t, torch.Tensor) and is_traceable_wrapper_subclass(t)
            and not isinstance(t, _torch_infra_types())):
        leaves.append(t)
        return None
    attrs, ctx = t.__tensor_flatten__()
    inner: list[_Structure | _Constant | None] = []
    for a in attrs:
        value = getattr(t, a)
        inner.append(_flatten(value, leaves) if isinstance(value, torch.Tensor)
                     else _Constant(value))
    return _Structure(type(t), tuple(attrs), ctx, t.size(), t.stride(), tuple(inner))


def _rebuild(s: _Structure | _Constant | None, leaves: Sequence[Any], at: int
             ) -> tuple[Any, int]:
    if s is None:
        return leaves[at], at + 1
    if isinstance(s, _Constant):
        return s.value, at
    inner = {}
    for a, sub in zip(s.attrs, s.inner):
        inner[a], at = _rebuild(sub, leaves, at)
    return s.cls.__tensor_unflatten__(inner, s.ctx, s.outer_size, s.outer_stride), at


@functools.cache
def _body_class() -> type:
    """The desugared body's class: a FunctionWithNoFreeVars that can be marked internal."""
    # base_hop imports this module, so its class is subclassed on first use.
    from hopkit.base_hop import FunctionWithNoFreeVars

    class DesugaredBody(FunctionWithNoFreeVars):
        __slots__ = ("_hopkit_internal",)

    return DesugaredBody


def _desugared_call(hop: BaseHOP, leading: tuple[Any, ...], subgraph: Any,
                    operands: Sequence[Any], kwargs: dict[str, Any], flatten: set[int]) -> Any:
    from hopkit.base_hop import _flat_outputs, _mark_internal

    flat: list[Any] = []
    layout: list[_Structure | None] = []
    for i, x in enumerate(operands):
        if i in flatten:
            layout.append(_flatten(x, flat))
        else:
            layout.append(None)
            flat.append(x)
    record: dict[str, Any] = {}

    def desugared(*inner: Any) -> tuple[Any, ...]:
        at, rebuilt = 0, []
        for s in layout:
            x, at = _rebuild(s, inner, at)
            rebuilt.append(x)
        out = subgraph(*rebuilt)
        outs = _flat_outputs(hop, out)
        leaves: list[Any] = []
        record["structure"] = [_flatten(o, leaves) for o in outs]
        record["single"] = not isinstance(out, (tuple, list))
        return tuple(leaves)

    body = _body_class()(desugared)
    body._hopkit_internal = False
    _mark_internal(body, like=subgraph)
    res = hop(*leading, body, *flat, **kwargs)
    if "structure" not in record:
        raise AssertionError(
            f"hopkit: {hop._name}'s desugared call on subclass operands returned "
            f"without running its body, so its outputs cannot be rebuilt; this is "
            f"a hopkit bug (NOTE [BaseHOP on tensor subclasses])."
        )
    res = res if isinstance(res, (tuple, list)) else (res,)
    at, outs = 0, []
    for s in record["structure"]:
        o, at = _rebuild(s, res, at)
        outs.append(o)
    return outs[0] if record["single"] else tuple(outs)


# ---------------------------------------------------------------------------
# Autograd: fake subclass stand-ins and the joint traced on them
# ---------------------------------------------------------------------------


def fresh_example(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A fresh fake stand-in of ``t``, of ``t``'s subclass: call under a fake mode.

    Each plain inner tensor becomes a fresh ``empty_strided`` of its metadata
    (so nothing of the caller's trace, functionalization or autograd history
    comes along), and the subclass is rebuilt around them with ``t``'s own
    flatten context, outer size and stride.
    """
    leaves: list[Any] = []
    structure = _flatten(t, leaves)
    fresh = [
        torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)
        if isinstance(x, torch.Tensor) else x
        for x in leaves
    ]
    out, _ = _rebuild(structure, fresh, 0)
    if requires_grad and t.requires_grad:
        out.requires_grad_()
    return out


def _tangent_like(o: Any) -> Any:
    """A contiguous tangent of ``o``'s kind (a subclass output gets the subclass)."""
    if not isinstance(o, torch.Tensor):
        return None
    if is_traceable_wrapper_subclass(o):
        return torch.empty_like(o, memory_format=torch.contiguous_format).detach()
    return torch.empty(o.shape, dtype=o.dtype, device=o.device)


def trace_autograd_plan(hop: BaseHOP, leading: tuple[Any, ...], subgraph: Any,
                        operands: Sequence[Any], kwargs: dict[str, Any]) -> _AutogradPlan:
    """The partitioned joint of a call with subclass operands, traced on stand-ins.

    BaseHOP's own ``_trace_autograd_plan`` (NOTE [BaseHOP autograd: one joint
    trace, partitioned]), with subclass stand-ins and tangents: NOTE [BaseHOP
    on tensor subclasses].
    """
    from hopkit.base_hop import _trace_autograd_plan

    return _trace_autograd_plan(hop, leading, subgraph, operands, kwargs,
                                stand_ins=_tracing_subclass_examples, tangent_like=_tangent_like)


@contextlib.contextmanager
def _tracing_subclass_examples(operands: Sequence[Any]) -> Iterator[tuple[list[Any], Any]]:
    """``_tracing.tracing_fresh_examples`` with stand-ins of the operands' subclasses."""
    from torch._dispatch.python import suspend_functionalization
    from torch._guards import detect_fake_mode
    from torch._higher_order_ops.utils import _maybe_reenter_make_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import disable_functional_mode
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    with suspend_functionalization(), disable_functional_mode(), disable_proxy_modes_tracing():
        fake_mode = detect_fake_mode([t for t in operands if isinstance(t, torch.Tensor)])
        if fake_mode is None:
            fake_mode = FakeTensorMode()
        with fake_mode:
            yield ([fresh_example(t, True) if isinstance(t, torch.Tensor) else t
                    for t in operands], _maybe_reenter_make_fx)
