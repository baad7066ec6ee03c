"""The one place hopkit.functionalization touches torchgen.

torchgen ships inside the torch wheel and is not a stable API: classes move
between modules and fields get renamed. Every torchgen name the
functionalization package depends on is imported here and nowhere else, so a
rename in torchgen breaks this file only.

``torchgen.model`` is already imported by ``import torch`` (it is cheap to
re-import). ``torchgen.gen`` (the YAML parser) pulls in PyYAML and the code
generators, so it is imported lazily by :func:`load_native_functions`.
"""

from __future__ import annotations

import functools
import os

import torchgen
from torchgen.model import Argument as Argument
from torchgen.model import BaseTy as BaseTy
from torchgen.model import BaseType as BaseType
from torchgen.model import FunctionSchema as FunctionSchema
from torchgen.model import ListType as ListType
from torchgen.model import NativeFunction as NativeFunction
from torchgen.model import NativeFunctionsViewGroup as NativeFunctionsViewGroup
from torchgen.model import OptionalType as OptionalType
from torchgen.model import SchemaKind as SchemaKind
from torchgen.model import Type as Type
from torchgen.model import ViewSchemaKind as ViewSchemaKind

__all__ = [
    "Argument",
    "BaseTy",
    "BaseType",
    "FunctionSchema",
    "ListType",
    "NativeFunction",
    "NativeFunctionsViewGroup",
    "OptionalType",
    "SchemaKind",
    "Type",
    "ViewSchemaKind",
    "load_native_functions",
    "native_yaml_paths",
    "parse_schema",
]


def native_yaml_paths() -> tuple[str, str]:
    """``(native_functions.yaml, tags.yaml)`` as packaged inside the torch wheel."""
    root = os.path.join(os.path.dirname(torchgen.__file__), "packaged", "ATen", "native")
    return (
        os.path.join(root, "native_functions.yaml"),
        os.path.join(root, "tags.yaml"),
    )


@functools.cache
def load_native_functions() -> tuple[NativeFunction, ...]:
    """Every entry of torch's ``native_functions.yaml`` (parsed once, ~1 s)."""
    yaml_path, tags_path = native_yaml_paths()
    if not os.path.exists(yaml_path):
        raise FileNotFoundError(
            f"hopkit: torchgen's native_functions.yaml is not at {yaml_path}; "
            "this torch wheel does not ship torchgen/packaged. Install a regular "
            "torch wheel (it includes torchgen) to use the functionalization naming API."
        )
    from torchgen.gen import parse_native_yaml

    return tuple(parse_native_yaml(yaml_path, tags_path).native_functions)


@functools.lru_cache(maxsize=1024)
def parse_schema(schema: str) -> FunctionSchema:
    """A torchgen ``FunctionSchema`` from a schema string (``str(op._schema)``)."""
    # torch._C.FunctionSchema prints the namespace ("aten::slice.Tensor(...)");
    # torchgen's parser wants the bare operator name.
    if "::" in schema.split("(", 1)[0]:
        schema = schema.split("::", 1)[1]
    return FunctionSchema.parse(schema)
