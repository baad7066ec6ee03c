"""The ``hopkit_with_effects`` HOP: one effectful call, ordered by a token.

    with_effects(token, op, *args, **kwargs) -> (new_token, *outputs)

means, as plain Python::

    def with_effects(token, op, *args, **kwargs):
        out = op(*args, **kwargs)
        new_token = new_token_tensor()
        return (new_token, *out) if isinstance(out, tuple) else (new_token, out)

Functionalization emits it for every call of a registered op
(hopkit/effects/_handle_effects.py) and for every HOP call whose subgraph has
effects (hopkit/effects/_regions.py). Its other rules live elsewhere, all
listed in the registration block at the bottom: the Inductor lowering in
hopkit/inductor/effects_lowering.py, the hooks that make AOTAutograd, the
partitioner and torch.export accept it in hopkit/effects/_torch_integration.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._C import DispatchKey
from torch._ops import HigherOrderOperator, OpOverload
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import (
    ProxyTorchDispatchMode,
    disable_proxy_modes_tracing,
    track_tensor_tree,
)

from hopkit import _fx
from hopkit._dispatch import hop_call_reaches_dense as _hop_call_reaches_dense
from hopkit._dispatch import plain_hop_values as _all_plain
from hopkit.effects._registry import OpType, aliases, describe, display_name
from hopkit.effects._tokens import new_token_tensor

__all__ = ["WithEffects", "with_effects"]


# ---------------------------------------------------------------------------
# The HOP and its entry point
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
        # NOTE [with_effects fast path]: with plain tensors and nothing
        # intercepting dispatch, HigherOrderOperator dispatch would end in the
        # dense rule anyway (autograd falls through, the op handles its own);
        # going there directly saves ~20us per call in compiled (aot_eager)
        # graphs, where every effectful call runs through here. "Nothing
        # intercepting": no dispatch or torch-function mode, no functorch
        # transform (functorch's functionalize included), no C++
        # functionalization or pre-dispatch tracing switched on, and plain
        # (non-subclass, non-functional) tensors only.
        # hopkit._dispatch.hop_call_reaches_dense, not
        # nothing_intercepts_dispatch: that reads every tensor's dispatch key
        # set, ~1us more per call (benchmarks/bench_effects.py's aot_eager
        # row must stay within 1.05x unregistered), and is stricter than
        # needed: the dense rule calls ``op`` through the full dispatcher, so
        # a sparse, nested or conjugated plain-typed tensor is handled by the
        # op's own kernels.
        # The checks are ordered cheapest first; a compiled graph's calls pass
        # None (the first) or _RUNTIME_TOKEN (every later one) as the token,
        # recognised by identity, and an op already checked by identity in
        # _CHECKED_IDS (OpOverload's __hash__ is Python code, ~0.1us).
        if (
            (token is None or token is _RUNTIME_TOKEN)
            and not kwargs
            and _CHECKED_IDS.get(id(op)) is op
            and _hop_call_reaches_dense(args)
        ):
            out = op(*args)
            if type(out) is tuple:
                return (_RUNTIME_TOKEN, *out)
            return (_RUNTIME_TOKEN, out)
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
        if (
            _hop_call_reaches_dense(args)
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
        f"one after another, but got {describe(token)}; pass the token returned "
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
    if aliases(op):
        raise ValueError(
            f"hopkit: with_effects cannot wrap {display_name(op)}: its schema "
            f"`{op._schema}` mutates or aliases an argument or output "  # type: ignore[union-attr]
            "(effect tokens order functional ops only); make the op "
            "functional (mutates_args=(), fresh outputs)."
        )
    _CHECKED_OPS.add(op)
    _CHECKED_IDS[id(op)] = op


_CHECKED_OPS: set[Any] = set()
# id(op) -> op for the ops in _CHECKED_OPS; holding the op keeps its id from
# being reused by another object.
_CHECKED_IDS: dict[int, Any] = {}
# What a token may be (besides None): a tensor of any kind (plain, fake,
# functional, tracked by make_fx), or an FX proxy under symbolic tracing.
_TOKEN_TYPES = (torch.Tensor, torch.fx.Proxy)
# The new token of a fast-path call: tokens carry no data and are never
# written, so one shared empty tensor serves every call (allocating one costs
# about as much as the rest of the fast path).
# Made with every dispatch mode off: this module may first be imported while
# a trace runs (a lazy import under FakeTensorMode, e.g. during an export),
# and a fake token handed to eager callers later breaks them.
with torch.utils._python_dispatch._disable_current_modes():
    _RUNTIME_TOKEN = torch.empty(0)


with_effects = WithEffects()


def _install_torch_integration() -> None:
    """The first traced or functionalized call installs hopkit.effects' hooks
    in torch (NOTE [Changing torch only on use, reversibly] in
    hopkit/_patch.py): the graph it makes goes on to AOTAutograd's token
    handling, the partitioner and Inductor, which must accept this HOP."""
    # Imported here, not at the top: _torch_integration wraps torch's
    # functions around this HOP, so it imports this module.
    from hopkit.effects._torch_integration import install

    install()


# ---------------------------------------------------------------------------
# Rules: dense, autograd, functionalize, fake, proxy, functorch
# ---------------------------------------------------------------------------


def with_effects_dense(token: Any, op: OpType, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """Reference semantics: call the op, return a fresh token before its outputs."""
    out = op(*args, **kwargs)
    new_token = new_token_tensor()
    # Spread a tuple (one output per schema return), keep a list whole (a
    # ``Tensor[]`` return is one schema return).
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
    _install_torch_integration()
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
    _install_torch_integration()
    with mode:
        return with_effects_dense(token, op, *args, **kwargs)


def with_effects_proxy(
    mode: ProxyTorchDispatchMode, token: Any, op: OpType, *args: Any, **kwargs: Any
) -> tuple[Any, ...]:
    """One ``hopkit_with_effects`` node; ``op`` is a constant argument, a
    GraphModule argument (a HOP's subgraph) becomes a submodule."""
    _install_torch_integration()
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
        name = _fx.fresh_attr_name(root, "effects_subgraph")
        root.register_module(name, gm)
    return mode.tracer.create_proxy("get_attr", name, (), {})


def with_effects_functorch(
    interpreter: Any, token: Any, op: OpType, *args: Any, **kwargs: Any
) -> tuple[Any, ...]:
    """vmap / grad / jvp: the dense rule at the current level (the op's own
    batching and derivative rules apply; the token needs none)."""
    return with_effects_dense(token, op, *args, **kwargs)


def autograd_dispatch_keys() -> list[torch._C.DispatchKey]:
    """The per-backend Autograd keys that exist in this torch build."""
    names = (
        "AutogradCPU",
        "AutogradCUDA",
        "AutogradXPU",
        "AutogradMPS",
        "AutogradMeta",
        "AutogradHPU",
        "AutogradPrivateUse1",
        "AutogradOther",
    )
    return [getattr(torch._C.DispatchKey, n) for n in names if hasattr(torch._C.DispatchKey, n)]


def functorch_transforms() -> list[Any]:
    """functorch transforms that a HOP must handle itself (functionalize has
    its own registration)."""
    tt = torch._C._functorch.TransformType
    return [tt.Vmap, tt.Grad, tt.Jvp]


# ---------------------------------------------------------------------------
# Registration: one line per key, then every integration
# ---------------------------------------------------------------------------

with_effects.py_impl(DispatchKey.CompositeExplicitAutograd)(with_effects_dense)
for _key in autograd_dispatch_keys():
    with_effects.fallthrough(_key)
with_effects.py_functionalize_impl(with_effects_functionalize)
with_effects.py_impl(FakeTensorMode)(with_effects_fake)
with_effects.py_impl(ProxyTorchDispatchMode)(with_effects_proxy)
for _transform in functorch_transforms():
    with_effects.py_impl(_transform)(with_effects_functorch)
# Not marked side-effectful for FX: the token chain keeps every call alive
# where it must run, and the partitioner copies impure nodes into the backward
# graph whenever their inputs are saved, which would run them twice.
#
# Integrations, installed through hopkit._patch on first use (the first
# register_effectful_op, the first call of this HOP that reaches the
# functionalize, fake or proxy rule, the first subgraph_effects region) by
# hopkit/effects/_torch_integration.py:install, each undone by
# hopkit._patch.undo_all(); see NOTE [hopkit effects inside torch's token
# machinery] there:
#   FunctionalTensorMode -> hopkit  torch._higher_order_ops.effects.has_effects,
#                                   .handle_effects (registered ops; any op
#                                   inside a subgraph_effects region)
#   min-cut partitioner             torch._functorch._aot_autograd.utils.is_with_effects
#   partitioner force-save          torch._functorch.partitioners.force_save_effectful_ops
#   Inductor token unlifting        torch._functorch._aot_autograd.utils.unlift_tokens
#   eager input values              torch.fx.experimental.proxy_tensor._should_save_eager_input_vals
#   ep.module() / unflatten         torch.export._remove_effect_tokens_pass._remove_effect_tokens
#   eager activation checkpointing  torch.utils.checkpoint's non-reentrant generator and
#                                   CheckpointFunction: hopkit/effects/_checkpoint.py
#   Inductor lowering               torch._inductor.lowering.lowerings[with_effects]:
#                                   hopkit/inductor/effects_lowering.py
# Elsewhere in hopkit.effects, not through hopkit._patch:
#   HOP subgraphs                   subgraph_effects (hopkit/effects/_regions.py),
#                                   entered by hopkit.BaseHOP's functionalize rule
#   FX dead-code elimination        registered ops in torch.fx.node's
#                                   _side_effectful_functions, per handle
#                                   (hopkit/effects/_registry.py)
# No Dynamo variable: functionalization emits this HOP; user code does not
# call it under torch.compile (as for torch's own with_effects).
