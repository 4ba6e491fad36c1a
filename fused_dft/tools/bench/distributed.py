"""The vocab-parallel provider of `fused-dft bench --nproc P`: one worker process per rank.

The runner starts P workers (`python -m fused_dft.tools.bench.worker`) with FUSED_DFT_BENCH_RANK,
FUSED_DFT_BENCH_WORLD and FUSED_DFT_BENCH_STORE (a file store: no port to pick) set. Each joins a
process group (gloo on the CPU, NCCL on CUDA, rank r on cuda:r), keeps the whole hidden and the
labels (the same on every rank) and only its Shard(0) slice of W, as a DTensor, and measures
fused_linear_dft_loss on it like any provider: time per step, peak memory above its inputs, error
of the loss, dh and its dW shard against the float64 reference. On the CPU each rank gets
cpu_count / P torch threads, so P ranks use the cores one process would.
The runner reports the slowest rank's median time and the largest rank's peak memory.
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import replace

import torch

from .problem import Problem, make_inputs, reference_float64, rel_error

ENV_RANK, ENV_WORLD, ENV_STORE = (
    "FUSED_DFT_BENCH_RANK",
    "FUSED_DFT_BENCH_WORLD",
    "FUSED_DFT_BENCH_STORE",
)


def rank_env(rank: int, world: int, store: str) -> dict[str, str]:
    return {ENV_RANK: str(rank), ENV_WORLD: str(world), ENV_STORE: store}


def _init(problem: Problem) -> Problem:
    """Join the process group (once) and return the problem as this rank sees it (its device)."""
    import torch.distributed as dist

    rank, world = int(os.environ[ENV_RANK]), int(os.environ[ENV_WORLD])
    cuda = problem.device.startswith("cuda")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"file://{os.environ[ENV_STORE]}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=10),
        )
    return replace(problem, device=f"cuda:{rank}") if cuda else problem


@functools.cache
def _mesh(device_type: str, nproc: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (nproc,))


def make_shard_inputs(problem: Problem, requires_grad: bool = True):
    """(hidden (N, D), weight: a Shard(0) DTensor holding only this rank's rows, labels (N,)):
    the values of make_inputs(problem), whose full W is dropped once the shard is copied."""
    from torch.distributed.tensor import DTensor, Shard

    problem = _init(problem)
    hidden, weight, labels = make_inputs(problem, requires_grad=False)
    rows = shard_rows(problem)
    local = weight[rows].clone()
    shape, stride = weight.shape, weight.stride()
    del weight
    mesh = _mesh(torch.device(problem.device).type, problem.nproc)
    weight = DTensor.from_local(local, mesh, [Shard(0)], shape=shape, stride=stride)
    return hidden.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), labels


def shard_rows(problem: Problem) -> slice:
    """This rank's rows of W in torch.chunk order (as distribute_tensor shards)."""
    import torch.distributed as dist

    per_rank = -(-problem.vocab // problem.nproc)
    start = min(dist.get_rank() * per_rank, problem.vocab)
    return slice(start, min(start + per_rank, problem.vocab))


def build(problem: Problem):
    from fused_dft import fused_linear_dft_loss

    from .problem import IGNORE_INDEX

    _init(problem)

    def loss_fn(hidden, weight, labels):
        return fused_linear_dft_loss(
            hidden, weight, labels, loss_type=problem.loss_type, ignore_index=IGNORE_INDEX
        )

    return loss_fn


def errors_on_shard(loss_fn, hidden, weight, labels, problem: Problem, check_tokens: int) -> dict:
    """Loss, dh and this rank's dW shard on the first k tokens against the float64 reference
    (which needs the whole W: rebuilt here, after the timed runs, one rank at a time)."""
    import torch.distributed as dist

    k = problem.tokens if check_tokens <= 0 else min(check_tokens, problem.tokens)
    h = hidden.detach()[:k].clone().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    loss = loss_fn(h, w, labels[:k])
    loss.backward()
    for rank in range(problem.nproc):  # the float64 reference of a large W is GBs: in turn
        if rank == dist.get_rank():
            _, full_weight, _ = make_inputs(_init(problem), requires_grad=False)
            ref = reference_float64(h, full_weight, labels[:k], problem.loss_type)
            ref_loss, ref_dh, ref_dw = ref[0], ref[1], ref[2][shard_rows(problem)].clone()
            del full_weight, ref
        dist.barrier()
    errors = {
        "loss": rel_error(loss, ref_loss),
        "dh": rel_error(h.grad, ref_dh),
        "dW": rel_error(w.grad.to_local(), ref_dw),
    }
    return {"errors": errors, "check_tokens": k}


def unavailable(problem: Problem) -> str | None:
    import torch.distributed as dist

    if problem.nproc < 2:
        return "needs --nproc 2 or more (the vocabulary split over that many processes)"
    if problem.loss_type == "logprobs":
        return "measures the loss of the family, not the log-prob op"
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if problem.device.startswith("cuda"):
        if torch.cuda.device_count() < problem.nproc:
            return f"--nproc {problem.nproc} needs as many GPUs, {torch.cuda.device_count()} seen"
    elif not dist.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    if (problem.nproc - 1) * -(-problem.vocab // problem.nproc) >= problem.vocab:
        return f"V = {problem.vocab} over {problem.nproc} ranks leaves the last rank no row"
    return None
