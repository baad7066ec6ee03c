"""Export a model with nested autocast regions; each region becomes one HOP call.

    python examples/03_export_autocast.py

``torch.export`` traces ``with torch.autocast(...)`` blocks as pairs of
``_enter_autocast`` / ``_exit_autocast`` nodes. This script

1. prints that pre-dispatch graph (``make_fx(pre_dispatch=True)``);
2. runs ``hopkit.export.replace_autocast_with_hop_pass`` on it and prints the
   result: every outermost block is one ``hopkit_wrap_with_autocast`` call with
   the block in a submodule, the nested block a nested call;
3. exports the model with ``hopkit.export.export`` (``torch.export.export`` with
   hopkit's pass), runs ``ep.module()``, ``ep.run_decompositions()`` and a
   ``torch.export.save`` / ``load`` round trip;
4. inlines the HOP calls again with ``inline_autocast_hops_pass``.

Every result is compared, values and dtypes, bit for bit, with the model run
eagerly under autocast, so the script fails loudly if anything breaks.
"""

from __future__ import annotations

import io

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import hopkit.export as hx


class Block(torch.nn.Module):
    """A bf16 block with a float32 island inside (e.g. a numerically touchy norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.relu()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            u = self.up(h)  # bf16
            with torch.autocast("cpu", enabled=False):
                n = torch.nn.functional.layer_norm(u.float(), (16,))  # float32
            d = self.down(n)  # bf16 again
        return d.float().sum(dim=-1), u


def check(name: str, got: object, want: object) -> None:
    got_t = got if isinstance(got, (tuple, list)) else (got,)
    want_t = want if isinstance(want, (tuple, list)) else (want,)
    for g, w in zip(got_t, want_t, strict=True):
        assert isinstance(g, torch.Tensor) and isinstance(w, torch.Tensor)
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # also checks dtypes
    dtypes = ", ".join(str(t.dtype).replace("torch.", "") for t in got_t)  # type: ignore[union-attr]
    print(f"  {name:<28} equal to eager ({dtypes})")


def main() -> None:
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(4, 8)
    # make_fx records the autocast weight cache as off; eager matches that.
    with torch.autocast("cpu", enabled=False, cache_enabled=False):
        expected = model(x)

    print("== pre-dispatch graph (make_fx(pre_dispatch=True)) ==")
    gm = make_fx(model, pre_dispatch=True)(x)
    print(gm.code)

    print("== after hopkit.export.replace_autocast_with_hop_pass ==")
    new_gm, _ = hx.replace_autocast_with_hop_pass(gm, None)
    print(new_gm.print_readable(print_output=False))
    check("rewritten graph", new_gm(x), expected)

    print("\n== hopkit.export.export ==")
    ep = hx.export(model, (x,))
    print(ep.graph_module.print_readable(print_output=False))
    check("ep.module()", ep.module()(x), expected)
    decomposed = ep.run_decompositions()
    check("ep.run_decompositions()", decomposed.module()(x), expected)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    check("torch.export.save/load", torch.export.load(buf).module()(x), expected)

    print("\n== inline_autocast_hops_pass (the inverse) ==")
    back, sig = hx.inline_autocast_hops_pass(ep.graph_module, ep.graph_signature)
    print(back.code)
    assert not any(n.target is hx.wrap_with_autocast for n in back.graph.nodes)
    params = [p.detach() for p in model.parameters()]
    check("inlined graph", back(*params, x), expected)
    print("ok")


if __name__ == "__main__":
    main()
