"""Fused backward, step 1: the logit gradient of a (token chunk x vocab chunk) block, from tl.dot.

Work: 2*n*D*Vc FLOPs per block (the logits recomputed), one store of the block.

The backward of the fused path (function.py) walks the vocabulary in chunks of Vc columns (and the
tokens in chunks when there are many) with a bounded scratch buffer dz (n_c x Vc):
    1. this kernel: x = h W_c^T (+ b_c), z = transform(x),
           dz = (a * exp(z - lse) - b * onehot(y) - u) * (1 - tanh^2 if softcap) * logit_scale
       (with the entropy's gradient, fused_linear_logprobs: - c * exp(l) * l, l = z - lse,
       inside the parenthesis) with each token's lse from the forward and (a, b, u[, c]) of
       coefficients.py times the upstream
       gradient, stored in the input dtype (the tensor-core operand of the next two steps);
    2. dW_c = dz^T h_c and dh_c += dz W_c, cuBLAS GEMMs with fp32 accumulation;  db_c = sum dz.
No atomics, so gradients are bitwise reproducible, and every weight row's gradient is written once
(per token chunk). In all 6*N*D*V FLOPs for the backward, 8*N*D*V with the forward.

asft (HAS_REF): the reference's logits tile zq = transform(h_ref W_ref_c^T (+ b_ref_c)) is
recomputed too (a second tl.dot over D_ref; the reference gets no gradient) and, with lse_q from
the forward and r = coefs[4] (alpha times the token weight and the upstream gradient), inside
the parenthesis
       - r * exp(zq - lse_q)        (a holds + r: r (softmax(z) - q) in all)
2*n*(D + D_ref)*Vc FLOPs per block; like the forward, its own tiles (configs.plan(reference=True)).

Grid: one program per (token block, vocab tile) of the block, in the grouped order of
kernels.common.grouped_program (hidden rows and weight tiles reused in L2). With V_HALVES = 2 a
vocab tile is 2*BLOCK_V columns, recomputed as two halves that share each h load; dz is formed
and stored one half after the other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..options import LossOptions
from . import common
from .common import grouped_program, logits_tile, logits_tiles, transform_logits
from .configs import DZ_KEY, LaunchPlan, n_bucket
from .fused_fwd import kernel_flags, reference_flags


@triton.jit
def _fused_dz_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    idx_ptr,
    labels_ptr,
    count_ptr,
    count_offset,
    lse_ptr,
    coef_ptr,
    stride_coef,
    dz_ptr,
    stride_dzn,
    db_ptr,
    stride_dbn,
    N,
    V_chunk,
    v_start,
    D,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    logit_scale,
    softcap,
    n_bucket,  # the autotune key's N (configs.n_bucket); not read by the kernel
    rh_ptr,  # asft's reference (HAS_REF): hidden (N, D_ref), head (V, D_ref), bias, lse_q (n,)
    rw_ptr,
    rb_ptr,
    ref_lse_ptr,
    D_ref,
    stride_rhn,
    stride_rhd,
    stride_rwv,
    stride_rwd,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_UNIFORM: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
    V_HALVES: tl.constexpr,
):
    pid_n, pid_v = grouped_program(
        tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V_chunk, BLOCK_V * V_HALVES), GROUP_N
    )
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    local_cols = pid_v.to(tl.int64) * (BLOCK_V * V_HALVES) + tl.arange(0, BLOCK_V)
    cols = local_cols + v_start
    # rows past the token count (a static selection puts the tokens first) get dz = 0 and a
    # block without a token skips its matmul
    count = tl.minimum(tl.load(count_ptr).to(tl.int64) - count_offset, N)
    row_mask = rows < count
    col_mask = local_cols < V_chunk
    src_rows = tl.load(idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    d_active = tl.where(pid_n * BLOCK_N < count, D, 0)

    # 1. recompute the logits tile; with V_HALVES = 2 a BLOCK_N x 2*BLOCK_V tile as two halves,
    #    whose gradients (steps 2, 3) are formed and stored one after the other
    x, x_hi = logits_tiles(
        h_ptr, w_ptr, b_ptr, src_rows, cols, row_mask, col_mask, local_cols + BLOCK_V < V_chunk,
        d_active, stride_hn, stride_hd, stride_wv, stride_wd,
        HAS_BIAS, UPCAST, FP32_IEEE, BLOCK_N, BLOCK_V, BLOCK_D, V_HALVES,
    )  # fmt: skip
    y = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    a = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    b = tl.load(coef_ptr + stride_coef + rows, mask=row_mask, other=0.0)
    for half in tl.static_range(V_HALVES):
        if half == 1:
            x = x_hi
            local_cols = local_cols + BLOCK_V
            col_mask = local_cols < V_chunk
        z, th = transform_logits(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)

        # 2. its gradient: a softmax - b onehot - u, then the softcap / scale chain rule
        log_p = z - lse[:, None]
        p = tl.exp(log_p)
        dz = a[:, None] * p
        y_local = (y - v_start).to(tl.int32)  # an int32 compare in the tile (cheaper than int64)
        dz -= tl.where(local_cols.to(tl.int32)[None, :] == y_local[:, None], b[:, None], 0.0)
        if HAS_UNIFORM:
            u = tl.load(coef_ptr + 2 * stride_coef + rows, mask=row_mask, other=0.0)
            dz -= u[:, None]
        if HAS_ENTROPY_GRAD:  # dH/dz = -p (l + H): the -p H part is in a
            c = tl.load(coef_ptr + 3 * stride_coef + rows, mask=row_mask, other=0.0)
            dz -= c[:, None] * p * tl.where(col_mask[None, :], log_p, 0.0)
        if HAS_REF:  # - r q: the reference's tile recomputed over D_ref (dz live: two fp32 tiles)
            xq = logits_tile(
                rh_ptr, rw_ptr, rb_ptr, src_rows, local_cols + v_start, row_mask, col_mask,
                tl.where(pid_n * BLOCK_N < count, D_ref, 0),
                stride_rhn, stride_rhd, stride_rwv, stride_rwd,
                HAS_REF_BIAS, UPCAST, FP32_IEEE, BLOCK_N, BLOCK_V, BLOCK_D,
            )  # fmt: skip
            zq, _ = transform_logits(xq, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
            r = tl.load(coef_ptr + 4 * stride_coef + rows, mask=row_mask, other=0.0)
            lse_q = tl.load(ref_lse_ptr + rows, mask=row_mask, other=0.0)
            dz -= r[:, None] * tl.exp(zq - lse_q[:, None])
        if HAS_SOFTCAP:
            dz = dz * (1.0 - th * th)
        if HAS_SCALE:
            dz = dz * logit_scale
        dz = tl.where(row_mask[:, None], dz, 0.0)

        # 3. one store of the block, in the scratch's dtype, and the bias gradient's column sums
        #    of this token block in fp32 (summed over token blocks by the caller: no atomics).
        #    Their order is the one each tile compiles best in for sm_90: the sums first for one
        #    half (the store first: tf32 128x128x32 156 -> 168 registers, triton 3.9), the store
        #    first for two halves (the sums first: 16 B/thread of spills with triton 3.6)
        db_row = db_ptr + pid_n.to(tl.int64) * stride_dbn  # int64: program id x a runtime int
        if COMPUTE_DB and V_HALVES == 1:
            tl.store(db_row + local_cols, tl.sum(dz, 0), mask=col_mask)
        tl.store(
            dz_ptr + rows[:, None] * stride_dzn + local_cols[None, :],
            dz.to(dz_ptr.dtype.element_ty),
            mask=(rows < N)[:, None] & col_mask[None, :],
        )
        if COMPUTE_DB and V_HALVES == 2:
            tl.store(db_row + local_cols, tl.sum(dz, 0), mask=col_mask)


def fused_dz(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_idx: torch.Tensor,
    labels: torch.Tensor,
    count: torch.Tensor,
    count_offset: int,
    lse: torch.Tensor,
    coefs: torch.Tensor,
    v_start: int,
    out: torch.Tensor,
    opts: LossOptions,
    plan: LaunchPlan,
    db_partial: torch.Tensor | None = None,
    ref: tuple | None = None,
    ref_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logit gradient of tokens row_idx (n,) x vocab columns [v_start, v_start + out.shape[1]).

    hidden (N, D) any strides (rows read in place through row_idx); labels and lse (n,);
    count: device scalar; local row r is a token when count_offset + r < count (else dz = 0);
    coefs (3, n') fp32 = (a, b, u) x upstream (or (4, n') with c, the entropy's gradient), any
    view whose rows are n-long slices with stride coefs.stride(0); out (n, Vc) with unit column
    stride, overwritten.
    db_partial: None, or zeroed fp32 (>= cdiv(n, plan.min_block_n), >= Vc) with unit column
    stride, whose first cdiv(n, BLOCK_N) rows receive the column sums of dz per token block (in
    fp32, before dz is rounded to out's dtype); summing all its rows gives db.
    ref (asft) = (ref_hidden (N, D_ref), ref_weight (V, D_ref), ref_bias or None) with ref_lse
    (n,) fp32 the reference's lse_q and coefs (5, n') = (a, b, u, 0, r): dz -= r q. The plan must
    be configs.plan(..., reference=True)'s.
    """
    n, vc = out.shape
    assert out.stride(1) == 1 and coefs.stride(1) == 1, "out and coefs need unit column stride"
    assert row_idx.shape[0] == n and v_start + vc <= weight.shape[0]
    has_ref = ref is not None
    assert has_ref == (coefs.shape[0] == 5) == (ref_lse is not None)
    ref_hidden, ref_weight, ref_bias = ref if has_ref else (hidden, weight, None)  # not read
    if n == 0 or vc == 0:
        return out
    with common.launch_device(hidden.device):
        plan.launch(
            _fused_dz_kernel,
            lambda meta: (
                triton.cdiv(n, meta["BLOCK_N"])
                * triton.cdiv(vc, meta["BLOCK_V"] * meta["V_HALVES"]),  # program step: 1-2 halves
            ),
            hidden, weight, bias if bias is not None else weight, row_idx, labels, count,
            count_offset, lse, coefs, coefs.stride(0), out, out.stride(0),
            db_partial if db_partial is not None else out,
            db_partial.stride(0) if db_partial is not None else 0,
            n, vc, v_start, hidden.shape[1],
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            float(opts.logit_scale), float(opts.softcap or 1.0), n_bucket(hidden.shape[0]),
            ref_hidden, ref_weight, ref_bias if ref_bias is not None else ref_weight,
            ref_lse if has_ref else lse, ref_hidden.shape[1],
            ref_hidden.stride(0), ref_hidden.stride(1), ref_weight.stride(0), ref_weight.stride(1),
            key=DZ_KEY,
            reset_to_zero=("db_ptr",) if db_partial is not None else (),
            HAS_UNIFORM=opts.label_smoothing > 0,
            HAS_ENTROPY_GRAD=coefs.shape[0] == 4,
            COMPUTE_DB=db_partial is not None,
            **kernel_flags(hidden, bias, opts),
            **reference_flags(ref),
        )  # fmt: skip
    return out
