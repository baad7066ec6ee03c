"""hopkit.effects vs torch's in-tree effect tokens vs no effect at all.

A function makes ``--calls`` calls of a logging custom op (``x -> x.clone()``
plus a Python-side counter) between pointwise ops, and is compiled with each
backend three times, once per registration of that op:

- ``unregistered``: the op has no effect (calls may be reordered or dropped);
- ``hopkit``: ``hopkit.effects.register_effectful_op(op, EffectType.ORDERED)``;
- ``in-tree``: torch's own ``CustomOpDef.register_effect(EffectType.ORDERED)``.

Each variant uses its own op (same implementation) so all three stay
registered for the whole compiled run.

A second table (``--ckpt-layers`` > 0) times an eager training step (forward
and backward) of a small MLP whose layers are each wrapped in non-reentrant
``torch.utils.checkpoint`` and each log their activation, with the logging op
``unregistered`` (no hopkit registration active at all: torch's checkpointing
untouched) and ``hopkit`` (registered ORDERED: recomputation reuses the
effect's saved output, NOTE [Effects under activation checkpointing]). The
registration is made and destroyed between blocks, outside the timers.
Target: hopkit at most 1.10x unregistered. After warm-up, variants are timed in short
blocks in alternation (A/B/C, then rotated, ``--rounds`` times), and the table
reports the median and the minimum over blocks, and their ratios. Targets: hopkit at most 1.10x unregistered,
and faster than in-tree.

    python benchmarks/bench_effects.py
    python benchmarks/bench_effects.py --size 65536 --calls 10 --backends aot_eager,inductor --rounds 300
"""

from __future__ import annotations

import argparse
import platform
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.benchmark as benchmark
from torch._library.effects import EffectType as TorchEffectType

from hopkit.effects import EffectType, register_effectful_op

VARIANTS = ("unregistered", "hopkit", "in-tree")
CALLS: dict[str, int] = {}


HANDLES: list[Any] = []


def define_ops(lib_name: str) -> dict[str, Callable[..., torch.Tensor]]:
    """One logging op per variant, all with the same implementation."""
    ops = {}
    for variant in VARIANTS:
        name = variant.replace("-", "_")

        def impl(x: torch.Tensor, _name: str = name) -> torch.Tensor:
            CALLS[_name] = CALLS.get(_name, 0) + 1
            return x.clone()

        op = torch.library.custom_op(f"{lib_name}::log_{name}", mutates_args=())(impl)
        op.register_fake(lambda x: torch.empty_like(x))
        op.register_autograd(lambda ctx, g: g)  # the checkpointed training arm
        ops[variant] = op
    HANDLES.append(register_effectful_op(ops["hopkit"], EffectType.ORDERED))
    ops["in-tree"].register_effect(TorchEffectType.ORDERED)  # type: ignore[attr-defined]
    return {v: getattr(getattr(torch.ops, lib_name), f"log_{v.replace('-', '_')}").default
            for v in VARIANTS}


def make_fn(op: Callable[..., torch.Tensor], calls: int, tag: str) -> Callable[..., torch.Tensor]:
    """``calls`` logging calls between pointwise ops; a fresh code object per
    variant, so Dynamo's caches never mix them."""
    src = (
        "def f(x):\n"
        f"    for _ in range({calls}):\n"
        "        x = x.sin()\n"
        "        x = op(x) * 0.5 + 1.0\n"
        "    return x\n"
    )
    scope: dict[str, object] = {"op": op}
    exec(compile(src, f"<bench_effects_{tag}>", "exec"), scope)
    return scope["f"]  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="elements of the input")
    parser.add_argument("--calls", type=int, default=10, help="effectful calls per function")
    parser.add_argument("--backends", default="aot_eager,inductor")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=200, help="A/B/C alternation rounds")
    parser.add_argument("--block", type=int, default=20, help="calls per timed block")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--ckpt-layers", type=int, default=4,
                        help="checkpointed layers of the eager training arm (0: skip it)")
    parser.add_argument("--ckpt-width", type=int, default=256)
    parser.add_argument("--ckpt-batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch._dynamo.config.cache_size_limit = 64
    ops = define_ops("hopkit_bench_effects")
    x = torch.randn(args.size, device=args.device)
    device_name = (
        torch.cuda.get_device_name(x.device) if x.is_cuda else platform.processor() or "cpu"
    )
    print(f"torch {torch.__version__}  device {args.device} ({device_name})  "
          f"threads {torch.get_num_threads()}  size {args.size}  calls {args.calls}  "
          f"rounds {args.rounds}")

    for backend in args.backends.split(","):
        fns = {}
        for variant in VARIANTS:
            fn = torch.compile(make_fn(ops[variant], args.calls, f"{backend}_{variant}"),
                               backend=backend, fullgraph=True)
            name = variant.replace("-", "_")
            CALLS[name] = 0
            fn(x)  # compile
            if CALLS[name] != args.calls:
                raise RuntimeError(f"{backend}/{variant}: {CALLS[name]} calls, expected {args.calls}")
            for _ in range(20):  # warm-up
                fn(x)
            fns[variant] = fn
        torch.testing.assert_close(fns["hopkit"](x), fns["unregistered"](x))

        # Fine-grained A/B/C alternation: short blocks, rotating order, so
        # load from other processes hits every variant alike.
        timers = {v: benchmark.Timer("fn(x)", globals={"fn": fns[v], "x": x}) for v in VARIANTS}
        per_block: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % 3:] + VARIANTS[: r % 3]
            for variant in order:
                per_block[variant].append(timers[variant].timeit(args.block).median)
        med = {v: statistics.median(ts) for v, ts in per_block.items()}
        mins = {v: min(ts) for v, ts in per_block.items()}
        print(f"\n[{backend}]")
        print(f"{'variant':<14}{'median us':>11}{'min us':>10}"
              f"{'/unregistered':>15}{'(min)':>8}{'/in-tree':>10}{'(min)':>8}"
              f"{'us/call over unregistered':>27}")
        for v in VARIANTS:
            over = (med[v] - med["unregistered"]) / args.calls * 1e6
            print(f"{v:<14}{med[v] * 1e6:>11.1f}{mins[v] * 1e6:>10.1f}"
                  f"{med[v] / med['unregistered']:>14.3f}x{mins[v] / mins['unregistered']:>7.3f}x"
                  f"{med[v] / med['in-tree']:>9.3f}x{mins[v] / mins['in-tree']:>7.3f}x"
                  f"{over:>27.2f}")


    if args.ckpt_layers > 0:
        bench_checkpointed(ops, args)


def bench_checkpointed(ops: dict[str, Callable[..., torch.Tensor]], args: Any) -> None:
    """The checkpointed training step, op unregistered vs registered."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layers = [torch.nn.Linear(args.ckpt_width, args.ckpt_width, device=args.device)
              for _ in range(args.ckpt_layers)]
    x = torch.randn(args.ckpt_batch, args.ckpt_width, device=args.device, requires_grad=True)

    def make_step(op: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def layer(lin: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.gelu(lin(op(h)))

        def step() -> None:
            h = x
            for lin in layers:
                h = checkpoint(layer, lin, h, use_reentrant=False)
            h.sum().backward()

        return step

    arms = ("unregistered", "hopkit")
    steps = {v: make_step(ops[v]) for v in arms}

    def set_registered(on: bool) -> None:
        for h in HANDLES:
            h.destroy()
        HANDLES.clear()
        if on:
            HANDLES.append(register_effectful_op(ops["hopkit"], EffectType.ORDERED))

    for v in arms:  # warm-up, and exactly one effect per layer and step
        set_registered(v == "hopkit")
        name = v.replace("-", "_")
        CALLS[name] = 0
        steps[v]()
        expected = args.ckpt_layers * (1 if v == "hopkit" else 2)  # forward (+ recompute)
        if CALLS[name] != expected:
            raise RuntimeError(f"checkpointed/{v}: {CALLS[name]} calls, expected {expected}")
        for _ in range(5):
            steps[v]()
    timers = {v: benchmark.Timer("step()", globals={"step": steps[v]}) for v in arms}
    per_block: dict[str, list[float]] = {v: [] for v in arms}
    rounds = max(args.rounds // 4, 10)
    for r in range(rounds):
        for v in (arms if r % 2 == 0 else arms[::-1]):
            set_registered(v == "hopkit")
            per_block[v].append(timers[v].timeit(max(args.block // 4, 2)).median)
    set_registered(True)
    med = {v: statistics.median(ts) for v, ts in per_block.items()}
    mins = {v: min(ts) for v, ts in per_block.items()}
    print(f"\n[eager checkpointed training step: {args.ckpt_layers} layers, width "
          f"{args.ckpt_width}, batch {args.ckpt_batch}, {rounds} rounds]")
    print(f"{'variant':<14}{'median us':>11}{'min us':>10}{'/unregistered':>15}{'(min)':>8}")
    for v in arms:
        print(f"{v:<14}{med[v] * 1e6:>11.1f}{mins[v] * 1e6:>10.1f}"
              f"{med[v] / med['unregistered']:>14.3f}x{mins[v] / mins['unregistered']:>7.3f}x")


if __name__ == "__main__":
    main()
