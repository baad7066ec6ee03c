"""The programs behind tests/test_distributed.py, run once per rank.

    python tests/distributed_cases.py OUT_JSON CASE [CASE ...]   # RANK, WORLD_SIZE, MASTER_PORT set

Each case trains or runs a small model whose forward calls a hopkit HOP, under
torch.distributed (gloo, 127.0.0.1), and compares it on rank 0 with the same
model on one process: losses, parameters after training (gathered), output
placements. A case records "ok" or the failure's text in OUT_JSON (rank 0's
file; every rank writes its own, suffixed with the rank), so the pytest side
reports each case separately. Nothing here is collected by pytest.
"""

from __future__ import annotations

import functools
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

import hopkit


class BlockHOP(hopkit.BaseHOP):
    def __init__(self) -> None:
        super().__init__("hopkit_test_distributed_block")


block_hop = BlockHOP()


def _body(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor]:
    return (torch.tanh(x @ w1) @ w2 + x,)


BODY = hopkit.FunctionWithNoFreeVars(_body)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d, 2 * d) / d**0.5)
        self.w2 = nn.Parameter(torch.randn(2 * d, d) / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_hop(BODY, x, self.w1, self.w2)[0]


class PlainBlock(Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _body(x, self.w1, self.w2)[0]


class Model(nn.Module):
    def __init__(self, n_blocks: int, d: int, plain: bool) -> None:
        super().__init__()
        cls = PlainBlock if plain else Block
        self.blocks = nn.ModuleList([cls(d) for _ in range(n_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _model(n_blocks: int = 3, d: int = 8, plain: bool = False) -> Model:
    torch.manual_seed(0)
    return Model(n_blocks, d, plain)


def _batches(steps: int, world: int, per_rank: int = 4, d: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(world * per_rank, d, generator=g) for _ in range(steps)]


def _train(model: nn.Module, batches: list[torch.Tensor], step_fn: Callable[[torch.Tensor], torch.Tensor]
           ) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x in batches:
        opt.zero_grad()
        loss = step_fn(x)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _reference(steps: int, world: int, d: int = 8) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The unsharded model on one process, on the global batches."""
    model = _model(plain=True, d=d)
    losses = _train(model, _batches(steps, world, d=d), lambda x: model(x).pow(2).mean())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _local(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world)[rank]


def _global_loss(local_loss: torch.Tensor) -> float:
    t = local_loss.detach().clone()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _check_training(losses: list[float], state: dict[str, torch.Tensor], world: int,
                    d: int = 8) -> None:
    ref_losses, ref_state = _reference(len(losses), world, d)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


class _GraphRecorder:
    """A backend that counts HOP nodes in every graph Dynamo hands it, then runs ``backend``."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.hop_nodes = 0
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        self.graphs += 1
        self.hop_nodes += sum(1 for n in gm.graph.nodes if n.target is block_hop)
        import os
        if os.environ.get("HOPKIT_DEBUG_DIST"):
            print("GRAPH", gm.graph, flush=True)  # HOPKIT_DEBUG_DIST=1: see the split
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


def case_fsdp2(backend: str) -> None:
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    run: Callable[[torch.Tensor], torch.Tensor] = model
    if backend != "none":
        run = torch.compile(model, backend=backend)

    def step(x: torch.Tensor) -> torch.Tensor:
        return run(_local(x, rank, world)).pow(2).mean()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x in _batches(3, world):
        opt.zero_grad()
        loss = step(x)
        loss.backward()
        opt.step()
        losses.append(_global_loss(loss))
    state = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        _check_training(losses, state, world)


def case_ddp(backend: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    # 1 MB buckets (DDPOptimizer refuses buckets below its 1 MB first bucket)
    # and blocks of 1 MB of weights: DDP's graph splitting then cuts the Dynamo
    # graph between blocks; it must neither split nor lose a HOP node.
    d = 256
    model = _model(d=d)
    ddp = DDP(model, bucket_cap_mb=1)
    recorder = _GraphRecorder(backend)
    run = torch.compile(ddp, backend=recorder)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for x in _batches(3, world, d=d):
        opt.zero_grad()
        loss = run(_local(x, rank, world)).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(_global_loss(loss))
    if recorder.hop_nodes != len(model.blocks):
        raise AssertionError(
            f"expected {len(model.blocks)} HOP nodes across the DDP-split graphs, found "
            f"{recorder.hop_nodes} in {recorder.graphs} graph(s)"
        )
    if recorder.graphs < 2:
        raise AssertionError(f"DDP did not split the graph ({recorder.graphs} graph)")
    if rank == 0:
        _check_training(losses, {k: v.detach() for k, v in model.state_dict().items()}, world, d)


@functools.cache
def _mesh() -> Any:
    # One mesh for every case: with two equal meshes alive in one process,
    # torch 2.13's AOTAutograd mixes them up when it traces DTensor tangents
    # ("Node tangents_2 was invalid, but is output"), also for a plain
    # DTensor function with no HOP in it.
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def case_dtensor(backend: str) -> None:
    """HOP on DTensor operands == the body on the same DTensors (values, placements, grads)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh()
    torch.manual_seed(0)
    x, w1, w2 = torch.randn(8, 4), torch.randn(4, 6), torch.randn(6, 4)
    for px, pw1, pw2 in [
        (Shard(0), Replicate(), Replicate()),
        (Replicate(), Shard(1), Shard(0)),
        (Replicate(), Replicate(), Replicate()),
    ]:
        def operands() -> list[Any]:
            return [distribute_tensor(t.clone().requires_grad_(), mesh, [p])
                    for t, p in ((x, px), (w1, pw1), (w2, pw2))]

        ref_in = operands()
        ref = _body(*ref_in)[0]
        ref.sum().backward()

        def f(*a: Any) -> Any:
            return block_hop(BODY, *a)[0]

        graphs: list[torch.fx.GraphModule] = []
        compiler = _aot_recorder(graphs) if backend == "aot_eager" else backend
        run = f if backend == "none" else torch.compile(f, backend=compiler, fullgraph=True)
        got_in = operands()
        got = run(*got_in)
        got.sum().backward()
        where = f"placements {(px, pw1, pw2)}"
        if backend == "aot_eager":
            _check_one_hop_node_on_local_tensors(graphs, where)
        if got.placements != ref.placements:
            raise AssertionError(f"{where}: output placements {got.placements} != {ref.placements}")
        torch.testing.assert_close(got.full_tensor(), ref.full_tensor(), msg=lambda m: f"{where}: {m}")
        for a, b in zip(got_in, ref_in):
            assert a.grad is not None and b.grad is not None
            if a.grad.placements != b.grad.placements:
                raise AssertionError(f"{where}: grad placements {a.grad.placements} != {b.grad.placements}")
            torch.testing.assert_close(a.grad.full_tensor(), b.grad.full_tensor(), msg=lambda m: f"{where}: {m}")


def _aot_recorder(graphs: list[torch.fx.GraphModule]) -> Any:
    """aot_eager, keeping the AOT forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm: torch.fx.GraphModule, _: Any) -> Any:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def _check_one_hop_node_on_local_tensors(graphs: list[torch.fx.GraphModule], where: str) -> None:
    """One HOP node in the forward and one in the backward, on plain (local) tensors."""
    from torch.distributed.tensor import DTensor

    counts = [sum(1 for n in g.graph.nodes if n.target is block_hop) for g in graphs]
    if counts != [1, 1]:
        raise AssertionError(f"{where}: HOP nodes per AOT graph {counts}, expected [1, 1]")
    for g in graphs:
        for n in g.graph.nodes:
            if n.target is block_hop:
                # Dynamo lifts the symbols of a dynamic shape as operands too.
                vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a
                        for a in n.args[1:]]
                tensors = [v for v in vals if isinstance(v, torch.Tensor)]
                if not tensors or any(isinstance(v, DTensor) for v in tensors):
                    raise AssertionError(f"{where}: HOP operands not local tensors: {vals}")


class _TPMLP(nn.Module):
    def __init__(self, d: int = 8, mesh: Any = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.mesh = mesh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (x, self.up.weight, self.up.bias, self.down.weight, self.down.bias)
        if self.mesh is None:  # the single-process reference
            return _mlp_body(*args)[0]
        from torch.distributed.tensor import DTensor, Replicate

        # The HOP's body reads the tensor-parallel linears' weights as operands
        # (ColwiseParallel: up sharded by rows; RowwiseParallel: down by
        # columns), so its matmuls are DTensor ops: the input is replicated,
        # the hidden sharded, the output a partial sum made whole here.
        xd = DTensor.from_local(x, self.mesh, [Replicate()], run_check=False)
        out = block_hop(MLP_BODY, xd, *args[1:])[0]
        return out.full_tensor()


def _mlp_body(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
              b2: torch.Tensor) -> tuple[torch.Tensor]:
    return (torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w1, b1)), w2, b2),)


MLP_BODY = hopkit.FunctionWithNoFreeVars(_mlp_body)


def case_tensor_parallel(backend: str) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = _mesh()
    world = dist.get_world_size()
    model = _TPMLP(mesh=mesh)
    ref_model = _TPMLP()
    parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    run: Callable[[torch.Tensor], torch.Tensor] = model
    if backend != "none":
        run = torch.compile(model, backend=backend)
    batches = _batches(3, world)  # every rank sees the whole batch under TP
    losses = _train(model, batches, lambda x: run(x).pow(2).mean())
    ref_losses = _train(ref_model, batches, lambda x: ref_model(x).pow(2).mean())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for (k, v), (_, r) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        torch.testing.assert_close(full, r, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


CASES: dict[str, Callable[[str], None]] = {
    "fsdp2": case_fsdp2,
    "ddp": case_ddp,
    "dtensor": case_dtensor,
    "tensor_parallel": case_tensor_parallel,
}


def main(out: str, names: list[str]) -> int:
    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    results: dict[str, str] = {}
    for name in names:  # "fsdp2:aot_eager"
        case, _, backend = name.partition(":")
        torch._dynamo.reset()
        try:
            CASES[case](backend or "none")
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        # Keep the ranks in step: a case that failed on one rank must not
        # leave the other waiting in a collective of the next case.
        dist.barrier()
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
