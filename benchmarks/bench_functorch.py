"""vmap of a hopkit HOP over a batch vs vmap of the plain body (target: <= 1.2x).

    python benchmarks/bench_functorch.py [--batch 64] [--dims 32 256] [--reps 7] [--threads 1]

The body is the issue's ``torch.tanh(x @ w)``, ``x`` a batch of examples and
``w`` shared (``in_dims=(0, None)``), at each size in ``--dims``. Both arms
run in one process, alternated A/B, with warm-up; prints medians, minimums
and the ratio for every size. ``--threads`` sets torch's intra-op threads
(1 by default: at these sizes more threads mostly measure contention). Never
collected by pytest.
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as tb

import hopkit


class BenchHop(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_bench_functorch_hop")


def body(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor]:
    return (torch.tanh(x @ w),)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hop = BenchHop()
    sub = hopkit.FunctionWithNoFreeVars(body)
    arms = {
        "plain": torch.vmap(lambda x, w: body(x, w)[0], in_dims=(0, None)),
        "hop": torch.vmap(lambda x, w: hop(sub, x, w)[0], in_dims=(0, None)),
    }
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} thread(s), "
          f"vmap over {args.batch} examples of torch.tanh(x @ w)")
    for dim in args.dims:
        x, w = torch.randn(args.batch, dim), torch.randn(dim, dim)
        torch.testing.assert_close(arms["hop"](x, w), arms["plain"](x, w))
        times: dict[str, list[float]] = {k: [] for k in arms}
        for _ in range(args.reps):  # alternate A/B
            for name, fn in arms.items():
                timer = tb.Timer("fn(x, w)", globals={"fn": fn, "x": x, "w": w})
                times[name].append(timer.blocked_autorange(min_run_time=0.2).median)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"dim {dim}:")
        for name, ts in times.items():
            print(f"  {name:>6}: median {med[name] * 1e6:8.1f} us   min {min(ts) * 1e6:8.1f} us")
        print(f"  ratio hop/plain: median {med['hop'] / med['plain']:.3f}x   "
              f"min {min(times['hop']) / min(times['plain']):.3f}x   (target <= 1.2x)")


if __name__ == "__main__":
    main()
