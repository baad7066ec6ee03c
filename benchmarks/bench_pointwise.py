"""hopkit pointwise HOP fusion vs the inline chain vs torch's invoke_quant.

Part (a): ``relu(H(x)) + 1`` on ``--numel-a`` float32 elements, where ``H`` is
a chain of six pointwise ops (mul, add, relu, mul, sigmoid, sub), compiled
with Inductor three ways:

- ``inline``: the chain written inline;
- ``hopkit``: the chain as the body of a ``hopkit.BaseHOP`` (fused through
  ``hopkit.inductor.lower_hop_pointwise``);
- ``invoke_quant``: the chain in torch's in-tree
  ``torch._higher_order_ops.InvokeQuant()(chain, x, scheme="nf4")``.

Part (b): a chain of 12 cheap ops (3 x add, mul, relu, where) on
``--numel-b`` elements: eager vs compiled inline vs compiled hopkit HOP.

Part (c): compile time of a chain of ``--chain`` (default 16; a comma list
measures several) calls of a pointwise HOP whose body reads an operand
twice, ``x = H(lambda t, u: ((t * u).tanh() + t,), x, w)[0]``, against the
same chain inlined, through a hopkit HOP with ``inductor_mode = "inline"``
and through torch's ``InvokeQuant``, each first call in a fresh process as
below.
Fused lowering must cost what inlining costs at every chain length (issue:
compile time used to double with each call).

Each variant's generated kernels are counted and compared with the inline
chain's ("same as inline": byte-identical kernel source), results are checked
against eager, and steady-state times are taken with ``torch.utils.benchmark`` in
alternation (A/B/C, then reversed) after warm-up; the table reports the
median and minimum of the per-round medians and ratios. First-call compile
time is measured in a fresh subprocess per variant with an empty Inductor
cache (so identical kernels are not served from the cache of an earlier
variant), after warming Inductor up on an unrelated function, alternating the
order, median of ``--compile-repeats``.
Achieved bandwidth counts one read of x and one write of the output.

Targets (issue 7): hopkit at most 1.05x the inline chain; the compiled
12-op chain at least 2x faster than eager on CPU; on a GPU at least 0.7 of
the peak bandwidth (``--peak-gbps``).

    python benchmarks/bench_pointwise.py
    python benchmarks/bench_pointwise.py --numel-a 1048576 --numel-b 4194304 --rounds 5
    python benchmarks/bench_pointwise.py --parts c --chain 8,12,16,20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.benchmark as benchmark
from torch._inductor.utils import run_and_get_code

import hopkit


class BenchPointwiseHOP(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_bench_pointwise")


class BenchInlineHOP(hopkit.BaseHOP):
    inductor_mode = "inline"

    def __init__(self) -> None:
        super().__init__("hopkit_bench_pointwise_inline")


pointwise_hop = BenchPointwiseHOP()
inline_hop = BenchInlineHOP()


def chain6(x: torch.Tensor) -> tuple[torch.Tensor]:
    y = x * 1.1
    y = y + 0.3
    y = torch.relu(y)
    y = y * y
    y = torch.sigmoid(y)
    y = y - 0.2
    return (y,)


def chain12(x: torch.Tensor) -> tuple[torch.Tensor]:
    y = x
    for c in (0.5, 0.25, 0.125):
        y = y + c
        y = y * 0.9
        y = torch.relu(y)
        y = torch.where(y > c, y, x)
    return (y,)


def chain_body(t: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor]:
    return ((t * u).tanh() + t,)


def make_chain_variants(calls: int) -> dict[str, Callable[..., torch.Tensor]]:
    """Part (c): ``calls`` chained calls of ``chain_body``, three ways."""

    def inline_c(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        for _ in range(calls):
            x = chain_body(x, w)[0]
        return x

    def hopkit_c(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        for _ in range(calls):
            x = pointwise_hop(chain_body, x, w)[0]
        return x

    def hopkit_inline_c(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        for _ in range(calls):
            x = inline_hop(chain_body, x, w)[0]
        return x

    invoke_quant = torch._higher_order_ops.InvokeQuant()

    def invoke_quant_c(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        for _ in range(calls):
            x = invoke_quant(chain_body, x, w, scheme="nf4")[0]
        return x

    return {"inline": inline_c, "hopkit": hopkit_c, "hopkit_inline": hopkit_inline_c,
            "invoke_quant": invoke_quant_c}


def make_variants(part: str, calls: int = 16) -> dict[str, Callable[..., torch.Tensor]]:
    """The functions to compare, each a fresh function object."""
    if part == "c":
        return make_chain_variants(calls)
    if part == "a":
        invoke_quant = torch._higher_order_ops.InvokeQuant()

        def inline_a(x: torch.Tensor) -> torch.Tensor:
            return torch.relu(chain6(x)[0]) + 1

        def hopkit_a(x: torch.Tensor) -> torch.Tensor:
            return torch.relu(pointwise_hop(chain6, x)[0]) + 1

        def invoke_quant_a(x: torch.Tensor) -> torch.Tensor:
            return torch.relu(invoke_quant(chain6, x, scheme="nf4")[0]) + 1

        return {"inline": inline_a, "hopkit": hopkit_a, "invoke_quant": invoke_quant_a}

    def inline_b(x: torch.Tensor) -> torch.Tensor:
        return chain12(x)[0]

    def hopkit_b(x: torch.Tensor) -> torch.Tensor:
        return pointwise_hop(chain12, x)[0]

    return {"inline": inline_b, "hopkit": hopkit_b}


KERNEL = re.compile(r"^(?:cpp_fused_|triton_)\w+ = async_compile\.\w+\(.*?^'''\)", re.M | re.S)


def kernel_sources(code: str) -> list[str]:
    """Each generated kernel's definition (name and source)."""
    return KERNEL.findall(code)


def time_round(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x})
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def measure(
    fns: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, rounds: int, min_run_time: float
) -> dict[str, list[float]]:
    """Per-round medians, variants in alternating order."""
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn(x)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(time_round(fns[name], x, min_run_time))
    return times


def compile_child(part: str, variant: str, numel: int, device: str, calls: int) -> None:
    """In a fresh process: warm Inductor up on an unrelated function (imports,
    worker pools), then time the first call of the variant: Dynamo, AOT,
    lowering and kernel compilation. ``variant == "warmup"`` only warms up."""
    x = torch.randn(numel, device=device)
    torch.compile(lambda t: (t.cos() * 3).sum(), backend="inductor")(x)
    if variant == "warmup":
        return
    inputs = (x, torch.randn(numel, device=device)) if part == "c" else (x,)
    fn = torch.compile(make_variants(part, calls)[variant], backend="inductor", fullgraph=True)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"first_call_s": time.perf_counter() - start}))


def _child(part: str, variant: str, numel: int, device: str, cache: str, calls: int,
           timeout: float | None = None) -> str:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    return subprocess.run(
        [sys.executable, __file__, "--compile-child", part, variant,
         "--numel-a", str(numel), "--device", device, "--chain", str(calls)],
        capture_output=True, text=True, env=env, check=True, timeout=timeout,
    ).stdout


def compile_times(part: str, variants: list[str], numel: int, device: str, repeats: int,
                  calls: int = 16, timeout: float | None = None) -> dict[str, float]:
    """Median first-call seconds per variant. Each run gets its own copy of a
    cache that holds only the warm-up (C++ headers and the like), so no
    variant finds another's kernels there. A run past ``timeout`` seconds
    counts as ``inf``."""
    out: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as root:
        warm = os.path.join(root, "warm")
        _child(part, "warmup", numel, device, warm, calls)
        for r in range(repeats):
            for i, variant in enumerate(variants if r % 2 == 0 else list(reversed(variants))):
                cache = os.path.join(root, f"run{r}_{i}")
                shutil.copytree(warm, cache)
                try:
                    stdout = _child(part, variant, numel, device, cache, calls, timeout)
                except subprocess.TimeoutExpired:
                    out[variant].append(float("inf"))
                    shutil.rmtree(cache, ignore_errors=True)
                    continue
                out[variant].append(json.loads(stdout.strip().splitlines()[-1])["first_call_s"])
                shutil.rmtree(cache, ignore_errors=True)
    return {v: statistics.median(ts) for v, ts in out.items()}


def report(
    title: str,
    times: dict[str, list[float]],
    baseline: str,
    kernels: dict[str, list[str]],
    compile_s: dict[str, float],
    numel: int,
    peak_gbps: float | None,
) -> None:
    print(f"\n{title}")
    head = (f"{'variant':<14}{'kernels':>8}{'same as inline':>15}{'median us':>12}{'min us':>10}"
            f"{'median vs ' + baseline:>18}{'min vs ' + baseline:>15}{'GB/s':>7}")
    if peak_gbps:
        head += f"{'of peak':>9}"
    if compile_s:
        head += f"{'compile s':>11}{'vs inline':>11}"
    print(head)
    base, base_min = statistics.median(times[baseline]), min(times[baseline])
    for name, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        gbps = 2 * numel * 4 / med / 1e9
        count = str(len(kernels[name])) if name in kernels else "-"
        same = "-" if name not in kernels or name == "inline" else (
            "yes" if kernels[name] == kernels["inline"] else "no")
        row = (f"{name:<14}{count:>8}{same:>15}{med * 1e6:>12.1f}{best * 1e6:>10.1f}"
               f"{med / base:>17.3f}x{best / base_min:>14.3f}x{gbps:>7.1f}")
        if peak_gbps:
            row += f"{gbps / peak_gbps:>9.2f}"
        if compile_s:
            if name in compile_s:
                row += f"{compile_s[name]:>11.2f}{compile_s[name] / compile_s['inline']:>10.2f}x"
            else:
                row += f"{'-':>11}{'-':>11}"
        print(row)


def run_part(part: str, numel: int, args: argparse.Namespace, with_eager: bool) -> None:
    torch._dynamo.reset()
    x = torch.randn(numel, device=args.device)
    variants = make_variants(part)
    eager = variants["inline"]
    expected = eager(x)
    fns: dict[str, Callable[[torch.Tensor], Any]] = {}
    kernels: dict[str, list[str]] = {}
    if with_eager:
        fns["eager"] = eager
    for name, fn in variants.items():
        compiled = torch.compile(fn, backend="inductor", fullgraph=True)
        out, codes = run_and_get_code(compiled, x)
        torch.testing.assert_close(out, expected)
        kernels[name] = kernel_sources("\n".join(codes))
        fns[name] = compiled
    times = measure(fns, x, args.rounds, args.min_run_time)
    compile_s: dict[str, float] = {}
    if not args.skip_compile_time:
        compile_s = compile_times(part, list(variants), numel, args.device, args.compile_repeats)
    if part == "a":
        title = f"(a) relu(chain of 6 pointwise ops) + 1 on {numel} float32, compiled"
        baseline = "inline"
    else:
        title = f"(b) chain of 12 cheap ops (3 x add, mul, relu, where) on {numel} float32"
        baseline = "eager"
    report(title, times, baseline, kernels, compile_s, numel, args.peak_gbps)
    if part == "b":
        print(f"    hopkit vs inline compiled: "
              f"{statistics.median(times['hopkit']) / statistics.median(times['inline']):.3f}x (medians), "
              f"{min(times['hopkit']) / min(times['inline']):.3f}x (minimums)")


def run_chain(args: argparse.Namespace) -> None:
    """Part (c): compile time of chains of pointwise HOP calls vs inlined."""
    lengths = [int(n) for n in str(args.chain).split(",")]
    print("\n(c) compile time of a chain of N calls "
          "x = H(lambda t, u: ((t * u).tanh() + t,), x, w)[0] "
          f"on {args.numel_c} float32\n    (first call, fresh process, median of "
          f"{args.compile_repeats}; timeout {args.chain_timeout:.0f}s)")
    variants = list(make_chain_variants(1))
    print(f"{'N':>4}{'kernels (inline/hopkit)':>25}" + "".join(f"{v + ' s':>17}" for v in variants)
          + "".join(f"{v + ' vs inline':>25}" for v in variants[1:]))
    for calls in lengths:
        torch._dynamo.reset()
        x = torch.randn(args.numel_c, device=args.device)
        w = torch.randn(args.numel_c, device=args.device)
        fns = make_chain_variants(calls)
        counts = []
        for name in ("inline", "hopkit"):
            compiled = torch.compile(fns[name], backend="inductor", fullgraph=True)
            out, codes = run_and_get_code(compiled, x, w)
            torch.testing.assert_close(out, fns["inline"](x, w))
            counts.append(str(len(kernel_sources("\n".join(codes)))))
        secs = compile_times("c", variants, args.numel_c, args.device, args.compile_repeats,
                             calls=calls, timeout=args.chain_timeout)
        print(f"{calls:>4}{'/'.join(counts):>25}" + "".join(f"{secs[v]:>17.2f}" for v in variants)
              + "".join(f"{secs[v] / secs['inline']:>24.2f}x" for v in variants[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--numel-a", type=int, default=4 * 1024 * 1024)
    parser.add_argument("--numel-b", type=int, default=16 * 1024 * 1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=7, help="alternation rounds")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument("--compile-repeats", type=int, default=3)
    parser.add_argument("--skip-compile-time", action="store_true")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="device peak memory bandwidth, for the fraction-of-peak column")
    parser.add_argument("--parts", default="a,b,c")
    parser.add_argument("--chain", default="16",
                        help="part (c): chain lengths, comma-separated (e.g. 8,12,16,20)")
    parser.add_argument("--numel-c", type=int, default=1024, help="part (c): elements per input")
    parser.add_argument("--chain-timeout", type=float, default=600.0,
                        help="part (c): seconds before a compile counts as inf")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the timed runs (CPU)")
    parser.add_argument("--compile-child", nargs=2, metavar=("PART", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.compile_child:
        compile_child(args.compile_child[0], args.compile_child[1], args.numel_a, args.device,
                      int(str(args.chain).split(",")[0]))
        return

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    )
    print(f"torch {torch.__version__} | device {args.device} ({device_name}) | "
          f"threads {torch.get_num_threads()} | python {platform.python_version()}")
    print(f"rounds {args.rounds} x {args.min_run_time}s, times are per call")
    parts = args.parts.split(",")
    if "a" in parts:
        run_part("a", args.numel_a, args, with_eager=False)
    if "b" in parts:
        run_part("b", args.numel_b, args, with_eager=True)
    if "c" in parts:
        run_chain(args)


if __name__ == "__main__":
    main()
