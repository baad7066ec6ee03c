"""BaseHOP's tracing helpers: fake stand-ins, joint tagging, partitioning, mutation checks.

The pieces of torch's tracing machinery (make_fx re-entry, FakeTensorMode,
functionalization's wrappers, AOTAutograd's partitioner) that BaseHOP's
autograd and functionalize rules use, in one place (NOTE [BaseHOP autograd:
one joint trace, partitioned] in hopkit/base_hop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "all_fake",
    "default_partition",
    "tag_traced_nodes_as_backward",
    "tag_traced_nodes_as_forward",
    "tracing_fresh_examples",
    "was_mutated",
]


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


def tag_traced_nodes_as_backward() -> None:
    """Mark every node traced since ``tag_traced_nodes_as_forward`` as backward.

    Called after the grads of the joint are traced. hopkit's partitioner hook
    pins an effectful call that is not marked backward to the forward graph
    (NOTE [Effect tokens inside subgraphs] in hopkit/effects/_regions.py); an
    effect of the backward (an op's autograd formula logs its gradient) left
    unmarked would be pinned there too, and the partitioner would fail
    ("Node ... was invalid, but is output"). The mark is hopkit's own meta key
    (``BACKWARD_MARK``), read by that hook, not torch's "is_backward"
    partitioner tag: the tag would also change where torch's partitioner
    places mutations of this functionalization-free joint, turning hopkit's
    clear refusal of an update through a view into a wrong gradient.
    """
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    if mode is None:
        return
    for node in mode.tracer.graph.nodes:
        if "partitioner_tag" not in node.meta and node.op != "output":
            node.meta[BACKWARD_MARK] = True


#: The meta key of tag_traced_nodes_as_backward.
BACKWARD_MARK = "hopkit_joint_backward"


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
