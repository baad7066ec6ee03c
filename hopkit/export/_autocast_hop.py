"""``wrap_with_autocast``: run a subgraph under an autocast state, as one HOP node.

    wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *args)

In plain Python::

    def wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *args):
        with torch.autocast(device_type, dtype, enabled, cache_enabled):
            return subgraph(*args)

It appears as ``torch.ops.higher_order.hopkit_wrap_with_autocast``; the four
configuration arguments are positional and come before the subgraph, as in
torch's own (Python-only) ``wrap_with_autocast``, so graphs read the same.

Every rule comes from :class:`hopkit.BaseHOP` (hopkit/base_hop.py): dense,
autograd, functionalize, fake, proxy, the Dynamo variable and the Inductor
lowering; this class only names its positional configuration
(``leading_config``) and the context those rules run the subgraph under
(``subgraph_context``). Under a tracer that applies autocast (make_fx,
AOTAutograd, ``run_decompositions``) the casts become explicit ops of the
traced body, so Inductor can lower the body like any other: there is no
autocast in Inductor IR. Backward runs outside the autocast state, as in eager
(NOTE [BaseHOP autograd: one joint trace, partitioned, cached]).

``replace_autocast_with_hop_pass`` (``_pass.py``) produces calls of this HOP
from the ``_enter_autocast`` / ``_exit_autocast`` pairs of pre-dispatch graphs.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch

from hopkit.base_hop import BaseHOP

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
        if len(args) >= 4 and not kwargs:
            _check_config(*args[:4])
        elif kwargs:
            raise TypeError(
                f"hopkit: wrap_with_autocast takes no keyword arguments, but got "
                f"{sorted(kwargs)}; pass (device_type, dtype, enabled, cache_enabled, "
                f"subgraph, *args) positionally."
            )
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


def _check_config(device_type: Any, dtype: Any, enabled: Any, cache_enabled: Any) -> None:
    """Refuse a bad autocast configuration before anything is dispatched."""
    problems = []
    if not isinstance(device_type, str):
        problems.append(f"device_type must be a str such as 'cpu', but is {device_type!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        problems.append(f"dtype must be a torch.dtype or None, but is {dtype!r}")
    if not isinstance(enabled, bool):
        problems.append(f"enabled must be a bool, but is {enabled!r}")
    if cache_enabled is not None and not isinstance(cache_enabled, bool):
        problems.append(f"cache_enabled must be a bool or None, but is {cache_enabled!r}")
    if problems:
        raise TypeError(
            "hopkit: wrap_with_autocast(device_type, dtype, enabled, cache_enabled, "
            "subgraph, *args): " + "; ".join(problems) + "."
        )


wrap_with_autocast = WrapWithAutocast()
