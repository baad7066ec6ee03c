"""A pointwise HOP body fuses into its neighbours, like the same code inline.

    python examples/04_pointwise_fusion.py

``quantize`` is a HOP whose body is elementwise math (scale, round, clamp,
dequantize). Under ``torch.compile(backend="inductor")`` hopkit lowers such a
body with ``hopkit.inductor.lower_hop_pointwise``: the body becomes the inner
function of the consumer's loop, so ``relu(quantize(x)) + 1`` is ONE kernel,
the same kernel Inductor writes for the body written inline. This script
prints both generated kernels, one after the other, and checks that each program compiles to one kernel and matches eager.

Then it shows the two ways a body that is *not* pointwise (a matmul) is
handled: with ``inductor_mode = "auto"`` (the default) hopkit logs which op
stopped the fusion and inlines the body op by op; with ``"fuse"`` the compile
fails with an error naming that op.
"""

from __future__ import annotations

import logging
import re

import torch
from torch._inductor.utils import run_and_get_code

import hopkit


class Quantize(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("example_pointwise_quantize")


class MustFuse(hopkit.BaseHOP):
    inductor_mode = "fuse"  # an error if the body cannot fuse

    def __init__(self) -> None:
        super().__init__("example_pointwise_must_fuse")


quantize = Quantize()
must_fuse = MustFuse()


def fake_quant(x: torch.Tensor) -> tuple[torch.Tensor]:
    """The body: int8-style fake quantization, all elementwise."""
    q = torch.clamp(torch.round(x / 0.05), -128, 127)
    return (q * 0.05,)


def with_hop(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(quantize(fake_quant, x)[0]) + 1


def inline(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(fake_quant(x)[0]) + 1


def kernel_sources(code: str) -> list[str]:
    """The C++ (CPU) or Triton (GPU) kernels in Inductor's output code."""
    return re.findall(r"^(?:cpp_fused_|triton_)\w+ = async_compile\.\w+\(.*?^'''\)", code, re.M | re.S)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(64, 128, device=device)

    results = {}
    for name, fn in (("hopkit HOP", with_hop), ("inline", inline)):
        torch._dynamo.reset()
        out, codes = run_and_get_code(torch.compile(fn, backend="inductor", fullgraph=True), x)
        torch.testing.assert_close(out, inline(x))
        sources = kernel_sources("\n".join(codes))
        assert len(sources) == 1, f"{name}: expected one kernel, got {len(sources)}"
        results[name] = sources[0]
        print(f"===== {name}: relu(fake_quant(x)) + 1 -> {len(sources)} kernel =====")
        print(sources[0])
        print()

    same = results["hopkit HOP"] == results["inline"]
    print(f"one kernel each, results equal to eager; identical kernel source: {same}")

    # A body that is not pointwise: a matmul needs its own kernel.
    def matmul_body(a: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.relu(a @ a),)

    y = torch.randn(16, 16, device=device)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("hopkit.inductor").setLevel(logging.INFO)
    torch._dynamo.reset()
    out = torch.compile(lambda a: quantize(matmul_body, a)[0] + 1, backend="inductor")(y)
    torch.testing.assert_close(out, matmul_body(y)[0] + 1)
    print("inductor_mode='auto': the matmul body was lowered op by op (see the log line above)")

    torch._dynamo.reset()
    try:
        torch.compile(lambda a: must_fuse(matmul_body, a)[0] + 1, backend="inductor")(y)
    except Exception as e:  # Inductor wraps lowering errors in its own type
        message = str(e)
        assert "aten.mm.default (node 'mm') in it cannot be fused" in message, message
        first = next(line for line in message.splitlines() if "hopkit:" in line)
        print("inductor_mode='fuse':", first[first.index("hopkit:"):])
    else:
        raise AssertionError("a matmul body should not fuse")


if __name__ == "__main__":
    main()
