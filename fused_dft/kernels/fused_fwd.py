"""Fused forward: logit tiles from tl.dot reduced to per-token partials; no logits in memory.

Work: 2*N*D*V FLOPs (the logits matmul) and, per token, 5 fp32 partials per vocab split.

Grid: one program per (token block, vocab split), ordered by kernels.common.grouped_program so
that the programs in flight at once cover GROUP_N token blocks x the splits: the hidden block
(BLOCK_N x D) of a token block stays in L2 while its splits stream their weight tiles, and each
weight tile is read from HBM about once per group instead of once per token block. A program owns
BLOCK_N tokens and a contiguous range of vocab tiles; for each tile it
  1. computes x = h W_tile^T (+ b) over D in BLOCK_D steps (tensor cores: wgmma on sm_90) and
     z = transform(x);
  2. updates per token (online log-sum-exp, one exp per element):
         m' = max(m, max_j z_j);  alpha = exp(m - m');  e_j = exp(z_j - m')
         s <- alpha s + sum e;  t <- alpha (t + (m - m') s) + sum e (z - m');
     with the exponents taken relative to 0 while m' = -inf (a tile of -inf logits: a masked
     vocabulary), so no exp(-inf - -inf) = NaN, and e (z - m') = 0 where e = 0;
  3. adds the label logit z_y (in the tile that holds y) and sum z (label smoothing).
With V_HALVES = 2 (FusedConfig.v_halves) a program step covers 2*BLOCK_V vocab columns as two
BLOCK_V-wide halves: step 1 loads the h block once per BLOCK_D step for both halves' dots
(common.logits_tiles; the FLOP per byte of the wide tile), steps 2-3 run on one half after
the other (the epilogue's temporaries stay BLOCK_N x BLOCK_V: no spills at 128 x (2x128) on sm_90).
The number of splits is chosen from the SM count and the number of token blocks so that about one
wave of programs is one group (small batches still fill the GPU). Partials (5, splits, n) are
merged in O(n * splits) by partials.merge: lse = m + log s, entropy = log s - t / s.

asft (HAS_REF): a reference model's hidden rows (N, D_ref) and head (V, D_ref) (+ bias) give, per
tile, a second logits tile zq = transform(h_ref W_ref_tile^T (+ b_ref)) over D_ref (a second tl.dot
accumulator, never stored), and the reference partials of partials.py over the same columns
(common.reference_update; q = softmax(zq), p = softmax(z)):
    mq = max zq,  sq = sum exp(zq - mq),  kq = sum exp(zq - mq) (zq - z)
stored as (3, splits, n) and merged by partials.merge_reference; then
    KL(q || p) = sum_v q_v (zq_v - z_v) - lse_q + lse = kq / sq - (mq + log sq) + lse.
Work: 2*N*(D + D_ref)*V FLOPs. Two fp32 tiles live at once, so HAS_REF has its own tiles
(configs.plan(reference=True)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..options import LossOptions
from ..partials import NUM_PARTIALS, NUM_REF_PARTIALS, merge, merge_reference
from . import common, configs
from .common import (
    grouped_program,
    logits_tile,
    logits_tiles,
    new_output,
    reference_update,
    tf32_allowed,
    transform_logits,
    upcast_for_interpreter,
)
from .configs import FusedConfig


@triton.jit
def _fused_partials_kernel(
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
    split_cols,
    num_splits,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    logit_scale,
    softcap,
    n_bucket,  # the autotune key's N (configs.n_bucket); not read by the kernel
    rh_ptr,  # asft's reference (HAS_REF): hidden (N, D_ref), head (V, D_ref), bias, partials out
    rw_ptr,
    rb_ptr,
    ref_part_ptr,
    D_ref,
    stride_rhn,
    stride_rhd,
    stride_rwv,
    stride_rwd,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    NEED_ENTROPY: tl.constexpr,
    NEED_SUM: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_REF_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
    V_HALVES: tl.constexpr,
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
    if HAS_REF:
        mq = tl.full([BLOCK_N], float("-inf"), tl.float32)
        sq = tl.zeros([BLOCK_N], tl.float32)
        kq = tl.zeros([BLOCK_N], tl.float32)
    v_begin = split.to(tl.int64) * split_cols  # int64: every program id x runtime int product
    v_end = tl.minimum(v_begin + split_cols, V)
    v_end = tl.where(pid_n * BLOCK_N < count, v_end, v_begin)
    offs_v = tl.arange(0, BLOCK_V)
    for v_start in range(v_begin, v_end, BLOCK_V * V_HALVES):
        # int64: cols * stride_wv passes 2^31 once V * D does (e.g. 256k x 8k)
        cols = offs_v.to(tl.int64) + v_start
        col_mask = cols < V
        # 1. logits tile, kept in registers (steps numbered as in the module docstring); with
        #    V_HALVES = 2 a BLOCK_N x 2*BLOCK_V tile as two halves, reduced one after the other
        x, x_hi = logits_tiles(
            h_ptr, w_ptr, b_ptr, src_rows, cols, row_mask, col_mask, cols + BLOCK_V < V, D,
            stride_hn, stride_hd, stride_wv, stride_wd,
            HAS_BIAS, UPCAST, FP32_IEEE, BLOCK_N, BLOCK_V, BLOCK_D, V_HALVES,
        )  # fmt: skip
        for half in tl.static_range(V_HALVES):
            v_tile = v_start + half * BLOCK_V
            if half == 1:
                x = x_hi
                cols = cols + BLOCK_V
                col_mask = cols < V
            z, _ = transform_logits(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
            # 3. label logit (only the tile holding y contributes; int32 tile-local compare) and the
            #    sum of z for label smoothing, before padding columns are masked
            y_local = (y - v_tile).to(tl.int32)
            z_y += tl.sum(tl.where(offs_v[None, :] == y_local[:, None], z, 0.0), 1)
            if NEED_SUM:
                sum_z += tl.sum(tl.where(col_mask[None, :], z, 0.0), 1)
            # 2. online log-sum-exp. Columns past V are -inf, like masked vocabulary entries (a
            #    bias of -inf): every tile so far may be all -inf (m' = -inf), so the exponents are
            #    taken relative to m_ref = m', or 0 while m' = -inf (never exp(-inf - -inf) = nan);
            #    then alpha = 0, e = 0 and s = t = 0 until a finite logit arrives. e (z - m_ref) is
            #    0 where e is 0 (not 0 * -inf = nan). nan / +inf from the data still propagate (s).
            z = tl.where(col_mask[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_ref)
            e = tl.exp(z - m_ref[:, None])
            if NEED_ENTROPY:
                # relative to the running max: no cancellation at |z| >> 1 (s > 0: m, m' finite)
                t = alpha * (t + tl.where(s > 0, m - m_new, 0.0) * s)
                t += tl.sum(tl.where(e > 0, e * (z - m_ref[:, None]), 0.0), 1)
            s = s * alpha + tl.sum(e, 1)
            m = m_new
            if HAS_REF:
                # 5. the reference's logits tile over D_ref (z is still live: two fp32 tiles) and
                #    its partials against z (both -inf past V); per half with V_HALVES = 2
                xq = logits_tile(
                    rh_ptr, rw_ptr, rb_ptr, src_rows, cols, row_mask, col_mask, D_ref,
                    stride_rhn, stride_rhd, stride_rwv, stride_rwd,
                    HAS_REF_BIAS, UPCAST, FP32_IEEE, BLOCK_N, BLOCK_V, BLOCK_D,
                )  # fmt: skip
                zq, _ = transform_logits(xq, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
                zq = tl.where(col_mask[None, :], zq, float("-inf"))
                mq, sq, kq = reference_update(mq, sq, kq, zq, z)

    # 4. partials (5, splits, N); rows past the count get m = -inf, s = 0 (merged, then masked).
    #    int64: the last plane's offset 4 * splits * N passes 2^31 from splits * N >= 2^29
    #    (N >= 524,288 tokens with vocab_splits=1024)
    base = part_ptr + split.to(tl.int64) * N + rows
    plane = num_splits.to(tl.int64) * N
    out_mask = rows < N
    tl.store(base, m, mask=out_mask)
    tl.store(base + plane, s, mask=out_mask)
    tl.store(base + 2 * plane, t, mask=out_mask)
    tl.store(base + 3 * plane, z_y, mask=out_mask)
    tl.store(base + 4 * plane, sum_z, mask=out_mask)
    if HAS_REF:  # (3, splits, N): mq, sq, kq
        ref_base = ref_part_ptr + split.to(tl.int64) * N + rows
        tl.store(ref_base, mq, mask=out_mask)
        tl.store(ref_base + plane, sq, mask=out_mask)
        tl.store(ref_base + 2 * plane, kq, mask=out_mask)


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 1 elsewhere."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def vocab_split_cols(n: int, v: int, device: torch.device, plan: configs.LaunchPlan) -> int:
    """Vocabulary columns per split: a multiple of every candidate's BLOCK_V (so the grid and the
    partials are sized before autotuning picks a tile), from plan.vocab_splits, or else enough
    splits that one wave of programs is about one group of min(token blocks, group_n) blocks."""
    splits = plan.vocab_splits
    if splits is None:
        blocks_in_group = max(1, min(triton.cdiv(n, plan.max_block_n), plan.group_n))
        splits = max(2, triton.cdiv(sm_count(device), blocks_in_group))
    unit = plan.max_block_v
    return triton.cdiv(triton.cdiv(v, splits), unit) * unit  # no split is empty


def fused_partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_idx: torch.Tensor,
    labels: torch.Tensor,
    count: torch.Tensor,
    opts: LossOptions,
    config: FusedConfig | None = None,
    ref: tuple | None = None,
):
    """hidden (N, D) any strides; row_idx (n,) int64 rows of hidden to use (read in place, no
    gathered copy); labels (n,) (outside [0, V): no label logit); count: a device scalar, the
    first `count` of the n rows are tokens (the others are skipped). config: a fixed config
    instead of configs.plan's choice.

    Returns fp32 partials (5, n) over the whole of weight's vocabulary (partials.py); rows past
    count hold m = -inf, s = 0. ref (asft) = (ref_hidden (N, D_ref), ref_weight (V, D_ref),
    ref_bias (V,) or None), hidden's dtype, rows read through row_idx too: then returns the pair
    (partials (5, n), reference partials (3, n) = mq, sq, kq; partials.finalize_reference)."""
    n, d = row_idx.shape[0], hidden.shape[1]
    v = weight.shape[0]
    has_ref = ref is not None
    plan = configs.plan(hidden.dtype, hidden.device, d, v, config, reference=has_ref)
    split_cols = vocab_split_cols(n, v, hidden.device, plan)
    splits = triton.cdiv(v, split_cols)
    part = new_output((NUM_PARTIALS, splits, n), torch.float32, hidden.device)
    ref_part = None
    if has_ref:
        ref_hidden, ref_weight, ref_bias = ref
        assert ref_hidden.shape[0] == hidden.shape[0]
        assert ref_weight.shape == (v, ref_hidden.shape[1])
        ref_part = new_output((NUM_REF_PARTIALS, splits, n), torch.float32, hidden.device)
    else:
        ref_hidden, ref_weight, ref_bias = hidden, weight, None  # not read (HAS_REF off)
    if n == 0:
        return (part[:, 0], ref_part[:, 0]) if has_ref else part[:, 0]
    with common.launch_device(hidden.device):
        plan.launch(
            _fused_partials_kernel,
            lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,),
            hidden, weight, bias if bias is not None else weight, row_idx, labels, count, part,
            n, v, d, split_cols, splits,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            float(opts.logit_scale), float(opts.softcap or 1.0),
            configs.n_bucket(hidden.shape[0]),
            ref_hidden, ref_weight, ref_bias if ref_bias is not None else ref_weight,
            ref_part if has_ref else part, ref_hidden.shape[1],
            ref_hidden.stride(0), ref_hidden.stride(1), ref_weight.stride(0), ref_weight.stride(1),
            key=configs.FWD_KEY,
            NEED_ENTROPY=opts.needs_entropy,
            NEED_SUM=opts.needs_logit_sum,
            **kernel_flags(hidden, bias, opts),
            **reference_flags(ref),
        )  # fmt: skip
    if has_ref:
        return merge(part, dim=1), merge_reference(ref_part, dim=1)
    return merge(part, dim=1)


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


def reference_flags(ref: tuple | None) -> dict:
    """Compile-time flags of asft's reference term, shared by the forward and the dz kernel."""
    return dict(HAS_REF=ref is not None, HAS_REF_BIAS=ref is not None and ref[2] is not None)


def fp32_ieee(t: torch.Tensor) -> bool:
    """fp32 tl.dot in full precision unless torch itself allows TF32 for matmuls (interpreter: exact
    either way)."""
    return t.dtype == torch.float32 and not tf32_allowed()
