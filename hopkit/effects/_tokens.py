"""Effect tokens themselves: a fresh one, and the current one of a trace.

A token is an empty tensor whose value is never read; what matters is which
call consumes it and which call produces the next one (the module docstring
of hopkit.effects). Functionalization keeps the current token per effect type
in its mode's ``_tokens`` dict, as torch's own effect handling does; hopkit's
``handle_effects`` and ``subgraph_effects`` take the token from there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, track_tensor_tree

from hopkit.effects._registry import display_name

__all__ = ["new_token_tensor"]


def new_token_tensor() -> torch.Tensor:
    """A fresh effect token: an empty float tensor. Its value is never read."""
    return torch.tensor([])


def current_token(
    allow_token_discovery: bool, tokens: dict[Any, torch.Tensor], key: Any, op: Any
) -> torch.Tensor:
    """The token to thread for effect ``key``, created if discovery allows."""
    if key in tokens:
        return tokens[key]
    if not allow_token_discovery:
        raise RuntimeError(
            f"hopkit: no effect token for {key} while tracing "
            f"{display_name(op)} (token discovery is off: the effect was not "
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
