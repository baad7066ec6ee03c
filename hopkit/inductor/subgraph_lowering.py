"""Lower a pointwise FX subgraph to Inductor IR without creating buffers.

    PointwiseSubgraphLowering(gm, V.graph).run(*inputs).graph_outputs
        -> the subgraph's outputs as unrealized Inductor IR (TensorBox, ...)

    lower_pointwise_subgraph(subgraph, [InputDescriptor(dtype, device), ...])
        -> inner(*scalars) -> tuple of scalars, for use inside the inner
           function of ir.Pointwise / ir.Reduction / ir.Scan

A reimplementation of ``torch/_inductor/subgraph_lowering.py``: an
``fx.Interpreter`` whose every node goes through Inductor's own lowerings,
standing in for ``V.graph`` so that any attempt to create a buffer (or to
mutate one) is caught and reported with the op that made it. An op is admitted
by what its lowering does, not by its pointwise tag: ``aten.full``,
``aten.where``, indexing with constants and views all lower without a buffer
and are accepted; a reduction, an extern kernel or an eager fallback create a
buffer and are refused.

Differences from the original, all on the side of safety:

* ``run`` installs the lowering as ``V.graph`` itself, so a caller cannot
  forget to, and on failure it puts back every ``TensorBox``/``StorageBox``
  of its inputs that a half-done lowering changed (``StorageBox.realize``
  swaps in a ``ComputedBuffer`` *before* registering it). After a
  ``SubgraphLoweringException`` the surrounding graph is as it was, so the
  caller can lower the same subgraph op by op instead.
* ``V.graph.current_node`` is the subgraph node being lowered (lowerings such
  as ``sym_size`` read its ``meta["val"]``), and its origins name it.
* Every failure is a ``SubgraphLoweringException`` naming the op and node;
  an error deep inside a lowering is wrapped, never surfaced as a bare assert.
* Arguments are checked where they are given (the constructor, ``run``,
  ``lower_pointwise_subgraph``), and a wrong one raises a ``TypeError`` that
  says what was expected, what was given and the fix, never an
  ``AttributeError`` from deep inside. An ``OpOverloadPacket`` in
  ``allowed_mutations`` or ``additional_lowerings`` stands for all its
  overloads (FX graphs call overloads, so a packet would never match).
* The scalar function is recorded with common-subexpression elimination into
  a small program (``LoweredPointwiseFn``) whose ``code`` can be printed;
  ``ops.masked`` bodies and ``ops.indirect_indexing`` are supported.

The HOP-facing entry point, used by ``hopkit.BaseHOP``'s Inductor lowering,
is ``hopkit.inductor.fusion.lower_hop_pointwise``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeAlias, cast

import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._inductor import exc as inductor_exc
from torch._inductor import ir
from torch._inductor.graph import GraphLowering
from torch._inductor.ops_handler import DefaultHandler
from torch._inductor.virtualized import NullHandler, OpsValue, V, ops
from torch.utils._mode_utils import no_dispatch

from hopkit import _compat

__all__ = [
    "InputDescriptor",
    "LoweredPointwiseFn",
    "PointwiseSubgraphLowering",
    "SubgraphInput",
    "SubgraphLoweringException",
    "lower_pointwise_subgraph",
]

FailureReason = Literal[
    "buffer",  # a lowering tried to register a buffer or an operation
    "mutation",  # a lowering tried to mutate a buffer
    "missing_lowering",  # Inductor has no lowering for the op
    "fallback",  # Inductor would run the op as an eager fallback kernel
    "lowering_error",  # the op's lowering raised
    "unsupported_node",  # call_module / call_method / odd get_attr
    "inputs",  # wrong number of inputs
    "output",  # an output that cannot be used as asked
]


class SubgraphLoweringException(inductor_exc.SubgraphLoweringException):
    """A subgraph could not be lowered without creating buffers.

    Subclasses torch's ``torch._inductor.exc.SubgraphLoweringException`` (a
    ``RuntimeError``), so code catching torch's class catches hopkit's too.

    Attributes:
        reason: what went wrong, one of ``FailureReason``.
        op: the op whose lowering failed (an ``OpOverload``, a HOP, a Python
            callable), or None.
        node: the name of the subgraph node being lowered, or None.
        problem: why that op cannot be lowered here, as a clause ("its
            lowering creates a buffer (...)"), or None.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: FailureReason,
        op: object = None,
        node: str | None = None,
        problem: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason: FailureReason = reason
        self.op = op
        self.node = node
        self.problem = problem


def _op_failure(
    reason: FailureReason, op: object, node: str | None, problem: str, fix: str
) -> SubgraphLoweringException:
    return SubgraphLoweringException(
        f"hopkit: cannot lower {_what(op, node)} inside a pointwise subgraph: "
        f"{problem}. {fix}",
        reason=reason,
        op=op,
        node=node,
        problem=problem,
    )


def op_name(target: object) -> str:
    """A readable name for an FX call target: ``aten.mm.default``,
    ``torch.ops.higher_order.my_hop``, ``operator.mul``."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"torch.ops.higher_order.{target.name()}"
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None) or repr(target)
    if module in ("_operator", "operator"):
        module = "operator"
    return f"{module}.{qualname}" if module else str(qualname)


def _what(op: object, node: str | None) -> str:
    if op is None:
        return f"node '{node}'" if node is not None else "the subgraph"
    return f"{op_name(op)} (node '{node}')" if node is not None else op_name(op)


# ---------------------------------------------------------------------------
# PointwiseSubgraphLowering
# ---------------------------------------------------------------------------

LoweringDict = dict[Any, Callable[..., Any]]


class PointwiseSubgraphLowering(torch.fx.Interpreter):
    """Lower a pointwise subgraph to Inductor IR, creating no buffers.

    Contract: ``run(*inputs)`` takes the subgraph's inputs as Inductor values
    (``TensorBox`` for tensors, ``int``/``sympy.Expr`` for sizes and scalars),
    lowers each node with ``additional_lowerings`` (first) or Inductor's own
    lowerings, and leaves the lowered outputs, unrealized, in
    ``graph_outputs`` (a list, one entry per output of the subgraph). It
    raises ``SubgraphLoweringException`` naming the op when a lowering would
    register a buffer or operation, mutate a buffer (unless the op is in
    ``allowed_mutations``), or when an op has no lowering; the surrounding
    graph is then left as it was. Must run inside an Inductor lowering
    (``V.graph`` set), whose graph is ``root_graph_lowering``.

    Arguments: ``gm`` a ``torch.fx.GraphModule``; ``root_graph_lowering``
    the graph being lowered (``V.graph``: a ``GraphLowering``, or a subgraph
    lowering standing in for one); ``allowed_mutations`` None or a set of ops;
    ``additional_lowerings`` None or a dict ``{op: lowering_fn}``. Anything
    else raises ``TypeError`` here, as do example tensors given to ``run``.
    """

    graph_outputs: list[Any] | None
    root_graph: GraphLowering
    allowed_mutations: frozenset[Any] | None
    additional_lowerings: LoweringDict | None
    buffers: list[ir.Buffer]
    mutated_buffers: set[str]
    current_node: torch.fx.Node | None

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        root_graph_lowering: GraphLowering,
        allowed_mutations: Any = None,
        additional_lowerings: LoweringDict | None = None,
    ) -> None:
        # Every argument is checked before anything is built.
        gm = _check_graph_module(gm, "PointwiseSubgraphLowering", "gm")
        _check_root_graph(root_graph_lowering)
        mutations = _check_allowed_mutations(allowed_mutations)
        extra = _check_additional_lowerings(additional_lowerings)
        super().__init__(gm)
        # fx.Interpreter would append "While executing ..." to our messages.
        self.extra_traceback = False
        self.root_graph = root_graph_lowering
        self.allowed_mutations = mutations
        self.additional_lowerings = extra
        self.graph_outputs = None
        self.buffers = []
        self.mutated_buffers = set()
        self.current_node = None
        self._current_op: object = None
        self._subgraphs: dict[str, ir.Subgraph] = {}

    # -- running ------------------------------------------------------------

    def run(
        self,
        *args: Any,
        initial_env: dict[torch.fx.Node, Any] | None = None,
        enable_io_processing: bool = True,
    ) -> Any:
        """Lower the subgraph on ``args``; see the class docstring."""
        placeholders = self.graph.find_nodes(op="placeholder")
        if initial_env is None and len(args) != len(placeholders):
            raise SubgraphLoweringException(
                f"hopkit: the subgraph takes {len(placeholders)} inputs "
                f"({', '.join(p.name for p in placeholders)}), but {len(args)} "
                "were given to PointwiseSubgraphLowering.run.",
                reason="inputs",
            )
        _check_run_inputs(args, placeholders)
        snapshot = _snapshot_boxes(args)
        try:
            with V.set_graph_handler(cast(GraphLowering, self)):
                return super().run(
                    *args,
                    initial_env=initial_env,
                    enable_io_processing=enable_io_processing,
                )
        except BaseException:
            # Undo what a half-done lowering did to the caller's IR.
            for box, data in snapshot:
                box.data = data
            raise

    def run_node(self, n: torch.fx.Node) -> Any:
        previous = self.current_node
        self.current_node = n
        try:
            with V.set_current_node(n), ir.IRNode.current_origins(_origins(n)):
                return super().run_node(n)
        finally:
            self.current_node = previous

    @contextlib.contextmanager
    def _op_context(self, op: object) -> Iterator[None]:
        previous = self._current_op
        self._current_op = op
        try:
            yield
        finally:
            self._current_op = previous

    def _node_name(self) -> str | None:
        return self.current_node.name if self.current_node is not None else None

    # -- node kinds ----------------------------------------------------------

    def call_function(
        self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if target is operator.getitem and isinstance(args[0], (list, tuple, dict)):
            return super().call_function(target, args, kwargs)
        node = self._node_name()
        with self._op_context(target):
            lowering = self._find_lowering(target)
            try:
                return lowering(*args, **kwargs)
            except SubgraphLoweringException:
                raise
            except Exception as e:
                raise _op_failure(
                    "lowering_error",
                    target,
                    node,
                    f"its lowering raised {type(e).__name__}: {e}",
                    "Lower the subgraph op by op to see the error in context.",
                ) from e

    def _find_lowering(self, target: Any) -> Callable[..., Any]:
        node = self._node_name()
        if self.additional_lowerings is not None:
            extra = self.additional_lowerings.get(target)
            if extra is not None:
                return extra
        if (
            self.current_node is not None
            and isinstance(target, torch._ops.OpOverload)
            and _compat.inductor_falls_back_on_types(self.current_node)
        ):
            raise _op_failure(
                "fallback",
                target,
                node,
                "Inductor runs it as an eager fallback kernel because of its "
                "dtypes (e.g. complex), and that creates a buffer",
                "Move the op out of the subgraph, or lower the subgraph op by op.",
            )
        if not isinstance(target, torch._ops.OpOverloadPacket) and hasattr(
            target, "_inductor_lowering_function"
        ):
            # A pattern-matcher replacement that is its own lowering.
            return cast(Callable[..., Any], target)
        lowering = _compat.find_inductor_lowering(target)
        if lowering is None:
            raise _op_failure(
                "missing_lowering",
                target,
                node,
                "Inductor has no lowering for it, and an eager fallback kernel "
                "would create a buffer",
                "Pass one in additional_lowerings={op: fn}, or lower the subgraph "
                "op by op.",
            )
        return lowering

    def call_module(
        self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        raise self._unsupported_node("call_module", target)

    def call_method(
        self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        raise self._unsupported_node("call_method", target)

    def _unsupported_node(self, kind: str, target: object) -> SubgraphLoweringException:
        node = self._node_name()
        return _op_failure(
            "unsupported_node",
            None,
            node,
            f"it is a {kind} of {target!r}, and only placeholder, get_attr, "
            "call_function and output nodes can be lowered",
            "Trace the subgraph to ATen ops first (make_fx or torch.compile do).",
        )

    def get_attr(
        self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.fx.GraphModule):
            # A nested HOP's body, as GraphLowering.get_attr gives it.
            if target not in self._subgraphs:
                self._subgraphs[target] = ir.Subgraph(name=target, graph_module=value)
            return self._subgraphs[target]
        if isinstance(value, torch.Tensor):
            with no_dispatch():
                if value.dim() == 0:
                    return ir.Constant(
                        value=value.item(), dtype=value.dtype, device=value.device
                    )
            # A read-only constant: no buffer is registered for it.
            return self.root_graph.add_tensor_constant(value, target)
        raise self._unsupported_node("get_attr", target)

    def output(
        self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        (value,) = args
        self.graph_outputs = (
            list(value) if isinstance(value, (list, tuple)) else [value]
        )
        return value

    # -- the parts of GraphLowering that create or mutate buffers -------------

    def _approved_mutator(self) -> bool:
        return (
            self.allowed_mutations is not None
            and self._current_op in self.allowed_mutations
        )

    def register_buffer(self, buffer: ir.Buffer, *, set_name: bool = False) -> str:
        if self._approved_mutator():
            name = self.root_graph.register_buffer(buffer, set_name=set_name)
            self.buffers.append(buffer)
            return name
        raise self._buffer_error()

    def register_operation(self, op: ir.Operation) -> str:
        if self._approved_mutator():
            return self.root_graph.register_operation(op)
        raise self._buffer_error()

    def _buffer_error(self) -> SubgraphLoweringException:
        op, node = self._current_op, self._node_name()
        return _op_failure(
            "buffer",
            op,
            node,
            "its lowering creates a buffer (a reduction, an extern or fallback "
            "kernel, or an input that must be realized first)",
            "Move the op out of the subgraph, or lower the subgraph op by op.",
        )

    def mark_buffer_mutated(self, name: str) -> None:
        if self._approved_mutator():
            self.mutated_buffers.add(name)
            self.root_graph.mark_buffer_mutated(name)
            return
        op, node = self._current_op, self._node_name()
        raise _op_failure(
            "mutation",
            op,
            node,
            f"it mutates buffer '{name}', and only ops in allowed_mutations may",
            "Make the subgraph functional, or pass the op in allowed_mutations "
            "if the mutation is intended.",
        )

    def __getattr__(self, name: str) -> Any:
        # Everything else (sizevars, constants, get_dtype, ...) is the root's.
        if name == "root_graph":
            raise AttributeError(name)
        return getattr(self.root_graph, name)


# -- input checks: each message says what was expected, what was given, and the fix


def _check_graph_module(
    gm: object, where: str, name: str, expected: str = "a torch.fx.GraphModule"
) -> torch.fx.GraphModule:
    if isinstance(gm, torch.fx.GraphModule):
        return gm
    if isinstance(gm, ir.Subgraph):
        fix = "pass its graph_module"
    elif "ir.Subgraph" in expected:
        fix = (
            "trace the function first (make_fx), or pass the ir.Subgraph Inductor "
            "gave the lowering"
        )
    else:
        fix = (
            "trace the function first (make_fx), or pass ir.Subgraph.graph_module "
            "for an Inductor subgraph"
        )
    raise TypeError(
        f"hopkit: {where} needs {name} to be {expected}, but got "
        f"{_described(gm)}; {fix}."
    )


def _check_root_graph(root: object) -> None:
    # V.graph while lowering: a GraphLowering, or a subgraph lowering (hopkit's
    # or torch's) standing in for one when HOPs nest. Both have these.
    if all(hasattr(root, a) for a in ("register_buffer", "register_operation", "sizevars")):
        return
    raise TypeError(
        "hopkit: PointwiseSubgraphLowering needs root_graph_lowering to be the "
        "GraphLowering being lowered, but got "
        f"{_described(root)}; pass V.graph from inside an Inductor lowering."
    )


def _expand_packet(op: object) -> list[object]:
    """An OpOverloadPacket stands for all its overloads: FX graphs call those."""
    if isinstance(op, torch._ops.OpOverloadPacket):
        return [getattr(op, name) for name in op.overloads()]
    return [op]


def _check_allowed_mutations(ops: object) -> frozenset[Any] | None:
    if ops is None:
        return None
    if isinstance(ops, (str, bytes, Mapping)) or not isinstance(ops, Collection):
        raise TypeError(
            "hopkit: PointwiseSubgraphLowering needs allowed_mutations to be None or "
            f"a set of ops, but got {_described(ops)}; pass e.g. "
            "allowed_mutations={torch.ops.aten.add_.Tensor}."
        )
    out: list[object] = []
    for i, op in enumerate(ops):
        if not callable(op):
            raise TypeError(
                "hopkit: PointwiseSubgraphLowering needs allowed_mutations to hold "
                f"ops (OpOverloads or callables), but element {i} is "
                f"{_described(op)}; pass the ops whose mutations are intended, e.g. "
                "torch.ops.aten.add_.Tensor."
            )
        out.extend(_expand_packet(op))
    return frozenset(out)


def _check_additional_lowerings(lowerings: object) -> LoweringDict | None:
    if lowerings is None:
        return None
    if not isinstance(lowerings, Mapping):
        raise TypeError(
            "hopkit: PointwiseSubgraphLowering needs additional_lowerings to be None "
            f"or a dict mapping ops to lowering functions, but got "
            f"{_described(lowerings)}; pass e.g. "
            "additional_lowerings={torch.ops.aten.relu.default: my_lowering}."
        )
    for op, fn in lowerings.items():
        if not callable(fn):
            raise TypeError(
                "hopkit: PointwiseSubgraphLowering needs additional_lowerings to map "
                f"each op to a lowering function, but additional_lowerings[{op_name(op)}] "
                f"is {_described(fn)}; pass a callable taking the op's lowered "
                "arguments."
            )
    out: LoweringDict = {}
    packets = [op for op in lowerings if isinstance(op, torch._ops.OpOverloadPacket)]
    for packet in packets:
        for overload in _expand_packet(packet):
            out[overload] = lowerings[packet]
    # An overload named on its own wins over its packet.
    out.update((op, fn) for op, fn in lowerings.items() if op not in packets)
    return out


def _check_run_inputs(args: Sequence[Any], placeholders: Sequence[torch.fx.Node]) -> None:
    for i, (arg, placeholder) in enumerate(zip(args, placeholders)):
        leaves, _ = pytree.tree_flatten_with_path(arg)
        for path, leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                where = f"input {i}{pytree.keystr(path)} (placeholder '{placeholder.name}')"
                raise TypeError(
                    "hopkit: PointwiseSubgraphLowering.run takes the subgraph's inputs "
                    "as Inductor values (TensorBox, int, sympy.Expr), but "
                    f"{where} is {_described(leaf)}; pass the TensorBoxes the "
                    "lowering received (V.graph.graph_inputs[name] for a graph "
                    "input), not example tensors."
                )


def _described(x: object) -> str:
    """``None``, ``an int``, ``a list``, ``a torch.Tensor``, ``a FakeTensor``."""
    if x is None:
        return "None"
    name = "torch.Tensor" if type(x) is torch.Tensor else type(x).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _origins(n: torch.fx.Node) -> Any:
    from torch.utils._ordered_set import OrderedSet

    return OrderedSet([n])


def _snapshot_boxes(values: Sequence[Any]) -> list[tuple[ir.MutableBox, ir.IRNode]]:
    """Every MutableBox reachable from ``values`` with its current contents."""
    seen: set[int] = set()
    out: list[tuple[ir.MutableBox, ir.IRNode]] = []
    for leaf in pytree.tree_leaves(list(values)):
        node: Any = leaf
        for _ in range(64):  # views nest; a bound keeps a cycle from hanging us
            if not isinstance(node, ir.IRNode):
                break
            if isinstance(node, ir.MutableBox) and id(node) not in seen:
                seen.add(id(node))
                out.append((node, node.data))
            node = getattr(node, "data", None)
    return out


# ---------------------------------------------------------------------------
# lower_pointwise_subgraph: a scalar inner function with CSE
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputDescriptor:
    """A scalar (0-d) tensor input of ``lower_pointwise_subgraph``."""

    dtype: torch.dtype
    device: torch.device

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(
                f"hopkit: InputDescriptor.dtype must be a torch.dtype, but got "
                f"{self.dtype!r}; pass e.g. torch.float32."
            )
        if not isinstance(self.device, torch.device):
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise TypeError(
                    "hopkit: InputDescriptor.device must be a torch.device or a "
                    f"device string, but got {self.device!r}; pass e.g. "
                    'torch.device("cpu").'
                ) from None
            object.__setattr__(self, "device", device)


SubgraphInput: TypeAlias = "InputDescriptor | int | sympy.Basic"


@dataclasses.dataclass(frozen=True)
class _Ref:
    """The value in ``slot`` (an input, or an op's result); ``item`` picks one
    result of a multi-output op."""

    slot: int
    item: int | None = None


@dataclasses.dataclass
class _Instr:
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    slot: int
    body: _Block | None = None  # ops.masked's body


@dataclasses.dataclass
class _Block:
    instrs: list[_Instr]
    result: Any = None


# Ops that return a tuple of values, with their arity.
_MULTI_OUTPUT_OPS = {"frexp": 2}
# Ops that make no sense on scalars, or write memory.
_UNSUPPORTED_OPS = frozenset(
    {"store", "store_reduction", "reduction", "scan", "sort", "output"}
)
# Ops kept even when repeated.
_NO_CSE_OPS = frozenset({"check_bounds", "device_assert_async"})


def _cse_key(x: Any) -> Hashable:
    if isinstance(x, _Ref):
        return ("ref", x.slot, x.item)
    if isinstance(x, float):
        return ("float", repr(x))  # keeps -0.0 and 0.0 apart
    if isinstance(x, (bool, int, str, type(None))):
        return (type(x).__name__, x)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_cse_key(v) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, _cse_key(v)) for k, v in sorted(x.items())))
    try:
        hash(x)
    except TypeError:
        return ("id", id(x))
    return ("obj", type(x).__name__, x)


def _unwrap(x: Any) -> Any:
    if isinstance(x, OpsValue):
        return x.value
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


class _Recorder(DefaultHandler):
    """An ops handler that records the scalar program, with CSE."""

    def __init__(self, num_inputs: int) -> None:
        self.block = _Block([])
        self.cse: dict[Hashable, Any] = {}
        self.num_slots = num_inputs
        self.num_inputs = num_inputs
        self.indirect: dict[sympy.Symbol, _Ref] = {}

    def _default(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        args, kwargs = _unwrap(args), {k: _unwrap(v) for k, v in kwargs.items()}
        if name == "placeholder":
            (index,) = args
            return _Ref(index)
        if name == "masked":
            return self._masked(*args, **kwargs)
        if name in _UNSUPPORTED_OPS or any(callable(a) for a in args):
            raise SubgraphLoweringException(
                f"hopkit: lower_pointwise_subgraph cannot record ops.{name}: a "
                "scalar inner function can only hold elementwise ops.",
                reason="output",
            )
        key = (name, _cse_key(args), _cse_key(kwargs))
        if name not in _NO_CSE_OPS and key in self.cse:
            return self.cse[key]
        slot = self.num_slots
        self.num_slots += 1
        self.block.instrs.append(_Instr(name, args, kwargs, slot))
        out: Any
        if name == "indirect_indexing":
            # Indexing code does sympy arithmetic on the result: hand it a
            # symbol, replaced by the real index when the program is replayed.
            out = sympy.Symbol(f"hopkit_indirect{slot}", integer=True)
            self.indirect[out] = _Ref(slot)
        elif name in _MULTI_OUTPUT_OPS:
            out = tuple(_Ref(slot, i) for i in range(_MULTI_OUTPUT_OPS[name]))
        else:
            out = _Ref(slot)
        self.cse[key] = out
        return out

    def _masked(self, mask: Any, body: Callable[[], Any], other: Any) -> _Ref:
        # The body is traced by Inductor as its own block later on, so it must
        # not reuse values of the enclosing block: it starts a fresh CSE scope.
        outer_block, outer_cse = self.block, self.cse
        self.block, self.cse = _Block([]), {}
        try:
            self.block.result = _unwrap(body())
            inner = self.block
        finally:
            self.block, self.cse = outer_block, outer_cse
        slot = self.num_slots
        self.num_slots += 1
        self.block.instrs.append(_Instr("masked", (mask, other), {}, slot, inner))
        return _Ref(slot)


class LoweredPointwiseFn:
    """A scalar function recorded from a pointwise subgraph.

    ``fn(*inputs)`` replays the recorded ops on the current ops handler
    (``V.get_ops_handler()``) and returns a tuple, one value per output of the
    subgraph. Call it inside the inner function of an ``ir.Pointwise``,
    ``ir.Reduction`` or ``ir.Scan``, with one argument per input given to
    ``lower_pointwise_subgraph`` (arguments for ``int``/``sympy`` inputs are
    ignored: their value was fixed when lowering). Values wrapped in
    ``OpsValue`` come back wrapped. ``code`` shows the recorded program.
    """

    def __init__(
        self,
        block: _Block,
        outputs: tuple[Any, ...],
        num_inputs: int,
        indirect: dict[sympy.Symbol, _Ref],
    ) -> None:
        self._block = block
        self._outputs = outputs
        self.num_inputs = num_inputs
        self._indirect = indirect

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        if len(args) != self.num_inputs:
            raise TypeError(
                f"hopkit: this lowered pointwise subgraph takes {self.num_inputs} "
                f"inputs, but {len(args)} were given."
            )
        wrap = any(isinstance(a, OpsValue) for a in args)
        env: dict[int, Any] = {i: _unwrap(a) for i, a in enumerate(args)}
        self._replay(self._block, env)
        outs = tuple(self._resolve(o, env) for o in self._outputs)
        return tuple(OpsValue(o) for o in outs) if wrap else outs

    def _replay(self, block: _Block, env: dict[int, Any]) -> Any:
        handler = V.get_ops_handler()
        for instr in block.instrs:
            args = self._resolve(instr.args, env)
            kwargs = self._resolve(instr.kwargs, env)
            if instr.body is not None:
                mask, other = args
                env[instr.slot] = handler.masked(
                    mask, self._block_fn(instr.body, env), other
                )
            else:
                env[instr.slot] = getattr(handler, instr.name)(*args, **kwargs)
        return self._resolve(block.result, env)

    def _block_fn(self, block: _Block, env: dict[int, Any]) -> Callable[[], Any]:
        def body() -> Any:
            return self._replay(block, env)

        return body

    def _resolve(self, x: Any, env: dict[int, Any]) -> Any:
        if isinstance(x, _Ref):
            value = env[x.slot]
            return value if x.item is None else value[x.item]
        if isinstance(x, sympy.Basic) and self._indirect:
            subs = {s: env[r.slot] for s, r in self._indirect.items() if s in x.free_symbols}
            return x.xreplace(subs) if subs else x
        if isinstance(x, (list, tuple)):
            return type(x)(self._resolve(v, env) for v in x)
        if isinstance(x, dict):
            return {k: self._resolve(v, env) for k, v in x.items()}
        return x

    @property
    def code(self) -> str:
        """The recorded program as Python-like text."""
        params = ", ".join(f"input{i}" for i in range(self.num_inputs))
        lines = [f"def inner_fn({params}):"]
        self._format_block(self._block, lines, "    ")
        outs = ", ".join(self._format(o) for o in self._outputs)
        lines.append(f"    return ({outs},)" if len(self._outputs) == 1 else f"    return ({outs})")
        return "\n".join(lines)

    def _format_block(self, block: _Block, lines: list[str], indent: str) -> None:
        for instr in block.instrs:
            if instr.body is not None:
                lines.append(f"{indent}def masked_body{instr.slot}():")
                self._format_block(instr.body, lines, indent + "    ")
                lines.append(f"{indent}    return {self._format(instr.body.result)}")
                mask, other = instr.args
                lines.append(
                    f"{indent}tmp{instr.slot} = ops.masked({self._format(mask)}, "
                    f"masked_body{instr.slot}, {self._format(other)})"
                )
                continue
            parts = [self._format(a) for a in instr.args]
            parts += [f"{k}={self._format(v)}" for k, v in instr.kwargs.items()]
            lines.append(f"{indent}tmp{instr.slot} = ops.{instr.name}({', '.join(parts)})")

    def _format(self, x: Any) -> str:
        if isinstance(x, _Ref):
            name = f"input{x.slot}" if x.slot < self.num_inputs else f"tmp{x.slot}"
            return name if x.item is None else f"{name}[{x.item}]"
        if isinstance(x, sympy.Basic) and self._indirect:
            subs = {s: sympy.Symbol(f"tmp{r.slot}") for s, r in self._indirect.items()}
            return str(x.xreplace(subs))
        if isinstance(x, tuple):
            return "(" + "".join(f"{self._format(v)}, " for v in x).rstrip(" ") + ")"
        if isinstance(x, list):
            return "[" + ", ".join(self._format(v) for v in x) + "]"
        return repr(x) if not isinstance(x, sympy.Basic) else str(x)

    def __repr__(self) -> str:
        return f"LoweredPointwiseFn(\n{self.code}\n)"


def _current_graph(what: str) -> GraphLowering:
    graph = V.graph
    if isinstance(graph, NullHandler):
        raise RuntimeError(
            f"hopkit: {what} must be called while Inductor lowers a graph "
            "(inside a lowering, with V.graph set)."
        )
    return graph


def lower_pointwise_subgraph(
    subgraph: ir.Subgraph | torch.fx.GraphModule, inputs: Sequence[SubgraphInput]
) -> LoweredPointwiseFn:
    """Record a pointwise subgraph as a scalar function, with CSE.

    ``inputs`` has one entry per subgraph input: an ``InputDescriptor`` for a
    scalar tensor (its value is supplied when the function is called), or an
    ``int``/``sympy`` value fixed now. Every output must be a 0-d tensor.
    Raises ``SubgraphLoweringException`` naming the op when the subgraph is
    not pointwise. Must be called inside an Inductor lowering (``V.graph``
    set); the result is used inside inner functions, as
    ``associative_scan``'s lowering uses its combine function.
    """
    gm = _check_graph_module(
        subgraph.graph_module if isinstance(subgraph, ir.Subgraph) else subgraph,
        "lower_pointwise_subgraph",
        "subgraph",
        "an ir.Subgraph or a torch.fx.GraphModule",
    )
    _check_subgraph_inputs(gm, inputs)
    root = _current_graph("lower_pointwise_subgraph")

    def placeholder_loader(index: Sequence[Any], input_idx: int) -> Any:
        return ops.placeholder(input_idx)

    graph_inputs: list[Any] = []
    for i, desc in enumerate(inputs):
        if isinstance(desc, InputDescriptor):
            graph_inputs.append(
                ir.Pointwise.create(
                    device=desc.device,
                    dtype=desc.dtype,
                    inner_fn=lambda index, i=i: placeholder_loader(index, i),
                    ranges=[],
                )
            )
        else:
            graph_inputs.append(desc)

    lowering = PointwiseSubgraphLowering(gm, root_graph_lowering=root)
    lowering.run(*graph_inputs)
    assert lowering.graph_outputs is not None  # set by run, or it raised

    recorder = _Recorder(len(inputs))
    outputs: list[Any] = []
    output_nodes = _output_nodes(gm)
    with V.set_ops_handler(recorder):
        for i, out in enumerate(lowering.graph_outputs):
            where = f"output {i}" + (
                f" (node '{output_nodes[i]}')" if i < len(output_nodes) else ""
            )
            if not isinstance(out, ir.IRNode) or not hasattr(out, "make_loader"):
                raise SubgraphLoweringException(
                    f"hopkit: lower_pointwise_subgraph needs tensor outputs, but "
                    f"{where} is {type(out).__name__}.",
                    reason="output",
                )
            if len(out.get_size()) != 0:
                raise SubgraphLoweringException(
                    f"hopkit: lower_pointwise_subgraph needs scalar (0-d) outputs, "
                    f"but {where} has size {list(out.get_size())}; use "
                    "PointwiseSubgraphLowering for subgraphs that build tensors.",
                    reason="output",
                )
            outputs.append(_unwrap(out.make_loader()([])))
    return LoweredPointwiseFn(
        recorder.block, tuple(outputs), len(inputs), recorder.indirect
    )


def _check_subgraph_inputs(gm: torch.fx.GraphModule, inputs: object) -> None:
    placeholders = gm.graph.find_nodes(op="placeholder")
    names = ", ".join(p.name for p in placeholders)
    if isinstance(inputs, (str, bytes, InputDescriptor)) or not isinstance(inputs, Sequence):
        raise TypeError(
            "hopkit: lower_pointwise_subgraph needs inputs to be a list with one "
            f"entry per subgraph input ({names}), but got {_described(inputs)}; "
            "pass e.g. [InputDescriptor(torch.float32, torch.device('cpu'))]."
        )
    for i, desc in enumerate(inputs):
        if isinstance(desc, (InputDescriptor, int, sympy.Basic)):
            continue
        fix = (
            f"describe it as InputDescriptor({desc.dtype}, torch.device('{desc.device}'))"
            if isinstance(desc, torch.Tensor)
            else "describe a tensor input with InputDescriptor(dtype, device)"
        )
        raise TypeError(
            f"hopkit: lower_pointwise_subgraph needs inputs[{i}] to be an "
            "InputDescriptor, an int or a sympy expression, but it is "
            f"{_described(desc)}; {fix}."
        )
    if len(inputs) != len(placeholders):
        raise SubgraphLoweringException(
            f"hopkit: lower_pointwise_subgraph needs one input per subgraph input "
            f"({len(placeholders)}: {names}), but got {len(inputs)}; pass one "
            "InputDescriptor, int or sympy expression for each.",
            reason="inputs",
        )


def _output_nodes(gm: torch.fx.GraphModule) -> list[str]:
    (out,) = gm.graph.find_nodes(op="output")
    value = out.args[0]
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v.name if isinstance(v, torch.fx.Node) else repr(v) for v in values]
