"""``hopkit.BaseHOP``: define your own subgraph higher-order operator.

    hop(subgraph, *operands, **config) -> subgraph(*operands)

In plain Python, every rule below computes::

    def hop(subgraph, *operands, **config):
        return subgraph(*operands)     # config is recorded on the node, never passed

A subclass may take positional configuration before the subgraph
(``leading_config = ("device_type", ...)``, as ``wrap_with_autocast`` does) and
may run its subgraph under a context (``subgraph_context``); every rule honours
both.

Rules, in the order they are defined here: dense (the reference semantics),
autograd, functionalize, fake, proxy. Its other integrations live next door:
the Dynamo variable in ``hopkit/base_hop/_dynamo.py`` (it subclasses a
Dynamo-internal class), the tracing helpers of the autograd and functionalize
rules in ``hopkit/base_hop/_tracing.py``, the caches that let equal calls
share one trace in ``hopkit/base_hop/_reuse.py``, the names in torch's HOP registry in
``hopkit/base_hop/_names.py``, and the Inductor lowering (fuse a pointwise
body, else inline it) in ``hopkit/inductor/hop_lowering.py``. The registration
block, ``BaseHOP._register_rules``, lists every one of them.

NOTE [BaseHOP plain-eager fast path]
Called where the dispatcher would end in the dense rule anyway (no mode, no
functorch transform, no __torch_function__ mode, no functionalization, no
subclass or functional tensor: hopkit._dispatch.hop_call_reaches_dense), the
HOP skips the dispatcher (whose Python HigherOrderOperator dispatch flattens
the arguments twice per key) and runs its dense rule directly. With grad enabled, autograd then records the body's ops as
they run: that is eager's semantics exactly (double backward, RNG, data-
dependent bodies, autocast's backward included), nothing is traced, and the body
runs once. Everything else goes through the dispatcher and the rules below.
The HOP nodes of compiled and exported graphs take the same path with even
less: their bodies are graphs hopkit made (marked internal), checked when
traced, so the call skips the argument and aliasing checks and the module
call and runs the body's ``forward`` (a HOP node of an aot_eager graph then
costs about 2 us over the body itself).

NOTE [BaseHOP autograd: one joint trace, partitioned]
Where the autograd rule runs (make_fx or AOTAutograd tracing a function whose
operands need grad), the backward must itself be a HOP call. Torch's in-tree
BaseHOP re-traces a joint graph in every backward and recomputes the forward
inside it. hopkit traces the joint of the subgraph once per HOP call, with fake
tensors so nothing runs for real, and partitions it with no recomputation
(``default_partition``) into a forward graph that returns the outputs plus
the activations backward needs, and a backward graph. The forward graph *is*
the body: it runs exactly once per call, and a side effect in it (see
``hopkit.effects``) is never repeated in backward. Under tracing the two
graphs become one HOP node in the forward graph and one in the backward graph.
The tangents are assumed contiguous, with the outputs' dtypes, as AOTAutograd
assumes; backward makes them so. The backward is traced, and the backward HOP
call runs, with ``backward_config`` (autocast turns itself off there, as
eager's backward runs outside autocast).

NOTE [BaseHOP input mutation]
A subgraph may mutate its operands in place (``x.add_(1)``, also through a
view: ``x[0].mul_(2)``). Eager runs it as written. Functionalization runs the
subgraph under functionalization, learns from the functional wrappers which
operands it mutated, returns their new values as extra outputs, and writes
them back to the caller's tensors, so traced graphs stay functional and the
caller sees what eager shows. Outputs that alias an operand or another output
are refused with an error (no HOP rule can keep that aliasing correct once
functionalized). Operands that alias each other: NOTE [Operands that alias each
other].
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import keyword
import types
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar

import torch
import torch.utils._pytree as pytree
from torch._C import DispatchKey
from torch._ops import HigherOrderOperator
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode

from hopkit import _dispatch, _fx
from hopkit.base_hop import _checkpoint, _config, _dynamo, _functorch, _names, _reuse, _subclasses, _tracing

__all__ = ["BaseHOP", "FunctionWithNoFreeVars"]


# ---------------------------------------------------------------------------
# The subgraph wrapper
# ---------------------------------------------------------------------------


class FunctionWithNoFreeVars:
    """A Python function that the caller promises reads no free variables.

    Outside ``torch.compile`` a HOP needs a subgraph it can trace on its own:
    a ``torch.fx.GraphModule``, or a function wrapped in this class. (Inside
    ``torch.compile`` Dynamo lifts free variables itself, so a plain function
    or lambda is accepted there.)
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        if not callable(fn):
            raise TypeError(
                f"hopkit: FunctionWithNoFreeVars expects a callable, but got "
                f"{type(fn).__name__}; pass the function that computes the "
                f"subgraph, e.g. FunctionWithNoFreeVars(lambda x: (x.sin(),))."
            )
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"FunctionWithNoFreeVars({getattr(self.fn, '__qualname__', self.fn)!r})"


# ---------------------------------------------------------------------------
# The HOP class
# ---------------------------------------------------------------------------


class BaseHOP(HigherOrderOperator):
    """Base class for a HOP ``hop(subgraph, *operands, **config)``.

    Subclass it and give it a name::

        class InvokeQuant(hopkit.BaseHOP):
            def __init__(self) -> None:
                super().__init__("my_invoke_quant")

        invoke_quant = InvokeQuant()
        out = invoke_quant(hopkit.FunctionWithNoFreeVars(g), x, y, scheme="nf4")

    The result is ``subgraph(*operands)``; ``config`` is recorded on the graph
    node and never passed to the subgraph. The HOP is registered as
    ``torch.ops.higher_order.<name>`` and works in eager, under FakeTensorMode,
    make_fx, functionalization, autograd, ``torch.compile`` (eager, aot_eager,
    inductor) and ``torch.export``.

    Override points for subclasses:

    * ``leading_config``: names of positional configuration arguments that
      come before the subgraph (``hop(*leading, subgraph, *operands)``).
    * ``subgraph_context(config)``: a context manager every rule runs the
      subgraph under (e.g. an autocast state). ``config`` holds the leading
      arguments and the keyword arguments by name.
    * ``backward_config(config)``: the configuration of the backward HOP call.
    * ``inductor_mode``: how Inductor lowers the HOP: ``"auto"`` (fuse a
      pointwise body into its neighbours; compile a body several calls share
      once, called by each (NOTE [A shared HOP body compiles once in
      Inductor] in hopkit/inductor/shared_body.py); else inline it op by op),
      ``"fuse"`` (require fusion: an error names the op that prevents it) or
      ``"inline"`` (always op by op).
    * ``unsupported_transforms``: torch.func transforms the HOP refuses, from
      ``("vmap", "grad", "jvp")`` (``"grad"`` covers grad, vjp, jacrev;
      ``"jvp"`` covers jvp, jacfwd and forward-mode AD); a call under one
      raises an error naming the HOP and the transform.
    * ``vmap_rule(info, in_dims, *args, **config)``, ``grad_rule(interpreter,
      *args, **config)``, ``jvp_rule(interpreter, *args, **config)``: the
      call under a torch.func transform; the defaults transform the subgraph
      and keep one HOP call (NOTE [BaseHOP under torch.func transforms] in
      ``hopkit/base_hop/_functorch.py``).
    * ``reuse_traces``: whether repeated calls with equal subgraph, operand
      metadata and config share one trace (default True): one body module
      in Dynamo's graph, one joint trace and partition, one forward and one
      backward body module in AOT and exported graphs, one plan in eager
      (NOTE [BaseHOP trace reuse] in ``hopkit/base_hop/_reuse.py``). Set
      ``reuse_traces = False`` to trace every call anew.
    * ``reuse_key(config, *operands)``: refines when calls may share a trace:
      a hashable added to the key of the call (default ``()``), or None to
      trace this call anew. It can only tell calls apart, never merge calls
      the key tells apart, so a wrong refinement costs compile time, never
      correctness. Called with the operands as the trace sees them (fake
      tensors under torch.compile and export).
    * ``hop.py_impl(SubclassType)(rule)``: the call on operands of a tensor
      subclass, in eager and traced, instead of hopkit's default (eager runs
      the body on the subclass; a trace desugars a traceable wrapper
      subclass into a call on its inner tensors). ``rule(*leading,
      subgraph, *operands, **config)`` returns the outputs, or
      NotImplemented to pass (NOTE [BaseHOP on tensor subclasses] in
      ``hopkit/base_hop/_subclasses.py``).
    """

    leading_config: ClassVar[tuple[str, ...]] = ()
    inductor_mode: ClassVar[str] = "auto"
    reuse_traces: ClassVar[bool] = True
    _is_hopkit_hop: ClassVar[bool] = True

    def __init__(self, name: str) -> None:
        _check_new_hop_name(type(self), name)
        super().__init__(name)
        _names.publish_hop(self)
        self._num_leading = len(self.leading_config)
        self._has_context = type(self).subgraph_context is not BaseHOP.subgraph_context
        self._fast_path = False  # turned on by _register_rules
        self._register_rules()

    # -- calling ------------------------------------------------------------

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        n = self._num_leading
        if self._fast_path and not self._has_context and len(args) > n:
            body = args[n]
            if isinstance(body, torch.fx.GraphModule):
                # NOTE [BaseHOP plain-eager fast path], for a body hopkit made
                # (the HOP nodes of compiled and exported graphs): it was
                # checked when traced, needs no aliasing check, and has no
                # hooks to honour. _is_internal, spelled inline: compiled code
                # runs every Python frame through Dynamo's frame callback, so
                # each call frame here costs ~1 us per HOP node.
                attrs = body.__dict__
                meta = attrs.get("meta")
                if (
                    (attrs.get(_INTERNAL) or (type(meta) is dict and meta.get(_INTERNAL)))
                    and _dispatch.hop_call_reaches_dense(args[n + 1 :])
                ):
                    return body.forward(*args[n + 1 :])
        if len(args) <= n:
            raise TypeError(
                f"hopkit: {self._name} expects "
                f"({', '.join((*self.leading_config, 'subgraph'))}, *operands), "
                f"but got {len(args)} positional argument(s); pass the subgraph "
                f"after {n} configuration argument(s)."
                if n
                else f"hopkit: {self._name} expects (subgraph, *operands, **config), "
                f"but got no subgraph; pass a torch.fx.GraphModule or a "
                f"hopkit.FunctionWithNoFreeVars first."
            )
        subgraph = args[n]
        if not isinstance(subgraph, (torch.fx.GraphModule, FunctionWithNoFreeVars)):
            raise RuntimeError(
                f"hopkit: {self._name} was called outside torch.compile with a "
                f"subgraph of type {type(subgraph).__name__}, which it cannot "
                f"trace safely. Outside torch.compile the subgraph must be a "
                f"torch.fx.GraphModule or a hopkit.FunctionWithNoFreeVars: wrap "
                f"your function as hopkit.FunctionWithNoFreeVars(fn) (it must not "
                f"read free variables; pass them as operands), or call the HOP "
                f"inside torch.compile."
            )
        operands = args[n + 1 :]
        for x in operands:  # the loop of _check_operands, inline: every call runs it
            if not isinstance(x, _OPERAND_TYPES):
                _check_operands(self, operands)
        if kwargs:
            # The checks' common outcome first (names free, values scalars):
            # they run on every eager call.
            if not _RESERVED_CONFIG_NAMES.isdisjoint(kwargs):
                _check_config_names(self, kwargs)
            for value in kwargs.values():
                if type(value) not in _SCALAR_CONFIG:
                    _config.check_config(self._name, tuple(kwargs), tuple(kwargs.values()))
                    break
        if n:
            _config.check_config(self._name, self.leading_config, args[:n])
        if self._fast_path and _dispatch.hop_call_reaches_dense(operands):
            # NOTE [BaseHOP plain-eager fast path]: base_hop_dense, inline.
            if self._has_context:
                out = self._run(args[:n], subgraph, operands, kwargs)
            else:
                out = subgraph(*operands)
            if not _is_internal(subgraph):
                _check_no_output_aliasing(self, operands, out)
            return out
        if self._fast_path and _functorch.vmap_runs_inline(self, args[n + 1 :]):
            # NOTE [BaseHOP under torch.func transforms]: under an eager vmap
            # with nothing recording a graph, the body on the batched tensors.
            return _functorch.inline_under_vmap(self, args, kwargs)
        return super().__call__(*args, **kwargs)

    def subgraph_context(
        self, config: dict[str, Any]
    ) -> contextlib.AbstractContextManager[None]:
        """The context every rule runs the subgraph under (default: none)."""
        return contextlib.nullcontext()

    def reuse_key(self, config: dict[str, Any], /, *operands: Any) -> Hashable | None:
        """A refinement of the key under which calls share a trace (default: none).

        See ``reuse_traces`` and NOTE [BaseHOP trace reuse] in
        hopkit/base_hop/_reuse.py.
        """
        return ()

    def backward_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The configuration the backward HOP call runs with (default: the same).

        Backward graphs are traced outside ``subgraph_context`` (as eager runs
        backward outside, e.g., autocast); a HOP whose context must not apply
        to its backward returns a configuration that turns it off here.
        """
        return config

    # -- torch.func transforms (rules: hopkit/base_hop/_functorch.py) -------
    # NOTE [BaseHOP under torch.func transforms]

    unsupported_transforms: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names = cls.unsupported_transforms
        bad = [t for t in names if t not in _functorch.TRANSFORMS] if isinstance(
            names, tuple) else [names]
        if bad:
            raise TypeError(
                f"hopkit: {cls.__name__}.unsupported_transforms must be a tuple "
                f"of transform names from {tuple(_functorch.TRANSFORMS)}, but got "
                f"{names!r}; e.g. unsupported_transforms = ('vmap',)."
            )

    def vmap_rule(self, info: _functorch.VmapInfo, in_dims: tuple[int | None, ...],
                  /, *args: Any, **config: Any) -> tuple[Any, Any]:
        """The call under ``torch.func.vmap``: ``(outputs, out_dims)``.

        ``args`` are the call's (leading config, subgraph, operands) with the
        batch dims of this vmap level taken off: operand ``i`` has its batch
        dim at ``in_dims[i]`` (None: not batched). It runs one level down
        (call the HOP or torch ops as usual). ``out_dims`` gives each output's
        batch dim (an ``Optional[int]``, or one for all). ``info`` has
        ``batch_size`` and ``randomness``. Default: the HOP of the vmapped
        subgraph, one HOP call (in eager, where nothing records a graph, the
        subgraph runs inline on the batched operands instead, as the plain
        subgraph would; overriding this method turns that off).
        """
        return _functorch.default_vmap_rule(self, info, in_dims, args, config)

    def grad_rule(self, interpreter: Any, /, *args: Any, **config: Any) -> Any:
        """The call under a reverse-mode torch.func transform (grad, vjp, jacrev).

        ``interpreter`` is torch's functorch grad interpreter of this level;
        ``args`` are the call's lifted to it. Default: a single-level autograd
        function calling the HOP of the subgraph one level down, and in
        backward the HOP of the subgraph's vjp (the subgraph recomputed).
        """
        return _functorch.default_grad_rule(self, interpreter, args, config)

    def jvp_rule(self, interpreter: Any, /, *args: Any, **config: Any) -> Any:
        """The call under a forward-mode torch.func transform (jvp, jacfwd).

        As ``grad_rule``; default: the HOP of the subgraph one level down,
        and the HOP of the subgraph's jvp for the tangents.
        """
        return _functorch.default_jvp_rule(self, interpreter, args, config)

    # -- end of torch.func transforms ---------------------------------------

    def py_impl(self, k: Any) -> Any:
        # A rule registered after construction may override one the plain-eager
        # fast path would skip: from then on, every call dispatches.
        if getattr(self, "_fast_path", False):
            self._fast_path = False
        return super().py_impl(k)

    def dispatch(self, /, dispatch_key: Any, *args: Any, **kwargs: Any) -> Any:
        # NOTE [BaseHOP in eager under modes and subclasses]: a dispatch mode
        # or tensor subclass with no rule of its own sees the body's ops.
        if dispatch_key == DispatchKey.Python:
            if _inline_at_python_key(self, args, kwargs):
                return base_hop_dense(self, *args, **kwargs)
            # NOTE [BaseHOP on tensor subclasses] (hopkit/base_hop/_subclasses.py):
            # a subclass's own rule, else the call desugared onto inner tensors.
            res = _subclasses.python_key_rule(self, args, kwargs)
            if res is not NotImplemented:
                return res
        return super().dispatch(dispatch_key, *args, **kwargs)

    def gen_schema(self, /, *args: Any, **kwargs: Any) -> torch._C.FunctionSchema:
        """The schema of one call, with mutated operands annotated.

        ``my_hop(Any subgraph, Tensor(a1!) arg0, Tensor arg1, *,
        str scheme="nf4") -> ((Tensor))``
        """
        return _gen_schema(self, args, kwargs)

    # -- helpers shared by the rules ----------------------------------------

    def _split(self, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any, tuple[Any, ...]]:
        n = self._num_leading
        return args[:n], args[n], args[n + 1 :]

    def _config(self, leading: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**dict(zip(self.leading_config, leading)), **kwargs}

    def _backward_args(self, leading: tuple[Any, ...], kwargs: dict[str, Any]
                       ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if type(self).backward_config is BaseHOP.backward_config:
            return leading, kwargs
        config = self.backward_config(self._config(leading, kwargs))
        names = self.leading_config
        return (tuple(config[n] for n in names),
                {k: v for k, v in config.items() if k not in names})

    def _run(self, leading: tuple[Any, ...], subgraph: Any, operands: Sequence[Any],
             kwargs: dict[str, Any]) -> Any:
        """``subgraph(*operands)`` under this HOP's context."""
        if not self._has_context:
            return subgraph(*operands)
        with self.subgraph_context(self._config(leading, kwargs)):
            return subgraph(*operands)

    def _bind(self, leading: tuple[Any, ...], subgraph: Any,
              kwargs: dict[str, Any]) -> Callable[..., Any]:
        """``subgraph`` as a function of the operands, under this HOP's context."""
        if not self._has_context:
            return subgraph

        def bound(*operands: Any) -> Any:
            return self._run(leading, subgraph, operands, kwargs)

        return bound

    # -- registration block: one line per dispatch key ---------------------

    def _register_rules(self) -> None:
        p = functools.partial
        self.py_impl(DispatchKey.CompositeExplicitAutograd)(p(base_hop_dense, self))
        # Not py_autograd_impl: that wrapper calls gen_schema (a trace) on
        # every call that needs grad; base_hop_autograd checks grad itself.
        self.py_impl(DispatchKey.Autograd)(p(base_hop_autograd, self))
        self.py_functionalize_impl(p(base_hop_functionalize, self))
        self.py_impl(FakeTensorMode)(p(base_hop_fake, self))
        self.py_impl(ProxyTorchDispatchMode)(p(base_hop_proxy, self))
        # Dynamo variable: hopkit/base_hop/_dynamo.py. Inductor lowering (fuse
        # a pointwise body, else inline): hopkit/inductor/hop_lowering.py,
        # imported here rather than at module level because hopkit.inductor
        # sits above base_hop. Both are registered through hopkit._patch when
        # (and if) Dynamo and Inductor are imported, so that creating a HOP
        # imports neither.
        from hopkit.inductor import hop_lowering

        _dynamo.register_dynamo_variable(self)
        hop_lowering.register_inductor_lowering(self)
        # torch.func transforms (vmap, grad, jvp): hopkit/base_hop/_functorch.py.
        _functorch.register_functorch_rules(self)
        # Activation checkpointing's modes: hopkit/base_hop/_checkpoint.py.
        _checkpoint.register_checkpoint_rules(self)
        # torch.export.save / load of the HOP's nodes: hopkit/_serialization.py.
        from hopkit import _serialization

        _serialization.register_serialization(self)
        # Trace reuse (one trace for equal calls; NOTE [BaseHOP trace reuse]):
        # hopkit/base_hop/_reuse.py, consulted by the autograd, fake and proxy
        # rules above and by the Dynamo variable; nothing to register.
        # NOTE [BaseHOP plain-eager fast path]: on from here; py_impl turns it
        # off again if a subclass then registers a rule of its own.
        self._fast_path = True


_OPERAND_TYPES = (torch.Tensor, int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)


def _check_operands(hop: BaseHOP, operands: Sequence[Any]) -> None:
    """Operands are tensors or scalars: each becomes one argument of the HOP node."""
    for i, x in enumerate(operands):
        if not isinstance(x, _OPERAND_TYPES):
            raise TypeError(
                f"hopkit: {hop._name}'s operands must be Tensors or Python/symbolic "
                f"scalars (int, float, bool), but operands[{i}] is a "
                f"{type(x).__name__}; pass the tensors of a list or dict as separate "
                f"operands (hop(g, *tensors)), close over other constants in the "
                f"subgraph, or pass configuration as a keyword argument."
            )


# torch's own HOP dispatch (torch/_ops.py, 2.11-2.15) calls functionalization
# rules as fn(mode, *args, **kwargs) and fn(interpreter, *args, **kwargs), so a
# keyword argument of either name collides there, whatever hopkit does.
_RESERVED_CONFIG_NAMES = frozenset({"mode", "interpreter"})
_SCALAR_CONFIG = _config.SCALAR_TYPES


def _check_config_names(hop: BaseHOP, kwargs: dict[str, Any]) -> None:
    clash = sorted(_RESERVED_CONFIG_NAMES.intersection(kwargs))
    if clash:
        raise TypeError(
            f"hopkit: {hop._name}'s configuration may not be named {clash[0]!r}: "
            f"torch's higher-order-operator dispatch passes an argument of that "
            f"name to functionalization rules itself, so the call would fail under "
            f"torch.compile and torch.func.functionalize; rename it (e.g. "
            f"{clash[0]}_={kwargs[clash[0]]!r})."
        )


def _check_new_hop_name(cls: type, name: str) -> None:
    """Refuse a name taken by another HOP before anything is registered."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(
            f"hopkit: a HOP name must be a Python identifier that is not a keyword "
            f"(it becomes torch.ops.higher_order.<name>), but got {name!r}; pick a "
            f"name like 'my_invoke_quant'."
        )
    if _names.hop_namespace_reserves(name):
        raise ValueError(
            f"hopkit: the HOP name {name!r} is an attribute of the namespace "
            f"torch.ops.higher_order itself, so torch.ops.higher_order.{name} could "
            f"never be this HOP (and registering it would break the namespace); "
            f"pick a name that does not start with an underscore, e.g. "
            f"'my{name.strip('_') and '_' + name.strip('_')}'."
        )
    existing = _names.registered_hop(name)
    if existing is None:
        return
    same_class = (
        type(existing).__module__ == cls.__module__
        and type(existing).__qualname__ == cls.__qualname__
    )
    if not same_class:
        owner = f"{type(existing).__module__}.{type(existing).__qualname__}"
        raise ValueError(
            f"hopkit: the HOP name {name!r} is already taken by {owner} "
            f"(torch.ops.higher_order.{name}); give "
            f"{cls.__module__}.{cls.__qualname__} another name, e.g. a prefix "
            f"for your project."
        )


# ---------------------------------------------------------------------------
# Rule: dense (the reference semantics)
# ---------------------------------------------------------------------------


def base_hop_dense(hop: BaseHOP, /, *args: Any, **kwargs: Any) -> Any:
    """subgraph(*operands), refusing outputs that alias operands or each other."""
    leading, subgraph, operands = hop._split(args)
    if not hop._has_context and isinstance(subgraph, torch.fx.GraphModule) and _is_internal(subgraph):
        # A graph hopkit made or already checked (the nodes of compiled
        # graphs): no hooks to honour, so skip nn.Module.__call__.
        return subgraph.forward(*operands)
    out = hop._run(leading, subgraph, operands, kwargs)
    if not _is_internal(subgraph):
        _check_no_output_aliasing(hop, operands, out)
    return out


# hopkit's own forward/backward graphs return saved activations, which may be
# views of the operands or of each other; only hopkit's backward reads them, so
# the user-facing aliasing check does not apply to them.
# The mark is kept as an attribute and, on GraphModules, in `gm.meta` too:
# backends copy subgraph modules (torch 2.15's AOTAutograd rebuilds them),
# and GraphModule's copies keep `meta` but not other attributes.
_INTERNAL = "_hopkit_internal"


def _is_internal(subgraph: Any) -> bool:
    # Read from the instance dict: every HOP node of a compiled graph asks, and
    # on a GraphModule without the attribute getattr goes through
    # nn.Module.__getattr__ and an AttributeError (~5 us, more than the call).
    attrs = getattr(subgraph, "__dict__", None)
    if attrs is None:  # hopkit's slotted wrappers carry the mark in a slot
        return bool(getattr(subgraph, _INTERNAL, False))
    if attrs.get(_INTERNAL, False):
        return True
    meta = attrs.get("meta")
    return isinstance(meta, dict) and bool(meta.get(_INTERNAL, False))


def _mark_internal(gm: Any, like: Any = True) -> None:
    if like is True or _is_internal(like):
        setattr(gm, _INTERNAL, True)
        if isinstance(gm, torch.fx.GraphModule):
            gm.meta[_INTERNAL] = True


def _check_no_output_aliasing(hop: BaseHOP, operands: Sequence[Any], out: Any) -> None:
    """Outputs must be tensors (or None), none aliasing an operand or another output."""
    # Runs on every plain eager call: storages compared by identity (two
    # tensors alias exactly when they share one), positions named only when
    # there is an error to raise.
    outs = _flat_outputs(hop, out)
    seen: dict[int, int] = {}
    for i, t in enumerate(operands):
        if isinstance(t, _Tensor) and t.layout is _STRIDED:
            seen.setdefault(t.untyped_storage()._cdata, i)
    n = len(operands)
    for i, t in enumerate(outs):
        if not isinstance(t, _Tensor) or t.layout is not _STRIDED:
            continue
        key = t.untyped_storage()._cdata
        first = seen.get(key)
        if first is not None:
            other = f"operand {first}" if first < n else f"output {first - n}"
            raise RuntimeError(
                f"hopkit: {hop._name}'s subgraph returned output {i}, which "
                f"aliases {other} (they share storage). A HOP's outputs must be "
                f"fresh tensors, or functionalization and compilation cannot keep "
                f"the aliasing correct; return a copy instead (e.g. x.clone() "
                f"rather than x or a view of x)."
            )
        seen[key] = n + i


_Tensor = torch.Tensor
_STRIDED = torch.strided


# ---------------------------------------------------------------------------
# Rule: autograd
# ---------------------------------------------------------------------------


def base_hop_autograd(hop: BaseHOP, /, *args: Any, **kwargs: Any) -> Any:
    """Differentiable call: the partitioned forward graph now, its backward later.

    See NOTE [BaseHOP autograd: one joint trace, partitioned].
    """
    if _runs_as_eager(hop, args):
        # NOTE [BaseHOP in eager under modes and subclasses]
        return base_hop_dense(hop, *args, **kwargs)
    leading, subgraph, operands = hop._split(args)
    if _functorch.has_forward_tangents(operands):
        # Dual tensors (torch.autograd.forward_ad) while a graph is traced: the
        # branch below would run beneath autograd and drop their tangents.
        return _functorch.base_hop_forward_ad(hop, leading, subgraph, operands, kwargs)
    if not (
        torch.is_grad_enabled()
        and any(isinstance(t, torch.Tensor) and t.requires_grad for t in operands)
    ):
        with torch._C._AutoDispatchBelowAutograd():
            return hop(*args, **kwargs)
    # hopkit's own trace: a user's dispatch mode sees none of it.
    # (torch 2.11 tags every node of a compiled checkpointed region
    # "recompute"; hopkit's inner joint must not pick that tag up.)
    with _dispatch.user_modes_suspended(), _checkpoint.without_checkpoint_tags():
        plan = _build_autograd_plan(hop, leading, subgraph, operands, kwargs)
    outs = _BaseHOPFunction.apply(hop, plan, leading, kwargs, *operands)
    return outs[0] if plan.single_output else outs


# NOTE [BaseHOP in eager under modes and subclasses]
# Where nothing records a graph (no make_fx, AOTAutograd or export trace:
# _dispatch.tracing_underway), a HOP call means exactly what its body means,
# so the autograd rule and the Python key run the body right there, as the
# plain-eager fast path does: autograd records the body's ops, and a user's
# dispatch mode (a logging mode, FlopCounterMode, DebugMode, selective
# activation checkpointing's caching modes, with or without
# supports_higher_order_operators) or a tensor subclass sees each of the
# body's ops, as for the plain body, and nothing is traced: no joint graph,
# no fake tensors reaching the mode. Modes with a rule registered for the HOP
# (hop.py_impl(ModeType): torch's FakeTensorMode, ProxyTorchDispatchMode,
# FunctionalTensorMode, or a user's own) keep it, and while a trace is
# recorded every key keeps torch's dispatch, so traced graphs keep one HOP
# node. hopkit's own joint trace (traced autograd) runs with the user's modes
# suspended (_dispatch.user_modes_suspended). Activation checkpointing's
# modes have rules that apply only while a graph is recorded (NOTE [BaseHOP
# under activation checkpointing] in hopkit/base_hop/_checkpoint.py); in
# eager they get the body inline like any other mode.


def _runs_as_eager(hop: BaseHOP, args: tuple[Any, ...] = ()) -> bool:
    """Whether the autograd rule may run the body as eager does (see the NOTE)."""
    if _dispatch.tracing_underway():
        return False
    if any(t in hop.python_key_table for t in _subclasses.user_subclasses(args)):
        # A subclass's own rule is honoured at the Python key, below autograd:
        # NOTE [BaseHOP on tensor subclasses].
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    mode = _get_current_dispatch_mode()
    if mode is None or type(mode) not in hop.python_key_table:
        return True
    # Under FakeTensorMode the body run directly computes what hopkit's own
    # fake rule computes; a fake rule the HOP's author registered must run.
    if _checkpoint.inlines_in_eager(mode):
        # Activation checkpointing's modes have rules only for traced calls:
        # NOTE [BaseHOP under activation checkpointing].
        return True
    rule = hop.python_key_table[type(mode)]
    return isinstance(mode, FakeTensorMode) and getattr(rule, "func", None) is base_hop_fake


def _inline_at_python_key(hop: BaseHOP, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the Python key runs the body under a mode or subclass with no rule."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    mode = _get_current_dispatch_mode()
    if mode is not None:
        if type(mode) in hop.python_key_table and not _checkpoint.inlines_in_eager(mode):
            return False
    else:
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor

        subclasses = {
            type(a) for a in args
            if isinstance(a, torch.Tensor) and type(a) not in (torch.Tensor, torch.nn.Parameter)
            and type(a).__torch_dispatch__ is not torch._C._disabled_torch_dispatch_impl
        }
        if not subclasses or any(
            issubclass(t, (FakeTensor, FunctionalTensor)) or t in hop.python_key_table
            for t in subclasses
        ):
            return False
    return not _dispatch.tracing_underway()


@dataclasses.dataclass
class _AutogradPlan:
    """The partitioned joint graph of one HOP call."""

    fw: torch.fx.GraphModule  # operands -> (*outputs, *saved)
    bw: torch.fx.GraphModule  # bw_inputs -> grads of diff_operands
    num_outputs: int
    single_output: bool
    # What to feed each placeholder of `bw`: ("operand", i), ("saved", k) or
    # ("tangent", j).
    bw_inputs: tuple[tuple[str, int], ...]
    diff_operands: tuple[int, ...]  # the operands `bw` returns grads for
    requires_grad_operands: tuple[int, ...]
    non_diff_outputs: tuple[int, ...]
    joint: torch.fx.GraphModule
    # Built on first double backward: grads from the operands alone, so that
    # they are differentiable again (see _BaseHOPFunction.backward).
    recompute_bw: tuple[torch.fx.GraphModule, tuple[tuple[str, int], ...]] | None = None


class _BaseHOPFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hop: BaseHOP, plan: _AutogradPlan, leading: tuple[Any, ...],
        kwargs: dict[str, Any], *operands: Any,
    ) -> tuple[Any, ...]:
        with torch._C._AutoDispatchBelowAutograd():
            res = hop(*leading, plan.fw, *operands, **kwargs)
        outs, saved = tuple(res[: plan.num_outputs]), tuple(res[plan.num_outputs :])
        ctx.hop, ctx.plan, ctx.leading, ctx.kwargs = hop, plan, leading, kwargs
        # Tensors go through save_for_backward (version checks, hooks); SymInts
        # and Python scalars ride along on ctx.
        tensor_slots = [x for x in (*operands, *saved) if isinstance(x, torch.Tensor)]
        ctx.save_for_backward(*tensor_slots)
        ctx.layout = [isinstance(x, torch.Tensor) for x in (*operands, *saved)]
        ctx.others = [x for x in (*operands, *saved) if not isinstance(x, torch.Tensor)]
        ctx.num_operands = len(operands)
        non_diff = [outs[i] for i in plan.non_diff_outputs]
        if non_diff:
            ctx.mark_non_differentiable(*non_diff)
        if _functorch._dual_level() >= 0:
            # Forward-mode AD may ask for jvp right after this forward.
            ctx.fwd_operands = operands
        return outs

    @staticmethod
    def jvp(ctx: Any, hop_t: Any, plan_t: Any, leading_t: Any, kwargs_t: Any,
            *operand_tangents: Any) -> Any:
        # The HOP of the forward graph's jvp: hopkit/base_hop/_functorch.py.
        return _functorch.autograd_function_jvp(ctx, operand_tangents)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        plan: _AutogradPlan = ctx.plan
        tensors, others = iter(ctx.saved_tensors), iter(ctx.others)
        slots = [next(tensors) if is_t else next(others) for is_t in ctx.layout]
        operands, saved = slots[: ctx.num_operands], slots[ctx.num_operands :]
        bw, bw_inputs = plan.bw, plan.bw_inputs
        if torch.is_grad_enabled():
            # create_graph=True: the saved activations came out of the forward
            # graph below autograd and carry no history, so use a backward that
            # recomputes them from the operands and is differentiable again.
            if plan.recompute_bw is None:
                plan.recompute_bw = _recompute_backward(plan)
            bw, bw_inputs = plan.recompute_bw
        bw_args = []
        for kind, i in bw_inputs:
            if kind == "operand":
                bw_args.append(operands[i])
            elif kind == "saved":
                bw_args.append(saved[i])
            else:  # The backward graph was traced with contiguous tangents.
                bw_args.append(grads[i].contiguous())
        leading, kwargs = ctx.hop._backward_args(ctx.leading, ctx.kwargs)
        res = ctx.hop(*leading, bw, *bw_args, **kwargs)
        res = res if isinstance(res, (tuple, list)) else (res,)
        operand_grads: list[Any] = [None] * ctx.num_operands
        for i, g in zip(plan.diff_operands, res):
            operand_grads[i] = g
        return (None, None, None, None, *operand_grads)


def _build_autograd_plan(hop: BaseHOP, leading: tuple[Any, ...], subgraph: Any,
                         operands: Sequence[Any], kwargs: dict[str, Any]) -> _AutogradPlan:
    """The plan of this call, traced once per key: NOTE [BaseHOP trace reuse]."""
    if _subclasses.has_wrapper_subclass(operands):
        # Traced on subclass stand-ins, never shared: NOTE [BaseHOP on tensor subclasses].
        return _subclasses.trace_autograd_plan(hop, leading, subgraph, operands, kwargs)
    found = _reuse.call_key(hop, leading, subgraph, operands, kwargs, "autograd")
    if found is None:
        return _trace_autograd_plan(hop, leading, subgraph, operands, kwargs)
    anchor, key = found
    fake_mode = _reuse.operands_fake_mode(operands)
    plan: _AutogradPlan | None = _reuse.plan_cache.get(fake_mode, anchor, key)
    if plan is not None:
        _reuse.counters["joint_reused"] += 1
        return plan
    plan = _trace_autograd_plan(hop, leading, subgraph, operands, kwargs)
    if _reuse.reusable_graph(plan.joint):
        _reuse.plan_cache.put(fake_mode, anchor, key, plan)
    return plan


def _plain_tangent(o: Any) -> Any:
    """A contiguous tangent of ``o``'s metadata, as AOTAutograd assumes."""
    if not isinstance(o, torch.Tensor):
        return None
    return torch.empty(o.shape, dtype=o.dtype, device=o.device)


def _trace_autograd_plan(hop: BaseHOP, leading: tuple[Any, ...], subgraph: Any,
                         operands: Sequence[Any], kwargs: dict[str, Any],
                         stand_ins: Callable[..., Any] = _tracing.tracing_fresh_examples,
                         tangent_like: Callable[[Any], Any] = _plain_tangent) -> _AutogradPlan:
    """Trace and partition the joint of one call, on fake stand-ins of the
    operands (``stand_ins``; tensor subclasses bring their own: NOTE [BaseHOP
    on tensor subclasses])."""
    _reuse.counters["joint_traced"] += 1
    fn = hop._bind(leading, subgraph, kwargs)
    record: dict[str, Any] = {}

    def backward_context() -> contextlib.AbstractContextManager[None]:
        if type(hop).backward_config is BaseHOP.backward_config:
            return contextlib.nullcontext()
        return hop.subgraph_context(hop.backward_config(hop._config(leading, kwargs)))

    def joint(primals: list[Any], tangents: list[Any]) -> Any:
        out = fn(*primals)
        outs = _flat_outputs(hop, out)
        _tracing.tag_traced_nodes_as_forward()
        record["single"] = not isinstance(out, (tuple, list))
        record["requires_grad"] = [isinstance(o, torch.Tensor) and o.requires_grad for o in outs]
        pairs = [(o, t) for o, t in zip(outs, tangents) if isinstance(o, torch.Tensor) and o.requires_grad]
        diff = [p for p in primals if isinstance(p, torch.Tensor) and p.requires_grad]
        grads: Sequence[Any] = ()
        if pairs and diff:
            # The backward is traced under the context the backward HOP call
            # will run with (HOP.backward_config), not the one around the call.
            with backward_context():
                grads = torch.autograd.grad(
                    [o for o, _ in pairs], diff, [t for _, t in pairs], allow_unused=True
                )
        _tracing.tag_traced_nodes_as_backward()
        return (*outs, *grads)

    with stand_ins(operands) as (examples, trace):
        with torch.enable_grad():
            with torch.no_grad():
                probe, mutated = _probe_outputs(fn, examples)
                probe_outs = _flat_outputs(hop, probe)
            _refuse_mutated_operands_needing_grad(hop, examples, mutated)
            tangents = [tangent_like(o) for o in probe_outs]
            joint_gm = trace(joint)(list(examples), tangents)
    num_outputs = len(probe_outs)
    _refuse_unpartitionable_mutations(hop, joint_gm)
    try:
        return _partition(hop, joint_gm, operands, num_outputs, record)
    except AssertionError as e:
        # The partitioner's own checks ("Node ... was invalid, but is output"):
        # a joint traced without functionalization in which an operand that
        # needs no grad is updated, through a view, with a value that does.
        if mutated:
            i = mutated[0]
            raise NotImplementedError(
                f"hopkit: under traced autograd (make_fx, aot_eager, inductor, "
                f"export), {hop._name}'s subgraph updates operand {i} in place with "
                f"a value that requires grad, and the joint graph cannot be split "
                f"into forward and backward ({e}). Update the operand directly "
                f"rather than through a view (buf.add_(v) works), or return the "
                f"update from the subgraph and apply it outside the HOP."
            ) from e
        raise


def _refuse_mutated_operands_needing_grad(hop: BaseHOP, examples: Sequence[Any],
                                          mutated: Sequence[int]) -> None:
    """Traced autograd through an in-place update of an operand needing grad.

    Eager supports it for a non-leaf (autograd records the body as it runs),
    but the joint graph is traced on leaf stand-ins of the operands, where
    torch refuses the in-place update; refuse it here with what to do.
    """
    for i in mutated:
        if getattr(examples[i], "requires_grad", False):
            raise RuntimeError(
                f"hopkit: {hop._name}'s subgraph mutates operand {i} in place, and "
                f"operand {i} requires grad. Under traced autograd (make_fx, "
                f"aot_eager, inductor, export) an in-place update of a HOP operand "
                f"that requires grad is not supported (eager supports it for a "
                f"non-leaf); clone it inside the subgraph (x = x.clone()) and return "
                f"the new value, or pass a tensor that does not require grad."
            )


def _refuse_unpartitionable_mutations(hop: BaseHOP, joint: torch.fx.GraphModule) -> None:
    """A nested HOP call that mutates but whose results are unused would be lost.

    The joint is traced without functionalization, so the partitioner sees such
    a call as dead code (and one with no outputs at all as malformed). Refuse
    it clearly rather than drop the mutation.
    """
    for node in joint.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, HigherOrderOperator):
            continue
        if node.users:
            continue
        subgraphs = [a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
        if any(_mutates(getattr(joint, str(a.target))) for a in subgraphs):
            raise NotImplementedError(
                f"hopkit: under traced autograd (make_fx, aot_eager, inductor), "
                f"{hop._name}'s subgraph calls {node.target.__name__}, which "
                f"mutates its operands but whose results are unused; the "
                f"partitioner would drop that mutation. Return a value computed "
                f"from the mutated tensor from the inner call, or run the "
                f"mutation outside the HOP."
            )


def _mutates(gm: Any) -> bool:
    if not isinstance(gm, torch.fx.GraphModule):
        return False
    for n in gm.graph.nodes:
        schema = getattr(n.target, "_schema", None)
        if n.op == "call_function" and schema is not None and schema.is_mutable:
            return True
        if n.op == "get_attr" and _mutates(getattr(gm, str(n.target))):
            return True
    return False


def _probe_outputs(fn: Callable[..., Any], examples: Sequence[Any]) -> tuple[Any, list[int]]:
    """Output metadata from a fake run (the examples are fake: nothing runs),
    and the operands the body mutates (also through a view)."""
    clones = [x.clone() if isinstance(x, torch.Tensor) else x for x in examples]
    versions = [x._version if isinstance(x, torch.Tensor) else None for x in clones]
    out = fn(*clones)
    mutated = [i for i, (x, v) in enumerate(zip(clones, versions))
               if isinstance(x, torch.Tensor) and x._version != v]
    return out, mutated


def _flat_outputs(hop: BaseHOP, out: Any) -> tuple[Any, ...]:
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    for i, o in enumerate(outs):
        if not isinstance(o, torch.Tensor) and o is not None:
            raise RuntimeError(
                f"hopkit: {hop._name}'s subgraph must return a Tensor or a "
                f"tuple/list of Tensors, but output {i} is a "
                f"{type(o).__name__}; return tensors (wrap Python numbers with "
                f"torch.tensor) and keep other values out of the HOP."
            )
    return outs


def _partition(hop: BaseHOP, joint_gm: torch.fx.GraphModule, operands: Sequence[Any],
               num_outputs: int, record: dict[str, Any]) -> _AutogradPlan:
    # Effectful ops in the joint (also torch's own, aten::_print) stay in the
    # forward: NOTE [Effect tokens inside subgraphs]. A function-level import:
    # effects sits below base_hop, but its regions module imports the HOP
    # machinery lazily too, and base_hop needs it only when partitioning.
    from hopkit.effects._regions import subgraph_joint_partition

    with subgraph_joint_partition():
        fw, bw = _tracing.default_partition(joint_gm, num_fwd_outputs=num_outputs)
    fw_out_node = fw.graph.find_nodes(op="output")[0]
    fw_outs = list(fw_out_node.args[0])
    # Saved operands are passed from the caller's tensors, not returned by the
    # forward graph (which would make its outputs alias its inputs).
    saved_nodes = [n for n in fw_outs[num_outputs:] if n.op != "placeholder"]
    fw_out_node.args = (tuple(fw_outs[:num_outputs] + saved_nodes),)
    fw.graph.lint()
    fw.recompile()
    _mark_internal(fw)
    diff_operands = tuple(
        i for i, t in enumerate(operands) if isinstance(t, torch.Tensor) and t.requires_grad
    )
    saved_index = {n.name: k for k, n in enumerate(saved_nodes)}
    bw_inputs, kept = _finish_backward(bw, fw.graph, saved_index, diff_operands)
    return _AutogradPlan(
        fw=fw,
        bw=bw,
        num_outputs=num_outputs,
        single_output=record["single"],
        bw_inputs=bw_inputs,
        diff_operands=kept,
        requires_grad_operands=diff_operands,
        non_diff_outputs=tuple(i for i, rg in enumerate(record["requires_grad"]) if not rg),
        joint=joint_gm,
    )


def _finish_backward(bw: torch.fx.GraphModule, fw_graph: torch.fx.Graph,
                     saved_index: dict[str, int], diff_operands: tuple[int, ...],
                     ) -> tuple[tuple[tuple[str, int], ...], tuple[int, ...]]:
    """Drop unused tangents and None grads from ``bw``; say what feeds it."""
    primal_index = {n.name: i for i, n in enumerate(fw_graph.find_nodes(op="placeholder"))}
    bw_inputs: list[tuple[str, int]] = []
    tangent_count = 0
    for ph in list(bw.graph.find_nodes(op="placeholder")):
        if ph.name.startswith("tangents"):
            j = tangent_count
            tangent_count += 1
            if not ph.users:
                bw.graph.erase_node(ph)
                continue
            bw_inputs.append(("tangent", j))
        elif ph.name in primal_index:
            bw_inputs.append(("operand", primal_index[ph.name]))
        else:
            bw_inputs.append(("saved", saved_index[ph.name]))
    out_node = bw.graph.find_nodes(op="output")[0]
    kept = [(i, g) for i, g in zip(diff_operands, out_node.args[0]) if g is not None]
    out_node.args = (tuple(_fresh_output(bw.graph, out_node, g) for _, g in kept),)
    bw.graph.eliminate_dead_code()
    bw.graph.lint()
    bw.recompile()
    _mark_internal(bw)
    return tuple(bw_inputs), tuple(i for i, _ in kept)


def _fresh_output(graph: torch.fx.Graph, out_node: torch.fx.Node, value: Any) -> Any:
    """``value``, cloned if it is an input of the graph or a view of one.

    A backward can be the identity (the grad of ``t + 1`` is the incoming
    tangent) or a view of it (``expand`` for a sum). A HOP's outputs must not
    alias its operands (AOTAutograd and Inductor take a HOP's results for
    fresh buffers), so such a grad becomes a copy: the one case where
    hopkit's backward costs a copy that eager's does not.
    """
    if not isinstance(value, torch.fx.Node):
        return value
    node = value
    while node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
            and node.target.is_view and node.args and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    if node.op != "placeholder":
        return value
    with graph.inserting_before(out_node):
        clone = graph.call_function(torch.ops.aten.clone.default, (value,))
    if "val" in value.meta:
        clone.meta["val"] = value.meta["val"]
    return clone


def _recompute_backward(plan: _AutogradPlan) -> tuple[torch.fx.GraphModule, tuple[tuple[str, int], ...]]:
    """The joint graph cut down to its grads: a backward from the operands alone."""
    graph = copy.deepcopy(plan.joint.graph)
    graph._codegen = torch.fx.graph.CodeGen()  # flat placeholders, flat output
    out_node = graph.find_nodes(op="output")[0]
    out_node.args = (tuple(out_node.args[0][plan.num_outputs :]),)
    gm = torch.fx.GraphModule(plan.joint, graph)
    bw_inputs, kept = _finish_backward(gm, plan.joint.graph, {}, plan.requires_grad_operands)
    assert kept == plan.diff_operands, "the joint and its partition agree on grads"
    return gm, bw_inputs


# ---------------------------------------------------------------------------
# Rule: functionalize
# ---------------------------------------------------------------------------


def base_hop_functionalize(hop: BaseHOP, ctx: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Call a functional subgraph; write mutated operands back to the caller.

    See NOTE [BaseHOP input mutation] and NOTE [Operands that alias each other].
    """
    leading, subgraph, operands = hop._split(args)
    all_groups = _aliasing_groups(operands)
    groups = [g for g in all_groups if g.span is not None]
    unwrapped = ctx.unwrap_tensors(tuple(operands))
    body = hop._bind(leading, subgraph, kwargs)
    functional = _FunctionalSubgraph(hop, ctx.functionalize, body, groups, operands)
    functional._reuse_of = _reuse.functional_identity(ctx, subgraph, groups)
    _mark_internal(functional, like=subgraph)
    # Effectful ops in the body order the whole call by effect tokens:
    # NOTE [Effect tokens inside subgraphs] in hopkit/effects/_regions.py.
    from hopkit.effects import subgraph_effects

    with subgraph_effects(ctx, hop), ctx.redispatch_to_next():
        res = hop(*leading, functional, *unwrapped, **kwargs)
    res = res if isinstance(res, (tuple, list)) else (res,)
    mutated = functional.mutated
    assert mutated is not None, "the functional subgraph records its mutations when run"
    num_outputs = len(res) - len(mutated)
    for g in all_groups:
        if g.span is None and any(i in mutated for i in g.members):
            a, b = g.members[0], g.members[1]
            if operands[a].dtype != operands[b].dtype:
                raise RuntimeError(
                    f"hopkit: {hop._name}'s subgraph mutates an operand that shares "
                    f"memory with another of a different dtype (operands {a} and {b}: "
                    f"{operands[a].dtype} and {operands[b].dtype}), so functionalization "
                    f"cannot keep them in step; pass one of them and take the other "
                    f"inside the subgraph (x.view(dtype))."
                )
            raise RuntimeError(
                f"hopkit: {hop._name}'s subgraph mutates operand {a if a in mutated else b}, "
                f"which shares memory with operand {b if a in mutated else a}, but this "
                f"functionalization replays views as copies (e.g. torch.func.functionalize("
                f"..., remove='mutations_and_views')), which hides where the two overlap, "
                f"so the mutation cannot be replayed on both; use remove='mutations', or "
                f"pass the tensor they are views of as one operand and take the views "
                f"inside the subgraph."
            )
    for i, new_value in zip(mutated, res[num_outputs:]):
        target = operands[i]
        ctx.replace(target, new_value)
        ctx.commit_update(target)
        ctx.sync(target)
    # Members of an aliasing group were written one by one; each now reads
    # the others' writes too.
    for g in groups:
        if any(i in mutated for i in g.members):
            for i in g.members:
                ctx.sync(operands[i])
    outs = ctx.wrap_tensors(tuple(res[:num_outputs]))
    return outs[0] if functional.single_output else outs


# NOTE [Operands that alias each other]
# hop(g, x, x[0]) passes two operands that share memory. Eager sees a mutation
# of one through the other; functionalization would not, since it wraps each
# operand on its own. So operands whose memory may overlap (same storage,
# overlapping element ranges: a row and a column of one matrix, partly
# overlapping slices, interleaved strides) form a group. Inside the functional
# body, the group's members are placed into one fresh flat tensor spanning
# their element range (as_strided_scatter, out of place) and rebuilt as
# as_strided views of it with hopkit ViewMetas: a mutation through any member
# lands in that one storage, and every other member reads it, as in eager. If
# the body mutated the flat tensor, the new value of every member is returned
# and written back to the caller's tensors (overlapping elements get the same
# value from each). Nothing is viewed in the caller's world, so this works
# under torch.func.functionalize and torch.compile alike (torch.compile
# refuses mutations through an as_strided of a view). Operands that share a
# storage but whose element ranges are disjoint cannot alias and stay apart.


def _element_range(t: torch.Tensor) -> tuple[Any, Any]:  # ints or SymInts
    """The first and last storage element ``t`` can touch (hi < lo when empty)."""
    lo = hi = t.storage_offset()
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return (lo, lo - 1)
        span = (size - 1) * stride
        lo, hi = (lo + span, hi) if span < 0 else (lo, hi + span)
    return lo, hi


@dataclasses.dataclass
class _AliasingGroup:
    """Operands that may share memory, and where each lies in their flat span."""

    members: tuple[int, ...]
    span: Any  # int or SymInt: elements from the first to the last one touched;
    # None for members of different dtypes, which cannot share a flat tensor
    # (size, stride, offset into the span) of each member
    geometry: tuple[tuple[tuple[Any, ...], tuple[Any, ...], Any], ...]


def _aliasing_groups(operands: Sequence[Any]) -> list[_AliasingGroup]:
    """Groups of two or more operands whose memory may overlap."""
    by_storage: dict[int, list[int]] = {}
    for i, t in enumerate(operands):
        if isinstance(t, torch.Tensor) and t.layout is torch.strided and t.numel():
            try:
                key = t.untyped_storage()._cdata
            except (RuntimeError, NotImplementedError):
                continue
            by_storage.setdefault(key, []).append(i)
    spans: list[tuple[list[int], Any, Any]] = []
    for members in by_storage.values():
        if len(members) < 2:
            continue
        ranges = {i: _element_range(operands[i]) for i in members}
        # Sweep the ranges by their start; one that starts past the current
        # group's end starts a new group.
        current: list[int] = []
        lo: Any = None
        hi: Any = None
        for i in sorted(members, key=lambda i: ranges[i][0]):
            r_lo, r_hi = ranges[i]
            if current and r_lo <= hi:
                current.append(i)
                hi = r_hi if r_hi > hi else hi
                continue
            if len(current) > 1:
                spans.append((current, lo, hi))
            current, lo, hi = [i], r_lo, r_hi
        if len(current) > 1:
            spans.append((current, lo, hi))
    groups = []
    for members, lo, hi in spans:
        if len({operands[i].dtype for i in members}) > 1 or not _layout_is_real(
                [operands[i] for i in members]):
            # Views of one memory as different dtypes cannot share a flat
            # tensor, and neither can views whose strides and offsets are
            # those of copies; they stay apart, and base_hop_functionalize
            # refuses a mutation of one of them.
            groups.append(_AliasingGroup(tuple(members), None, ()))
            continue
        geometry = tuple(
            (tuple(operands[i].shape), tuple(operands[i].stride()),
             operands[i].storage_offset() - lo)
            for i in members
        )
        groups.append(_AliasingGroup(tuple(members), hi - lo + 1, geometry))
    return groups


def _layout_is_real(members: Sequence[torch.Tensor]) -> bool:
    """Whether the functional wrappers' strides and offsets are the aliasing ones.

    Functionalization that replays views as copies (view_copy ops, as
    ``torch.func.functionalize(remove="mutations_and_views")`` does) gives a
    view wrapper the layout of its copy (offset 0, contiguous): its inner
    value then lives in a storage of its own, while with real views all inner
    values share one.
    """
    from torch._subclasses.functional_tensor import FunctionalTensor

    storages = set()
    for t in members:
        inner = t.elem if isinstance(t, FunctionalTensor) else t
        if torch._is_functional_tensor(inner):
            inner = torch._from_functional_tensor(inner)
        try:
            storages.add(inner.untyped_storage()._cdata)
        except (RuntimeError, NotImplementedError):
            return False
    return len(storages) == 1


class _FunctionalSubgraph(FunctionWithNoFreeVars):
    """``subgraph`` run under functionalization, returning mutated operands too.

    Running it records which operands the subgraph mutated (in place or through
    a view); it returns ``(*outputs, *new values of those operands)``. Members
    of an aliasing group are rebuilt as views of one flat tensor first (NOTE
    [Operands that alias each other]).
    """

    __slots__ = ("hop", "mutated", "single_output", "_hopkit_internal", "_reuse_of")

    def __init__(self, hop: BaseHOP, functionalize: Callable[..., Any],
                 subgraph: Callable[..., Any], groups: Sequence[_AliasingGroup] = (),
                 operands: Sequence[Any] = ()) -> None:
        self.hop = hop
        self.mutated: tuple[int, ...] | None = None
        self.single_output = False
        # What this wrapper is a function of, for the proxy rule's body cache
        # (NOTE [BaseHOP trace reuse]); set by base_hop_functionalize.
        self._reuse_of: tuple[Any, Any] | None = None
        grouped = {i for g in groups for i in g.members}

        def with_epilogue(*fargs: Any) -> Any:
            args = list(fargs)
            flats = [_place_in_flat(g, fargs) for g in groups]
            for g, flat in zip(groups, flats):
                for i, view in zip(g.members, _views_of_flat(g, flat)):
                    args[i] = view
            out = subgraph(*args)
            self.single_output = not isinstance(out, (tuple, list))
            outs = _flat_outputs(hop, out)
            mutated: list[int] = []
            new_values: list[Any] = []
            for i, a in enumerate(fargs):
                if i not in grouped and isinstance(a, torch.Tensor) and \
                        _tracing.was_mutated(a, hop._name, i):
                    mutated.append(i)
                    new_values.append(a)
            for g, flat in zip(groups, flats):
                if _tracing.was_mutated(flat, hop._name, g.members[0]):
                    mutated.extend(g.members)
                    # Fresh tensors with each member's own strides: the
                    # caller's functionalization scatters them back through
                    # the member's view chain, which expects that layout.
                    new_values.extend(
                        v.new_empty_strided(size, stride).copy_(v)
                        for v, (size, stride, _) in zip(_views_of_flat(g, flat), g.geometry)
                    )
            self.mutated = tuple(mutated)
            return (*outs, *new_values)

        super().__init__(functionalize(with_epilogue))


def _place_in_flat(group: _AliasingGroup, fargs: Sequence[Any]) -> torch.Tensor:
    """A fresh flat tensor holding every member's elements where its storage has them."""
    first = fargs[group.members[0]]
    flat = first.new_zeros((group.span,))
    for i, (size, stride, offset) in zip(group.members, group.geometry):
        flat = flat.as_strided_scatter(fargs[i], size, stride, offset)
    return flat


def _views_of_flat(group: _AliasingGroup, flat: torch.Tensor) -> list[torch.Tensor]:
    from hopkit.functionalization import ViewMeta, apply_view_meta_sequence

    return [
        apply_view_meta_sequence(
            flat, [ViewMeta(torch.ops.aten.as_strided.default, (size, stride, offset))]
        )
        for size, stride, offset in group.geometry
    ]


# ---------------------------------------------------------------------------
# Rule: fake
# ---------------------------------------------------------------------------


def base_hop_fake(hop: BaseHOP, mode: FakeTensorMode, /, *args: Any, **kwargs: Any) -> Any:
    """The dense rule on fake tensors: output metadata, nothing runs."""
    leading, subgraph, operands = hop._split(args)
    # An equal call already run under this fake mode gives the output metadata
    # (NOTE [BaseHOP trace reuse]); only for graphs whose outputs depend on
    # nothing else (no effect, no mutation, no data-dependent size).
    key = None
    if _reuse.fake_run_reusable(subgraph):
        found = _reuse.call_key(hop, leading, subgraph, operands, kwargs, "fake",
                                requires_grad=_reuse.requires_grad_matters(subgraph))
        key = None if found is None else found[1]
    entry: _reuse.BodyEntry | None = None if key is None else _reuse.fake_cache.get(mode, key)
    if entry is not None:
        out = entry.fresh_outputs()
        if out is not None:
            entry.restore(subgraph)
            _reuse.counters["fake_reused"] += 1
            return out
    with mode:
        out = hop._run(leading, subgraph, operands, kwargs)
    if not _is_internal(subgraph):
        _check_no_output_aliasing(hop, operands, out)
    if key is not None and _reuse.independent_outputs(operands, out):
        _reuse.fake_cache.put(mode, key, _reuse.BodyEntry("", None, out, subgraph))
    return out


# ---------------------------------------------------------------------------
# Rule: proxy (make_fx, AOTAutograd, export)
# ---------------------------------------------------------------------------


def base_hop_proxy(hop: BaseHOP, mode: ProxyTorchDispatchMode, /, *args: Any, **kwargs: Any) -> Any:
    """One call node; the subgraph traced into a submodule of the root."""
    from torch._higher_order_ops.utils import reenter_make_fx
    from torch.fx.experimental.proxy_tensor import track_tensor_tree

    leading, subgraph, operands = hop._split(args)
    tracer: Any = mode.tracer  # a PythonKeyTracer while make_fx traces
    pre_dispatch = bool(getattr(mode, "pre_dispatch", False))
    # An equal call traced earlier in this trace: its body module serves this
    # node too (NOTE [BaseHOP trace reuse]).
    # requires_grad cannot change the trace of a graph that never reads it;
    # a Python body might.
    found = _reuse.call_key(hop, leading, subgraph, operands, kwargs, "proxy", pre_dispatch,
                            requires_grad=_reuse.requires_grad_matters(subgraph))
    key = None if found is None else found[1]
    entry: _reuse.BodyEntry | None = None if key is None else _reuse.body_cache.get(tracer, key)
    if entry is not None and getattr(tracer.root, entry.name, None) is not entry.gm:
        entry = None
    # Pre-dispatch tracing (torch.export's first stage) records a context such
    # as autocast as enter/exit nodes instead of applying it; the body is
    # traced bare there, and the HOP node applies the context whenever it runs.
    body = subgraph if pre_dispatch else hop._bind(leading, subgraph, kwargs)
    # Python scalars are constants of the trace (as make_fx specializes them
    # elsewhere): baked into the body, so every argument of the node is a
    # tensor or a symbol with a value (torch.export checks that).
    constants = {i: x for i, x in enumerate(operands) if isinstance(x, (int, float, bool))}
    if constants:
        body = _with_constants(body, len(operands), constants)
        operands = tuple(x for i, x in enumerate(operands) if i not in constants)
    if entry is not None:
        gm = entry.gm
        entry.restore(subgraph)
        _reuse.counters["body_reused"] += 1
    else:
        _reuse.counters["body_traced"] += 1
        gm = reenter_make_fx(body)(*operands)
        name = _fx.fresh_attr_name(tracer.root, "subgraph")
        tracer.root.register_module(name, gm)
    # Configuration goes onto the node as it is: NOTE [BaseHOP configuration
    # values] in hopkit/base_hop/_config.py.
    stand_in_leading, stand_in_kwargs = _config.placeholder_config(leading, kwargs)
    proxy_args = pytree.tree_map(tracer.unwrap_proxy, (*stand_in_leading, gm, *operands))
    out_proxy = tracer.create_proxy("call_function", hop, proxy_args, stand_in_kwargs)
    _config.set_node_config(out_proxy.node, leading, kwargs)
    # Under fake tracing the trace already computed the (fake) outputs: take
    # them from it rather than running the body a second time.
    traced_bare = body is subgraph and hop._has_context
    if entry is not None:
        out = entry.fresh_outputs()
        if out is None:
            out = hop(*leading, gm, *operands, **kwargs)
        return track_tensor_tree(out, out_proxy, constant=None, tracer=tracer)
    out = _output_vals(gm) if _tracing.all_fake(operands) and not traced_bare else None
    template = out if out is not None and _reuse.independent_outputs(operands, out) else None
    if out is None or any(
        v is None for v in pytree.tree_leaves(out, is_leaf=lambda v: v is None)
    ):
        template = None
        out = hop(*leading, gm, *operands, **kwargs)
    elif not _is_internal(subgraph):
        _check_no_output_aliasing(hop, operands, out)
    # Checked once here; the traced graph need not be checked at every run.
    _mark_internal(gm)
    if key is not None and _reuse.reusable_graph(gm):
        _reuse.body_cache.put(tracer, key, _reuse.BodyEntry(name, gm, template, subgraph))
    return track_tensor_tree(out, out_proxy, constant=None, tracer=tracer)


def _with_constants(body: Callable[..., Any], n: int,
                    constants: dict[int, Any]) -> Callable[..., Any]:
    def with_constants(*traced: Any) -> Any:
        it = iter(traced)
        return body(*(constants[i] if i in constants else next(it) for i in range(n)))

    return with_constants


# ---------------------------------------------------------------------------
# gen_schema
# ---------------------------------------------------------------------------


def _gen_schema(hop: BaseHOP, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch._C.FunctionSchema:
    from torch._higher_order_ops.schema import HopSchemaGenerator

    leading, subgraph, operands = hop._split(args)
    _check_operands(hop, operands)
    _config.check_config(hop._name, (*hop.leading_config, *kwargs), (*leading, *kwargs.values()))
    if not isinstance(subgraph, (torch.fx.GraphModule, FunctionWithNoFreeVars)) and not callable(subgraph):
        raise RuntimeError(
            f"hopkit: {hop._name}.gen_schema needs the subgraph as a GraphModule "
            f"or a callable, but got {type(subgraph).__name__}."
        )
    with _tracing.tracing_fresh_examples(operands, requires_grad=False) as (examples, trace):
        before = [x._version if isinstance(x, torch.Tensor) else None for x in examples]
        gm = trace(hop._bind(leading, subgraph, kwargs))(*examples)
        mutated = {
            i for i, (x, v) in enumerate(zip(examples, before))
            if isinstance(x, torch.Tensor) and x._version != v
        }
        outs = _flat_outputs(hop, gm.meta.get("val") or _output_vals(gm))
        _check_no_output_aliasing(hop, examples, outs)
    gen = HopSchemaGenerator(hop)
    for name, value in zip(hop.leading_config, leading):
        gen.add_arg(name, value)
    gen.add_arg("subgraph", gm)
    for i, x in enumerate(operands):
        gen.add_arg(f"arg{i}", x, is_mutated=i in mutated)
    # Configuration torch's generator cannot type (a tuple, an enum, a
    # dataclass) gets an argument of hopkit's (_config.schema_argument).
    custom: dict[str, torch._C.Argument] = {}
    for name, value in kwargs.items():
        arg = _config.schema_argument(name, value)
        if arg is None:
            gen.add_arg(name, value, default_value=value, kw_only=True)
        else:
            custom[name] = arg
    for o in outs:
        gen.add_output(o)
    schema = gen.gen_schema()
    if not custom:
        return schema
    arguments = list(schema.arguments)
    at = {a.name: i for i, a in enumerate(arguments)}
    for name, arg in custom.items():
        at[name] = len(arguments)
        arguments.append(arg)
    # Keyword config in the call's order; a HOP schema is never vararg.
    ordered = [a for a in arguments if not a.kwarg_only or a.name not in kwargs]
    ordered += [arguments[at[name]] for name in kwargs]
    return torch._C.FunctionSchema(schema.name, schema.overload_name, ordered,
                                   list(schema.returns), False, False)


def _output_vals(gm: torch.fx.GraphModule) -> Any:
    out = gm.graph.find_nodes(op="output")[0].args[0]
    return pytree.tree_map_only(torch.fx.Node, lambda n: n.meta.get("val"), out)
