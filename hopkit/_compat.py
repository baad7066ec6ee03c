"""The one place that touches version-dependent torch internals.

hopkit supports torch 2.11 through 2.15. Everything below reaches into
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

def _release(version: str) -> tuple[int, ...]:
    """``"2.14.1+cu130"`` -> ``(2, 14, 1)``; pre-release tags (``2.15.0a0``) count as the release."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    return tuple(parts)


TORCH_VERSION: tuple[int, ...] = _release(torch.__version__)


def warn_missing_torch_symbol(symbol: str, consequence: str) -> None:
    """A torch internal a shim expected is gone: say so, and carry on without it.

    Raising here would break torch's own import (the shims run from import
    hooks), so hopkit degrades and names the symbol instead.
    """
    import warnings

    warnings.warn(
        f"hopkit: torch {torch.__version__} has no {symbol}, which hopkit expected for "
        f"this release; {consequence}. Please report this to hopkit.",
        RuntimeWarning,
        stacklevel=2,
    )


def torch_at_least(version: str) -> bool:
    """Whether the running torch is release ``version`` or newer (``"2.13"``, ``"2.14.1"``).

    The one version check in hopkit: every shim that differs between releases
    asks this, so the supported window (2.11 through 2.15) is visible in one
    grep. Nightlies count as the release they lead to.
    """
    want = _release(version)
    return TORCH_VERSION[: len(want)] >= want

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
                return spec
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


# HOP registry. torch 2.11-2.15 keep every HigherOrderOperator by name in
# torch._ops._higher_order_ops; torch itself does not refuse a duplicate name.


def registered_hop(name: str) -> torch._ops.HigherOrderOperator | None:
    return torch._ops._higher_order_ops.get(name)


def hop_namespace_reserves(name: str) -> bool:
    """Whether ``torch.ops.higher_order.<name>`` is the namespace's own attribute.

    `torch.ops.higher_order` is a module subclass (torch 2.11-2.15) that keeps
    its own state in instance attributes (`_dir`) and inherits module
    attributes (`__class__`, `__getattr__`, ...); a HOP of such a name would
    overwrite that state or never be found there.
    """
    namespace = torch.ops.higher_order
    if (name.startswith("__") and name.endswith("__")) or hasattr(type(namespace), name):
        return True
    if name in vars(namespace):  # a cached HOP is fine; anything else is state
        return not isinstance(vars(namespace)[name], torch._ops.HigherOrderOperator)
    return False


def publish_hop(hop: torch._ops.HigherOrderOperator) -> None:
    """Make ``torch.ops.higher_order.<name>`` the newest instance.

    `torch.ops.higher_order` caches an op as an attribute on first access, so
    a HOP re-created under the same name (a module reload) would otherwise stay
    shadowed by the old instance.
    """
    namespace = torch.ops.higher_order
    if hop.__name__ in vars(namespace):
        setattr(namespace, hop.__name__, hop)


# Dynamo. torch 2.11-2.15 pick a HOP's variable class by name from
# `_hop_name_to_variable_class` and fall back to in-tree BaseHOP only by
# isinstance; hopkit's HOPs get a WrapHigherOrderVariable subclass that allows
# input mutation (see NOTE [BaseHOP input mutation] in hopkit/base_hop.py).

_DYNAMO_HOP_VARIABLES = "torch._dynamo.variables.higher_order_ops"
_hopkit_variable_class: Any = None


def _make_variable_class(mod: types.ModuleType) -> Any:
    global _hopkit_variable_class
    if _hopkit_variable_class is not None:
        return _hopkit_variable_class

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
            hop = self.value
            n = hop._num_leading
            leading = tuple(a.as_python_constant() for a in args[:n])
            config = {k: v.as_python_constant() for k, v in kwargs.items()}
            # The body is speculated under the HOP's subgraph_context, as every
            # other rule runs it (torch's wrap_with_autocast variable does the
            # same): the example values Dynamo hands the rest of the frame
            # (dtypes under autocast) are then those the call produces.
            context = (
                hop.subgraph_context(hop._config(leading, config))
                if hop._has_context else contextlib.nullcontext()
            )
            with context:
                # torch 2.11 returns 7 values; 2.12+ append a tracing_info. The
                # first seven mean the same in every release of the window.
                (p_args, p_kwargs, example_value, body_r, _, _, output_vts) = (
                    self.create_wrapped_node(
                        tx, args[n], list(args[n + 1 :]), {}, hop._name, subgraph_name="subgraph"
                    )[:7]
                )
            return mod._call_function_with_auto_output_flattening(
                tx, hop, (*leading, *p_args), config, example_value, body_r, output_vts
            )

    _hopkit_variable_class = HopkitHOPVariable
    return HopkitHOPVariable


def register_dynamo_variable(hop: torch._ops.HigherOrderOperator) -> None:
    def register(mod: types.ModuleType) -> None:
        mod._hop_name_to_variable_class[hop.__name__] = _make_variable_class(mod)

    when_imported(_DYNAMO_HOP_VARIABLES, register)


# Inductor. torch 2.11-2.15 look lowerings up by target in
# torch._inductor.lowering.lowerings; a HOP without one fails with
# "is not an OpOverload".

_INDUCTOR_LOWERING = "torch._inductor.lowering"


def register_inductor_lowering(hop: Any, rule: Callable[..., Any]) -> None:
    def register(mod: types.ModuleType) -> None:
        mod.register_lowering(hop, type_promotion_kind=None)(functools.partial(rule, hop))

    when_imported(_INDUCTOR_LOWERING, register)
    if torch_at_least("2.13"):
        when_imported(_INDUCTOR_FX_UTILS, _teach_fx_utils_hopkit_subgraphs)


_INDUCTOR_FX_UTILS = "torch._inductor.fx_utils"


def _teach_fx_utils_hopkit_subgraphs(mod: types.ModuleType) -> None:
    """Tell Inductor's FakeTensorUpdater which arguments feed a hopkit subgraph.

    torch 2.13+ (through 2.15) list the subgraph HOPs they know in
    `_extract_subgraphs_and_args` and warn ("Please add support for subgraph
    args") for any other. torch 2.11 and 2.12 do not look into subgraphs at
    all, so there is nothing to teach. Can go when torch offers a
    registration for this.
    """
    original = getattr(mod, "_extract_subgraphs_and_args", None)
    if original is None:
        warn_missing_torch_symbol("torch._inductor.fx_utils._extract_subgraphs_and_args",
                                  "Inductor may warn about hopkit subgraph arguments")
        return
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
    setattr(mod, "_extract_subgraphs_and_args", extract)


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
    from hopkit.inductor import fusion

    return fusion.lower_hop_pointwise(hop, gm, operands, require=require)


# Autograd and tracing helpers.


# Dispatch keys a plain dense tensor carries (torch 2.11-2.15 names); a tensor
# with any other key (Python, Functionalize, FuncTorchBatched, Sparse, Nested,
# ...) takes the dispatcher.
_PLAIN_KEYS = frozenset({
    "CPU", "CUDA", "ADInplaceOrView", "AutogradCPU", "AutogradCUDA",
    "AutocastCPU", "AutocastCUDA",
})
_plain_keysets: dict[int, bool] = {}


def _keyset_is_plain(keys: Any) -> bool:
    raw = keys.raw_repr()
    plain = _plain_keysets.get(raw)
    if plain is None:
        names = str(keys)[len("DispatchKeySet("):-1].split(", ")
        plain = _plain_keysets[raw] = set(names) <= _PLAIN_KEYS
    return plain


def is_plain_eager(operands: Sequence[Any]) -> bool:
    """True when running a HOP's dense rule directly is what dispatch would do.

    No torch dispatch mode, no functorch transform, no __torch_function__, and
    every tensor operand a plain dense CPU/CUDA tensor.
    """
    if (
        torch._C._len_torch_dispatch_stack()
        or torch._ops._len_torch_dispatch_stack_pre_dispatch()  # make_fx(pre_dispatch=True)
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._functorch.peek_interpreter_stack() is not None
    ):
        return False
    for t in operands:
        if isinstance(t, torch.Tensor) and not _keyset_is_plain(torch._C._dispatch_keys(t)):
            return False
    return not torch._C._has_torch_function(tuple(operands))


def all_fake(operands: Sequence[Any]) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    tensors = [t for t in operands if isinstance(t, torch.Tensor)]
    return bool(tensors) and all(isinstance(t, FakeTensor) for t in tensors)


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


def tag_traced_nodes_as_forward() -> None:
    """Mark everything traced so far as forward, for the partitioner.

    torch 2.11-2.15's default_partition takes the forward to end at the last
    node tagged "is_forward" (AOTAutograd tags them the same way in
    create_joint); untagged, it would recompute the whole forward in backward.
    """
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    if mode is None:
        return
    for node in mode.tracer.graph.nodes:
        if node.op == "placeholder" and node.name.startswith("tangents"):
            node.meta["partitioner_tag"] = "is_backward"
        else:
            node.meta["partitioner_tag"] = "is_forward"


def default_partition(joint: torch.fx.GraphModule, num_fwd_outputs: int) -> tuple[
    torch.fx.GraphModule, torch.fx.GraphModule
]:
    """AOTAutograd's non-recomputing partitioner (same signature in 2.11-2.15)."""
    from torch._functorch.partitioners import default_partition as partition

    return partition(joint, None, num_fwd_outputs=num_fwd_outputs)


def was_mutated(t: torch.Tensor, hop_name: str, index: int) -> bool:
    """Whether a functional wrapper saw a data mutation (also through a view)."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    inner = t.elem if isinstance(t, FunctionalTensor) else t
    if not torch._is_functional_tensor(inner):
        return False
    torch._sync(inner)
    if torch._functionalize_has_metadata_mutation(inner):
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

# NOTE [hopkit effects inside torch's token machinery]
# AOTAutograd threads effect tokens itself; it only asks "does this op have an
# effect?" and "thread it" through two functions that FunctionalTensorMode
# imports at call time from torch._higher_order_ops.effects (`has_effects`,
# `handle_effects`). Everything downstream recognises torch's `with_effects`
# HOP by identity. hopkit keeps its own HOP (`hopkit_with_effects`) and makes
# each of those places accept it:
#
#   place (torch 2.11-2.15)                         shim below
#   ---------------------------------------------   --------------------------
#   FunctionalTensorMode -> has_effects /           _route_has_effects,
#     handle_effects (torch._higher_order_ops.       _route_handle_effects
#     effects, looked up at call time)
#   _aot_autograd.utils.is_with_effects (min-cut    _is_with_effects
#     partitioner: force-save effectful outputs,
#     never recompute them)
#   partitioners.force_save_effectful_ops (skips    _wrap_force_save_effectful_ops
#     activation-checkpointed regions: a torch bug)
#   _aot_autograd.utils.unlift_tokens (Inductor:    _unlift_tokens
#     token inputs/outputs -> _make_token /
#     _sink_tokens)
#   proxy_tensor._should_save_eager_input_vals      _should_save_eager_input_vals
#   Inductor lowering of with_effects (star deps,   _lower_with_effects
#     has_side_effects, effectful_ops chain)
#   torch.export._remove_effect_tokens (ep.module(), _remove_effect_tokens
#     unflatten)
#
# Each shim is a wrapper that handles hopkit's HOP and passes everything else
# to torch's original untouched, so torch's own effectful ops (aten::_print,
# torchbind) behave exactly as without hopkit. Wrappers are installed on the
# defining module *and* on every already-imported module that did
# `from ... import name`; modules imported later pick up the wrapper by that
# same import. Nothing here imports Inductor or the partitioner.
# Can go when torch dispatches effect handling through a registry of
# with_effects-like HOPs instead of identity checks.

import dataclasses as _dataclasses
import functools as _functools
import operator as _operator
import sys as _sys
from collections.abc import Callable as _Callable
from collections.abc import Iterator as _Iterator
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any


# torch 2.11-2.15: the enum lives next to torch's op registry.
from torch._library.effects import EffectType as EffectType  # noqa: E402


def torch_get_effect(op: _Any) -> _Any:
    """torch's own effect registry (aten::_print, torchbind, ...), or None."""
    from torch._higher_order_ops import effects as _hop_effects

    try:  # torch 2.11-2.15 raise for objects that are no op at all
        return _hop_effects._get_effect(op)
    except (ValueError, RuntimeError, AttributeError):
        return None


def custom_op_def_type() -> _Any:
    """torch.library.custom_op's object type (CustomOpDef, torch 2.11-2.15)."""
    from torch._library.custom_ops import CustomOpDef

    return CustomOpDef


def is_side_effectful(fn: _Any) -> bool:
    """Whether FX dead-code elimination treats calls of fn as impure."""
    from torch.fx import node as _fx_node

    return fn in _fx_node._side_effectful_functions


def set_side_effectful(fn: _Any, flag: bool) -> None:
    from torch.fx import node as _fx_node

    if flag:
        _fx_node._side_effectful_functions.add(fn)
    else:
        _fx_node._side_effectful_functions.discard(fn)


def autograd_dispatch_keys() -> list[torch._C.DispatchKey]:
    """The per-backend Autograd keys that exist in this torch build."""
    names = (
        "AutogradCPU",
        "AutogradCUDA",
        "AutogradXPU",
        "AutogradMPS",
        "AutogradMeta",
        "AutogradHPU",
        "AutogradPrivateUse1",
        "AutogradOther",
    )
    return [getattr(torch._C.DispatchKey, n) for n in names if hasattr(torch._C.DispatchKey, n)]


def functorch_transforms() -> list[_Any]:
    """functorch transforms that a HOP must handle itself (functionalize has
    its own registration)."""
    tt = torch._C._functorch.TransformType
    return [tt.Vmap, tt.Grad, tt.Jvp]


@_dataclasses.dataclass
class EffectsIntegration:
    """What the shims need from hopkit.effects (passed in; no import cycle)."""

    hop: _Any
    owns: _Callable[[_Any], bool]
    in_region: _Callable[[], bool]
    has_effects: _Callable[[_Any], bool]
    handle_effects: _Callable[..., _Any]
    get_effect: _Callable[[_Any], _Any]


_EFFECTS: EffectsIntegration | None = None
_EFFECTS_WRAPPED_MARK = "__hopkit_effects_original__"


def _torch_with_effects() -> _Any:
    return torch.ops.higher_order.with_effects


def _wrap_name(
    defining: str, name: str, consumers: tuple[str, ...], make: _Callable[[_Any], _Any]
) -> None:
    """Replace `defining.name` with make(original), also where imported by name."""
    mod = _sys.modules.get(defining)
    if mod is None:
        mod = __import__(defining, fromlist=[name])
    original = getattr(mod, name, None)
    if original is None:  # not in this torch version: nothing to teach
        return
    if hasattr(original, _EFFECTS_WRAPPED_MARK):
        wrapper = original
        original = getattr(original, _EFFECTS_WRAPPED_MARK)
    else:
        wrapper = make(original)
        setattr(wrapper, _EFFECTS_WRAPPED_MARK, original)
        setattr(mod, name, wrapper)
    for consumer in consumers:
        cmod = _sys.modules.get(consumer)
        if cmod is not None and getattr(cmod, name, None) is original:
            setattr(cmod, name, wrapper)


def install_effects_integration(integration: EffectsIntegration) -> None:
    """Install the shims of NOTE [hopkit effects inside torch's token
    machinery]. Idempotent; a later call (module reload) swaps in the new HOP."""
    global _EFFECTS
    _EFFECTS = integration
    hop_effects = "torch._higher_order_ops.effects"
    _wrap_name(hop_effects, "has_effects", (), _route_has_effects)
    _wrap_name(hop_effects, "handle_effects", (), _route_handle_effects)
    aot_utils = "torch._functorch._aot_autograd.utils"
    _wrap_name(aot_utils, "is_with_effects", ("torch._functorch.partitioners",), _is_with_effects)
    _wrap_name(
        aot_utils,
        "unlift_tokens",
        (
            "torch._functorch._aot_autograd.graph_capture",
            "torch._functorch._aot_autograd.graph_compile",
        ),
        _unlift_tokens,
    )
    _wrap_name(
        "torch.fx.experimental.proxy_tensor",
        "_should_save_eager_input_vals",
        (),
        _should_save_eager_input_vals,
    )
    # Inductor's lowering and the partitioner's force-save, registered when
    # (and if) those modules are imported.
    when_imported("torch._inductor.lowering", _register_with_effects_lowering)
    when_imported("torch._functorch.partitioners", _wrap_force_save_effectful_ops)
    _wrap_name(
        "torch.export._remove_effect_tokens_pass",
        "_remove_effect_tokens",
        ("torch.export._unlift", "torch.export.unflatten"),
        _remove_effect_tokens,
    )


def _route_has_effects(original: _Any) -> _Any:
    @_functools.wraps(original)
    def has_effects(op: _Any, *args: _Any, **kwargs: _Any) -> bool:
        integ = _EFFECTS
        if integ is not None and integ.owns(op):
            return integ.has_effects(op)
        return bool(original(op, *args, **kwargs))

    return has_effects


def _route_handle_effects(original: _Any) -> _Any:
    @_functools.wraps(original)
    def handle_effects(
        allow_token_discovery: bool, tokens: _Any, op: _Any, *args: _Any, **kwargs: _Any
    ) -> _Any:
        integ = _EFFECTS
        # Inside a HOP subgraph hopkit handles torch's own effects too (NOTE
        # [Effect tokens inside subgraphs] in hopkit/effects.py).
        if integ is not None and (integ.owns(op) or integ.in_region()):
            return integ.handle_effects(allow_token_discovery, tokens, op, *args, **kwargs)
        return original(allow_token_discovery, tokens, op, *args, **kwargs)

    return handle_effects


def _is_hopkit_with_effects(node: _Any) -> bool:
    integ = _EFFECTS
    return (
        integ is not None
        and getattr(node, "op", None) == "call_function"
        and node.target is integ.hop
    )


def _is_with_effects(original: _Any) -> _Any:
    @_functools.wraps(original)
    def is_with_effects(node: torch.fx.Node) -> bool:
        return _is_hopkit_with_effects(node) or bool(original(node))

    return is_with_effects


def _wrap_force_save_effectful_ops(mod: _Any) -> None:
    """torch 2.11-2.15 mark the outputs of effectful nodes MUST_SAVE, except
    in an activation-checkpointed region (recompute tag PREFER_RECOMPUTE), so
    a checkpointed effect runs again in backward. hopkit's effects are never
    recomputed: their tensor outputs are saved even inside a region. Can go
    when the partitioner force-saves effects regardless of recompute tags."""
    original = getattr(mod, "force_save_effectful_ops", None)
    if original is None or hasattr(original, _EFFECTS_WRAPPED_MARK):
        return
    from torch.utils.checkpoint import CheckpointPolicy

    @_functools.wraps(original)
    def force_save_effectful_ops(joint_module: torch.fx.GraphModule, *args: _Any, **kwargs: _Any) -> _Any:
        token_tags: list[tuple[torch.fx.Node, _Any]] = []
        for node in joint_module.graph.nodes:
            if mod._has_tag_is_backward(node):
                continue
            if _is_plain_effectful_call(node):
                # An effectful op called without a token: the joint graph of a
                # HOP's subgraph (NOTE [Effect tokens inside subgraphs] in
                # hopkit/effects.py). It is impure, so backward extraction
                # would copy it into backward whenever its inputs are saved:
                # pin it to the forward and save its outputs instead.
                node.meta["partitioner_tag"] = "must_be_in_forward"
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                continue
            if not _is_hopkit_with_effects(node):
                continue
            # The node itself: the min-cut solver bans recomputing MUST_SAVE
            # nodes (the default partitioner skips multi-output nodes here).
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            for user in node.users:
                if user.target is not _operator.getitem:
                    continue
                if user.args[1] == 0:
                    token_tags.append((user, user.meta.get("recompute")))
                elif isinstance(user.meta.get("val"), torch.Tensor):
                    user.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        result = original(joint_module, *args, **kwargs)
        # torch marks the token output MUST_SAVE too. Outside checkpointed
        # regions that only makes the default partitioner save a token that
        # backward never reads (and copy the effect into backward, where its
        # inputs are all saved); untag it there. Inside a region the min-cut
        # solver needs the tag (a recompute-tagged token must be recomputed).
        for user, tag in token_tags:
            if tag is None:
                user.meta.pop("recompute", None)
        return result

    setattr(force_save_effectful_ops, _EFFECTS_WRAPPED_MARK, original)
    mod.force_save_effectful_ops = force_save_effectful_ops


def _is_plain_effectful_call(node: _Any) -> bool:
    integ = _EFFECTS
    return (
        integ is not None
        and node.op == "call_function"
        and isinstance(node.target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator))
        and node.target is not integ.hop
        and integ.has_effects(node.target)
    )


def _graph_modules(roots: list[_Any]) -> _Iterator[torch.fx.GraphModule]:
    seen: set[int] = set()
    for root in roots:
        for mod in root.modules():
            if isinstance(mod, torch.fx.GraphModule) and id(mod) not in seen:
                seen.add(id(mod))
                yield mod


def _unlift_tokens(original: _Any) -> _Any:
    """torch's unlift_tokens finds token inputs/outputs by walking from
    `with_effects` nodes. hopkit's nodes are presented to it as torch's for the
    duration of the call (same calling convention: token first, op second,
    token first in the outputs) and given back their target afterwards."""

    @_functools.wraps(original)
    def unlift_tokens(*args: _Any, **kwargs: _Any) -> _Any:
        integ = _EFFECTS
        roots = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.fx.GraphModule)]
        swapped: list[tuple[torch.fx.GraphModule, torch.fx.Node]] = []
        if integ is not None:
            torch_we = _torch_with_effects()
            for gm in _graph_modules(roots):
                for node in gm.graph.nodes:
                    if node.op == "call_function" and node.target is integ.hop:
                        node.target = torch_we
                        swapped.append((gm, node))
        try:
            return original(*args, **kwargs)
        finally:
            touched: dict[int, torch.fx.GraphModule] = {}
            for gm, node in swapped:
                node.target = integ.hop  # type: ignore[union-attr]
                touched[id(gm)] = gm
            for gm in touched.values():
                gm.recompile()

    return unlift_tokens


def _should_save_eager_input_vals(original: _Any) -> _Any:
    # torch answers False for its with_effects (the lowering does not propagate
    # eager input values); hopkit's HOP is lowered the same way.
    @_functools.wraps(original)
    def should_save(target: _Any, args_kwargs: _Any = None) -> bool:
        integ = _EFFECTS
        if integ is not None and target is integ.hop:
            return False
        return bool(original(target, args_kwargs))

    return should_save


def _register_with_effects_lowering(mod: _Any) -> None:
    integ = _EFFECTS
    if integ is not None and integ.hop not in mod.lowerings:
        mod.register_lowering(integ.hop, type_promotion_kind=None)(
            _functools.partial(_lower_with_effects, integ)
        )


def _lower_with_effects(
    integration: EffectsIntegration, token: _Any, op: _Any, *args: _Any, **kwargs: _Any
) -> _Any:
    """Lower `op` itself, then chain every operation it created behind the
    previous operation of the same effect (a StarDep) and mark them as having
    side effects, so the scheduler neither reorders nor removes them. Mirrors
    torch's lowering of its with_effects (torch/_inductor/lowering.py)."""
    import torch.utils._pytree as pytree
    from torch._inductor import ir
    from torch._inductor.lowering import lowerings
    from torch._inductor.virtualized import V

    effect = integration.get_effect(op)
    node = V.graph.current_node
    if effect is not None:
        pin_effectful_inputs(pytree.tree_leaves((args, kwargs)))
    n_before = len(V.graph.operations)
    if op in lowerings:
        result = lowerings[op](*args, **kwargs)
        pytree.tree_map_only(ir.TensorBox, lambda a: a.realize(), result)
    else:
        with _seen_as_torch_with_effects(node):
            kernel_out = ir.FallbackKernel.create(op, *args, **kwargs)
        result = pytree.tree_map(
            lambda x: wrap_ir_for_lowering(x) if isinstance(x, ir.IRNode) else x,
            kernel_out,
        )
    new_ops: list[_Any] = list(V.graph.operations[n_before:])
    if not new_ops:
        raise RuntimeError(
            f"hopkit: lowering {op} inside hopkit_with_effects created no "
            "operation, so its effect cannot be ordered; give the op a lowering "
            "that creates a buffer, or let it fall back (remove its lowering)."
        )
    if effect is not None:
        # Every new operation waits for the previous effect; inside a HOP's
        # inlined subgraph the effectful kernels also wait for each other, in
        # the order the subgraph calls them (NOTE [Effect tokens inside
        # subgraphs] in hopkit/effects.py).
        effectful_ops: dict[_Any, _Any] = V.graph.effectful_ops
        prev = effectful_ops.get(effect)
        for new_op in new_ops:
            new_op.has_side_effects = lambda: True
            if prev is not None:
                order_after(new_op, prev)
            if integration.has_effects(getattr(new_op, "op_overload", None)):
                prev = new_op
        effectful_ops[effect] = new_ops[-1]
    # The same framing as the dense rule: a HOP's tuple of outputs is spread,
    # an op's outputs are spread when its schema has several returns.
    if isinstance(op, torch._ops.HigherOrderOperator):
        spread = isinstance(result, (tuple, list))
    else:
        spread = len(op._schema.returns) > 1
    return (token, *result) if spread else (token, result)


def order_after(new_op: _Any, prev: _Any) -> None:
    """Make the scheduler run Inductor operation ``new_op`` after ``prev``.

    torch 2.11-2.14 express an effect's order as a StarDep
    (`GraphLowering.additional_star_deps`, keyed by the operation's name);
    torch 2.15 removed that table and orders effects with a weak, fake
    dependency (`additional_buffer_deps`, keyed by `get_operation_name()`),
    which does not extend the previous buffer's lifetime. hopkit follows
    whichever the running torch's own with_effects lowering uses.
    """
    from torch._inductor.virtualized import V

    graph: _Any = V.graph  # typed Any: each table exists only in some releases
    if torch_at_least("2.15"):
        graph.additional_buffer_deps[new_op.get_operation_name()].add(prev.get_name())
    else:
        graph.additional_star_deps[new_op.get_name()].add(prev.get_name())


def pin_effectful_inputs(leaves: Sequence[_Any]) -> None:
    """Never recycle the storage of an effectful op's tensor inputs.

    torch 2.15 does this in its with_effects lowering: an effectful op may keep
    its inputs alive in state Inductor cannot see (a torchbind queue), so
    their buffers must not be reused for other buffers. Older releases have
    no `never_reuse_but_free_buffers` and do not pin.
    """
    from torch._inductor.ir import TensorBox
    from torch._inductor.virtualized import V

    if not torch_at_least("2.15"):
        return
    graph: _Any = V.graph  # typed Any: the set exists from torch 2.15 on
    for leaf in leaves:
        if isinstance(leaf, TensorBox):
            leaf.realize()
            graph.never_reuse_but_free_buffers.add(leaf.get_name())


def wrap_ir_for_lowering(node: _Any) -> _Any:
    """What a lowering returns for a fallback kernel's IR output.

    torch 2.12+ ask the node (`IRNode.wrap_for_lowering`: a TensorBox, or the
    node itself for opaque multi-outputs); torch 2.11 has no such method and
    wraps every IR output in a TensorBox, as its own with_effects lowering
    does. Can go when hopkit requires torch >= 2.12.
    """
    if torch_at_least("2.12"):
        return node.wrap_for_lowering()
    from torch._inductor.ir import TensorBox

    return TensorBox.create(node)


class _seen_as_torch_with_effects:
    """FallbackKernel strips the token from the FX node's metadata (for
    unbacked symbols) only when the node's target is torch's with_effects; show
    it that target while the kernel is created, if the node has such symbols."""

    def __init__(self, node: _Any) -> None:
        self.node = node if node is not None and node.meta.get("unbacked_bindings") else None
        self.target: _Any = None

    def __enter__(self) -> None:
        if self.node is not None:
            self.target = self.node.target
            self.node.target = _torch_with_effects()

    def __exit__(self, *exc: object) -> None:
        if self.node is not None:
            self.node.target = self.target


def _remove_effect_tokens(original: _Any) -> _Any:
    """ep.module() / unflatten remove effect tokens from a program. First turn
    every hopkit_with_effects(token, op, *args) back into op(*args), joining the
    token chain around it; then let torch's pass handle its own with_effects
    nodes and the graph signature. If no torch effect node is left to carry
    the chain, drop the token inputs/outputs here (torch's pass finds them only
    through its own nodes)."""

    @_functools.wraps(original)
    def remove_effect_tokens(ep: _Any) -> _Any:
        integ = _EFFECTS
        if integ is not None:
            _inline_hopkit_with_effects(ep, integ.hop)
        return original(ep)

    return remove_effect_tokens


def _inline_hopkit_with_effects(ep: _Any, hop: _Any) -> None:
    from torch.export.graph_signature import InputKind, OutputKind

    gm = ep.graph_module
    torch_we = _torch_with_effects()
    with gm._set_replace_hook(ep.graph_signature.get_replace_hook()):
        for module in list(_graph_modules([gm])):
            nodes = [
                n for n in module.graph.nodes if n.op == "call_function" and n.target is hop
            ]
            if not nodes:
                continue
            for node in nodes:
                _inline_one(module, node)
            chain_left = any(
                n.op == "call_function"
                and (n.target is torch_we or n.target is torch.ops.higher_order.invoke_subgraph)
                for n in module.graph.nodes
            )
            if module is gm and not chain_left:
                out_names = [
                    s.arg.name for s in ep.graph_signature.output_specs if s.kind == OutputKind.TOKEN
                ]
                in_names = {
                    s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.TOKEN
                }
                output = next(reversed(module.graph.find_nodes(op="output")))
                outs = list(output.args[0])
                head = [getattr(o, "name", None) for o in outs[: len(out_names)]]
                if head != out_names:
                    raise RuntimeError(
                        "hopkit: cannot remove effect tokens: expected the "
                        f"program's first outputs to be its tokens {out_names}, "
                        f"got {head}."
                    )
                output.args = (tuple(outs[len(out_names) :]),)
                for ph in list(module.graph.find_nodes(op="placeholder")):
                    if ph.name in in_names and not ph.users:
                        module.graph.erase_node(ph)
            module.recompile()


def _inline_one(module: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    token, func, *fargs = node.args
    val = node.meta.get("val")
    # As in the dense rule: a HOP's tuple of outputs was spread after the
    # token, an op's outputs were spread when its schema has several returns.
    if isinstance(func, torch._ops.HigherOrderOperator):
        single = False
    else:
        single = len(func._schema.returns) <= 1  # type: ignore[union-attr]
    with module.graph.inserting_before(node):
        new = module.graph.call_function(func, tuple(fargs), dict(node.kwargs))  # type: ignore[arg-type]
    for k, v in node.meta.items():
        new.meta[k] = v
    if "unbacked_bindings" in node.meta:  # drop the token's level of the paths
        new.meta["unbacked_bindings"] = {
            s: path[1:] if path else path for s, path in node.meta["unbacked_bindings"].items()
        }
    if isinstance(val, (tuple, list)):
        new.meta["val"] = val[1] if single else tuple(val[1:])
    for user in list(node.users):
        if user.op != "call_function" or user.target is not _operator.getitem:
            raise RuntimeError(
                f"hopkit: unexpected use {user.format_node()} of {node.name}; "
                "with_effects outputs are read with getitem only."
            )
        idx = user.args[1]
        if idx == 0:
            user.replace_all_uses_with(token)  # type: ignore[arg-type]
            module.graph.erase_node(user)
        elif single:
            user.replace_all_uses_with(new)
            module.graph.erase_node(user)
        else:
            user.args = (new, idx - 1)  # type: ignore[operator]
    module.graph.erase_node(node)

# ---------------------------------------------------------------------------
# export (autocast pass)
# ---------------------------------------------------------------------------
# torch 2.11-2.15: torch.export's `_produce_aten_artifact` (torch/export/_trace.py)
# imports `replace_autocast_with_hop_pass` from this module *when it runs*, so
# replacing the module attribute for the duration of one export swaps in
# hopkit's pass. Can go when torch.export accepts the pass as an argument.

import threading as _threading  # noqa: E402

_AUTOCAST_PASS_MODULE = "torch._export.passes.replace_autocast_with_hop_pass"
_autocast_pass_lock = _threading.RLock()


@contextlib.contextmanager
def export_with_autocast_pass(pass_fn: Callable[..., Any]) -> Iterator[None]:
    """While active, torch.export runs ``pass_fn`` instead of its autocast pass.

    Process-wide (a module attribute), so concurrent exports are serialized by
    a lock; the original pass is restored on exit, also when export raises.
    """
    module = importlib.import_module(_AUTOCAST_PASS_MODULE)
    with _autocast_pass_lock:
        original = getattr(module, "replace_autocast_with_hop_pass")
        setattr(module, "replace_autocast_with_hop_pass", pass_fn)
        try:
            yield
        finally:
            setattr(module, "replace_autocast_with_hop_pass", original)

# ---------------------------------------------------------------------------
# inductor (pointwise subgraph lowering)
# ---------------------------------------------------------------------------
# hopkit.inductor reaches Inductor's lowering tables only through these two
# functions. They import Inductor lazily so that ``import hopkit`` stays lean.


def find_inductor_lowering(target: object) -> Callable[..., Any] | None:
    """The lowering Inductor's GraphLowering would run for ``target``, or None.

    torch 2.12+ keep user-registered lowerings in a separate
    ``torch._inductor.lowering.user_lowerings`` table that takes priority and
    may return None to defer to the built-in lowering; torch 2.11 has only
    the built-in table. The branch can go once hopkit requires torch >= 2.12.
    """
    from torch._inductor import lowering

    user_table: dict[Any, Any] = (
        getattr(lowering, "user_lowerings") if torch_at_least("2.12") else {}
    )
    try:
        builtin = lowering.lowerings.get(target)  # type: ignore[call-overload]
        user = user_table.get(target)
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
    ``torch._inductor.lowering`` (present 2.11 through 2.15); without it we
    assume no type-based fallback.
    """
    from torch._inductor import lowering

    check = getattr(lowering, "fallback_node_due_to_unsupported_type", None)
    return bool(check(node)) if check is not None else False


# ---------------------------------------------------------------------------
# functionalization (ViewMeta)
# ---------------------------------------------------------------------------


def owning_bindings_hold_tensors_by_value() -> bool:
    """Whether torchgen's owning C++ bindings (``remove_non_owning_ref_types``,
    the fields of a generated ViewMeta class) spell Tensor, Scalar and their
    optionals by value (``at::Tensor``) rather than as const references.

    torch 2.14 changed this (torchgen/api/cpp.py); 2.11-2.13 keep
    ``const at::Tensor &``. Can go when hopkit requires torch >= 2.14.
    """
    return torch_at_least("2.14")

