"""Public API: fused_linear_dft_loss and FusedLinearDFTLoss. Checks (arguments.py), then one path.

impl="auto" picks, in this order:
  - CUDA tensors and Triton installed: "chunked" with the Triton row kernel (the fastest path);
  - anything else (CPU, MPS, ...): "chunked" on torch ops, even when Triton's interpreter is on.
"fused" (no logits tile ever reaches memory; lowest memory, slower) and "reference" (materializes
the logits; the oracle) are chosen explicitly. docs/architecture.md follows one call from here
to the kernels and back.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .arguments import (
    check_impl,
    check_loss_options,
    check_reference_inputs,
    check_tensors,
    check_token_inputs,
    check_vocab_params,
    int64_labels,
    make_options,
    resolve_impl,
    resolve_validate,
)
from .family import text_table
from .options import LossStats
from .parallel import check_reference_layout, vocab_parallel_layout


def fused_linear_dft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    loss_type: str = "dft",
    ignore_index: int = -100,
    reduction: str = "mean",
    logit_scale: float = 1.0,
    softcap: float | None = None,
    token_weights: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    impl: str = "auto",
    return_stats: bool = False,
    return_logprobs: bool = False,
    chunk_size: int | None = None,
    validate: str | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    **family_params: float | None,
):
    """The LM head's DFT loss (or another member of the family), without the full logits.

    Shapes: hidden (..., D); weight (V, D); labels (...) integer, same leading shape as hidden;
    bias (V,) or None; token_weights and old_logprobs float, shaped like labels, or None.

    For token t: z = logit_scale * (W h_t + b), then z <- softcap * tanh(z / softcap) if set;
    lse = logsumexp(z), log p = z_y - lse, p = exp(log p), H = lse - sum softmax(z) z.
    loss_type (w is gradient-stopped; every gradient is w * (softmax(z) - onehot(y))), with its
    parameters given as keywords (family_params; family.py has the records, docs/losses.md
    the details):
      {family}
    z_loss >= 0 adds z_loss * lse^2; label_smoothing in [0, 1) (loss_type="ce" only) is exactly
    torch's cross_entropy(label_smoothing=...); token_weights multiply each token's whole loss
    and gradient (0-weight tokens still count in the "mean" denominator). token_weights and
    old_logprobs are constants: no gradient flows to them.
    Tokens whose label is ignore_index contribute nothing (and cost no matmul work).
    ref_hidden (..., D_ref), ref_weight (V, D_ref), ref_bias (V,) or None: the reference model's
    last hidden states and LM head, required by loss_type="asft" (KL(q || p) per token, q the
    reference's softmax; no gradient flows to them; every impl; with a vocab-parallel weight,
    ref_weight / ref_bias sharded alike, ref_hidden the same on each rank).

    reduction: "mean" (over non-ignored tokens; 0 when there are none), "sum", or "none"
    (per-token losses shaped like labels, 0 at ignored positions; any upstream gradient).
    The loss is fp32 (float64 for float64 inputs) whatever the input dtype.

    Returns the loss; with return_stats=True also a LossStats (detached ce, entropy, accuracy,
    lse, num_tokens), with return_logprobs=True also the detached log p_y shaped like labels
    (0 at ignored positions): (loss, stats), (loss, logprobs) or (loss, stats, logprobs).
    chunk_size: tokens per chunk for impl="chunked"/"auto" (default: sized from the vocabulary).
    validate: "sync" (default on the CPU): bad labels and non-finite token_weights/old_logprobs
    raise ValueError before any compute (one host sync on CUDA); "device" (default on CUDA): no
    host check, a bad label is never read and makes the loss NaN; "off": no check (a bad label
    is never read and counts as absent). See arguments.py. Either way, on CUDA the ignored tokens
    are dropped exactly with one host read of their count, except while a CUDA graph is being
    captured (then every row is multiplied; docs/compile.md).

    Vocab-parallel (parallel.py): a weight (and bias) that is a DTensor sharded Shard(0) on a 1-D
    device mesh means the vocabulary is split across the mesh's ranks (uneven shards are fine).
    hidden must then be the same on every rank of the mesh (a plain tensor or a Replicate
    DTensor), labels hold global ids, and every rank makes the same call. Each rank computes its
    shard's logits chunk by chunk and the ranks merge per-token partials (one all-gather per
    chunk), so the loss, stats and log-probs are those of the whole vocabulary, the same on every
    rank (plain tensors). dW / db come back as DTensors placed like weight / bias; dh is summed
    across the ranks in backward, so each rank gets all of it (a Replicate DTensor for a DTensor
    hidden). impl "reference" is not available there. Any other DTensor placement, a 2-D mesh,
    hidden and weight on different meshes or a sharded hidden raise a ValueError before any
    compute. eaft's top-k entropy gathers each rank's top k per token; asft's reference head must
    be sharded like the policy's (its partials are merged the same way). An FSDP-sharded weight
    is not vocab-parallel: FSDP unshards it before the loss (see patch_model, which routes the
    loss through an FSDP lm_head unit's own unshard).
    """
    opts = make_options(
        loss_type=loss_type,
        ignore_index=ignore_index,
        reduction=reduction,
        logit_scale=logit_scale,
        softcap=softcap,
        return_stats=return_stats,
        return_logprobs=return_logprobs,
        z_loss=z_loss,
        label_smoothing=label_smoothing,
        **family_params,
    )
    check_impl(impl, chunk_size)
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    ref_hidden, ref_weight, ref_bias = autocast_inputs(ref_hidden, ref_weight, ref_bias)
    check_tensors(hidden, weight, labels, bias)
    layout = vocab_parallel_layout(hidden, weight, bias, labels)  # None unless DTensors are given
    labels = int64_labels(labels)  # uint8 / int8 / int16 / int32 compare exactly from here on
    check_token_inputs(opts, labels, token_weights, old_logprobs)
    check_vocab_params(opts, weight.shape[0])
    check_reference_inputs(opts, impl, hidden, weight, ref_hidden, ref_weight, ref_bias)
    check_reference_layout(weight, ref_hidden, ref_weight, ref_bias)
    opts = dataclasses.replace(opts, validate=resolve_validate(validate, hidden.device))
    impl = resolve_impl(impl, hidden)

    flat = [None if t is None else t.reshape(-1) for t in (labels, token_weights, old_logprobs)]
    ref = None
    if ref_hidden is not None:
        ref = (ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, ref_bias)
    loss, stat_sums, num_valid, logprobs = _run(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, *flat, opts, impl, chunk_size, layout,
        ref,
    )  # fmt: skip
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    out = [loss]
    if return_stats:
        out.append(LossStats.from_sums(stat_sums, num_valid))
    if return_logprobs:
        out.append(logprobs.reshape(labels.shape))
    return out[0] if len(out) == 1 else tuple(out)


def _run(hidden, weight, bias, labels, token_weights, old_logprobs, opts, impl, chunk_size,
         layout, ref=None):  # fmt: skip
    """The checked call on (N, D) / (N,) inputs -> (loss, stat sums (4,), num_valid, log p_y):
    vocab-parallel (parallel.py), the reference, or the custom ops over the driver (ops.py)."""
    if layout is not None:
        from .parallel import vocab_parallel_loss

        return vocab_parallel_loss(
            hidden, weight, labels, bias, opts, impl, chunk_size, layout, token_weights,
            old_logprobs, ref,
        )  # fmt: skip
    if impl == "reference":
        from .reference import reference_loss

        return reference_loss(hidden, weight, labels, bias, opts, token_weights, old_logprobs,
                              ref)  # fmt: skip
    from .backends.base import Reference
    from .ops import linear_loss  # chunked (Triton row kernels), chunked_torch, fused

    return linear_loss(
        hidden, weight, bias, labels, token_weights, old_logprobs, opts, impl, chunk_size,
        None if ref is None else Reference(*ref),
    )  # fmt: skip


class FusedLinearDFTLoss(nn.Module):
    """Module form of fused_linear_dft_loss; takes the same keyword options.

    forward(hidden, weight, labels, bias=None, token_weights=None, old_logprobs=None,
            ref_hidden=None, ref_weight=None, ref_bias=None)
    """

    def __init__(self, **options) -> None:
        super().__init__()
        check_loss_options(caller="FusedLinearDFTLoss", **options)
        self.options = dict(options)

    def forward(self, hidden, weight, labels, bias=None, token_weights=None, old_logprobs=None,
                ref_hidden=None, ref_weight=None, ref_bias=None):  # fmt: skip
        return fused_linear_dft_loss(
            hidden, weight, labels, bias,
            token_weights=token_weights, old_logprobs=old_logprobs, ref_hidden=ref_hidden,
            ref_weight=ref_weight, ref_bias=ref_bias, **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


fused_linear_dft_loss.__doc__ = fused_linear_dft_loss.__doc__.format(family=text_table(indent=6))


def autocast_inputs(hidden, weight, bias):
    """Under torch.autocast, cast the floating inputs to the autocast dtype, as the LM head's
    F.linear would (fp32 master weights with bf16 compute); gradients flow back through the cast."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        return hidden, weight, bias
    device_type = hidden.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    return cast(hidden), cast(weight), cast(bias)
