"""BaseHOP under torch.func transforms (vmap, grad, jvp): the functorch rules.

Registered by ``BaseHOP._register_rules`` through ``register_functorch_rules``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register_functorch_rules"]


def register_functorch_rules(hop: Any) -> None:
    """Register ``hop``'s rules for torch's functorch transforms (none yet)."""
