"""``wrap_with_autocast``: run a subgraph under an autocast state, as one HOP node.

    wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *args)

In plain Python::

    def wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *args):
        with torch.autocast(device_type, dtype, enabled, cache_enabled):
            return subgraph(*args)

It appears as ``torch.ops.higher_order.hopkit_wrap_with_autocast``; the four
configuration arguments are positional and come before the subgraph, as in
torch's own (Python-only) ``wrap_with_autocast``, so graphs read the same.

Every rule comes from :class:`hopkit.BaseHOP` (hopkit/base_hop/): dense,
autograd, functionalize, fake, proxy, the Dynamo variable and the Inductor
lowering; this class only names its positional configuration
(``leading_config``) and the context those rules run the subgraph under
(``subgraph_context``). Under a tracer that applies autocast (make_fx,
AOTAutograd, ``run_decompositions``) the casts become explicit ops of the
traced body, so Inductor can lower the body like any other: there is no
autocast in Inductor IR. Backward runs outside the autocast state, as in eager
(NOTE [BaseHOP autograd: one joint trace, partitioned] in hopkit/base_hop).

``replace_autocast_with_hop_pass`` (``_pass.py``) produces calls of this HOP
from the ``_enter_autocast`` / ``_exit_autocast`` pairs of pre-dispatch graphs.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch
import torch.fx

from hopkit.base_hop import BaseHOP, FunctionWithNoFreeVars

__all__ = ["WrapWithAutocast", "wrap_with_autocast"]


class WrapWithAutocast(BaseHOP):
    """The HOP class of :data:`wrap_with_autocast`."""

    leading_config: ClassVar[tuple[str, ...]] = ("device_type", "dtype", "enabled", "cache_enabled")

    def __init__(self) -> None:
        super().__init__("hopkit_wrap_with_autocast")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``subgraph(*args)`` under ``torch.autocast(device_type, dtype, enabled, cache_enabled)``.

        Args:
            device_type: ``"cpu"``, ``"cuda"``, ... as for ``torch.autocast``.
            dtype: the autocast dtype, or ``None`` for the current one.
            enabled: whether autocast is on inside the subgraph.
            cache_enabled: the weight-cache flag, or ``None`` for the current one.
            subgraph: a ``torch.fx.GraphModule`` or ``hopkit.FunctionWithNoFreeVars``
                (any callable inside ``torch.compile``).
            *args: the subgraph's operands.

        Returns:
            What ``subgraph(*args)`` returns (hopkit's pass always builds
            subgraphs that return a tuple).
        """
        if kwargs:
            raise TypeError(
                f"hopkit: wrap_with_autocast takes no keyword arguments, but got "
                f"{sorted(kwargs)}; pass (device_type, dtype, enabled, cache_enabled, "
                f"subgraph, *args) positionally."
            )
        if len(args) >= 4:
            _check_config(args)
        return super().__call__(*args, **kwargs)

    def subgraph_context(self, config: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
        """The autocast state named by the four leading arguments."""
        return torch.autocast(
            config["device_type"],
            dtype=config["dtype"],
            enabled=config["enabled"],
            cache_enabled=config["cache_enabled"],
        )

    def backward_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """Backward runs with autocast off, as eager's backward does.

        Eager's backward ops run in the dtypes autocast chose for their forward
        ops (the traced backward graph has those casts explicitly), not under
        autocast again; re-entering the region's state there would re-cast
        the backward of nested regions.
        """
        return {**config, "enabled": False}


def _check_config(args: tuple[Any, ...]) -> None:
    """Refuse a bad autocast configuration (``args[:4]``) before anything is dispatched."""
    for i, (name, value) in enumerate(zip(WrapWithAutocast.leading_config, args[:4])):
        if isinstance(value, (torch.Tensor, torch.fx.GraphModule, FunctionWithNoFreeVars)) or (
            callable(value) and not isinstance(value, type)
        ):
            # The usual cause: a configuration argument left out, so the
            # subgraph or an operand moved into its place.
            raise TypeError(
                f"hopkit: wrap_with_autocast expects (device_type, dtype, enabled, "
                f"cache_enabled, subgraph, *args), but argument {i} ({name}) is a "
                f"{type(value).__name__}; pass all four configuration arguments before "
                f"the subgraph, e.g. wrap_with_autocast('cpu', torch.bfloat16, True, None, "
                f"subgraph, *args)."
            )
    problems = config_problems(*args[:4])
    if problems:
        raise TypeError(
            "hopkit: wrap_with_autocast(device_type, dtype, enabled, cache_enabled, "
            "subgraph, *args) takes torch.autocast's arguments: "
            + "; ".join(problems)
            + "; pass them as torch.autocast takes them, e.g. ('cpu', torch.bfloat16, "
            "True, None)."
        )


def config_problems(device_type: Any, dtype: Any, enabled: Any, cache_enabled: Any) -> list[str]:
    """What is wrong with an autocast configuration, one phrase per argument (empty: nothing).

    Shared by the HOP's call and the checks of graph nodes that call it
    (``inline_autocast_hops_pass``).
    """
    problems = []
    if not isinstance(device_type, str):
        given = (
            f"a torch.device (use its .type, {device_type.type!r})"
            if isinstance(device_type, torch.device)
            else _given(device_type)
        )
        problems.append(f"device_type must be a str such as 'cpu', but is {given}")
    elif not _autocast_available(device_type):
        problems.append(
            f"device_type must be a device type that autocast supports, such as 'cpu' or "
            f"'cuda', but is {device_type!r}"
        )
    if dtype is not None and not isinstance(dtype, torch.dtype):
        problems.append(f"dtype must be a torch.dtype or None, but is {_given(dtype)}")
    if not isinstance(enabled, bool):
        problems.append(f"enabled must be a bool, but is {_given(enabled)}")
    if cache_enabled is not None and not isinstance(cache_enabled, bool):
        problems.append(f"cache_enabled must be a bool or None, but is {_given(cache_enabled)}")
    return problems


def _given(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _autocast_available(device_type: str) -> bool:
    # torch.autocast refuses such a device type only when the region is
    # entered, which under a tracer is deep inside the trace.
    try:
        return bool(torch.amp.autocast_mode.is_autocast_available(device_type))
    except RuntimeError:  # not a device string at all ("gpu", "")
        return False


wrap_with_autocast = WrapWithAutocast()
