"""Fused forward: logit tiles from tl.dot reduced to per-token partials; no logits in memory.

Work: 2*N*D*V FLOPs (the logits matmul) and, per token, 5 fp32 partials per vocab split.

Grid: one program per (token block, vocab split), ordered by kernels.common.grouped_program so
that the programs in flight at once cover GROUP_N token blocks x the splits: the hidden block
(BLOCK_N x D) of a token block stays in L2 while its splits stream their weight tiles, and each
weight tile is read from HBM about once per group instead of once per token block. A program owns
BLOCK_N tokens and a contiguous range of vocab tiles; for each tile it computes
x = h W_tile^T (+ b) over D in BLOCK_D steps (tensor cores: wgmma on sm_90), z = transform(x),
and updates per token (online log-sum-exp, one exp per element):
    m' = max(m, max_j z_j);  alpha = exp(m - m');  e_j = exp(z_j - m')
    s <- alpha s + sum e;  t <- alpha (t + (m - m') s) + sum e (z - m');  z_y, sum z.
The number of splits is chosen from the SM count and the number of token blocks so that about one
wave of programs is one group (small batches still fill the GPU). Partials (5, splits, n) are
merged in O(n * splits) by partials.merge: lse = m + log s, entropy = log s - t / s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..options import LossOptions
from ..partials import NUM_PARTIALS, merge
from .common import (
    grouped_program,
    logits_tile,
    new_output,
    transform_logits,
    upcast_for_interpreter,
)


@dataclass(frozen=True)
class FusedConfig:
    """Tiles and launch options of the fused kernels (tile sizes powers of two, >= 16)."""

    block_n: int = 128
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    # token blocks per group of the grouped program order (L2 reuse)
    group_n: int = 8
    # forward: vocab splits per token block; None = chosen from the SM count and the tokens
    vocab_splits: int | None = None


# Defaults per operand precision, compiled for sm_90 with triton 3.9 (no spills, cp.async
# pipelining; bf16/fp16 and TF32 on wgmma): forward 253 / 253 / 210 registers, dz 142 / 146 / 128,
# shared memory 96 KB / 96 KB / 48 KB (bf16 / fp32 TF32 / fp32 IEEE without tensor cores).
DEFAULT_CONFIG = FusedConfig()
FP32_TF32_CONFIG = FusedConfig(block_d=32)
FP32_IEEE_CONFIG = FusedConfig(block_n=64, block_d=32)


def pick_config(hidden: torch.Tensor) -> FusedConfig:
    """The default config for hidden's dtype (and, for fp32, whether tl.dot may use TF32)."""
    if hidden.dtype != torch.float32:
        return DEFAULT_CONFIG
    return FP32_IEEE_CONFIG if fp32_ieee(hidden) else FP32_TF32_CONFIG


@triton.jit
def _dft_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    idx_ptr,
    labels_ptr,
    count_ptr,
    part_ptr,
    N,
    V,
    D,
    tiles_per_split,
    num_splits,
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
    NEED_ENTROPY: tl.constexpr,
    NEED_SUM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    pid_n, split = grouped_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP_N)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past the token count (a static selection puts the tokens first) are never read, and
    # a block with no token runs no vocab tile at all
    count = tl.minimum(tl.load(count_ptr).to(tl.int64), N)
    row_mask = rows < count
    src_rows = tl.load(idx_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    y = tl.load(labels_ptr + rows, mask=row_mask, other=-1).to(tl.int64)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    z_y = tl.zeros([BLOCK_N], tl.float32)
    sum_z = tl.zeros([BLOCK_N], tl.float32)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    v_end = tl.where(pid_n * BLOCK_N < count, v_end, v_begin)
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
        if NEED_ENTROPY:
            # relative to the running max: no cancellation at |z| >> 1
            t = alpha * (t + tl.where(s > 0, m - m_new, 0.0) * s)
            t += tl.sum(e * tl.where(col_mask[None, :], z - m_new[:, None], 0.0), 1)
        s = s * alpha + tl.sum(e, 1)
        m = m_new
        # 3. label logit (only the tile holding y contributes); sum of z for label smoothing
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        if NEED_SUM:
            sum_z += tl.sum(tl.where(col_mask[None, :], z, 0.0), 1)

    # 4. partials (5, splits, N); rows past the count get m = -inf, s = 0 (merged, then masked)
    base = part_ptr + split * N + rows
    plane = num_splits * N
    out_mask = rows < N
    tl.store(base, m, mask=out_mask)
    tl.store(base + plane, s, mask=out_mask)
    tl.store(base + 2 * plane, t, mask=out_mask)
    tl.store(base + 3 * plane, z_y, mask=out_mask)
    tl.store(base + 4 * plane, sum_z, mask=out_mask)


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 1 elsewhere."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def vocab_splits(n: int, v: int, device: torch.device, config: FusedConfig) -> tuple[int, int]:
    """(splits, vocab tiles per split): config.vocab_splits if set, else enough splits that one
    wave of programs is about one group of min(token blocks, group_n) token blocks."""
    n_tiles = triton.cdiv(v, config.block_v)
    if config.vocab_splits is not None:
        splits = config.vocab_splits
    else:
        blocks_in_group = max(1, min(triton.cdiv(n, config.block_n), config.group_n))
        splits = max(2, triton.cdiv(sm_count(device), blocks_in_group))
    splits = max(1, min(splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split  # every split owns >= 1 tile


def dft_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_idx: torch.Tensor,
    labels: torch.Tensor,
    count: torch.Tensor,
    opts: LossOptions,
    config: FusedConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """hidden (N, D) any strides; row_idx (n,) int64 rows of hidden to use (read in place, no
    gathered copy); labels (n,) (outside [0, V): no label logit); count: a device scalar, the
    first `count` of the n rows are tokens (the others are skipped).

    Returns fp32 partials (5, n) over the whole of weight's vocabulary (partials.py); rows past
    count hold m = -inf, s = 0."""
    n, d = row_idx.shape[0], hidden.shape[1]
    v = weight.shape[0]
    splits, tiles_per_split = vocab_splits(n, v, hidden.device, config)
    part = new_output((NUM_PARTIALS, splits, n), torch.float32, hidden.device)
    if n == 0:
        return part[:, 0]
    grid = (triton.cdiv(n, config.block_n) * splits,)
    _dft_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else weight, row_idx, labels, count, part,
        n, v, d, tiles_per_split, splits,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        float(opts.logit_scale), float(opts.softcap or 1.0),
        NEED_ENTROPY=opts.needs_entropy,
        NEED_SUM=opts.needs_logit_sum,
        GROUP_N=config.group_n,
        **launch_flags(hidden, bias, opts, config),
    )  # fmt: skip
    return merge(part, dim=1)


def launch_flags(hidden, bias, opts: LossOptions, config: FusedConfig) -> dict:
    """Compile-time flags and launch options shared by the fused forward and backward kernels."""
    return dict(
        HAS_BIAS=bias is not None,
        HAS_SCALE=opts.logit_scale != 1.0,
        HAS_SOFTCAP=opts.softcap is not None,
        UPCAST=upcast_for_interpreter(hidden),
        FP32_IEEE=fp32_ieee(hidden),
        BLOCK_N=config.block_n,
        BLOCK_V=config.block_v,
        BLOCK_D=config.block_d,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def fp32_ieee(t: torch.Tensor) -> bool:
    """fp32 tl.dot in full precision unless torch itself allows TF32 for matmuls (interpreter: exact
    either way)."""
    return t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
