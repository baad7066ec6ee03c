"""BaseHOP's Dynamo integration: the variable Dynamo uses to trace a hopkit HOP call.

Dynamo picks a HOP's variable class by name from
``torch._dynamo.variables.higher_order_ops._hop_name_to_variable_class``
(torch 2.11-2.15) and knows no other way to be taught one. hopkit's class
subclasses Dynamo's ``WrapHigherOrderVariable`` (so it can only be defined
once Dynamo is imported) and allows input mutation (NOTE [BaseHOP input
mutation] in hopkit/base_hop) and aliasing operands (NOTE [Operands that
alias each other]), and reads configuration values as they are (NOTE
[BaseHOP configuration values] in hopkit/base_hop/_config.py). The entry is set through hopkit._patch, when the first
hopkit HOP is created and Dynamo is (or gets) imported; its handle undoes it.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch

from hopkit import _compat, _patch
from hopkit.base_hop import _config, _reuse

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

        def install_subgraph_in_output_graph(
            self, tx: Any, fn_vt: Any, fn_args_vt: Any, kwargs: Any,
            body_gmod: torch.fx.GraphModule, attr_name: str = "subgraph",
        ) -> str:
            # One subgraph_N for every call whose speculated body is identical:
            # NOTE [BaseHOP trace reuse] in hopkit/base_hop/_reuse.py.
            def install() -> str:
                name: str = super(HopkitHOPVariable, self).install_subgraph_in_output_graph(
                    tx, fn_vt, fn_args_vt, kwargs, body_gmod, attr_name)
                return name

            if not getattr(self.value, "reuse_traces", True):
                return install()
            return _reuse.find_installed_body(tx.output, body_gmod, install)

        def _call_function(self, tx: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
            from hopkit.base_hop import _check_config_names

            hop = self.value
            n = hop._num_leading
            try:
                # Refused here, at the call, as in eager: NOTE [BaseHOP
                # configuration values] in hopkit/base_hop/_config.py.
                leading = tuple(
                    _config.config_from_variable(hop._name, name, a)
                    for name, a in zip(hop.leading_config, args[:n])
                )
                config = {k: _config.config_from_variable(hop._name, k, v)
                          for k, v in kwargs.items()}
                if config:
                    _check_config_names(hop, config)
            except TypeError as e:
                from torch._dynamo.exc import UserError, UserErrorType

                raise UserError(UserErrorType.INVALID_INPUT, str(e)) from None
            # The body is speculated under the HOP's subgraph_context, as every
            # other rule runs it (torch's wrap_with_autocast variable does the
            # same): the example values Dynamo hands the rest of the frame
            # (dtypes under autocast) are then those the call produces.
            context = (
                hop.subgraph_context(hop._config(leading, config))
                if hop._has_context else contextlib.nullcontext()
            )
            operands = list(args[n + 1 :])
            # Created with stand-ins, then given the values as they are (FX's
            # tracer would make constructor nodes of dataclasses and named tuples).
            stand_in_leading, stand_in_config = _config.placeholder_config(leading, config)
            graph = tx.output.current_tracer.graph
            # An equal call speculated before: replay it rather than speculate
            # again (NOTE [BaseHOP trace reuse] in hopkit/base_hop/_reuse.py).
            key = _reuse.dynamo_call_key(tx, hop, args[n], operands, leading, config)
            spec = None if key is None else _reuse.find_speculation(tx, key)
            if spec is not None:
                out = _reuse.replay_speculation(tx, hop, spec, operands, stand_in_leading,
                                                stand_in_config)
            else:
                with context:
                    result = self.create_wrapped_node(
                        tx, args[n], operands, {}, hop._name, subgraph_name="subgraph"
                    )
                p_args, _, example_value, body_r, output_vts = _compat.wrapped_node_parts(
                    result)
                if key is not None:
                    _reuse.save_speculation(tx, key, p_args, operands, example_value, body_r,
                                            output_vts)
                out = mod._call_function_with_auto_output_flattening(
                    tx, hop, (*stand_in_leading, *p_args), stand_in_config, example_value,
                    body_r, output_vts,
                )
            if leading or config:
                node = next(nd for nd in reversed(graph.nodes) if nd.target is hop)
                _config.set_node_config(node, leading, config)
            return out

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
