"""``handle_effects``: thread one effectful call's token during functionalization.

hopkit's counterpart of torch's ``torch._higher_order_ops.effects.
handle_effects``. FunctionalTensorMode asks torch's ``has_effects`` and calls
torch's ``handle_effects`` for every effectful op it sees; for ops registered
with hopkit (and for every op inside a ``subgraph_effects`` region) those are
routed here (hopkit/effects/_torch_integration.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch._ops import HigherOrderOperator, OpOverload

from hopkit.effects._hop import with_effects
from hopkit.effects._registry import OpType, describe, display_name, get_effect
from hopkit.effects._regions import record_in_region
from hopkit.effects._tokens import current_token

__all__ = ["handle_effects"]


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

    Inside a HOP's subgraph (see NOTE [Effect tokens inside subgraphs] in
    hopkit/effects/_regions.py) the call stays a plain call and the enclosing
    HOP call is threaded instead.
    """
    _check_handle_effects_args(tokens, op, args, kwargs)
    key = get_effect(op)
    if key is None:
        raise RuntimeError(
            f"hopkit: handle_effects called for {display_name(op)}, which has "
            "no registered effect; register it with register_effectful_op first."
        )
    if key in tokens and not isinstance(tokens[key], torch.Tensor):
        raise TypeError(
            f"hopkit: {_HANDLE_EFFECTS} expects each value of tokens to be a "
            f"token tensor, but tokens[{key}] is {describe(tokens[key])}; keep "
            "the tokens that new_token_tensor() and handle_effects put there."
        )
    from torch._subclasses.functional_tensor import PythonFunctionalizeAPI

    ctx = PythonFunctionalizeAPI()
    unwrapped_args = ctx.unwrap_tensors(tuple(args))
    unwrapped_kwargs = ctx.unwrap_tensors(kwargs)  # type: ignore[arg-type]

    if record_in_region(key):
        with ctx.redispatch_to_next():
            out = op(*unwrapped_args, **unwrapped_kwargs)
        return ctx.wrap_tensors(out)

    token = current_token(allow_token_discovery, tokens, key, op)
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
            f"FunctionalTensorMode's _tokens), but got {describe(tokens)}; pass "
            "the dict of current tokens ({} to start a chain, with "
            "allow_token_discovery=True), which handle_effects updates in place."
        )
    if not isinstance(op, (OpOverload, HigherOrderOperator)):
        raise TypeError(
            f"hopkit: {_HANDLE_EFFECTS} expects op to be an OpOverload or a "
            f"HigherOrderOperator, but got {describe(op)}; pass the op being "
            "called (e.g. torch.ops.mylib.log.default)."
        )
    if not isinstance(args, (tuple, list)):
        raise TypeError(
            f"hopkit: {_HANDLE_EFFECTS} expects args to be a tuple or list of "
            f"the op's positional arguments, but got {describe(args)}; pass "
            "them as a tuple, e.g. (x,)."
        )
    if not isinstance(kwargs, dict):
        raise TypeError(
            f"hopkit: {_HANDLE_EFFECTS} expects kwargs to be a dict of the op's "
            f"keyword arguments, but got {describe(kwargs)}; pass {{}} for none."
        )


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
