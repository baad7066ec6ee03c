"""BaseHOP configuration of every kind, in every mode (NOTE [BaseHOP configuration values])."""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Callable
from typing import Any

import pytest
import torch
from expecttest import assert_expected_inline
from torch._dynamo.testing import EagerAndRecordGraphs
from torch.fx.experimental.proxy_tensor import make_fx

import hopkit


class ConfigHop(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_test_config_hop")


config_hop = ConfigHop()


class LeadingHop(hopkit.BaseHOP):
    leading_config = ("setting",)

    def __init__(self) -> None:
        super().__init__("hopkit_test_config_leading_hop")


leading_hop = LeadingHop()


class Scheme(enum.Enum):
    NF4 = "nf4"
    INT8 = 8


Pair = collections.namedtuple("Pair", ["bits", "name"])


@dataclasses.dataclass(frozen=True)
class Quant:
    bits: int = 4
    scheme: Scheme = Scheme.NF4
    dtype: torch.dtype = torch.bfloat16
    device: torch.device = torch.device("cpu")
    sizes: tuple[int, ...] = (1, 2)
    scale: float = float("inf")


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Quant = Quant()
    tag: str | None = None


CONFIGS: dict[str, Any] = {
    "str": "nf4", "int": 3, "float": 0.5, "bool": True, "none": None,
    "dtype": torch.float16, "device": torch.device("cpu"), "enum": Scheme.INT8,
    "tuple": (1, "a", torch.float16, Scheme.NF4), "list": [1, 2.0],
    "namedtuple": Pair(4, "q"), "dataclass": Quant(), "nested_dataclass": Outer(tag="t"),
}


def body(x: torch.Tensor) -> tuple[torch.Tensor]:
    return (x.sin() * 2,)


BODY = hopkit.FunctionWithNoFreeVars(body)


def same(got: Any, want: Any) -> None:
    """Equal and of the same type (FX keeps a list as its list subclass)."""
    assert got == want
    if isinstance(want, list):
        assert isinstance(got, list)
    else:
        assert type(got) is type(want)


def hop_nodes(gm: torch.fx.GraphModule, hop: Any = config_hop) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is hop]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eager_and_make_fx(name: str) -> None:
    cfg = CONFIGS[name]
    x = torch.randn(3, requires_grad=True)
    out = config_hop(BODY, x, cfg=cfg)[0]
    torch.testing.assert_close(out, body(x)[0])
    for mode in ("real", "fake", "symbolic"):
        gm = make_fx(lambda t: config_hop(BODY, t, cfg=cfg)[0], tracing_mode=mode)(x)
        (node,) = hop_nodes(gm)
        same(node.kwargs["cfg"], cfg)
        torch.testing.assert_close(gm(x), body(x)[0])


# Inductor compiles are slow: the structured kinds there, every kind elsewhere.
COMPILE_CASES = [(b, n) for b in ("eager", "aot_eager") for n in CONFIGS] + [
    ("inductor", n) for n in ("enum", "tuple", "namedtuple", "dataclass")]


@pytest.mark.parametrize(("backend", "name"), COMPILE_CASES)
def test_compile(name: str, backend: str) -> None:
    cfg = CONFIGS[name]
    torch._dynamo.reset()
    x = torch.randn(3, requires_grad=True)
    fn = torch.compile(lambda t: config_hop(body, t, cfg=cfg)[0], backend=backend, fullgraph=True)
    out = fn(x)
    out.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    body(x_ref)[0].sum().backward()
    torch.testing.assert_close(out, body(x_ref)[0])
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_dynamo_graph_carries_the_values_as_they_are() -> None:
    backend = EagerAndRecordGraphs()
    cfg = Quant(bits=8)
    x = torch.randn(3)
    torch.compile(lambda t: config_hop(body, t, cfg=cfg, pair=Pair(1, "a"))[0],
                  backend=backend, fullgraph=True)(x)
    (gm,) = backend.graphs
    (node,) = hop_nodes(gm)
    same(node.kwargs["cfg"], cfg)
    same(node.kwargs["pair"], Pair(1, "a"))
    # No constructor nodes: the values are constants of the HOP node.
    assert [n.op for n in gm.graph.nodes if n.op == "call_function"] == ["call_function"] * 2


def test_dataclass_built_inside_the_compiled_frame() -> None:
    backend = EagerAndRecordGraphs()
    x = torch.randn(3)
    out = torch.compile(lambda t: config_hop(body, t, cfg=Quant(bits=2))[0],
                        backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, body(x)[0])
    same(hop_nodes(backend.graphs[0])[0].kwargs["cfg"], Quant(bits=2))


def test_leading_config_of_any_kind() -> None:
    x = torch.randn(3)
    for cfg in (Quant(), Pair(1, "a"), (1, 2)):
        gm = make_fx(lambda t: leading_hop(cfg, BODY, t)[0], tracing_mode="fake")(x)
        (node,) = hop_nodes(gm, leading_hop)
        same(node.args[0], cfg)
        torch._dynamo.reset()
        out = torch.compile(lambda t: leading_hop(cfg, body, t)[0], backend="aot_eager",
                            fullgraph=True)(x)
        torch.testing.assert_close(out, body(x)[0])


class Model(torch.nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return config_hop(BODY, x, cfg=self.cfg)[0]


@pytest.mark.parametrize("name", ["enum", "tuple", "list", "namedtuple", "dataclass",
                                  "nested_dataclass"])
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_export_and_run_decompositions(name: str, strict: bool) -> None:
    cfg = CONFIGS[name]
    x = torch.randn(3)
    ep = torch.export.export(Model(cfg), (x,), strict=strict)
    for program in (ep, ep.run_decompositions()):
        (node,) = hop_nodes(program.graph_module)
        same(node.kwargs["cfg"], cfg)
        torch.testing.assert_close(program.module()(x), body(x)[0])


def test_graph_code_writes_a_dataclass() -> None:
    gm = make_fx(lambda t: config_hop(BODY, t, cfg=Outer(tag="t"))[0], tracing_mode="fake")(
        torch.randn(3))
    (line,) = [ln.strip() for ln in gm.code.splitlines() if "hopkit_test_config_hop(" in ln]
    assert_expected_inline(line, """hopkit_test_config_hop = torch.ops.higher_order.hopkit_test_config_hop(subgraph_0, t_1, cfg = test_config_Outer(inner=test_config_Quant(bits=4, scheme=test_config_Scheme['NF4'], dtype=torch.bfloat16, device=torch.device('cpu'), sizes=(1, 2), scale=float('inf')), tag='t'));  subgraph_0 = t_1 = None""")


def test_gen_schema_of_every_kind() -> None:
    x = torch.randn(3)
    schemas = [str(config_hop.gen_schema(BODY, x, cfg=cfg)).split("*, ")[1]
               for cfg in ((1, 2), [1.0, 2.0], ("a", (1, True)), Scheme.NF4, Pair(1, "a"),
                           Quant(bits=2), "s", torch.float16)]
    assert_expected_inline("\n".join(schemas), """\
(int, int) cfg=(1, 2)) -> ((Tensor))
float[] cfg=[1., 2.]) -> ((Tensor))
(str, (int, bool)) cfg=(a, (1, True))) -> ((Tensor))
Any cfg=test_config_Scheme['NF4']) -> ((Tensor))
Any cfg=test_config_Pair(1, 'a')) -> ((Tensor))
Any cfg=test_config_Quant(bits=2, scheme=test_config_Scheme['NF4'], dtype=torch.bfloat16, device=torch.device('cpu'), sizes=(1, 2), scale=float('inf'))) -> ((Tensor))
str cfg="s") -> ((Tensor))
int cfg=5) -> ((Tensor))""")


# ---------------------------------------------------------------------------
# Refusals, at the call, eager and compiled
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Mutable:
    bits: int = 4


class Opaque:
    pass


def error_of(fn: Callable[[], Any], exc: type[BaseException] = Exception) -> str:
    with pytest.raises(exc) as info:
        fn()
    return str(info.value)


def refusal(cfg: Any) -> str:
    return error_of(lambda: config_hop(BODY, torch.randn(2), cfg=cfg), TypeError)


def test_refuse_a_tensor() -> None:
    assert_expected_inline(refusal(torch.ones(2)), """\
hopkit: hopkit_test_config_hop's configuration cfg is a Tensor, which configuration cannot be; tensors are operands: pass it after the subgraph (hop(subgraph, x, t)) and read it there.""")


def test_refuse_a_lambda() -> None:
    assert_expected_inline(refusal(lambda: 1), """\
hopkit: hopkit_test_config_hop's configuration cfg is a function, a callable, which configuration cannot be; a HOP's only function is its subgraph: call this one inside the subgraph, or pass the setting it stands for (a str or an enum) as configuration.""")


def test_refuse_a_module() -> None:
    assert_expected_inline(refusal(torch.nn.Linear(2, 2)), """\
hopkit: hopkit_test_config_hop's configuration cfg is a Linear, which configuration cannot be; pass its parameters and buffers as operands and call the module inside the subgraph.""")


def test_refuse_an_object_with_no_stable_value() -> None:
    assert_expected_inline(refusal(Opaque()), """\
hopkit: hopkit_test_config_hop's configuration cfg is a Opaque, not a value hopkit can record on the graph and compare across calls; pass plain values (str, int, float, bool, None, torch.dtype, torch.device, an enum, a tuple or list of those, or a frozen dataclass or named tuple of those).""")


def test_refuse_a_mutable_dataclass() -> None:
    assert_expected_inline(refusal(Mutable()), """\
hopkit: hopkit_test_config_hop's configuration cfg is a Mutable, a dataclass that is not frozen, so its value could change after the call was recorded; declare it @dataclasses.dataclass(frozen=True), or pass dataclasses.astuple(cfg) (a tuple).""")


def test_refuse_nested_values_with_their_path() -> None:
    assert_expected_inline(refusal((1, [2, torch.ones(1)])), """\
hopkit: hopkit_test_config_hop's configuration cfg[1][1] is a Tensor, which configuration cannot be; tensors are operands: pass it after the subgraph (hop(subgraph, x, t)) and read it there.""")
    assert_expected_inline(refusal(Pair(1, Scheme.NF4)), """\
hopkit: hopkit_test_config_hop's configuration cfg.name is a Scheme, inside a named tuple, which torch.fx writes into generated code with plain repr(), so a value whose repr is not Python source cannot be carried there; make the configuration a frozen dataclass (@dataclasses.dataclass(frozen=True)) instead of a named tuple, or pass this value as a configuration argument of its own.""")


def test_refuse_leading_config_by_its_name() -> None:
    assert_expected_inline(
        error_of(lambda: leading_hop(torch.ones(1), BODY, torch.randn(2)), TypeError), """\
hopkit: hopkit_test_config_leading_hop's configuration setting is a Tensor, which configuration cannot be; tensors are operands: pass it after the subgraph (hop(subgraph, x, t)) and read it there.""")


@pytest.mark.parametrize("kind", ["tensor", "lambda", "module", "mutable"])
def test_refusals_inside_compile(kind: str) -> None:
    from torch._dynamo.exc import UserError

    x = torch.randn(2)
    w = torch.ones(2)
    lin = torch.nn.Linear(2, 2)
    make = {"tensor": lambda: w, "lambda": lambda: (lambda: 1), "module": lambda: lin,
            "mutable": lambda: Mutable()}[kind]

    def fn(t: torch.Tensor) -> torch.Tensor:
        return config_hop(body, t, cfg=make())[0]

    torch._dynamo.reset()
    msg = error_of(lambda: torch.compile(fn, backend="eager", fullgraph=True)(x), UserError)
    first = msg.splitlines()[0]
    expected = {
        "tensor": "hopkit: hopkit_test_config_hop's configuration cfg is a Tensor, which configuration cannot be; tensors are operands: pass it after the subgraph (hop(subgraph, x, t)) and read it there.",
        "lambda": "hopkit: hopkit_test_config_hop's configuration cfg is a function, a callable, which configuration cannot be; a HOP's only function is its subgraph: call this one inside the subgraph, or pass the setting it stands for (a str or an enum) as configuration.",
        "module": "hopkit: hopkit_test_config_hop's configuration cfg is a Linear, which configuration cannot be; pass its parameters and buffers as operands and call the module inside the subgraph.",
        "mutable": "hopkit: hopkit_test_config_hop's configuration cfg is a Mutable, a dataclass that is not frozen, so its value could change after the call was recorded; declare it @dataclasses.dataclass(frozen=True), or pass dataclasses.astuple(cfg) (a tuple).",
    }[kind]
    assert first == expected


def test_codegen_patch_only_on_use_and_narrow() -> None:
    # Installed by the first dataclass config; a dataclass FX writes in a
    # graph without hopkit is left to torch (a constructor node).
    live = {p.key for p in hopkit._patch.live_patches()}
    assert any(k.startswith("torch.fx.graph.") for k in live)

    @dataclasses.dataclass(frozen=True)
    class Unrelated:
        a: int = 1

    tracer = torch.fx.proxy.GraphAppendingTracer(torch.fx.Graph())
    node = tracer.create_arg(Unrelated())
    assert isinstance(node, torch.fx.Node) and node.target is Unrelated
