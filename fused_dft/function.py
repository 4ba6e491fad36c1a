"""Autograd Function around the fused Triton kernels (kernels/fused_fwd.py, kernels/fused_bwd.py).

The kernels read the non-ignored rows of hidden in place through an index (no gathered copy).
Forward reduces each token's logits to its partials (partials.py) without storing any logits,
then computes the loss and the gradient coefficients (a, b, u) in torch (weights.py); it keeps,
per non-ignored token, lse and (a, b, u) (16 bytes). Backward recomputes the logit tiles and
applies the coefficients times the upstream gradient, so any per-token upstream gradient
(reduction="none") is honoured exactly.
"""

from __future__ import annotations

import torch

from . import partials as P
from .options import LossOptions
from .reduction import mean_scale, reduce_token_loss, scatter_rows, select_rows
from .weights import token_terms


class FusedLinearDFTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weights, old_logprobs, opts: LossOptions,
                config):  # fmt: skip
        from .kernels.fused_fwd import dft_fwd

        rows = select_rows(labels, opts, token_weights, old_logprobs, torch.float32)
        part = dft_fwd(hidden, weight, bias, rows.idx, rows.labels, opts, config)
        stats = P.finalize(part)
        terms = token_terms(stats, opts, weight.shape[0], rows.token_weights, rows.old_logprobs)

        loss = reduce_token_loss(terms.loss, rows, hidden.shape[0], opts)
        sums = P.stat_sums(stats)
        logprobs = scatter_rows(stats.logp, rows, hidden.shape[0])

        ctx.opts, ctx.config, ctx.rows = opts, config, rows
        ctx.save_for_backward(hidden, weight, bias, stats.lse, terms.scaled(1))
        ctx.mark_non_differentiable(sums, rows.num_valid, logprobs)
        return loss, sums, rows.num_valid, logprobs

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums, _grad_num, _grad_logprobs):
        from .kernels.fused_bwd import dft_bwd

        opts, rows = ctx.opts, ctx.rows
        hidden, weight, bias, lse, coefs = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        if opts.reduction == "none":
            upstream = grad_loss.index_select(0, rows.idx).float()
        else:
            upstream = grad_loss.float() * mean_scale(opts, rows, torch.float32)
        coefs = (coefs * upstream).contiguous()
        dh, dw, db = dft_bwd(
            hidden, weight, bias, rows.idx, rows.labels, lse, coefs, opts, need, ctx.config
        )
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, None, None, None, None, None


def fused_loss(hidden, weight, labels, bias, opts, config=None, token_weights=None,
               old_logprobs=None):  # fmt: skip
    """hidden (N, D), labels (N,). Returns (loss, stat sums (4,), number of valid tokens,
    per-token log p_y (N,))."""
    from .kernels.fused_fwd import DEFAULT_CONFIG

    return FusedLinearDFTFunction.apply(
        hidden, weight, bias, labels, token_weights, old_logprobs, opts, config or DEFAULT_CONFIG
    )
