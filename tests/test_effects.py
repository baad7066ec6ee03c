"""hopkit.effects: ordering, liveness and exactly-once of effectful ops, SPEC §2.

The effectful op records a tag into ``LOG`` from its Python implementation,
which runs only on real tensors (never under fake tracing), so ``LOG`` is the
exact sequence of side effects that happened.
"""

from __future__ import annotations

import io
import itertools
import operator
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from expecttest import assert_expected_inline
from torch._dynamo.testing import AotEagerAndRecordGraphs
from torch.fx.experimental.proxy_tensor import make_fx
from torch.testing import FileCheck

from hopkit.effects import _hop, _registry
from hopkit.effects import (
    EffectType,
    get_effect,
    handle_effects,
    has_aliasing,
    has_effects,
    new_token_tensor,
    register_effectful_op,
    with_effects,
)

NS = "hopkit_test_effects"
LOG: list[Any] = []


def _log(x: torch.Tensor, tag: int) -> torch.Tensor:
    LOG.append(tag)
    return x.clone()


def _log_nothing(x: torch.Tensor, tag: int) -> None:
    LOG.append(tag)


def _log_pair(x: torch.Tensor, tag: int) -> tuple[torch.Tensor, torch.Tensor]:
    LOG.append(tag)
    return x.clone(), x + 1


def _log_list(x: torch.Tensor, tag: int) -> list[torch.Tensor]:
    LOG.append(tag)
    return [x.clone(), x * 2]


_lib = torch.library.Library(NS, "FRAGMENT")
_lib.define("log(Tensor x, int tag) -> Tensor")
_lib.define("log_nothing(Tensor x, int tag) -> ()")
_lib.define("log_pair(Tensor x, int tag) -> (Tensor, Tensor)")
_lib.define("log_list(Tensor x, int tag) -> Tensor[]")
_lib.define("unregistered(Tensor x, int tag) -> Tensor")
_lib.define("mutates(Tensor(a!) x) -> ()")
_lib.define("aliases(Tensor(a) x) -> Tensor(a)")
_lib.define("implicit(Tensor x) -> Tensor")
_lib.define("overloaded(Tensor x) -> Tensor")
_lib.define("overloaded.out(Tensor x, *, Tensor(a!) out) -> Tensor(a!)")
for _name, _fn in [("log", _log), ("log_nothing", _log_nothing), ("log_pair", _log_pair),
                   ("log_list", _log_list), ("unregistered", _log)]:
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")
_lib.impl("implicit", lambda x: x.clone(), "CompositeImplicitAutograd")
torch.library.register_fake(f"{NS}::log", lambda x, tag: torch.empty_like(x), lib=_lib)
torch.library.register_fake(f"{NS}::unregistered", lambda x, tag: torch.empty_like(x), lib=_lib)
torch.library.register_fake(f"{NS}::log_nothing", lambda x, tag: None, lib=_lib)
torch.library.register_fake(
    f"{NS}::log_pair", lambda x, tag: (torch.empty_like(x), torch.empty_like(x)), lib=_lib
)
torch.library.register_fake(
    f"{NS}::log_list", lambda x, tag: [torch.empty_like(x), torch.empty_like(x)], lib=_lib
)
torch.library.register_autograd(f"{NS}::log", lambda ctx, g: (g, None), lib=_lib)

log = torch.ops.hopkit_test_effects.log.default
log_nothing = torch.ops.hopkit_test_effects.log_nothing.default
log_pair = torch.ops.hopkit_test_effects.log_pair.default
log_list = torch.ops.hopkit_test_effects.log_list.default


@pytest.fixture(scope="module", autouse=True)
def _destroy_library() -> Iterator[None]:
    try:
        yield
    finally:
        _lib._destroy()


@pytest.fixture(autouse=True)
def _clear_log() -> Iterator[None]:
    LOG.clear()
    yield
    LOG.clear()


@pytest.fixture
def ordered() -> Iterator[None]:
    """The logging ops registered ORDERED for the duration of one test."""
    handles = [register_effectful_op(op, EffectType.ORDERED)
               for op in (log, log_nothing, log_pair, log_list)]
    try:
        yield
    finally:
        for h in reversed(handles):
            h.destroy()


def normalize(code: str) -> str:
    return re.sub(r"\n\s*\n", "\n", code).strip()


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def test_register_get_and_destroy() -> None:
    assert get_effect(log) is None and not has_effects(log)
    h = register_effectful_op(log, EffectType.ORDERED)
    try:
        assert get_effect(log) is EffectType.ORDERED and has_effects(log)
        assert _registry.is_side_effectful(log)  # FX DCE keeps unused calls
    finally:
        h.destroy()
    assert get_effect(log) is None and not has_effects(log)
    assert not _registry.is_side_effectful(log)
    h.destroy()  # a second destroy does nothing


def test_destroy_restores_the_previous_registration() -> None:
    first = register_effectful_op(log, EffectType.ORDERED)
    try:
        second = register_effectful_op(log, None)  # declare it effect-free
        assert get_effect(log) is None and not has_effects(log)
        second.destroy()
        assert get_effect(log) is EffectType.ORDERED
        assert _registry.is_side_effectful(log)
    finally:
        first.destroy()
    assert get_effect(log) is None


@pytest.mark.parametrize("order", ["creation_order", "reverse_order"])
def test_two_registrations_of_one_op_destroyed_in_any_order(order: str) -> None:
    h1 = register_effectful_op(log, EffectType.ORDERED)
    h2 = register_effectful_op(log, EffectType.ORDERED)
    first, second = (h1, h2) if order == "creation_order" else (h2, h1)
    try:
        first.destroy()
        first.destroy()  # a second destroy does nothing
        assert get_effect(log) is EffectType.ORDERED and has_effects(log)
        assert _registry.is_side_effectful(log)
        second.destroy()
        assert get_effect(log) is None and not has_effects(log)
        assert not _registry.is_side_effectful(log)
        assert f"{NS}::log.default" not in get_effect.__globals__["_REGISTRY"]
    finally:
        h1.destroy()
        h2.destroy()


# An overload registration, a packet-wide one, and one declaring the overload
# effect-free: see NOTE [A stack of registrations per op] in hopkit/effects/_registry.py.
_STACKED = [(lambda: log, EffectType.ORDERED), (lambda: f"{NS}::log", EffectType.ORDERED),
            (lambda: log, None)]


@pytest.mark.parametrize("order", list(itertools.permutations(range(len(_STACKED)))),
                         ids=lambda order: "destroy_" + "".join(map(str, order)))
@pytest.mark.parametrize("was_side_effectful", [False, True],
                         ids=["plain", "already_side_effectful"])
def test_handles_destroyed_in_any_order_restore_the_state_before(
    order: tuple[int, ...], was_side_effectful: bool
) -> None:
    registry = get_effect.__globals__["_REGISTRY"]
    before = dict(registry)
    _registry.set_side_effectful(log, was_side_effectful)
    handles = [register_effectful_op(ident(), effect) for ident, effect in _STACKED]
    try:
        active = list(range(len(_STACKED)))
        for i in order:
            handles[i].destroy()
            active.remove(i)
            # As if only the active registrations had been made, in their
            # order: the newest of the overload's own, else of the packet's.
            own = [_STACKED[j][1] for j in active if _STACKED[j][0]() is log]
            packet = [_STACKED[j][1] for j in active if _STACKED[j][0]() is not log]
            assert get_effect(log) is (own or packet or [None])[-1]
            assert _registry.is_side_effectful(log) == (
                was_side_effectful or any(_STACKED[j][1] is not None for j in active))
        assert dict(registry) == before
        assert _registry.is_side_effectful(log) == was_side_effectful
    finally:
        for h in handles:
            h.destroy()
        _registry.set_side_effectful(log, False)


@pytest.mark.parametrize(
    "ident",
    [
        pytest.param(lambda: log, id="OpOverload"),
        pytest.param(lambda: torch.ops.hopkit_test_effects.log, id="OpOverloadPacket"),
        pytest.param(lambda: f"{NS}::log", id="qualname"),
        pytest.param(lambda: f"{NS}::log.default", id="qualname_with_overload"),
    ],
)
def test_register_accepts_every_op_identifier(ident: Callable[[], Any]) -> None:
    h = register_effectful_op(ident(), EffectType.ORDERED)
    try:
        assert get_effect(log) is EffectType.ORDERED
        assert get_effect(ident()) is EffectType.ORDERED
    finally:
        h.destroy()
    assert get_effect(log) is None


def test_register_accepts_custom_op_objects_and_hops() -> None:
    @torch.library.custom_op("hopkit_test_effects_custom::note", mutates_args=())
    def note(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    class ToyHOP(torch._ops.HigherOrderOperator):
        def __init__(self) -> None:
            super().__init__("hopkit_test_effects_toy")

        def __call__(self, *args: Any) -> Any:
            return super().__call__(*args)

    toy = ToyHOP()
    try:
        handles = [register_effectful_op(note, EffectType.ORDERED),
                   register_effectful_op(toy, EffectType.ORDERED)]
        assert get_effect(torch.ops.hopkit_test_effects_custom.note.default) is EffectType.ORDERED
        assert has_effects(note) and not has_aliasing(note)  # the object stands for its overload
        assert get_effect(toy) is EffectType.ORDERED
        assert get_effect("higher_order::hopkit_test_effects_toy") is EffectType.ORDERED
        for h in reversed(handles):
            h.destroy()
        assert get_effect(toy) is None
    finally:
        note._lib._destroy()
        torch._ops._higher_order_ops.pop("hopkit_test_effects_toy", None)


def test_torch_own_effects_are_reported_and_can_be_overridden() -> None:
    assert get_effect(torch.ops.aten._print.default) is EffectType.ORDERED
    h = register_effectful_op("aten::_print", None)
    try:
        assert get_effect(torch.ops.aten._print.default) is None
    finally:
        h.destroy()
    assert has_effects(torch.ops.aten._print.default)


def test_has_aliasing() -> None:
    assert not has_aliasing(log)
    assert has_aliasing(torch.ops.hopkit_test_effects.mutates.default)
    assert has_aliasing(torch.ops.aten.add_.Tensor)
    assert not has_aliasing(with_effects)


def _error(fn: Callable[[], Any], exc: type[Exception] = ValueError) -> str:
    before = (dict(get_effect.__globals__["_REGISTRY"]), set(torch.fx.node._side_effectful_functions))
    with pytest.raises(exc) as info:
        fn()
    after = (dict(get_effect.__globals__["_REGISTRY"]), set(torch.fx.node._side_effectful_functions))
    assert before == after, "nothing is registered when registration fails"
    return str(info.value)


def test_error_unknown_op() -> None:
    assert_expected_inline(
        _error(lambda: register_effectful_op(f"{NS}::nope")),
        """hopkit: unknown operator 'hopkit_test_effects::nope': no op hopkit_test_effects::nope is defined; define it first (torch.library.custom_op or torch.library.Library(...).define) or load the library that does.""",
    )


def test_error_unknown_overload() -> None:
    assert_expected_inline(
        _error(lambda: register_effectful_op(f"{NS}::log.nope")),
        """hopkit: unknown operator 'hopkit_test_effects::log.nope': hopkit_test_effects::log has no overload 'nope' (it has ['default']); use one of those, or 'ns::name' for every overload.""",
    )


def test_error_unqualified_name() -> None:
    assert_expected_inline(
        _error(lambda: register_effectful_op("log")),
        """hopkit: 'log' is not a qualified op name; write it as 'namespace::name' or 'namespace::name.overload' (e.g. 'mylib::log').""",
    )


def test_error_unknown_hop() -> None:
    assert_expected_inline(
        _error(lambda: register_effectful_op("higher_order::hopkit_no_such_hop")),
        """hopkit: no HigherOrderOperator named 'higher_order::hopkit_no_such_hop'; create the HOP before registering it, or pass the HOP object.""",
    )


def test_error_not_an_op() -> None:
    assert_expected_inline(
        _error(lambda: register_effectful_op(print), TypeError),
        """hopkit: register_effectful_op(op, effect) expects op to be an OpOverload (torch.ops.mylib.log.default), an OpOverloadPacket, a torch.library.custom_op object, a HigherOrderOperator or a qualified name string ('mylib::log'), but got builtin_function_or_method <built-in function print>; pass the op itself or its name.""",
    )


def test_error_bad_effect() -> None:
    assert_expected_inline(
        _error(lambda: register_effectful_op(log, "ORDERED"), TypeError),
        """hopkit: register_effectful_op(op, effect) expects effect to be an EffectType (e.g. EffectType.ORDERED) or None, but got str 'ORDERED'; pass EffectType.ORDERED, or None to declare the op effect-free.""",
    )


def test_error_get_effect_not_an_op() -> None:
    assert_expected_inline(
        _error(lambda: get_effect(5), TypeError),
        """hopkit: get_effect(op) expects op to be an OpOverload (torch.ops.mylib.log.default), an OpOverloadPacket, a torch.library.custom_op object, a HigherOrderOperator or a qualified name string ('mylib::log'), but got int 5; pass the op itself or its name.""",
    )
    assert_expected_inline(
        _error(lambda: get_effect("higher_order::hopkit_no_such_hop")),
        """hopkit: no HigherOrderOperator named 'higher_order::hopkit_no_such_hop'; create the HOP before asking for its effect, or pass the HOP object.""",
    )
    # Only registering with_effects itself is an error; asking is not.
    assert get_effect("higher_order::hopkit_with_effects") is None


def test_error_has_effects_and_has_aliasing_take_one_op() -> None:
    assert_expected_inline(
        _error(lambda: has_effects(f"{NS}::log"), TypeError),
        """hopkit: has_effects(op) expects op to be an OpOverload (torch.ops.mylib.log.default), a torch.library.custom_op object or a HigherOrderOperator (or another callable, which has no effects), but got str 'hopkit_test_effects::log'; pass one overload (torch.ops.mylib.log.default), or ask get_effect(op), which also takes a packet or an 'ns::name' string.""",
    )
    assert_expected_inline(
        _error(lambda: has_effects(5), TypeError),
        """hopkit: has_effects(op) expects op to be an OpOverload (torch.ops.mylib.log.default), a torch.library.custom_op object or a HigherOrderOperator (or another callable, which has no effects), but got int 5; pass the op itself.""",
    )
    assert_expected_inline(
        _error(lambda: has_aliasing(torch.ops.aten.add_), TypeError),
        """hopkit: has_aliasing(op) expects op to be an OpOverload (torch.ops.mylib.log.default), a torch.library.custom_op object or a HigherOrderOperator, but got OpOverloadPacket <OpOverloadPacket(op='aten.add_')>; pass one overload (torch.ops.mylib.log.default).""",
    )
    assert not has_effects(operator.getitem)  # an FX node target that is no op


def test_error_mutating_op() -> None:
    assert_expected_inline(
        _error(lambda: register_effectful_op(torch.ops.hopkit_test_effects.mutates.default)),
        """hopkit: cannot register hopkit_test_effects::mutates.default as effectful: its schema `hopkit_test_effects::mutates(Tensor(a!) x) -> ()` mutates argument 'x'. Effect tokens order functional ops only; make the op functional (torch.library.custom_op(..., mutates_args=()) returning new tensors), or register a functional overload instead.""",
    )


def test_error_aliasing_op() -> None:
    assert_expected_inline(
        _error(lambda: register_effectful_op(torch.ops.hopkit_test_effects.aliases.default)),
        """hopkit: cannot register hopkit_test_effects::aliases.default as effectful: its schema `hopkit_test_effects::aliases(Tensor(a) x) -> Tensor(a)` aliases argument 'x'. Effect tokens order functional ops only; make the op functional (torch.library.custom_op(..., mutates_args=()) returning new tensors), or register a functional overload instead.""",
    )


def test_error_packet_with_a_mutating_overload() -> None:
    # Registering every overload checks every overload; the functional one
    # alone can be registered.
    assert_expected_inline(
        _error(lambda: register_effectful_op(f"{NS}::overloaded")),
        """hopkit: cannot register hopkit_test_effects::overloaded as effectful (overload hopkit_test_effects::overloaded.out of hopkit_test_effects::overloaded): its schema `hopkit_test_effects::overloaded.out(Tensor x, *, Tensor(a!) out) -> Tensor(a!)` mutates argument 'out'. Effect tokens order functional ops only; make the op functional (torch.library.custom_op(..., mutates_args=()) returning new tensors), or register a functional overload instead.""",
    )
    register_effectful_op(f"{NS}::overloaded.default").destroy()


def test_error_composite_implicit_op() -> None:
    assert_expected_inline(
        _error(lambda: register_effectful_op(torch.ops.hopkit_test_effects.implicit.default)),
        """hopkit: cannot register hopkit_test_effects::implicit.default as effectful: it has a CompositeImplicitAutograd kernel, so it decomposes into other ops before tracing can see it and its effect would be lost. Register its kernel for CompositeExplicitAutograd or per backend (CPU, CUDA) instead, as torch.library.custom_op does.""",
    )


def test_error_registering_with_effects_itself() -> None:
    assert_expected_inline(
        _error(lambda: register_effectful_op(with_effects)),
        """hopkit: cannot register with_effects itself as effectful; register the op it wraps.""",
    )


# ---------------------------------------------------------------------------
# The HOP: dense, fake, proxy, functionalize, errors
# ---------------------------------------------------------------------------


def test_with_effects_dense_output_structure() -> None:
    x = torch.randn(3)
    token, out = with_effects(new_token_tensor(), log, x, 1)
    assert token.shape == (0,) and torch.equal(out, x)
    token, a, b = with_effects(token, log_pair, x, 2)  # a tuple is spread
    assert torch.equal(b, x + 1)
    token, lst = with_effects(token, log_list, x, 3)  # a list stays one output
    assert isinstance(lst, list) and len(lst) == 2
    token, nothing = with_effects(token, log_nothing, x, 4)
    assert nothing is None
    assert LOG == [1, 2, 3, 4]


def test_with_effects_fast_path_matches_dispatch() -> None:
    # Plain tensors, no mode: the fast path. HigherOrderOperator.__call__: full
    # dispatch (Autograd fallthrough, then the dense rule). Same results.
    x = torch.nn.Parameter(torch.randn(3))
    fast = with_effects(None, log_list, x, 1)
    slow = torch._ops.HigherOrderOperator.__call__(with_effects, new_token_tensor(), log_list, x, 2)
    assert fast[0].shape == slow[0].shape == (0,)
    torch.testing.assert_close(fast[1], slow[1])
    assert LOG == [1, 2]


def test_with_effects_under_fake_mode_runs_nothing() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(3))
        token, out = with_effects(new_token_tensor(), log, x, 1)
    assert out.shape == (3,) and type(out).__name__ == "FakeTensor"
    assert LOG == []


@pytest.mark.parametrize("tracing_mode", ["real", "fake", "symbolic"])
def test_with_effects_make_fx_is_one_node(tracing_mode: str) -> None:
    def f(token, x):  # type: ignore[no-untyped-def]  # annotations would show in gm.code
        return with_effects(token, log_pair, x, 1)

    gm = make_fx(f, tracing_mode=tracing_mode)(new_token_tensor(), torch.randn(3))
    assert_expected_inline(normalize(gm.code), """\
def forward(self, token_1, x_1):
    hopkit_with_effects = torch.ops.higher_order.hopkit_with_effects(token_1, torch.ops.hopkit_test_effects.log_pair.default, x_1, 1);  token_1 = x_1 = None
    getitem = hopkit_with_effects[0]
    getitem_1 = hopkit_with_effects[1]
    getitem_2 = hopkit_with_effects[2];  hopkit_with_effects = None
    return (getitem, getitem_1, getitem_2)""")


def test_with_effects_functionalize_and_autograd() -> None:
    x = torch.randn(3, requires_grad=True)
    out = torch.func.functionalize(lambda t, v: with_effects(t, log, v, 7)[1])(new_token_tensor(), x)
    out.sum().backward()  # autograd falls through to the op's own formula
    assert torch.equal(x.grad, torch.ones(3))
    assert LOG == [7]


def test_with_effects_under_vmap_and_grad() -> None:
    x = torch.randn(2, 3)
    out = torch.vmap(lambda v: with_effects(new_token_tensor(), torch.ops.aten.sin.default, v)[1])(x)
    torch.testing.assert_close(out, x.sin())
    sin = torch.ops.aten.sin.default
    g = torch.func.grad(lambda v: with_effects(new_token_tensor(), sin, v)[1].sum())(x[0])
    torch.testing.assert_close(g, x[0].cos())


def test_with_effects_bad_op() -> None:
    with pytest.raises(TypeError) as info:
        with_effects(new_token_tensor(), torch.ops.hopkit_test_effects.log, torch.randn(1), 1)
    assert_expected_inline(str(info.value), """hopkit: with_effects(token, op, *args) expects op to be an OpOverload (e.g. torch.ops.mylib.log.default) or a HigherOrderOperator, but got OpOverloadPacket <OpOverloadPacket(op='hopkit_test_effects.log')>; pass the overload, not the packet or a Python function.""")
    with pytest.raises(ValueError) as info2:
        with_effects(new_token_tensor(), torch.ops.aten.add_.Tensor, torch.randn(1), 1)
    assert_expected_inline(str(info2.value), """hopkit: with_effects cannot wrap aten::add_.Tensor: its schema `aten::add_.Tensor(Tensor(a!) self, Tensor other, *, Scalar alpha=1) -> Tensor(a!)` mutates or aliases an argument or output (effect tokens order functional ops only); make the op functional (mutates_args=(), fresh outputs).""")


@pytest.mark.parametrize("token", ["token", 0, {}, [new_token_tensor()]],
                         ids=["str", "int", "dict", "list"])
@pytest.mark.parametrize("tracing", ["eager", "make_fx"])
def test_with_effects_refuses_a_non_tensor_token(token: Any, tracing: str) -> None:
    def f(x: torch.Tensor) -> Any:
        return with_effects(token, log, x, 1)

    with pytest.raises(TypeError) as info:
        f(torch.randn(2)) if tracing == "eager" else make_fx(f)(torch.randn(2))
    assert f"but got {type(token).__name__} " in str(info.value)
    assert LOG == []  # refused before the op ran
    if token == "token":
        assert_expected_inline(str(info.value), """hopkit: with_effects(token, op, *args) expects token to be an effect token, a Tensor that carries no data and chains the effectful calls one after another, but got str 'token'; pass the token returned by new_token_tensor() or by the previous with_effects call (its first output).""")


def test_with_effects_accepts_an_fx_proxy_token() -> None:
    # torch.fx.symbolic_trace hands the token over as an fx.Proxy.
    gm = torch.fx.symbolic_trace(lambda token, x: with_effects(token, torch.ops.aten.sin.default, x))
    x = torch.randn(2)
    torch.testing.assert_close(gm(new_token_tensor(), x)[1], x.sin())


def test_handle_effects_refuses_bad_arguments(ordered: None) -> None:
    x = torch.zeros(2)
    assert_expected_inline(
        _error(lambda: handle_effects(True, None, log, (x, 1), {}), TypeError),  # type: ignore[arg-type]
        """hopkit: handle_effects(allow_token_discovery, tokens, op, args, kwargs) expects tokens to be a dict from EffectType to token tensor (as torch's handle_effects; e.g. FunctionalTensorMode's _tokens), but got NoneType None; pass the dict of current tokens ({} to start a chain, with allow_token_discovery=True), which handle_effects updates in place.""",
    )
    assert_expected_inline(
        _error(lambda: handle_effects(True, {}, f"{NS}::log", (x, 1), {}), TypeError),  # type: ignore[arg-type]
        """hopkit: handle_effects(allow_token_discovery, tokens, op, args, kwargs) expects op to be an OpOverload or a HigherOrderOperator, but got str 'hopkit_test_effects::log'; pass the op being called (e.g. torch.ops.mylib.log.default).""",
    )
    assert_expected_inline(
        _error(lambda: handle_effects(True, {}, log, x, {}), TypeError),  # type: ignore[arg-type]
        """hopkit: handle_effects(allow_token_discovery, tokens, op, args, kwargs) expects args to be a tuple or list of the op's positional arguments, but got Tensor tensor([0., 0.]); pass them as a tuple, e.g. (x,).""",
    )
    assert_expected_inline(
        _error(lambda: handle_effects(True, {}, log, (x, 1), None), TypeError),  # type: ignore[arg-type]
        """hopkit: handle_effects(allow_token_discovery, tokens, op, args, kwargs) expects kwargs to be a dict of the op's keyword arguments, but got NoneType None; pass {} for none.""",
    )
    assert_expected_inline(
        _error(lambda: handle_effects(True, {EffectType.ORDERED: "t"}, log, (x, 1), {}), TypeError),  # type: ignore[dict-item]
        """hopkit: handle_effects(allow_token_discovery, tokens, op, args, kwargs) expects each value of tokens to be a token tensor, but tokens[EffectType.ORDERED] is str 't'; keep the tokens that new_token_tensor() and handle_effects put there.""",
    )
    assert LOG == []


def test_handle_effects_threads_and_discovers_tokens(ordered: None) -> None:
    # FunctionalTensorMode hands registered ops to hopkit's handle_effects
    # (through the routing shim in hopkit/effects/_torch_integration.py), with the mode's tokens.
    from torch._subclasses.functional_tensor import FunctionalTensorMode, dispatch_functionalize

    def f(x: torch.Tensor) -> Any:
        return log(x, 1), log_nothing(x, 2), log_pair(x, 3)

    x = torch.randn(2)
    mode = FunctionalTensorMode(_allow_token_discovery=True)
    out, nothing, (a, b) = dispatch_functionalize(f, mode)(x)
    assert list(mode._tokens) == [EffectType.ORDERED]
    assert torch.equal(out, x) and nothing is None and torch.equal(b, x + 1)
    assert LOG == [1, 2, 3]
    with pytest.raises(RuntimeError) as info:
        dispatch_functionalize(f, FunctionalTensorMode(_allow_token_discovery=False))(x)
    assert_expected_inline(str(info.value), """hopkit: no effect token for EffectType.ORDERED while tracing hopkit_test_effects::log.default (token discovery is off: the effect was not seen when AOTAutograd collected metadata).""")


# ---------------------------------------------------------------------------
# torch.compile: order, unused results, exactly once
# ---------------------------------------------------------------------------


def program(x: torch.Tensor) -> torch.Tensor:
    y = x.sin()
    log(y, 1)                       # result unused
    y = log(y, 2) * 2
    log_nothing(y, 3)               # no result at all
    a, b = log_pair(y, 4)
    log(a, 5)                       # result unused
    return b.cos()


def test_eager_reference() -> None:
    program(torch.randn(3))
    assert LOG == [1, 2, 3, 4, 5]


def test_compile_keeps_order_and_unused_calls(ordered: None, backend: str) -> None:
    x = torch.randn(3)
    fn = torch.compile(program, backend=backend, fullgraph=True)
    out = fn(x)
    torch.testing.assert_close(out, program(x))
    assert LOG == [1, 2, 3, 4, 5] * 2
    LOG.clear()
    fn(x)  # compiled code runs each effect exactly once per call
    assert LOG == [1, 2, 3, 4, 5]


def test_unregistered_unused_call_is_dropped_by_compile() -> None:
    # What registration prevents: without it, AOTAutograd drops the call.
    unregistered = torch.ops.hopkit_test_effects.unregistered.default

    def f(x: torch.Tensor) -> torch.Tensor:
        unregistered(x, 1)
        return x + 1

    torch.compile(f, backend="aot_eager", fullgraph=True)(torch.randn(2))
    assert LOG == []


def test_aot_graph_threads_one_token_chain(ordered: None) -> None:
    backend = AotEagerAndRecordGraphs()
    torch.compile(program, backend=backend, fullgraph=True)(torch.randn(3))
    (fw,) = backend.fw_graphs
    assert_expected_inline(normalize(fw.code), """\
def forward(self, arg0_1, arg1_1):
    sin = torch.ops.aten.sin.default(arg1_1);  arg1_1 = None
    hopkit_with_effects = torch.ops.higher_order.hopkit_with_effects(arg0_1, torch.ops.hopkit_test_effects.log.default, sin, 1);  arg0_1 = None
    getitem = hopkit_with_effects[0];  hopkit_with_effects = None
    hopkit_with_effects_1 = torch.ops.higher_order.hopkit_with_effects(getitem, torch.ops.hopkit_test_effects.log.default, sin, 2);  getitem = sin = None
    getitem_2 = hopkit_with_effects_1[0]
    getitem_3 = hopkit_with_effects_1[1];  hopkit_with_effects_1 = None
    mul = torch.ops.aten.mul.Tensor(getitem_3, 2);  getitem_3 = None
    hopkit_with_effects_2 = torch.ops.higher_order.hopkit_with_effects(getitem_2, torch.ops.hopkit_test_effects.log_nothing.default, mul, 3);  getitem_2 = None
    getitem_4 = hopkit_with_effects_2[0];  hopkit_with_effects_2 = None
    hopkit_with_effects_3 = torch.ops.higher_order.hopkit_with_effects(getitem_4, torch.ops.hopkit_test_effects.log_pair.default, mul, 4);  getitem_4 = mul = None
    getitem_6 = hopkit_with_effects_3[0]
    getitem_7 = hopkit_with_effects_3[1]
    getitem_8 = hopkit_with_effects_3[2];  hopkit_with_effects_3 = None
    hopkit_with_effects_4 = torch.ops.higher_order.hopkit_with_effects(getitem_6, torch.ops.hopkit_test_effects.log.default, getitem_7, 5);  getitem_6 = getitem_7 = None
    getitem_9 = hopkit_with_effects_4[0];  hopkit_with_effects_4 = None
    cos = torch.ops.aten.cos.default(getitem_8);  getitem_8 = None
    return (getitem_9, cos)""")


def test_torch_own_effectful_op_shares_the_chain(ordered: None) -> None:
    # aten::_print goes through torch's with_effects, hopkit's ops through
    # hopkit's; one token orders them all.
    def f(x: torch.Tensor) -> torch.Tensor:
        log(x, 1)
        torch.ops.aten._print("between")
        return log(x, 2)

    backend = AotEagerAndRecordGraphs()
    torch.compile(f, backend=backend, fullgraph=True)(torch.randn(2))
    assert LOG == [1, 2]
    assert_expected_inline(normalize(backend.fw_graphs[0].code), """\
def forward(self, arg0_1, arg1_1):
    hopkit_with_effects = torch.ops.higher_order.hopkit_with_effects(arg0_1, torch.ops.hopkit_test_effects.log.default, arg1_1, 1);  arg0_1 = None
    getitem = hopkit_with_effects[0];  hopkit_with_effects = None
    with_effects = torch.ops.higher_order.with_effects(getitem, torch.ops.aten._print.default, 'between');  getitem = None
    getitem_2 = with_effects[0];  with_effects = None
    hopkit_with_effects_1 = torch.ops.higher_order.hopkit_with_effects(getitem_2, torch.ops.hopkit_test_effects.log.default, arg1_1, 2);  getitem_2 = arg1_1 = None
    getitem_4 = hopkit_with_effects_1[0]
    getitem_5 = hopkit_with_effects_1[1];  hopkit_with_effects_1 = None
    return (getitem_4, getitem_5)""")
    LOG.clear()
    torch._dynamo.reset()
    torch.compile(f, backend="inductor", fullgraph=True)(torch.randn(2))
    assert LOG == [1, 2]


def _torchbind_test_library() -> bool:
    try:
        from torch.testing._internal.torchbind_impls import init_torchbind_implementations

        init_torchbind_implementations()
    except Exception:  # the wheel ships libtorchbind_test.so; other builds may not
        return False
    return hasattr(torch.ops._TorchScriptTesting, "takes_foo")


@pytest.mark.skipif(not _torchbind_test_library(), reason="this torch wheel does not ship libtorchbind_test.so (the CUDA wheels of the registry leave it out)")
def test_torchbind_calls_share_the_chain(ordered: None) -> None:
    # A torchbind op is ORDERED in torch's own registry and keeps going
    # through torch's with_effects; hopkit's calls around it stay ordered.
    takes_foo = torch.ops._TorchScriptTesting.takes_foo.default
    assert get_effect(takes_foo) is EffectType.ORDERED

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.foo = torch.classes._TorchScriptTesting._Foo(10, 20)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            log(x, 1)
            return log(takes_foo(self.foo, x), 2) + 1

    m, x = M(), torch.randn(2)
    expected = m(x)
    backend = AotEagerAndRecordGraphs()
    for compiled_backend in (backend, "inductor"):
        torch._dynamo.reset()
        LOG.clear()
        torch.testing.assert_close(torch.compile(m, backend=compiled_backend, fullgraph=True)(x),
                                   expected)
        assert LOG == [1, 2]
    assert [n.target for n in backend.fw_graphs[0].graph.nodes if n.op == "call_function"
            and n.target is not __import__("operator").getitem] == [
        with_effects, torch.ops.higher_order.with_effects, with_effects, torch.ops.aten.add.Tensor]
    ep = torch.export.export(m, (x,), strict=False).run_decompositions()
    assert ep.graph_signature.input_specs[0].kind.name == "TOKEN"
    LOG.clear()
    torch.testing.assert_close(ep.module()(x), expected)
    assert LOG == [1, 2]


def test_inductor_keeps_unused_calls_in_order(ordered: None) -> None:
    from torch._inductor.utils import run_and_get_code

    fn = torch.compile(program, backend="inductor", fullgraph=True)
    _, (code,) = run_and_get_code(fn, torch.randn(3))
    check = FileCheck()
    for op, tag in [("log", 1), ("log", 2), ("log_nothing", 3), ("log_pair", 4), ("log", 5)]:
        check = check.check(f"torch.ops.hopkit_test_effects.{op}.default(").check(f", {tag})")
    check.run(code)
    assert LOG == [1, 2, 3, 4, 5]


def test_dynamo_eager_backend_keeps_unused_call(ordered: None) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        log(x, 1)
        return x + 1

    torch.compile(f, backend="eager", fullgraph=True)(torch.randn(2))
    assert LOG == [1]


# ---------------------------------------------------------------------------
# Backward: forward-only, backward-only, both
# ---------------------------------------------------------------------------


class LogInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        log(g, 100)
        log(g, 101)  # result unused
        return g


def forward_only(x: torch.Tensor) -> torch.Tensor:
    return log(x.sin(), 1).cos()


def backward_only(x: torch.Tensor) -> torch.Tensor:
    return LogInBackward.apply(x.sin()).cos()


def both(x: torch.Tensor) -> torch.Tensor:
    y = log(x.sin(), 1)
    return LogInBackward.apply(y).cos()


def both_saved(x: torch.Tensor) -> torch.Tensor:
    # The forward effect reads a value backward saves: the partitioner must
    # still not copy the effect into the backward graph.
    y = LogInBackward.apply(x.sin())
    log(y, 1)
    return y.cos()


@pytest.mark.parametrize(
    "fn, fw_log, bw_log",
    [
        pytest.param(forward_only, [1], [], id="forward_only"),
        pytest.param(backward_only, [], [100, 101], id="backward_only"),
        pytest.param(both, [1], [100, 101], id="both"),
        pytest.param(both_saved, [1], [100, 101], id="both_saved"),
    ],
)
@pytest.mark.parametrize("backend", ["aot_eager", "aot_eager_decomp_partition", "inductor"])
def test_effects_in_forward_and_backward(
    ordered: None, fn: Callable[..., torch.Tensor], fw_log: list[int], bw_log: list[int],
    backend: str,
) -> None:
    x = torch.randn(3, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    fn(x_ref).sum().backward()
    LOG.clear()
    out = torch.compile(fn, backend=backend, fullgraph=True)(x)
    assert LOG == fw_log
    LOG.clear()
    out.sum().backward()
    assert LOG == bw_log  # once each, in order, never re-run for recomputation
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_backward_graph_takes_a_token(ordered: None) -> None:
    backend = AotEagerAndRecordGraphs()
    torch.compile(backward_only, backend=backend, fullgraph=True)(
        torch.randn(3, requires_grad=True)
    ).sum().backward()
    assert_expected_inline(normalize(backend.bw_graphs[0].code), """\
def forward(self, primals_1, tangents_1, tangents_token):
    sin = torch.ops.aten.sin.default(primals_1)
    clone = torch.ops.aten.clone.default(sin);  sin = None
    sin_1 = torch.ops.aten.sin.default(clone);  clone = None
    neg = torch.ops.aten.neg.default(sin_1);  sin_1 = None
    mul = torch.ops.aten.mul.Tensor(tangents_1, neg);  tangents_1 = neg = None
    hopkit_with_effects = torch.ops.higher_order.hopkit_with_effects(tangents_token, torch.ops.hopkit_test_effects.log.default, mul, 100);  tangents_token = None
    getitem = hopkit_with_effects[0];  hopkit_with_effects = None
    hopkit_with_effects_1 = torch.ops.higher_order.hopkit_with_effects(getitem, torch.ops.hopkit_test_effects.log.default, mul, 101);  getitem = None
    getitem_2 = hopkit_with_effects_1[0];  hopkit_with_effects_1 = None
    cos_1 = torch.ops.aten.cos.default(primals_1);  primals_1 = None
    mul_1 = torch.ops.aten.mul.Tensor(mul, cos_1);  mul = cos_1 = None
    return (mul_1, getitem_2)""")


@pytest.mark.parametrize("backend", ["aot_eager", "aot_eager_decomp_partition", "inductor"])
def test_activation_checkpointing_never_recomputes_effects(ordered: None, backend: str) -> None:
    def region(x: torch.Tensor) -> torch.Tensor:
        return log(x.sin(), 1).cos() * 3

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(region, x, use_reentrant=False).sum()

    x = torch.randn(4, requires_grad=True)
    out = torch.compile(fn, backend=backend, fullgraph=True)(x)
    assert LOG == [1]
    out.backward()
    assert LOG == [1]  # the checkpointed region's effect is saved, not recomputed
    torch.testing.assert_close(x.grad, -3 * x.cos() * x.sin().sin())


# ---------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------


class Program(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return program(x)


def test_export_signature_carries_tokens(ordered: None) -> None:
    ep = torch.export.export(Program(), (torch.randn(3),))
    # The training IR keeps the calls (unused ones included) without tokens.
    assert [n.args[-1] for n in ep.graph.nodes if n.op == "call_function"
            and n.target in (log, log_nothing, log_pair)] == [1, 2, 3, 4, 5]
    ep = ep.run_decompositions()
    assert_expected_inline(normalize(ep.graph_module.code), """\
def forward(self, token, x):
    sin = torch.ops.aten.sin.default(x);  x = None
    hopkit_with_effects = torch.ops.higher_order.hopkit_with_effects(token, torch.ops.hopkit_test_effects.log.default, sin, 1);  token = None
    getitem = hopkit_with_effects[0];  hopkit_with_effects = None
    hopkit_with_effects_1 = torch.ops.higher_order.hopkit_with_effects(getitem, torch.ops.hopkit_test_effects.log.default, sin, 2);  getitem = sin = None
    getitem_2 = hopkit_with_effects_1[0]
    getitem_3 = hopkit_with_effects_1[1];  hopkit_with_effects_1 = None
    mul = torch.ops.aten.mul.Tensor(getitem_3, 2);  getitem_3 = None
    hopkit_with_effects_2 = torch.ops.higher_order.hopkit_with_effects(getitem_2, torch.ops.hopkit_test_effects.log_nothing.default, mul, 3);  getitem_2 = None
    getitem_4 = hopkit_with_effects_2[0];  hopkit_with_effects_2 = None
    hopkit_with_effects_3 = torch.ops.higher_order.hopkit_with_effects(getitem_4, torch.ops.hopkit_test_effects.log_pair.default, mul, 4);  getitem_4 = mul = None
    getitem_6 = hopkit_with_effects_3[0]
    getitem_7 = hopkit_with_effects_3[1]
    getitem_8 = hopkit_with_effects_3[2];  hopkit_with_effects_3 = None
    hopkit_with_effects_4 = torch.ops.higher_order.hopkit_with_effects(getitem_6, torch.ops.hopkit_test_effects.log.default, getitem_7, 5);  getitem_6 = getitem_7 = None
    getitem_9 = hopkit_with_effects_4[0];  hopkit_with_effects_4 = None
    cos = torch.ops.aten.cos.default(getitem_8);  getitem_8 = None
    return (getitem_9, cos)""")
    assert_expected_inline(str(ep.graph_signature).strip(), """\
# inputs
token: TOKEN
x: USER_INPUT

# outputs
getitem_9: TOKEN
cos: USER_OUTPUT""")


def test_exported_module_runs_effects_in_order(ordered: None) -> None:
    x = torch.randn(3)
    ep = torch.export.export(Program(), (x,))
    for prog in (ep, ep.run_decompositions()):
        LOG.clear()
        torch.testing.assert_close(prog.module()(x), program(x))
        assert LOG == [1, 2, 3, 4, 5] * 2


def test_exported_program_save_load_round_trip(ordered: None) -> None:
    x = torch.randn(3)
    ep = torch.export.export(Program(), (x,)).run_decompositions()
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    assert [s.kind.name for s in loaded.graph_signature.input_specs] == ["TOKEN", "USER_INPUT"]
    LOG.clear()
    torch.testing.assert_close(loaded.module()(x), program(x))
    assert LOG == [1, 2, 3, 4, 5] * 2


def test_export_mixes_with_torch_print(ordered: None) -> None:
    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            log(x, 1)
            torch.ops.aten._print("between")
            return log(x, 2)

    ep = torch.export.export(M(), (torch.randn(2),)).run_decompositions()
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"
               and n.target is not __import__("operator").getitem]
    assert targets == [with_effects, torch.ops.higher_order.with_effects, with_effects]
    LOG.clear()
    ep.module()(torch.randn(2))
    assert LOG == [1, 2]


# ---------------------------------------------------------------------------
# Import hygiene
# ---------------------------------------------------------------------------


def test_import_does_not_import_inductor() -> None:
    code = (
        "import sys, hopkit.effects\n"
        "bad = [m for m in ('torch._inductor.lowering', 'torch._inductor.graph',"
        " 'torch._functorch.partitioners') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------
# Effects inside HOP subgraphs (NOTE [Effect tokens inside subgraphs])
# ---------------------------------------------------------------------------


def _make_toy_subgraph_hop() -> Any:
    """A throwaway subgraph HOP ``call(subgraph, *args) -> subgraph(*args)``
    whose functionalization rule uses ``subgraph_effects``."""
    import torch.utils._pytree as pytree
    from torch._C import DispatchKey
    from torch._higher_order_ops.utils import reenter_make_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode, track_tensor_tree

    from hopkit.effects import subgraph_effects

    class Call(torch._ops.HigherOrderOperator):
        def __init__(self) -> None:
            super().__init__("hopkit_test_effects_call")

        def __call__(self, subgraph: Any, *args: Any) -> Any:
            return super().__call__(subgraph, *args)

    call = Call()

    def dense(subgraph: Any, *args: Any) -> Any:
        return tuple(subgraph(*args))

    def fake(mode: Any, subgraph: Any, *args: Any) -> Any:
        with mode:
            return dense(subgraph, *args)

    def proxy(mode: Any, subgraph: Any, *args: Any) -> Any:
        gm = reenter_make_fx(subgraph)(*args)
        i = 0
        while hasattr(mode.tracer.root, f"body_{i}"):
            i += 1
        mode.tracer.root.register_module(f"body_{i}", gm)
        proxy_args = pytree.tree_map(mode.tracer.unwrap_proxy, (gm, *args))
        out_proxy = mode.tracer.create_proxy("call_function", call, proxy_args, {})
        return track_tensor_tree(call(gm, *args), out_proxy, constant=None, tracer=mode.tracer)

    def functionalize(ctx: Any, subgraph: Any, *args: Any) -> Any:
        unwrapped = ctx.unwrap_tensors(args)
        with subgraph_effects(ctx, call):
            with ctx.redispatch_to_next():
                out = call(ctx.functionalize(subgraph), *unwrapped)
        return ctx.wrap_tensors(out)

    call.py_impl(DispatchKey.CompositeExplicitAutograd)(dense)
    for key in _hop.autograd_dispatch_keys():
        call.fallthrough(key)
    call.py_impl(FakeTensorMode)(fake)
    call.py_impl(ProxyTorchDispatchMode)(proxy)
    call.py_functionalize_impl(functionalize)
    return call


@pytest.fixture
def toy_call() -> Iterator[Any]:
    call = _make_toy_subgraph_hop()
    try:
        yield call
    finally:
        torch._ops._higher_order_ops.pop("hopkit_test_effects_call", None)


def _around_a_subgraph(call: Any, nested: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    def inner(x: torch.Tensor) -> tuple[torch.Tensor]:
        log(x, 3)                   # result unused
        return (log(x.sin(), 4),)

    def body(x: torch.Tensor) -> tuple[torch.Tensor]:
        log(x, 2)
        y = call(inner, x)[0] if nested else inner(x)[0]
        return (log(y, 5),)

    def f(x: torch.Tensor) -> torch.Tensor:
        log(x, 1)
        y = call(body, x)[0]
        log(y, 6)
        return y.cos()

    return f


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_effects_inside_a_subgraph_hop_keep_their_place(ordered: None, toy_call: Any,
                                                         nested: bool) -> None:
    from functorch.compile import aot_function

    f = _around_a_subgraph(toy_call, nested)
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, _: Any) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    x = torch.randn(3)
    torch.testing.assert_close(aot_function(f, fw_compiler=record)(x), f(x))
    assert LOG == [1, 2, 3, 4, 5, 6] * 2  # compiled, then eager
    (gm,) = graphs
    # One token chain; the HOP call is one link of it, its body stays plain.
    assert_expected_inline(normalize(gm.code), """\
def forward(self, arg0_1, arg1_1):
    hopkit_with_effects = torch.ops.higher_order.hopkit_with_effects(arg0_1, torch.ops.hopkit_test_effects.log.default, arg1_1, 1);  arg0_1 = None
    getitem = hopkit_with_effects[0];  hopkit_with_effects = None
    body_0 = self.body_0
    hopkit_with_effects_1 = torch.ops.higher_order.hopkit_with_effects(getitem, torch.ops.higher_order.hopkit_test_effects_call, body_0, arg1_1);  getitem = body_0 = arg1_1 = None
    getitem_3 = hopkit_with_effects_1[0]
    getitem_2 = hopkit_with_effects_1[1];  hopkit_with_effects_1 = None
    hopkit_with_effects_2 = torch.ops.higher_order.hopkit_with_effects(getitem_3, torch.ops.hopkit_test_effects.log.default, getitem_2, 6);  getitem_3 = None
    getitem_4 = hopkit_with_effects_2[0];  hopkit_with_effects_2 = None
    cos = torch.ops.aten.cos.default(getitem_2);  getitem_2 = None
    return (getitem_4, cos)""")
    if not nested:
        return
    # A nested HOP call stays plain too: only the outermost call is threaded.
    assert_expected_inline(normalize(gm.body_0.body_0.code), """\
def forward(self, arg0_1):
    log = torch.ops.hopkit_test_effects.log.default(arg0_1, 3);  log = None
    sin = torch.ops.aten.sin.default(arg0_1);  arg0_1 = None
    log_1 = torch.ops.hopkit_test_effects.log.default(sin, 4);  sin = None
    return (log_1,)""")
    assert_expected_inline(normalize(gm.body_0.code), """\
def forward(self, arg0_1):
    log = torch.ops.hopkit_test_effects.log.default(arg0_1, 2);  log = None
    body_0 = self.body_0
    hopkit_test_effects_call = torch.ops.higher_order.hopkit_test_effects_call(body_0, arg0_1);  body_0 = arg0_1 = None
    getitem = hopkit_test_effects_call[0];  hopkit_test_effects_call = None
    log_1 = torch.ops.hopkit_test_effects.log.default(getitem, 5);  getitem = None
    return (log_1,)""")


def test_registered_subgraph_hop_is_threaded_itself(toy_call: Any) -> None:
    from functorch.compile import aot_function

    def f(x: torch.Tensor) -> torch.Tensor:
        return toy_call(lambda v: (v.sin(),), x)[0]

    graphs: list[torch.fx.GraphModule] = []
    h = register_effectful_op(toy_call, EffectType.ORDERED)
    try:
        aot_function(f, fw_compiler=lambda gm, _: graphs.append(gm) or gm)(torch.randn(2))
    finally:
        h.destroy()
    assert_expected_inline(normalize(graphs[0].code), """\
def forward(self, arg0_1, arg1_1):
    body_0 = self.body_0
    hopkit_with_effects = torch.ops.higher_order.hopkit_with_effects(arg0_1, torch.ops.higher_order.hopkit_test_effects_call, body_0, arg1_1);  arg0_1 = body_0 = arg1_1 = None
    getitem_1 = hopkit_with_effects[0]
    getitem = hopkit_with_effects[1];  hopkit_with_effects = None
    return (getitem_1, getitem)""")


def test_effects_inside_a_subgraph_hop_export(ordered: None, toy_call: Any) -> None:
    f = _around_a_subgraph(toy_call)

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return f(x)

    x = torch.randn(3)
    ep = torch.export.export(M(), (x,), strict=False).run_decompositions()
    assert [s.kind.name for s in ep.graph_signature.input_specs] == ["TOKEN", "USER_INPUT"]
    LOG.clear()
    torch.testing.assert_close(ep.module()(x), f(x))
    assert LOG == [1, 2, 3, 4, 5, 6] * 2


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_effects_inside_basehop(ordered: None, backend: str, grad: bool) -> None:
    import hopkit

    class Region(hopkit.BaseHOP):
        def __init__(self) -> None:
            super().__init__("hopkit_test_effects_region")

    region = Region()
    try:
        f = _around_a_subgraph(region)
        x = torch.randn(3, requires_grad=grad)
        out = torch.compile(f, backend=backend, fullgraph=True)(x)
        assert LOG == [1, 2, 3, 4, 5, 6]
        torch.testing.assert_close(out, x.sin().cos())
        if grad:
            LOG.clear()
            out.sum().backward()
            assert LOG == []  # the body's effects are not re-run by backward
    finally:
        torch._ops._higher_order_ops.pop("hopkit_test_effects_region", None)


# ---------------------------------------------------------------------------
# Changing torch only on use, reversibly (NOTE [Changing torch only on use,
# reversibly] in hopkit/_patch.py)
# ---------------------------------------------------------------------------

# Every torch function hopkit.effects wraps: (defining module, name, the
# modules that rebind it by `from ... import name`).
_PATCHED_SITES = [
    ("torch._higher_order_ops.effects", "has_effects", ()),
    ("torch._higher_order_ops.effects", "handle_effects", ()),
    ("torch._functorch._aot_autograd.utils", "is_with_effects",
     ("torch._functorch.partitioners",)),
    ("torch._functorch._aot_autograd.utils", "unlift_tokens",
     ("torch._functorch._aot_autograd.graph_capture",
      "torch._functorch._aot_autograd.graph_compile")),
    ("torch.fx.experimental.proxy_tensor", "_should_save_eager_input_vals", ()),
    ("torch._functorch.partitioners", "force_save_effectful_ops", ()),
    ("torch.export._remove_effect_tokens_pass", "_remove_effect_tokens",
     ("torch.export._unlift", "torch.export.unflatten")),
]

# Imports every module of _PATCHED_SITES and records what each binds, right
# after `import torch` in a fresh process (before hopkit is imported).
_RECORD_TORCH_BINDINGS = f"""
import importlib, io, sys
import torch
SITES = {_PATCHED_SITES!r}
def bindings():
    return {{(m, name): getattr(importlib.import_module(m), name)
            for mod, name, consumers in SITES for m in (mod, *consumers)}}
def changed(before):
    return [key for key, fn in bindings().items() if fn is not before[key]]
FRESH = bindings()
"""

_LOG_OP = """
LOG = []
lib = torch.library.Library("hopkit_test_effects_sub", "FRAGMENT")
lib.define("log(Tensor x, int tag) -> Tensor")
lib.impl("log", lambda x, tag: LOG.append(tag) or x.clone(), "CompositeExplicitAutograd")
torch.library.register_fake("hopkit_test_effects_sub::log", lambda x, tag: torch.empty_like(x), lib=lib)
log = torch.ops.hopkit_test_effects_sub.log.default
"""


def _run_fresh(code: str) -> None:
    """Run ``code`` in a fresh interpreter; fail with its output if it fails."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_and_plain_torch_use_change_nothing_in_torch() -> None:
    # Importing hopkit and hopkit.effects, and using plain torch (export,
    # save, load, run; compile; with_effects in eager), patches nothing.
    _run_fresh(_RECORD_TORCH_BINDINGS + """
import hopkit, hopkit.effects
from hopkit import _patch
from hopkit.effects import new_token_tensor, with_effects

class M(torch.nn.Module):
    def forward(self, x):
        return x.sin() + 1

x = torch.randn(3)
ep = torch.export.export(M(), (x,))
buf = io.BytesIO()
torch.export.save(ep, buf)
buf.seek(0)
loaded = torch.export.load(buf)
torch.testing.assert_close(loaded.module()(x), x.sin() + 1)
torch.testing.assert_close(ep.run_decompositions().module()(x), x.sin() + 1)
torch.compile(lambda v: v.cos(), backend="aot_eager", fullgraph=True)(x)
with_effects(new_token_tensor(), torch.ops.aten.sin.default, x)  # eager: no tracing rule
assert _patch.live_patches() == [], _patch.live_patches()
assert changed(FRESH) == [], changed(FRESH)
assert not any(type(f).__module__ == "hopkit._patch" for f in sys.meta_path), sys.meta_path
assert "torch._inductor.lowering" not in sys.modules
""")


_FIRST_USES = {
    "register_effectful_op": "hopkit.effects.register_effectful_op(log)",
    "traced_with_effects": (
        "make_fx(lambda t, v: with_effects(t, torch.ops.aten.sin.default, v))"
        "(new_token_tensor(), torch.randn(2))"
    ),
    "subgraph_region": (
        "class Region(hopkit.BaseHOP):\n"
        "    def __init__(self):\n"
        "        super().__init__('hopkit_test_effects_sub_region')\n"
        "body = hopkit.FunctionWithNoFreeVars(lambda u: (u.sin(),))\n"
        "torch.func.functionalize(lambda v: Region()(body, v))(torch.randn(2))"
    ),
}


@pytest.mark.parametrize("first_use", list(_FIRST_USES))
def test_first_use_installs_the_integration(first_use: str) -> None:
    _run_fresh(_RECORD_TORCH_BINDINGS + _LOG_OP + f"""
import hopkit, hopkit.effects
from torch.fx.experimental.proxy_tensor import make_fx
from hopkit.effects import _torch_integration, new_token_tensor, with_effects
assert not _torch_integration.installed()
{_FIRST_USES[first_use]}
assert _torch_integration.installed()
# The partitioner's shim waits for its module, then every site is wrapped.
changed_sites = {{key[1] for key in changed(FRESH)}}
assert changed_sites == {{name for _, name, _ in SITES}}, changed_sites
""")


def test_undo_all_restores_torch_and_effects_work_after_reinstalling() -> None:
    _run_fresh(_RECORD_TORCH_BINDINGS + _LOG_OP + """
import operator
import torch._inductor.lowering as inductor_lowering
import hopkit.effects
from hopkit import _patch
from hopkit.effects import EffectType, register_effectful_op, with_effects

def f(x):
    log(x, 1)
    return log(x, 2) * 2

def check_effects_work():
    LOG.clear()
    graphs = []
    def backend(gm, inputs):
        from torch._functorch.aot_autograd import aot_module_simplified
        def fw(g, _):
            graphs.append(g)
            return g
        return aot_module_simplified(gm, inputs, fw_compiler=fw)
    torch._dynamo.reset()
    torch.compile(f, backend=backend, fullgraph=True)(torch.randn(2))
    assert LOG == [1, 2], LOG
    assert [n.target for n in graphs[0].graph.nodes
            if n.op == "call_function" and n.target is not operator.getitem] == [
        with_effects, with_effects, torch.ops.aten.mul.Tensor]
    class M(torch.nn.Module):
        def forward(self, x):
            return f(x)
    ep = torch.export.export(M(), (torch.randn(2),)).run_decompositions()
    assert ep.graph_signature.input_specs[0].kind.name == "TOKEN"
    LOG.clear()
    ep.module()(torch.randn(2))
    assert LOG == [1, 2], LOG

handle = register_effectful_op(log, EffectType.ORDERED)
check_effects_work()
assert {key for key in changed(FRESH)} == set(FRESH), set(FRESH) - set(changed(FRESH))
for key, fn in bindings().items():
    assert _patch.original_of(fn) is FRESH[key], key
assert inductor_lowering.lowerings.get(with_effects) is not None

_patch.undo_all()
assert changed(FRESH) == [], changed(FRESH)
assert _patch.live_patches() == [], _patch.live_patches()
assert with_effects not in inductor_lowering.lowerings

handle.destroy()
handle = register_effectful_op(log, EffectType.ORDERED)  # installs again
check_effects_work()
assert {key for key in changed(FRESH)} == set(FRESH)
assert inductor_lowering.lowerings.get(with_effects) is not None
handle.destroy()
""")


def test_partitioner_leaves_torch_own_effectful_ops_to_torch(ordered: None) -> None:
    # Plain (token-less) effectful calls in a joint graph: hopkit pins its own
    # registered ops to the forward graph; torch's own (aten::_print) get
    # exactly torch's treatment, except while a HOP partitions its
    # subgraph's joint (step 3 of NOTE [Effect tokens inside subgraphs]).
    import copy

    from torch._functorch import partitioners

    from hopkit import _patch
    from hopkit.effects._regions import subgraph_joint_partition

    def joint(x: torch.Tensor) -> torch.Tensor:
        torch.ops.aten._print("torch's own")
        return log(x, 1).sin()

    gm = make_fx(joint)(torch.randn(2))
    for node in gm.graph.nodes:
        node.meta["partitioner_tag"] = "is_forward"
    wrapper = partitioners.force_save_effectful_ops
    original = _patch.original_of(wrapper)
    assert original is not wrapper  # installed by the first registration

    def tags(force_save: Callable[[torch.fx.GraphModule], None]) -> dict[str, Any]:
        g = copy.deepcopy(gm)
        force_save(g)
        return {str(n.target): (n.meta.get("partitioner_tag"), n.meta.get("recompute"))
                for n in g.graph.nodes if n.op == "call_function"}

    by_torch, by_hopkit = tags(original), tags(wrapper)
    print_op, log_op = "aten._print.default", f"{NS}.log.default"
    assert by_hopkit[print_op] == by_torch[print_op] == ("is_forward", None)
    assert by_hopkit[log_op][0] == "must_be_in_forward"
    assert by_hopkit[log_op][1].name == "MUST_SAVE"
    assert by_torch[log_op] == ("is_forward", None)
    with subgraph_joint_partition():
        assert tags(wrapper)[print_op][0] == "must_be_in_forward"


def test_torch_print_inside_basehop_runs_once_with_grad(capfd: pytest.CaptureFixture[str]) -> None:
    import hopkit

    class Region(hopkit.BaseHOP):
        def __init__(self) -> None:
            super().__init__("hopkit_test_effects_print_region")

    region = Region()

    def body(x: torch.Tensor) -> tuple[torch.Tensor]:
        torch.ops.aten._print("in the body")
        return (x.sin(),)

    try:
        x = torch.randn(3, requires_grad=True)
        out = torch.compile(lambda v: region(body, v)[0].cos(), backend="aot_eager",
                            fullgraph=True)(x)
        out.sum().backward()
        assert capfd.readouterr().out.count("in the body") == 1
    finally:
        torch._ops._higher_order_ops.pop("hopkit_test_effects_print_region", None)
