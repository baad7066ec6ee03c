"""Replay a chain of 5 views: hopkit's ViewMeta vs torch's generated ViewMeta.

    python benchmarks/bench_view_replay.py [--rows 1000 --cols 1000] [--device cpu]

Both sides replay the *same* sequence: torch's ViewMeta objects are taken
from its own functionalization of the chain
(``torch._C._functionalization.get_view_meta_sequence``) and hopkit's are
converted from them (``ViewMeta.from_torch``). Rows:

* ``apply_view_meta_sequence``: the plain eager call (hopkit replays the
  chain as one cached as_strided, NOTE [Geometry cache for eager replay]).
* ``op-by-op forward``: hopkit calling each ViewMeta's op, the path used
  under tracing and autograd, against the same torch call.
* ``requires_grad base``: both replays on a base that requires grad (hopkit
  goes op by op so autograd records each view's own backward).

Each pair is timed with torch.utils.benchmark (warm-up, blocked_autorange),
alternating which side runs first, over several rounds; the table shows the
median and minimum of the per-round medians and the ratios hopkit/torch of
both (target: at most 1.5x).
"""

from __future__ import annotations

import argparse
import platform
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.benchmark as benchmark

from hopkit.functionalization import ViewMeta, apply_view_meta_sequence

F: Any = torch._C._functionalization


def view_chain(t: torch.Tensor) -> torch.Tensor:
    rows, cols = t.shape
    return t[rows // 10 : rows - rows // 10].t()[:, ::2].unsqueeze(0).select(1, cols // 3)


def torch_sequence(base: torch.Tensor) -> list[Any]:
    wrapped = torch._to_functional_tensor(base.detach())
    torch._enable_functionalization(reapply_views=True)
    try:
        out = view_chain(wrapped)
    finally:
        torch._disable_functionalization()
    return list(F.get_view_meta_sequence(out))


def time_it(fn: Callable[[], Any], min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def compare(
    name: str,
    hopkit_fn: Callable[[], Any],
    torch_fn: Callable[[], Any],
    rounds: int,
    min_run_time: float,
) -> tuple[str, float, float, float, float]:
    for fn in (hopkit_fn, torch_fn):  # warm-up (fills hopkit's geometry cache)
        for _ in range(100):
            fn()
    hk: list[float] = []
    tc: list[float] = []
    for r in range(rounds):
        pairs = [(hk, hopkit_fn), (tc, torch_fn)]
        for out, fn in pairs if r % 2 == 0 else reversed(pairs):
            out.append(time_it(fn, min_run_time))
    hk_med, tc_med = statistics.median(hk), statistics.median(tc)
    return name, hk_med, min(hk), tc_med, min(tc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--cols", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    args = parser.parse_args()

    base = torch.randn(args.rows, args.cols, device=args.device)
    theirs = torch_sequence(base)
    ours = [ViewMeta.from_torch(m) for m in theirs]
    assert len(ours) == 5, ours
    want = F.apply_view_meta_sequence(base, theirs)
    got = apply_view_meta_sequence(base, ours)
    assert (got.shape, got.stride(), got.storage_offset()) == (
        want.shape,
        want.stride(),
        want.storage_offset(),
    )

    def op_by_op(t: torch.Tensor) -> torch.Tensor:
        for m in ours:
            t = m.forward(t)
        return t

    grad_base = base.clone().requires_grad_()
    rows = [
        compare(
            "apply_view_meta_sequence",
            lambda: apply_view_meta_sequence(base, ours),
            lambda: F.apply_view_meta_sequence(base, theirs),
            args.rounds,
            args.min_run_time,
        ),
        compare(
            "op-by-op forward",
            lambda: op_by_op(base),
            lambda: F.apply_view_meta_sequence(base, theirs),
            args.rounds,
            args.min_run_time,
        ),
        compare(
            "requires_grad base",
            lambda: apply_view_meta_sequence(grad_base, ours),
            lambda: F.apply_view_meta_sequence(grad_base, theirs),
            args.rounds,
            args.min_run_time,
        ),
    ]

    device = (
        torch.cuda.get_device_name(base.device)
        if base.is_cuda
        else f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)"
    )
    print(f"torch {torch.__version__} | device {device}")
    print(
        f"base {args.rows}x{args.cols} ({base.numel():,} elements) | views: "
        + ", ".join(type(m).__name__.removesuffix("_ViewMeta") for m in theirs)
    )
    print(f"{args.rounds} alternating rounds, blocked_autorange(min_run_time={args.min_run_time})")
    print()
    header = (
        f"{'case':<26}{'hopkit med':>12}{'hopkit min':>12}{'torch med':>12}{'torch min':>12}"
        f"{'ratio med':>11}{'ratio min':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, hk_med, hk_min, tc_med, tc_min in rows:
        print(
            f"{name:<26}{hk_med * 1e6:>10.2f}us{hk_min * 1e6:>10.2f}us"
            f"{tc_med * 1e6:>10.2f}us{tc_min * 1e6:>10.2f}us"
            f"{hk_med / tc_med:>10.2f}x{hk_min / tc_min:>10.2f}x"
        )
    print()
    print(
        "ratio = hopkit / torch, of the medians and of the minimums over rounds "
        "(target <= 1.5x for apply_view_meta_sequence); on a loaded machine trust the minimums"
    )


if __name__ == "__main__":
    main()
