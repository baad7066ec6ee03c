"""BaseHOP under torch.func transforms (vmap, grad, jvp) and forward-mode AD.

    vmap(hop(g, *operands))  ==  hop(vmap(g), *unbatched operands)   (traced)
                             ==  g(*batched operands)              (eager)
    grad / vjp through hop   ==  hop(g) now, hop(vjp of g) in backward
    jvp through hop          ==  hop(g) now, hop(jvp of g) for the tangents

Registered by ``BaseHOP._register_rules`` through ``register_functorch_rules``,
one rule per functorch transform (``TransformType.Vmap``, ``Grad``, ``Jvp``;
``Functionalize`` is BaseHOP's functionalize rule). Each rule asks the HOP
first: a transform named in ``unsupported_transforms`` is refused with an
error naming the HOP and the transform, and the ``vmap_rule`` / ``grad_rule``
/ ``jvp_rule`` methods a subclass may override default to the rules here.
Forward-mode AD on dual tensors (``torch.autograd.forward_ad``) outside any
transform goes through BaseHOP's autograd rule, which calls
``base_hop_forward_ad`` here.

NOTE [BaseHOP under torch.func transforms]
Where a graph is recorded (make_fx, AOTAutograd, export; or a dispatch mode
is active, which may have a rule of its own for the HOP), every rule keeps ONE
call of the HOP, at the next level down, whose body is the transformed body,
so the HOP stays one node in traced graphs (as JAX keeps its primitives and
torch's cond keeps cond under vmap):

* vmap: the operands' batch dims at this level are taken off, the body is
  vmapped over them (``restore_vmap``: the interpreter's batch size and
  randomness; an output the body leaves unbatched stays unbatched), and the
  HOP of that body is called at the level below; its outputs get the batch
  dim back.
* grad (grad, vjp, jacrev, hessian's jacrev): a single-level autograd function
  (as torch's autograd.Function support does, torch/_functorch/
  autograd_function.py): its forward calls the HOP of the body on the
  unwrapped operands at the level below; its backward calls, at this level,
  the HOP of the body's vjp (the body recomputed under its context, then
  torch.func.vjp), so outer transforms differentiate or batch it again.
  BaseHOP's partitioned plan (NOTE [BaseHOP autograd: one joint trace,
  partitioned]) does not fit here: its saved activations come out of the
  joint trace through ``detach``, so a second derivative through them (grad
  of grad, hessian) would be silently zero. The price: the body's forward
  runs again in backward under torch.func grad (not under plain autograd),
  only while a graph is recorded: in eager, grad and jvp run the body at
  their level (NOTE [Effects under torch.func grad and jvp]), so no effect
  runs twice.
* jvp (jvp, jacfwd, hessian's jacfwd) and forward-mode AD: a single-level
  autograd function whose forward calls the HOP of the body at the level
  below and whose jvp calls the HOP of the body's jvp (``_jvp``: the jvp of
  the body at a functorch jvp level of its own, reusing the dual level if
  one is open, since forward AD allows only one).

Where nothing records a graph (no trace, no dispatch mode) and the HOP keeps
the default vmap rule, the vmap rule instead runs the body inline at the vmap
level, on the batched operands, exactly as the plain body runs under vmap
(``inline_under_vmap``; the user-facing output aliasing check looks under the
batching wrappers). That is eager's meaning of the call, as in NOTE [BaseHOP
plain-eager fast path] and NOTE [BaseHOP in eager under modes and
subclasses], and it costs no second vmap level, no rebuilt body and no HOP
dispatch below: ``vmap_runs_inline`` lets ``BaseHOP.__call__`` skip the
dispatcher for it, next to the plain-eager fast path. A subclass overriding
``vmap_rule``, or registering a rule after construction, always gets its rule.

Dual levels: forward AD has a single level, 0. ``forward_ad._current_level``
names it in eager, but the replay of a graph Dynamo compiled from
``torch.func.jvp`` enters it through ``torch._functorch.predispatch``, which
leaves that Python variable at -1; ``_dual_level`` reads level 0 there when a
functorch jvp level is on the stack (never otherwise: reading a tangent is an
op that make_fx would record).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from hopkit import _dispatch

if TYPE_CHECKING:
    from hopkit.base_hop import BaseHOP

__all__ = [
    "TRANSFORMS",
    "VmapInfo",
    "base_hop_forward_ad",
    "default_grad_rule",
    "default_jvp_rule",
    "default_vmap_rule",
    "has_forward_tangents",
    "inline_under_vmap",
    "register_functorch_rules",
    "vmap_runs_inline",
]

# The names ``unsupported_transforms`` may list, and the torch.func APIs each
# covers (for the error message).
TRANSFORMS: dict[str, str] = {
    "vmap": "torch.func.vmap",
    "grad": "torch.func.grad, grad_and_value, vjp, jacrev and hessian",
    "jvp": "torch.func.jvp, jacfwd, hessian and torch.autograd.forward_ad",
}


class VmapInfo(NamedTuple):
    """What ``BaseHOP.vmap_rule`` learns of the vmap it runs under."""

    batch_size: int
    randomness: str  # "error", "same" or "different"


def _refuse_if_unsupported(hop: BaseHOP, transform: str) -> None:
    if transform in hop.unsupported_transforms:
        raise NotImplementedError(
            f"hopkit: {hop._name} does not support {TRANSFORMS[transform]}: "
            f"{type(hop).__name__}.unsupported_transforms lists {transform!r}. "
            f"Call the HOP outside that transform, or remove {transform!r} from "
            f"unsupported_transforms (or override {type(hop).__name__}."
            f"{transform}_rule) to give it a rule."
        )


# ---------------------------------------------------------------------------
# Rule: vmap
# ---------------------------------------------------------------------------


def base_hop_vmap(hop: BaseHOP, interpreter: Any, /, *args: Any, **kwargs: Any) -> Any:
    """vmap: the HOP of the vmapped body, one level down, batch dims re-added."""
    _refuse_if_unsupported(hop, "vmap")
    if _runs_inline(hop):
        # NOTE [BaseHOP under torch.func transforms]: nothing records a graph.
        return inline_under_vmap(hop, args, kwargs)
    level = interpreter.level()
    leading, subgraph, operands = hop._split(args)
    unwrapped: list[Any] = []
    in_dims: list[int | None] = []
    for x in operands:
        if isinstance(x, torch.Tensor):
            x, bdim = torch._C._functorch._unwrap_batched(x, level)
        else:
            bdim = None
        unwrapped.append(x)
        in_dims.append(bdim)
    info = VmapInfo(interpreter.batch_size(), interpreter.randomness())
    with interpreter.lower():
        out, out_dims = hop.vmap_rule(info, tuple(in_dims), *leading, subgraph, *unwrapped, **kwargs)
    from torch._functorch.vmap import _add_batch_dim, _broadcast_to_and_flatten

    flat, spec = pytree.tree_flatten(out)
    flat_dims = _broadcast_to_and_flatten(out_dims, spec)
    if flat_dims is None:
        raise RuntimeError(
            f"hopkit: {type(hop).__name__}.vmap_rule returned out_dims "
            f"{out_dims!r}, which does not match the structure of its outputs "
            f"({spec}); return one Optional[int] per output, or one for all."
        )
    wrapped = [
        _add_batch_dim(o, d, level) if isinstance(o, torch.Tensor) and d is not None else o
        for o, d in zip(flat, flat_dims)
    ]
    return pytree.tree_unflatten(wrapped, spec)


def _runs_inline(hop: BaseHOP) -> bool:
    """Whether the vmap rule may run the body at this level (see the NOTE)."""
    return (hop._fast_path  # no rule registered after construction
            and _keeps_default_vmap_rule(type(hop))
            and not _len_dispatch_stack()
            and not _dispatch.tracing_underway())


def vmap_runs_inline(hop: BaseHOP, operands: Sequence[Any]) -> bool:
    """Whether a call of ``hop`` may skip the dispatcher and run its body
    inline (``inline_under_vmap``): the innermost transform is a vmap and the
    vmap rule would run the body inline; no ``__torch_function__`` applies.
    For ``BaseHOP.__call__``'s fast path, next to the plain-eager one."""
    interpreter = _peek_interpreter()
    return (interpreter is not None
            and interpreter.key() == _VMAP
            and "vmap" not in hop.unsupported_transforms
            and _runs_inline(hop)
            and not _torch_function_mode_on()
            and not _has_torch_function(operands))


def inline_under_vmap(hop: BaseHOP, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The body on this level's batched operands, as the plain body runs."""
    check_no_output_aliasing, is_internal = _base_hop_helpers()
    leading, subgraph, operands = hop._split(args)
    out = hop._run(leading, subgraph, operands, kwargs)
    if not is_internal(subgraph):
        # The user-facing check, on the tensors under the batching wrappers
        # (which have no storage of their own).
        check_no_output_aliasing(hop, _unwrapped(operands), _unwrapped(out))
    return out


# Bound once: these run on every inline call.
_len_dispatch_stack = torch._C._len_torch_dispatch_stack
_peek_interpreter = torch._C._functorch.peek_interpreter_stack
_torch_function_mode_on = torch._C._is_torch_function_mode_enabled
_has_torch_function = torch._C._has_torch_function
_VMAP = torch._C._functorch.TransformType.Vmap


@functools.cache
def _keeps_default_vmap_rule(cls: type) -> bool:
    from hopkit.base_hop import BaseHOP  # imports this module

    return getattr(cls, "vmap_rule", None) is BaseHOP.vmap_rule


@functools.cache
def _base_hop_helpers() -> tuple[Callable[..., Any], Callable[[Any], bool]]:
    from hopkit.base_hop import _check_no_output_aliasing, _is_internal  # imports this module

    return _check_no_output_aliasing, _is_internal


def _unwrapped(values: Any) -> list[Any]:
    """``values`` (a tensor or a flat sequence) with every functorch wrapper
    taken off its tensors. (A loop: ``tree_map_only`` costs more than the
    whole inline call.)"""
    functorch = torch._C._functorch
    wrapped, get = functorch.is_functorch_wrapped_tensor, functorch.get_unwrapped
    result = []
    for t in values if isinstance(values, (tuple, list)) else (values,):
        while isinstance(t, torch.Tensor) and wrapped(t):
            t = get(t)
        result.append(t)
    return result


class _BatchedBody:
    """``subgraph`` vmapped over ``in_dims``; records where each output's batch dim is."""

    __slots__ = ("fn", "out_dims")

    def __init__(self, subgraph: Callable[..., Any], in_dims: tuple[int | None, ...],
                 info: VmapInfo) -> None:
        from torch._functorch.vmap import restore_vmap

        self.out_dims: Any = None
        batched = restore_vmap(subgraph, in_dims, info.batch_size, info.randomness)

        def fn(*operands: Any) -> Any:
            out, self.out_dims = batched(*operands)
            return out

        self.fn = fn

    def __call__(self, *operands: Any) -> Any:
        return self.fn(*operands)


def default_vmap_rule(hop: BaseHOP, info: VmapInfo, in_dims: tuple[int | None, ...],
                      args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``BaseHOP.vmap_rule``'s default: ``(hop(vmap(subgraph), *operands), out_dims)``."""
    from hopkit.base_hop import _is_internal

    leading, subgraph, operands = hop._split(args)
    batched = _BatchedBody(subgraph, in_dims, info)
    # The user's body keeps the user-facing aliasing check (a vmapped body
    # returning an operand aliases it as the body does); hopkit's own graphs
    # (a plan's forward returns views of operands as activations) skip it.
    body = _as_subgraph(batched, internal=_is_internal(subgraph))
    out = hop(*leading, body, *operands, **kwargs)
    assert batched.out_dims is not None, "running the HOP runs (or traces) its body"
    return out, batched.out_dims


# ---------------------------------------------------------------------------
# Rule: grad (grad, vjp, jacrev)
# ---------------------------------------------------------------------------


def base_hop_grad(hop: BaseHOP, interpreter: Any, /, *args: Any, **kwargs: Any) -> Any:
    """grad: a single-level autograd function around the HOP of the forward graph."""
    _refuse_if_unsupported(hop, "grad")
    return hop.grad_rule(interpreter, *args, **kwargs)


def default_grad_rule(hop: BaseHOP, interpreter: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
    """``BaseHOP.grad_rule``'s default; see NOTE [BaseHOP under torch.func transforms]."""
    leading, subgraph, operands = hop._split(args)
    if not (torch.is_grad_enabled()
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in operands)):
        return _lowered_call(hop, interpreter, leading, subgraph, operands, kwargs)
    if not _dispatch.tracing_underway():
        # NOTE [Effects under torch.func grad and jvp]
        return hop._run(leading, subgraph, operands, kwargs)
    return _apply_level_function(hop, interpreter, leading, subgraph, operands, kwargs)


def _apply_level_function(hop: BaseHOP, interpreter: Any, leading: tuple[Any, ...],
                          subgraph: Any, operands: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    from torch._functorch.utils import enable_single_level_autograd_function

    single = _SingleOutput()
    with enable_single_level_autograd_function():
        res = _LevelFunction.apply(  # type: ignore[attr-defined]
            hop, interpreter, leading, subgraph, kwargs, single, *operands)
    return res[0] if single.value else tuple(res)


def _lowered_call(hop: BaseHOP, interpreter: Any, leading: tuple[Any, ...], subgraph: Any,
                  operands: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The HOP one level down, its outputs wrapped at this level (what torch does
    for an op that this grad or jvp level does not differentiate)."""
    level = interpreter.level()
    unwrapped = _unwrap_for_grad(operands, level)
    with interpreter.lower():
        out = hop(*leading, subgraph, *unwrapped, **kwargs)
    return _wrap_for_grad(out, level)


def _unwrap_for_grad(values: Sequence[Any], level: int) -> list[Any]:
    unwrap = torch._C._functorch._unwrap_for_grad
    return [unwrap(v, level) if isinstance(v, torch.Tensor) else v for v in values]


def _wrap_for_grad(out: Any, level: int) -> Any:
    wrap = torch._C._functorch._wrap_for_grad
    return pytree.tree_map_only(torch.Tensor, lambda t: wrap(t, level), out)


@contextlib.contextmanager
def _below(interpreter: Any) -> Iterator[None]:
    """The level below ``interpreter``, with both kinds of AD on there (a
    single-level function turns them off for its own level only)."""
    from torch.autograd.forward_ad import _set_fwd_grad_enabled

    with torch.enable_grad(), _set_fwd_grad_enabled(True), interpreter.lower():
        yield


class _VjpBody:
    """``(*operands, *cotangents) -> grads of operands[diff]`` for ``fn``."""

    __slots__ = ("fn", "n", "diff")

    def __init__(self, fn: Callable[..., Any], n: int, diff: tuple[int, ...]) -> None:
        self.fn, self.n, self.diff = fn, n, diff

    def __call__(self, *args: Any) -> Any:
        primals, cotangents = list(args[: self.n]), args[self.n:]

        def f(*dp: Any) -> Any:
            ps = list(primals)
            for i, p in zip(self.diff, dp):
                ps[i] = p
            out = self.fn(*ps)
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)

        with _refuse_recomputed_effects("torch.func.grad (grad, vjp, jacrev, hessian)"):
            _, vjp_fn, *_ = torch.func.vjp(f, *(primals[i] for i in self.diff))
        return _fresh(vjp_fn(tuple(cotangents)), args)


def _as_subgraph(body: Any, internal: bool = True) -> Any:
    """``body`` as a subgraph BaseHOP accepts; ``internal``: made by hopkit,
    so the user-facing output aliasing check is skipped (``_fresh`` keeps its
    outputs fresh instead)."""
    wrapped = _body_class()(body)
    wrapped._hopkit_internal = internal
    return wrapped


@functools.cache
def _body_class() -> Any:
    # Built on first use: FunctionWithNoFreeVars lives in hopkit.base_hop,
    # which imports this module.
    from hopkit.base_hop import FunctionWithNoFreeVars

    class TransformedBody(FunctionWithNoFreeVars):
        """A body hopkit derived from a HOP's subgraph for a torch.func transform."""

        __slots__ = ("_hopkit_internal",)

    return TransformedBody


def _fresh(out: Any, inputs: Sequence[Any]) -> Any:
    """``out`` with every tensor that shares memory with an input cloned.

    A transformed body can return an input as is (the tangent of ``x + 1`` is
    the input tangent); a HOP's outputs must be fresh (AOTAutograd and
    Inductor take them for new buffers).
    """
    keys = set()
    for t in inputs:
        key = _storage(t)
        if key is not None:
            keys.add(key)

    def fresh(t: torch.Tensor) -> torch.Tensor:
        key = _storage(t)
        if key is not None and key in keys:
            return t.clone()
        if key is not None:
            keys.add(key)
        return t

    return pytree.tree_map_only(torch.Tensor, fresh, out)


def _storage(t: Any) -> int | None:
    if not isinstance(t, torch.Tensor) or t.layout is not torch.strided:
        return None
    try:
        return int(t.untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError):
        return None


# ---------------------------------------------------------------------------
# Rule: jvp (jvp, jacfwd) and forward-mode AD
# ---------------------------------------------------------------------------


def base_hop_jvp(hop: BaseHOP, interpreter: Any, /, *args: Any, **kwargs: Any) -> Any:
    """jvp: a single-level function whose jvp is the HOP of the body's jvp."""
    _refuse_if_unsupported(hop, "jvp")
    return hop.jvp_rule(interpreter, *args, **kwargs)


def default_jvp_rule(hop: BaseHOP, interpreter: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
    """``BaseHOP.jvp_rule``'s default; see NOTE [BaseHOP under torch.func transforms]."""
    leading, subgraph, operands = hop._split(args)
    if not torch._C._is_fwd_grad_enabled() or not any(
            _tangent(t, 0) is not None for t in operands):
        return _lowered_call(hop, interpreter, leading, subgraph, operands, kwargs)
    if not _dispatch.tracing_underway():
        # NOTE [Effects under torch.func grad and jvp]
        return hop._run(leading, subgraph, operands, kwargs)
    return _apply_level_function(hop, interpreter, leading, subgraph, operands, kwargs)


# NOTE [Effects under torch.func grad and jvp]
# The level function below recomputes the body: its backward is the HOP of the
# body's vjp, its jvp the HOP of the body's jvp, each running the body's
# forward again. A registered effectful op in the body would then run twice.
# So where nothing records a graph (eager), grad and jvp run the body right at
# their level, as they would the plain body: each op is differentiated by the
# transform, every effect runs once in program order, and nothing is visible
# that a HOP node would have kept. While a graph is recorded (make_fx,
# torch.compile), the HOP stays one node through the level function, and a
# body that calls an effectful op is refused with an error naming the op and
# the transform (_refuse_recomputed_effects), as soon as the forward HOP call
# is traced: an error raised later, in the compiled backward, would leave
# torch's functorch layers in disorder.


class _SingleOutput:
    """Whether the body returned one tensor rather than a tuple (set by a forward)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = False


def _tangent(t: Any, level: int | None = None) -> Any:
    """``t``'s forward-AD tangent at ``level`` (default: ``_dual_level()``), or None."""
    if level is None:
        level = _dual_level()
    if level < 0 or not isinstance(t, torch.Tensor):
        return None
    return torch._VF._unpack_dual(t, level)[1]


def _dual_level() -> int:
    """The open forward-AD dual level, or -1.

    ``forward_ad._current_level`` says, except in a graph Dynamo compiled from
    ``torch.func.jvp`` or ``forward_ad.dual_level``: its replay enters the
    level through ``torch._functorch.predispatch._enter_dual_level``, which
    leaves that Python variable at -1 while the level is open. Forward AD
    allows one level, 0; it is read there when a functorch jvp level is on the
    interpreter stack. Never otherwise: reading a tangent is an op
    (``_unpack_dual``) that make_fx would record.
    """
    from torch.autograd import forward_ad

    level = forward_ad._current_level
    if level >= 0:
        return level
    return 0 if _jvp_interpreter_active() else -1


def _jvp_interpreter_active() -> bool:
    jvp = torch._C._functorch.TransformType.Jvp
    stack = torch._C._functorch.get_interpreter_stack()
    return stack is not None and any(i.key() == jvp for i in stack)


class _LevelFunction(torch.autograd.function._SingleLevelFunction):
    """One grad or jvp level of a HOP call (NOTE [BaseHOP under torch.func transforms]).

    forward: the HOP of the body one level down; backward: the HOP of the
    body's vjp at this level; jvp: the HOP of the body's jvp one level down.
    """

    @staticmethod
    def forward(hop: Any, interpreter: Any, leading: tuple[Any, ...], subgraph: Any,
                kwargs: dict[str, Any], single: _SingleOutput, *operands: Any) -> Any:
        level = interpreter.level()
        unwrapped = _unwrap_for_grad(operands, level)
        # Refused here, in forward, rather than when the recomputation is
        # traced: an error raised in a compiled backward leaves torch's
        # functorch layers in disorder (an internal assert on torch 2.11).
        transform = ("torch.func.jvp (jvp, jacfwd, hessian)"
                     if interpreter.key() == torch._C._functorch.TransformType.Jvp
                     else "torch.func.grad (grad, vjp, jacrev, hessian)")
        with _below(interpreter), _refuse_recomputed_effects(transform):
            out = hop(*leading, subgraph, *unwrapped, **kwargs)
        single.value = not isinstance(out, (tuple, list))
        outs = (out,) if single.value else tuple(out)
        return tuple(_wrap_for_grad(outs, level))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        hop, interpreter, leading, subgraph, kwargs, _, *operands = inputs
        ctx.hop, ctx.interpreter, ctx.leading, ctx.subgraph, ctx.kwargs = (
            hop, interpreter, leading, subgraph, kwargs)
        ctx.layout = [isinstance(x, torch.Tensor) for x in operands]
        ctx.others = [x for x in operands if not isinstance(x, torch.Tensor)]
        tensors = [x for x in operands if isinstance(x, torch.Tensor)]
        if interpreter.key() == torch._C._functorch.TransformType.Jvp:
            ctx.save_for_forward(*tensors)
        else:
            ctx.save_for_backward(*tensors)
        ctx.diff = tuple(i for i, x in enumerate(operands)
                         if isinstance(x, torch.Tensor) and x.requires_grad)
        ctx.out_meta = [(o.shape, o.dtype, o.device) if isinstance(o, torch.Tensor) else None
                        for o in output]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        # At this level if it is still alive (grad, jacrev), else wherever the
        # caller is (a vjp_fn called after torch.func.vjp returned: its
        # wrappers are dead and unwrap to the level below).
        unwrap_if_dead = torch._C._functorch.unwrap_if_dead
        operands = [unwrap_if_dead(x) if isinstance(x, torch.Tensor) else x
                    for x in _saved_slots(ctx)]
        cotangents = [
            unwrap_if_dead(g).contiguous() if g is not None
            else torch.zeros(m[0], dtype=m[1], device=m[2])
            for g, m in zip(grads, ctx.out_meta)
        ]
        hop = ctx.hop
        body = _VjpBody(hop._bind(ctx.leading, ctx.subgraph, ctx.kwargs), len(operands), ctx.diff)
        leading, kwargs = hop._backward_args(ctx.leading, ctx.kwargs)
        res = hop(*leading, _as_subgraph(body), *operands, *cotangents, **kwargs)
        res = res if isinstance(res, (tuple, list)) else (res,)
        operand_grads: list[Any] = [None] * len(operands)
        for i, g in zip(ctx.diff, res):
            operand_grads[i] = g
        return (None, None, None, None, None, None, *operand_grads)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        interpreter = ctx.interpreter
        level = interpreter.level()
        primals = _unwrap_for_grad(_saved_slots(ctx), level)
        op_tangents = _unwrap_for_grad(tangents[6:], level)
        with _below(interpreter):
            out = _jvp_call(ctx.hop, ctx.leading, ctx.subgraph, ctx.kwargs, primals,
                            op_tangents, None)
        return tuple(_wrap_for_grad(out, level))


def _jvp_call(hop: BaseHOP, leading: tuple[Any, ...], subgraph: Any, kwargs: dict[str, Any],
              primals: Sequence[Any], tangents: Sequence[Any],
              num_outputs: int | None) -> tuple[Any, ...]:
    """``hop(jvp of subgraph, *primals, *tangents)``: the outputs' tangents."""
    diff = tuple(i for i, t in enumerate(tangents) if isinstance(t, torch.Tensor))
    body = _JvpBody(subgraph, len(primals), diff, num_outputs)
    res = hop(*leading, _as_subgraph(body), *primals, *(tangents[i] for i in diff), **kwargs)
    return tuple(res) if isinstance(res, (tuple, list)) else (res,)


class _JvpBody:
    """``(*operands, *tangents of operands[diff]) -> tangents of the outputs``."""

    __slots__ = ("fn", "n", "diff", "num_outputs")

    def __init__(self, fn: Callable[..., Any], n: int, diff: tuple[int, ...],
                 num_outputs: int | None) -> None:
        self.fn, self.n, self.diff, self.num_outputs = fn, n, diff, num_outputs

    def __call__(self, *args: Any) -> Any:
        primals, tangents = list(args[: self.n]), args[self.n:]

        def f(*dp: Any) -> Any:
            ps = list(primals)
            for i, p in zip(self.diff, dp):
                ps[i] = p
            out = self.fn(*ps)
            outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            return outs if self.num_outputs is None else outs[: self.num_outputs]

        diff_primals = tuple(primals[i] for i in self.diff)
        with _refuse_recomputed_effects("torch.func.jvp (jvp, jacfwd, hessian)"):
            if not self.diff:  # no operand has a tangent at this level
                t_out = tuple(torch.zeros_like(o) for o in f(*diff_primals))
            else:
                t_out = _jvp(f, diff_primals, tuple(tangents))
        return _fresh(t_out, args)


@contextlib.contextmanager
def _refuse_recomputed_effects(transform: str) -> Iterator[None]:
    """Refuse a traced recomputation of the body that calls an effectful op.

    NOTE [Effects under torch.func grad and jvp]: only reached while a graph is
    recorded; the nodes the recomputation adds to that graph are checked.
    """
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    mode = get_proxy_mode()
    if mode is None:
        yield
        return
    graph = mode.tracer.graph
    before = len(graph.nodes)
    yield
    # A function-level import: hopkit.effects sits above base_hop.
    from hopkit.effects import _hop as effects_hop
    from hopkit.effects import _registry

    root = getattr(mode.tracer, "root", None)  # a graph-appending tracer has none

    def calls(nodes: Sequence[torch.fx.Node]) -> Iterator[Any]:
        for node in nodes:
            if node.op == "call_function":
                yield node.args[1] if node.target is effects_hop.with_effects else node.target
            elif node.op == "get_attr":  # a HOP's body: look inside it too
                sub = getattr(root, str(node.target), None)
                if isinstance(sub, torch.fx.GraphModule):
                    yield from calls(list(sub.graph.nodes))

    for op in calls(list(graph.nodes)[before:]):
        if _registry.hopkit_effect(op) is not None:
            raise NotImplementedError(
                f"hopkit: under {transform} while tracing (make_fx, torch.compile), "
                f"a hopkit HOP's body is recomputed to differentiate it, and it "
                f"calls {_registry.display_name(op)}, which is registered "
                f"effectful: its effect would run twice. Apply the transform "
                f"outside torch.compile (eager runs the body once), call the "
                f"effectful op outside the HOP, or use torch.autograd.grad on "
                f"the HOP call instead of torch.func."
            )


def _jvp(f: Callable[..., tuple[Any, ...]], primals: tuple[Any, ...],
         tangents: tuple[Any, ...]) -> tuple[Any, ...]:
    """The tangents of ``f(*primals)``: ``torch.func.jvp``, at a jvp level of its own.

    ``torch.func.jvp`` itself opens a dual level unless a ``torch.func.jvp``
    is already running, and forward AD refuses a second one ("Nested forward
    mode AD"); but a level may be open that no ``torch.func.jvp`` opened: a
    ``forward_ad.dual_level`` around the call, or the replay of a compiled
    jvp (``_dual_level``). So this opens the dual level only if none is open,
    and pushes its own functorch jvp level, which is what keeps the body's
    tangents apart from an outer level's and gives it autograd where it runs
    below autograd (under a HOP's fake or proxy rule).
    """
    from torch.autograd.forward_ad import _set_fwd_grad_enabled

    functorch = torch._C._functorch
    opened = not _dual_level_is_open()
    if opened:
        torch._C._enter_dual_level()
    level = functorch._jvp_increment_nesting()
    try:
        with _set_fwd_grad_enabled(True):
            duals = [torch._VF._make_dual(p, t, 0) for p, t in zip(primals, tangents)]
            result = []
            for o in f(*duals):
                primal, tangent = torch._VF._unpack_dual(o, 0)
                tangent = torch.zeros_like(primal) if tangent is None else tangent
                result.append(functorch._unwrap_for_grad(tangent, level))
    finally:
        functorch._jvp_decrement_nesting()
        if opened:
            torch._C._exit_dual_level(0)
    return tuple(result)


def _dual_level_is_open() -> bool:
    from torch.autograd import forward_ad

    if forward_ad._current_level >= 0:
        return True
    # Python may not know (``_dual_level``); the C level does. Forward AD has
    # one level, so entering one fails exactly when it is open.
    try:
        torch._C._enter_dual_level()
    except RuntimeError:
        return True
    torch._C._exit_dual_level(0)
    return False


def has_forward_tangents(operands: Sequence[Any]) -> bool:
    """Whether forward-mode AD (``torch.autograd.forward_ad``) is on and an operand is dual."""
    level = _dual_level()
    if level < 0 or not torch._C._is_fwd_grad_enabled():
        return False
    return any(_tangent(t, level) is not None for t in operands)


def base_hop_forward_ad(hop: BaseHOP, leading: tuple[Any, ...], subgraph: Any,
                        operands: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The autograd rule for dual operands: the tangents are ``hop(jvp of body)``.

    With operands that also need grad, BaseHOP's autograd function (whose jvp
    this module supplies, ``autograd_function_jvp``) carries both.
    """
    from hopkit.base_hop import _BaseHOPFunction, _build_autograd_plan

    if torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in operands):
        plan = _build_autograd_plan(hop, leading, subgraph, operands, kwargs)
        outs = _BaseHOPFunction.apply(hop, plan, leading, kwargs, *operands)
        return outs[0] if plan.single_output else outs
    single = _SingleOutput()
    outs = _ForwardADFunction.apply(hop, leading, subgraph, kwargs, single, *operands)
    return outs[0] if single.value else outs


class _ForwardADFunction(torch.autograd.Function):
    """A HOP call on dual operands that need no grad: body now, its jvp for tangents."""

    @staticmethod
    def forward(ctx: Any, hop: Any, leading: tuple[Any, ...], subgraph: Any,
                kwargs: dict[str, Any], single: _SingleOutput, *operands: Any) -> Any:
        with torch._C._AutoDispatchBelowAutograd():
            out = hop(*leading, subgraph, *operands, **kwargs)
        single.value = not isinstance(out, (tuple, list))
        ctx.hop, ctx.leading, ctx.subgraph, ctx.kwargs = hop, leading, subgraph, kwargs
        ctx.layout = [isinstance(x, torch.Tensor) for x in operands]
        ctx.others = [x for x in operands if not isinstance(x, torch.Tensor)]
        ctx.save_for_forward(*(x for x in operands if isinstance(x, torch.Tensor)))
        return (out,) if single.value else tuple(out)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        primals = _saved_slots(ctx)
        return _jvp_call(ctx.hop, ctx.leading, ctx.subgraph, ctx.kwargs, primals,
                         tangents[5:], None)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # never: no operand needs grad
        raise RuntimeError("hopkit: internal error: backward of a forward-AD-only HOP call")


def _saved_slots(ctx: Any) -> list[Any]:
    tensors, others = iter(ctx.saved_tensors), iter(ctx.others)
    return [next(tensors) if is_t else next(others) for is_t in ctx.layout]


def autograd_function_jvp(ctx: Any, operand_tangents: Sequence[Any]) -> tuple[Any, ...]:
    """``_BaseHOPFunction.jvp``: the tangents of the HOP's outputs, from the HOP
    of the forward graph's jvp (its first ``num_outputs`` outputs)."""
    primals = ctx.fwd_operands
    del ctx.fwd_operands  # jvp runs once, right after forward
    return _jvp_call(ctx.hop, ctx.leading, ctx.plan.fw, ctx.kwargs, primals,
                     operand_tangents, ctx.plan.num_outputs)


# ---------------------------------------------------------------------------
# Registration: one line per transform
# ---------------------------------------------------------------------------


def register_functorch_rules(hop: BaseHOP) -> None:
    """Register ``hop``'s rules for torch's functorch transforms.

    ``TransformType.Functionalize`` is BaseHOP's functionalize rule
    (``py_functionalize_impl``); forward-mode AD outside a transform is
    BaseHOP's autograd rule, calling ``base_hop_forward_ad``.
    """
    transform = torch._C._functorch.TransformType
    p = functools.partial
    hop.py_impl(transform.Vmap)(p(base_hop_vmap, hop))
    hop.py_impl(transform.Grad)(p(base_hop_grad, hop))
    hop.py_impl(transform.Jvp)(p(base_hop_jvp, hop))
