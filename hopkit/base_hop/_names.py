"""Where a hopkit HOP's name lives in torch: the HOP registry and torch.ops.higher_order.

torch 2.11-2.15 keep every HigherOrderOperator by name in
``torch._ops._higher_order_ops`` (torch itself does not refuse a duplicate
name) and expose it as ``torch.ops.higher_order.<name>``, a module subclass
that caches ops as attributes.
"""

from __future__ import annotations

import torch

__all__ = ["hop_namespace_reserves", "publish_hop", "registered_hop"]


def registered_hop(name: str) -> torch._ops.HigherOrderOperator | None:
    return torch._ops._higher_order_ops.get(name)


def hop_namespace_reserves(name: str) -> bool:
    """Whether ``torch.ops.higher_order.<name>`` is the namespace's own attribute.

    The namespace keeps its own state in instance attributes (``_dir``) and
    inherits module attributes (``__class__``, ``__getattr__``, ...); a HOP of
    such a name would overwrite that state or never be found there.
    """
    namespace = torch.ops.higher_order
    if (name.startswith("__") and name.endswith("__")) or hasattr(type(namespace), name):
        return True
    if name in vars(namespace):  # a cached HOP is fine; anything else is state
        return not isinstance(vars(namespace)[name], torch._ops.HigherOrderOperator)
    return False


def publish_hop(hop: torch._ops.HigherOrderOperator) -> None:
    """Make ``torch.ops.higher_order.<name>`` the newest instance.

    `torch.ops.higher_order` caches an op as an attribute on first access, so
    a HOP re-created under the same name (a module reload) would otherwise stay
    shadowed by the old instance. (Setting the op's own cached attribute is
    what torch's namespace does itself on first access.)
    """
    namespace = torch.ops.higher_order
    if hop.__name__ in vars(namespace):
        setattr(namespace, hop.__name__, hop)
