"""hopkit._compat: the one version check, and shims that degrade instead of breaking torch."""

from __future__ import annotations

import warnings

import pytest
import torch

from hopkit import _compat


@pytest.mark.parametrize(
    "version, release",
    [
        ("2.13.0", (2, 13, 0)),
        ("2.14.1+cu130", (2, 14, 1)),
        ("2.15.0a0+git1234abc", (2, 15, 0)),
        ("2.11.0+cpu", (2, 11, 0)),
        ("2.16", (2, 16)),
    ],
)
def test_release_parsing(version: str, release: tuple[int, ...]) -> None:
    assert _compat._release(version) == release


@pytest.mark.parametrize(
    "running, asked, expected",
    [
        ((2, 13, 0), "2.13", True),
        ((2, 13, 0), "2.12", True),
        ((2, 13, 0), "2.14", False),
        ((2, 14, 1), "2.14.1", True),
        ((2, 14, 0), "2.14.1", False),
        ((2, 15, 0), "2.14.1", True),
        ((2, 11, 0), "2.11", True),
        ((3, 0, 0), "2.15", True),
    ],
)
def test_torch_at_least(
    monkeypatch: pytest.MonkeyPatch, running: tuple[int, ...], asked: str, expected: bool
) -> None:
    monkeypatch.setattr(_compat, "TORCH_VERSION", running)
    assert _compat.torch_at_least(asked) is expected


def test_running_torch_is_in_the_supported_window() -> None:
    assert _compat.torch_at_least("2.11"), torch.__version__
    assert _compat.TORCH_VERSION == _compat._release(torch.__version__)


def test_missing_torch_symbol_warns_and_names_itself() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compat.warn_missing_torch_symbol("torch._inductor.fx_utils._nothing_here",
                                          "Inductor may warn about hopkit subgraph arguments")
    assert [str(w.message) for w in caught] == [
        f"hopkit: torch {torch.__version__} has no "
        "torch._inductor.fx_utils._nothing_here, which hopkit expected "
        "for this release; Inductor may warn about hopkit subgraph arguments. "
        "Please report this to hopkit."
    ]


def test_wrapped_node_parts_takes_the_first_seven() -> None:
    seven = tuple(range(7))
    assert _compat.wrapped_node_parts(seven) == (0, 1, 2, 3, 6)
    assert _compat.wrapped_node_parts((*seven, "tracing_info")) == (0, 1, 2, 3, 6)


def test_fx_utils_shim_only_where_torch_has_the_table() -> None:
    # torch 2.13+ list subgraph HOPs in fx_utils; 2.11 and 2.12 have no list.
    import torch._inductor.fx_utils as fx_utils

    has_table = hasattr(fx_utils, "_extract_subgraphs_and_args")
    assert has_table is _compat.torch_at_least("2.13")


def test_owning_bindings_by_value_follows_torchgen() -> None:
    from torchgen.api import dispatcher
    from torchgen.model import Argument, BaseTy, BaseType

    a = Argument(name="t", type=BaseType(BaseTy.Tensor), default=None, annotation=None)
    theirs = dispatcher.argument(a, remove_non_owning_ref_types=True).type
    assert (theirs == "at::Tensor") is _compat.owning_bindings_hold_tensors_by_value()
