"""Tests for hopkit/_serialization.py: torch.export.save / load of hopkit HOP nodes.

Every config type comes back with its exact type (compared recursively by
type and value, so 1, 1.0 and True differ), the loaded program computes what
eager does, the saved file records each node's HOP, class, module and format,
and the errors of a process that cannot load a program are pinned, the
fresh-process ones in a subprocess.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from expecttest import assert_expected_inline

# Imported at collection, as torch.export.save / load would: hopkit's wrappers
# are installed then, for the HOPs every test module creates at import, and no
# callback stays pending in hopkit's import hook (which
# tests/test_architecture.py's canary expects to find empty).
from torch._export.serde import serialize as serde

import hopkit
from hopkit import _patch, _serialization
from hopkit.export import wrap_with_autocast

SUBPROCESS_TIMEOUT_S = 240


class SerdeHop(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_test_serde")


serde_hop = SerdeHop()
BODY = hopkit.FunctionWithNoFreeVars(lambda x: (x.sin() * 2,))


class Color(enum.Enum):
    RED = 1
    BLUE = "b"


class Level(enum.IntEnum):
    LOW = 1


class Pair(NamedTuple):
    a: int
    b: tuple[str, ...]


Plain = collections.namedtuple("Plain", ["x", "y"])


@dataclasses.dataclass(frozen=True)
class Cfg:
    bits: int = 4
    scheme: str = "nf4"
    group: tuple[int, ...] = (1, 2)
    dtype: torch.dtype = torch.bfloat16


CONFIGS: dict[str, Any] = {
    "str": "nf4",
    "int": 3,
    "float": 0.5,
    "float_integral": 2.0,
    "nan": float("nan"),
    "bool": True,
    "none": None,
    "dtype": torch.float16,
    "device": torch.device("cpu"),
    "enum": Color.RED,
    "enum_str_value": Color.BLUE,
    "int_enum": Level.LOW,
    "tuple": ("a", "b"),
    "tuple_mixed": (1, 2.0, True, None, "s", torch.int8),
    "nested": ((1, 2), [3, (4,)]),
    "empty_tuple": (),
    "empty_list": [],
    "list": [1, 2],
    "namedtuple": Pair(1, ("x",)),
    "plain_namedtuple": Plain(1.5, (None, "s")),
    "dataclass": Cfg(),
}
# FX cannot generate code for a dataclass constant (it writes its repr), so a
# program holding one is checked by its graph only.
NOT_RUNNABLE = {"dataclass"}


def exact(a: Any, b: Any) -> bool:
    """Equal values of exactly the same types, recursively (nan equals nan).

    FX stores a node's lists and dicts as its immutable_list / immutable_dict.
    """
    if type(a) is not type(b) and not (
            all(isinstance(v, list) for v in (a, b)) or all(isinstance(v, dict) for v in (a, b))):
        return False
    if isinstance(a, float):
        return (a != a and b != b) or a == b
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(exact(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(exact(a[k], b[k]) for k in a)
    if dataclasses.is_dataclass(a):
        return all(exact(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return bool(a == b)


class Model(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return serde_hop(BODY, x, cfg="placeholder")[0] + 1


def exported(value: Any, strict: bool = False) -> torch.export.ExportedProgram:
    """A program with one serde_hop node whose ``cfg`` kwarg is ``value``.

    The value is put on the node after export: this file tests saving and
    loading, whatever export itself does with the value (test_base_hop.py).
    """
    ep = torch.export.export(Model(), (torch.randn(3),), strict=strict)
    (node,) = hop_nodes(ep.graph_module, serde_hop)
    node.kwargs = {"cfg": value}
    ep.graph_module.recompile()
    return ep


def hop_nodes(gm: torch.fx.GraphModule, hop: Any) -> list[torch.fx.Node]:
    return [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function" and n.target is hop]


def round_trip(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    return torch.export.load(buf)


def saved_json(ep: torch.export.ExportedProgram) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    with zipfile.ZipFile(buf) as z:
        (name,) = [n for n in z.namelist() if n.endswith("models/model.json")]
        result: dict[str, Any] = json.loads(z.read(name))
        return result


def serialized_nodes(graph: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for node in graph["nodes"]:
        out.append(node)
        for inp in node["inputs"]:
            if "as_graph" in inp["arg"]:
                out.extend(serialized_nodes(inp["arg"]["as_graph"]["graph"]))
    return out


# ---------------------------------------------------------------------------
# Exact types after a round trip
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_comes_back_with_its_exact_type(name: str) -> None:
    value = CONFIGS[name]
    ep = exported(value)
    loaded = round_trip(ep)
    (node,) = hop_nodes(loaded.graph_module, serde_hop)
    assert exact(node.kwargs["cfg"], value), (node.kwargs["cfg"], value)
    # The saved program itself is left as it was.
    (original,) = hop_nodes(ep.graph_module, serde_hop)
    assert exact(original.kwargs["cfg"], value) and "custom" not in original.meta
    if name not in NOT_RUNNABLE:
        x = torch.randn(3)
        torch.testing.assert_close(loaded.module()(x), x.sin() * 2 + 1)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non_strict"])
def test_tuple_kwarg_exported_and_loaded_stays_a_tuple(strict: bool) -> None:
    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return serde_hop(BODY, x, names=("a", "b"), color=Color.RED, n=1, f=1.0)[0]

    x = torch.randn(3)
    loaded = round_trip(torch.export.export(M(), (x,), strict=strict))
    (node,) = hop_nodes(loaded.graph_module, serde_hop)
    assert exact(dict(node.kwargs), {"names": ("a", "b"), "color": Color.RED, "n": 1, "f": 1.0})
    torch.testing.assert_close(loaded.module()(x), x.sin() * 2)
    decomposed = loaded.run_decompositions()
    (node,) = hop_nodes(decomposed.graph_module, serde_hop)
    assert exact(node.kwargs["names"], ("a", "b"))
    # Saved and loaded again: still exact.
    (node,) = hop_nodes(round_trip(decomposed).graph_module, serde_hop)
    assert exact(node.kwargs["names"], ("a", "b"))


def test_leading_config_of_wrap_with_autocast_comes_back_exact() -> None:
    body = hopkit.FunctionWithNoFreeVars(lambda x, w: (x @ w,))

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return wrap_with_autocast("cpu", torch.bfloat16, True, None, body, x, w)[0]

    x, w = torch.randn(2, 3), torch.randn(3, 2)
    loaded = round_trip(torch.export.export(M(), (x, w)))
    (node,) = hop_nodes(loaded.graph_module, wrap_with_autocast)
    assert exact(tuple(node.args[:4]), ("cpu", torch.bfloat16, True, None))
    out = loaded.module()(x, w)
    assert out.dtype == torch.bfloat16
    with torch.autocast("cpu", torch.bfloat16):
        torch.testing.assert_close(out, x @ w)


def test_nested_hop_config_comes_back_exact() -> None:
    inner = hopkit.FunctionWithNoFreeVars(
        lambda x: (serde_hop(BODY, x, color=Color.RED, t=(1,))[0] * 3,))

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return serde_hop(inner, x, t=("outer",))[0]

    x = torch.randn(3)
    loaded = round_trip(torch.export.export(M(), (x,)))
    configs = sorted((repr(dict(n.kwargs)) for n in hop_nodes(loaded.graph_module, serde_hop)))
    assert configs == ["{'color': <Color.RED: 1>, 't': (1,)}", "{'t': ('outer',)}"]
    for node in hop_nodes(loaded.graph_module, serde_hop):
        assert all(type(v) is not list for v in node.kwargs.values())
        assert "custom" not in node.meta
    torch.testing.assert_close(loaded.module()(x), x.sin() * 2 * 3)


def test_users_custom_metadata_is_kept_and_the_record_removed() -> None:
    ep = exported(("a",))
    (node,) = hop_nodes(ep.graph_module, serde_hop)
    node.meta["custom"] = {"mine": [1, 2]}
    (loaded,) = hop_nodes(round_trip(ep).graph_module, serde_hop)
    assert loaded.meta["custom"] == {"mine": [1, 2]}
    assert node.meta["custom"] == {"mine": [1, 2]}  # the saved program unchanged


# ---------------------------------------------------------------------------
# What the saved file records
# ---------------------------------------------------------------------------


def test_saved_file_records_hop_class_module_and_format() -> None:
    nodes = serialized_nodes(saved_json(exported(("a", "b")))["graph_module"]["graph"])
    (node,) = [n for n in nodes if n["target"] == "torch.ops.higher_order.hopkit_test_serde"]
    record = json.loads(node["metadata"]["custom"])["hopkit"]
    record["hopkit"] = "<version>"
    assert_expected_inline(json.dumps(record, sort_keys=True), """{"class": "SerdeHop", "format": 1, "hop": "hopkit_test_serde", "hopkit": "<version>", "kwargs": {"cfg": {"tuple": ["a", "b"]}}, "leading": [], "module": "test_serialization"}""")  # noqa: E501
    # The node's own argument holds the encoding as a string, for tools
    # reading the file without hopkit; its target is torch's usual one.
    (cfg,) = [i for i in node["inputs"] if i["name"] == "cfg"]
    assert_expected_inline(json.dumps(cfg["arg"]), """{"as_string": "{\\"tuple\\": [\\"a\\", \\"b\\"]}"}""")


def test_programs_without_hopkit_nodes_serialize_as_torch_does() -> None:
    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cond(x.sum() > 0, lambda t: t + 1, lambda t: t - 1, (x,))

    ep = torch.export.export(M(), (torch.randn(3),))
    assert serde.serialize is not _patch.original_of(serde.serialize)  # the wrapper is live
    ours = serde.serialize(ep).exported_program
    torchs = _patch.original_of(serde.serialize)(ep).exported_program
    assert ours == torchs
    x = torch.randn(3)
    torch.testing.assert_close(round_trip(ep).module()(x), ep.module()(x))


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_a_program_in_a_newer_format_is_refused_naming_both_versions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_serialization, "_hopkit_version", lambda: "9.9.9")
    buf = io.BytesIO()
    monkeypatch.setattr(_serialization, "FORMAT_VERSION", 2)
    torch.export.save(exported(("a",)), buf)
    monkeypatch.setattr(_serialization, "FORMAT_VERSION", 1)
    monkeypatch.setattr(_serialization, "_hopkit_version", lambda: "0.1.0")
    buf.seek(0)
    with pytest.raises(_serialization.SavedFormatError) as e:
        torch.export.load(buf)
    assert_expected_inline(str(e.value), """hopkit: the saved program's node torch.ops.higher_order.hopkit_test_serde was written by hopkit 9.9.9 in hopkit's serialization format 2, but this hopkit 0.1.0 reads formats 1 to 1; load it with hopkit 9.9.9 or newer, or export and save the program again with this hopkit.""")  # noqa: E501


def test_a_hop_name_taken_by_another_class_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from hopkit.base_hop import _names

    buf = io.BytesIO()
    torch.export.save(exported(("a",)), buf)
    buf.seek(0)
    monkeypatch.setattr(_names, "registered_hop", lambda name: wrap_with_autocast)
    with pytest.raises(_serialization.HopNotLoadedError) as e:
        torch.export.load(buf)
    assert_expected_inline(str(e.value), """hopkit: the saved program calls torch.ops.higher_order.hopkit_test_serde, a HOP of class SerdeHop from module test_serialization, but that name belongs to hopkit.export._autocast_hop.WrapWithAutocast in this process; import test_serialization instead of the module defining the other HOP of that name.""")  # noqa: E501


def test_a_config_class_missing_from_its_module_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    torch.export.save(exported(Color.RED), buf)
    buf.seek(0)
    monkeypatch.delattr(sys.modules[__name__], "Color")
    with pytest.raises(_serialization.HopNotLoadedError) as e:
        torch.export.load(buf)
    assert_expected_inline(str(e.value), """hopkit: the saved program's config of torch.ops.higher_order.hopkit_test_serde holds an enum of class Color from module test_serialization, but the imported test_serialization has no class Color; import the version of test_serialization the program was saved with.""")  # noqa: E501


def test_saving_a_config_class_defined_in_a_function_is_refused() -> None:
    class Local(enum.Enum):
        A = 1

    with pytest.raises(TypeError) as e:
        torch.export.save(exported(Local.A), io.BytesIO())
    assert_expected_inline(str(e.value), """hopkit: torch.export.save cannot save the config kwarg 'cfg' of torch.ops.higher_order.hopkit_test_serde: its class test_serialization.test_saving_a_config_class_defined_in_a_function_is_refused.<locals>.Local is defined inside a function, so a process loading the program could never find it; define the class at module level.""")  # noqa: E501


def test_saving_an_unsupported_config_value_is_refused() -> None:
    with pytest.raises(TypeError) as e:
        torch.export.save(exported(b"bytes"), io.BytesIO())
    assert_expected_inline(str(e.value), """hopkit: torch.export.save cannot save the config kwarg 'cfg' of torch.ops.higher_order.hopkit_test_serde, a builtins.bytes: hopkit saves configuration that is str, int, float, bool, None, complex, torch.dtype, torch.device, an enum, or a tuple, list, named tuple or dataclass of those; pass one of those.""")  # noqa: E501


# ---------------------------------------------------------------------------
# A fresh process
# ---------------------------------------------------------------------------

HOP_MODULE = '''
import torch, hopkit

class FreshHop(hopkit.BaseHOP):
    def __init__(self):
        super().__init__("hopkit_test_serde_fresh")

fresh_hop = FreshHop()
'''
CONFIG_MODULE = '''
import enum

class Mode(enum.Enum):
    FAST = "fast"
'''


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), *sys.path])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)


@pytest.fixture(scope="module")
def saved_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a HOP module, a config module and a program saved using both."""
    root = tmp_path_factory.mktemp("fresh")
    (root / "hopdef_serde.py").write_text(HOP_MODULE)
    (root / "cfgdef_serde.py").write_text(CONFIG_MODULE)
    out = _run('''
        import torch, hopkit
        from hopdef_serde import fresh_hop
        from cfgdef_serde import Mode
        body = hopkit.FunctionWithNoFreeVars(lambda x: (x.cos(),))
        class M(torch.nn.Module):
            def forward(self, x):
                return fresh_hop(body, x, speed=Mode.FAST, sizes=(1, 2))[0]
        torch.export.save(torch.export.export(M(), (torch.ones(2),)), "program.pt2")
    ''', root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


@pytest.mark.slow
def test_fresh_process_names_the_module_to_import(saved_elsewhere: Path) -> None:
    # Something hopkit-specific (here hopkit.export's HOP) exists, the HOP's
    # and the config's defining modules are not imported.
    out = _run('''
        import torch, hopkit, hopkit.export, sys
        from hopkit._serialization import HopNotLoadedError
        for step in ("nothing", "hopdef_serde", "cfgdef_serde"):
            if step != "nothing":
                __import__(step)
            try:
                ep = torch.export.load("program.pt2")
            except HopNotLoadedError as e:
                print(f"{step}: {type(e).__name__}: {e}")
                continue
            (node,) = [n for n in ep.graph.nodes if "fresh" in str(n.target)]
            print(f"{step}: loaded {dict(node.kwargs)} {ep.module()(torch.zeros(2))}")
        print("imported at the end:", [m for m in ("hopdef_serde", "cfgdef_serde")
                                         if m in sys.modules])
    ''', saved_elsewhere)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_expected_inline(out.stdout.strip(), """\
nothing: HopNotLoadedError: hopkit: the saved program calls torch.ops.higher_order.hopkit_test_serde_fresh, a hopkit HOP of class FreshHop from module hopdef_serde, which this process has not created; import hopdef_serde (so that its FreshHop instance exists) before torch.export.load. hopkit never imports a module a saved file names.
hopdef_serde: HopNotLoadedError: hopkit: the saved program's config of torch.ops.higher_order.hopkit_test_serde_fresh holds an enum of class Mode from module cfgdef_serde, which this process has not imported; import cfgdef_serde before torch.export.load (hopkit never imports a module a saved file names).
cfgdef_serde: loaded {'speed': <Mode.FAST: 'fast'>, 'sizes': (1, 2)} tensor([1., 1.])
imported at the end: ['hopdef_serde', 'cfgdef_serde']""")  # noqa: E501


@pytest.mark.slow
def test_fresh_process_with_only_import_hopkit_shows_the_record(saved_elsewhere: Path) -> None:
    # `import hopkit` changes nothing in torch (tests/test_architecture.py), so
    # torch's own loader fails; the message it logs names module and class.
    out = _run('''
        import torch, hopkit
        from hopkit import _patch
        try:
            torch.export.load("program.pt2")
        except RuntimeError as e:
            print("torch:", str(e).splitlines()[0].rstrip())
        print(_patch.live_patches())
    ''', saved_elsewhere)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_expected_inline(out.stdout.strip(), """\
torch: We ran into an error when deserializing the saved file. Please check the warnings above for possible errors.
[]""")  # noqa: E501
    assert '\\"module\\": \\"hopdef_serde\\", \\"class\\": \\"FreshHop\\"' in out.stderr \
        or '"module": "hopdef_serde", "class": "FreshHop"' in out.stderr, out.stderr[-3000:]


# ---------------------------------------------------------------------------
# Effect tokens
# ---------------------------------------------------------------------------


def test_program_with_effect_tokens_round_trips() -> None:
    from hopkit.effects import EffectType, register_effectful_op, with_effects

    calls: list[float] = []

    @torch.library.custom_op("hopkit_test_serde::log", mutates_args=())
    def log(x: torch.Tensor) -> torch.Tensor:
        calls.append(float(x.sum()))
        return x.clone()

    log.register_fake(lambda x: torch.empty_like(x))
    body = hopkit.FunctionWithNoFreeVars(lambda x: (log(x) * 2,))

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return serde_hop(body, log(x + 1), t=(1,))[0]

    handle = register_effectful_op(torch.ops.hopkit_test_serde.log.default, EffectType.ORDERED)
    try:
        x = torch.ones(2)
        ep = torch.export.export(M(), (x,)).run_decompositions()
        loaded = round_trip(ep)
    finally:
        handle.destroy()
    targets = [n.target for n in loaded.graph.nodes if n.op == "call_function"]
    assert targets.count(with_effects) == 2, targets
    # The HOP runs inside its with_effects call; its config comes back exact.
    (node,) = [n for n in loaded.graph.nodes if n.target is with_effects and n.args[1] is serde_hop]
    assert exact(dict(node.kwargs), {"t": (1,)}) and "custom" not in node.meta
    calls.clear()
    torch.testing.assert_close(loaded.module()(x), (x + 1) * 2)
    assert calls == [4.0, 4.0]
