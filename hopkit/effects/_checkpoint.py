"""Effects under activation checkpointing: recompute never runs an effect again.

See NOTE [Effects under activation checkpointing] below. Installed with the
rest of hopkit.effects' integration (hopkit/effects/_torch_integration.py) on
first use, through hopkit._patch, when (and if) ``torch.utils.checkpoint`` is
imported.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from hopkit import _compat, _patch
from hopkit.effects import _registry

__all__ = ["install_checkpoint_hooks"]

# NOTE [Effects under activation checkpointing]
# Activation checkpointing runs a region's forward again in backward to get
# back the activations it did not save. A registered effectful op (hopkit's
# registry, ORDERED) must not run again: its recomputation reuses the outputs
# its forward call produced, and a policy that insists on recomputing it is
# refused. Per checkpointing style:
#
# * eager, non-reentrant ``torch.utils.checkpoint`` with no ``context_fn``:
#   the region's forward runs under ``_SaveEffects``, a dispatch mode that
#   keeps the (detached) outputs of each effectful call in order, and its
#   recomputation under ``_ReplayEffects``, which hands them back in the same
#   order instead of calling the op. Every other op passes through. The modes
#   are added only while some op is registered with an effect.
# * eager, reentrant ``torch.utils.checkpoint``: the same two modes, around
#   ``CheckpointFunction``'s forward and around the function its backward
#   re-runs.
# * selective activation checkpointing (``create_selective_checkpoint_contexts``,
#   eager and compiled): torch's own caching modes already reuse saved outputs;
#   the policy is wrapped so that an effectful op answered PREFER_RECOMPUTE
#   (or ``False``) is saved (PREFER_SAVE), and MUST_RECOMPUTE raises an error
#   naming the op. Under compile the policy becomes the nodes' recompute tags.
# * compiled activation checkpointing (the regions of
#   ``tag_activation_checkpoint``, min-cut or default partitioner): every
#   effectful node's outputs are saved whatever its recompute tag
#   (_force_save_effectful_ops in hopkit/effects/_torch_integration.py).
#
# The eager hooks sit in torch.utils.checkpoint's non-reentrant generator
# (through which both ``checkpoint`` and the composable
# ``torch.distributed._composable.checkpoint`` go) and its ``CheckpointFunction``;
# both are looked up by name at call time, so a user's
# ``from torch.utils.checkpoint import checkpoint`` is covered too. Can go when
# torch's checkpointing consults the effect registry itself (torch issues
# #124866, #196956).

_CHECKPOINT = "torch.utils.checkpoint"


def _effectful(func: Any) -> bool:
    """Whether ``func`` is an op hopkit's registry gives an effect."""
    return _registry.hopkit_effect(func) is not None and not _registry.aliases(func)


def _any_effect_registered() -> bool:
    return any(effect is not None for effect in _registry._REGISTRY.values())


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


class _SaveEffects(TorchDispatchMode):
    """Forward of a checkpointed region: run each effectful call once and
    keep its outputs for the recomputation (NOTE [Effects under activation
    checkpointing])."""

    def __init__(self, saved: list[tuple[Any, Any]]) -> None:
        super().__init__()
        self.saved = saved

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if _effectful(func):
            self.saved.append((func, pytree.tree_map(_detach, out)))
        return out


class _ReplayEffects(TorchDispatchMode):
    """Recomputation of a checkpointed region: hand each effectful call the
    outputs its forward call produced, in order, instead of running it."""

    def __init__(self, saved: list[tuple[Any, Any]]) -> None:
        super().__init__()
        self.saved = saved
        self.next = 0

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __enter__(self) -> Any:
        self.next = 0  # each backward (retain_graph) recomputes from the start
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not _effectful(func):
            return func(*args, **(kwargs or {}))
        if self.next >= len(self.saved) or self.saved[self.next][0] is not func:
            forward = [_registry.display_name(f) for f, _ in self.saved]
            raise RuntimeError(
                f"hopkit: activation checkpointing recomputed a call of "
                f"{_registry.display_name(func)}, which is registered effectful, "
                f"but the checkpointed forward made no such call at this point "
                f"(its effectful calls, in order: {forward}). The recomputation "
                f"must repeat the forward's effectful calls in the same order, "
                f"so that their saved outputs are reused instead of running the "
                f"effects again; keep control flow inside the checkpointed "
                f"function independent of global state."
            )
        _, out = self.saved[self.next]
        self.next += 1
        return out


class _both:
    """Enter ``outer`` then ``inner``; re-enterable, as a recomputation
    context must be (each backward through ``retain_graph`` recomputes)."""

    def __init__(self, outer: Any, inner: Any) -> None:
        self.outer = outer
        self.inner = inner

    def __enter__(self) -> None:
        self.outer.__enter__()
        try:
            self.inner.__enter__()
        except BaseException:
            self.outer.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            self.inner.__exit__(*exc)
        finally:
            self.outer.__exit__(*exc)


def _is_tracing(args: Any) -> bool:
    """Inside AOTAutograd or export tracing (compiled checkpointing is the
    partitioner's business), or Dynamo."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if torch.compiler.is_compiling():
        return True
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None:
        return True
    return any(isinstance(a, (FakeTensor, FunctionalTensor)) for a in pytree.tree_leaves(args))


# ---------------------------------------------------------------------------
# Selective activation checkpointing: the policy
# ---------------------------------------------------------------------------


def _effect_aware_policy(policy_fn: Any) -> Any:
    if getattr(policy_fn, "_hopkit_effect_aware", False):
        return policy_fn
    from torch.utils.checkpoint import CheckpointPolicy

    @functools.wraps(policy_fn)
    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        answer = policy_fn(ctx, func, *args, **kwargs)
        if not _effectful(func):
            return answer
        if answer is True:
            return CheckpointPolicy.MUST_SAVE
        if answer is False or answer == CheckpointPolicy.PREFER_RECOMPUTE:
            return CheckpointPolicy.PREFER_SAVE
        if answer == CheckpointPolicy.MUST_RECOMPUTE:
            raise RuntimeError(
                f"hopkit: the selective activation checkpointing policy returned "
                f"CheckpointPolicy.MUST_RECOMPUTE for "
                f"{_registry.display_name(func)}, which is registered with "
                f"hopkit.effects as {_registry.hopkit_effect(func)}; recomputing "
                f"it would run its side effect again in backward. Return "
                f"MUST_SAVE or PREFER_SAVE for it (PREFER_RECOMPUTE is treated as "
                f"PREFER_SAVE for effectful ops), or destroy its registration."
            )
        return answer

    policy._hopkit_effect_aware = True  # type: ignore[attr-defined]
    return policy


def _make_policies_effect_aware(*modes: Any) -> bool:
    """Wrap the policy of torch's SAC modes among ``modes``; whether any was."""
    from torch.utils import checkpoint as ckpt

    sac_types = tuple(
        t for t in (getattr(ckpt, "_CachingTorchDispatchMode", None),
                    getattr(ckpt, "_CachedTorchDispatchMode", None))
        if t is not None
    )
    found = False
    for mode in modes:
        if sac_types and isinstance(mode, sac_types):
            found = True
            # 2.11-2.12 ask the policy again during recomputation; 2.13+ keep
            # the forward's answer (and the cached mode's policy is None).
            if getattr(mode, "policy_fn", None) is not None:
                mode.policy_fn = _effect_aware_policy(mode.policy_fn)
    return found


# ---------------------------------------------------------------------------
# The hooks
# ---------------------------------------------------------------------------


def _with_effect_replay(context_fn: Any, noop: Any) -> Any:
    if getattr(context_fn, "_hopkit_effect_replay", False):
        return context_fn

    def context_fn_with_effect_replay() -> tuple[Any, Any]:
        forward_ctx, recompute_ctx = context_fn()
        if _make_policies_effect_aware(forward_ctx, recompute_ctx):
            return forward_ctx, recompute_ctx  # SAC saves effectful outputs itself
        saved: list[tuple[Any, Any]] = []
        return (_both(forward_ctx, _SaveEffects(saved)),
                _both(recompute_ctx, _ReplayEffects(saved)))

    context_fn_with_effect_replay._hopkit_effect_replay = True  # type: ignore[attr-defined]
    return context_fn_with_effect_replay


def _wrap_generator(mod: types.ModuleType, original: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def generator(*args: Any, **kwargs: Any) -> Any:
        if not _any_effect_registered():
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        context_fn = bound.arguments.get("context_fn", mod.noop_context_fn)
        debug = bound.arguments.get("debug", False)
        fn_args = (bound.arguments.get("args"), bound.arguments.get("kwargs"))
        if context_fn is mod.noop_context_fn and (debug or _is_tracing(fn_args)):
            # debug=True refuses any context_fn; traced regions are handled
            # by the partitioner (NOTE [Effects under activation checkpointing]).
            return original(*args, **kwargs)
        bound.arguments["context_fn"] = _with_effect_replay(context_fn, mod.noop_context_fn)
        return original(*bound.args, **bound.kwargs)

    return generator


def _make_checkpoint_function(original: Any) -> Any:
    class CheckpointFunction(original):
        """torch's reentrant CheckpointFunction, whose recomputation reuses
        the effectful calls' outputs (NOTE [Effects under activation
        checkpointing])."""

        @staticmethod
        def forward(ctx: Any, run_function: Any, preserve_rng_state: Any, *args: Any) -> Any:
            if not _any_effect_registered() or _is_tracing(args):
                return original.forward(ctx, run_function, preserve_rng_state, *args)
            saved: list[tuple[Any, Any]] = []
            with _SaveEffects(saved):
                out = original.forward(ctx, run_function, preserve_rng_state, *args)
            replay = _ReplayEffects(saved)

            def recompute(*inputs: Any) -> Any:
                with replay:
                    return run_function(*inputs)

            ctx.run_function = recompute
            return out

    CheckpointFunction.__qualname__ = original.__qualname__
    CheckpointFunction.__module__ = original.__module__
    return CheckpointFunction


def _install(mod: types.ModuleType) -> None:
    name = _compat.non_reentrant_checkpoint_generator_name()
    _patch.patch_function(
        mod.__name__, name, functools.partial(_wrap_generator, mod),
        consumers=("torch.distributed._composable.checkpoint_activation",),
        why="reuse effectful ops' outputs when activation checkpointing recomputes",
    )
    _patch.patch_function(
        mod.__name__, "CheckpointFunction", _make_checkpoint_function,
        why="reuse effectful ops' outputs when reentrant checkpointing recomputes",
    )


def install_checkpoint_hooks() -> None:
    """Install the hooks of NOTE [Effects under activation checkpointing]
    when (and if) torch.utils.checkpoint is imported."""
    _patch.when_imported(_CHECKPOINT, _install,
                         why="keep activation checkpointing from re-running hopkit's effects")
