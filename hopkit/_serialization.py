"""torch.export.save / load of programs with hopkit HOP nodes.

Registered by ``BaseHOP._register_rules`` through ``register_serialization``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register_serialization"]


def register_serialization(hop: Any) -> None:
    """Make ``torch.export`` save and load ``hop``'s nodes faithfully (nothing yet)."""
