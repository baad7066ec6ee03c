"""hopkit.BaseHOP under a user dispatch mode: an eager training step.

Variants, on the same inputs in the same run, each under the same no-op
``TorchDispatchMode`` (it calls every op it sees):

- ``plain``:   the body called directly, ``tanh(x @ w)``;
- ``hopkit``:  ``hop(FunctionWithNoFreeVars(body), x, w)``;
- ``cond``:    torch's in-tree ``torch.cond(True, body, body, (x, w))``.

Two modes: ``plain-mode`` (no ``supports_higher_order_operators``, which
torch's ``cond`` refuses, so it has no cond column) and ``hop-aware``
(``supports_higher_order_operators=True``). The step is forward + backward.
Target (issue 13): hopkit <= 3x plain under the same mode.

Rounds alternate the variants (rotated each round); each round is one
``torch.utils.benchmark.Timer.blocked_autorange`` per variant; the table
gives medians and minimums over all blocks, and ratios of medians (of
minimums in brackets). ``--timer cpu`` measures this process's CPU time,
steadier on a shared machine.

    python benchmarks/bench_modes.py
    python benchmarks/bench_modes.py --rounds 7 --min-run-time 0.3 --timer cpu

Not collected by pytest (no ``test_`` names; run it as a script).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.benchmark as benchmark
from torch.utils._python_dispatch import TorchDispatchMode

import hopkit


class BenchModesHop(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("bench_hopkit_modes_hop")


hop = BenchModesHop()


def body(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
    return (torch.tanh(x @ w),)


class NoOpMode(TorchDispatchMode):
    def __init__(self, hops: bool) -> None:
        super().__init__()
        self.supports_higher_order_operators = hops

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def variants(hops: bool) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    wrapped = hopkit.FunctionWithNoFreeVars(body)
    out: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "plain": lambda x, w: body(x, w)[0],
        "hopkit": lambda x, w: hop(wrapped, x, w)[0],
    }
    if hops:
        out["cond"] = lambda x, w: torch.cond(True, body, body, (x, w))[0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--timer", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    clock = time.process_time if args.timer == "cpu" else time.perf_counter
    if args.timer == "cpu":
        torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {args.device}, python {platform.python_version()}, "
          f"x {args.batch}x{args.hidden}, w {args.hidden}x{args.hidden}, timer {args.timer}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.hidden, generator=gen).to(args.device).requires_grad_()
    w = torch.randn(args.hidden, args.hidden, generator=gen).to(args.device).requires_grad_()

    rows = []
    for hops in (False, True):
        fns = variants(hops)
        mode = NoOpMode(hops)

        def make_step(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
            def step() -> None:
                with mode:
                    fn(x, w).sum().backward()
                x.grad = w.grad = None
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()

            return step

        steps = {n: make_step(f) for n, f in fns.items()}
        for s in steps.values():
            for _ in range(3):
                s()
        blocks: dict[str, list[float]] = {n: [] for n in steps}
        names = list(steps)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                timer = benchmark.Timer("step()", globals={"step": steps[name]}, timer=clock)
                blocks[name].extend(timer.blocked_autorange(min_run_time=args.min_run_time).times)
        rows.append(("hop-aware" if hops else "plain-mode",
                     {n: (statistics.median(t), min(t)) for n, t in blocks.items()}))

    print("\nfwd+bwd step under a no-op TorchDispatchMode; us, median / minimum")
    head = f"{'mode':<12}{'plain':>20}{'hopkit':>20}{'cond':>20}{'hopkit/plain':>18}{'cond/plain':>18}"
    print(head)
    print("-" * len(head))
    for label, stats in rows:
        line = f"{label:<12}"
        for v in ("plain", "hopkit", "cond"):
            s = stats.get(v)
            line += f"{f'{s[0] * 1e6:,.1f} / {s[1] * 1e6:,.1f}' if s else '-':>20}"
        for v in ("hopkit", "cond"):
            s, p = stats.get(v), stats["plain"]
            line += f"{f'{s[0] / p[0]:.2f}x ({s[1] / p[1]:.2f}x)' if s else '-':>18}"
        print(line)
    worst = max(stats["hopkit"][0] / stats["plain"][0] for _, stats in rows)
    print(f"\ntarget: hopkit <= 3x plain under the same mode: worst median ratio "
          f"{worst:.2f}x -> {'met' if worst <= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
