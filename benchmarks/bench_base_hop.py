"""hopkit.BaseHOP vs torch's in-tree BaseHOP vs calling the subgraph directly.

Three variants run on the same inputs in the same process:

- ``plain``:   the subgraph called directly, ``g(x, y)``;
- ``hopkit``:  ``hopkit_q(FunctionWithNoFreeVars(g), x, y, scheme="nf4")``;
- ``in-tree``: the same through a subclass of
  ``torch._higher_order_ops.base_hop.BaseHOP``.

Measurements (the targets in brackets: issue 15 raised (a), (b), (c) and the
steady state of (e) once the first ones were met):

(a) eager forward+backward, tiny body ``(x.sin() * y,)`` on ``--tiny`` elements
    [hopkit <= 1.2x plain];
(b) eager forward+backward, MLP body ``((x @ w1).relu() @ w2,)`` with x
    ``--batch`` x ``--hidden`` and two square weights [hopkit <= 1.05x plain];
(c) a no-grad eager call of the tiny body: overhead = HOP minus plain
    [hopkit overhead <= 0.2x the in-tree overhead];
(d) ``make_fx(tracing_mode="fake")`` of a function calling the HOP
    [hopkit <= 1.0x in-tree];
(e) ``torch.compile(backend="aot_eager")`` of a function calling the HOP:
    steady-state forward+backward step [hopkit <= 1.05x plain compiled] and the
    first call, which compiles forward and backward [hopkit <= 1.1x in-tree].

Every timed quantity is measured in ``--rounds`` rounds; the variants
alternate within a round (A B C, then rotated) so that noise from other
processes hits them alike. A round is one ``torch.utils.benchmark.Timer``
``blocked_autorange`` (``--min-run-time`` seconds) per variant after warm-up;
the table gives the median and the minimum over all blocks of all rounds.
First calls under torch.compile are timed one by one after
``torch._dynamo.reset()`` (``--compile-reps`` each, alternating), after one
discarded warm-up compile per variant. Ratios are of medians (and of
minimums, in brackets); a target is met when both ratios meet it.

On a shared machine wall time swings with other processes' load; ``--timer
cpu`` measures this process's CPU time instead (single-threaded), which
keeps the ratios stable under contention.

    python benchmarks/bench_base_hop.py
    python benchmarks/bench_base_hop.py --timer cpu
    python benchmarks/bench_base_hop.py --rounds 7 --min-run-time 0.5 --only a,b
    python benchmarks/bench_base_hop.py --device cuda

Not collected by pytest (no ``test_`` names; run it as a script).
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.benchmark as benchmark
from torch._higher_order_ops.base_hop import BaseHOP as TorchBaseHOP
from torch._higher_order_ops.base_hop import FunctionWithNoFreeVars as TorchFn
from torch.fx.experimental.proxy_tensor import make_fx

import hopkit

VARIANTS = ("plain", "hopkit", "in-tree")


class HopkitQuant(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("bench_hopkit_invoke_quant")


class InTreeQuant(TorchBaseHOP):
    def __init__(self) -> None:
        super().__init__("bench_in_tree_invoke_quant")


hopkit_q = HopkitQuant()
in_tree_q = InTreeQuant()


def tiny(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
    return (x.sin() * y,)


def mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor]:
    return ((x @ w1).relu() @ w2,)


BODIES: dict[str, Callable[..., tuple[torch.Tensor]]] = {"tiny": tiny, "mlp": mlp}


def callers(body: Callable[..., Any]) -> dict[str, Callable[..., torch.Tensor]]:
    """``fn(*operands) -> Tensor`` for each variant, each its own code object
    (so Dynamo caches never mix them)."""
    hk, it = hopkit.FunctionWithNoFreeVars(body), TorchFn(body)

    def plain(*ops: torch.Tensor) -> torch.Tensor:
        return body(*ops)[0]

    def via_hopkit(*ops: torch.Tensor) -> torch.Tensor:
        return hopkit_q(hk, *ops, scheme="nf4")[0]

    def via_in_tree(*ops: torch.Tensor) -> torch.Tensor:
        return in_tree_q(it, *ops, scheme="nf4")[0]

    return {"plain": plain, "hopkit": via_hopkit, "in-tree": via_in_tree}


def make_operands(body: str, args: argparse.Namespace, requires_grad: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes: list[tuple[int, ...]]
    if body == "tiny":
        shapes = [(args.tiny,), (args.tiny,)]
    else:
        shapes = [(args.batch, args.hidden), (args.hidden, args.hidden), (args.hidden, args.hidden)]
    return [
        (torch.randn(s, generator=gen) / (s[-1] ** 0.5 if len(s) == 2 else 1.0))
        .to(args.device)
        .requires_grad_(requires_grad)
        for s in shapes
    ]


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


@dataclass
class Stat:
    median: float  # seconds
    minimum: float

    @staticmethod
    def of(times: list[float]) -> Stat:
        return Stat(statistics.median(times), min(times))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_alternating(steps: dict[str, Callable[[], Any]], args: argparse.Namespace,
                     warmup: int = 3) -> dict[str, Stat]:
    """Block times of each step over ``args.rounds`` rounds, variants alternating."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    blocks: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            timer = benchmark.Timer("step()", globals={"step": steps[name]}, timer=args.clock)
            m = timer.blocked_autorange(min_run_time=args.min_run_time)
            blocks[name].extend(m.times)
    return {n: Stat.of(ts) for n, ts in blocks.items()}


def fwd_bwd_step(fn: Callable[..., torch.Tensor], operands: list[torch.Tensor],
                 device: str) -> Callable[[], None]:
    def step() -> None:
        fn(*operands).sum().backward()
        for t in operands:
            t.grad = None
        sync(device)

    return step


def no_grad_step(fn: Callable[..., torch.Tensor], operands: list[torch.Tensor],
                 device: str) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            fn(*operands)
        sync(device)

    return step


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    stats: dict[str, Stat]


@dataclass
class Target:
    label: str
    median: float
    minimum: float
    limit: float

    @property
    def verdict(self) -> str:
        # Both statistics must agree: on a loaded machine one alone can flip.
        med, mn = self.median <= self.limit, self.minimum <= self.limit
        return "yes" if med and mn else "NO" if not (med or mn) else "unclear (noise)"


ROWS: list[Row] = []
TARGETS: list[Target] = []
RATIOS = (("hopkit", "plain"), ("in-tree", "plain"), ("hopkit", "in-tree"))


def us(t: float) -> str:
    return f"{t * 1e6:,.1f}"


def print_rows() -> None:
    print("\ntimes in us, median / minimum; ratios of medians (of minimums in brackets)")
    head = f"{'measurement':<38}" + "".join(f"{v:>22}" for v in VARIANTS)
    head += "".join(f"{a + '/' + b:>22}" for a, b in RATIOS)
    print(head)
    print("-" * len(head))
    for row in ROWS:
        line = f"{row.label:<38}"
        for v in VARIANTS:
            s = row.stats.get(v)
            line += f"{f'{us(s.median)} / {us(s.minimum)}' if s else '-':>22}"
        for a, b in RATIOS:
            if a in row.stats and b in row.stats:
                med, mn = ratio(row.stats[a], row.stats[b])
                line += f"{f'{med:.2f}x ({mn:.2f}x)':>22}"
            else:
                line += f"{'-':>22}"
        print(line)


def print_targets() -> None:
    print(f"\n{'target':<54}{'median':>9}{'(min)':>10}{'target':>10}  met")
    for t in TARGETS:
        print(f"{t.label:<54}{t.median:>8.2f}x{f'({t.minimum:.2f}x)':>10}"
              f"{f'<= {t.limit:g}x':>10}  {t.verdict}")


def ratio(a: Stat, b: Stat) -> tuple[float, float]:
    return a.median / b.median, a.minimum / b.minimum


def add_target(label: str, stats: dict[str, Stat], num: str, den: str, limit: float) -> None:
    med, mn = ratio(stats[num], stats[den])
    TARGETS.append(Target(f"{label}: {num} / {den}", med, mn, limit))


# ---------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------


def bench_eager_fwd_bwd(body: str, args: argparse.Namespace, limit: float) -> None:
    operands = make_operands(body, args, requires_grad=True)
    fns = callers(BODIES[body])
    steps = {v: fwd_bwd_step(fns[v], operands, args.device) for v in VARIANTS}
    # Same numbers first: the comparison is only meaningful if all agree.
    grads = {}
    for v in VARIANTS:
        out = fns[v](*operands)
        grads[v] = torch.autograd.grad(out.sum(), operands)
    for v in ("hopkit", "in-tree"):
        torch.testing.assert_close(grads[v], grads["plain"])
    # In plain eager hopkit traces nothing (NOTE [BaseHOP plain-eager fast path]).
    stats = time_alternating(steps, args)
    label = f"({'a' if body == 'tiny' else 'b'}) eager fwd+bwd, {body}"
    ROWS.append(Row(label, stats))
    add_target(label, stats, "hopkit", "plain", limit)


def bench_no_grad(args: argparse.Namespace) -> None:
    operands = make_operands("tiny", args, requires_grad=True)
    fns = callers(BODIES["tiny"])
    steps = {v: no_grad_step(fns[v], operands, args.device) for v in VARIANTS}
    stats = time_alternating(steps, args)
    label = "(c) no-grad eager call, tiny"
    ROWS.append(Row(label, stats))
    over = {v: Stat(stats[v].median - stats["plain"].median,
                    stats[v].minimum - stats["plain"].minimum) for v in ("hopkit", "in-tree")}
    ROWS.append(Row("    overhead (HOP minus plain)", over))
    TARGETS.append(Target(
        "(c) no-grad overhead: hopkit / in-tree",
        over["hopkit"].median / over["in-tree"].median,
        over["hopkit"].minimum / over["in-tree"].minimum,
        0.2,
    ))


def bench_make_fx(args: argparse.Namespace) -> None:
    operands = make_operands("tiny", args, requires_grad=False)
    fns = callers(BODIES["tiny"])

    def tracer(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            make_fx(fn, tracing_mode="fake")(*operands)

        return step

    gm = make_fx(fns["hopkit"], tracing_mode="fake")(*operands)
    assert len(gm.graph.find_nodes(op="call_function", target=hopkit_q)) == 1
    stats = time_alternating({v: tracer(fns[v]) for v in VARIANTS}, args, warmup=2)
    label = "(d) make_fx(fake), tiny"
    ROWS.append(Row(label, stats))
    add_target(label, stats, "hopkit", "in-tree", 1.0)


def bench_compile(body: str, args: argparse.Namespace) -> None:
    import torch._dynamo
    import torch._functorch.config

    torch._dynamo.config.cache_size_limit = 64
    operands = make_operands(body, args, requires_grad=True)
    fns = callers(BODIES[body])

    def compiled_step(v: str) -> Callable[[], None]:
        c = torch.compile(fns[v], backend="aot_eager", fullgraph=True)
        return fwd_bwd_step(c, operands, args.device)

    # First calls: compile of forward and backward, one variant at a time.
    firsts: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with torch._functorch.config.patch(enable_autograd_cache=False):
        for v in VARIANTS:  # warm-up: lazy imports, first-use caches in torch
            torch._dynamo.reset()
            compiled_step(v)()
        for r in range(args.compile_reps):
            order = list(VARIANTS[r % 3:] + VARIANTS[: r % 3])
            for v in order:
                torch._dynamo.reset()
                gc.collect()
                step = compiled_step(v)
                t0 = args.clock()
                step()
                firsts[v].append(args.clock() - t0)
    first = {v: Stat.of(ts) for v, ts in firsts.items()}

    # Steady state: all three compiled side by side, then alternated.
    torch._dynamo.reset()
    steps = {v: compiled_step(v) for v in VARIANTS}
    for v in VARIANTS:
        steps[v]()
    stats = time_alternating(steps, args, warmup=5)

    label = f"(e) aot_eager fwd+bwd steady, {body}"
    ROWS.append(Row(label, stats))
    add_target(label, stats, "hopkit", "plain", 1.05)
    label = f"(e) aot_eager first call, {body}"
    ROWS.append(Row(label, first))
    add_target(label, first, "hopkit", "in-tree", 1.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", type=int, default=64, help="elements of the tiny body's inputs")
    parser.add_argument("--batch", type=int, default=32, help="MLP: rows of x")
    parser.add_argument("--hidden", type=int, default=256, help="MLP: width of x, w1, w2")
    parser.add_argument("--rounds", type=int, default=5, help="alternation rounds per measurement")
    parser.add_argument("--min-run-time", type=float, default=0.25,
                        help="seconds per variant per round")
    parser.add_argument("--compile-reps", type=int, default=5,
                        help="first calls (compiles) timed per variant")
    parser.add_argument("--compile-bodies", default="tiny,mlp",
                        help="bodies for (e), comma-separated: tiny, mlp")
    parser.add_argument("--only", default="a,b,c,d,e", help="measurements to run, e.g. a,c")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter. cpu: time.process_time, the CPU time "
                             "of this process, much less sensitive to other processes on a "
                             "shared machine; implies --threads 1 unless given, so that CPU "
                             "time equals wall time on an idle machine (not for CUDA)")
    args = parser.parse_args()
    args.clock = time.perf_counter if args.timer == "wall" else time.process_time

    # Torch's own noise, whatever the variant.
    warnings.filterwarnings("ignore", message="Your compiler for AOTAutograd is returning")
    if args.timer == "cpu" and args.threads is None:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
        else platform.processor() or platform.machine() or "cpu"
    )
    print(f"torch {torch.__version__}  python {platform.python_version()}  "
          f"device {args.device} ({device_name})  threads {torch.get_num_threads()}  "
          f"timer {args.timer}")
    print(f"tiny {args.tiny}  mlp x {args.batch}x{args.hidden}, w {args.hidden}x{args.hidden}  "
          f"rounds {args.rounds} x {args.min_run_time}s  compile reps {args.compile_reps}")

    only = set(args.only.split(","))
    t0 = time.perf_counter()
    if "a" in only:
        bench_eager_fwd_bwd("tiny", args, 1.2)
    if "b" in only:
        bench_eager_fwd_bwd("mlp", args, 1.05)
    if "c" in only:
        bench_no_grad(args)
    if "d" in only:
        bench_make_fx(args)
    if "e" in only:
        for body in args.compile_bodies.split(","):
            bench_compile(body, args)
    print_rows()
    print_targets()
    print(f"\n(total {time.perf_counter() - t0:.0f} s; met = both the ratio of medians and "
          f"the ratio of minimums within the target)")


if __name__ == "__main__":
    main()
