"""AOTInductor: the quickstart model with its hopkit HOP vs the same model without it.

The model is ``f`` of examples/01_quickstart.py (``invoke_quant(G, x, y,
scheme="nf4")`` between ordinary ops) and its plain twin ``f_ref`` (calling
the subgraph directly). Each is exported, compiled and packaged with
``torch._inductor.aoti_compile_and_package`` (in a fresh Inductor cache, so
nothing is reused), and its package, loaded with ``aoti_load_package``, is
timed on the same inputs. Compiles and timing rounds alternate the two arms;
the table gives medians, minimums and the ratio hop / plain (target: runtime
at most 1.05x), and whether both packages hold the same kernels. A first,
uncounted compile warms the process up.

    python benchmarks/bench_aoti.py
    python benchmarks/bench_aoti.py --sizes 4,65536 --compiles 3 --rounds 15
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.utils.benchmark as benchmark

ROOT = Path(__file__).resolve().parent.parent


def quickstart() -> ModuleType:
    """examples/01_quickstart.py as a module (its main() does not run)."""
    path = ROOT / "examples" / "01_quickstart.py"
    spec = importlib.util.spec_from_file_location("hopkit_quickstart", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Wrap(torch.nn.Module):
    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fn(x, y)


def compile_package(fn: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...],
                    directory: Path, name: str) -> tuple[str, float]:
    """(package path, seconds of export + aoti_compile_and_package, fresh cache)."""
    from torch._inductor.utils import fresh_cache

    start = time.perf_counter()
    with fresh_cache():
        ep = torch.export.export(Wrap(fn), args)
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(directory / name))
    return path, time.perf_counter() - start


def kernel_names(path: str) -> list[str]:
    """The generated kernels' names in a package's C++ source, if it keeps it."""
    names: set[str] = set()
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            if member.endswith(".cpp"):
                names.update(re.findall(r"\b(cpp_fused_\w+?)(?:\(|_kernel)", z.read(member).decode()))
    return sorted(names)


def row(label: str, hop: list[float], plain: list[float], unit: float, suffix: str) -> str:
    mh, mp = statistics.median(hop), statistics.median(plain)
    nh, np_ = min(hop), min(plain)
    return (f"{label:<26} {mh * unit:>10.2f} {mp * unit:>10.2f} {mh / mp:>7.3f}x"
            f" {nh * unit:>10.2f} {np_ * unit:>10.2f} {nh / np_:>7.3f}x  {suffix}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,65536", help="numbers of elements of x and y")
    parser.add_argument("--compiles", type=int, default=2, help="compiles per arm (alternated)")
    parser.add_argument("--rounds", type=int, default=11, help="timing rounds per arm (alternated)")
    parser.add_argument("--min-run-time", type=float, default=0.2,
                        help="seconds per timing round (torch.utils.benchmark blocked_autorange)")
    args = parser.parse_args(argv)
    qs = quickstart()
    arms: dict[str, Callable[..., torch.Tensor]] = {"hop": qs.f, "plain": qs.f_ref}
    print(f"torch {torch.__version__}, device cpu, threads {torch.get_num_threads()}; "
          f"model: examples/01_quickstart.py f (hop) vs f_ref (plain)")
    print(f"{'':<26} {'median':>10} {'':>10} {'':>8} {'minimum':>10}")
    print(f"{'measurement':<26} {'hop':>10} {'plain':>10} {'ratio':>8} {'hop':>10} {'plain':>10}"
          f" {'ratio':>8}")
    with tempfile.TemporaryDirectory(prefix="bench_aoti_") as tmp:
        directory = Path(tmp)
        for n in [int(s) for s in args.sizes.split(",") if s]:
            torch.manual_seed(0)
            inputs = (torch.randn(n), torch.randn(n))
            compile_times: dict[str, list[float]] = {a: [] for a in arms}
            paths: dict[str, str] = {}
            # Not counted: the first compile of a process also builds what
            # every later one reuses (imports, the C++ toolchain's checks).
            compile_package(arms["plain"], inputs, directory, f"warmup_{n}.pt2")
            for i in range(args.compiles):
                order = list(arms) if i % 2 == 0 else list(reversed(arms))
                for arm in order:
                    paths[arm], seconds = compile_package(
                        arms[arm], inputs, directory, f"{arm}_{n}_{i}.pt2")
                    compile_times[arm].append(seconds)
            packages: dict[str, Any] = {a: torch._inductor.aoti_load_package(p)
                                        for a, p in paths.items()}
            torch.testing.assert_close(packages["hop"](*inputs), qs.f_ref(*inputs))
            torch.testing.assert_close(packages["plain"](*inputs), qs.f_ref(*inputs))
            run_times: dict[str, list[float]] = {a: [] for a in arms}
            for i in range(args.rounds):
                order = list(arms) if i % 2 == 0 else list(reversed(arms))
                for arm in order:
                    timer = benchmark.Timer("p(x, y)", globals={"p": packages[arm],
                                                                "x": inputs[0], "y": inputs[1]})
                    run_times[arm].append(timer.blocked_autorange(min_run_time=args.min_run_time).median)
            same = kernel_names(paths["hop"]) == kernel_names(paths["plain"])
            kernels = kernel_names(paths["hop"])
            print(row(f"compile (s), n={n}", compile_times["hop"], compile_times["plain"], 1.0,
                      f"{args.compiles} compiles each"))
            print(row(f"runtime (us), n={n}", run_times["hop"], run_times["plain"], 1e6,
                      f"{args.rounds} rounds each; same kernels: {same} ({len(kernels)})"))


if __name__ == "__main__":
    main(sys.argv[1:])
