"""Which ops have which effect: ``register_effectful_op`` and the look-ups.

An op registered here (``register_effectful_op(op, EffectType.ORDERED)``) is
threaded through ``hopkit_with_effects`` (hopkit/effects/_hop.py) wherever
functionalization sees it; :func:`get_effect` reports hopkit's registration,
else torch's own registry. Every other module of hopkit.effects asks this one.

NOTE [One token chain for torch's and hopkit's effects]
hopkit's ``EffectType`` *is* torch's effect enum, so an op registered with
hopkit and one of torch's own effectful ops (``aten::_print``, torchbind
methods) share one token per effect type: their calls are ordered relative to
each other, in the AOT graph, in Inductor's scheduler and in exported programs.
Torch's own ops keep going through torch's ``with_effects``; only ops
registered here go through ``hopkit_with_effects``.

This module imports nothing from hopkit at module level (it is the bottom of
hopkit.effects); its first registration installs hopkit.effects' changes to
torch (hopkit/effects/_torch_integration.py).
"""

from __future__ import annotations

import threading
from typing import Any, Union

import torch

from hopkit import _patch
from torch._C import DispatchKey
from torch._ops import HigherOrderOperator, OpOverload, OpOverloadPacket

# torch 2.11-2.15: the enum lives next to torch's op registry.
from torch._library.effects import EffectType as _TorchEffectType

__all__ = [
    "EffectRegistrationHandle",
    "EffectType",
    "get_effect",
    "has_aliasing",
    "has_effects",
    "register_effectful_op",
]

#: The kinds of effect a token orders. ``EffectType.ORDERED``: calls happen in
#: program order. (torch's own enum; see NOTE [One token chain for torch's and
#: hopkit's effects].)
EffectType = _TorchEffectType

OpType = Union[HigherOrderOperator, OpOverload]
OpIdentifier = Union[str, OpOverload, OpOverloadPacket, HigherOrderOperator, Any]

# The registry key of hopkit's own HOP (hopkit/effects/_hop.py, which imports
# this module, so it is known here by key).
_WITH_EFFECTS_KEY = "higher_order::hopkit_with_effects"


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------

# NOTE [A stack of registrations per op]
# Every register_effectful_op call pushes one _Registration onto the stack of
# its key; its handle removes exactly that entry, wherever it sits in the
# stack. What hopkit reports for a key is the newest active registration, so
# destroying handles in any order ends with the state before all of them, and
# in between the state is that of the registrations still active, made in
# their order (as torch.library's handles behave).
# The FX side-effectful flag of each overload is derived the same way: its
# value before the first active registration that covers it, or-ed with
# "some active registration covering it has an effect"; when none covers it
# any more, that first value is put back.

# key -> active registrations, oldest first; a key is "ns::name" (every
# overload), "ns::name.overload" (one overload) or "higher_order::name" (a HOP).
_STACKS: dict[str, list[_Registration]] = {}
# key -> effect of the newest active registration (derived from _STACKS). A
# key mapped to None means "registered as having no effect", which overrides
# torch's own registry.
_REGISTRY: dict[str, Any] = {}
# overload -> whether FX treated it as side-effectful before the first active
# registration covering it.
_SIDE_EFFECTFUL_BEFORE: dict[Any, bool] = {}
# op -> (registered with hopkit?, effect); cleared whenever _REGISTRY changes.
# Functionalization asks this for every op it sees, so it must be cheap.
_LOOKUP_CACHE: dict[Any, tuple[bool, Any]] = {}
_REGISTRY_LOCK = threading.Lock()


class _Registration:
    """One register_effectful_op call: its key, effect and the overloads it
    covers."""

    __slots__ = ("key", "effect", "overloads")

    def __init__(self, key: str, effect: Any, overloads: list[Any]) -> None:
        self.key = key
        self.effect = effect
        self.overloads = overloads


def _push(entry: _Registration) -> None:
    with _REGISTRY_LOCK:
        _STACKS.setdefault(entry.key, []).append(entry)
        _refresh(entry)


def _remove(entry: _Registration) -> None:
    with _REGISTRY_LOCK:
        stack = _STACKS.get(entry.key, [])
        for i, e in enumerate(stack):
            if e is entry:
                del stack[i]
                break
        else:
            return
        _refresh(entry)


def _refresh(changed: _Registration) -> None:
    """Recompute what ``changed`` touches from the active registrations (see
    NOTE [A stack of registrations per op]). Called with the lock held."""
    stack = _STACKS.get(changed.key)
    if stack:
        _REGISTRY[changed.key] = stack[-1].effect
    else:
        _STACKS.pop(changed.key, None)
        _REGISTRY.pop(changed.key, None)
    _LOOKUP_CACHE.clear()
    for fn in changed.overloads:
        covering = [
            e for entries in _STACKS.values() for e in entries
            if any(o is fn for o in e.overloads)
        ]
        if not covering:
            if fn in _SIDE_EFFECTFUL_BEFORE:
                set_side_effectful(fn, _SIDE_EFFECTFUL_BEFORE.pop(fn))
            continue
        before = _SIDE_EFFECTFUL_BEFORE.setdefault(fn, is_side_effectful(fn))
        # A registration with an effect keeps an unused-result call alive
        # wherever the op appears *without* a token: Dynamo's graph, export's
        # training IR, ep.module().
        set_side_effectful(fn, before or any(e.effect is not None for e in covering))


def is_side_effectful(fn: Any) -> bool:
    """Whether FX dead-code elimination treats calls of fn as impure."""
    from torch.fx import node as fx_node

    return fn in fx_node._side_effectful_functions


def set_side_effectful(fn: Any, flag: bool) -> None:
    """Add ``fn`` to (or take it out of) FX's set of impure call targets.

    The set is a public-by-convention registry of torch.fx (torch 2.11-2.15);
    hopkit records each overload's value before its first registration and
    restores it (NOTE [A stack of registrations per op]).
    """
    from torch.fx import node as fx_node

    _patch.set_membership(fx_node._side_effectful_functions, fn, flag,
                          name=f"torch.fx.node._side_effectful_functions[{fn}]")


class EffectRegistrationHandle:
    """Undoes one :func:`register_effectful_op` call.

    ``destroy()`` removes this registration, and only it (see NOTE [A stack of
    registrations per op]): the op is then reported as the other active
    registrations of it say (or as before any, when none is left), and each of
    its overloads is protected from dead-code elimination exactly when it was
    before or another active registration asks for it. Handles may be
    destroyed in any order; destroying twice does nothing.
    """

    def __init__(self, entry: _Registration) -> None:
        self._entry = entry
        self._destroyed = False

    def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        _remove(self._entry)

    def __repr__(self) -> str:
        state = "destroyed" if self._destroyed else "active"
        return f"<EffectRegistrationHandle {self._entry.key} ({state})>"


def register_effectful_op(
    op: OpIdentifier, effect: Any = EffectType.ORDERED
) -> EffectRegistrationHandle:
    """Declare that ``op`` has a side effect of kind ``effect``.

    Args:
        op: an ``OpOverload`` (``torch.ops.mylib.log.default``: that overload),
            an ``OpOverloadPacket`` (``torch.ops.mylib.log``: every overload),
            a ``torch.library.custom_op`` object, a ``HigherOrderOperator``, or
            a qualified name (``"mylib::log"`` for every overload,
            ``"mylib::log.default"`` for one).
        effect: an :class:`EffectType` (``EffectType.ORDERED``), or ``None`` to
            declare the op effect-free (this also overrides torch's own
            registry, e.g. for a torchbind method that only reads).

    Returns:
        A handle; ``handle.destroy()`` undoes this registration (and only it:
        a newer registration of the same op stays in force).

    From then on, under ``torch.compile`` (aot_eager, inductor) and in
    ``torch.export`` programs after ``run_decompositions()``, every call of the
    op is threaded through :data:`with_effects`: the calls keep program order,
    run exactly once each, and a call whose result is unused is kept.
    Exactly once also holds in backward (an effect in the op's autograd
    formula, or in a custom ``autograd.Function``'s backward, runs once per
    backward), inside hopkit HOP bodies, and under activation checkpointing
    of every style: recomputation reuses the outputs the effectful call
    produced in forward, and a selective-checkpointing policy answering
    ``MUST_RECOMPUTE`` for the op is refused with an error naming it (NOTE
    [Effects under activation checkpointing] in hopkit/effects/_checkpoint.py).
    Under ``torch.func.grad`` the forward call runs once and its backward
    once. Under ``torch.func.vmap`` an op without a vmap rule of its own runs
    once per example, in example order (torch's per-example fallback), in
    eager and compiled alike; an op with a vmap rule
    (``torch.library.register_vmap``) runs as that rule says.
    The op must be functional: an op that mutates or aliases its inputs is
    rejected, because a token cannot stand in for the data dependence that a
    mutation creates. Registering an op again overrides the earlier
    registration until the new handle is destroyed.

    Everything is checked before anything is registered; on error the
    registry is unchanged. The first registration installs hopkit's hooks in
    torch's token machinery (NOTE [hopkit effects inside torch's token
    machinery] in hopkit/effects/_torch_integration.py).
    """
    if effect is not None and not isinstance(effect, EffectType):
        raise TypeError(
            "hopkit: register_effectful_op(op, effect) expects effect to be an "
            f"EffectType (e.g. EffectType.ORDERED) or None, but got "
            f"{describe(effect)}; pass EffectType.ORDERED, or None to declare "
            "the op effect-free."
        )
    key, display, overloads = _resolve(op, _REGISTER)
    if key == _WITH_EFFECTS_KEY:
        raise ValueError(
            "hopkit: cannot register with_effects itself as effectful; "
            "register the op it wraps."
        )
    for overload in overloads:
        _check_registrable(overload, display)

    # First use: NOTE [Changing torch only on use, reversibly] in
    # hopkit/_patch.py. Imported here, not at the top: _torch_integration
    # wraps torch's functions around this registry, so it imports this module.
    from hopkit.effects._torch_integration import install

    install()
    entry = _Registration(key, effect, overloads)
    _push(entry)
    return EffectRegistrationHandle(entry)


# ---------------------------------------------------------------------------
# Look-ups
# ---------------------------------------------------------------------------


def _lookup(op: Any) -> tuple[bool, Any]:
    """(op registered with hopkit?, its hopkit effect). Cached per op."""
    try:
        return _LOOKUP_CACHE[op]
    except (KeyError, TypeError):
        pass
    found: tuple[bool, Any] = (False, None)
    for key in _keys_of(op):
        if key in _REGISTRY:
            found = (True, _REGISTRY[key])
            break
    try:
        _LOOKUP_CACHE[op] = found
    except TypeError:  # unhashable: nothing to cache
        pass
    return found


def _keys_of(op: Any) -> tuple[str, ...]:
    if isinstance(op, OpOverload):
        return (overload_key(op), op._schema.name)
    if isinstance(op, HigherOrderOperator):
        return (f"{op.namespace}::{op.name()}",)
    return ()


def _torch_get_effect(op: Any) -> Any:
    """torch's own effect registry (aten::_print, torchbind, ...), or None."""
    from torch._higher_order_ops import effects as hop_effects

    try:  # torch 2.11-2.15 raise for objects that are no op at all
        return hop_effects._get_effect(op)
    except (ValueError, RuntimeError, AttributeError):
        return None


def _custom_op_def_type() -> Any:
    """torch.library.custom_op's object type (CustomOpDef, torch 2.11-2.15)."""
    from torch._library.custom_ops import CustomOpDef

    return CustomOpDef


def get_effect(op: OpIdentifier) -> Any:
    """The effect threaded for ``op``: its hopkit registration, else torch's
    own (``aten::_print`` and torchbind calls are ``ORDERED`` in torch), else
    ``None``. Accepts the same kinds of ``op`` as :func:`register_effectful_op`
    (a packet or ``"ns::name"`` reports the packet-wide registration)."""
    if isinstance(op, (OpOverload, HigherOrderOperator)):
        found, effect = _lookup(op)
        return effect if found else _torch_get_effect(op)
    key, _, overloads = _resolve(op, _GET_EFFECT)
    if key in _REGISTRY:
        return _REGISTRY[key]
    if len(overloads) == 1 and isinstance(overloads[0], (OpOverload, HigherOrderOperator)):
        return get_effect(overloads[0])
    return _torch_get_effect(op)


def has_aliasing(op: Any) -> bool:
    """Whether ``op``'s schema mutates or aliases (a ``(a)`` / ``(a!)``
    annotation on an argument or a return). ``op``: an ``OpOverload``, a
    ``torch.library.custom_op`` object or a HOP (HOPs have no schema:
    ``False``)."""
    return aliases(_one_op(op, "has_aliasing"))


def aliases(op: Any) -> bool:
    """has_aliasing for any object (no schema: False), never raises."""
    if not isinstance(op, OpOverload):
        return False
    schema = op._schema
    return any(a.alias_info is not None for a in schema.arguments) or any(
        r.alias_info is not None for r in schema.returns
    )


def has_effects(op: Any) -> bool:
    """Whether calls of ``op`` get threaded with an effect token. ``op``: an
    ``OpOverload``, a ``torch.library.custom_op`` object or a HOP; any other
    callable (an FX node's ``operator.getitem``, a Python function) is no op
    and has no effects. A packet or a name string is refused (its overloads
    may differ): ask :func:`get_effect` for it."""
    if isinstance(op, (OpOverload, HigherOrderOperator)):
        return threads_effects(op)
    custom_op_def = _custom_op_def_type()
    if (
        callable(op)
        and not isinstance(op, (str, OpOverloadPacket))
        and not (custom_op_def is not None and isinstance(op, custom_op_def))
    ):
        return False  # another call target: no op, no effects
    return threads_effects(_one_op(op, "has_effects"))


def threads_effects(op: Any) -> bool:
    """has_effects for the token machinery: any object, never raises.

    Counts torch's own registry too (NOTE [One token chain for torch's and
    hopkit's effects]).
    """
    return (
        isinstance(op, (HigherOrderOperator, OpOverload))
        and not aliases(op)
        and get_effect(op) is not None
    )


def owns(op: Any) -> bool:
    """Whether hopkit (not torch) decides the effect handling of ``op``:
    some active :func:`register_effectful_op` covers it."""
    return _lookup(op)[0]


def hopkit_effect(op: Any) -> Any:
    """The effect of ``op``'s hopkit registration; None if hopkit has none
    (torch's own registry is not asked)."""
    found, effect = _lookup(op)
    return effect if found else None


def _one_op(op: Any, fn: str) -> Any:
    """The one OpOverload or HOP that ``op`` stands for, else a clear error."""
    if isinstance(op, (OpOverload, HigherOrderOperator)):
        return op
    custom_op_def = _custom_op_def_type()
    if custom_op_def is not None and isinstance(op, custom_op_def):
        return op._opoverload
    if isinstance(op, (str, OpOverloadPacket)):
        fix = "pass one overload (torch.ops.mylib.log.default)"
        if fn == "has_effects":
            fix += (
                ", or ask get_effect(op), which also takes a packet or an "
                "'ns::name' string"
            )
    else:
        fix = "pass the op itself"
    others = " (or another callable, which has no effects)" if fn == "has_effects" else ""
    raise TypeError(
        f"hopkit: {fn}(op) expects op to be an OpOverload "
        "(torch.ops.mylib.log.default), a torch.library.custom_op object or a "
        f"HigherOrderOperator{others}, but got {describe(op)}; {fix}."
    )


# ---------------------------------------------------------------------------
# Op identifiers and names (shared with the other modules of hopkit.effects)
# ---------------------------------------------------------------------------


def overload_key(op: OpOverload) -> str:
    """``ns::name.overload`` (``OpOverload._name`` leaves out ``.default``)."""
    return f"{op._schema.name}.{op._overloadname}"


def describe(value: Any) -> str:
    """``str 'abc'``: a given value's type and (shortened) repr, for errors."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def display_name(op: Any) -> str:
    """How errors name an op: ``ns::name.overload`` or ``torch.ops.ns.hop``."""
    if isinstance(op, OpOverload):
        return overload_key(op)
    if isinstance(op, HigherOrderOperator):
        return f"torch.ops.{op.namespace}.{op.name()}"
    return repr(op)


# Who resolves an op identifier: the call shown in errors, and what to do.
_REGISTER = ("register_effectful_op(op, effect)", "registering it")
_GET_EFFECT = ("get_effect(op)", "asking for its effect")


def _resolve(op: Any, caller: tuple[str, str]) -> tuple[str, str, list[Any]]:
    """op identifier -> (registry key, display name, callables it covers)."""
    if isinstance(op, OpOverload):
        key = overload_key(op)
        return key, key, [op]
    if isinstance(op, OpOverloadPacket):
        return op._qualified_op_name, op._qualified_op_name, _overloads_of(op)
    if isinstance(op, HigherOrderOperator):
        key = f"{op.namespace}::{op.name()}"
        return key, key, [op]
    custom_op_def = _custom_op_def_type()
    if custom_op_def is not None and isinstance(op, custom_op_def):
        overload = op._opoverload
        return overload._schema.name, overload._schema.name, [overload]
    if isinstance(op, str):
        return _resolve_name(op, caller)
    raise TypeError(
        f"hopkit: {caller[0]} expects op to be an OpOverload "
        "(torch.ops.mylib.log.default), an OpOverloadPacket, a "
        "torch.library.custom_op object, a HigherOrderOperator or a qualified "
        f"name string ('mylib::log'), but got {describe(op)}; pass the op "
        "itself or its name."
    )


def _resolve_name(name: str, caller: tuple[str, str]) -> tuple[str, str, list[Any]]:
    if "::" not in name:
        raise ValueError(
            f"hopkit: {name!r} is not a qualified op name; write it as "
            "'namespace::name' or 'namespace::name.overload' (e.g. 'mylib::log')."
        )
    ns, rest = name.split("::", 1)
    opname, _, overload = rest.partition(".")
    if ns == "higher_order":
        hop = getattr(torch.ops.higher_order, opname, None) if not overload else None
        if hop is None:
            raise ValueError(
                f"hopkit: no HigherOrderOperator named {name!r}; create the HOP "
                f"before {caller[1]}, or pass the HOP object."
            )
        return _resolve(hop, caller)
    try:
        packet = getattr(getattr(torch.ops, ns), opname)
    except (AttributeError, RuntimeError):
        packet = None
    if not isinstance(packet, OpOverloadPacket):
        raise ValueError(
            f"hopkit: unknown operator {name!r}: no op {ns}::{opname} is "
            "defined; define it first (torch.library.custom_op or "
            "torch.library.Library(...).define) or load the library that does."
        )
    if overload:
        try:
            return _resolve(getattr(packet, overload), caller)
        except (AttributeError, RuntimeError):
            raise ValueError(
                f"hopkit: unknown operator {name!r}: {ns}::{opname} has no "
                f"overload {overload!r} (it has {sorted(packet.overloads())}); "
                "use one of those, or 'ns::name' for every overload."
            ) from None
    return _resolve(packet, caller)


def _overloads_of(packet: OpOverloadPacket) -> list[Any]:
    out = []
    for name in packet.overloads():
        try:
            out.append(getattr(packet, name))
        except (AttributeError, RuntimeError):  # TorchScript-only overloads
            continue
    return out


def _check_registrable(op: Any, display: str) -> None:
    if not isinstance(op, OpOverload):
        return
    name = overload_key(op)
    where = "" if display == name else f" (overload {name} of {display})"
    schema = op._schema
    for arg in schema.arguments:
        if arg.alias_info is not None:
            verb = "mutates" if arg.alias_info.is_write else "aliases"
            raise ValueError(
                f"hopkit: cannot register {display} as effectful{where}: its "
                f"schema `{schema}` {verb} argument '{arg.name}'. Effect tokens "
                "order functional ops only; make the op functional "
                "(torch.library.custom_op(..., mutates_args=()) returning new "
                "tensors), or register a functional overload instead."
            )
    for i, ret in enumerate(schema.returns):
        if ret.alias_info is not None:
            raise ValueError(
                f"hopkit: cannot register {display} as effectful{where}: its "
                f"schema `{schema}` returns an alias of an input (return {i}). "
                "Effect tokens order functional ops only; return a fresh "
                "tensor (e.g. x.clone()) instead of a view or an input."
            )
    if torch._C._dispatch_has_kernel_for_dispatch_key(
        op._name, DispatchKey.CompositeImplicitAutograd
    ):
        raise ValueError(
            f"hopkit: cannot register {display} as effectful{where}: it has a "
            "CompositeImplicitAutograd kernel, so it decomposes into other ops "
            "before tracing can see it and its effect would be lost. Register "
            "its kernel for CompositeExplicitAutograd or per backend (CPU, "
            "CUDA) instead, as torch.library.custom_op does."
        )
    if torch._C._dispatch_has_kernel_for_dispatch_key(
        op._name, DispatchKey.Functionalize
    ):
        raise ValueError(
            f"hopkit: cannot register {display} as effectful{where}: it has a "
            "Functionalize kernel, which would bypass effect tokens; remove "
            "that kernel (a functional op needs none)."
        )
