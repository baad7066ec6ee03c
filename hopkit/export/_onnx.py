"""``onnx_translations``: hopkit HOP calls in ``torch.onnx.export(..., dynamo=True)``.

    table = hopkit.export.onnx_translations()
    onnx_program = torch.onnx.export(model, args, dynamo=True, custom_translation_table=table)

Nothing here imports onnx, onnxscript or torch.onnx until
``onnx_translations`` is called (``pip install "hopkit[onnx]"``).

NOTE [hopkit HOPs in the ONNX exporter]
torch.onnx's dynamo exporter (2.11-2.15) exports the program, runs
``run_decompositions`` (so a ``wrap_with_autocast`` body carries its casts as
explicit ops: NOTE [Inlining wrap_with_autocast as enter/exit] in
``_inline.py``) and translates every GraphModule of the program into an ONNX
local function (domain ``pkg.torch.__subgraph__``, named after the
submodule), innermost first; a node that uses a subgraph receives that
function as an argument, as torch's own ``invoke_subgraph`` translation does.
A HOP node without an entry in the translation table fails ("No ONNX function
found"). hopkit's translation of a call ``hop(*leading, body, *operands,
**config)`` is a call of a local function named after the HOP (name
``hop._name``, domain ``pkg.hopkit.<the body's function name>``, so each body
has its own: onnxruntime does not resolve function overloads), whose graph
calls the body's function; the body's
nodes are tagged with the metadata ``pkg.hopkit.hop`` (the HOP's name) and
the call with ``pkg.hopkit.config`` (its configuration).

Where the exporter keeps local functions, downstream tools see one node per
HOP call. torch.onnx.export itself runs onnxscript's version converter on
every model (and its optimizer with ``optimize=True``), and both inline every
local function, torch's own included: there the body is inlined, values
unchanged, and the region stays visible through the ``pkg.hopkit.hop`` tag
that the inliner copies onto every inlined node.

The translation reaches the exporter's recorder as torch's own HOP
translations do (``torch.onnx._internal.exporter._core.current_tracer``, the
same in 2.11-2.15).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._ops import HigherOrderOperator

from hopkit.base_hop import BaseHOP

__all__ = ["onnx_translations"]

# The ONNX domain of the functions named after hopkit HOPs, and the metadata keys.
HOP_DOMAIN = "pkg.hopkit"
HOP_KEY = "pkg.hopkit.hop"
CONFIG_KEY = "pkg.hopkit.config"


def onnx_translations() -> dict[HigherOrderOperator, Callable[..., Any]]:
    """A ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``.

    One entry per hopkit HOP that exists when it is called (every
    ``hopkit.BaseHOP`` instance, ``hopkit.export.wrap_with_autocast``
    included): create your HOPs first. Each call becomes a call of an ONNX
    local function named after the HOP, or, where the exporter inlines local
    functions (torch.onnx.export always does: NOTE [hopkit HOPs in the ONNX
    exporter]), the body's nodes tagged ``pkg.hopkit.hop``. Values are those
    of the HOP: onnxruntime gives eager's results. Merge it with your own
    table as a dict (``{**onnx_translations(), **mine}``).

    Raises:
        ImportError: onnx or onnxscript is missing; install them with
            ``pip install "hopkit[onnx]"``.
    """
    _check_onnx_installed()
    return {hop: _translation(hop) for hop in _hopkit_hops()}


def _check_onnx_installed() -> None:
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(
            f"hopkit: onnx_translations needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed; install hopkit's onnx "
            f"extra: pip install \"hopkit[onnx]\" (onnx, onnxscript, onnxruntime)."
        )


def _hopkit_hops() -> list[BaseHOP]:
    # Every HigherOrderOperator registers itself by name in torch's HOP
    # registry (hopkit/base_hop/_names.py); the newest instance of a name wins.
    return [hop for hop in torch._ops._higher_order_ops.values() if isinstance(hop, BaseHOP)]


def _translation(hop: BaseHOP) -> Callable[..., Any]:
    n = hop._num_leading

    def translate(*args: Any, **config: Any) -> Any:
        body, operands = args[n], args[n + 1 :]
        return _call_region(hop, body, operands, {**dict(zip(hop.leading_config, args[:n])), **config})

    translate.__name__ = f"hopkit_onnx_{hop._name}"
    translate.__qualname__ = translate.__name__
    return translate


def _call_region(hop: BaseHOP, body: Any, operands: tuple[Any, ...], config: dict[str, Any]) -> Any:
    """Record ``hop``'s region function, called on ``operands``; return its outputs."""
    import onnx_ir as ir
    from torch.onnx._internal.exporter import _core

    tracer = _core.current_tracer
    if tracer is None or not isinstance(body, ir.Function):
        raise RuntimeError(
            f"hopkit: the ONNX translation of {hop._name} runs inside "
            f"torch.onnx.export(..., dynamo=True, custom_translation_table="
            f"hopkit.export.onnx_translations()) only, where its subgraph is an ONNX "
            f"function; got {type(body).__name__} as the subgraph."
        )
    for node in body:
        tags = node.metadata_props.get(HOP_KEY)
        if tags is None:
            node.metadata_props[HOP_KEY] = hop._name
    region = _region_function(hop, body)
    tracer.functions.setdefault(region.identifier(), region)
    call = ir.Node(
        region.domain,
        region.name,
        inputs=list(operands),
        num_outputs=len(body.outputs),
        overload=region.overload,
    )
    call.metadata_props[HOP_KEY] = hop._name
    call.metadata_props[CONFIG_KEY] = repr(config)
    tracer.nodes.append(call)
    outs = list(call.outputs)
    if len(outs) == 1 and _returns_one_value(body):
        return outs[0]
    return outs


def _region_function(hop: BaseHOP, body: Any) -> Any:
    """``pkg.hopkit.<body>::<hop>``: a function that calls ``body``, named after the HOP.

    The body's function name goes into the domain, not the overload:
    onnxruntime (1.2x-1.3x) does not resolve function overloads.
    """
    import onnx_ir as ir

    inputs = [ir.Value(name=f"input_{i}") for i in range(len(body.inputs))]
    call = ir.Node(
        body.domain, body.name, inputs=inputs, num_outputs=len(body.outputs), overload=body.overload
    )
    for i, out in enumerate(call.outputs):
        out.name = f"output_{i}"
    graph = ir.Graph(
        inputs, call.outputs, nodes=[call], name=hop._name,
        opset_imports={body.domain: 1},
    )
    return ir.Function(f"{HOP_DOMAIN}.{body.name}", hop._name, "", graph=graph, attributes=())


def _returns_one_value(body: Any) -> bool:
    """Whether the FX body behind ``body`` returns a value rather than a tuple of one.

    The exporter records the FX node of every value it creates
    (``meta["node"]``); the output node of that node's graph says.
    """
    value = body.outputs[0]
    fx_node = value.meta.get("node")
    if fx_node is None and value.producer() is not None:
        fx_node = value.producer().meta.get("node")
    if not isinstance(fx_node, torch.fx.Node):
        return False
    out = fx_node.graph.output_node().args[0]
    return not isinstance(out, (tuple, list))
