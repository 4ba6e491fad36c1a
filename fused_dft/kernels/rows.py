"""Row kernels of the chunked path: statistics, then the logit gradient, of a (n, V) logits chunk.

One program per row, each a sweep over the vocabulary in BLOCK_V tiles; all math in fp32.

_rows_partials_kernel: z = transform(x) = softcap * tanh(logit_scale * x / softcap); per row the
    partials of partials.py, with an online log-sum-exp kept per row (one exp per element):
        tile max mt; m' = max(m, mt); alpha = exp(m - m');  e = exp(z - m')
        s <- alpha s + sum e;  t <- alpha (t + (m - m') s) + sum e (z - m')
    (relative to 0 while m' = -inf: a first tile of -inf logits gives no exp(-inf - -inf) = NaN)
    plus z_y (the label's logit, loaded first, before anything could write the row) and sum z.
_rows_grad_kernel: given the row's lse and coefficients (a, b, u[, c]) (coefficients.py), in place:
        l = z - lse;  dz = a * exp(l) - b * [j == y] - u - c * exp(l) * l;
        dx = dz * (1 - tanh^2) * logit_scale
    (c: the entropy's gradient, dH/dz = -p (l + H), fused_linear_logprobs; 0 for the losses).
Between the two, the caller merges partials across vocab shards (vocab parallelism) and computes
the per-token weights in torch, so both backends share one definition of the family.
Labels outside [0, V) (not in this shard) give z_y = 0 and no one-hot.

asft (HAS_REF): a reference model's raw logits chunk xr (n, V) beside the policy's,
zq = transform(xr) with the policy's logit_scale / softcap. The partials kernel also streams the
reference partials (mq, sq, kq) of partials.py over the same tiles (common.reference_update):
    sq = sum exp(zq - mq),  kq = sum exp(zq - mq) (zq - z),  KL(q || p) = kq / sq - lse_q + lse;
the gradient kernel subtracts r * q, q = exp(zq - lse_q), r = coefs[4] (alpha times the token's
weight and upstream gradient): dz = a p - b onehot - u - r q (a holds + r: dz = ... + r (p - q)).
xr is only read, and gets no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..options import LossOptions
from ..partials import NUM_PARTIALS, NUM_REF_PARTIALS
from . import common
from .common import new_output, reference_update, transform_logits

DEFAULT_BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _rows_partials_kernel(
    x_ptr,
    stride_xn,
    labels_ptr,
    part_ptr,
    n_rows,
    V,
    logit_scale,
    softcap,
    xr_ptr,
    stride_xrn,
    ref_part_ptr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NEED_ENTROPY: tl.constexpr,
    NEED_SUM: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xn
    y = tl.load(labels_ptr + row).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)

    # 1. the label's logit (0 when the label is not in [0, V))
    y_inside = (y >= 0) & (y < V)
    x_y = tl.load(x_row + y, mask=y_inside, other=0.0).to(tl.float32)
    z_y, _th_y = transform_logits(x_y, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    z_y = tl.where(y_inside, z_y, 0.0)

    # 2. online log-sum-exp over vocab tiles. Every tile so far may be all -inf (masked
    #    vocabulary entries, a bias of -inf): the exponents are taken relative to m_ref = m', or 0
    #    while m' = -inf (never exp(-inf - -inf) = nan), and e (z - m_ref) is 0 where e is 0 (not
    #    0 * -inf = nan); nan / +inf from the data still propagate through s
    m = float("-inf")
    s = 0.0
    t = 0.0
    sum_z = 0.0
    if HAS_REF:
        xr_row = xr_ptr + row * stride_xrn
        mq = float("-inf")
        sq = 0.0
        kq = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        z, _ = transform_logits(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref)
        if NEED_ENTROPY:
            # kept relative to the running max: no cancellation at |z| >> 1 (s > 0: m finite)
            shift = tl.where(s > 0, m - m_new, 0.0)
            t = alpha * (t + shift * s) + tl.sum(tl.where(e > 0, e * (z - m_ref), 0.0), 0)
        if NEED_SUM:
            sum_z += tl.sum(tl.where(mask, z, 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new
        if HAS_REF:  # the reference's partials over the same tile (z masked: -inf past V)
            xr = tl.load(xr_row + cols, mask=mask, other=0.0).to(tl.float32)
            zq, _ = transform_logits(xr, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
            mq, sq, kq = reference_update(mq, sq, kq, tl.where(mask, zq, float("-inf")), z)

    # 3. partials (5, n): m, s, t, z_y, sum_z; the reference's (3, n): mq, sq, kq
    tl.store(part_ptr + row, m)
    tl.store(part_ptr + n_rows + row, s)
    tl.store(part_ptr + 2 * n_rows + row, t)
    tl.store(part_ptr + 3 * n_rows + row, z_y)
    tl.store(part_ptr + 4 * n_rows + row, sum_z)
    if HAS_REF:
        tl.store(ref_part_ptr + row, mq)
        tl.store(ref_part_ptr + n_rows + row, sq)
        tl.store(ref_part_ptr + 2 * n_rows + row, kq)


@triton.jit
def _rows_grad_kernel(
    x_ptr,
    stride_xn,
    labels_ptr,
    lse_ptr,
    coef_ptr,
    n_rows,
    V,
    logit_scale,
    softcap,
    xr_ptr,
    stride_xrn,
    ref_lse_ptr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_UNIFORM: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xn
    y = tl.load(labels_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    a = tl.load(coef_ptr + row)
    b = tl.load(coef_ptr + n_rows + row)
    u = tl.load(coef_ptr + 2 * n_rows + row)
    c = 0.0
    if HAS_ENTROPY_GRAD:
        c = tl.load(coef_ptr + 3 * n_rows + row)
    if HAS_REF:
        xr_row = xr_ptr + row * stride_xrn
        r = tl.load(coef_ptr + 4 * n_rows + row)
        lse_q = tl.load(ref_lse_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        z, th = transform_logits(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        log_p = z - lse
        p = tl.exp(log_p)
        dz = a * p - tl.where(cols == y, b, 0.0)
        if HAS_UNIFORM:
            dz -= u
        if HAS_ENTROPY_GRAD:
            dz -= c * p * tl.where(mask, log_p, 0.0)
        if HAS_REF:  # - r q, q the reference's softmax
            xr = tl.load(xr_row + cols, mask=mask, other=0.0).to(tl.float32)
            zq, _ = transform_logits(xr, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
            dz -= r * tl.exp(zq - lse_q)
        if HAS_SOFTCAP:
            dz = dz * (1.0 - th * th)
        if HAS_SCALE:
            dz = dz * logit_scale
        tl.store(x_row + cols, dz.to(x_ptr.dtype.element_ty), mask=mask)


def _block(v: int, block_v: int | None) -> int:
    return max(16, block_v or min(DEFAULT_BLOCK_V, triton.next_power_of_2(v)))


def rows_partials(
    x: torch.Tensor,
    labels: torch.Tensor,
    opts: LossOptions,
    block_v: int | None = None,
    ref_logits: torch.Tensor | None = None,
):
    """x (n, V) raw logits, rows contiguous (not modified); labels (n,) int64.

    Returns fp32 partials (5, n) = m, s, t, z_y, sum_z (t and sum_z are 0 unless opts needs them).
    ref_logits (n, V) (asft): a reference model's raw logits (not modified); then returns the pair
    (partials (5, n), reference partials (3, n) = mq, sq, kq).
    """
    n, v = x.shape
    assert x.stride(1) == 1, "logits chunk must be contiguous along the vocabulary"
    has_ref = ref_logits is not None
    if has_ref:
        assert ref_logits.shape == x.shape and ref_logits.stride(1) == 1
    part = new_output((NUM_PARTIALS, n), torch.float32, x.device)
    ref_part = new_output((NUM_REF_PARTIALS, n), torch.float32, x.device) if has_ref else None
    if n == 0:
        return (part, ref_part) if has_ref else part
    with common.launch_device(x.device):
        _rows_partials_kernel[(n,)](
            x, x.stride(0), labels.contiguous(), part, n, v,
            float(opts.logit_scale), float(opts.softcap or 1.0),
            ref_logits if has_ref else x, ref_logits.stride(0) if has_ref else 0,
            ref_part if has_ref else part,
            HAS_SCALE=opts.logit_scale != 1.0,
            HAS_SOFTCAP=opts.softcap is not None,
            NEED_ENTROPY=opts.needs_entropy,
            NEED_SUM=opts.needs_logit_sum,
            HAS_REF=has_ref,
            BLOCK_V=_block(v, block_v),
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return (part, ref_part) if has_ref else part


def rows_grad_(
    x: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    coefs: torch.Tensor,
    opts: LossOptions,
    block_v: int | None = None,
    ref_logits: torch.Tensor | None = None,
    ref_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (n, V) raw logits, overwritten with dx; lse (n,) fp32; coefs (3, n) fp32 = (a, b, u), or
    (4, n) = (a, b, u, c) with the entropy-gradient term, or (5, n) = (a, b, u, 0, r) with
    ref_logits (n, V) a reference model's raw logits (not modified) and ref_lse (n,) its lse_q:
    dz -= r * exp(zq - lse_q)."""
    n, v = x.shape
    assert x.stride(1) == 1, "logits chunk must be contiguous along the vocabulary"
    has_ref = ref_logits is not None
    assert has_ref == (coefs.shape[0] == 5) == (ref_lse is not None)
    if has_ref:
        assert ref_logits.shape == x.shape and ref_logits.stride(1) == 1
    if n == 0:
        return x
    with common.launch_device(x.device):
        _rows_grad_kernel[(n,)](
            x, x.stride(0), labels.contiguous(), lse.float().contiguous(),
            coefs.float().contiguous(), n, v,
            float(opts.logit_scale), float(opts.softcap or 1.0),
            ref_logits if has_ref else x, ref_logits.stride(0) if has_ref else 0,
            ref_lse.float().contiguous() if has_ref else lse,
            HAS_SCALE=opts.logit_scale != 1.0,
            HAS_SOFTCAP=opts.softcap is not None,
            HAS_UNIFORM=opts.label_smoothing > 0,
            HAS_ENTROPY_GRAD=coefs.shape[0] == 4,
            HAS_REF=has_ref,
            BLOCK_V=_block(v, block_v),
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return x
