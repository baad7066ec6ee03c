"""Trace once, reuse everywhere: the caches behind repeated BaseHOP calls.

    for w in weights:                  # 32 layers, one HOP call each
        x = block_hop(body, x, w)      # one body module, one joint trace

What lives here: the key of one HOP call (``call_key``), the structural
comparison of two Dynamo bodies (``same_dynamo_body``), the replay of a
Dynamo speculation (``dynamo_call_key``), and the scoped caches the proxy,
fake and autograd rules and the Dynamo variable consult (``body_cache``,
``fake_cache``, ``plan_cache``, ``dynamo_bodies``). The rules themselves stay
in hopkit/base_hop/__init__.py and hopkit/base_hop/_dynamo.py.

NOTE [BaseHOP trace reuse]
A model repeats one block; tracing each call again makes compile time grow
with the number of calls. hopkit reuses what it traced wherever a later call
would provably trace the same thing:

- Dynamo installs a speculated body only if no body installed earlier in
  this output graph is structurally identical: same nodes, targets and
  constants, same lifted-argument layout, same example metadata on every
  node, no effectful op. Every such call's node then references one
  ``subgraph_N`` module. Free tensors a body closes over are lifted to
  operands of the node, so two lambdas closing over different tensors of the
  same metadata share a body and each node passes its own tensors; a
  closed-over Python constant is a constant of the graph, so different
  constants give different bodies.
- Dynamo skips the speculation itself (most of what a call costs it) where
  it provably would trace the same: the body function reads only its
  operands, modules, builtins and functions of the same kind; the operands
  are tensors of equal metadata and aliasing, or equal constants; nothing
  that existed before the frame has a store pending; the configuration and
  global state are equal; and the earlier speculation's placeholders were
  exactly its operands and its outputs tensors (``dynamo_call_key``,
  ``replay_speculation``). Anything else (a lambda or closure over tensors,
  a body reading a global value, a nested region) is speculated as usual.
- The proxy rule (make_fx, AOTAutograd, export) registers one submodule per
  distinct key in the trace and points every equal call's node at it; the
  autograd rule builds one joint graph and one partition per key, so the AOT
  forward and backward graphs each hold one body module for N calls.
- Eager calls that go through the autograd rule (a mode with a rule of its
  own, torch.func.grad) build the plan once per key too.

The key of a call (``call_key``) is the subgraph's identity and content (a
GraphModule's code, its globals and the objects its attributes name; a
FunctionWithNoFreeVars' function, code, closure cells and defaults), the
configuration, every operand's metadata (type, shape and strides with their
symbolic expressions, storage offset, dtype, device, layout,
requires_grad, conj/neg bits; Python scalars by type and value; which
operands share storage), and the global state tracing reads (grad mode,
inference mode, autocast, deterministic algorithms, the default dtype,
functorch levels, the modes on the stack). Anything the key cannot describe soundly (an operand
subclass hopkit does not know, an unhashable configuration, a symbol with no
expression) makes the call uncacheable: it is traced as before. A trace that
records an effect (NOTE [Effect tokens inside subgraphs]) or whose output
has a data-dependent size is never reused: each call keeps its own.

Random ops keep each call's draws: a shared module is a function called once
per node, drawing from the generator when it runs, as eager does.

Scopes, so that nothing outlives the trace it belongs to: the body cache
hangs off the tracer recording the graph, the fake and plan caches off the
fake mode of the operands (its symbols belong to that shape env), Dynamo's
installed bodies and speculations off the output graph; each goes with its
owner. Eager plans
(operands not fake) are keyed weakly by the subgraph itself, at most
``_EAGER_ENTRIES`` per subgraph, and a subgraph whose content changed (a
GraphModule recompiled) drops its old entries.

A HOP turns reuse off with ``reuse_traces = False``, and refines the key with
``reuse_key(config, *operands)`` (a hashable added to the key, or None for
"trace this call anew"); a refinement can only split keys, never merge them,
so correctness never rests on it (unlike nested_compile_region's
``reuse_hash_fn``, which replaces the checks).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "BodyEntry",
    "body_cache",
    "call_key",
    "counters",
    "dynamo_bodies",
    "functional_identity",
    "plan_cache",
    "reusable_graph",
    "same_dynamo_body",
]

# How often each thing was traced or reused; tests read these.
counters: collections.Counter[str] = collections.Counter()

_EAGER_ENTRIES = 16
_ATTR = "_hopkit_reuse_cache"


class _Uncacheable(Exception):
    """The key cannot describe this value soundly: trace the call anew."""


# ---------------------------------------------------------------------------
# The key of one call
# ---------------------------------------------------------------------------


def _sym(x: Any) -> Any:
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        expr = getattr(x.node, "expr", None)
        if expr is None:
            raise _Uncacheable
        return ("sym", type(x).__name__, expr)
    return x


def _plain_tensor_types() -> tuple[type, ...]:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return (torch.Tensor, torch.nn.Parameter, FakeTensor, FunctionalTensor)


def _tensor_signature(t: torch.Tensor, plain: tuple[type, ...],
                      requires_grad: bool = True) -> tuple[Any, ...]:
    if type(t) not in plain or t.is_nested:
        # A subclass's own state (a DTensor's placements) is not metadata
        # hopkit can see; trace such calls anew.
        raise _Uncacheable
    strided = t.layout is torch.strided
    return (
        type(t),
        tuple(_sym(s) for s in t.shape),
        tuple(_sym(s) for s in t.stride()) if strided else None,
        _sym(t.storage_offset()) if strided else None,
        t.dtype, t.device, t.layout, requires_grad and t.requires_grad, t.is_conj(), t.is_neg(),
    )


def operand_signature(operands: Sequence[Any], requires_grad: bool = True) -> tuple[Any, ...]:
    """Every operand's metadata, and which operands share a storage.

    ``requires_grad=False`` leaves requires_grad out, for a trace it cannot
    change: one of hopkit's own aten-level graphs, traced below autograd.
    """
    plain = _plain_tensor_types()
    sig: list[Any] = []
    storages: dict[int, int] = {}
    for i, x in enumerate(operands):
        if isinstance(x, torch.Tensor):
            entry = _tensor_signature(x, plain, requires_grad)
            share = None
            if x.layout is torch.strided:
                try:
                    cdata = x.untyped_storage()._cdata
                except (RuntimeError, NotImplementedError):
                    raise _Uncacheable from None
                share = storages.setdefault(cdata, i)
            sig.append((entry, share))
        elif isinstance(x, (bool, int, float)):
            # 1 and 1.0 and True are equal but trace differently.
            sig.append((type(x), x))
        elif isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            sig.append(_sym(x))
        else:
            raise _Uncacheable
    return tuple(sig)


def freeze(value: Any) -> Hashable:
    """A hashable, type-exact image of a configuration value."""
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(freeze(v) for v in value))
    if isinstance(value, dict):
        return (dict, tuple((k, freeze(v)) for k, v in value.items()))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value), tuple(freeze(getattr(value, f.name))
                                   for f in dataclasses.fields(value)))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _sym(value)
    if isinstance(value, (str, int, float, bool, type(None), torch.dtype, torch.device,
                          torch.layout, torch.memory_format, enum.Enum)):
        return (type(value), value)
    raise _Uncacheable


def global_state() -> tuple[Any, ...]:
    """The global state a trace of a body reads."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
        torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
        torch.is_autocast_cache_enabled(),
        torch.are_deterministic_algorithms_enabled(),
        torch.get_default_dtype(),
        tuple((i.key(), i.level()) for i in retrieve_all_functorch_interpreters()),
        tuple(type(m) for m in _get_current_dispatch_mode_stack()),
        torch._C._len_torch_function_stack(),
    )


# A GraphModule's structure, memoized per compiled forward: a description of
# every node that does not depend on node names (two graphs Dynamo speculated
# for two calls name their placeholders after different variables).
_gm_structure: weakref.WeakKeyDictionary[Any, tuple[Any, Hashable, tuple[str, ...]]] = (
    weakref.WeakKeyDictionary())

_CONSTANTS = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.layout,
              torch.memory_format, enum.Enum)


def _arg_key(a: Any, index: dict[Any, int]) -> Hashable:
    if isinstance(a, torch.fx.Node):
        return ("node", index[a])
    if isinstance(a, (list, tuple)):
        return (type(a), tuple(_arg_key(x, index) for x in a))
    if isinstance(a, dict):
        return (dict, tuple((k, _arg_key(v, index)) for k, v in a.items()))
    if isinstance(a, slice):
        return (slice, _arg_key((a.start, a.stop, a.step), index))
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _sym(a)
    if isinstance(a, _CONSTANTS):
        return (type(a), a)
    raise _Uncacheable


def _graph_structure(gm: torch.fx.GraphModule) -> tuple[Hashable, tuple[str, ...]]:
    index: dict[Any, int] = {}
    items = []
    targets = set()
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        target = node.target
        if node.op in ("get_attr", "call_module"):
            targets.add(str(target))
        if not isinstance(target, str):
            hash(target)  # a target with no stable identity: TypeError
        items.append((node.op, None if node.op == "placeholder" else target,
                      _arg_key(node.args, index),
                      _arg_key(node.kwargs, index), node.type if node.op == "placeholder"
                      else None))
    codegen = gm.graph._codegen
    pytree_info = getattr(codegen, "pytree_info", None)
    return ((type(codegen), None if pytree_info is None else str(pytree_info), tuple(items)),
            tuple(sorted(targets)))


def _graph_module_version(gm: torch.fx.GraphModule) -> tuple[Any, ...]:
    # A lazy GraphModule compiles its forward on first use; compile it now, so
    # that a recompile shows as a new forward.
    from torch.fx._lazy_graph_module import _LazyGraphModule

    if isinstance(gm, _LazyGraphModule) and gm._needs_recompile():
        gm.real_recompile()
    forward = type(gm).__dict__.get("forward") or gm.__dict__.get("forward")
    memo = _gm_structure.get(gm)
    if memo is None or memo[0] is not forward:
        structure, targets = _graph_structure(gm)
        memo = (forward, structure, targets)
        _gm_structure[gm] = memo
    # The objects the graph's attributes name now (a parameter swapped for
    # another changes what the graph computes).
    attrs = []
    for target in memo[2]:
        obj: Any = gm
        for part in target.split("."):
            obj = getattr(obj, part, None)
        attrs.append((target, id(obj)))
    return (memo[1], tuple(attrs))


def _function_version(fn: Any) -> tuple[Any, ...]:
    code = getattr(fn, "__code__", None)
    if code is None:
        raise _Uncacheable
    try:
        cells = tuple(id(c.cell_contents) for c in (fn.__closure__ or ()))
    except ValueError:  # an empty cell
        raise _Uncacheable from None
    defaults = tuple(id(d) for d in (fn.__defaults__ or ()))
    kwdefaults = tuple(sorted((k, id(v)) for k, v in (fn.__kwdefaults__ or {}).items()))
    return (code, cells, defaults, kwdefaults)


def subgraph_identity(subgraph: Any) -> tuple[Any, Hashable]:
    """``(anchor, version)``: the object a subgraph's traces belong to, and
    what its content is now. A subgraph of a kind hopkit cannot describe
    raises _Uncacheable."""
    from hopkit.base_hop import FunctionWithNoFreeVars

    if isinstance(subgraph, torch.fx.GraphModule):
        return subgraph, ("gm", _graph_module_version(subgraph))
    reuse_of = getattr(subgraph, "_reuse_of", None)
    if reuse_of is not None:  # hopkit's functional wrapper of a subgraph
        inner, extra = reuse_of
        anchor, version = subgraph_identity(inner)
        return anchor, ("functional", version, extra)
    if type(subgraph) is FunctionWithNoFreeVars:
        fn = subgraph.fn
        if isinstance(fn, (torch.fx.GraphModule, FunctionWithNoFreeVars)):
            return subgraph_identity(fn)
        return fn, ("fn", _function_version(fn))
    raise _Uncacheable


def call_key(hop: Any, leading: tuple[Any, ...], subgraph: Any, operands: Sequence[Any],
             kwargs: dict[str, Any], *extra: Hashable,
             requires_grad: bool = True) -> tuple[Any, Hashable] | None:
    """``(anchor, key)`` of one HOP call, or None: trace it anew."""
    if not getattr(hop, "reuse_traces", True):
        return None
    try:
        anchor, version = subgraph_identity(subgraph)
        config = hop._config(leading, kwargs)
        refine: Any = ()
        reuse_key = getattr(hop, "reuse_key", None)
        if reuse_key is not None:
            refine = reuse_key(config, *operands)
            if refine is None:
                return None
        key = (
            hop, version, freeze(config), operand_signature(operands, requires_grad),
            global_state(),
            extra, refine,
        )
        hash(key)
    except (_Uncacheable, TypeError):
        return None
    return anchor, key


# ---------------------------------------------------------------------------
# The caches and their scopes
# ---------------------------------------------------------------------------


class _ScopedCache:
    """Entries that live as long as their scope object (a tracer, a fake mode)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _table(self, scope: Any, create: bool) -> dict[Any, Any] | None:
        tables = getattr(scope, _ATTR, None)
        if tables is None:
            if not create:
                return None
            tables = {}
            try:
                setattr(scope, _ATTR, tables)
            except AttributeError:
                return None
        table = tables.get(self.name)
        if table is None and create:
            table = tables[self.name] = {}
        return table

    def get(self, scope: Any, key: Any) -> Any:
        table = self._table(scope, create=False)
        return None if table is None else table.get(key)

    def put(self, scope: Any, key: Any, value: Any) -> None:
        table = self._table(scope, create=True)
        if table is not None:
            table[key] = value


class _EagerCache:
    """Entries keyed weakly by the subgraph's anchor, a few per subgraph.

    A subgraph's entries do not reference it (the plans are traced graphs of
    their own), so the entries go when the subgraph goes.
    """

    def __init__(self) -> None:
        self._by_anchor: weakref.WeakKeyDictionary[Any, collections.OrderedDict[Any, Any]] = (
            weakref.WeakKeyDictionary())

    def get(self, anchor: Any, key: Any) -> Any:
        try:
            entries = self._by_anchor.get(anchor)
        except TypeError:
            return None
        if entries is None:
            return None
        value = entries.get(key)
        if value is not None:
            entries.move_to_end(key)
        return value

    def put(self, anchor: Any, key: Any, value: Any) -> None:
        try:
            entries = self._by_anchor.get(anchor)
            if entries is None:
                entries = self._by_anchor[anchor] = collections.OrderedDict()
        except TypeError:  # not weakly referenceable: no eager reuse
            return
        # key[1] is the subgraph's version: a changed subgraph drops the rest.
        for old in [k for k in entries if k[1] != key[1]]:
            del entries[old]
        entries[key] = value
        while len(entries) > _EAGER_ENTRIES:
            entries.popitem(last=False)


body_cache = _ScopedCache("bodies")
fake_cache = _ScopedCache("fake_outputs")
_plan_scoped = _ScopedCache("plans")
_plan_eager = _EagerCache()


class _PlanCache:
    """Autograd plans: per fake mode under a trace, per subgraph in eager."""

    def get(self, fake_mode: Any, anchor: Any, key: Any) -> Any:
        if fake_mode is not None:
            return _plan_scoped.get(fake_mode, key)
        return _plan_eager.get(anchor, key)

    def put(self, fake_mode: Any, anchor: Any, key: Any, plan: Any) -> None:
        if fake_mode is not None:
            _plan_scoped.put(fake_mode, key, plan)
        else:
            _plan_eager.put(anchor, key, plan)


plan_cache = _PlanCache()


def operands_fake_mode(operands: Sequence[Any]) -> Any:
    """The fake mode of the operands (None for real tensors: eager)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode([t for t in operands if isinstance(t, torch.Tensor)])


# Per graph, what a walk of it found, as long as its code is the same.
_graph_facts: weakref.WeakKeyDictionary[Any, dict[str, tuple[Any, bool]]] = (
    weakref.WeakKeyDictionary())


def _memo(kind: str, gm: torch.fx.GraphModule, compute: Callable[[], bool]) -> bool:
    code = gm.__dict__.get("_code")
    facts = _graph_facts.get(gm)
    if facts is None:
        facts = _graph_facts[gm] = {}
    hit = facts.get(kind)
    if hit is not None and code is not None and hit[0] is code:
        return hit[1]
    result = compute()
    facts[kind] = (code, result)
    return result


def reusable_graph(gm: torch.fx.GraphModule) -> bool:
    """Whether a traced graph may serve other calls: no effectful call in it or
    a body it calls, no data-dependent (unbacked) size anywhere in it (each
    call must get its own symbols)."""
    return _memo("reusable", gm, lambda: _reusable_graph(gm))


def _reusable_graph(gm: torch.fx.GraphModule) -> bool:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    if body_has_effects(gm):
        return False
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        for v in val if isinstance(val, (list, tuple)) else (val,):
            try:
                if isinstance(v, torch.Tensor):
                    if free_unbacked_symbols(v.shape) or (
                            v.layout is torch.strided and free_unbacked_symbols(v.stride())):
                        return False
                elif isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) and \
                        free_unbacked_symbols(v):
                    return False
            except Exception:
                return False
        if node.op == "get_attr":
            sub = getattr(gm, str(node.target), None)
            if isinstance(sub, torch.fx.GraphModule) and not reusable_graph(sub):
                return False
    return True


class BodyEntry:
    """A body the proxy rule traced and registered (or, for the fake rule, no
    body: ``gm`` None), and what a reuse needs."""

    __slots__ = ("name", "gm", "template", "state")

    def __init__(self, name: str, gm: Any, template: Any, subgraph: Any) -> None:
        self.name, self.gm = name, gm
        # The first call's (fake) outputs: a later call gets fresh tensors of
        # the same metadata (its own objects, so the tracer tells the nodes
        # apart). None where the proxy rule ran the HOP for its outputs.
        self.template = template
        # What hopkit's functional wrapper learnt while traced (which operands
        # the body mutates), handed to the wrapper of a reusing call.
        self.state: tuple[Any, bool] | None = (
            (subgraph.mutated, subgraph.single_output)
            if getattr(subgraph, "_reuse_of", None) is not None else None
        )

    def restore(self, subgraph: Any) -> None:
        if self.state is not None:
            subgraph.mutated, subgraph.single_output = self.state

    def fresh_outputs(self) -> Any:
        import torch.utils._pytree as pytree
        from torch._subclasses.fake_tensor import FakeTensor

        if self.template is None:
            return None
        leaves = [t for t in pytree.tree_leaves(self.template) if isinstance(t, torch.Tensor)]
        if not leaves:
            return self.template
        fake_mode = getattr(leaves[0], "fake_mode", None)
        if fake_mode is None:
            return None

        def fresh(t: torch.Tensor) -> torch.Tensor:
            # What FakeTensorMode makes of a factory call (a FakeTensor over a
            # meta tensor), without dispatching one: this runs for every
            # output of every reusing call, and the dispatch cost ~6x more.
            with torch._C._DisableTorchDispatch():
                meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            return FakeTensor(fake_mode, meta, t.device)

        return pytree.tree_map_only(torch.Tensor, fresh, self.template)


def graph_of(subgraph: Any) -> torch.fx.GraphModule | None:
    """The GraphModule a subgraph runs (itself, or the graph hopkit's
    functional wrapper wraps); None for a Python function."""
    reuse_of = getattr(subgraph, "_reuse_of", None)
    if reuse_of is not None:
        return graph_of(reuse_of[0])
    if isinstance(subgraph, torch.fx.GraphModule):
        return subgraph
    return None


def _mutates(gm: torch.fx.GraphModule) -> bool:
    return _memo("mutates", gm, lambda: _walk_mutates(gm))


def _walk_mutates(gm: torch.fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable:
            return True
        if node.op in ("call_method", "call_module"):
            return True
        if node.op == "get_attr":
            sub = getattr(gm, str(node.target), None)
            if isinstance(sub, torch.fx.GraphModule) and _mutates(sub):
                return True
    return False


_GRAD_ATTRIBUTES = frozenset({"requires_grad", "requires_grad_", "is_leaf", "grad_fn", "grad",
                               "retains_grad", "_version"})


def requires_grad_matters(subgraph: Any) -> bool:
    """Whether a trace of ``subgraph`` below autograd might depend on its
    operands' requires_grad: unless it is a graph with no node that reads a
    tensor's autograd attributes (a graph is straight-line code; only such a
    node could observe requires_grad)."""
    import builtins

    gm = graph_of(subgraph)
    if gm is None:
        return True

    def reads() -> bool:
        for node in gm.graph.nodes:
            if node.op == "call_method" and node.target in _GRAD_ATTRIBUTES:
                return True
            if node.op == "call_function" and node.target is builtins.getattr and \
                    len(node.args) > 1 and node.args[1] in _GRAD_ATTRIBUTES:
                return True
            if node.op == "call_module":
                return True
            if node.op == "get_attr":
                sub = getattr(gm, str(node.target), None)
                if isinstance(sub, torch.fx.GraphModule) and requires_grad_matters(sub):
                    return True
        return False

    return _memo("reads_grad", gm, reads)


def fake_run_reusable(subgraph: Any) -> bool:
    """Whether the fake rule's outputs for this subgraph may serve equal calls:
    a graph (so what it does is visible) with no effect, no mutation and no
    data-dependent size, whose outputs depend on operand metadata alone."""
    gm = graph_of(subgraph)
    return gm is not None and not _mutates(gm) and reusable_graph(gm)


def independent_outputs(operands: Sequence[Any], outs: Any) -> bool:
    """Whether no output shares storage with an operand or another output, and
    none has a data-dependent size: fresh tensors of the outputs' metadata
    then stand for them exactly."""
    import torch.utils._pytree as pytree
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    seen: set[int] = set()
    for t in operands:
        if isinstance(t, torch.Tensor) and t.layout is torch.strided:
            try:
                seen.add(t.untyped_storage()._cdata)
            except (RuntimeError, NotImplementedError):
                return False
    for t in pytree.tree_leaves(outs):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.layout is not torch.strided:
            return False
        try:
            cdata = t.untyped_storage()._cdata
            if cdata in seen or free_unbacked_symbols(t.shape) or \
                    free_unbacked_symbols(t.stride()):
                return False
        except (RuntimeError, NotImplementedError):
            return False
        seen.add(cdata)
    return True


def functional_identity(ctx: Any, subgraph: Any, groups: Sequence[Any]) -> tuple[Any, Any] | None:
    """What hopkit's functional wrapper of ``subgraph`` is a function of: the
    subgraph, the kind of functionalization, the aliasing groups' geometry."""
    try:
        interpreter = getattr(ctx, "interpreter", None)
        add_back_views = (interpreter.functionalize_add_back_views()
                          if interpreter is not None else None)
        mode = getattr(ctx, "mode", None)
        extra = (
            type(ctx), add_back_views, getattr(ctx, "pre_dispatch", None),
            getattr(mode, "export", None),
            tuple((g.members, freeze(g.span), freeze(g.geometry)) for g in groups),
        )
        hash(extra)
    except (_Uncacheable, TypeError, AttributeError):
        return None
    return (subgraph, extra)


# ---------------------------------------------------------------------------
# Dynamo: one installed body for structurally identical speculations
# ---------------------------------------------------------------------------


def dynamo_bodies(output: Any) -> dict[Hashable, list[tuple[str, torch.fx.GraphModule]]]:
    """The bodies hopkit installed in this output graph, bucketed by code."""
    tables = getattr(output, _ATTR, None)
    if tables is None:
        tables = {}
        setattr(output, _ATTR, tables)
    bodies: dict[Hashable, list[tuple[str, torch.fx.GraphModule]]] = tables.setdefault(
        "dynamo", {})
    return bodies


def _value_signature(v: Any, plain: tuple[type, ...]) -> Any:
    if isinstance(v, torch.Tensor):
        return _tensor_signature(v, plain)
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _sym(v)
    if isinstance(v, (list, tuple)):
        return tuple(_value_signature(x, plain) for x in v)
    if v is None or isinstance(v, (bool, int, float)):
        return (type(v), v)
    raise _Uncacheable


def _is_effectful(target: Any) -> bool:
    """Whether a call of ``target`` is threaded with an effect token (hopkit's
    registry, which also answers for torch's own effectful ops)."""
    from torch._ops import OpOverloadPacket

    from hopkit.effects import has_effects

    try:
        if isinstance(target, OpOverloadPacket):
            return any(has_effects(getattr(target, o)) for o in target.overloads())
        return bool(has_effects(target))
    except Exception:  # a target has_effects cannot judge: assume it has
        return True


def body_has_effects(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` or a body it calls has an effectful call."""
    return _memo("effects", gm, lambda: _walk_effects(gm))


def _walk_effects(gm: torch.fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if node.op == "call_function" and _is_effectful(node.target):
            return True
        if node.op == "get_attr":
            sub = getattr(gm, str(node.target), None)
            if isinstance(sub, torch.fx.GraphModule) and body_has_effects(sub):
                return True
    return False


def same_dynamo_body(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> bool:
    """Whether two speculated bodies compute the same function, node for node.

    Same op, target, constants and structure on every node, the same example
    metadata (shapes with their symbols, strides, dtypes, devices,
    requires_grad, aliasing of the inputs), and no effectful call (a body
    with effects is installed per call: NOTE [BaseHOP trace reuse]).
    """
    an, bn = list(a.graph.nodes), list(b.graph.nodes)
    if len(an) != len(bn) or type(a.graph._codegen) is not type(b.graph._codegen):
        return False
    if body_has_effects(a) or body_has_effects(b):
        return False
    plain = _plain_tensor_types()
    node_map: dict[torch.fx.Node, torch.fx.Node] = {}

    def same_arg(x: Any, y: Any) -> bool:
        if isinstance(x, torch.fx.Node):
            return isinstance(y, torch.fx.Node) and node_map.get(x) is y
        if type(x) is not type(y):
            return False
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(same_arg(p, q) for p, q in zip(x, y))
        if isinstance(x, dict):
            return list(x) == list(y) and all(same_arg(x[k], y[k]) for k in x)
        if isinstance(x, slice):
            return same_arg((x.start, x.stop, x.step), (y.start, y.stop, y.step))
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return bool(_sym(x) == _sym(y))
        if isinstance(x, torch.Tensor):
            return x is y
        if isinstance(x, float) and x != x:
            return y != y
        try:
            return bool(x == y)
        except Exception:
            return x is y

    try:
        storages: list[dict[int, int]] = [{}, {}]
        for x, y in zip(an, bn):
            if x.op != y.op:
                return False
            if x.op in ("call_function", "call_method", "get_attr", "call_module"):
                if x.target is not y.target and not (
                        isinstance(x.target, str) and x.target == y.target):
                    return False
            if not (same_arg(x.args, y.args) and same_arg(x.kwargs, y.kwargs)):
                return False
            xv, yv = x.meta.get("example_value"), y.meta.get("example_value")
            if _value_signature(xv, plain) != _value_signature(yv, plain):
                return False
            if x.op == "placeholder" and isinstance(xv, torch.Tensor) and \
                    xv.layout is torch.strided:
                i = len(storages[0])
                if storages[0].setdefault(xv.untyped_storage()._cdata, i) != \
                        storages[1].setdefault(yv.untyped_storage()._cdata, i):
                    return False
            node_map[x] = y
    except (_Uncacheable, RuntimeError, NotImplementedError):
        return False
    return True


def _fingerprint(gm: torch.fx.GraphModule) -> Hashable:
    """A cheap, name-independent summary: equal for identical bodies."""
    return tuple(
        (n.op, n.target if isinstance(n.target, str) and n.op != "placeholder" else
         getattr(n.target, "__name__", None), len(n.args))
        for n in gm.graph.nodes
    )


def find_installed_body(output: Any, body: torch.fx.GraphModule,
                        install: Callable[[], str]) -> str:
    """The name of an installed body identical to ``body``, else install it."""
    bucket = dynamo_bodies(output).setdefault(_fingerprint(body), [])
    nn_modules = getattr(output, "nn_modules", {})
    for name, installed in reversed(bucket):
        if nn_modules.get(name) is installed and same_dynamo_body(installed, body):
            counters["dynamo_reused"] += 1
            return name
    name = install()
    counters["dynamo_installed"] += 1
    module = nn_modules.get(name)
    if isinstance(module, torch.fx.GraphModule):
        bucket.append((name, module))
    return name


# ---------------------------------------------------------------------------
# Dynamo: an equal call replays the speculation of an earlier one
# ---------------------------------------------------------------------------
#
# Speculating a body (Dynamo tracing it into a subgraph) is most of what a
# call costs Dynamo. A later call may skip it where nothing it reads can have
# changed: a body function that reads only its operands, modules and builtins
# (and functions that do the same), closed over or global, operands that are tensors
# (equal metadata, the same aliasing among them) or constants (equal values),
# the root tracer, no attribute or global store pending in the frame, the
# same configuration and global state, and an earlier speculation whose
# placeholders were exactly its operands and whose outputs were tensors. The
# node then calls the installed body with this call's operands, and its
# outputs are fresh fake tensors of the recorded metadata.


@dataclasses.dataclass
class Speculation:
    name: str  # the installed body
    mapping: tuple[int, ...]  # the operand each placeholder of the body reads
    outputs: tuple[torch.Tensor, ...]  # the first call's example outputs
    single: bool  # the body returned one tensor (else a tuple of them)


_pure_memo: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _pure_function(fn: Any, depth: int = 0) -> bool:
    """Whether ``fn`` reads nothing but its arguments, modules, builtins and
    functions of the same kind (so its speculation depends on its arguments)."""
    import builtins
    import types

    if not isinstance(fn, types.FunctionType) or depth > 4:
        return False
    known = _pure_memo.get(fn)
    if known is not None:
        return known
    _pure_memo[fn] = False  # recursion: assume not, until proven
    def allowed(value: Any) -> bool:
        return isinstance(value, (types.ModuleType, types.BuiltinFunctionType)) or (
            isinstance(value, types.FunctionType) and _pure_function(value, depth + 1))

    try:
        # A cell rebound by the traced frame shows as a pending store (the
        # caller checks there is none).
        cells_ok = all(allowed(c.cell_contents) for c in (fn.__closure__ or ()))
    except ValueError:  # an empty cell
        cells_ok = False
    ok = cells_ok and all(
        isinstance(d, (int, float, bool, str, type(None))) for d in (fn.__defaults__ or ())
    ) and not fn.__kwdefaults__

    def names(code: types.CodeType) -> Iterator[str]:
        yield from code.co_names
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                yield from names(c)

    if ok:
        for name in names(fn.__code__):
            if name not in fn.__globals__:
                continue  # an attribute name, or a builtin
            value = fn.__globals__[name]
            if allowed(value) or value is getattr(builtins, name, object()):
                continue
            ok = False
            break
    _pure_memo[fn] = ok
    return ok


def dynamo_call_key(tx: Any, hop: Any, fn_vt: Any, arg_vts: Sequence[Any],
                    leading: tuple[Any, ...], config: dict[str, Any]) -> Hashable | None:
    """The key under which a call may replay an earlier speculation, or None."""
    from torch._dynamo.variables.constant import ConstantVariable
    from torch._dynamo.variables.functions import UserFunctionVariable
    from torch._dynamo.variables.tensor import TensorVariable
    from torch._dynamo.variables.user_defined import UserDefinedObjectVariable

    from hopkit.base_hop import FunctionWithNoFreeVars

    if not getattr(hop, "reuse_traces", True):
        return None
    try:
        # A lazy variable becomes the variable it stands for (speculating
        # would realize it too).
        fn_vt = fn_vt.realize()
        arg_vts = [vt.realize() for vt in arg_vts]
        output = tx.output
        if getattr(output.current_tracer, "parent", None) is not None:
            return None
        side_effects = output.side_effects
        # A store to an object that existed before the frame (a global, a
        # cell, a function's attribute) might change what the body reads; a
        # store to one the frame created cannot (the body reads none of them).
        from torch._dynamo.variables.base import AttributeMutationNew

        if side_effects.has_pending_mutation(fn_vt) or any(
                not isinstance(getattr(item, "mutation_type", None), AttributeMutationNew)
                for item in side_effects.store_attr_mutations):
            return None
        if type(fn_vt) is UserFunctionVariable:
            fn = fn_vt.get_function()
        elif type(fn_vt) is UserDefinedObjectVariable and \
                type(fn_vt.value) is FunctionWithNoFreeVars:
            fn = fn_vt.value.fn  # type: ignore[assignment]
        else:
            return None
        if not _pure_function(fn):
            return None
        plain = _plain_tensor_types()
        sig: list[Any] = []
        nodes: dict[Any, int] = {}
        storages: dict[int, int] = {}
        for i, vt in enumerate(arg_vts):
            if type(vt) is TensorVariable:
                node = vt.as_proxy().node
                value = node.meta.get("example_value")
                if not isinstance(value, torch.Tensor) or value.layout is not torch.strided:
                    return None
                share = storages.setdefault(value.untyped_storage()._cdata, i)
                sig.append((_tensor_signature(value, plain), nodes.setdefault(node, i), share))
            elif type(vt) is ConstantVariable and isinstance(
                    vt.value, (int, float, bool, str, type(None))):
                sig.append((type(vt.value), vt.value))
            else:
                return None
        key = (hop, fn, freeze(leading), freeze(config), tuple(sig), global_state())
        hash(key)
    except (_Uncacheable, TypeError, AttributeError, RuntimeError, NotImplementedError):
        return None
    return key


def _speculations(output: Any) -> dict[Hashable, Speculation]:
    tables = getattr(output, _ATTR, None)
    if tables is None:
        tables = {}
        setattr(output, _ATTR, tables)
    table: dict[Hashable, Speculation] = tables.setdefault("speculations", {})
    return table


def find_speculation(tx: Any, key: Hashable) -> Speculation | None:
    spec = _speculations(tx.output).get(key)
    if spec is None or spec.name not in getattr(tx.output, "nn_modules", {}):
        return None
    return spec


def save_speculation(tx: Any, key: Hashable, p_args: Sequence[Any], arg_vts: Sequence[Any],
                     example_value: Any, body_r: Any, output_vts: Any) -> None:
    """Record a speculation for equal calls, where it can be replayed exactly."""
    from torch._dynamo.variables.lists import TupleVariable
    from torch._dynamo.variables.tensor import TensorVariable

    try:
        body_node = p_args[0].node
        name = str(body_node.target)
        body = tx.output.nn_modules.get(name)
        if body_node.op != "get_attr" or not isinstance(body, torch.fx.GraphModule) or \
                not reusable_graph(body) or body_has_effects(body):
            return
        by_node: dict[Any, int] = {}
        for i, vt in enumerate(vt.realize() for vt in arg_vts):
            if type(vt) is TensorVariable:
                by_node.setdefault(vt.as_proxy().node, i)
        mapping = tuple(by_node[p.node] for p in p_args[1:])
        outs = list(output_vts) if isinstance(output_vts, (list, tuple)) else [output_vts]
        items: list[Any]
        if type(body_r) is TensorVariable:
            single = True
            items = [body_r]
        elif type(body_r) is TupleVariable and all(type(v) is TensorVariable
                                                    for v in body_r.items):
            single = False
            items = list(body_r.items)
        else:
            return
        if len(items) != len(outs) or any(a is not b for a, b in zip(items, outs)) or \
                len({id(v) for v in items}) != len(items):
            return
        flat = tuple(example_value) if isinstance(example_value, (list, tuple)) \
            else (example_value,)
        if len(flat) != len(items) or not all(
                isinstance(t, torch.Tensor) and t.layout is torch.strided
                and t.is_contiguous() for t in flat) or \
                not independent_outputs((), flat):
            return
    except (KeyError, AttributeError, RuntimeError, NotImplementedError):
        return
    _speculations(tx.output)[key] = Speculation(name, mapping, flat, single)


def replay_speculation(tx: Any, hop: Any, spec: Speculation, arg_vts: Sequence[Any],
                       stand_in_leading: tuple[Any, ...],
                       stand_in_config: dict[str, Any]) -> Any:
    """The HOP node of a call equal to ``spec``'s: the installed body, this
    call's operands, fresh outputs of the recorded metadata."""
    from torch._dynamo.variables.higher_order_ops import add_call_function, make_attr
    from torch._dynamo.variables.lists import TupleVariable

    def fresh(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device,
                                  requires_grad=t.requires_grad)
        # Not a leaf, as the body's outputs are not (in-place ops on a leaf
        # that requires grad are refused).
        return out.clone() if t.requires_grad else out

    with tx.fake_mode, torch.enable_grad():
        example_value = tuple(fresh(t) for t in spec.outputs)
    body_node = make_attr(tx, spec.name)
    p_args = (body_node, *(arg_vts[i].realize().as_proxy() for i in spec.mapping))
    flat = add_call_function(tx, hop, (*stand_in_leading, *p_args), stand_in_config,
                             example_value)
    counters["dynamo_replayed"] += 1
    items = list(flat.items)  # type: ignore[attr-defined]
    return items[0] if spec.single else TupleVariable(items)
