"""torch.export.save / load of programs with hopkit HOP nodes.

    torch.export.save(ep, f)    # each hopkit HOP node records its HOP and its config
    torch.export.load(f)        # config comes back with its exact types, or an error
                                # names the module to import (or the format mismatch)

Registered by ``BaseHOP._register_rules`` through :func:`register_serialization`.

NOTE [Saving hopkit HOP nodes]
torch's serializer (torch/_export/serde/serialize.py, 2.11-2.15) writes a HOP
node's arguments with the argument types of its schema language: a tuple
comes back a list, an enum is stored as an opaque constant that
``torch.export.save``'s archive drops (``KeyError: '_custom_obj_0'`` on
load), dataclasses and named tuples have no encoding at all, and an int and a
bool of the same value are told apart only by luck. It also writes nothing
that says where the HOP comes from, so a process that has not imported the
HOP's defining module fails with "We failed to resolve
torch.ops.higher_order.<name>", swallowed by ``torch.export.load`` into
"Please check the warnings above".

So hopkit wraps two module-level names of that module (through hopkit._patch,
when it is imported after the first hopkit HOP was created):

* ``serialize``: for a program with hopkit HOP nodes (BaseHOP calls, and
  hopkit's ``with_effects``, which may call a BaseHOP), each node's
  configuration (the leading positional configuration and every keyword
  argument; for a with_effects call, those of the BaseHOP it calls) is encoded
  exactly (``_encode``) into a record in the node's
  ``meta["custom"]["hopkit"]``, next to the HOP's name, its class and module
  (and the called BaseHOP's), hopkit's version and the record's format
  version (``FORMAT_VERSION``);
  torch's serializer keeps ``meta["custom"]`` as JSON. In the node's arguments
  each configuration value torch cannot carry exactly is replaced, for the
  duration of the call, by a string holding its encoding (readable by tools
  that do not know hopkit). The program itself is left as it was.
* ``ExportedProgramDeserializer``: before torch deserializes, every record is
  checked: its format must be one this hopkit reads, the HOP must exist in
  this process with the recorded class, and every class the configuration
  names must be importable *from sys.modules* (hopkit never imports a module
  named by a file). An error names what to import, or both format versions.
  After torch deserialized, the configuration is decoded back into the nodes
  and the record is removed, so the loaded program reads as the saved one.

Programs without hopkit HOP nodes pass through both untouched. The errors are
not RuntimeErrors (``ImportError`` and ``ValueError`` subclasses): torch.export.load
turns a RuntimeError from deserialization into a logged warning and a generic
error.

In a process where no hopkit HOP was ever created, nothing of this is
installed (``import hopkit`` changes nothing in torch: NOTE [Changing torch
only on use, reversibly] in hopkit/_patch.py); loading a program with hopkit
nodes there fails in torch, and torch's logged message then shows the record
(``metadata={'custom': '{"hopkit": {... "module": ..., "class": ...}}'}``),
which names the module to import.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from hopkit import _patch

__all__ = [
    "FORMAT_VERSION",
    "HopNotLoadedError",
    "SavedFormatError",
    "register_serialization",
]

#: The format of the records hopkit writes into saved programs. Bump it when a
#: record changes in a way an older hopkit would misread; this hopkit reads
#: every format from 1 up to it.
FORMAT_VERSION = 1

_SERDE = "torch._export.serde.serialize"
# torch.export.save / load reach the serializer through this module, which
# binds both names with `from ... import` (2.11-2.15).
_CONSUMERS = ("torch.export.pt2_archive._package",)
_KEY = "hopkit"
_patches: list[_patch.Patch] = []


class HopNotLoadedError(ImportError):
    """A saved program names a hopkit HOP (or a config class) this process lacks."""


class SavedFormatError(ValueError):
    """A saved program's hopkit records are in a format this hopkit cannot read."""


# ---------------------------------------------------------------------------
# Registration (installed on first use)
# ---------------------------------------------------------------------------


def register_serialization(hop: Any) -> None:
    """Make ``torch.export`` save and load ``hop``'s nodes faithfully.

    Installs hopkit's wrappers of torch's serializer (NOTE [Saving hopkit HOP
    nodes]) when ``torch._export.serde.serialize`` is imported, now if it is.
    One installation serves every hopkit HOP; ``hop`` only triggers it.
    """
    if _patches and all(p.live for p in _patches):
        return
    _patch.when_imported(_SERDE, _install, why="save and load hopkit HOP nodes exactly")


def _install(module: Any) -> None:
    if _patches and all(p.live for p in _patches):
        return
    for p in _patches:
        p.undo()
    _patches.clear()
    for name, make in (("serialize", _wrap_serialize),
                       ("ExportedProgramDeserializer", _wrap_deserializer)):
        patch = _patch.patch_function(_SERDE, name, make, consumers=_CONSUMERS,
                                      why="save and load hopkit HOP nodes exactly")
        if patch is not None:
            _patches.append(patch)


# ---------------------------------------------------------------------------
# Which nodes are hopkit's
# ---------------------------------------------------------------------------


def _is_hopkit_hop(target: Any) -> bool:
    if not isinstance(target, torch._ops.HigherOrderOperator):
        return False
    return bool(getattr(target, "_is_hopkit_hop", False)) or \
        type(target).__module__.partition(".")[0] == "hopkit"


def _hopkit_nodes(root: torch.nn.Module) -> list[torch.fx.Node]:
    """Every hopkit HOP call in ``root``'s graph and its submodules' graphs."""
    found: list[torch.fx.Node] = []
    for module in root.modules():
        if isinstance(module, torch.fx.GraphModule):
            found.extend(n for n in module.graph.nodes
                         if n.op == "call_function" and _is_hopkit_hop(n.target))
    return found


def _num_leading(hop: Any) -> int:
    return len(getattr(hop, "leading_config", ()))


@functools.cache
def _hopkit_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("hopkit")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------
# Exact encoding of configuration values
# ---------------------------------------------------------------------------
# A value is a JSON scalar (None, bool, int, finite float, str) or a one-key
# object naming its type: {"tuple": [...]}, {"list": [...]},
# {"float": "nan"}, {"complex": [re, im]}, {"dtype": "float16"},
# {"device": "cuda:0"}, {"enum": [module, qualname, member]},
# {"namedtuple": [module, qualname, [fields...]]},
# {"dataclass": [module, qualname, {field: value}]}.

_TORCH_ENUMS: dict[str, type] = {
    "dtype": torch.dtype, "memory_format": torch.memory_format, "layout": torch.layout,
}


def _encode(value: Any, where: str, hop_name: str) -> Any:
    t = type(value)
    if value is None or t in (bool, int, str):
        return value
    if t is float:
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, enum.Enum):
        return {"enum": [*_class_path(t, where, hop_name), value.name]}
    if isinstance(value, tuple) and hasattr(t, "_fields"):
        return {"namedtuple": [*_class_path(t, where, hop_name),
                               [_encode(v, f"{where}.{f}", hop_name)
                                for f, v in zip(t._fields, value)]]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _encode(getattr(value, f.name), f"{where}.{f.name}", hop_name)
                  for f in dataclasses.fields(value) if f.init}
        return {"dataclass": [*_class_path(t, where, hop_name), fields]}
    # FX keeps a node's lists as immutable_list (a list subclass).
    if t is tuple or isinstance(value, list):
        tag = "tuple" if t is tuple else "list"
        return {tag: [_encode(v, f"{where}[{i}]", hop_name) for i, v in enumerate(value)]}
    if t is complex:
        return {"complex": [_encode(value.real, where, hop_name), _encode(value.imag, where, hop_name)]}
    for tag, kind in _TORCH_ENUMS.items():
        if t is kind:
            return {tag: str(value).removeprefix("torch.")}
    if t is torch.device:
        return {"device": str(value)}
    raise TypeError(
        f"hopkit: torch.export.save cannot save {where} of {hop_name}, a "
        f"{t.__module__}.{t.__qualname__}: hopkit saves configuration that is str, int, "
        f"float, bool, None, complex, torch.dtype, torch.device, an enum, or a tuple, "
        f"list, named tuple or dataclass of those; pass one of those."
    )


def _class_path(cls: type, where: str, hop_name: str) -> tuple[str, str]:
    if "<locals>" in cls.__qualname__:
        raise TypeError(
            f"hopkit: torch.export.save cannot save {where} of {hop_name}: its class "
            f"{cls.__module__}.{cls.__qualname__} is defined inside a function, so a "
            f"process loading the program could never find it; define the class at "
            f"module level."
        )
    return cls.__module__, cls.__qualname__


def _decode(value: Any, hop_name: str) -> Any:
    if not isinstance(value, dict):
        return value
    ((tag, payload),) = value.items()
    if tag == "tuple":
        return tuple(_decode(v, hop_name) for v in payload)
    if tag == "list":
        return [_decode(v, hop_name) for v in payload]
    if tag == "float":
        return float(payload)
    if tag == "complex":
        return complex(_decode(payload[0], hop_name), _decode(payload[1], hop_name))
    if tag in _TORCH_ENUMS:
        found = getattr(torch, payload, None)
        if not isinstance(found, _TORCH_ENUMS[tag]):
            raise SavedFormatError(
                f"hopkit: the saved program's config of {hop_name} holds the {tag} "
                f"{payload!r}, which this torch {torch.__version__} does not have; load it "
                f"with the torch release that saved it."
            )
        return found
    if tag == "device":
        return torch.device(payload)
    if tag == "enum":
        module, qualname, member = payload
        cls = _find_class(module, qualname, "an enum", hop_name)
        return cls[member]
    if tag == "namedtuple":
        module, qualname, fields = payload
        return _find_class(module, qualname, "a named tuple", hop_name)(
            *(_decode(v, hop_name) for v in fields))
    if tag == "dataclass":
        module, qualname, fields = payload
        cls = _find_class(module, qualname, "a dataclass", hop_name)
        return cls(**{k: _decode(v, hop_name) for k, v in fields.items()})
    raise SavedFormatError(
        f"hopkit: the saved program's config of {hop_name} holds a value tagged "
        f"{tag!r}, which this hopkit {_hopkit_version()} (format {FORMAT_VERSION}) does "
        f"not know; load it with the hopkit that saved it, or a newer one."
    )


def _find_class(module: str, qualname: str, kind: str, hop_name: str) -> Any:
    """The class ``module.qualname``, from an already imported module only."""
    found: Any = sys.modules.get(module)
    if found is None:
        raise HopNotLoadedError(
            f"hopkit: the saved program's config of {hop_name} holds {kind} of class "
            f"{qualname} from module {module}, which this process has not imported; "
            f"import {module} before torch.export.load (hopkit never imports a module "
            f"a saved file names).",
            name=module,
        )
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not isinstance(found, type):
        raise HopNotLoadedError(
            f"hopkit: the saved program's config of {hop_name} holds {kind} of class "
            f"{qualname} from module {module}, but the imported {module} has no class "
            f"{qualname}; import the version of {module} the program was saved with.",
            name=module,
        )
    return found


def _exactly_representable(value: Any) -> bool:
    """Whether torch's serializer gives ``value`` back with its exact type."""
    t = type(value)
    return value is None or t in (bool, int, str, torch.dtype, torch.device) or (
        t is float and math.isfinite(value))


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------


def _identity(hop: Any) -> dict[str, Any]:
    return {"hop": hop.__name__, "module": type(hop).__module__,
            "class": type(hop).__qualname__}


def _config_owner(node: torch.fx.Node) -> tuple[Any, int]:
    """(the BaseHOP whose config the node's arguments hold, where it starts).

    A BaseHOP call holds its own; hopkit's with_effects calling one, as
    ``with_effects(token, hop, *leading, subgraph, *operands, **config)``,
    holds that HOP's after the token and the HOP.
    """
    target = node.target
    if getattr(target, "_is_hopkit_hop", False):
        return target, 0
    if len(node.args) >= 2 and getattr(node.args[1], "_is_hopkit_hop", False):
        return node.args[1], 2
    return None, 0


def _record(node: torch.fx.Node) -> dict[str, Any]:
    record: dict[str, Any] = {"format": FORMAT_VERSION, "hopkit": _hopkit_version(),
                              **_identity(node.target)}
    hop, offset = _config_owner(node)
    if hop is not None:
        name = f"torch.ops.higher_order.{hop.__name__}"
        if hop is not node.target:
            record["wraps"] = _identity(hop)
            record["offset"] = offset
        n = _num_leading(hop)
        names = getattr(hop, "leading_config", ())
        record["leading"] = [_encode(v, f"the positional config {names[i]!r}", name)
                             for i, v in enumerate(node.args[offset:offset + n])]
        record["kwargs"] = {k: _encode(v, f"the config kwarg {k!r}", name)
                            for k, v in node.kwargs.items()}
    return record


def _placeholder(value: Any) -> Any:
    return value if _exactly_representable(value) else json.dumps(
        _encode(value, "config", "hop"))


class _RecordsWritten:
    """Within ``with``: each hopkit node carries its record and placeholder config."""

    def __init__(self, nodes: list[torch.fx.Node]) -> None:
        # Encode everything first: an unsavable value raises before any change.
        self.items = [(n, _record(n)) for n in nodes]
        self.saved: list[tuple[torch.fx.Node, Any, Any, bool, Any]] = []

    def __enter__(self) -> None:
        for node, record in self.items:
            had_custom = "custom" in node.meta
            self.saved.append((node, node.args, node.kwargs, had_custom, node.meta.get("custom")))
            if "kwargs" in record:
                i, n = record.get("offset", 0), len(record["leading"])
                node.args = (*node.args[:i], *map(_placeholder, node.args[i:i + n]),
                             *node.args[i + n:])
                node.kwargs = {k: _placeholder(v) for k, v in node.kwargs.items()}
            custom = node.meta.get("custom")
            node.meta["custom"] = {**(custom if isinstance(custom, dict) else {}), _KEY: record}

    def __exit__(self, *exc: object) -> None:
        for node, args, kwargs, had_custom, custom in reversed(self.saved):
            node.args, node.kwargs = args, kwargs
            if had_custom:
                node.meta["custom"] = custom
            else:
                node.meta.pop("custom", None)
        self.saved.clear()


def _wrap_serialize(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def serialize(exported_program: Any, *args: Any, **kwargs: Any) -> Any:
        root = getattr(exported_program, "graph_module", None)
        nodes = _hopkit_nodes(root) if isinstance(root, torch.nn.Module) else []
        if not nodes:
            return original(exported_program, *args, **kwargs)
        with _RecordsWritten(nodes):
            return original(exported_program, *args, **kwargs)

    return serialize


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _serialized_records(graph: Any) -> Iterator[tuple[dict[str, Any], str]]:
    """(record, node target) for every hopkit node of a serialized (schema) graph."""
    for node in graph.nodes:
        custom = node.metadata.get("custom") if isinstance(node.metadata, dict) else None
        if custom and f'"{_KEY}"' in custom:
            record = json.loads(custom).get(_KEY)
            if isinstance(record, dict):
                yield record, node.target
        if isinstance(node.target, str) and node.target.startswith("torch.ops.higher_order."):
            for inp in node.inputs:
                if inp.arg.type == "as_graph":
                    yield from _serialized_records(inp.arg.as_graph.graph)


def _check_format(record: dict[str, Any], target: str) -> None:
    fmt = record.get("format")
    if type(fmt) is not int or not 1 <= fmt <= FORMAT_VERSION:
        raise SavedFormatError(
            f"hopkit: the saved program's node {target} was written by hopkit "
            f"{record.get('hopkit', '(unknown version)')} in hopkit's serialization format "
            f"{fmt!r}, but this hopkit {_hopkit_version()} reads formats 1 to "
            f"{FORMAT_VERSION}; load it with hopkit {record.get('hopkit', 'of that format')} "
            f"or newer, or export and save the program again with this hopkit."
        )


def _check_hop(record: dict[str, Any]) -> Any:
    """The HOP ``record`` names, created in this process with the recorded class."""
    from hopkit.base_hop import _names

    name, module, cls = record.get("hop"), record.get("module"), record.get("class")
    hop = _names.registered_hop(name) if isinstance(name, str) else None
    if hop is None:
        raise HopNotLoadedError(
            f"hopkit: the saved program calls torch.ops.higher_order.{name}, a hopkit HOP "
            f"of class {cls} from module {module}, which this process has not created; "
            f"import {module} (so that its {cls} instance exists) before "
            f"torch.export.load. hopkit never imports a module a saved file names.",
            name=module,
        )
    if (type(hop).__module__, type(hop).__qualname__) != (module, cls):
        raise HopNotLoadedError(
            f"hopkit: the saved program calls torch.ops.higher_order.{name}, a HOP of "
            f"class {cls} from module {module}, but that name belongs to "
            f"{type(hop).__module__}.{type(hop).__qualname__} in this process; import "
            f"{module} instead of the module defining the other HOP of that name.",
            name=module,
        )
    return hop


def _check_records(serialized_program: Any) -> bool:
    """Refuse, before torch deserializes, what could not load; whether any record."""
    graph_module = getattr(serialized_program, "graph_module", None)
    if graph_module is None:
        return False
    found = False
    for record, target in _serialized_records(graph_module.graph):
        found = True
        _check_format(record, target)
        _check_hop(record)
        owner = record.get("wraps", record)
        if owner is not record:
            _check_hop(owner)
        hop_name = f"torch.ops.higher_order.{owner.get('hop')}"
        for value in (*record.get("leading", ()), *record.get("kwargs", {}).values()):
            _decode(value, hop_name)
    return found


def _restore(exported_program: Any) -> None:
    """Decode each record back into its node's config, and remove the records."""
    for module in exported_program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        changed = False
        for node in module.graph.nodes:
            custom = node.meta.get("custom")
            if not isinstance(custom, dict) or _KEY not in custom:
                continue
            record = custom[_KEY]
            # torch gives the HOP's metadata to its subgraph's get_attr node
            # and, for some outputs, to its getitem nodes too: only the call
            # itself takes the config.
            if node.op == "call_function" and _is_hopkit_hop(node.target) and \
                    node.target.__name__ == record.get("hop") and "kwargs" in record:
                hop_name = f"torch.ops.higher_order.{record.get('wraps', record)['hop']}"
                leading = [_decode(v, hop_name) for v in record["leading"]]
                i = record.get("offset", 0)
                node.args = (*node.args[:i], *leading, *node.args[i + len(leading):])
                node.kwargs = {k: _decode(v, hop_name) for k, v in record["kwargs"].items()}
            rest = {k: v for k, v in custom.items() if k != _KEY}
            if rest:
                node.meta["custom"] = rest
            else:
                del node.meta["custom"]
            changed = True
        if changed:
            module.recompile()


def _wrap_deserializer(original: Callable[..., Any]) -> Callable[..., Any]:
    # torch's class is Final (no subclasses): wrap each instance's deserialize.
    @functools.wraps(original, updated=())
    def exported_program_deserializer(*args: Any, **kwargs: Any) -> Any:
        deserializer = original(*args, **kwargs)
        deserializer.deserialize = functools.partial(_deserialize, deserializer.deserialize)
        return deserializer

    return exported_program_deserializer


def _deserialize(original: Callable[..., Any], serialized_program: Any, *args: Any,
                 **kwargs: Any) -> Any:
    has_records = _check_records(serialized_program)
    result = original(serialized_program, *args, **kwargs)
    if has_records:
        _restore(result)
    return result
