"""Small @triton.jit helpers shared by the kernel files, and launch-time facts."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..runtime import interpreted

# Tests set this so that outputs a kernel should fully write start as NaN: an element the kernel
# forgets to write then fails the comparison instead of passing with stale memory.
POISON_OUTPUTS = False


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def launch_device(device: torch.device):
    """The context every launcher runs its kernel in: the tensors' CUDA device. Triton launches
    on torch's current device and stream, not on the tensors' (with lm_head on cuda:1 and the
    current device cuda:0 a kernel would read another GPU's addresses); elsewhere, nothing.
    Launchers call it as common.launch_device, so one hook covers them all (the tests spy on it)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@triton.jit
def tanh(x):
    # libdevice's tanh does not run in the interpreter; tanh(x) = 2 * sigmoid(2x) - 1
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def transform_logits(x, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """z = logit_scale * x; z = softcap * tanh(z / softcap). Returns (z, tanh value or 0)."""
    if HAS_SCALE:
        x = x * logit_scale
    th = tl.zeros_like(x)
    if HAS_SOFTCAP:
        th = tanh(x / softcap)
        x = softcap * th
    return x, th


@triton.jit
def reference_update(mq, sq, kq, zq, z):
    """One vocab tile of asft's reference partials (partials.py), reduced over the tile's last
    axis (a row of the row kernels, each token of a fused tile); zq, z: the reference's and the
    policy's transformed logits, -inf past V (one exp per element):
        mq' = max(mq, max_j zq_j);  alpha = exp(mq - mq');  e_j = exp(zq_j - mq')
        sq <- alpha sq + sum e;  kq <- alpha kq + sum e (zq - z)
    relative to 0 while mq' = -inf (no exp(-inf - -inf) = nan); e (zq - z) is 0 where e is 0.
    A finite zq against z = -inf (a vocabulary entry the policy masks) gives kq = +inf: KL is."""
    mq_new = tl.maximum(mq, tl.max(zq, -1))
    mq_ref = tl.where(mq_new == float("-inf"), 0.0, mq_new)
    alpha = tl.exp(mq - mq_ref)
    e = tl.exp(zq - tl.expand_dims(mq_ref, -1))
    sq = sq * alpha + tl.sum(e, -1)
    # zq - z only where e > 0 (past V both are -inf: no -inf - -inf = nan, even unused)
    kq = kq * alpha + tl.sum(e * (tl.where(e > 0, zq, 0.0) - tl.where(e > 0, z, 0.0)), -1)
    return mq_new, sq, kq


def upcast_for_interpreter(*tensors: torch.Tensor) -> bool:
    """bf16 arithmetic is wrong in Triton's interpreter: there, kernels upcast tiles right after
    loading. On a GPU the flag is off and bf16 tiles go to tl.dot natively."""
    t = tensors[0]
    return interpreted(t.device) and t.dtype == torch.bfloat16


@triton.jit
def grouped_program(pid, num_n, num_v, GROUP_N: tl.constexpr):
    """Map a 1-D program id to (token block, vocab index) so that the programs in flight at once
    cover GROUP_N token blocks x many vocab indices: each token block's hidden rows and each
    vocab tile's weight rows are read by several programs while they are in L2 (the grouped
    ordering of Triton's matmul tutorial, with the vocab index fastest inside a group)."""
    per_group = GROUP_N * num_v
    group = pid // per_group
    first_n = group * GROUP_N
    group_n = tl.minimum(num_n - first_n, GROUP_N)
    local = pid % per_group
    return first_n + local % group_n, local // group_n


@triton.jit
def operand_block(ptr, idx, mask, ds, d_mask, stride_i, stride_d):
    """A (len(idx), BLOCK_D) block of a row-major operand: rows idx (int64), columns ds of D,
    0 where a row or a column is masked."""
    return tl.load(
        ptr + idx[:, None] * stride_i + ds[None, :] * stride_d,
        mask=mask[:, None] & d_mask[None, :],
        other=0.0,
    )


@triton.jit
def dot_nt(h, w, acc, UPCAST: tl.constexpr, FP32_IEEE: tl.constexpr):
    """acc + h w^T: in fp32 (UPCAST: the interpreter's 16-bit inputs), IEEE or the default
    (tf32 / 16-bit tensor cores) precision."""
    if UPCAST:
        h = h.to(tl.float32)
        w = w.to(tl.float32)
    if FP32_IEEE:
        acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
    else:
        acc = tl.dot(h, tl.trans(w), acc)
    return acc


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
    """x = h[src_rows] W[cols]^T (+ b[cols]) as a (BLOCK_N, BLOCK_V) fp32 tile, over D in
    BLOCK_D steps (src_rows and cols int64: offsets pass 2^31 at 256k x 8k)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d_start in range(0, D, BLOCK_D):
        ds = d_start + offs_d
        d_mask = ds < D
        h = operand_block(h_ptr, src_rows, row_mask, ds, d_mask, stride_hn, stride_hd)
        w = operand_block(w_ptr, cols, col_mask, ds, d_mask, stride_wv, stride_wd)
        acc = dot_nt(h, w, acc, UPCAST, FP32_IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def logits_tile_halves(
    h_ptr,
    w_ptr,
    b_ptr,
    src_rows,
    cols,
    row_mask,
    col_mask,
    col_mask_hi,
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
    """The two (BLOCK_N, BLOCK_V) fp32 halves of a BLOCK_N x 2*BLOCK_V logits tile:
        x_lo = h[src_rows] W[cols]^T,  x_hi = h[src_rows] W[cols + BLOCK_V]^T  (+ b)
    over D in BLOCK_D steps, the h block loaded once per step for both dots (FLOP per byte of a
    BLOCK_N x 2*BLOCK_V tile). Two accumulators instead of one 2*BLOCK_V wide: the caller's
    epilogue then works on one half at a time, so its temporaries are half-tile sized."""
    acc_lo = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    cols_hi = cols + BLOCK_V
    offs_d = tl.arange(0, BLOCK_D)
    for d_start in range(0, D, BLOCK_D):
        ds = d_start + offs_d
        d_mask = ds < D
        h = operand_block(h_ptr, src_rows, row_mask, ds, d_mask, stride_hn, stride_hd)
        if UPCAST:
            h = h.to(tl.float32)  # once for both dots (dot_nt's upcast is then a no-op)
        w_lo = operand_block(w_ptr, cols, col_mask, ds, d_mask, stride_wv, stride_wd)
        w_hi = operand_block(w_ptr, cols_hi, col_mask_hi, ds, d_mask, stride_wv, stride_wd)
        acc_lo = dot_nt(h, w_lo, acc_lo, UPCAST, FP32_IEEE)
        acc_hi = dot_nt(h, w_hi, acc_hi, UPCAST, FP32_IEEE)
    if HAS_BIAS:
        acc_lo += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        acc_hi += tl.load(b_ptr + cols_hi, mask=col_mask_hi, other=0.0).to(tl.float32)[None, :]
    return acc_lo, acc_hi


@triton.jit
def logits_tiles(
    h_ptr,
    w_ptr,
    b_ptr,
    src_rows,
    cols,
    row_mask,
    col_mask,
    col_mask_hi,
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
    V_HALVES: tl.constexpr,
):
    """The logits of a program step, (x_lo, x_hi): V_HALVES = 1 one (BLOCK_N, BLOCK_V) tile
    (logits_tile; x_hi is x_lo, unused), V_HALVES = 2 the two halves of a BLOCK_N x 2*BLOCK_V
    tile (logits_tile_halves; col_mask_hi masks the upper half's columns)."""
    if V_HALVES == 1:
        x_lo = logits_tile(
            h_ptr, w_ptr, b_ptr, src_rows, cols, row_mask, col_mask, D,
            stride_hn, stride_hd, stride_wv, stride_wd,
            HAS_BIAS, UPCAST, FP32_IEEE, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        x_hi = x_lo
    else:
        x_lo, x_hi = logits_tile_halves(
            h_ptr, w_ptr, b_ptr, src_rows, cols, row_mask, col_mask, col_mask_hi, D,
            stride_hn, stride_hd, stride_wv, stride_wd,
            HAS_BIAS, UPCAST, FP32_IEEE, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
    return x_lo, x_hi


def tf32_allowed() -> bool:
    """Whether torch lets CUDA fp32 matmuls use TF32; never raises.

    torch >= 2.9 has `torch.backends.cuda.matmul.fp32_precision` ("tf32", "ieee", or "none" to
    inherit from `torch.backends.fp32_precision`); once it was set, reading the legacy
    `allow_tf32` raises a RuntimeError about mixing the legacy and new APIs. So the new settings
    are read first and the legacy flag last; if even that raises, IEEE (the stricter choice).
    """
    for settings in (torch.backends.cuda.matmul, torch.backends):
        try:
            precision = getattr(settings, "fp32_precision", None)
        except RuntimeError:
            precision = None
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        return False
