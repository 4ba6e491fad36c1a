"""Public API: fused_linear_logprobs, per-token log p_y and entropy with gradients, no logits.

For RL-style trainers (verl, TRL's per-token losses) that build their own loss from the
log-probabilities of the labels and the predictive entropy: the same checks (arguments.py), the
same backends and selection as the loss, through one custom op (ops.linear_logprobs).
"""

from __future__ import annotations

import dataclasses

import torch

from .arguments import check_impl, check_tensors, make_options, resolve_impl, resolve_validate
from .loss import autocast_inputs
from .parallel import vocab_parallel_layout


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_size: int | None = None,
    validate: str | None = None,
    return_entropy: bool = True,
):
    """Per-token log p_y and entropy H of softmax(z), differentiable through both, without the
    logits.

    Shapes: hidden (..., D); weight (V, D); labels (...) integer; bias (V,) or None. For token t:
    z = logit_scale * (W h_t + b), then z <- softcap * tanh(z / softcap) if set; lse =
    logsumexp(z); log p_y = z_y - lse; H = lse - sum softmax(z) z. Gradients, with l = z - lse:
        d log p_y / dz = onehot(y) - softmax,      dH / dz = -softmax * (l + H)
    so any upstream gradients (g_l, g_H) give dz = a softmax - b onehot - c softmax l with
    a = -g_l - g_H H, b = -g_l, c = g_H (coefficients.logprob_coefficients): the backward
    recomputes the logits once (8 N D V FLOPs in all, as a loss with reduction="none").

    Returns (log p_y, H) shaped like labels, fp32 (float64 for float64 inputs), 0 at ignored
    tokens and no gradient from them; log p_y alone with return_entropy=False (then H is not
    computed). impl, chunk_size, validate: as in fused_linear_dft_loss ("reference" materializes
    the logits). Vocab-parallel: a weight (and bias) sharded Shard(0) on a 1-D mesh, as in
    fused_linear_dft_loss (the ranks merge their partials, so log p_y and H are the whole
    vocabulary's, the same on every rank; dh is summed across the ranks in backward).
    """
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {return_entropy!r}")
    opts = make_options(
        loss_type="ce",
        ignore_index=ignore_index,
        reduction="none",
        logit_scale=logit_scale,
        softcap=softcap,
        return_stats=return_entropy,
    )
    check_impl(impl, chunk_size)
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_tensors(hidden, weight, labels, bias)
    layout = vocab_parallel_layout(hidden, weight, bias, labels)  # None unless DTensors are given
    opts = dataclasses.replace(opts, validate=resolve_validate(validate, hidden.device))
    impl = resolve_impl(impl, hidden)
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if layout is not None:
        from .parallel import vocab_parallel_logprobs

        logp, entropy = vocab_parallel_logprobs(flat_hidden, weight, flat_labels, bias, opts, impl,
                                                chunk_size, layout)  # fmt: skip
    elif impl == "reference":
        from .reference import reference_logprobs

        logp, entropy = reference_logprobs(flat_hidden, weight, flat_labels, bias, opts)
    else:
        from .ops import linear_logprobs

        logp, entropy = linear_logprobs(flat_hidden, weight, bias, flat_labels, opts, impl,
                                        chunk_size)  # fmt: skip
    if not return_entropy:
        return logp.reshape(labels.shape)
    return logp.reshape(labels.shape), entropy.reshape(labels.shape)
