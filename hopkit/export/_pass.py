"""``replace_autocast_with_hop_pass``: autocast regions to ``wrap_with_autocast`` calls.

    gm, sig = replace_autocast_with_hop_pass(gm, graph_signature)

Input: a pre-dispatch graph (``make_fx(f, pre_dispatch=True)`` or the
pre-dispatch stage of ``torch.export``) in which every ``with torch.autocast``
block left a pair of nodes::

    enter = torch.amp.autocast_mode._enter_autocast(device, dtype, enabled, cache)
    ...                                   # the region
    torch.amp.autocast_mode._exit_autocast(enter)

Output: a new GraphModule (the input is not mutated) in which every outermost
region is one call::

    out = wrap_with_autocast(device, dtype, enabled, cache, autocast_body_0, *inputs)
    a = out[0]; b = out[1]                # named like the values they stand for

with the region's nodes in the submodule ``autocast_body_0``, nested regions as
nested calls inside it, and everything outside regions copied back as it was.
The inverse, :func:`hopkit.export.inline_autocast_hops_pass`, lives in
``_export.py``.

NOTE [Linear autocast pass]
torch's in-tree pass splits the graph with ``split_module`` and then inlines
every non-autocast piece back, recompiling the whole GraphModule after each
inline, so it is quadratic in the number of regions. This pass instead makes
four linear walks over the nodes:

1. ``_scan``: pair each exit with its enter through the exit's argument (a
   stack of open regions, not node order), validate, decide which regions are
   wrapped, and record for every node the innermost wrapped region that owns it.
2. ``_liveness``: one backward walk marks live nodes; a region without live
   nodes is dropped with its nodes (and the dead nodes that use them).
3. ``_compute_interfaces``: for every use edge ``n -> m`` whose endpoints sit
   in different regions, walk both owners up to their common ancestor; ``n`` is
   an input of every region on ``m``'s side and an output of every region on
   ``n``'s side. Cost is the nesting depth per crossing edge.
4. ``_emit``: copy every node once into the graph of its owning region,
   emitting a region's HOP call (and one ``getitem`` per output) into the
   parent graph when its exit is reached (``_Rewriter.close``).

Each new graph is turned into a GraphModule (one ``recompile``) exactly once.

NOTE [Redundant autocast regions]
A nested region whose autocast state (device, dtype, enabled, plus the global
cache flag) equals the state the enclosing regions already set is not wrapped:
its nodes belong to the enclosing region. The state around a top-level region
is the caller's, unknown to the pass, so top-level regions are always wrapped,
except in the body of an autocast HOP call found in the graph, whose state is
known (a rewritten graph traced again). Empty regions and regions that compute
only dead code are dropped; a region whose only effect is a side effect (an
in-place update, an assert) becomes a call with zero outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Any

import torch
import torch.fx
from torch._higher_order_ops.wrap import wrap_with_autocast as _torch_wrap_with_autocast
from torch.export.graph_signature import ExportGraphSignature

from hopkit.export._autocast_hop import wrap_with_autocast

__all__ = ["replace_autocast_with_hop_pass", "is_enter_autocast", "is_exit_autocast"]

_ENTER = torch.amp.autocast_mode._enter_autocast
_EXIT = torch.amp.autocast_mode._exit_autocast
# Calls whose subgraph runs under the autocast state of their first four
# arguments: hopkit's HOP, and torch's (from graphs torch.export already rewrote).
_AUTOCAST_HOPS = (wrap_with_autocast, _torch_wrap_with_autocast)

# Node meta that describes where a value was *computed*; it does not belong on
# a placeholder that merely receives the value.
_PLACEHOLDER_META_DROP = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn")

AutocastState = tuple[str, Any, bool, Any]


def is_enter_autocast(node: torch.fx.Node) -> bool:
    """True for a ``torch.amp.autocast_mode._enter_autocast`` call node."""
    return node.op == "call_function" and node.target is _ENTER


def is_exit_autocast(node: torch.fx.Node) -> bool:
    """True for a ``torch.amp.autocast_mode._exit_autocast`` call node."""
    return node.op == "call_function" and node.target is _EXIT


def _describe(node: torch.fx.Node) -> str:
    return f"node '{node.name}' ({node.format_node()})"


@dataclasses.dataclass(eq=False)
class _Region:
    """One ``_enter_autocast`` .. ``_exit_autocast`` pair that becomes a HOP call."""

    enter: torch.fx.Node
    state: AutocastState
    parent: _Region | None  # innermost enclosing *wrapped* region; None is the graph
    depth: int
    index: int  # order of the enter node among wrapped regions
    # Ordered sets (dict keys) of original nodes, in order of first use.
    inputs: dict[torch.fx.Node, None] = dataclasses.field(default_factory=dict)
    outputs: dict[torch.fx.Node, None] = dataclasses.field(default_factory=dict)
    live: bool = False  # some node inside (or nested) is live: the region is kept


@dataclasses.dataclass(eq=False)
class _Open:
    """An entered, not yet exited region during the scan (wrapped or not)."""

    enter: torch.fx.Node
    region: _Region | None  # None when the region is redundant (not wrapped)
    known: dict[str, tuple[Any, bool]]  # device -> (dtype, enabled) inside it
    cache: Any  # global autocast-cache flag inside it
    innermost: _Region | None  # the innermost wrapped region at this level


@dataclasses.dataclass
class _Scan:
    regions: list[_Region]
    region_of_enter: dict[torch.fx.Node, _Region | None]
    owner: dict[torch.fx.Node, _Region | None]


def _enter_state(node: torch.fx.Node) -> AutocastState:
    args = tuple(node.args)
    if node.kwargs or len(args) != 4 or not isinstance(args[0], str):
        raise ValueError(
            f"hopkit.export: expected _enter_autocast(device_type, dtype, enabled, "
            f"cache_enabled) with 4 positional arguments, but got {_describe(node)}; "
            f"this pass expects graphs produced by pre-dispatch tracing."
        )
    if any(isinstance(a, torch.fx.Node) for a in args):
        raise ValueError(
            f"hopkit.export: the autocast arguments of {_describe(node)} must be "
            f"constants, not graph values."
        )
    return (args[0], args[1], bool(args[2]), args[3])


def _scan(graph: torch.fx.Graph, around: AutocastState | None) -> _Scan:
    """Pair enters with exits, validate, pick wrapped regions, assign owners.

    ``around`` is the autocast state the whole graph runs under, when known
    (the graph is the body of a ``wrap_with_autocast`` call).
    """
    stack: list[_Open] = []
    if around is not None:
        d, dt, en, ce = around
        stack.append(_Open(graph.output_node(), None, {d: (dt, en)}, ce, None))
    base = len(stack)
    closed: set[torch.fx.Node] = set()
    regions: list[_Region] = []
    region_of_enter: dict[torch.fx.Node, _Region | None] = {}
    owner: dict[torch.fx.Node, _Region | None] = {}

    def innermost() -> _Region | None:
        return stack[-1].innermost if stack else None

    for node in graph.nodes:
        if is_enter_autocast(node):
            state = _enter_state(node)
            device, dtype, enabled, cache = state
            outer_known = stack[-1].known if stack else {}
            outer_cache = stack[-1].cache if stack else None
            # NOTE [Redundant autocast regions]: None arguments inherit the
            # state around them, exactly as torch.autocast resolves them.
            if device in outer_known:
                if dtype is None:
                    dtype = outer_known[device][0]
                if cache is None:
                    cache = outer_cache
            redundant = (
                device in outer_known
                and outer_known[device] == (dtype, enabled)
                and outer_cache is not None
                and cache == outer_cache
            )
            region: _Region | None = None
            if not redundant:
                parent = innermost()
                region = _Region(
                    enter=node,
                    state=state,
                    parent=parent,
                    depth=1 if parent is None else parent.depth + 1,
                    index=len(regions),
                )
                regions.append(region)
            known = dict(outer_known)
            known[device] = (dtype, enabled)
            stack.append(_Open(node, region, known, cache, region or innermost()))
            region_of_enter[node] = region
            for user in node.users:
                if not is_exit_autocast(user):
                    raise ValueError(
                        f"hopkit.export: the autocast handle {_describe(node)} is used by "
                        f"{_describe(user)}; only _exit_autocast may use it."
                    )
        elif is_exit_autocast(node):
            target = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            if not isinstance(target, torch.fx.Node) or not is_enter_autocast(target):
                raise ValueError(
                    f"hopkit.export: exit without enter: {_describe(node)} does not take "
                    f"the result of an _enter_autocast node as its only argument."
                )
            if target in closed:
                raise ValueError(
                    f"hopkit.export: exit without enter: {_describe(node)} exits the "
                    f"region entered at '{target.name}', which was already exited."
                )
            if len(stack) == base or stack[-1].enter is not target:
                open_names = ", ".join(repr(o.enter.name) for o in stack[base:]) or "none"
                raise ValueError(
                    f"hopkit.export: mismatched exit: {_describe(node)} exits the region "
                    f"entered at '{target.name}', but the innermost open region was "
                    f"entered at '{stack[-1].enter.name if len(stack) > base else None}' "
                    f"(open regions, outermost first: {open_names}); autocast regions "
                    f"must nest."
                )
            stack.pop()
            closed.add(target)
            if node.users:
                raise ValueError(
                    f"hopkit.export: the result of {_describe(node)} is used by "
                    f"{_describe(next(iter(node.users)))}; _exit_autocast returns nothing."
                )
        elif node.op == "output":
            if len(stack) > base:
                raise ValueError(
                    f"hopkit.export: unbalanced autocast regions: the region entered at "
                    f"{_describe(stack[-1].enter)} is never exited."
                )
            owner[node] = None
        elif node.op == "placeholder":
            owner[node] = None  # inputs always belong to the top level
        else:
            r = innermost()
            owner[node] = r
    if len(stack) > base:  # a graph without an output node
        raise ValueError(
            f"hopkit.export: unbalanced autocast regions: the region entered at "
            f"{_describe(stack[-1].enter)} is never exited."
        )
    return _Scan(regions, region_of_enter, owner)


def _depth(r: _Region | None) -> int:
    return 0 if r is None else r.depth


def _liveness(graph: torch.fx.Graph, scan: _Scan) -> set[torch.fx.Node]:
    """Mark live regions; return the nodes that are dropped with dead regions.

    A node is live if it is an output, has side effects, or a live node uses
    it. A region is kept if it holds a live node other than a view of values
    from outside (those are rebuilt outside anyway, NOTE [Region outputs that
    alias]); a live view in a dropped region moves to the nearest kept
    ancestor. The other nodes of a dropped region are dead, and so is every
    node that uses one of them: those are dropped. Other dead code stays.
    """
    owner = scan.owner
    live: set[torch.fx.Node] = set()
    for node in reversed(graph.nodes):
        if node not in owner:  # enter / exit
            continue
        if (
            node.op == "output"
            or (node.op != "placeholder" and node.is_impure())
            or any(u in live for u in node.users)
        ):
            live.add(node)
            r = owner[node]
            if r is not None and not r.live and not _is_view(node):
                while r is not None and not r.live:
                    r.live = True
                    r = r.parent
    dropped: set[torch.fx.Node] = set()
    for node in graph.nodes:
        r = owner.get(node)
        if r is not None and not r.live:
            if node in live:
                while r is not None and not r.live:
                    r = r.parent
                owner[node] = r
            else:
                dropped.add(node)
                continue
        if any(a in dropped for a in node.all_input_nodes):
            dropped.add(node)
    return dropped


def _is_view(node: torch.fx.Node) -> bool:
    step = _alias_step(node)
    return step is not None and not step[1]


def _compute_interfaces(graph: torch.fx.Graph, scan: _Scan, dropped: set[torch.fx.Node]) -> None:
    """NOTE [Linear autocast pass], step 3: inputs and outputs of every region."""
    owner = scan.owner
    for m in graph.nodes:
        if m not in owner or m in dropped:  # enter / exit, dead code
            continue
        rm = owner[m]
        for n in m.all_input_nodes:
            # get_attr nodes are re-created in every graph that uses them, so a
            # submodule or constant never travels as an operand.
            if n.op == "get_attr":
                continue
            rn = owner[n]
            a, b = rm, rn
            while a is not b:
                da, db = _depth(a), _depth(b)
                if da >= db:
                    assert a is not None  # depth > 0
                    a.inputs.setdefault(n, None)
                    a = a.parent
                if db >= da:
                    assert b is not None
                    b.outputs.setdefault(n, None)
                    b = b.parent


def _get_attr_path(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


class _Builder:
    """A graph under construction: the top-level graph or one region's body."""

    def __init__(self, graph: torch.fx.Graph, region: _Region | None) -> None:
        self.graph = graph
        self.region = region
        self.env: dict[torch.fx.Node, torch.fx.Node] = {}
        self.attrs: dict[str, Any] = {}


def _graph_module(b: _Builder) -> torch.fx.GraphModule:
    """``GraphModule(b.attrs, b.graph)``, compiling ``b.graph`` and nothing else.

    ``GraphModule.__init__`` recompiles every GraphModule child as well, which
    would compile a body once per enclosing region (NOTE [Linear autocast
    pass]). The bodies are already compiled, so they are attached afterwards.
    """
    stand_in = torch.nn.Module()
    subs = {k: v for k, v in b.attrs.items() if isinstance(v, torch.fx.GraphModule)}
    root = {k: (stand_in if k in subs else v) for k, v in b.attrs.items()}
    gm = torch.fx.GraphModule(root, b.graph, class_name="GraphModule")
    for target, sub in subs.items():
        *path, leaf = target.split(".")
        owner: torch.nn.Module = gm
        for atom in path:
            owner = getattr(owner, atom)
        setattr(owner, leaf, sub)
    return gm


_Memo = dict[tuple[int, "AutocastState | None"], torch.fx.GraphModule]


def _state_around_body(get_attr: torch.fx.Node) -> AutocastState | None:
    """The autocast state a submodule runs under, if only autocast HOPs call it."""
    states = set()
    for user in get_attr.users:
        if not (
            user.op == "call_function"
            and user.target in _AUTOCAST_HOPS
            and len(user.args) > 4
            and user.args[4] is get_attr
            and get_attr not in user.args[5:]
        ):
            return None
        states.add(tuple(user.args[:4]))
    if len(states) != 1:
        return None
    (state,) = states
    return state  # type: ignore[return-value]


class _Rewriter:
    def __init__(self, gm: torch.fx.GraphModule, memo: _Memo) -> None:
        self.gm = gm
        self.memo = memo
        # Emitted calls whose bodies have side effects (fx does not know a
        # call of this HOP can have them).
        self.effectful_calls: set[torch.fx.Node] = set()
        # Body nodes whose getitem outside takes another name than theirs.
        self.outside_names: dict[torch.fx.Node, str] = {}
        self.taken: set[str] = {n.name for n in gm.graph.nodes}
        self.taken.update(name for name, _ in gm.named_children())
        self.taken.update(name for name, _ in gm.named_parameters(recurse=False))
        self.taken.update(name for name, _ in gm.named_buffers(recurse=False))
        self.taken.update(
            str(n.target).split(".")[0] for n in gm.graph.nodes if n.op in ("get_attr", "call_module")
        )

    def fresh(self, base: str) -> str:
        """``base``, or ``base_<k>``: a name no original node or attribute uses."""
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def lookup(self, b: _Builder, n: torch.fx.Node) -> torch.fx.Node:
        hit = b.env.get(n)
        if hit is not None:
            return hit
        if n.op == "get_attr":
            assert isinstance(n.target, str)
            value = _get_attr_path(self.gm, n.target)
            if isinstance(value, torch.fx.GraphModule):
                value = _rewrite_module(value, self.memo, _state_around_body(n))
            b.attrs[n.target] = value
            new = b.graph.create_node("get_attr", n.target, (), {}, name=n.name, type_expr=n.type)
            new.meta = copy.copy(n.meta)
            b.env[n] = new
            return new
        raise AssertionError(  # the interface computation guarantees every lookup
            f"hopkit.export internal error: {n.name} is not available in the graph of "
            f"{'the top level' if b.region is None else b.region.enter.name}"
        )

    def copy_node(self, b: _Builder, node: torch.fx.Node) -> None:
        if node.op == "get_attr":
            self.lookup(b, node)
            return
        if node.op == "call_module":
            assert isinstance(node.target, str)
            b.attrs[node.target] = _get_attr_path(self.gm, node.target)
        b.env[node] = b.graph.node_copy(node, lambda a: self.lookup(b, a))

    def close(self, child: _Builder, parent: _Builder) -> None:
        """Finish ``child``'s body and emit its HOP call into ``parent``.

        See NOTE [Region outputs that alias]: outputs that are views of the
        region's inputs or of other outputs are recomputed in ``parent``.
        """
        region = child.region
        assert region is not None
        placeholder_of = {ph: i for i, ph in ((i, child.env[i]) for i in region.inputs)}
        body_outputs: dict[torch.fx.Node, None] = {}  # ordered set of body nodes
        plans: list[tuple[torch.fx.Node, torch.fx.Node, list[torch.fx.Node]]] = []
        for o in region.outputs:
            root, chain = _alias_root(child.env[o])
            if chain and not all(_recomputable(c, placeholder_of) for c in chain):
                # A view we cannot rebuild outside (its sizes are computed
                # inside): return a copy. Values are equal; aliasing is lost.
                clone = child.graph.create_node(
                    "call_function", torch.ops.aten.clone.default, (child.env[o],), {},
                    name=self.fresh(f"{o.name}_clone"),
                )
                clone.meta = copy.copy(child.env[o].meta)
                self.outside_names[clone] = o.name
                root, chain = clone, []
            if root not in placeholder_of:
                body_outputs.setdefault(root, None)
            plans.append((o, root, chain))
        # Views that were only there to be returned are rebuilt outside now;
        # remember them before erasing them from the body.
        moved = {c: (c.target, c.args, c.kwargs, c.name, c.type, c.meta) for _, _, ch in plans for c in ch}
        if moved:
            for n in reversed(child.graph.nodes):
                if n in moved and not n.users:
                    child.graph.erase_node(n)
        outputs = list(body_outputs)
        # Side effects inside (a mutation, an assert) keep a call that returns
        # nothing; a region left with neither outputs nor effects (its results
        # were all views of its inputs) is dropped.
        effectful = any(
            n.op == "call_function" and (n in self.effectful_calls or n.is_impure())
            for n in child.graph.nodes
        )
        # Body node -> its value in the parent graph.
        outside: dict[torch.fx.Node, torch.fx.Node] = {
            ph: self.lookup(parent, i) for ph, i in placeholder_of.items()
        }
        if outputs or effectful:
            self.emit_call(child, parent, outputs, effectful, outside)
        g = parent.graph
        for o, root, chain in plans:
            for c in chain:
                if c not in outside:
                    target, args, kwargs, name, type_expr, meta = moved[c]
                    new = g.create_node(
                        "call_function",
                        target,
                        torch.fx.node.map_arg(args, outside.__getitem__),
                        torch.fx.node.map_arg(kwargs, outside.__getitem__),
                        name=name,
                        type_expr=type_expr,
                    )
                    new.meta = copy.copy(meta)
                    outside[c] = new
            parent.env[o] = outside[chain[-1] if chain else root]

    def emit_call(
        self,
        child: _Builder,
        parent: _Builder,
        outputs: list[torch.fx.Node],
        effectful: bool,
        outside: dict[torch.fx.Node, torch.fx.Node],
    ) -> None:
        """The HOP call of ``child``'s region in ``parent``, and one getitem per output."""
        region = child.region
        assert region is not None
        # Operands that only fed views now rebuilt outside are no longer needed.
        operands = []
        for i in region.inputs:
            ph = child.env[i]
            if ph.users:
                operands.append(self.lookup(parent, i))
            else:
                child.graph.erase_node(ph)
        child.graph.output(tuple(outputs))
        body = _graph_module(child)
        attr = self.fresh(f"autocast_body_{region.index}")
        parent.attrs[attr] = body
        g = parent.graph
        enter = region.enter
        shared_meta: dict[str, Any] = {
            k: copy.copy(enter.meta[k]) for k in ("nn_module_stack", "stack_trace") if k in enter.meta
        }
        get_attr = g.create_node("get_attr", attr, (), {}, name=attr)
        get_attr.meta.update(shared_meta)
        args = (*region.state, get_attr, *operands)
        call = g.create_node(
            "call_function", wrap_with_autocast, args, {}, name=self.fresh(f"wrap_with_autocast_{region.index}")
        )
        call.meta.update(shared_meta)
        call.meta["torch_fn"] = ("wrap_with_autocast", "hopkit.export.wrap_with_autocast")
        vals = [o.meta.get("val") for o in outputs]
        if all(v is not None for v in vals):
            call.meta["val"] = tuple(vals)
        if effectful:
            self.effectful_calls.add(call)
        for idx, b in enumerate(outputs):
            name = self.outside_names.get(b, b.name)
            item = g.create_node("call_function", operator.getitem, (call, idx), {}, name=name)
            item.meta = copy.copy(b.meta)
            outside[b] = item


# NOTE [Region outputs that alias]
# hopkit.BaseHOP refuses a subgraph output that shares storage with an operand
# or with another output (no HOP rule can keep that aliasing once
# functionalized). Pre-dispatch graphs are full of ops that may return an
# alias: views (x.t(), x.view(...)), no-op conversions (x.float() of a float
# tensor), in-place ops (x.add_(1) returns x). None of them depends on the
# autocast state, so an output made by such ops is rebuilt outside the region
# from their root instead: the root (an operand, or a fresh tensor the region
# returns once) plus the chain of view ops, copied after the call. In-place
# steps are not repeated; the region already did them. Meaning is unchanged,
# aliasing included. Only where a view's arguments are computed inside the
# region does the region return a copy instead.


def _alias_step(node: torch.fx.Node) -> tuple[torch.fx.Node, bool] | None:
    """``(input it may alias, is_write)`` when ``node``'s result may alias an input."""
    if node.op != "call_function":
        return None
    target = node.target
    if target is operator.getitem:
        src = node.args[0]
        if isinstance(src, torch.fx.Node) and _alias_step(src) is not None:
            return src, False  # an element of split(), unbind(), ...
        return None
    if not isinstance(target, torch._ops.OpOverload):
        return None
    schema = target._schema
    if len(schema.returns) != 1 or schema.returns[0].alias_info is None:
        return None
    ret = schema.returns[0].alias_info
    for idx, arg in enumerate(schema.arguments):
        if arg.alias_info is None or set(arg.alias_info.before_set) != set(ret.before_set):
            continue
        value = node.args[idx] if idx < len(node.args) else node.kwargs.get(arg.name)
        if not isinstance(value, torch.fx.Node):
            return None
        if not ret.is_write and not _may_alias(node, value):
            return None
        return value, ret.is_write
    return None


def _may_alias(node: torch.fx.Node, src: torch.fx.Node) -> bool:
    """Refine "may alias" with metadata for conversions that usually copy."""
    out, inp = node.meta.get("val"), src.meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return True
    packet = getattr(node.target, "overloadpacket", None)
    if packet in (torch.ops.aten.to, torch.ops.aten.type_as):
        return bool(out.dtype == inp.dtype and out.device == inp.device and not node.kwargs.get("copy"))
    if packet is torch.ops.aten.contiguous:
        return bool(inp.is_contiguous())
    return True


def _alias_root(node: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """Follow alias steps back: the root and the view nodes from it to ``node``."""
    chain: list[torch.fx.Node] = []
    n = node
    while (step := _alias_step(n)) is not None:
        src, is_write = step
        if not is_write:
            chain.append(n)
        n = src
    chain.reverse()
    return n, chain


def _recomputable(node: torch.fx.Node, placeholders: dict[torch.fx.Node, torch.fx.Node]) -> bool:
    """Whether a view node can be copied out: its other inputs are operands."""
    step = _alias_step(node)
    src = step[0] if step is not None else None
    return all(a is src or a in placeholders for a in node.all_input_nodes)


def _emit(
    gm: torch.fx.GraphModule, scan: _Scan, dropped: set[torch.fx.Node], memo: _Memo
) -> torch.fx.GraphModule:
    """NOTE [Linear autocast pass], step 4: one copy of every node."""
    old = gm.graph
    top_graph = torch.fx.Graph(tracer_cls=old._tracer_cls, tracer_extras=old._tracer_extras)
    top_graph._codegen = copy.deepcopy(old._codegen)
    rw = _Rewriter(gm, memo)
    top = _Builder(top_graph, None)
    builders: list[_Builder] = [top]
    open_builders: dict[_Region, _Builder] = {}
    for node in old.nodes:
        if is_enter_autocast(node):
            region = scan.region_of_enter[node]
            if region is None:
                continue  # redundant: its nodes are owned by the enclosing region
            b = _Builder(torch.fx.Graph(), region)
            for i in region.inputs:
                ph = b.graph.create_node("placeholder", i.name, (), {}, name=i.name, type_expr=i.type)
                ph.meta = {k: v for k, v in i.meta.items() if k not in _PLACEHOLDER_META_DROP}
                b.env[i] = ph
            builders.append(b)
            open_builders[region] = b
        elif is_exit_autocast(node):
            enter = node.args[0]
            assert isinstance(enter, torch.fx.Node)  # checked by _scan
            region = scan.region_of_enter[enter]
            if region is None:
                continue
            child = builders.pop()
            del open_builders[region]
            if region.live:
                rw.close(child, builders[-1])
        elif node not in dropped:
            r = scan.owner[node]  # usually builders[-1]'s region; see _liveness
            rw.copy_node(top if r is None else open_builders[r], node)
    assert len(builders) == 1
    new_gm = _graph_module(top)
    new_gm.meta = copy.copy(gm.meta)
    new_gm.training = gm.training
    return new_gm


def _has_autocast(gm: torch.fx.GraphModule) -> bool:
    for mod in gm.modules():
        if isinstance(mod, torch.fx.GraphModule):
            graph = mod.graph
            if graph.find_nodes(op="call_function", target=_ENTER) or graph.find_nodes(
                op="call_function", target=_EXIT
            ):
                return True
    return False


def _rewrite_module(
    gm: torch.fx.GraphModule, memo: _Memo, around: AutocastState | None = None
) -> torch.fx.GraphModule:
    """Rewrite ``gm`` and, through its get_attr nodes, every GraphModule under it.

    ``around``: the autocast state ``gm`` runs under, when it is the body of
    autocast HOP calls (NOTE [Redundant autocast regions]).
    """
    key = (id(gm), around)
    hit = memo.get(key)
    if hit is not None:
        return hit
    if not _has_autocast(gm):
        memo[key] = gm
        return gm
    scan = _scan(gm.graph, around)
    dropped = _liveness(gm.graph, scan)
    _compute_interfaces(gm.graph, scan, dropped)
    new_gm = _emit(gm, scan, dropped, memo)
    memo[key] = new_gm
    return new_gm


def _flat_outputs(gm: torch.fx.GraphModule) -> list[Any]:
    out = gm.graph.output_node().args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _check_pass_args(fn: str, gm: Any, graph_signature: Any) -> None:
    """Refuse what is not ``(GraphModule, ExportGraphSignature | None)``, naming the fix.

    Shared by both passes. An ExportedProgram in either place is the usual
    mistake: the passes take its two halves.
    """
    if isinstance(gm, torch.export.ExportedProgram):
        also = (
            ", or export the model with hopkit.export.export(model, args), which runs "
            "this pass for you"
            if fn == "replace_autocast_with_hop_pass"
            else ""
        )
        raise TypeError(
            f"hopkit: {fn} expects a torch.fx.GraphModule and its ExportGraphSignature "
            f"(or None), but got an ExportedProgram; pass ep.graph_module and "
            f"ep.graph_signature{also}."
        )
    if not isinstance(gm, torch.fx.GraphModule):
        fix = (
            "wrap it as torch.fx.GraphModule(root, graph)"
            if isinstance(gm, torch.fx.Graph)
            else "trace it first, e.g. with make_fx(f, pre_dispatch=True), or export a "
            "module with hopkit.export.export(model, args)"
        )
        raise TypeError(
            f"hopkit: {fn} expects a torch.fx.GraphModule, but got "
            f"{_type_name(gm)}; {fix}."
        )
    if graph_signature is not None and not isinstance(graph_signature, ExportGraphSignature):
        fix = (
            "pass ep.graph_signature, with ep.graph_module as the graph"
            if isinstance(graph_signature, torch.export.ExportedProgram)
            else "pass the graph's ExportGraphSignature (ep.graph_signature), or None "
            "for a graph without one"
        )
        raise TypeError(
            f"hopkit: {fn} expects graph_signature to be a "
            f"torch.export.ExportGraphSignature or None, but got "
            f"{_type_name(graph_signature)}; {fix}."
        )


def _check_signature_fits(fn: str, gm: torch.fx.GraphModule, sig: ExportGraphSignature) -> None:
    """The signature has one output spec per graph output (the passes keep that count)."""
    n = len(_flat_outputs(gm))
    if n != len(sig.output_specs):
        raise ValueError(
            f"hopkit: {fn} expects the graph signature of this graph, but the graph "
            f"returns {n} value(s) and the signature has {len(sig.output_specs)} output "
            f"spec(s); pass the signature that belongs to this graph, or None."
        )


def _type_name(x: Any) -> str:
    """``a dict``, ``an int``, ``an ExportedProgram``: what was given, for errors."""
    name = type(x).__qualname__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _fix_signature(
    new_gm: torch.fx.GraphModule, sig: ExportGraphSignature
) -> ExportGraphSignature:
    """A copy of ``sig`` whose output names are those of ``new_gm``'s output node.

    The caller checked that the counts agree (``_check_signature_fits``).
    """
    specs = []
    for arg, spec in zip(_flat_outputs(new_gm), sig.output_specs):
        if isinstance(arg, torch.fx.Node) and getattr(spec.arg, "name", None) != arg.name:
            spec = dataclasses.replace(spec, arg=dataclasses.replace(spec.arg, name=arg.name))
        specs.append(spec)
    return dataclasses.replace(sig, output_specs=specs)


def replace_autocast_with_hop_pass(
    gm: torch.fx.GraphModule, graph_signature: ExportGraphSignature | None
) -> tuple[torch.fx.GraphModule, ExportGraphSignature | None]:
    """Turn every autocast region of a pre-dispatch graph into a ``wrap_with_autocast`` call.

    Args:
        gm: a pre-dispatch GraphModule with ``_enter_autocast`` / ``_exit_autocast``
            nodes. It is not mutated.
        graph_signature: its ``ExportGraphSignature``, or ``None``.

    Returns:
        ``(new_gm, new_signature)``. Outermost regions become
        ``hopkit.export.wrap_with_autocast(device_type, dtype, enabled,
        cache_enabled, body, *inputs)`` calls with the region in the submodule
        ``body``; nested regions become nested calls inside it; code outside
        regions is unchanged; node names of values used after a region are kept,
        so the signature's names stay valid. Without autocast nodes, ``gm`` and
        ``graph_signature`` are returned as they are. GraphModules reachable
        through ``get_attr`` (e.g. bodies of other HOPs) are rewritten too.

    Raises:
        TypeError: ``gm`` is not a GraphModule or ``graph_signature`` is neither
            an ``ExportGraphSignature`` nor ``None`` (for an ExportedProgram
            ``ep``, pass ``ep.graph_module, ep.graph_signature``).
        ValueError: naming the node, for an exit without an enter, an enter
            never exited, or an exit that closes a region other than the
            innermost open one; or a signature whose output specs do not
            match the graph's outputs.

    See NOTE [Linear autocast pass] and NOTE [Redundant autocast regions].
    """
    _check_pass_args("replace_autocast_with_hop_pass", gm, graph_signature)
    if not _has_autocast(gm):
        return gm, graph_signature
    if graph_signature is not None:
        _check_signature_fits("replace_autocast_with_hop_pass", gm, graph_signature)
    new_gm = _rewrite_module(gm, {})
    if new_gm is gm:
        return gm, graph_signature
    new_gm.graph.lint()
    if graph_signature is None:
        return new_gm, None
    return new_gm, _fix_signature(new_gm, graph_signature)

