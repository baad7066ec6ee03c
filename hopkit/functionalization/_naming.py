"""Naming and binding API of torch's generated ``ViewMeta`` specializations.

A reimplementation of ``torchgen/api/functionalization.py``. For a view
operator ``slice.Tensor(Tensor(a) self, int dim=0, SymInt? start=None, ...)``
torch generates a C++ class ``slice_Tensor_ViewMeta`` (exposed to Python as
``torch._C._functionalization.slice_Tensor_ViewMeta``) whose constructor takes

    base_ctor_arguments(func) + extra_ctor_arguments(func)
    = [has_symbolic_inputs, (out_index,) reapply_views, inverse_return_mode,
       dim, start, end, step]

and whose ``forward``/``reverse`` call ``op_arguments(func, is_reverse)``.
The functions below compute those names and C++ bindings from a
``torchgen.model.FunctionSchema``; their results agree with torchgen's own
module for every view group in ``native_functions.yaml`` (see
tests/test_functionalization.py), and :class:`hopkit.functionalization.ViewMeta`
uses them to convert to and from torch's generated classes.

Differences from the original, on purpose:

* :class:`Binding` is hopkit's own small record (name, C++ type string,
  schema argument); torchgen's ``Binding``/``CType`` hierarchy is not part of
  hopkit's API.
* Violated preconditions raise ``ValueError`` naming the schema, instead of
  ``AssertionError``.
* ``mutated_view_binding.argument`` is named ``mutated_view`` (torchgen's
  reuses the ``base`` argument; the C++ it generates is the same).

Every torchgen type used here comes from :mod:`._torchgen`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from hopkit.functionalization._torchgen import (
    Argument,
    BaseTy,
    BaseType,
    FunctionSchema,
    ListType,
    NativeFunction,
    NativeFunctionsViewGroup,
    OptionalType,
    SchemaKind,
    Type,
    ViewSchemaKind,
    load_native_functions,
)
from hopkit._compat import owning_bindings_hold_tensors_by_value

__all__ = [
    "Binding",
    "attributes",
    "base_binding",
    "base_ctor_arguments",
    "classname",
    "extra_ctor_arguments",
    "has_symbolic_inputs_binding",
    "inverse_return_mode_binding",
    "is_multi_output",
    "mutated_view_binding",
    "name",
    "op_arguments",
    "out_index_binding",
    "reapply_views_binding",
    "returns_type",
    "reverse_name",
    "view_groups",
]


@dataclass(frozen=True)
class Binding:
    """One C++ parameter: ``type name`` plus the schema argument it binds.

    ``type`` is the C++ type as torch's codegen spells it
    (``"c10::SymInt"``, ``"::std::optional<c10::SymInt>"``,
    ``"const at::Tensor &"``, ``"::std::vector<c10::SymInt>"``).
    """

    name: str
    type: str
    argument: Argument
    default: str | None = None

    def decl(self) -> str:
        """The C++ declaration, ``"c10::SymInt step"``."""
        default = "" if self.default is None else f"={self.default}"
        return f"{self.type} {self.name}{default}"


def _special(name: str, cpp_type: str, ty: BaseTy) -> Binding:
    argument = Argument(name=name, type=BaseType(ty), default=None, annotation=None)
    return Binding(name=name, type=cpp_type, argument=argument)


# The lambda/constructor parameters that do not come from the view's schema.
base_binding = _special("base", "const at::Tensor &", BaseTy.Tensor)
mutated_view_binding = _special("mutated_view", "const at::Tensor &", BaseTy.Tensor)
has_symbolic_inputs_binding = _special("has_symbolic_inputs", "bool", BaseTy.bool)
out_index_binding = _special("out_index", "int64_t", BaseTy.int)
reapply_views_binding = _special("reapply_views", "bool", BaseTy.bool)
# Not a bool in C++; the schema type is never used for this one.
inverse_return_mode_binding = _special(
    "inverse_return_mode", "at::functionalization::InverseReturnMode", BaseTy.bool
)


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------


def classname(func: FunctionSchema, with_namespace: bool = False) -> str:
    """Name of the generated class, ``slice_Tensor_ViewMeta``."""
    prefix = "at::functionalization::" if with_namespace else ""
    return f"{prefix}{func.name.unambiguous_name()}_ViewMeta"


def name(
    g: NativeFunctionsViewGroup,
    *,
    is_reverse: bool,
    include_namespace: bool,
    reapply_views: bool | None = None,
) -> str:
    """The operator the generated ``forward`` (or ``reverse``) calls.

    Forward calls the view op when ``reapply_views`` else its ``_copy``
    variant, always through ``at::_ops`` (so ``include_namespace`` must be
    true); reverse calls the hand-written inverse, see :func:`reverse_name`.
    """
    if is_reverse:
        return reverse_name(g.view, include_namespace)
    if reapply_views is None:
        raise ValueError(
            f"hopkit: name(..., is_reverse=False) for {g.view.func.name} needs "
            "reapply_views=True or False; only the reverse name ignores it."
        )
    if not include_namespace:
        raise ValueError(
            f"hopkit: the forward name of {g.view.func.name} is always an "
            "at::_ops call; pass include_namespace=True."
        )
    if g.view_copy is None:
        raise ValueError(
            f"hopkit: view group {g.view.func.name} has no view_copy variant, so it "
            "has no generated forward; composite view groups get no ViewMeta class."
        )
    target = g.view if reapply_views else g.view_copy
    return f"at::_ops::{target.func.name.unambiguous_name()}::call"


def reverse_name(f: NativeFunction, include_namespace: bool) -> str:
    """Name of the view inverse, ``slice_Tensor_inverse``.

    The same inverse serves the view and its ``_copy`` variant (the runtime
    ``reapply_views`` flag picks), so it is named after ``f``.
    """
    base = f"{f.func.name.unambiguous_name()}_inverse"
    if include_namespace:
        return f"at::functionalization::FunctionalInverses::{base}"
    return base


def returns_type(func: FunctionSchema) -> str:
    """C++ return type of ``forward``/``reverse``: always ``at::Tensor``.

    A multi-output view (``split``) is tracked one output per ViewMeta, so
    even ``Tensor(a)[]`` returns one tensor here.
    """
    if not func.returns:
        raise ValueError(f"hopkit: view op {func.name} returns nothing; a view returns tensors.")
    for ret in func.returns:
        if not ret.type.is_tensor_like():
            raise ValueError(
                f"hopkit: view op {func.name} returns {ret.type}; every output of a "
                "view must be a Tensor or a list of Tensors."
            )
    return "at::Tensor"


def is_multi_output(func: FunctionSchema) -> bool:
    """Whether ``func`` may return more than one tensor (``split``, ``unbind``)."""
    if len(func.returns) > 1:
        return True
    return len(func.returns) == 1 and func.returns[0].type.is_list_like() is not None


# ---------------------------------------------------------------------------
# Bindings
# ---------------------------------------------------------------------------


def base_ctor_arguments(func: FunctionSchema) -> list[Binding]:
    """Parameters of the ``ViewMeta`` base-class constructor for ``func``."""
    if is_multi_output(func):
        return [has_symbolic_inputs_binding, out_index_binding]
    return [has_symbolic_inputs_binding]


def extra_ctor_arguments(func: FunctionSchema) -> list[Binding]:
    """Parameters only this specialization takes: :func:`attributes`, non-owning."""
    return attributes(func, owning=False)


def attributes(func: FunctionSchema, owning: bool = True) -> list[Binding]:
    """Fields of the specialization: the flags, then every argument after ``self``.

    With ``owning`` the array types are owning (``::std::vector<c10::SymInt>``
    rather than ``c10::SymIntArrayRef``), as a class field must be.
    """
    rest = _non_self_arguments(func)
    return [
        reapply_views_binding,
        inverse_return_mode_binding,
        *(_dispatcher_binding(a, owning=owning) for a in rest),
    ]


def op_arguments(func: FunctionSchema, is_reverse: bool) -> list[Binding]:
    """Arguments of the call in ``forward`` (or ``reverse``).

    Forward: ``base`` replaces ``self``. Reverse: ``base, mutated_view,
    inverse_return_mode`` (and ``out_index`` for multi-output views), then
    the view's own arguments.
    """
    rest = [_dispatcher_binding(a, owning=False) for a in _non_self_arguments(func)]
    if not is_reverse:
        return [base_binding, *rest]
    head = [base_binding, mutated_view_binding, inverse_return_mode_binding]
    if is_multi_output(func):
        head.append(out_index_binding)
    return head + rest


def _non_self_arguments(func: FunctionSchema) -> list[Argument]:
    args = list(func.arguments.flat_all)
    if not args or args[0].type != BaseType(BaseTy.Tensor):
        first = args[0].type if args else "nothing"
        raise ValueError(
            f"hopkit: {func.name} is not a view of a Tensor: its first argument is "
            f"{first}, but a ViewMeta needs a schema whose first argument is `Tensor self`."
        )
    return args[1:]


# ---------------------------------------------------------------------------
# Schema type -> C++ dispatcher type
#
# The dispatcher (``at::_ops``) calling convention with SymInts kept symbolic.
# Keyed by BaseTy *name* so that a BaseTy added in a later torchgen does not
# break the table; it only raises when an argument of that type shows up.
# ---------------------------------------------------------------------------

_VALUE_TYPES: dict[str, str] = {
    "int": "int64_t",
    "float": "double",
    "bool": "bool",
    "str": "c10::string_view",
    "Generator": "at::Generator",
    "ScalarType": "at::ScalarType",
    "DimVector": "at::DimVector",
    "Layout": "at::Layout",
    "Device": "at::Device",
    "DeviceIndex": "at::DeviceIndex",
    "MemoryFormat": "at::MemoryFormat",
    "QScheme": "at::QScheme",
    "Storage": "at::Storage",
    "Stream": "at::Stream",
    "SymInt": "c10::SymInt",
    "SymBool": "c10::SymBool",
    "Dimname": "at::Dimname",  # named-tensor views (rename, refine_names), torch 2.11-2.12
}


def _dispatcher_binding(a: Argument, *, owning: bool) -> Binding:
    cpp = _argument_type(a.type, mutable=a.is_write, owning=owning, where=a.name)
    return Binding(name=a.name, type=cpp, argument=a)


def _value_type(t: Type, where: str) -> str | None:
    """C++ type of a by-value schema type, or None for reference types."""
    if isinstance(t, BaseType):
        if t.name in (BaseTy.Tensor, BaseTy.Scalar):
            return None
        cpp = _VALUE_TYPES.get(t.name.name)
        if cpp is None:
            raise ValueError(
                f"hopkit: argument {where!r} has schema type {t}, which has no C++ "
                "dispatcher type in hopkit's table (_VALUE_TYPES in "
                "hopkit/functionalization/_naming.py); add it there."
            )
        return cpp
    if isinstance(t, OptionalType):
        elem = _value_type(t.elem, where)
        return None if elem is None else f"::std::optional<{elem}>"
    if isinstance(t, ListType):
        if str(t.elem) == "bool":
            if t.size is None:
                raise ValueError(f"hopkit: argument {where!r}: bool[] needs a fixed size.")
            return f"::std::array<bool,{t.size}>"
        return None
    raise ValueError(f"hopkit: argument {where!r} has unsupported schema type {t!r}.")


def _argument_type(t: Type, *, mutable: bool, owning: bool, where: str) -> str:
    value = _value_type(t, where)
    if value is not None:
        return value
    # Owning bindings (class fields) hold Tensor and Scalar by value from
    # torch 2.14 on; older torchgen keeps the const reference even there.
    by_value = owning and owning_bindings_hold_tensors_by_value()
    if isinstance(t, BaseType):
        if t.name == BaseTy.Tensor:
            if mutable:
                return "at::Tensor &"
            return "at::Tensor" if by_value else "const at::Tensor &"
        # Scalar: the only other reference BaseType
        return "at::Scalar" if by_value else "const at::Scalar &"
    if isinstance(t, OptionalType):
        elem = str(t.elem)
        if elem == "Tensor":
            if mutable:
                return "at::Tensor &"
            return "::std::optional<at::Tensor>" if by_value else "const ::std::optional<at::Tensor> &"
        if elem == "Scalar":
            return "::std::optional<at::Scalar>" if by_value else "const ::std::optional<at::Scalar> &"
        if isinstance(t.elem, ListType) and str(t.elem.elem) == "int":
            return "at::OptionalIntArrayRef"
        if isinstance(t.elem, ListType) and str(t.elem.elem) == "SymInt":
            return "at::OptionalSymIntArrayRef"
        inner = _argument_type(t.elem, mutable=mutable, owning=False, where=where)
        return f"::std::optional<{inner}>"
    if isinstance(t, ListType):
        elem = str(t.elem)
        if elem == "int":
            return "::std::vector<int64_t>" if owning else "at::IntArrayRef"
        if elem == "SymInt":
            return "::std::vector<c10::SymInt>" if owning else "c10::SymIntArrayRef"
        if elem == "Tensor":
            return "at::TensorList"
        if elem == "Scalar":
            return "at::ArrayRef<at::Scalar>"
        if elem == "Tensor?":
            return "const c10::List<::std::optional<at::Tensor>> &"
        if elem == "Dimname":  # named-tensor views, in native_functions.yaml up to torch 2.12
            return "at::DimnameList"
        inner = _argument_type(t.elem, mutable=mutable, owning=False, where=where)
        return f"at::ArrayRef<{inner}>"
    raise ValueError(f"hopkit: argument {where!r} has unsupported schema type {t!r}.")


# ---------------------------------------------------------------------------
# View groups of native_functions.yaml
# ---------------------------------------------------------------------------


def view_groups(
    native_functions: tuple[NativeFunction, ...] | None = None,
) -> list[NativeFunctionsViewGroup]:
    """Every view group of ``native_functions.yaml``: view, view_inplace, view_copy.

    Functions are grouped by their view signature (the schema with ``_copy``
    and aliasing stripped). ``native_functions`` defaults to torch's packaged
    yaml. Torch generates a ViewMeta class for ``g.view`` and
    ``g.view_inplace`` of every group that is not ``g.composite``.
    """
    if native_functions is None:
        native_functions = load_native_functions()
    by_signature: dict[FunctionSchema, dict[object, NativeFunction]] = defaultdict(dict)
    for f in native_functions:
        kind = f.view_schema_kind
        key: object = f.func.kind() if kind == ViewSchemaKind.non_aliasing else kind
        slot = by_signature[f.func.view_signature()]
        if key in slot:
            raise ValueError(
                f"hopkit: native_functions.yaml has two {key} functions for view "
                f"signature {f.func.view_signature()}: {slot[key].func.name} and {f.func.name}."
            )
        slot[key] = f
    groups = []
    for slot in by_signature.values():
        view = slot.get(ViewSchemaKind.aliasing)
        if view is None:
            continue
        groups.append(
            NativeFunctionsViewGroup(
                view=view,
                view_copy=slot.get(SchemaKind.functional),
                view_inplace=slot.get(ViewSchemaKind.aliasing_inplace),
            )
        )
    return groups
