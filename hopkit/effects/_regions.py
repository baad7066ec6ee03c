"""Effects inside HOP subgraphs: ``subgraph_effects`` threads the HOP call.

See NOTE [Effect tokens inside subgraphs] below. ``hopkit.BaseHOP``'s
functionalization rule enters a region around its subgraph; so may the rule of
any HOP with a subgraph.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch._ops import HigherOrderOperator
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, track_tensor_tree

from hopkit.effects._hop import with_effects
from hopkit.effects._registry import display_name, get_effect
from hopkit.effects._tokens import current_token, new_token_tensor

__all__ = ["subgraph_effects"]

# NOTE [Effect tokens inside subgraphs]
# An effectful op called inside a HOP's subgraph (a hopkit.BaseHOP body) must
# keep its order relative to the effects around the HOP call, run exactly once
# per call and never be dropped. The token cannot be threaded into the
# subgraph: the subgraph is traced into its own graph, and the outer token is a
# value of the outer graph. So the HOP call as a whole is threaded:
#
# 1. The HOP's functionalization rule traces its subgraph inside
#    ``subgraph_effects(ctx, hop)``. There, effectful calls stay plain calls
#    (handle_effects sees the open region; torch's own effectful ops such as
#    aten::_print are routed to it too): the subgraph's graph holds them in
#    program order, and FX keeps them alive (registered ops are marked
#    side-effectful). The region records which effect types it saw.
# 2. When the region closes, the HOP call consumes the current token and
#    produces the next one: its node ``hop(*args)`` becomes
#    ``hopkit_with_effects(token, hop, *args) -> (new_token, *outputs)``.
#    From there AOTAutograd, the partitioner, ``torch.export`` and Inductor
#    treat it as any other effectful call; Inductor's lowering of
#    hopkit_with_effects also chains the effectful kernels of the inlined
#    subgraph one after another (hopkit/inductor/effects_lowering.py).
# 3. A HOP's autograd rule may trace the joint graph of its subgraph (without
#    functionalization, so its effectful calls are plain) and partition it.
#    The partitioner pins plain calls of ops registered with hopkit to the
#    forward graph, so that backward never runs them again; torch's own
#    effectful ops (aten::_print) get the same treatment only while the rule
#    partitions inside ``subgraph_joint_partition()`` (elsewhere torch's
#    partitioner sees them exactly as without hopkit). See
#    _force_save_effectful_ops in hopkit/effects/_torch_integration.py.
# 4. A region nested in another (a HOP inside a HOP's subgraph) reports its
#    effects to the enclosing region; only the outermost HOP call is threaded.
#
# Under C++ functionalization (torch.func.functionalize) there are no tokens;
# the region only keeps the subgraph's calls plain.


class _Region:
    __slots__ = ("effects",)

    def __init__(self) -> None:
        self.effects: list[Any] = []

    def record(self, effect: Any) -> None:
        if effect not in self.effects:
            self.effects.append(effect)


_regions = threading.local()


def _region_stack() -> list[_Region]:
    stack: list[_Region] | None = getattr(_regions, "stack", None)
    if stack is None:
        stack = _regions.stack = []
    return stack


def in_region() -> bool:
    """Whether a ``subgraph_effects`` region is open on this thread."""
    return bool(getattr(_regions, "stack", None))


def record_in_region(effect: Any) -> bool:
    """Record ``effect`` in the innermost open region; False if none is open
    (then the call is threaded itself)."""
    stack = getattr(_regions, "stack", None)
    if not stack:
        return False
    stack[-1].record(effect)
    return True


@contextlib.contextmanager
def subgraph_joint_partition() -> Iterator[None]:
    """Around the partitioning of a HOP subgraph's joint graph (step 3 of
    NOTE [Effect tokens inside subgraphs]): torch's own effectful ops called
    in it are kept in the forward graph, as hopkit's registered ones always
    are, so that the backward graph never runs them again."""
    depth = getattr(_regions, "joint_partitions", 0)
    _regions.joint_partitions = depth + 1
    try:
        yield
    finally:
        _regions.joint_partitions = depth


def in_subgraph_joint_partition() -> bool:
    """Whether a ``subgraph_joint_partition()`` is open on this thread."""
    return bool(getattr(_regions, "joint_partitions", 0))


class subgraph_effects:
    """Thread effect tokens through a HOP call whose subgraph has effects.

    For authors of HOPs with subgraphs (``hopkit.BaseHOP`` uses it): wrap the
    call that the functionalization rule makes of the HOP::

        with subgraph_effects(ctx, hop):
            with ctx.redispatch_to_next():
                out = hop(subgraph, *unwrapped_operands)

    See NOTE [Effect tokens inside subgraphs]. Does nothing when the subgraph
    has no effectful call and the HOP itself is not registered effectful
    (``register_effectful_op(hop, EffectType.ORDERED)`` orders every call).
    The first region installs hopkit's hooks in torch's token machinery.
    """

    def __init__(self, ctx: Any, hop: HigherOrderOperator) -> None:
        self.mode = getattr(ctx, "mode", None)
        self.hop = hop
        self.region = _Region()
        self.marker: Any = None

    def __enter__(self) -> None:
        # First use: torch's own effectful ops in the subgraph (aten::_print)
        # must reach hopkit's handle_effects (NOTE [Changing torch only on
        # use, reversibly] in hopkit/_patch.py). Imported here, not at the
        # top: _torch_integration imports this module (its routing asks
        # in_region()).
        from hopkit.effects._torch_integration import install

        install()
        proxy_mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY)
        if proxy_mode is not None:
            self.marker = _last_node(proxy_mode.tracer.graph)
        _region_stack().append(self.region)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        stack = _region_stack()
        stack.pop()
        if exc_type is not None:
            return
        own = get_effect(self.hop)  # the HOP itself registered effectful
        if own is not None:
            self.region.record(own)
        if not self.region.effects:
            return
        if stack:  # nested: the enclosing HOP call is the one threaded
            for effect in self.region.effects:
                stack[-1].record(effect)
            return
        tokens = getattr(self.mode, "_tokens", None)
        if tokens is None:  # C++ functionalization: no tokens to thread
            return
        if len(self.region.effects) != 1:
            raise NotImplementedError(
                f"hopkit: the subgraph of {display_name(self.hop)} has effects of "
                f"several types {self.region.effects}; one effect type per HOP "
                "call is supported."
            )
        _thread_hop_call(self.mode, self.hop, self.region.effects[0], self.marker)


def _last_node(graph: torch.fx.Graph) -> torch.fx.Node | None:
    """The graph's last node; None for an empty graph (a HOP call that takes
    no operands can be the first node traced)."""
    return next(iter(reversed(graph.nodes)), None)


def _thread_hop_call(mode: Any, hop: HigherOrderOperator, key: Any, marker: Any) -> None:
    """Make the HOP call just traced consume and produce the ``key`` token."""
    from torch._subclasses.functional_tensor import PythonFunctionalizeAPI

    tokens = mode._tokens
    token = current_token(mode._allow_token_discovery, tokens, key, hop)
    ctx = PythonFunctionalizeAPI(mode)
    unwrapped_token = ctx.unwrap_tensors([token])[0]
    with disable_proxy_modes_tracing():
        new_token = new_token_tensor()
    proxy_mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY)
    if proxy_mode is not None:
        tracer = proxy_mode.tracer
        graph = tracer.graph
        calls = []
        node = marker.next if marker is not None else next(iter(graph.nodes))
        while node is not graph._root:
            if node.op == "call_function" and node.target is hop:
                calls.append(node)
            node = node.next
        if len(calls) != 1:
            raise RuntimeError(
                f"hopkit: expected one call of {display_name(hop)} in the traced "
                f"graph to thread effect tokens through, found {len(calls)}."
            )
        (call,) = calls
        token_node = tracer.unwrap_proxy(unwrapped_token).node
        if token_node.op == "placeholder" and token_node.name.startswith("tangents_token"):
            # Discovered just now (backward), so created after the call.
            call.prepend(token_node)
        with graph.inserting_before(call):
            wrapped = graph.call_function(with_effects, (token_node, hop, *call.args), dict(call.kwargs))
        wrapped.meta = dict(call.meta)
        val = call.meta.get("val")
        wrapped.meta["val"] = (
            (new_token, *val) if isinstance(val, (tuple, list)) else (new_token, val)
        )
        for user in list(call.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.args = (wrapped, user.args[1] + 1)
        # New nodes carry the call's provenance (export checks nn_module_stack).
        provenance = {k: v for k, v in call.meta.items() if k not in ("val", "tensor_meta")}
        with graph.inserting_after(wrapped):
            token_out = graph.call_function(operator.getitem, (wrapped, 0))
            token_out.meta.update(provenance)
            if call.users:  # a single, non-tuple output
                out = graph.call_function(operator.getitem, (wrapped, 1))
                out.meta.update(call.meta)
                call.replace_all_uses_with(out)
        graph.erase_node(call)
        track_tensor_tree(new_token, torch.fx.Proxy(token_out, tracer), constant=None, tracer=tracer)
    tokens[key] = ctx.wrap_tensors(new_token)  # type: ignore[arg-type]
