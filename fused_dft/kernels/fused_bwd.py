"""Fused backward: recompute each logits tile, form its gradient in registers, accumulate dh and dW.

Grid (token blocks, vocab tiles). A program recomputes x = h W_tile^T (+ b), z = transform(x), and
    dz = coef * (exp(z - lse) - onehot(y)) * (1 - tanh^2 if softcap) * logit_scale
with coef = upstream gradient * (p_y for dft, 1 for ce) per token. Then, over D in BLOCK_D steps,
    dh[rows, d]  += dz   @ W[cols, d]     (atomic, fp32)
    dW[cols, d]  += dz^T @ h[rows, d]     (atomic, fp32)
    db[cols]     += sum_rows dz           (atomic, fp32)
The matmul work is 8*N*D*V FLOPs (the tile is recomputed); memory beyond the fp32 gradients is O(1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..options import LossOptions
from . import configs
from .common import transform_logits
from .configs import FusedConfig
from .fused_fwd import kernel_flags, logits_tile


@triton.jit
def _dft_bwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    idx_ptr,
    labels_ptr,
    lse_ptr,
    coef_ptr,
    dh_ptr,
    dw_ptr,
    db_ptr,
    N,
    V,
    D,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    logit_scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    src_rows = tl.load(idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)

    # 1. recompute the logits tile
    x = logits_tile(
        h_ptr, w_ptr, b_ptr, src_rows, cols, row_mask, col_mask, D,
        stride_hn, stride_hd, stride_wv, stride_wd,
        HAS_BIAS, UPCAST, FP32_IEEE, BLOCK_N, BLOCK_V, BLOCK_D,
    )  # fmt: skip
    z, th = transform_logits(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)

    # 2. gradient of the tile; rows past N and columns past V are zeroed
    y = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
    dz = coef[:, None] * (tl.exp(z - lse[:, None]) - onehot)
    if HAS_SOFTCAP:
        dz = dz * (1.0 - th * th)
    if HAS_SCALE:
        dz = dz * logit_scale
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    if COMPUTE_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, 0), mask=col_mask)
    if not UPCAST:
        dz = dz.to(h_ptr.dtype.element_ty)  # tensor-core operand on the GPU (fp32 stays fp32)

    # 3. dh += dz W_tile and dW_tile += dz^T h, one BLOCK_D slice at a time
    offs_d = tl.arange(0, BLOCK_D)
    for d_start in range(0, D, BLOCK_D):
        ds = d_start + offs_d
        d_mask = ds < D
        if COMPUTE_DH:
            w = tl.load(
                w_ptr + cols[:, None] * stride_wv + ds[None, :] * stride_wd,
                mask=col_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                w = w.to(tl.float32)
            if FP32_IEEE:
                dh = tl.dot(dz, w, input_precision="ieee")
            else:
                dh = tl.dot(dz, w)
            tl.atomic_add(
                dh_ptr + rows[:, None] * D + ds[None, :],
                dh,
                mask=row_mask[:, None] & d_mask[None, :],
            )
        if COMPUTE_DW:
            h = tl.load(
                h_ptr + src_rows[:, None] * stride_hn + ds[None, :] * stride_hd,
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                h = h.to(tl.float32)
            if FP32_IEEE:
                dw = tl.dot(tl.trans(dz), h, input_precision="ieee")
            else:
                dw = tl.dot(tl.trans(dz), h)
            tl.atomic_add(
                dw_ptr + cols[:, None] * D + ds[None, :],
                dw,
                mask=col_mask[:, None] & d_mask[None, :],
            )


# fp32 scratch for dh is bounded to this many elements (64 MB): tokens are processed in chunks
# and each chunk's dh is cast into the output before the next one starts
DH_SCRATCH_ELEMENTS = 16 * 2**20


def dft_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_idx: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    opts: LossOptions,
    need: tuple[bool, bool, bool],
    config: FusedConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """hidden (N, D) any strides; row_idx (n,) int64 rows of hidden that are non-ignored tokens;
    labels, lse and coef (n,) per such token. need = (dh, dW, db). config: a fixed config instead
    of configs.plan's choice.

    Returns dh (N, D) in hidden's dtype (zero at rows not in row_idx), dW (V, D) fp32, db (V,)
    fp32; None where not needed.
    """
    n, d = row_idx.shape[0], hidden.shape[1]
    v = weight.shape[0]
    dev = hidden.device
    dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev) if need[0] else None
    dw = torch.zeros(v, d, dtype=torch.float32, device=dev) if need[1] else None
    db = torch.zeros(v, dtype=torch.float32, device=dev) if need[2] else None
    if n == 0 or not any(need):
        return dh, dw, db
    plan = configs.plan(hidden.dtype, dev, d, v, config)
    block_n = plan.max_block_n
    chunk = max(block_n, DH_SCRATCH_ELEMENTS // max(d, 1) // block_n * block_n)
    chunk = min(chunk, n)
    scratch = torch.empty(chunk, d, dtype=torch.float32, device=dev) if need[0] else None
    # outputs not needed get a one-element stand-in of their own: autotuning zeroes every
    # accumulator argument, which must never be an input such as lse
    unused = torch.zeros(1, dtype=torch.float32, device=dev)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        dh_c = scratch[: stop - start].zero_() if scratch is not None else None
        rows = stop - start

        def grid(meta, rows=rows):
            return triton.cdiv(rows, meta["BLOCK_N"]), triton.cdiv(v, meta["BLOCK_V"])

        plan.launch(
            _dft_bwd_kernel,
            grid,
            hidden, weight, bias if bias is not None else weight,
            row_idx[start:stop], labels[start:stop], lse[start:stop], coef[start:stop],
            dh_c if dh_c is not None else unused, dw if dw is not None else unused,
            db if db is not None else unused,
            rows, v, d,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            float(opts.logit_scale), float(opts.softcap or 1.0),
            reset_to_zero=("dh_ptr", "dw_ptr", "db_ptr"),
            COMPUTE_DH=need[0], COMPUTE_DW=need[1], COMPUTE_DB=need[2],
            **kernel_flags(hidden, bias, opts),
        )  # fmt: skip
        if dh is not None:
            dh.index_copy_(0, row_idx[start:stop], dh_c.to(dh.dtype))
    return dh, dw, db
