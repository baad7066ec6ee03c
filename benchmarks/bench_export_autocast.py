"""hopkit.export.replace_autocast_with_hop_pass vs torch's in-tree pass.

Builds a pre-dispatch graph (``make_fx(pre_dispatch=True)``) with K autocast
regions in a chain (about 6 nodes per region, every other region holding a
nested ``enabled=False`` region) and times both passes on the same graph in
the same run. torch's pass recompiles the whole GraphModule after every inline
(quadratic in K), so it only runs up to ``--intree-max`` regions.

    python benchmarks/bench_export_autocast.py
    python benchmarks/bench_export_autocast.py --sizes 10,100 --intree-max 30 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.utils.benchmark as benchmark
from torch._export.passes.replace_autocast_with_hop_pass import (
    replace_autocast_with_hop_pass as intree_pass,
)
from torch.fx.experimental.proxy_tensor import make_fx

from hopkit.export import replace_autocast_with_hop_pass as hopkit_pass


def make_graph(k: int) -> torch.fx.GraphModule:
    """A pre-dispatch graph with ``k`` top-level autocast regions."""

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        for i in range(k):
            x = x.relu()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                x = x @ w
                if i % 2:
                    with torch.autocast("cpu", enabled=False):
                        x = x.float() * 2
                x = x.sin()
            x = x.float()
        return x

    return make_fx(f, pre_dispatch=True)(torch.randn(4, 4), torch.randn(4, 4))


def time_pass(
    fn: Callable[[torch.fx.GraphModule, None], object],
    gm: torch.fx.GraphModule,
    repeats: int,
) -> float:
    """Median seconds of ``fn(gm, None)`` over ``repeats`` runs (after one warm-up
    run when a single run is cheap)."""
    timer = benchmark.Timer(stmt="fn(gm, None)", globals={"fn": fn, "gm": gm})
    start = time.perf_counter()
    first = timer.timeit(1).median
    if time.perf_counter() - start > 2.0 or repeats <= 1:
        # Expensive: warm-up is not worth it; report the median of what we have.
        times = [first] + [timer.timeit(1).median for _ in range(repeats - 1)]
        return statistics.median(times)
    return statistics.median(timer.timeit(1).median for _ in range(repeats))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,30,100,300,1000", help="region counts K")
    parser.add_argument(
        "--intree-max",
        type=int,
        default=100,
        help="largest K for torch's in-tree pass (quadratic: ~15 s at 100, ~130 s at 300)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]

    print(f"torch {torch.__version__}, device cpu, threads {torch.get_num_threads()}")
    print(f"python {sys.version.split()[0]}; median of {args.repeats} runs; in-tree up to K={args.intree_max}")
    print()
    header = f"{'K':>6} {'nodes':>7} {'hopkit s':>10} {'hopkit us/node':>15} {'in-tree s':>10} {'in-tree us/node':>16} {'ratio':>8}"
    print(header)
    print("-" * len(header))
    # Warm-up: imports and first-call caches of both passes.
    warm = make_graph(2)
    hopkit_pass(warm, None)
    intree_pass(warm, None)

    for k in sizes:
        gm = make_graph(k)
        nodes = len(gm.graph.nodes)
        t_hop = time_pass(hopkit_pass, gm, args.repeats)
        line = f"{k:>6} {nodes:>7} {t_hop:>10.4f} {1e6 * t_hop / nodes:>15.1f}"
        if k <= args.intree_max:
            t_tree = time_pass(intree_pass, gm, args.repeats if k <= 30 else 1)
            line += f" {t_tree:>10.3f} {1e6 * t_tree / nodes:>16.1f} {t_hop / t_tree:>8.4f}x"
        else:
            line += f" {'-':>10} {'-':>16} {'-':>9}"
        print(line, flush=True)
    print()
    print("ratio = hopkit time / in-tree time (lower is better; target at K=100: <= 0.05x)")


if __name__ == "__main__":
    main(sys.argv[1:])
