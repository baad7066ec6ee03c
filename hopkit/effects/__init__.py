"""Effect tokens: keep side-effectful ops ordered, alive and run exactly once.

    with_effects(token, op, *args, **kwargs) -> (new_token, *outputs)

means, as plain Python::

    def with_effects(token, op, *args, **kwargs):
        out = op(*args, **kwargs)
        new_token = new_token_tensor()
        return (new_token, *out) if isinstance(out, tuple) else (new_token, out)

The token carries no data. It turns "these calls have a side effect and must
happen in this order" into a data dependence that every graph pass
understands: a call consumes the previous call's token and produces the next
one, so nothing can reorder the calls, and the last token is an output of the
graph, so nothing can delete a call whose result is unused.

Users register an op once (``register_effectful_op(op, EffectType.ORDERED)``);
from then on, whenever functionalization (AOTAutograd under ``torch.compile``,
``torch.export`` ... ``run_decompositions()``) sees the op, it calls
:func:`handle_effects`, which threads the token through hopkit's own HOP
``torch.ops.higher_order.hopkit_with_effects``.

Where the other rules live:

- the hooks that route AOTAutograd's effect handling to hopkit, and teach
  token unlifting, the min-cut partitioner and ``torch.export``'s token
  removal about hopkit's HOP, are in ``hopkit/_compat.py`` (section "effects");
  see NOTE [hopkit effects inside torch's token machinery] there;
- the Inductor lowering of ``hopkit_with_effects`` is there too
  (``_lower_with_effects``); it is registered when Inductor is first imported,
  so that importing this module never imports Inductor.

NOTE [One token chain for torch's and hopkit's effects]
hopkit's ``EffectType`` *is* torch's effect enum, so an op registered with
hopkit and one of torch's own effectful ops (``aten::_print``, torchbind
methods) share one token per effect type: their calls are ordered relative to
each other, in the AOT graph, in Inductor's scheduler and in exported programs.
Torch's own ops keep going through torch's ``with_effects``; only ops
registered here go through ``hopkit_with_effects``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Union

import torch
import torch.utils._pytree as pytree
from torch._C import DispatchKey
from torch._ops import HigherOrderOperator, OpOverload, OpOverloadPacket
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import (
    ProxyTorchDispatchMode,
    disable_proxy_modes_tracing,
    track_tensor_tree,
)

from hopkit import _compat

__all__ = [
    "EffectType",
    "subgraph_effects",
    "register_effectful_op",
    "get_effect",
    "has_effects",
    "has_aliasing",
    "with_effects",
    "new_token_tensor",
    "handle_effects",
]

#: The kinds of effect a token orders. ``EffectType.ORDERED``: calls happen in
#: program order. (torch's own enum; see NOTE [One token chain for torch's and
#: hopkit's effects].)
EffectType = _compat.EffectType

OpType = Union[HigherOrderOperator, OpOverload]
OpIdentifier = Union[str, OpOverload, OpOverloadPacket, HigherOrderOperator, Any]


# ---------------------------------------------------------------------------
# The HOP
# ---------------------------------------------------------------------------


class WithEffects(HigherOrderOperator):
    """``with_effects(token, op, *args, **kwargs) -> (new_token, *outputs)``.

    Calls ``op(*args, **kwargs)`` and returns a fresh token in front of its
    outputs. A tuple output is spread (one graph output per element); any
    other output, a list included, stays one output, matching the op's schema.

    ``token`` is the token of the previous call (``new_token_tensor()`` for
    the first): a Tensor, or ``None``, which is what AOTAutograd feeds compiled
    graphs at run time; anything else is refused.
    """

    def __init__(self) -> None:
        super().__init__("hopkit_with_effects")

    def __call__(
        self, token: Any, op: OpType, /, *args: Any, **kwargs: Any
    ) -> tuple[Any, ...]:
        # None: the token AOTAutograd's runtime wrappers pass to compiled
        # graphs (tokens carry no data, so torch feeds None at run time).
        # torch.fx.Proxy: a token under torch.fx.symbolic_trace.
        if token is not None and not isinstance(token, _TOKEN_TYPES):
            raise _bad_token(token)
        try:
            checked = op in _CHECKED_OPS
        except TypeError:  # unhashable: certainly not an op
            checked = False
        if not checked:
            _check_wrappable(self, op)
        # NOTE [with_effects fast path]: with plain tensors and nothing
        # intercepting dispatch, HigherOrderOperator dispatch would end in the
        # dense rule anyway (autograd falls through, the op handles its own);
        # going there directly saves ~20us per call in compiled (aot_eager)
        # graphs, where every effectful call runs through here. "Nothing
        # intercepting": no dispatch or torch-function mode, no functorch
        # transform (functorch's functionalize included), no C++
        # functionalization or pre-dispatch tracing switched on, and plain
        # (non-subclass, non-functional) tensors only.
        if (
            not (
                _dispatch_stack_len()
                or _torch_function_mode_on()
                or _functorch_on()
                or _tls_included(_FUNCTIONALIZE)
                or _tls_included(_PRE_DISPATCH)
            )
            and _all_plain(args)
            and (token is None or _all_plain((token,)))
            and (not kwargs or _all_plain(kwargs.values()))
        ):
            out = op(*args, **kwargs)
            if isinstance(out, tuple):
                return (_RUNTIME_TOKEN, *out)
            return (_RUNTIME_TOKEN, out)
        return super().__call__(token, op, *args, **kwargs)


def _bad_token(token: Any) -> TypeError:
    return TypeError(
        "hopkit: with_effects(token, op, *args) expects token to be an effect "
        "token, a Tensor that carries no data and chains the effectful calls "
        f"one after another, but got {_describe(token)}; pass the token returned "
        "by new_token_tensor() or by the previous with_effects call "
        "(its first output)."
    )


def _check_wrappable(hop: WithEffects, op: Any) -> None:
    if not isinstance(op, (HigherOrderOperator, OpOverload)):
        raise TypeError(
            "hopkit: with_effects(token, op, *args) expects op to be an "
            f"OpOverload (e.g. torch.ops.mylib.log.default) or a "
            f"HigherOrderOperator, but got {type(op).__name__} {op!r}; "
            "pass the overload, not the packet or a Python function."
        )
    if op is hop:
        raise ValueError(
            "hopkit: with_effects cannot wrap itself; pass the effectful op."
        )
    if _aliases(op):
        raise ValueError(
            f"hopkit: with_effects cannot wrap {_display_name(op)}: its schema "
            f"`{op._schema}` mutates or aliases an argument or output "  # type: ignore[union-attr]
            "(effect tokens order functional ops only); make the op "
            "functional (mutates_args=(), fresh outputs)."
        )
    _CHECKED_OPS.add(op)


_CHECKED_OPS: set[Any] = set()
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
# What a token may be (besides None): a tensor of any kind (plain, fake,
# functional, tracked by make_fx), or an FX proxy under symbolic tracing.
_TOKEN_TYPES = (torch.Tensor, torch.fx.Proxy)
# Bound once: the fast path runs for every effectful call of a compiled graph.
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_torch_function_mode_on = torch._C._is_torch_function_mode_enabled
_functorch_on = torch._C._are_functorch_transforms_active
_tls_included = torch._C._dispatch_tls_is_dispatch_key_included
_FUNCTIONALIZE = DispatchKey.Functionalize
_PRE_DISPATCH = DispatchKey.PreDispatch
_is_functional = torch._is_functional_tensor
# The new token of a fast-path call: tokens carry no data and are never
# written, so one shared empty tensor serves every call (allocating one costs
# about as much as the rest of the fast path).
_RUNTIME_TOKEN = torch.empty(0)


def _all_plain(values: Any) -> bool:
    for v in values:
        t = type(v)
        if t in _PLAIN_TENSOR_TYPES:
            # C++ functional wrappers (torch.func.functionalize, or unwrapped
            # FunctionalTensors) are plain-typed but dispatch to Functionalize.
            if _is_functional(v):
                return False
            continue
        if isinstance(v, torch.Tensor):
            return False
        if (t is list or t is tuple) and not _all_plain(v):
            return False
    return True


with_effects = WithEffects()


def new_token_tensor() -> torch.Tensor:
    """A fresh effect token: an empty float tensor. Its value is never read."""
    return torch.tensor([])


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
                _compat.set_side_effectful(fn, _SIDE_EFFECTFUL_BEFORE.pop(fn))
            continue
        before = _SIDE_EFFECTFUL_BEFORE.setdefault(fn, _compat.is_side_effectful(fn))
        # A registration with an effect keeps an unused-result call alive
        # wherever the op appears *without* a token: Dynamo's graph, export's
        # training IR, ep.module().
        _compat.set_side_effectful(
            fn, before or any(e.effect is not None for e in covering)
        )


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
    The op must be functional: an op that mutates or aliases its inputs is
    rejected, because a token cannot stand in for the data dependence that a
    mutation creates. Registering an op again overrides the earlier
    registration until the new handle is destroyed.

    Everything is checked before anything is registered; on error the
    registry is unchanged.
    """
    if effect is not None and not isinstance(effect, EffectType):
        raise TypeError(
            "hopkit: register_effectful_op(op, effect) expects effect to be an "
            f"EffectType (e.g. EffectType.ORDERED) or None, but got "
            f"{_describe(effect)}; pass EffectType.ORDERED, or None to declare "
            "the op effect-free."
        )
    key, display, overloads = _resolve(op, _REGISTER)
    if with_effects in overloads:
        raise ValueError(
            "hopkit: cannot register with_effects itself as effectful; "
            "register the op it wraps."
        )
    for overload in overloads:
        _check_registrable(overload, display)

    _compat.install_effects_integration(_integration())
    entry = _Registration(key, effect, overloads)
    _push(entry)
    return EffectRegistrationHandle(entry)


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
        return (_overload_key(op), op._schema.name)
    if isinstance(op, HigherOrderOperator):
        return (f"{op.namespace}::{op.name()}",)
    return ()


def get_effect(op: OpIdentifier) -> Any:
    """The effect threaded for ``op``: its hopkit registration, else torch's
    own (``aten::_print`` and torchbind calls are ``ORDERED`` in torch), else
    ``None``. Accepts the same kinds of ``op`` as :func:`register_effectful_op`
    (a packet or ``"ns::name"`` reports the packet-wide registration)."""
    if isinstance(op, (OpOverload, HigherOrderOperator)):
        found, effect = _lookup(op)
        return effect if found else _compat.torch_get_effect(op)
    key, _, overloads = _resolve(op, _GET_EFFECT)
    if key in _REGISTRY:
        return _REGISTRY[key]
    if len(overloads) == 1 and isinstance(overloads[0], (OpOverload, HigherOrderOperator)):
        return get_effect(overloads[0])
    return _compat.torch_get_effect(op)


def has_aliasing(op: Any) -> bool:
    """Whether ``op``'s schema mutates or aliases (a ``(a)`` / ``(a!)``
    annotation on an argument or a return). ``op``: an ``OpOverload``, a
    ``torch.library.custom_op`` object or a HOP (HOPs have no schema:
    ``False``)."""
    op = _one_op(op, "has_aliasing")
    return _aliases(op)


def _aliases(op: Any) -> bool:
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
        return _threads_effects(op)
    custom_op_def = _compat.custom_op_def_type()
    if (
        callable(op)
        and not isinstance(op, (str, OpOverloadPacket))
        and not (custom_op_def is not None and isinstance(op, custom_op_def))
    ):
        return False  # another call target: no op, no effects
    return _threads_effects(_one_op(op, "has_effects"))


def _threads_effects(op: Any) -> bool:
    """has_effects for the token machinery: any object, never raises."""
    return (
        isinstance(op, (HigherOrderOperator, OpOverload))
        and not _aliases(op)
        and get_effect(op) is not None
    )


def _one_op(op: Any, fn: str) -> Any:
    """The one OpOverload or HOP that ``op`` stands for, else a clear error."""
    if isinstance(op, (OpOverload, HigherOrderOperator)):
        return op
    custom_op_def = _compat.custom_op_def_type()
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
        f"HigherOrderOperator{others}, but got {_describe(op)}; {fix}."
    )


def _owns(op: Any) -> bool:
    """Whether hopkit (not torch) decides the effect handling of ``op``."""
    return _lookup(op)[0]


# ---------------------------------------------------------------------------
# Threading tokens during functionalization
# ---------------------------------------------------------------------------


def handle_effects(
    allow_token_discovery: bool,
    tokens: dict[Any, torch.Tensor],
    op: OpType,
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> Any:
    """Run ``op(*args, **kwargs)`` through :data:`with_effects`, threading the
    token of ``op``'s effect type, as functionalization does.

    Args:
        allow_token_discovery: if true, a missing token for ``op``'s effect is
            created (during AOTAutograd's metadata pass; in the backward pass
            it becomes a new ``tangents_token`` graph input); if false, a
            missing token is an error.
        tokens: a dict from :class:`EffectType` to the current token tensor
            (functional tensors; ``{}`` before the first effect, with
            discovery on), as in torch's ``handle_effects``; updated in place
            with the new token.
        op, args, kwargs: the effectful call (an ``OpOverload`` or a HOP, a
            tuple or list of arguments, a dict of keyword arguments), with
            functional tensors.

    Bad arguments are refused before anything is traced.

    Returns the op's outputs, with the op's own structure (``None`` for no
    return, a tensor for one, a tuple for several; a HOP's outputs as a tuple).

    Inside a HOP's subgraph (see NOTE [Effect tokens inside subgraphs]) the
    call stays a plain call and the enclosing HOP call is threaded instead.
    """
    _check_handle_effects_args(tokens, op, args, kwargs)
    key = get_effect(op)
    if key is None:
        raise RuntimeError(
            f"hopkit: handle_effects called for {_display_name(op)}, which has "
            "no registered effect; register it with register_effectful_op first."
        )
    if key in tokens and not isinstance(tokens[key], torch.Tensor):
        raise TypeError(
            f"hopkit: {_HANDLE_EFFECTS} expects each value of tokens to be a "
            f"token tensor, but tokens[{key}] is {_describe(tokens[key])}; keep "
            "the tokens that new_token_tensor() and handle_effects put there."
        )
    from torch._subclasses.functional_tensor import PythonFunctionalizeAPI

    ctx = PythonFunctionalizeAPI()
    unwrapped_args = ctx.unwrap_tensors(tuple(args))
    unwrapped_kwargs = ctx.unwrap_tensors(kwargs)  # type: ignore[arg-type]

    regions = _region_stack()
    if regions:
        regions[-1].record(key)
        with ctx.redispatch_to_next():
            out = op(*unwrapped_args, **unwrapped_kwargs)
        return ctx.wrap_tensors(out)

    token = _current_token(allow_token_discovery, tokens, key, op)
    unwrapped_token = ctx.unwrap_tensors([token])[0]
    with ctx.redispatch_to_next():
        new_token, *outs = with_effects(
            unwrapped_token, op, *unwrapped_args, **unwrapped_kwargs
        )

    result = _restructure(op, outs)
    wrapped_token = ctx.wrap_tensors(new_token)
    if not isinstance(wrapped_token, torch.Tensor):
        raise RuntimeError(
            f"hopkit: with_effects returned a non-tensor token {wrapped_token!r}"
        )
    tokens[key] = wrapped_token
    return ctx.wrap_tensors(result)


_HANDLE_EFFECTS = "handle_effects(allow_token_discovery, tokens, op, args, kwargs)"


def _check_handle_effects_args(tokens: Any, op: Any, args: Any, kwargs: Any) -> None:
    if not isinstance(tokens, dict):
        raise TypeError(
            f"hopkit: {_HANDLE_EFFECTS} expects tokens to be a dict from "
            "EffectType to token tensor (as torch's handle_effects; e.g. "
            f"FunctionalTensorMode's _tokens), but got {_describe(tokens)}; pass "
            "the dict of current tokens ({} to start a chain, with "
            "allow_token_discovery=True), which handle_effects updates in place."
        )
    if not isinstance(op, (OpOverload, HigherOrderOperator)):
        raise TypeError(
            f"hopkit: {_HANDLE_EFFECTS} expects op to be an OpOverload or a "
            f"HigherOrderOperator, but got {_describe(op)}; pass the op being "
            "called (e.g. torch.ops.mylib.log.default)."
        )
    if not isinstance(args, (tuple, list)):
        raise TypeError(
            f"hopkit: {_HANDLE_EFFECTS} expects args to be a tuple or list of "
            f"the op's positional arguments, but got {_describe(args)}; pass "
            "them as a tuple, e.g. (x,)."
        )
    if not isinstance(kwargs, dict):
        raise TypeError(
            f"hopkit: {_HANDLE_EFFECTS} expects kwargs to be a dict of the op's "
            f"keyword arguments, but got {_describe(kwargs)}; pass {{}} for none."
        )


def _current_token(
    allow_token_discovery: bool, tokens: dict[Any, torch.Tensor], key: Any, op: Any
) -> torch.Tensor:
    """The token to thread for effect ``key``, created if discovery allows."""
    if key in tokens:
        return tokens[key]
    if not allow_token_discovery:
        raise RuntimeError(
            f"hopkit: no effect token for {key} while tracing "
            f"{_display_name(op)} (token discovery is off: the effect was not "
            "seen when AOTAutograd collected metadata)."
        )
    proxy_mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY)
    if proxy_mode is not None:
        # A token discovered while tracing means we are in the backward pass:
        # AOTAutograd expects it as an extra input of the joint graph named
        # "tangents_token" (see Note [Side-Effectful Tokens in AOTAutograd] in
        # torch/_functorch/aot_autograd.py).
        with disable_proxy_modes_tracing():
            token_tensor = new_token_tensor()
        token_proxy = proxy_mode.tracer.create_proxy(
            "placeholder", "tangents_token", (), {}, name="tangents_token"
        )
        track_tensor_tree(token_tensor, token_proxy, constant=None, tracer=proxy_mode.tracer)
        tokens[key] = token_tensor
    else:
        tokens[key] = new_token_tensor()
    return tokens[key]


# ---------------------------------------------------------------------------
# Effects inside HOP subgraphs
# ---------------------------------------------------------------------------

# NOTE [Effect tokens inside subgraphs]
# An effectful op called inside a HOP's subgraph (a hopkit.BaseHOP body) must
# keep its order relative to the effects around the HOP call, run exactly once
# per call and never be dropped. The token cannot be threaded into the
# subgraph: the subgraph is traced into its own graph, and the outer token is a
# value of the outer graph. So the HOP call as a whole is threaded:
#
# 1. The HOP's functionalization rule traces its subgraph inside
#    ``subgraph_effects(ctx, hop)``. There, effectful calls stay plain calls
#    (handle_effects sees the open region): the subgraph's graph holds them in
#    program order, and FX keeps them alive (registered ops are marked
#    side-effectful). The region records which effect types it saw.
# 2. When the region closes, the HOP call consumes the current token and
#    produces the next one: its node ``hop(*args)`` becomes
#    ``hopkit_with_effects(token, hop, *args) -> (new_token, *outputs)``.
#    From there AOTAutograd, the partitioner, ``torch.export`` and Inductor
#    treat it as any other effectful call; Inductor's lowering of
#    hopkit_with_effects also chains the effectful kernels of the inlined
#    subgraph one after another (``_lower_with_effects`` in hopkit/_compat.py).
# 3. A region nested in another (a HOP inside a HOP's subgraph) reports its
#    effects to the enclosing region; only the outermost HOP call is threaded.
#
# Under C++ functionalization (torch.func.functionalize) there are no tokens;
# the region only keeps the subgraph's calls plain.


class _Region:
    __slots__ = ("effects",)

    def __init__(self) -> None:
        self.effects: list[Any] = []

    def record(self, effect: Any) -> None:
        if effect not in self.effects:
            self.effects.append(effect)


_regions = threading.local()


def _region_stack() -> list[_Region]:
    stack: list[_Region] | None = getattr(_regions, "stack", None)
    if stack is None:
        stack = _regions.stack = []
    return stack


def _in_region() -> bool:
    return bool(getattr(_regions, "stack", None))


class subgraph_effects:
    """Thread effect tokens through a HOP call whose subgraph has effects.

    For authors of HOPs with subgraphs (``hopkit.BaseHOP`` uses it): wrap the
    call that the functionalization rule makes of the HOP::

        with subgraph_effects(ctx, hop):
            with ctx.redispatch_to_next():
                out = hop(subgraph, *unwrapped_operands)

    See NOTE [Effect tokens inside subgraphs]. Does nothing when the subgraph
    has no effectful call and the HOP itself is not registered effectful
    (``register_effectful_op(hop, EffectType.ORDERED)`` orders every call).
    """

    def __init__(self, ctx: Any, hop: HigherOrderOperator) -> None:
        self.mode = getattr(ctx, "mode", None)
        self.hop = hop
        self.region = _Region()
        self.marker: Any = None

    def __enter__(self) -> None:
        proxy_mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY)
        if proxy_mode is not None:
            self.marker = _last_node(proxy_mode.tracer.graph)
        _region_stack().append(self.region)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        stack = _region_stack()
        stack.pop()
        if exc_type is not None:
            return
        own = get_effect(self.hop)  # the HOP itself registered effectful
        if own is not None:
            self.region.record(own)
        if not self.region.effects:
            return
        if stack:  # nested: the enclosing HOP call is the one threaded
            for effect in self.region.effects:
                stack[-1].record(effect)
            return
        tokens = getattr(self.mode, "_tokens", None)
        if tokens is None:  # C++ functionalization: no tokens to thread
            return
        if len(self.region.effects) != 1:
            raise NotImplementedError(
                f"hopkit: the subgraph of {_display_name(self.hop)} has effects of "
                f"several types {self.region.effects}; one effect type per HOP "
                "call is supported."
            )
        _thread_hop_call(self.mode, self.hop, self.region.effects[0], self.marker)


def _last_node(graph: torch.fx.Graph) -> torch.fx.Node | None:
    """The graph's last node; None for an empty graph (a HOP call that takes
    no operands can be the first node traced)."""
    return next(iter(reversed(graph.nodes)), None)


def _thread_hop_call(mode: Any, hop: HigherOrderOperator, key: Any, marker: Any) -> None:
    """Make the HOP call just traced consume and produce the ``key`` token."""
    import operator

    from torch._subclasses.functional_tensor import PythonFunctionalizeAPI

    tokens = mode._tokens
    token = _current_token(mode._allow_token_discovery, tokens, key, hop)
    ctx = PythonFunctionalizeAPI(mode)
    unwrapped_token = ctx.unwrap_tensors([token])[0]
    with disable_proxy_modes_tracing():
        new_token = new_token_tensor()
    proxy_mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY)
    if proxy_mode is not None:
        tracer = proxy_mode.tracer
        graph = tracer.graph
        calls = []
        node = marker.next if marker is not None else next(iter(graph.nodes))
        while node is not graph._root:
            if node.op == "call_function" and node.target is hop:
                calls.append(node)
            node = node.next
        if len(calls) != 1:
            raise RuntimeError(
                f"hopkit: expected one call of {_display_name(hop)} in the traced "
                f"graph to thread effect tokens through, found {len(calls)}."
            )
        (call,) = calls
        token_node = tracer.unwrap_proxy(unwrapped_token).node
        if token_node.op == "placeholder" and token_node.name.startswith("tangents_token"):
            # Discovered just now (backward), so created after the call.
            call.prepend(token_node)
        with graph.inserting_before(call):
            wrapped = graph.call_function(with_effects, (token_node, hop, *call.args), dict(call.kwargs))
        wrapped.meta = dict(call.meta)
        val = call.meta.get("val")
        wrapped.meta["val"] = (
            (new_token, *val) if isinstance(val, (tuple, list)) else (new_token, val)
        )
        for user in list(call.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.args = (wrapped, user.args[1] + 1)
        # New nodes carry the call's provenance (export checks nn_module_stack).
        provenance = {k: v for k, v in call.meta.items() if k not in ("val", "tensor_meta")}
        with graph.inserting_after(wrapped):
            token_out = graph.call_function(operator.getitem, (wrapped, 0))
            token_out.meta.update(provenance)
            if call.users:  # a single, non-tuple output
                out = graph.call_function(operator.getitem, (wrapped, 1))
                out.meta.update(call.meta)
                call.replace_all_uses_with(out)
        graph.erase_node(call)
        track_tensor_tree(new_token, torch.fx.Proxy(token_out, tracer), constant=None, tracer=tracer)
    tokens[key] = ctx.wrap_tensors(new_token)  # type: ignore[arg-type]


def _restructure(op: OpType, outs: list[Any]) -> Any:
    """Undo the token framing: give back what ``op`` itself returns."""
    if isinstance(op, OpOverload):
        n = len(op._schema.returns)
        if n == 0:
            return None
        if n == 1:
            return outs[0]
        return tuple(outs)
    # HOPs return tuples by convention; a HOP returning nothing gave (None,).
    if len(outs) == 1 and outs[0] is None:
        return None
    return tuple(outs)


# ---------------------------------------------------------------------------
# with_effects rules: dense, autograd, functionalize, fake, proxy, functorch
# ---------------------------------------------------------------------------


def with_effects_dense(token: Any, op: OpType, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """Reference semantics: call the op, return a fresh token before its outputs."""
    out = op(*args, **kwargs)
    new_token = new_token_tensor()
    # NOTE: spread a tuple (one output per schema return), keep a list whole
    # (a ``Tensor[]`` return is one schema return).
    if isinstance(out, tuple):
        return (new_token, *out)
    return (new_token, out)


# Autograd: fall through. with_effects is differentiable exactly when ``op``
# is: the dense rule calls ``op`` through the full dispatcher, autograd
# included, so gradients flow through the op's own formula.


def with_effects_functionalize(
    ctx: Any, token: Any, op: OpType, *args: Any, **kwargs: Any
) -> tuple[Any, ...]:
    """with_effects is already functional: unwrap, re-emit, wrap."""
    unwrapped_token, unwrapped_args, unwrapped_kwargs = ctx.unwrap_tensors(
        [token, args, kwargs]
    )
    with ctx.redispatch_to_next():
        result = with_effects(unwrapped_token, op, *unwrapped_args, **unwrapped_kwargs)
    return ctx.wrap_tensors(result)


def with_effects_fake(
    mode: FakeTensorMode, token: Any, op: OpType, *args: Any, **kwargs: Any
) -> tuple[Any, ...]:
    """The dense rule on fake tensors (the op's own fake impl, a fake token)."""
    with mode:
        return with_effects_dense(token, op, *args, **kwargs)


def with_effects_proxy(
    mode: ProxyTorchDispatchMode, token: Any, op: OpType, *args: Any, **kwargs: Any
) -> tuple[Any, ...]:
    """One ``hopkit_with_effects`` node; ``op`` is a constant argument, a
    GraphModule argument (a HOP's subgraph) becomes a submodule."""
    with disable_proxy_modes_tracing():
        out = with_effects(token, op, *args, **kwargs)

    def unwrap(a: Any) -> Any:
        if isinstance(a, torch.fx.GraphModule):
            return _register_submodule(mode, a)
        return mode.tracer.unwrap_proxy(a)  # type: ignore[union-attr]

    proxy_args = pytree.tree_map(unwrap, (token, *args))
    proxy_kwargs = pytree.tree_map(unwrap, kwargs)
    out_proxy = mode.tracer.create_proxy(
        "call_function",
        with_effects,
        (proxy_args[0], op, *proxy_args[1:]),
        proxy_kwargs,
    )
    return track_tensor_tree(out, out_proxy, constant=None, tracer=mode.tracer)


def _register_submodule(mode: ProxyTorchDispatchMode, gm: torch.fx.GraphModule) -> Any:
    root: torch.nn.Module = mode.tracer.root  # type: ignore[union-attr]
    for name, existing in root.named_children():
        if existing is gm:
            break
    else:
        i = 0
        while hasattr(root, f"effects_subgraph_{i}"):
            i += 1
        name = f"effects_subgraph_{i}"
        root.register_module(name, gm)
    return mode.tracer.create_proxy("get_attr", name, (), {})


def with_effects_functorch(
    interpreter: Any, token: Any, op: OpType, *args: Any, **kwargs: Any
) -> tuple[Any, ...]:
    """vmap / grad / jvp: the dense rule at the current level (the op's own
    batching and derivative rules apply; the token needs none)."""
    return with_effects_dense(token, op, *args, **kwargs)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _overload_key(op: OpOverload) -> str:
    """``ns::name.overload`` (``OpOverload._name`` leaves out ``.default``)."""
    return f"{op._schema.name}.{op._overloadname}"


def _describe(value: Any) -> str:
    """``str 'abc'``: a given value's type and (shortened) repr, for errors."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _display_name(op: Any) -> str:
    if isinstance(op, OpOverload):
        return _overload_key(op)
    if isinstance(op, HigherOrderOperator):
        return f"torch.ops.{op.namespace}.{op.name()}"
    return repr(op)


# Who resolves an op identifier: the call shown in errors, and what to do.
_REGISTER = ("register_effectful_op(op, effect)", "registering it")
_GET_EFFECT = ("get_effect(op)", "asking for its effect")


def _resolve(op: Any, caller: tuple[str, str]) -> tuple[str, str, list[Any]]:
    """op identifier -> (registry key, display name, callables it covers)."""
    if isinstance(op, OpOverload):
        key = _overload_key(op)
        return key, key, [op]
    if isinstance(op, OpOverloadPacket):
        return op._qualified_op_name, op._qualified_op_name, _overloads_of(op)
    if isinstance(op, HigherOrderOperator):
        key = f"{op.namespace}::{op.name()}"
        return key, key, [op]
    custom_op_def = _compat.custom_op_def_type()
    if custom_op_def is not None and isinstance(op, custom_op_def):
        overload = op._opoverload
        return overload._schema.name, overload._schema.name, [overload]
    if isinstance(op, str):
        return _resolve_name(op, caller)
    raise TypeError(
        f"hopkit: {caller[0]} expects op to be an OpOverload "
        "(torch.ops.mylib.log.default), an OpOverloadPacket, a "
        "torch.library.custom_op object, a HigherOrderOperator or a qualified "
        f"name string ('mylib::log'), but got {_describe(op)}; pass the op "
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
    name = _overload_key(op)
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


def _integration() -> _compat.EffectsIntegration:
    return _compat.EffectsIntegration(
        hop=with_effects,
        owns=_owns,
        in_region=_in_region,
        has_effects=_threads_effects,
        handle_effects=handle_effects,
        get_effect=get_effect,
    )


# ---------------------------------------------------------------------------
# Registration: one line per key
# ---------------------------------------------------------------------------

with_effects.py_impl(DispatchKey.CompositeExplicitAutograd)(with_effects_dense)
for _key in _compat.autograd_dispatch_keys():
    with_effects.fallthrough(_key)
with_effects.py_functionalize_impl(with_effects_functionalize)
with_effects.py_impl(FakeTensorMode)(with_effects_fake)
with_effects.py_impl(ProxyTorchDispatchMode)(with_effects_proxy)
for _transform in _compat.functorch_transforms():
    with_effects.py_impl(_transform)(with_effects_functorch)
# Not marked side-effectful for FX: the token chain keeps every call alive
# where it must run, and the partitioner copies impure nodes into the backward
# graph whenever their inputs are saved, which would run them twice.
# Route AOTAutograd / export / the partitioner through hopkit for registered ops.
_compat.install_effects_integration(_integration())

