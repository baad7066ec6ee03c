"""hopkit.effects vs torch's in-tree effect tokens vs no effect at all.

A function makes ``--calls`` calls of a logging custom op (``x -> x.clone()``
plus a Python-side counter) between pointwise ops, and is compiled with each
backend three times, once per registration of that op:

- ``unregistered``: the op has no effect (calls may be reordered or dropped);
- ``hopkit``: ``hopkit.effects.register_effectful_op(op, EffectType.ORDERED)``;
- ``in-tree``: torch's own ``CustomOpDef.register_effect(EffectType.ORDERED)``.

Each variant uses its own op (same implementation) so all three stay
registered for the whole run. After warm-up, variants are timed in short
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

import torch
import torch.utils.benchmark as benchmark
from torch._library.effects import EffectType as TorchEffectType

from hopkit.effects import EffectType, register_effectful_op

VARIANTS = ("unregistered", "hopkit", "in-tree")
CALLS: dict[str, int] = {}


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
        ops[variant] = op
    register_effectful_op(ops["hopkit"], EffectType.ORDERED)
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


if __name__ == "__main__":
    main()
