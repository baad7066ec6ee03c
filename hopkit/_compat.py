"""The one place that touches version-dependent torch internals.

hopkit supports torch 2.11 through 2.13. Everything below reaches into
private torch modules whose names or signatures moved between those
releases (or may move in the next one). Each shim says which versions need
it and when it can go. Nothing outside this module imports
``torch._dynamo.variables``, ``torch._functorch._aot_autograd`` internals or
``torch._inductor.lowering`` registries directly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

TORCH_VERSION: tuple[int, int] = tuple(  # type: ignore[assignment]
    int(p) for p in torch.__version__.split("+")[0].split(".")[:2]
)

# ---------------------------------------------------------------------------
# BaseHOP: Dynamo, Inductor, autograd helpers
# ---------------------------------------------------------------------------

# Post-import hooks: hopkit registers its Dynamo variable and Inductor lowering
# when those subsystems are first imported, so that `import hopkit` imports
# neither (Dynamo's HOP variables alone take about a second to import).

_post_import_callbacks: dict[str, list[Callable[[types.ModuleType], None]]] = {}


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        for callback in _post_import_callbacks.pop(self._name, []):
            callback(module)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _post_import_callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _CallbackLoader(spec.loader, fullname)
                return spec  # type: ignore[no-any-return]
        return None


_finder = _PostImportFinder()


def when_imported(module_name: str, callback: Callable[[types.ModuleType], None]) -> None:
    """Run ``callback(module)`` now if the module is loaded, else right after it is."""
    module = sys.modules.get(module_name)
    if module is not None:
        callback(module)
        return
    _post_import_callbacks.setdefault(module_name, []).append(callback)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


# HOP registry. torch 2.11-2.13 keep every HigherOrderOperator by name in
# torch._ops._higher_order_ops; torch itself does not refuse a duplicate name.


def registered_hop(name: str) -> torch._ops.HigherOrderOperator | None:
    return torch._ops._higher_order_ops.get(name)


# Dynamo. torch 2.11-2.13 pick a HOP's variable class by name from
# `_hop_name_to_variable_class` and fall back to in-tree BaseHOP only by
# isinstance; hopkit's HOPs get a WrapHigherOrderVariable subclass that allows
# input mutation (see NOTE [BaseHOP input mutation] in hopkit/base_hop.py).

_DYNAMO_HOP_VARIABLES = "torch._dynamo.variables.higher_order_ops"
_hopkit_variable_class: Any = None


def _make_variable_class(mod: types.ModuleType) -> Any:
    global _hopkit_variable_class
    if _hopkit_variable_class is not None:
        return _hopkit_variable_class

    class HopkitHOPVariable(mod.WrapHigherOrderVariable):  # type: ignore[misc, name-defined]
        """Dynamo's view of a hopkit HOP: trace the subgraph, keep config constant."""

        supports_input_mutation = True
        supports_aliasing = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._HOP_NAME = self.value._name

        def python_type(self) -> type:
            return type(self.value)

        def _call_function(self, tx: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
            hop = self.value
            n = hop._num_leading
            leading = tuple(a.as_python_constant() for a in args[:n])
            (p_args, p_kwargs, example_value, body_r, _, _, output_vts, _) = (
                self.create_wrapped_node(
                    tx, args[n], list(args[n + 1 :]), {}, hop._name, subgraph_name="subgraph"
                )
            )
            config = {k: v.as_python_constant() for k, v in kwargs.items()}
            return mod._call_function_with_auto_output_flattening(
                tx, hop, (*leading, *p_args), config, example_value, body_r, output_vts
            )

    _hopkit_variable_class = HopkitHOPVariable
    return HopkitHOPVariable


def register_dynamo_variable(hop: torch._ops.HigherOrderOperator) -> None:
    def register(mod: types.ModuleType) -> None:
        mod._hop_name_to_variable_class[hop.__name__] = _make_variable_class(mod)

    when_imported(_DYNAMO_HOP_VARIABLES, register)


# Inductor. torch 2.11-2.13 look lowerings up by target in
# torch._inductor.lowering.lowerings; a HOP without one fails with
# "is not an OpOverload".

_INDUCTOR_LOWERING = "torch._inductor.lowering"


def register_inductor_lowering(hop: Any, rule: Callable[..., Any]) -> None:
    def register(mod: types.ModuleType) -> None:
        mod.register_lowering(hop, type_promotion_kind=None)(functools.partial(rule, hop))

    when_imported(_INDUCTOR_LOWERING, register)
    when_imported(_INDUCTOR_FX_UTILS, _teach_fx_utils_hopkit_subgraphs)


_INDUCTOR_FX_UTILS = "torch._inductor.fx_utils"


def _teach_fx_utils_hopkit_subgraphs(mod: types.ModuleType) -> None:
    """Tell Inductor's FakeTensorUpdater which arguments feed a hopkit subgraph.

    torch 2.11-2.13 list the subgraph HOPs they know in
    `_extract_subgraphs_and_args` and warn ("Please add support for subgraph
    args") for any other. Can go when torch offers a registration for this.
    """
    original = mod._extract_subgraphs_and_args
    if getattr(original, "_hopkit", False):
        return

    def extract(node: torch.fx.Node, valid_subgraphs: Any, *args: Any, **kwargs: Any) -> Any:
        n = getattr(node.target, "_num_leading", None)
        if n is not None and getattr(node.target, "_is_hopkit_hop", False):
            subgraph = args[n]
            if isinstance(subgraph, torch.fx.GraphModule):
                yield subgraph, tuple(args[n + 1 :])
            return
        yield from original(node, valid_subgraphs, *args, **kwargs)

    extract._hopkit = True  # type: ignore[attr-defined]
    mod._extract_subgraphs_and_args = extract


def inline_subgraph_into_graph_lowering(gm: torch.fx.GraphModule, operands: Sequence[Any]) -> Any:
    """Lower ``gm``'s nodes one by one into the current GraphLowering.

    The subgraph's nodes go through GraphLowering.run_node, as if they had been
    in the outer graph, so Inductor fuses them with their neighbours as usual.
    """
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    graph = V.graph
    placeholders = iter(operands)
    out: Any = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            graph.env[node] = next(placeholders)
        elif node.op == "get_attr":
            value = getattr(gm, node.target)
            if isinstance(value, torch.fx.GraphModule):
                graph.env[node] = ir.Subgraph(name=node.target, graph_module=value)
            else:
                graph.env[node] = graph.add_tensor_constant(value)
        elif node.op == "output":
            args, _ = graph.fetch_args_kwargs_from_env(node)
            out = args[0]
        else:
            graph.env[node] = graph.run_node(node)
    return out


def lower_pointwise_hop(hop: Any, gm: torch.fx.GraphModule, operands: Sequence[Any],
                        require: bool) -> Any:
    """Fuse a pointwise body through hopkit.inductor; None means "inline it"."""
    try:
        from hopkit.inductor import fusion
    except ImportError:
        return None
    return fusion.lower_hop_pointwise(hop, gm, operands, require=require)


# Autograd and tracing helpers.


def any_dispatch_mode_active() -> bool:
    return bool(torch._C._len_torch_dispatch_stack())


def autocast_state() -> Any:
    """What of autocast changes a traced graph (torch 2.11-2.13 API)."""
    if not torch._C._is_any_autocast_enabled():
        return None
    return tuple(
        (d, torch.get_autocast_dtype(d))
        for d in ("cpu", "cuda")
        if torch.is_autocast_enabled(d)
    )


@contextlib.contextmanager
def tracing_fresh_examples(
    operands: Sequence[Any], requires_grad: bool = True
) -> Iterator[tuple[list[Any], Callable[..., Any]]]:
    """Fake stand-ins for ``operands`` and a tracer to make graphs from them.

    Under an outer trace (make_fx, AOTAutograd) the stand-ins live in its fake
    mode and the tracer re-enters it, so symbols are shared; in eager a fresh
    FakeTensorMode is used, so nothing runs for real.
    """
    from torch._dispatch.python import suspend_functionalization
    from torch._guards import detect_fake_mode
    from torch._higher_order_ops.utils import _maybe_reenter_make_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import disable_functional_mode
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    with suspend_functionalization(), disable_functional_mode(), disable_proxy_modes_tracing():
        fake_mode = detect_fake_mode(
            [t for t in operands if isinstance(t, torch.Tensor)]
        )
        if fake_mode is None:
            fake_mode = FakeTensorMode()
        with fake_mode:
            examples = [
                torch.empty_strided(
                    t.size(), t.stride(), dtype=t.dtype, device=t.device,
                    requires_grad=requires_grad and t.requires_grad,
                )
                if isinstance(t, torch.Tensor) else t
                for t in operands
            ]
            yield examples, _maybe_reenter_make_fx


def default_partition(joint: torch.fx.GraphModule, num_fwd_outputs: int) -> tuple[
    torch.fx.GraphModule, torch.fx.GraphModule
]:
    """AOTAutograd's non-recomputing partitioner (same signature in 2.11-2.13)."""
    from torch._functorch.partitioners import default_partition as partition

    return partition(joint, None, num_fwd_outputs=num_fwd_outputs)


def was_mutated(t: torch.Tensor, hop_name: str, index: int) -> bool:
    """Whether a functional wrapper saw a data mutation (also through a view)."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    inner = t.elem if isinstance(t, FunctionalTensor) else t
    if not torch._is_functional_tensor(inner):
        return False
    torch._sync(inner)
    if torch._functionalize_has_metadata_mutation(inner):  # type: ignore[attr-defined]
        raise RuntimeError(
            f"hopkit: {hop_name}'s subgraph changes the shape or strides of "
            f"operand {index} in place (e.g. t_(), transpose_(), resize_()). A "
            f"HOP cannot hand that change back to the caller; compute a new "
            f"tensor instead (x.t() rather than x.t_()) and return it."
        )
    return bool(torch._functionalize_has_data_mutation(inner))  # type: ignore[attr-defined]

# ---------------------------------------------------------------------------
# effects
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# export (autocast pass)
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# inductor (pointwise subgraph lowering)
# ---------------------------------------------------------------------------
# hopkit.inductor reaches Inductor's lowering tables only through these two
# functions. They import Inductor lazily so that ``import hopkit`` stays lean.


def find_inductor_lowering(target: object) -> Callable[..., Any] | None:
    """The lowering Inductor's GraphLowering would run for ``target``, or None.

    Newer torch (2.13) keeps user-registered lowerings in a separate
    ``torch._inductor.lowering.user_lowerings`` table that takes priority and
    may return None to defer to the built-in lowering; older releases may not
    have that table. Can go once hopkit requires a torch that has it.
    """
    from torch._inductor import lowering

    try:
        builtin = lowering.lowerings.get(target)  # type: ignore[call-overload]
        user = getattr(lowering, "user_lowerings", {}).get(target)
    except TypeError:  # an unhashable target has no lowering
        return None
    if user is None:
        return builtin

    def user_then_builtin(*args: Any, **kwargs: Any) -> Any:
        out = user(*args, **kwargs)
        if out is None and builtin is not None:
            out = builtin(*args, **kwargs)
        return out

    return user_then_builtin


def inductor_falls_back_on_types(node: torch.fx.Node) -> bool:
    """Whether GraphLowering would send ``node`` to an eager fallback kernel
    because of its dtypes (complex, ...), before looking at its lowering.

    ``fallback_node_due_to_unsupported_type`` is a private helper of
    ``torch._inductor.lowering`` (present 2.11 through 2.13); without it we
    assume no type-based fallback.
    """
    from torch._inductor import lowering

    check = getattr(lowering, "fallback_node_due_to_unsupported_type", None)
    return bool(check(node)) if check is not None else False


# ---------------------------------------------------------------------------
# functionalization (ViewMeta)
# ---------------------------------------------------------------------------
