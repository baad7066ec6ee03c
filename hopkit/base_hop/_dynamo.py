"""BaseHOP's Dynamo integration: the variable Dynamo uses to trace a hopkit HOP call.

Dynamo picks a HOP's variable class by name from
``torch._dynamo.variables.higher_order_ops._hop_name_to_variable_class``
(torch 2.11-2.15) and knows no other way to be taught one. hopkit's class
subclasses Dynamo's ``WrapHigherOrderVariable`` (so it can only be defined
once Dynamo is imported) and allows input mutation (NOTE [BaseHOP input
mutation] in hopkit/base_hop) and aliasing operands (NOTE [Operands that
alias each other]). The entry is set through hopkit._patch, when the first
hopkit HOP is created and Dynamo is (or gets) imported; its handle undoes it.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch

from hopkit import _compat, _patch

__all__ = ["register_dynamo_variable"]

_DYNAMO_HOP_VARIABLES = "torch._dynamo.variables.higher_order_ops"
_variable_class: Any = None


def _make_variable_class(mod: types.ModuleType) -> Any:
    global _variable_class
    if _variable_class is not None:
        return _variable_class

    class HopkitHOPVariable(mod.WrapHigherOrderVariable):  # type: ignore[name-defined]
        """Dynamo's view of a hopkit HOP: trace the subgraph, keep config constant."""

        supports_input_mutation = True
        # Operands may alias (hop(g, x, x[0])): hopkit's functionalize rule
        # handles it, and its fake rule refuses outputs that alias, with a
        # message naming the operand (NOTE [Operands that alias each other]).
        supports_aliasing = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._HOP_NAME = self.value._name

        def python_type(self) -> type:
            return type(self.value)

        def _call_function(self, tx: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
            from hopkit.base_hop import _check_config_names

            hop = self.value
            n = hop._num_leading
            leading = tuple(a.as_python_constant() for a in args[:n])
            config = {k: v.as_python_constant() for k, v in kwargs.items()}
            if config:
                _check_config_names(hop, config)
            # The body is speculated under the HOP's subgraph_context, as every
            # other rule runs it (torch's wrap_with_autocast variable does the
            # same): the example values Dynamo hands the rest of the frame
            # (dtypes under autocast) are then those the call produces.
            context = (
                hop.subgraph_context(hop._config(leading, config))
                if hop._has_context else contextlib.nullcontext()
            )
            with context:
                result = self.create_wrapped_node(
                    tx, args[n], list(args[n + 1 :]), {}, hop._name, subgraph_name="subgraph"
                )
            p_args, _, example_value, body_r, output_vts = _compat.wrapped_node_parts(result)
            return mod._call_function_with_auto_output_flattening(
                tx, hop, (*leading, *p_args), config, example_value, body_r, output_vts
            )

    _variable_class = HopkitHOPVariable
    return HopkitHOPVariable


def register_dynamo_variable(hop: torch._ops.HigherOrderOperator) -> None:
    """Make Dynamo trace ``hop`` with hopkit's variable (when Dynamo is imported)."""

    def register(mod: types.ModuleType) -> None:
        _patch.set_entry(
            mod._hop_name_to_variable_class, hop.__name__, _make_variable_class(mod),
            name=f"{_DYNAMO_HOP_VARIABLES}._hop_name_to_variable_class[{hop.__name__!r}]",
        )

    _patch.when_imported(_DYNAMO_HOP_VARIABLES, register,
                         why=f"register the Dynamo variable of {hop.__name__}")
