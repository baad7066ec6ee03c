"""BaseHOP configuration: what it may be, the check at the call, how graphs carry it.

    hop(subgraph, *operands, scheme="nf4", cfg=Cfg(bits=4))   # config: keywords
    hop(torch.float16, subgraph, *operands)                  # or leading_config

NOTE [BaseHOP configuration values]
A configuration value is a constant of the call: it is recorded on the graph
node and never traced. It may be a str, int, float, bool, None, torch.dtype,
torch.device, torch.layout, torch.memory_format, an enum member, a tuple or
list of those, or a frozen dataclass or named tuple of those (a frozen
dataclass may nest: its fields may be any configuration value). Anything
else (a tensor, a callable or module, a non-frozen dataclass, an object with
no stable value) is refused at the call, in eager (``check_config``, from
``BaseHOP.__call__``) and inside torch.compile (``config_from_variable``,
from the Dynamo variable), with an error naming the value and what to do.

In every graph (Dynamo's, make_fx's, AOTAutograd's, torch.export's) the HOP
node carries the values as they are, the exact Python objects: leading
config in ``node.args`` before the subgraph, keyword config in
``node.kwargs`` (FX stores a list as its ``immutable_list``, a list
subclass). FX's tracers would otherwise turn a dataclass or named tuple into
a constructor node (which AOTAutograd's partitioner and torch.export's
verifier refuse), so hopkit writes them onto the node after creating it
(``set_node_config``). FX's code generator cannot write a dataclass (nor an
enum inside one) as source; on the first call with a dataclass config hopkit
teaches it to, through hopkit._patch, for the dataclass types used as HOP
configuration only (``Cls(field=value, ...)`` with the class as a global of
the generated code; running that code builds an equal object). A named tuple
is written by FX itself, whose code generator writes its fields with plain
``repr``, so a named tuple may hold only values whose repr is source (no
enum, dataclass or named tuple inside): ``check_config`` says so.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hopkit import _compat, _patch

__all__ = [
    "check_config",
    "config_from_variable",
    "install_codegen",
    "schema_argument",
    "set_node_config",
]

# Leaves FX writes as source itself (repr is Python that FX's globals resolve:
# ``torch.float32``, ``device(type='cpu')``, ``inf``).
_SCALARS = (str, int, float, bool, type(None), torch.dtype, torch.device,
            torch.layout, torch.memory_format)
# Types a configuration value may have without a deeper check (also read by
# BaseHOP.__call__, which skips check_config when every value has one).
SCALAR_TYPES = frozenset(_SCALARS)

_FIX_TENSOR = ("tensors are operands: pass it after the subgraph "
               "(hop(subgraph, x, t)) and read it there")
_FIX_CALLABLE = ("a HOP's only function is its subgraph: call this one inside the "
                 "subgraph, or pass the setting it stands for (a str or an enum) "
                 "as configuration")
_FIX_MODULE = ("pass its parameters and buffers as operands and call the module "
               "inside the subgraph")
_FIX_OTHER = ("pass plain values (str, int, float, bool, None, torch.dtype, "
              "torch.device, an enum, a tuple or list of those, or a frozen "
              "dataclass or named tuple of those)")


def _refusal(hop_name: str, path: str, value: Any, why: str, fix: str) -> TypeError:
    return TypeError(
        f"hopkit: {hop_name}'s configuration {path} is a {type(value).__qualname__}, "
        f"{why}; {fix}."
    )


# ---------------------------------------------------------------------------
# The check at the call
# ---------------------------------------------------------------------------


def check_config(hop_name: str, names: Sequence[str], values: Sequence[Any]) -> None:
    """Refuse a configuration value a HOP cannot carry (NOTE [BaseHOP configuration values]).

    ``names[i]`` names ``values[i]`` in the message (a keyword, or a leading
    configuration argument).
    """
    for name, value in zip(names, values):
        if type(value) in SCALAR_TYPES:
            continue
        _check_value(hop_name, name, value, in_namedtuple=False)
        _note_dataclasses(value)


def _check_value(hop_name: str, path: str, value: Any, in_namedtuple: bool) -> None:
    if type(value) in SCALAR_TYPES:
        return
    if in_namedtuple and (isinstance(value, enum.Enum) or _is_namedtuple(value)
                          or _is_dataclass_instance(value)):
        raise _refusal(
            hop_name, path, value,
            "inside a named tuple, which torch.fx writes into generated code with "
            "plain repr(), so a value whose repr is not Python source cannot be "
            "carried there",
            "make the configuration a frozen dataclass (@dataclasses.dataclass("
            "frozen=True)) instead of a named tuple, or pass this value as a "
            "configuration argument of its own",
        )
    if isinstance(value, enum.Enum):
        return
    if isinstance(value, _SCALARS):  # subclasses of the scalar types
        return
    if isinstance(value, tuple):
        nt = _is_namedtuple(value)
        fields = getattr(type(value), "_fields") if nt else range(len(value))
        for field, item in zip(fields, value):
            sub = f"{path}.{field}" if nt else f"{path}[{field}]"
            _check_value(hop_name, sub, item, in_namedtuple or nt)
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(hop_name, f"{path}[{i}]", item, in_namedtuple)
        return
    if _is_dataclass_instance(value):
        if not type(value).__dataclass_params__.frozen:
            raise _refusal_for_type(hop_name, path, type(value))
        for f in dataclasses.fields(value):
            _check_value(hop_name, f"{path}.{f.name}", getattr(value, f.name), in_namedtuple)
        return
    raise _refusal_for_type(hop_name, path, type(value))


def _refusal_for_type(hop_name: str, path: str, cls: type) -> TypeError:
    if issubclass(cls, torch.Tensor):
        why, fix = "which configuration cannot be", _FIX_TENSOR
    elif issubclass(cls, torch.nn.Module):
        why, fix = "which configuration cannot be", _FIX_MODULE
    elif dataclasses.is_dataclass(cls):  # not frozen
        why = ("a dataclass that is not frozen, so its value could change after "
               "the call was recorded")
        fix = (f"declare it @dataclasses.dataclass(frozen=True), or pass "
               f"dataclasses.astuple({path}) (a tuple)")
    elif issubclass(cls, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        why, fix = "a symbolic value, not a constant", "pass it as an operand"
    elif any("__call__" in vars(k) for k in cls.__mro__[:-1]):
        why, fix = "a callable, which configuration cannot be", _FIX_CALLABLE
    else:
        why, fix = ("not a value hopkit can record on the graph and compare "
                    "across calls"), _FIX_OTHER
    return TypeError(
        f"hopkit: {hop_name}'s configuration {path} is a {cls.__qualname__}, "
        f"{why}; {fix}."
    )


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _dataclass_types(value: Any, out: set[type]) -> None:
    if type(value) in SCALAR_TYPES:
        return
    if isinstance(value, (tuple, list)):
        for item in value:
            _dataclass_types(item, out)
    elif _is_dataclass_instance(value):
        out.add(type(value))
        for f in dataclasses.fields(value):
            _dataclass_types(getattr(value, f.name), out)


def _note_dataclasses(value: Any) -> None:
    """Teach FX's code generator the dataclass types in ``value`` (install_codegen)."""
    types: set[type] = set()
    _dataclass_types(value, types)
    new = types - _written_types
    if new:
        _written_types.update(new)
        install_codegen()


# ---------------------------------------------------------------------------
# Inside torch.compile: Dynamo's variables to Python values
# ---------------------------------------------------------------------------


def config_from_variable(hop_name: str, path: str, vt: Any) -> Any:
    """The Python value of a configuration argument Dynamo traced, checked.

    Dynamo's own ``as_python_constant`` covers constants, enums, tuples, lists
    and named tuples; a frozen dataclass built or read in the compiled frame
    is rebuilt here from its fields' values.
    """
    from torch._dynamo.variables.user_defined import FrozenDataClassVariable

    try:
        value = vt.as_python_constant()
    except NotImplementedError:
        if isinstance(vt, FrozenDataClassVariable):
            cls = vt.python_type()
            init = {}
            for f in dataclasses.fields(cls):
                if f.init:
                    init[f.name] = config_from_variable(
                        hop_name, f"{path}.{f.name}",
                        _compat.frozen_dataclass_field_variable(vt, f.name))
            value = cls(**init)
        else:
            raise _refusal_for_type(hop_name, path, _python_type(vt)) from None
    check_config(hop_name, [path], [value])
    return value


def _python_type(vt: Any) -> type:
    try:
        return vt.python_type()
    except NotImplementedError:
        return object


# ---------------------------------------------------------------------------
# In graphs: the node carries the values as they are
# ---------------------------------------------------------------------------


def set_node_config(node: torch.fx.Node, leading: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Write the configuration onto ``node`` as it is (created with stand-ins)."""
    if leading:
        node.args = (*leading, *node.args[len(leading):])
    if kwargs:
        node.kwargs = {**node.kwargs, **kwargs}


def placeholder_config(leading: Sequence[Any], kwargs: dict[str, Any]
                       ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Stand-ins for the node's creation: FX's tracers would rewrite the real values."""
    return tuple(None for _ in leading), {k: None for k in kwargs}


# The dataclass types used as HOP configuration, which FX's code generator is
# taught to write (install_codegen).
_written_types: set[type] = set()


def _global_name(cls: type) -> str:
    return re.sub(r"\W", "_", f"{cls.__module__}.{cls.__qualname__}")


def source_of(value: Any, globals_: dict[str, Any]) -> str:
    """Python source that rebuilds ``value``; the globals it reads go in ``globals_``."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, float):
        return f"float({str(value)!r})" if value != value or value in (
            float("inf"), float("-inf")) else repr(value)
    if isinstance(value, enum.Enum):
        name = _global_name(type(value))
        globals_[name] = type(value)
        return f"{name}[{value.name!r}]"
    if isinstance(value, (str, int)):
        return repr(value)
    if isinstance(value, torch.device):
        return f"torch.device({str(value)!r})"
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return str(value)
    if _is_namedtuple(value):
        name = _global_name(type(value))
        globals_[name] = type(value)
        return f"{name}({', '.join(source_of(v, globals_) for v in value)})"
    if isinstance(value, tuple):
        items = [source_of(v, globals_) for v in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, list):
        return f"[{', '.join(source_of(v, globals_) for v in value)}]"
    if _is_dataclass_instance(value):
        name = _global_name(type(value))
        globals_[name] = type(value)
        fields = ", ".join(
            f"{f.name}={source_of(getattr(value, f.name), globals_)}"
            for f in dataclasses.fields(value) if f.init
        )
        return f"{name}({fields})"
    raise TypeError(f"hopkit: cannot write configuration of type {type(value).__name__} as source")


def install_codegen() -> None:
    """Teach FX's code generator to write hopkit's dataclass configuration.

    torch.fx.graph's generator asks ``is_opaque_value_type`` (2.11-2.13) /
    ``is_opaque_constant_type`` (2.14+) whether a value it cannot otherwise
    write is a constant with an ``__fx_repr__``, and then
    ``get_opaque_obj_repr`` for its source. hopkit rebinds both names in
    torch.fx.graph only (torch's opaque-type registry is untouched) and
    answers for the types in ``_written_types``; every other value goes to
    torch's original.
    """
    check_name = _compat.fx_codegen_constant_check_name()

    def make_check(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
        def is_constant(cls: Any) -> bool:
            return cls in _written_types or original(cls)

        return is_constant

    def make_repr(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def get_repr(obj: Any) -> Any:
            if type(obj) in _written_types:
                globals_: dict[str, Any] = {}
                return source_of(obj, globals_), globals_
            return original(obj)

        return get_repr

    why = "write hopkit HOP configuration dataclasses into FX-generated code"
    _patch.patch_function("torch.fx.graph", check_name, make_check, why=why)
    _patch.patch_function("torch.fx.graph", "get_opaque_obj_repr", make_repr, why=why)


# ---------------------------------------------------------------------------
# gen_schema
# ---------------------------------------------------------------------------


def schema_argument(name: str, value: Any) -> torch._C.Argument | None:
    """A keyword-only schema argument for a value HopSchemaGenerator cannot type.

    None where torch's generator types the value itself (str, int, float,
    bool, None, dtype, device, layout, memory_format). A tuple or list of
    such scalars is typed as a JIT tuple or list with the value as default;
    an enum, a named tuple or a dataclass is ``Any``, its value written into
    the schema's default as a string of its source.
    """
    if type(value) in SCALAR_TYPES:
        return None
    typ = _jit_type(value)
    if typ is not None:
        default = tuple(value) if isinstance(value, tuple) else list(value)
        return torch._C.Argument(name, typ, None, default, True, None)
    globals_: dict[str, Any] = {}
    return torch._C.Argument(name, torch._C.AnyType.get(), None, source_of(value, globals_),
                             True, None)


def _jit_type(value: Any) -> Any:
    """The JIT type of a (nested) plain tuple or list of scalars, else None."""
    if isinstance(value, bool):
        return torch._C.BoolType.get()
    if isinstance(value, int) and not isinstance(value, enum.Enum):
        return torch._C.IntType.get()
    if isinstance(value, float):
        return torch._C.FloatType.get()
    if isinstance(value, str) and not isinstance(value, enum.Enum):
        return torch._C.StringType.get()
    if type(value) is tuple:
        items = [_jit_type(v) for v in value]
        return None if any(t is None for t in items) else torch._C.TupleType(items)
    if isinstance(value, list) and value:
        items = [_jit_type(v) for v in value]
        if any(t is None for t in items) or len({str(t) for t in items}) != 1:
            return None
        return torch._C.ListType(items[0])
    return None
