"""Lower a HOP whose body is pointwise straight into the surrounding kernel.

    lower_hop_pointwise(hop, subgraph, operands, require=False)
        -> the body's outputs as fresh, unrealized ir.Pointwise nodes
           (the structure of the subgraph's output), or None

Called from ``hopkit.BaseHOP``'s Inductor lowering (``base_hop_inductor`` in
``hopkit/inductor/hop_lowering.py``, through ``lower_hop_pointwise``).

NOTE [Pointwise HOP bodies fuse into their neighbours]
Inlining a HOP's body op by op (``GraphLowering.run_node`` over its nodes)
already lets Inductor fuse it, but through the scheduler: each node is lowered
as if it stood in the outer graph. Lowering the whole body with
``PointwiseSubgraphLowering`` instead gives one unrealized ``ir.Pointwise`` per
output whose inner function *is* the body, so ``relu(hop(g, x)) + 1`` or
``hop(g, x).sum()`` read the body's values straight from the consumer's loop:
one kernel, no buffer for the HOP's outputs, exactly what the inline chain
compiles to. The body's values are realized where Inductor would realize them
in the inlined body, so a chain of fused HOPs compiles as fast as the inlined
chain (NOTE [Pointwise HOP bodies realize like the inlined body]). A body is
"pointwise" when lowering it creates no other buffer; what
fails (a reduction, a matmul, a mutation, an op with no lowering) is named in
the error (``require=True``) or logged to ``hopkit.inductor`` before the
caller inlines the body op by op (``require=False``). A failed attempt leaves
the operands as they were, but for the realizations the inlined body would
make too (see ``PointwiseSubgraphLowering.run``).

Each output is re-wrapped in a fresh ``ir.Pointwise`` whose dtype, device and
size come from the subgraph output node's ``meta["val"]`` (checked against
the lowering; size-1 dimensions and missing leading dimensions of the lowered
value are broadcast), so an output never aliases an operand or another
output, as a HOP's outputs must not.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import sympy
import torch
import torch.fx
from torch._inductor import ir
from torch._inductor.virtualized import V, ops
from torch.utils._ordered_set import OrderedSet

from hopkit.inductor.subgraph_lowering import (
    PointwiseSubgraphLowering,
    SubgraphLoweringException,
    _current_graph,
    _snapshot_boxes,
    op_name,
)

__all__ = ["lower_hop_pointwise"]

log = logging.getLogger("hopkit.inductor")


def lower_hop_pointwise(
    hop: object,
    subgraph: ir.Subgraph | torch.fx.GraphModule,
    operands: Sequence[Any],
    *,
    require: bool = False,
) -> Any:
    """Lower a HOP call whose body is pointwise into the surrounding kernel.

    Contract: call it from the HOP's Inductor lowering, with ``V.graph`` the
    graph being lowered. ``hop`` names the HOP in messages (a
    ``HigherOrderOperator``, a string, or None); ``subgraph`` is the body (the
    ``ir.Subgraph`` Inductor passes to lowerings, or its ``GraphModule``);
    ``operands`` are the body's inputs as the lowering received them
    (``TensorBox``, ``int``, ``sympy.Expr``). Returns what inlining the body
    would return (the output node's value: a tuple, a list or a single value)
    with every tensor output a fresh, unrealized ``ir.Pointwise`` in a
    ``TensorBox`` and non-tensor outputs (sizes) passed through. When the
    body cannot be lowered without a buffer it returns None, having logged
    the reason, so the caller can inline the body op by op; with
    ``require=True`` it raises ``SubgraphLoweringException`` naming the HOP
    and the op instead. Either way the surrounding graph is changed only as
    Inductor's lowering of the inlined body would change it: an operand that
    the body reads more than once, or a body value, is realized where
    Inductor's realize heuristics say so (NOTE [Pointwise HOP bodies realize
    like the inlined body]).
    """
    root = _current_graph("lower_hop_pointwise")
    gm = subgraph.graph_module if isinstance(subgraph, ir.Subgraph) else subgraph
    what = _hop_description(hop)
    try:
        lowering = _HopBodyLowering(gm, root_graph_lowering=root)
        lowering.run(*operands)
        assert lowering.graph_outputs is not None  # set by run, or it raised
        (output_node,) = gm.graph.find_nodes(op="output")
        value = output_node.args[0]
        out_nodes = list(value) if isinstance(value, (list, tuple)) else [value]
        # The body's nodes are the outputs' origins, so kernels are named
        # after the ops they compute, as for the inlined body.
        body_nodes = OrderedSet(n for n in gm.graph.nodes if n.op == "call_function")
        with ir.IRNode.current_origins(body_nodes):
            fresh = [
                _fresh_output(out, node, i)
                for i, (out, node) in enumerate(zip(lowering.graph_outputs, out_nodes))
            ]
    except SubgraphLoweringException as e:
        if require:
            raise SubgraphLoweringException(
                f"hopkit: {what} requires its body to fuse into the surrounding "
                f"kernel, but {_cause(e)}. Move that op out of the body, or let "
                "the HOP lower its body op by op (BaseHOP.inductor_mode = 'auto').",
                reason=e.reason,
                op=e.op,
                node=e.node,
                problem=e.problem,
            ) from e
        log.info("hopkit: lowering the body of %s op by op: %s", what, _cause(e))
        return None
    if isinstance(value, (list, tuple)):
        return type(value)(fresh)
    return fresh[0]


# NOTE [Pointwise HOP bodies realize like the inlined body]
# GraphLowering.run_node does more than lower a node: after each one it
# applies Inductor's realize heuristics. A value read by more than one node is
# realized when recomputing it would cost too much (``StorageBox.mark_reuse``:
# a heavy op on CPU, a large inner function, many reads); a value that has
# gathered many reads is realized (``has_exceeded_max_reads``, then
# ``realize_hint``); so is a Pointwise whose inner function has grown past 100
# ops. Without them every inner function calls its inputs' inner functions
# once per use, so a chain of n HOPs whose body reads an operand twice
# (``(t * u).tanh() + t``) evaluates the first body 2**n times, in every
# pass that walks the IR (op counts, read sets, the scheduler's loop bodies,
# code generation): compile time doubled with each call in the chain.
#
# ``_HopBodyLowering`` applies the same heuristics, with the same thresholds,
# to every node of the body, and to each operand as the body reads it (an
# operand read by k nodes of the body is, in the inlined program, a value with
# k users). What Inductor would realize for the inlined body is realized, in
# the root graph, so a fused chain costs what the inlined chain costs, and its
# kernels are the same. These are the only buffers a fused body may create:
# any other (a reduction, an extern or fallback kernel, a mutation) still
# stops the fusion. Operands are marked before the body is lowered, outside
# the rollback of ``PointwiseSubgraphLowering.run``, because the inlined
# program realizes them as well; a body that then fails to fuse is lowered op
# by op on the realized operands. A buffer realized inside a body that later
# fails is left unused in the root graph, and Inductor's scheduler removes it
# as dead code. Nested HOPs nest the rule: the inner body's realizations go
# through the outer ``_HopBodyLowering`` to the root graph, while a plain
# ``PointwiseSubgraphLowering`` around them refuses them as buffers.

_realizing: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "hopkit_inductor_realizing", default=False
)


@contextlib.contextmanager
def _realizing_like_inductor() -> Iterator[None]:
    token = _realizing.set(True)
    try:
        yield
    finally:
        _realizing.reset(token)


class _HopBodyLowering(PointwiseSubgraphLowering):
    """PointwiseSubgraphLowering that realizes values as GraphLowering.run_node
    would for the inlined body; see NOTE [Pointwise HOP bodies realize like
    the inlined body]."""

    def run(
        self,
        *args: Any,
        initial_env: dict[torch.fx.Node, Any] | None = None,
        enable_io_processing: bool = True,
    ) -> Any:
        placeholders = self.graph.find_nodes(op="placeholder")
        if initial_env is None and len(args) == len(placeholders):
            _mark_operand_reuse(placeholders, args)
        return super().run(
            *args, initial_env=initial_env, enable_io_processing=enable_io_processing
        )

    def call_function(
        self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        result = super().call_function(target, args, kwargs)
        node = self.current_node
        if node is not None and isinstance(result, ir.TensorBox):
            try:
                with _realizing_like_inductor():
                    _realize_like_run_node(result, len(node.users))
            except SubgraphLoweringException:
                raise
            except Exception as e:
                raise SubgraphLoweringException(
                    f"hopkit: cannot lower {op_name(target)} (node '{node.name}') "
                    f"inside a pointwise subgraph: Inductor's realize heuristics "
                    f"raised {type(e).__name__}: {e}. Lower the subgraph op by op.",
                    reason="lowering_error",
                    op=target,
                    node=node.name,
                    problem=f"Inductor's realize heuristics raised {type(e).__name__}: {e}",
                ) from e
        return result

    def _approved_mutator(self) -> bool:
        return _realizing.get() or super()._approved_mutator()


def _mark_operand_reuse(placeholders: Sequence[torch.fx.Node], operands: Sequence[Any]) -> None:
    """``operand.mark_reuse(k)`` for each operand that k > 1 body nodes read,
    as GraphLowering.run_node does for a value with k users; see NOTE
    [Pointwise HOP bodies realize like the inlined body]."""
    for placeholder, operand in zip(placeholders, operands):
        users = len(placeholder.users)
        if users <= 1 or not isinstance(operand, ir.TensorBox):
            continue
        snapshot = _snapshot_boxes([operand])
        try:
            with _realizing_like_inductor():
                operand.mark_reuse(users)
        except BaseException:
            # Refused (by a plain PointwiseSubgraphLowering around us): put
            # the operand back as it was before StorageBox.realize began.
            for box, data in snapshot:
                box.data = data
            raise


def _realize_like_run_node(result: ir.TensorBox, users: int) -> None:
    """The realize heuristics GraphLowering.run_node applies to a node's
    lowered value (torch 2.11-2.15), less those for graph outputs and for
    users that need fixed layouts (extern kernels, which a fused body cannot
    hold)."""
    if users > 1:
        result.mark_reuse(users)
    if result.has_exceeded_max_reads():
        result.realize_hint()
    data = result.data
    if isinstance(data, ir.StorageBox) and isinstance(data.data, ir.Pointwise):
        if data.data.has_large_inner_fn(threshold=100):
            result.realize()


def _hop_description(hop: object) -> str:
    if hop is None:
        return "the HOP"
    if isinstance(hop, str):
        return hop
    return op_name(hop)


def _cause(e: SubgraphLoweringException) -> str:
    """What stopped the fusion, as a clause."""
    if e.problem is not None:
        what = op_name(e.op) if e.op is not None else "node"
        where = f" (node '{e.node}')" if e.node is not None else ""
        return f"{what}{where} in it cannot be fused: {e.problem}"
    message = str(e)
    return message[len("hopkit: "):] if message.startswith("hopkit: ") else message


def _fresh_output(out: Any, node: Any, index: int) -> Any:
    """``out`` as a new Pointwise with the metadata of ``node.meta["val"]``."""
    if not isinstance(out, ir.IRNode):
        return out  # an int / sympy size or a None output
    if not hasattr(out, "make_loader"):
        raise SubgraphLoweringException(
            f"hopkit: output {index} of the subgraph lowers to "
            f"{type(out).__name__}, which cannot be read from a pointwise kernel.",
            reason="output",
        )
    where = f"output {index}" + (
        f" (node '{node.name}')" if isinstance(node, torch.fx.Node) else ""
    )
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    src_dtype = out.get_dtype()
    lowered_size = list(out.get_size())
    device: torch.device | None
    if isinstance(val, torch.Tensor):
        dtype, device = val.dtype, val.device
        size = [_as_expr(s) for s in val.shape]
        if out.get_device() is not None and out.get_device() != device:
            raise SubgraphLoweringException(
                f"hopkit: {where} of the subgraph is on {device}, but its lowering "
                f"is on {out.get_device()}.",
                reason="output",
            )
    else:
        dtype, device, size = src_dtype, out.get_device(), lowered_size
    if device is None:
        raise SubgraphLoweringException(
            f"hopkit: {where} of the subgraph has no device.", reason="output"
        )
    index_map = _broadcast_index_map(lowered_size, size, where)
    # Keep Inductor's form of each size where the two agree.
    ranges = [
        lowered_size[j] if j is not None and not broadcast else s
        for s, (j, broadcast) in zip(size, index_map)
    ]
    loader = out.make_loader()

    def inner_fn(index: Sequence[sympy.Expr]) -> Any:
        src_index: list[Any] = [sympy.S.Zero] * len(lowered_size)
        for i, (j, broadcast) in zip(index, index_map):
            if j is not None:
                src_index[j] = sympy.S.Zero if broadcast else i
        value = loader(src_index)
        if src_dtype != dtype:
            value = ops.to_dtype(value, dtype, src_dtype=src_dtype)
        return value

    return ir.Pointwise.create(device=device, dtype=dtype, inner_fn=inner_fn, ranges=ranges)


def _as_expr(s: Any) -> sympy.Expr:
    if isinstance(s, torch.SymInt):
        return V.graph.sizevars.simplify(s.node.expr)
    return sympy.Integer(int(s))


def _broadcast_index_map(
    lowered: list[Any], wanted: list[Any], where: str
) -> list[tuple[int | None, bool]]:
    """For each dimension of ``wanted``: the dimension of ``lowered`` it reads
    (None for a missing leading dimension) and whether that one is broadcast."""
    sizevars = V.graph.sizevars
    offset = len(wanted) - len(lowered)
    if offset < 0:
        raise SubgraphLoweringException(
            f"hopkit: {where} of the subgraph has size {wanted}, but its lowering "
            f"has size {lowered}.",
            reason="output",
        )
    out: list[tuple[int | None, bool]] = []
    for d, want in enumerate(wanted):
        j = d - offset
        if j < 0:
            out.append((None, False))
        elif sizevars.statically_known_equals(lowered[j], want):
            out.append((j, False))
        elif sizevars.statically_known_equals(lowered[j], 1):
            out.append((j, True))
        else:
            raise SubgraphLoweringException(
                f"hopkit: {where} of the subgraph has size {wanted}, but its "
                f"lowering has size {lowered}.",
                reason="output",
            )
    return out
