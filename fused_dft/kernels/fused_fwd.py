"""Fused forward: logit tiles from tl.dot, online log-sum-exp, target logit; no logits in memory.

Grid (token blocks, vocab splits). A program owns BLOCK_N tokens and a contiguous range of vocab
tiles; for each tile it computes x = h W_tile^T (+ b) over D in BLOCK_D steps, z = transform(x), and
updates per token
    m = running max,  s = sum exp(z - m),  t = sum exp(z - m) (z - m),  z_y (when y is in the tile);
on a new max m': s <- s exp(m - m'), t <- exp(m - m') (t + (m - m') s).
Partials (m, s, t, z_y) per split are merged on the host side the same way, in O(N * splits):
    lse = m* + log s*;  entropy = lse - E[z] = log s* - t* / s*.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..options import LossOptions
from . import configs
from .common import new_output, tf32_allowed, transform_logits, upcast_for_interpreter
from .configs import DEFAULT_CONFIG, FusedConfig  # noqa: F401  (their old home)


@triton.jit
def logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    src_rows,
    cols,
    row_mask,
    col_mask,
    D,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """x = h[src_rows] W[cols]^T (+ b[cols]) as a (BLOCK_N, BLOCK_V) fp32 tile."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d_start in range(0, D, BLOCK_D):
        ds = d_start + offs_d
        d_mask = ds < D
        h = tl.load(
            h_ptr + src_rows[:, None] * stride_hn + ds[None, :] * stride_hd,
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + cols[:, None] * stride_wv + ds[None, :] * stride_wd,
            mask=col_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if FP32_IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _dft_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    idx_ptr,
    labels_ptr,
    part_ptr,
    N,
    V,
    D,
    split_cols,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    logit_scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    src_rows = tl.load(idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    y = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int64)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    z_y = tl.zeros([BLOCK_N], tl.float32)
    v_begin = split * split_cols
    v_end = tl.minimum(v_begin + split_cols, V)
    offs_v = tl.arange(0, BLOCK_V)
    for v_start in range(v_begin, v_end, BLOCK_V):
        # int64: cols * stride_wv passes 2^31 once V * D does (e.g. 256k x 8k)
        cols = offs_v.to(tl.int64) + v_start
        col_mask = cols < V
        # 1. logits tile, kept in registers
        x = logits_tile(
            h_ptr, w_ptr, b_ptr, src_rows, cols, row_mask, col_mask, D,
            stride_hn, stride_hd, stride_wv, stride_wd,
            HAS_BIAS, UPCAST, FP32_IEEE, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        z, _ = transform_logits(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        # 2. online log-sum-exp; every tile has >= 1 valid column, so m_new is finite (or nan)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        # t relative to the running max: sum e * (z - m), no cancellation at |z| >> 1
        t = alpha * (t + tl.where(m > float("-inf"), m - m_new, 0.0) * s)
        t += tl.sum(e * tl.where(col_mask[None, :], z - m_new[:, None], 0.0), 1)
        s = s * alpha + tl.sum(e, 1)
        # 3. target logit: only the tile holding y contributes
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        m = m_new

    base = part_ptr + split * N + rows
    plane = num_splits * N
    tl.store(base, m, mask=row_mask)
    tl.store(base + plane, s, mask=row_mask)
    tl.store(base + 2 * plane, t, mask=row_mask)
    tl.store(base + 3 * plane, z_y, mask=row_mask)


def dft_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_idx: torch.Tensor,
    labels: torch.Tensor,
    opts: LossOptions,
    config: FusedConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, D) any strides; row_idx (n,) int64 rows of hidden to use (the non-ignored
    tokens; read in place, no gathered copy); labels (n,) in [0, V). config: a fixed config
    instead of configs.plan's choice.

    Returns fp32 (n,) lse, z_y, row max, entropy."""
    n, d = row_idx.shape[0], hidden.shape[1]
    v = weight.shape[0]
    plan = configs.plan(hidden.dtype, hidden.device, d, v, config)
    # each split owns split_cols vocabulary columns, a multiple of every candidate's BLOCK_V, so
    # the host sizes the grid and the partials before (auto)tuning picks BLOCK_V; none is empty
    unit = plan.max_block_v
    split_cols = triton.cdiv(triton.cdiv(v, plan.vocab_splits), unit) * unit
    splits = triton.cdiv(v, split_cols)
    part = new_output((4, splits, n), torch.float32, hidden.device)
    plan.launch(
        _dft_fwd_kernel,
        lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits),
        hidden, weight, bias if bias is not None else weight, row_idx, labels, part,
        n, v, d, split_cols,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        float(opts.logit_scale), float(opts.softcap or 1.0),
        **kernel_flags(hidden, bias, opts),
    )  # fmt: skip
    m_k, s_k, t_k, z_y_k = part.unbind(0)
    # merge the vocab splits
    m = m_k.amax(0)
    w_k = torch.exp(m_k - m)
    s = (s_k * w_k).sum(0)
    t = (w_k * (t_k + (m_k - m) * s_k)).sum(0)
    log_s = s.log()
    lse = m + log_s
    entropy = log_s - t / s
    return lse, z_y_k.sum(0), m, entropy


def kernel_flags(hidden, bias, opts: LossOptions) -> dict:
    """Compile-time flags shared by the fused forward and backward kernels (tile sizes and launch
    options come from configs.plan)."""
    return dict(
        HAS_BIAS=bias is not None,
        HAS_SCALE=opts.logit_scale != 1.0,
        HAS_SOFTCAP=opts.softcap is not None,
        UPCAST=upcast_for_interpreter(hidden),
        FP32_IEEE=fp32_ieee(hidden),
    )


def fp32_ieee(t: torch.Tensor) -> bool:
    """fp32 tl.dot in full precision unless torch itself allows TF32 for matmuls (interpreter: exact
    either way)."""
    return t.dtype == torch.float32 and not tf32_allowed()
