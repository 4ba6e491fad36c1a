"""Autograd Function around the fused Triton kernels (kernels/fused_fwd.py, kernels/fused_bwd.py).

The kernels read the non-ignored rows of hidden in place through an index (no gathered copy).
Forward keeps, per non-ignored token, lse and p_y (8 bytes); backward recomputes the logit tiles
with coef = upstream gradient * w (w = p_y for dft, 1 for ce), so any per-token upstream gradient
(reduction="none") is honoured exactly.
"""

from __future__ import annotations

import torch

from .options import LossOptions
from .reduction import mean_scale, reduce_token_loss, select_valid


class FusedLinearDFTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: LossOptions, config):
        from .kernels.fused_fwd import dft_fwd

        valid_idx, y_v = select_valid(labels, opts)
        num_valid = valid_idx.numel()
        if num_valid > 0:
            lse, z_y, row_max, entropy = dft_fwd(hidden, weight, bias, valid_idx, y_v, opts, config)
        else:
            lse = z_y = row_max = entropy = hidden.new_zeros(0, dtype=torch.float32)
        logp_y = z_y - lse
        p_y = logp_y.exp()
        token_loss = -p_y * logp_y if opts.is_dft else -logp_y

        loss = reduce_token_loss(token_loss, valid_idx, hidden.shape[0], opts)
        stat_sums = torch.stack(
            [-logp_y.sum(), entropy.sum(), (z_y >= row_max).float().sum()]
        ).float()
        num_valid_t = torch.tensor(num_valid, device=hidden.device)

        ctx.opts, ctx.config, ctx.num_valid = opts, config, num_valid
        ctx.save_for_backward(hidden, weight, bias, y_v, valid_idx, lse, p_y)
        ctx.mark_non_differentiable(stat_sums, num_valid_t)
        return loss, stat_sums, num_valid_t

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_num):
        from .kernels.fused_bwd import dft_bwd

        opts = ctx.opts
        hidden, weight, bias, y_v, valid_idx, lse, p_y = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        if opts.reduction == "none":
            coef = grad_loss.index_select(0, valid_idx).float()
        else:
            coef = (grad_loss.float() * mean_scale(opts, ctx.num_valid)).expand(ctx.num_valid)
        if opts.is_dft:
            coef = coef * p_y
        coef = coef.contiguous()
        dh, dw, db = dft_bwd(
            hidden, weight, bias, valid_idx, y_v, lse, coef, opts, need, ctx.config
        )
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, None, None, None


def fused_loss(hidden, weight, labels, bias, opts, config=None):
    """hidden (N, D), labels (N,). Returns (loss, stat sums (3,), number of valid tokens).
    config: a FusedConfig for both kernels; None lets kernels/configs.py choose."""
    return FusedLinearDFTFunction.apply(hidden, weight, bias, labels, opts, config)
