"""Ordered logging: a side-effectful custom op that compiles and exports safely.

    python examples/02_ordered_logging.py

``demo::log(x, msg)`` appends a line to ``LOG`` and returns nothing. To a
compiler it looks like a dead call (no output is used), and nothing says two
calls must stay in order. Registering it ``ORDERED`` with hopkit fixes both:

    register_effectful_op(log, EffectType.ORDERED)

From then on every call is threaded through ``hopkit_with_effects`` with an
effect token, so it runs exactly once, in program order, under

1. ``torch.compile(backend="aot_eager")`` (the AOT forward graph is printed:
   look for the token chain ``arg0_1 -> getitem -> getitem_2 -> ...``),
   including a call in the backward pass;
2. ``torch.compile(backend="inductor")``;
3. ``torch.export.export(...).run_decompositions()`` (the graph takes a
   ``token`` input and returns the last token; the signature lists both) and
   ``ep.module()``.

Without the registration, step 1 drops every call: the script shows that too.
"""

from __future__ import annotations

import warnings

import torch
from torch._dynamo.backends.common import aot_autograd

from hopkit.effects import EffectType, register_effectful_op

LOG: list[str] = []


@torch.library.custom_op("demo::log", mutates_args=())
def log(x: torch.Tensor, msg: str) -> None:
    LOG.append(f"{msg:<14} mean={x.mean().item():+.4f}")


@log.register_fake
def _(x: torch.Tensor, msg: str) -> None:
    return None


class LogGrad(torch.autograd.Function):
    """Identity whose backward logs the incoming gradient."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        log(grad, "backward: grad")
        return grad


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log(x, "1 input")
        h = self.linear(x).relu()
        log(h, "2 hidden")
        out = LogGrad.apply(h.sum(dim=-1))
        log(out, "3 output")
        return out


def show(title: str) -> None:
    print(f"{title}:")
    for line in LOG:
        print(f"    {line}")
    LOG.clear()


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model, x = Model(), torch.randn(2, 4)

    model(x).sum().backward()
    show("eager (the reference)")

    torch.compile(model, backend="aot_eager", fullgraph=True)(x).sum().backward()
    show("aot_eager, op NOT registered (the calls are dead code to the compiler)")
    torch._dynamo.reset()

    handle = register_effectful_op(log, EffectType.ORDERED)
    try:
        graphs: list[torch.fx.GraphModule] = []

        def keep(gm: torch.fx.GraphModule, _: object) -> torch.fx.GraphModule:
            graphs.append(gm)
            return gm

        backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)
        torch.compile(model, backend=backend, fullgraph=True)(x).sum().backward()
        show("aot_eager, op registered ORDERED")
        fw, bw = graphs
        print("AOT forward graph (the token chain threads every log call):")
        print(fw.print_readable(print_output=False, include_stride=False, colored=False))
        print("AOT backward graph (the backward call gets its own token):")
        print(bw.print_readable(print_output=False, include_stride=False, colored=False))

        torch._dynamo.reset()
        torch.compile(model, backend="inductor", fullgraph=True)(x).sum().backward()
        show("inductor, op registered ORDERED")

        ep = torch.export.export(model, (x,)).run_decompositions()
        print("exported program (after run_decompositions):")
        print(ep.graph_module.code)
        print(ep.graph_signature)
        ep.module()(x)
        show("ep.module()")
    finally:
        handle.destroy()


if __name__ == "__main__":
    main()
