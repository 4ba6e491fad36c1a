"""Row kernel of the chunked path: loss, statistics and logit gradient of a (n, V) logits chunk.

One program per row, two sweeps over the vocabulary in BLOCK_V tiles:
  1. online log-sum-exp: per lane m (running max), s = sum exp(z - m), t = sum exp(z - m) (z - m);
     on a new max m': s <- s exp(m - m'), t <- exp(m - m') (t + (m - m') s). Lanes merge the same
     way into the row's m*, s*, t*; lse = m* + log s*, entropy = lse - E[z] = log s* - t* / s*;
     log p_y = z_y - lse, p_y = exp(log p_y); loss = -log p_y (ce) or -p_y log p_y (dft).
  2. (COMPUTE_GRAD) dz = coef * w * (exp(z - lse) - onehot(y)), w = p_y (dft) or 1 (ce),
     times (1 - tanh^2) for softcap and logit_scale, stored in place over the raw logits.
where z = softcap * tanh(logit_scale * x / softcap) of the raw logits x. All math in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..options import LossOptions
from .common import new_output, transform_logits

DEFAULT_BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _dft_rows_kernel(
    x_ptr,
    stride_xn,
    labels_ptr,
    coef_ptr,
    loss_ptr,
    stats_ptr,
    V,
    logit_scale,
    softcap,
    IS_DFT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xn
    y = tl.load(labels_ptr + row).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)

    # 1. online log-sum-exp, per lane, over vocab tiles
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    t = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        z, _ = transform_logits(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, z)
        # lanes that have seen no column keep m = -inf (only when V < BLOCK_V); shifting them by
        # 0 instead of -inf keeps exp(-inf - -inf) = nan out: their s and t stay 0
        m_shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m - m_shift)
        e = tl.exp(z - m_shift)
        # t is kept relative to the running max (sum e * (z - m)): no cancellation at |z| >> 1
        t = alpha * (t + tl.where(m > float("-inf"), m - m_shift, 0.0) * s)
        t += e * tl.where(mask, z - m_shift, 0.0)
        s = s * alpha + e
        m = m_new
    m_row = tl.max(m, 0)
    seen = m > float("-inf")
    lane_scale = tl.where(seen, tl.exp(m - m_row), 0.0)
    s_row = tl.sum(s * lane_scale, 0)
    t_row = tl.sum(lane_scale * (t + tl.where(seen, m - m_row, 0.0) * s), 0)
    log_s = tl.log(s_row)
    lse = m_row + log_s

    # 2. target logit, loss, statistics
    x_y = tl.load(x_row + y).to(tl.float32)
    z_y, _ = transform_logits(x_y, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    logp_y = z_y - lse
    p_y = tl.exp(logp_y)
    if IS_DFT:
        loss = -p_y * logp_y
    else:
        loss = -logp_y
    tl.store(loss_ptr + row, loss)
    tl.store(stats_ptr + row * 3 + 0, -logp_y)
    tl.store(stats_ptr + row * 3 + 1, log_s - t_row / s_row)
    tl.store(stats_ptr + row * 3 + 2, (z_y >= m_row).to(tl.float32))

    # 3. gradient w.r.t. the raw logits, in place
    if COMPUTE_GRAD:
        w = tl.load(coef_ptr + row).to(tl.float32)
        if IS_DFT:
            w = w * p_y
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            z, th = transform_logits(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
            dz = w * (tl.exp(z - lse) - tl.where(cols == y, 1.0, 0.0))
            if HAS_SOFTCAP:
                dz = dz * (1.0 - th * th)
            if HAS_SCALE:
                dz = dz * logit_scale
            tl.store(x_row + cols, dz.to(x_ptr.dtype.element_ty), mask=mask)


def dft_rows(
    x: torch.Tensor,
    labels: torch.Tensor,
    coef: torch.Tensor | None,
    opts: LossOptions,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, V) raw logits, row-contiguous; overwritten with the gradient when coef is given.

    labels (n,) in [0, V); coef (n,) fp32 or None. Returns token loss (n,) and stats (n, 3), fp32.
    """
    n, v = x.shape
    assert x.stride(1) == 1, "logits chunk must be contiguous along the vocabulary"
    loss = new_output((n,), torch.float32, x.device)
    stats = new_output((n, 3), torch.float32, x.device)
    if n == 0:
        return loss, stats
    block = block_v or min(DEFAULT_BLOCK_V, triton.next_power_of_2(v))
    block = max(16, block)
    _dft_rows_kernel[(n,)](
        x,
        x.stride(0),
        labels.contiguous(),
        coef.contiguous() if coef is not None else loss,
        loss,
        stats,
        v,
        float(opts.logit_scale),
        float(opts.softcap or 1.0),
        IS_DFT=opts.is_dft,
        HAS_SCALE=opts.logit_scale != 1.0,
        HAS_SOFTCAP=opts.softcap is not None,
        COMPUTE_GRAD=coef is not None,
        BLOCK_V=block,
        num_warps=NUM_WARPS,
    )
    return loss, stats
