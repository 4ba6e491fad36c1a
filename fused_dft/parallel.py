"""Vocab-parallel loss on DTensor: each rank holds a slice of the LM head's vocabulary.

Layout. weight (V, D), and bias (V,) if any, are DTensors sharded Shard(0) on a 1-D device mesh
of P ranks, in torch.chunk order (what distribute_tensor and ColwiseParallel produce): with
c = ceil(V / P), rank r owns the rows [r c, min((r + 1) c, V)); V need not be a multiple of P.
hidden (N, D) is the same on every rank (a plain tensor, or a Replicate DTensor) and labels hold
global vocabulary ids. Nothing of size N x V exists; no rank reads more than its shard of W.

Per chunk of tokens (the whole batch at once for impl="fused"), rank r:
  1. z_r = transform(h W_r^T + b_r)   (n, V_r): partials (5, n) of its shard (partials.py),
     m = max z, s = sum exp(z - m), t = sum exp(z - m)(z - m), z_y (0 unless the label falls
     in the shard: labels are shifted by the shard's offset), sum z;
  2. merges them across the mesh: one all-gather of the (5, n) partials (P x 20 bytes per
     token) and partials.merge on every rank, so every rank holds the same lse, log p_y and
     entropy of the whole vocabulary, bit for bit;
  3. the loss and gradient coefficients (a, b, u) from those (weights.py, with the full V for
     eaft's log V and label smoothing's 1 / V), then on its shard only
         dz_r = a softmax_r - b onehot_r(y) - u,  dW_r = dz_r^T h,  db_r = sum_rows dz_r,
     and its share dh_r = dz_r W_r of dh = sum_r dh_r.

Members that need more than the five partials gather more, with the same all-gather
(VocabShard.gather): eaft's top-k entropy each rank's k largest logits per token (the top k of the
P k is the row's top k); asft, whose reference head must be sharded like the policy's
(check_reference_layout), its three reference partials per token (partials.merge_reference).
fused_linear_logprobs runs the same merge (VocabParallelLogprobsFunction): its backward
coefficients need only the global lse and H, which every rank then holds.

Why an all-gather rather than Megatron's all-reduce(MAX) of m then all-reduce(SUM) of the
rescaled (s, t, z_y, sum z): one collective per chunk instead of two (at these sizes a collective
costs its latency), the same merge code as every other vocabulary range (kernel splits, tiles),
and the same result on every rank by construction (a fixed merge order; a SUM all-reduce's order
is the backend's). The price is P x 20 bytes per token instead of 20, small next to dh's all-reduce
(4 D bytes per token) for any tensor-parallel degree in use.

What autograd sees:
  - dW and db come back as DTensors with the weight's and bias's placement (Shard(0)): the loss
    reads weight.to_local(), whose backward wraps the local gradient.
  - dh: one all-reduce (SUM) of the (N, D) partial gradients in backward (in fp32 for fp16 /
    bf16), so every rank gets the whole dh. For a plain-tensor hidden that is what the replicated
    layers below need (each rank back-propagates the same gradient, as after Megatron's
    copy-to-tensor-parallel region). For a Replicate DTensor hidden the gradient is a Replicate
    DTensor holding that sum (not a Partial left for a later redistribute).
  - The loss, statistics and log-probabilities are plain tensors, the same on every rank. The
    upstream gradient must be the same on every rank too (it is when every rank computes the
    same function of the loss).
Every rank must call the loss with the same hidden, labels and options: the chunks, and so the
collectives, follow from them.
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import partials as P
from .backends.base import Reference, VocabShard
from .driver import (
    BACKWARD_TWICE,
    check_first_order,
    logprobs_backward,
    logprobs_forward,
    path_backward,
    path_forward,
    scale_precomputed,
)
from .options import LossOptions

SUPPORTED = (
    "supported: weight (and bias) a DTensor with placements (Shard(0),) on a 1-D device mesh "
    "(vocab-parallel), hidden a plain tensor or a DTensor with placements (Replicate(),) on the "
    "same mesh, labels a plain tensor of global vocabulary ids"
)


class VocabLayout(NamedTuple):
    """This rank's place in a vocab-parallel LM head."""

    group: dist.ProcessGroup
    world: int  # ranks on the mesh, P
    rank: int  # this rank's index on the mesh
    vocab: int  # the whole V
    offset: int  # first vocabulary id of this rank's shard
    local_vocab: int  # rows of this rank's shard


def is_dtensor(t) -> bool:
    """True for a DTensor; free when torch.distributed.tensor was never imported (then no
    DTensor can exist)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _describe(t) -> str:
    return f"placements {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh {t.device_mesh}"


def _is_vocab_shard(t) -> bool:
    from torch.distributed.tensor import Shard as ShardPlacement

    if t.device_mesh.ndim != 1:
        return False
    (placement,) = t.placements
    return type(placement) is ShardPlacement and placement.dim % t.dim() == 0


def _is_replicated(t) -> bool:
    from torch.distributed.tensor import Replicate

    return all(type(p) is Replicate for p in t.placements)


def vocab_parallel_layout(hidden, weight, bias, labels) -> VocabLayout | None:
    """None when no argument is a DTensor (one device). Otherwise the layout of a valid
    vocab-parallel call, or a ValueError naming the placement found and what is supported.
    Reads shapes and placements only: nothing is computed or communicated."""
    named = {"hidden": hidden, "weight": weight, "bias": bias, "labels": labels}
    if not any(is_dtensor(t) for t in named.values()):
        return None
    if not is_dtensor(weight):
        found = ", ".join(f"{k} has {_describe(t)}" for k, t in named.items() if is_dtensor(t))
        raise ValueError(f"{found}, but weight is a plain tensor; {SUPPORTED}")
    mesh = weight.device_mesh
    if not _is_vocab_shard(weight):
        raise ValueError(f"weight has {_describe(weight)}; {SUPPORTED}")
    if is_dtensor(labels):
        raise ValueError(f"labels is a DTensor with {_describe(labels)}; {SUPPORTED}")
    if bias is not None and not (is_dtensor(bias) and _is_vocab_shard(bias)):
        found = _describe(bias) if is_dtensor(bias) else "a plain tensor"
        raise ValueError(f"bias is {found} while weight is vocab-parallel; {SUPPORTED}")
    if bias is not None and bias.device_mesh != mesh:
        raise ValueError(f"bias is on mesh {bias.device_mesh}, weight on {mesh}; {SUPPORTED}")
    if is_dtensor(hidden):
        if hidden.device_mesh != mesh:
            raise ValueError(
                f"hidden is on mesh {hidden.device_mesh}, weight on {mesh}; {SUPPORTED}"
            )
        if not _is_replicated(hidden):
            raise ValueError(
                f"hidden has {_describe(hidden)}: a sharded hidden is not supported, the "
                f"vocab-parallel loss needs the same hidden on every rank (redistribute it to "
                f"Replicate() first); {SUPPORTED}"
            )
    vocab, world, rank = weight.shape[0], mesh.size(), mesh.get_local_rank()
    per_rank = math.ceil(vocab / world)
    if (world - 1) * per_rank >= vocab:
        raise ValueError(
            f"weight has {vocab} vocabulary rows sharded over {world} ranks: in torch.chunk "
            f"order ({per_rank} rows per rank) the last rank holds none; use fewer ranks"
        )
    offset = rank * per_rank
    local_vocab = min(per_rank, vocab - offset)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.to_local().shape[0] != local_vocab:
            raise ValueError(
                f"{name}'s local shard on mesh rank {rank} has {t.to_local().shape[0]} rows, "
                f"but Shard(0) of {vocab} rows over {world} ranks in torch.chunk order gives "
                f"{local_vocab}; {SUPPORTED}"
            )
    return VocabLayout(mesh.get_group(), world, rank, vocab, offset, local_vocab)


def _all_gather(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    # all_gather_single is all_gather_into_tensor's newer name (torch >= 2.13)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def gather_across_ranks(part: torch.Tensor, layout: VocabLayout) -> torch.Tensor:
    """part (r, ...) of this rank's shard -> (P, r, ...) of every rank, in rank order (one
    all-gather), the same on every rank."""
    part = part.contiguous()
    gathered = part.new_empty((layout.world * part.shape[0],) + tuple(part.shape[1:]))
    _all_gather(gathered, part, layout.group)  # rank-major: (P * r, ...)
    return gathered.view((layout.world,) + tuple(part.shape))


def merge_across_ranks(part: torch.Tensor, layout: VocabLayout) -> torch.Tensor:
    """part (5, n) partials of this rank's shard -> (5, n) of the whole vocabulary, the same on
    every rank: one all-gather into (P, 5, n), then partials.merge over the P shards."""
    return P.merge(gather_across_ranks(part, layout).transpose(0, 1), dim=1)


def vocab_shard(layout: VocabLayout) -> VocabShard:
    """What a backend needs of this rank's layout: its offset, the whole V, and the collectives."""
    return VocabShard(
        layout.offset,
        layout.vocab,
        lambda part: merge_across_ranks(part, layout),
        lambda part: gather_across_ranks(part, layout),
    )


def all_reduce_sum_(grad: torch.Tensor, group) -> torch.Tensor:
    """grad <- sum over the group's ranks (fp32 arithmetic for fp16 / bf16 gradients)."""
    if grad.dtype in (torch.float16, torch.bfloat16):
        wide = grad.float()
        dist.all_reduce(wide, group=group)
        return grad.copy_(wide)
    dist.all_reduce(grad, group=group)
    return grad


class SumGradAcrossRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group's ranks (each rank's loss
    sees only its vocabulary shard, so each holds one term of dh)."""

    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum_(grad.contiguous().clone(), ctx.group), None


class VocabParallelFunction(torch.autograd.Function):
    """The loss of one rank's vocabulary shard, with partials merged across the mesh.

    forward(hidden (N, D), weight (V_r, D), bias (V_r,) or None, labels (N,) global ids,
    token_weights, old_logprobs, opts, impl, chunk_size, shard, ref) -> (loss, stat sums (4,),
    num_valid, log p_y (N,)); backward returns this shard's dh term (summed across the ranks by
    SumGradAcrossRanks below it), dW_r and db_r. The path is the driver's (driver.py), with the
    shard's merge between a backend's partials and its coefficients. ref: asft's reference
    (its hidden states and this rank's shard of its head, sharded like the policy's), or None.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weights, old_logprobs,
                opts: LossOptions, impl, chunk_size, shard: VocabShard,
                ref: Reference | None = None):  # fmt: skip
        need = (*ctx.needs_input_grad[:2], bias is not None and ctx.needs_input_grad[2])
        loss, sums, num_valid, logprobs, rows, saved, grads = path_forward(
            hidden, weight, bias, labels, token_weights, old_logprobs, opts, impl, chunk_size,
            need, shard, ref,
        )  # fmt: skip
        ctx.opts, ctx.impl, ctx.chunk_size, ctx.shard, ctx.ref = opts, impl, chunk_size, shard, ref
        ctx.rows, ctx.need, ctx.saved, ctx.precomputed = rows, need, saved, grads
        ctx.save_for_backward(hidden, weight, bias)
        ctx.mark_non_differentiable(sums, num_valid, logprobs)
        return loss, sums, num_valid, logprobs

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums, _grad_num, _grad_logprobs):
        check_first_order()  # create_graph=True is refused here too
        hidden, weight, bias = ctx.saved_tensors
        if ctx.precomputed is not None:  # chunked, mean / sum: computed in the forward pass
            dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
            dh, dw, db = scale_precomputed(ctx.precomputed, grad_loss, dtypes)
            ctx.precomputed = None
        elif ctx.saved is None:
            raise RuntimeError(BACKWARD_TWICE)
        else:
            dh, dw, db = path_backward(
                hidden, weight, bias, ctx.rows, ctx.saved, grad_loss, ctx.opts, ctx.impl,
                ctx.chunk_size, ctx.need, ctx.shard, ctx.ref,
            )  # fmt: skip
        return dh, dw, db, *(None,) * 8


class VocabParallelLogprobsFunction(torch.autograd.Function):
    """fused_linear_logprobs on one rank's vocabulary shard: forward(hidden (N, D), weight
    (V_r, D), bias, labels (N,) global ids, opts, impl, chunk_size, shard) -> (log p_y (N,),
    H (N,) or empty), the whole vocabulary's (the partials merged across the mesh, so lse and H
    are global). Backward: the coefficients (a, b, u, c) of each token come from the global
    lse and H (coefficients.logprob_coefficients), so each rank applies them to its shard's
    logits alone: dz_r = a softmax_r - b onehot_r - c softmax_r (z_r - lse), and returns its dh
    term (summed across the ranks by SumGradAcrossRanks), dW_r and db_r."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: LossOptions, impl, chunk_size,
                shard: VocabShard):  # fmt: skip
        logp, entropy, lse = logprobs_forward(hidden, weight, bias, labels, opts, impl,
                                              chunk_size, shard)  # fmt: skip
        ctx.opts, ctx.impl, ctx.chunk_size, ctx.shard, ctx.labels = (
            opts,
            impl,
            chunk_size,
            shard,
            labels,
        )
        ctx.need = (*ctx.needs_input_grad[:2], bias is not None and ctx.needs_input_grad[2])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, entropy, lse)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        check_first_order()
        hidden, weight, bias, entropy, lse = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return (None,) * 8
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        if entropy.numel() == 0:
            grad_entropy = None
        dh, dw, db = logprobs_backward(
            hidden, weight, bias, ctx.labels, entropy, lse, grad_logp, grad_entropy, ctx.opts,
            ctx.impl, ctx.chunk_size, ctx.need, ctx.shard,
        )  # fmt: skip
        return dh, dw, db, *(None,) * 5


def _refuse_reference_impl(impl: str) -> None:
    if impl == "reference":
        raise ValueError(
            "impl='reference' materializes the logits on one device; with a vocab-parallel "
            "(Shard(0) DTensor) weight use impl='auto', 'chunked' or 'fused'"
        )


def _local_inputs(hidden, weight, bias, layout: VocabLayout):
    """This rank's (hidden, weight shard, bias shard): hidden's gradient is summed across the
    ranks in backward; the shards' gradients come back as DTensors placed like the parameters."""
    if is_dtensor(hidden):
        hidden = hidden.to_local()  # its gradient comes back Replicate: the all-reduced sum
    hidden = SumGradAcrossRanks.apply(hidden, layout.group)
    weight = weight.to_local()  # differentiable: dW comes back as a Shard(0) DTensor
    bias = None if bias is None else bias.to_local()
    return hidden, weight, bias


def check_reference_layout(weight, ref_hidden, ref_weight, ref_bias) -> None:
    """asft's reference head must be sharded like the policy's: ref_weight (and ref_bias) Shard(0)
    DTensors on the policy weight's 1-D mesh when the policy's is vocab-parallel (so each rank's
    reference shard covers the same vocabulary ids), plain tensors otherwise; ref_hidden the same
    on every rank (plain, or a Replicate DTensor on that mesh). Shapes and placements only."""
    named = {"ref_hidden": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_bias}
    if not is_dtensor(weight):
        for name, t in named.items():
            if is_dtensor(t):
                raise ValueError(
                    f"{name} is a DTensor with {_describe(t)}, but weight is a plain tensor: the "
                    "reference head must be sharded like the policy's (both plain, or both "
                    "Shard(0) on the same 1-D mesh)"
                )
        return
    mesh = weight.device_mesh
    alike = "sharded like weight (a DTensor with placements (Shard(0),) on weight's 1-D mesh)"
    for name in ("ref_weight", "ref_bias"):
        t = named[name]
        if t is None:
            continue
        if not is_dtensor(t):
            raise ValueError(f"{name} is a plain tensor while weight is vocab-parallel; {name} "
                             f"must be {alike}")  # fmt: skip
        if t.device_mesh != mesh or not _is_vocab_shard(t):
            raise ValueError(f"{name} has {_describe(t)} while weight is vocab-parallel; {name} "
                             f"must be {alike}")  # fmt: skip
    if is_dtensor(ref_hidden) and (
        ref_hidden.device_mesh != mesh or not _is_replicated(ref_hidden)
    ):
        raise ValueError(
            f"ref_hidden has {_describe(ref_hidden)}: it must be the same on every rank (a plain "
            "tensor, or a DTensor with placements (Replicate(),) on weight's mesh)"
        )


def vocab_parallel_loss(hidden, weight, labels, bias, opts: LossOptions, impl: str,
                        chunk_size, layout: VocabLayout, token_weights=None,
                        old_logprobs=None, ref=None):  # fmt: skip
    """hidden (N, D) plain or Replicate DTensor; weight (V, D), bias (V,) or None: Shard(0)
    DTensors; labels (N,) global ids. impl: as loss.resolve_impl leaves it ("chunked" only where
    the Triton row kernels run, "chunked_torch" or "fused"). ref: asft's (ref_hidden (N, D_r),
    ref_weight, ref_bias) sharded like weight (check_reference_layout), or None.
    Returns (loss, stat sums (4,), number of valid tokens, log p_y (N,)), plain tensors."""
    _refuse_reference_impl(impl)
    hidden, weight, bias = _local_inputs(hidden, weight, bias, layout)
    if ref is not None:
        ref_hidden, ref_weight, ref_bias = ref
        ref = Reference(
            ref_hidden.to_local() if is_dtensor(ref_hidden) else ref_hidden,
            ref_weight.to_local(),
            None if ref_bias is None else ref_bias.to_local(),
        )
    return VocabParallelFunction.apply(
        hidden, weight, bias, labels, token_weights, old_logprobs, opts, impl, chunk_size,
        vocab_shard(layout), ref,
    )  # fmt: skip


def vocab_parallel_logprobs(hidden, weight, labels, bias, opts: LossOptions, impl: str,
                            chunk_size, layout: VocabLayout):  # fmt: skip
    """fused_linear_logprobs with a vocab-parallel head (shapes as vocab_parallel_loss): returns
    (log p_y (N,), H (N,) or empty), plain tensors, the same on every rank."""
    _refuse_reference_impl(impl)
    hidden, weight, bias = _local_inputs(hidden, weight, bias, layout)
    return VocabParallelLogprobsFunction.apply(
        hidden, weight, bias, labels, opts, impl, chunk_size, vocab_shard(layout)
    )
