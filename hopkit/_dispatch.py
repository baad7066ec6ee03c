"""The predicates behind every fast path: may this call skip torch's dispatcher?

hopkit's fast paths skip torch's dispatcher when doing so cannot change the
result, and each asks one of two questions answered here, so that no two of
them can disagree (a vmap-batched tensor, a FunctionalTensor, a subclass or
an active mode sends every one of them to the dispatcher):

- ``hop_call_reaches_dense``: would a HigherOrderOperator call end in its
  dense rule? BaseHOP's plain-eager call and its HOP nodes in compiled
  graphs (NOTE [BaseHOP plain-eager fast path] in hopkit/base_hop/__init__.py)
  and ``with_effects`` (NOTE [with_effects fast path] in
  hopkit/effects/_hop.py) ask this: their dense rule runs the body (or op)
  through the dispatcher, so only what would take the HOP call elsewhere
  matters. Cheap on purpose: it runs for every HOP node of a compiled graph.
- ``nothing_intercepts_dispatch``: would a torch op on these tensors run the
  dense kernel directly? Stricter (it reads each tensor's dispatch keys):
  the eager replay of ViewMeta sequences as one ``as_strided`` (NOTE
  [Geometry cache for eager replay] in hopkit/functionalization) replaces the
  ops themselves, so a sparse, nested or conjugated tensor must go the long way.

It also answers "is a trace being recorded?" (``tracing_underway``), the
question behind BaseHOP's eager rules under dispatch modes and tensor
subclasses (NOTE [BaseHOP in eager under modes and subclasses] in
hopkit/base_hop), and suspends a user's dispatch modes while hopkit traces
internally (``user_modes_suspended``).

It imports nothing from hopkit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = [
    "hop_call_reaches_dense", "nothing_intercepts_dispatch", "plain_hop_values",
    "tracing_underway", "user_modes_suspended",
]

# Dispatch keys a plain dense tensor carries; a tensor with any other key
# (Python, Functionalize, FuncTorchBatched, Sparse, Nested, Conjugate, ...)
# takes the dispatcher. The names are the same in torch 2.11-2.15.
_PLAIN_KEYS = frozenset({
    "CPU", "CUDA", "ADInplaceOrView", "AutogradCPU", "AutogradCUDA",
    "AutocastCPU", "AutocastCUDA",
})
_plain_keysets: dict[int, bool] = {}

# Bound once: these run for every call on a fast path.
_dispatch_keys = torch._C._dispatch_keys
_len_dispatch_stack = torch._C._len_torch_dispatch_stack
# A pre-dispatch mode (make_fx(pre_dispatch=True)) includes the PreDispatch key
# in TLS while it is pushed; asking TLS is a C call, the mode stack is Python.
_tls_included = torch._C._dispatch_tls_is_dispatch_key_included
_PRE_DISPATCH = torch._C.DispatchKey.PreDispatch
_torch_function_mode_on = torch._C._is_torch_function_mode_enabled
_peek_interpreter = torch._C._functorch.peek_interpreter_stack
_has_torch_function = torch._C._has_torch_function
_functorch_on = torch._C._are_functorch_transforms_active
_FUNCTIONALIZE = torch._C.DispatchKey.Functionalize
_is_functional = torch._is_functional_tensor
_Tensor = torch.Tensor
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # no __torch_function__ of their own


def _keyset_is_plain(keys: Any) -> bool:
    raw = keys.raw_repr()
    plain = _plain_keysets.get(raw)
    if plain is None:
        names = str(keys)[len("DispatchKeySet("):-1].split(", ")
        plain = _plain_keysets[raw] = set(names) <= _PLAIN_KEYS
    return plain


def nothing_intercepts_dispatch(values: Iterable[Any]) -> bool:
    """Whether a torch op called on ``values`` would run the dense kernel directly.

    True when no torch dispatch mode (also none at pre-dispatch, as
    ``make_fx(pre_dispatch=True)`` pushes), no ``__torch_function__`` mode, no
    functorch transform (vmap, grad, jvp, functionalize) is active, and every
    tensor among ``values`` is a plain dense CPU or CUDA tensor: no Python
    subclass, no functional, batched, sparse, nested, conjugated or negated
    tensor. Non-tensor values are ignored; nested lists and tuples are looked
    into.
    """
    if (
        _len_dispatch_stack()
        or _tls_included(_PRE_DISPATCH)
        or _torch_function_mode_on()
        or _peek_interpreter() is not None
    ):
        return False
    # _all_plain's loop, inline for the top level: every HOP node of a
    # compiled graph asks, and each Python frame costs there.
    for v in values:
        if isinstance(v, _Tensor):
            plain = _plain_keysets.get(_dispatch_keys(v).raw_repr())
            if plain is None:
                plain = _keyset_is_plain(_dispatch_keys(v))
            if not plain or (type(v) not in _PLAIN_TYPES and _has_torch_function((v,))):
                return False
        elif (type(v) is list or type(v) is tuple) and not _all_plain(v):
            return False
    return True


def _all_plain(values: Iterable[Any]) -> bool:
    # Runs for every operand of every fast-path call (each HOP node of a
    # compiled graph, too): one loop, the keyset lookup inlined.
    for v in values:
        if isinstance(v, _Tensor):
            plain = _plain_keysets.get(_dispatch_keys(v).raw_repr())
            if plain is None:
                plain = _keyset_is_plain(_dispatch_keys(v))
            if not plain:
                return False
            # A subclass with only __torch_function__ carries no Python key.
            if type(v) not in _PLAIN_TYPES and _has_torch_function((v,)):
                return False
        elif type(v) is list or type(v) is tuple:
            if not _all_plain(v):
                return False
    return True


def hop_call_reaches_dense(values: tuple[Any, ...]) -> bool:
    """Whether a HigherOrderOperator called on ``values`` would end in its dense rule.

    Weaker than ``nothing_intercepts_dispatch``, on purpose: a HOP's dense
    rule runs its body (or op) through the full dispatcher, so a sparse,
    nested or conjugated plain-typed tensor is handled by the kernels the
    body calls; only what would take the *HOP call* elsewhere must be
    refused: a dispatch or torch-function mode, a functorch transform, C++
    functionalization or pre-dispatch tracing switched on, a subclass, a
    functional tensor. ``with_effects`` (NOTE [with_effects fast path] in
    hopkit/effects/_hop.py) and BaseHOP's compiled-graph nodes (NOTE [BaseHOP
    plain-eager fast path]) run their dense rule directly when it holds.
    """
    if (
        _len_dispatch_stack()
        or _torch_function_mode_on()
        or _functorch_on()
        or _tls_included(_FUNCTIONALIZE)
        or _tls_included(_PRE_DISPATCH)
    ):
        return False
    # The common case inline (plain tensors, Python scalars): each Python
    # frame costs in compiled code; anything else takes the full walk.
    for v in values:
        t = type(v)
        if t is _Tensor:
            if _is_functional(v):
                return False
        elif t is not int and t is not float and t is not bool and v is not None:
            return plain_hop_values(values)
    return True


def plain_hop_values(values: Any) -> bool:
    """No subclass and no functional tensor among ``values`` (lists and tuples
    looked into): what would take a HOP call off its dense rule."""
    for v in values:
        t = type(v)
        if t in _PLAIN_TYPES:
            # C++ functional wrappers (torch.func.functionalize, or unwrapped
            # FunctionalTensors) are plain-typed but dispatch to Functionalize.
            if _is_functional(v):
                return False
            continue
        if isinstance(v, _Tensor):
            return False
        if (t is list or t is tuple) and not plain_hop_values(v):
            return False
    return True


_PROXY_MODE_KEY = torch._C._TorchDispatchModeKey.PROXY
_get_infra_mode = torch._C._get_dispatch_mode


def tracing_underway() -> bool:
    """Whether make_fx, AOTAutograd or torch.export is recording a graph now.

    True while a ``ProxyTorchDispatchMode`` is pushed (it lives in its own
    infra-mode slot in torch 2.11-2.15) or a pre-dispatch trace is under way
    (``make_fx(pre_dispatch=True)``, torch.export's first stage). Dynamo
    traces a HOP call through its own variable and never dispatches it.
    """
    return _get_infra_mode(_PROXY_MODE_KEY) is not None or _tls_included(_PRE_DISPATCH)


@contextlib.contextmanager
def user_modes_suspended() -> Iterator[None]:
    """Pop the user's dispatch modes (not torch's infra modes) for the block.

    torch 2.11-2.15 keep the infra modes (fake, proxy, functional) at the
    bottom of the logical mode stack and the user's modes above them, so
    popping the user stack leaves the infra modes where they are.
    """
    n = _len_dispatch_stack()
    user = sum(
        1 for i in range(n)
        if getattr(torch._C._get_dispatch_stack_at(i), "_mode_key", None) is None
    )
    if not user:
        yield
        return
    popped = [torch._C._pop_torch_dispatch_stack(None) for _ in range(user)]
    try:
        yield
    finally:
        for mode in reversed(popped):
            torch._C._push_on_torch_dispatch_stack(mode)
