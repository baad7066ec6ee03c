"""Effect tokens: keep side-effectful ops ordered, alive and run exactly once.

    with_effects(token, op, *args, **kwargs) -> (new_token, *outputs)

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

Where each piece lives:

- ``_registry.py``: :class:`EffectType`, :func:`register_effectful_op`,
  :func:`get_effect`, :func:`has_effects`, :func:`has_aliasing` (NOTE [A stack
  of registrations per op], NOTE [One token chain for torch's and hopkit's
  effects]);
- ``_tokens.py``: :func:`new_token_tensor`, the current token of a trace;
- ``_hop.py``: the :data:`with_effects` HOP, its rules, and a registration
  block naming every key and every integration;
- ``_handle_effects.py``: :func:`handle_effects`;
- ``_regions.py``: :class:`subgraph_effects` (NOTE [Effect tokens inside
  subgraphs]);
- ``_torch_integration.py``: the hooks that route AOTAutograd's effect
  handling to hopkit and teach token unlifting, the partitioners and
  ``torch.export``'s token removal about hopkit's HOP (NOTE [hopkit effects
  inside torch's token machinery]), installed on first use;
- ``_checkpoint.py``: eager activation checkpointing (plain, reentrant,
  selective) reusing effectful outputs instead of recomputing them (NOTE
  [Effects under activation checkpointing]), installed with the rest;
- ``hopkit/inductor/effects_lowering.py``: the Inductor lowering of
  ``hopkit_with_effects``, registered when Inductor is imported, so that
  importing this package never imports Inductor.

Importing this package changes nothing in torch: the first
:func:`register_effectful_op`, the first traced call of :data:`with_effects`
or the first :class:`subgraph_effects` region does (NOTE [Changing torch only
on use, reversibly] in hopkit/_patch.py).
"""

from hopkit.effects._handle_effects import handle_effects as handle_effects
from hopkit.effects._hop import with_effects as with_effects
from hopkit.effects._regions import subgraph_effects as subgraph_effects
from hopkit.effects._registry import EffectType as EffectType
from hopkit.effects._registry import get_effect as get_effect
from hopkit.effects._registry import has_aliasing as has_aliasing
from hopkit.effects._registry import has_effects as has_effects
from hopkit.effects._registry import register_effectful_op as register_effectful_op
from hopkit.effects._tokens import new_token_tensor as new_token_tensor

# Reachable here as before the package was split (types for annotations), but
# not in __all__ (SPEC §2 lists the public names).
from hopkit.effects._hop import WithEffects as WithEffects
from hopkit.effects._registry import EffectRegistrationHandle as EffectRegistrationHandle

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
