"""The chunked path: one chunk of tokens at a time, logits from a torch matmul.

For each chunk of non-ignored tokens:
    x = h_c W^T (+ b)                      (n, V) logits: the only large temporary
    rows: loss, stats, and dx = d(coef * loss)/dx written into x in place
    dh_c = dx W;  dW += dx^T h_c (fp32);  db += sum_rows(dx) (fp32)
With reduction "mean"/"sum" the gradients are computed in the forward pass (6*N*D*V matmul FLOPs in
all) and backward only scales them by the upstream scalar. With reduction "none" the upstream
gradient differs per token, which a precomputed dW cannot honour, so the forward computes only the
loss and backward recomputes each chunk's logits with the per-token coefficients (8*N*D*V FLOPs).
Ignored tokens are dropped before any matmul.
"""

from __future__ import annotations

import os

import torch

from .options import LossOptions
from .reduction import mean_scale, reduce_token_loss, select_valid
from .rows_torch import rows_loss_and_grad

# Elements of one chunk's logits buffer: 32M (128 MB in fp32) on the CPU; on CUDA at most 256M,
# and at most a share of the free memory
_CHUNK_ELEMENTS = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}
_MIN_CHUNK_ROWS = 16
# CUDA: rows a multiple of the GEMM tile; logits counted at 4 bytes an element (fp32 logits, or
# 16-bit ones and a temporary) may take 1/_CUDA_FREE_SHARE of the free memory
_CUDA_ROW_MULTIPLE = 128
_CUDA_FREE_SHARE = 4


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def default_chunk_rows(vocab: int, device: torch.device) -> int:
    """Tokens per chunk: FUSED_DFT_CHUNK_SIZE if set, else a logits buffer of about
    _CHUNK_ELEMENTS elements for this device type; on CUDA a multiple of 128 rows, also bounded by
    the free memory (torch.cuda.mem_get_info)."""
    env = os.environ.get("FUSED_DFT_CHUNK_SIZE")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"FUSED_DFT_CHUNK_SIZE must be a positive integer, got {env!r}")
        return int(env)
    vocab = max(vocab, 1)
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = min(_CHUNK_ELEMENTS["cuda"], free_bytes // (4 * _CUDA_FREE_SHARE))
        rows = budget // vocab // _CUDA_ROW_MULTIPLE * _CUDA_ROW_MULTIPLE
        return max(_CUDA_ROW_MULTIPLE, rows)
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cpu"])
    return max(_MIN_CHUNK_ROWS, budget // vocab)


# whether torch.addmm(fp32 acc, bf16/fp16 a, b, out_dtype=fp32, out=acc) works here (CUDA only);
# turned off for the process the first time it raises
_mixed_addmm = {"ok": "dtype_out" in torch.ops.aten.addmm.overloads()}


def _accumulate_outer(acc: torch.Tensor, dx: torch.Tensor, h: torch.Tensor) -> None:
    """acc (fp32) += dx^T h with fp32 accumulation, avoiding a (V, D) temporary where possible."""
    if dx.dtype == acc.dtype:
        acc.addmm_(dx.t(), h)
        return
    if acc.is_cuda:
        if _mixed_addmm["ok"]:
            try:
                torch.addmm(acc, dx.t(), h, out_dtype=acc.dtype, out=acc)
                return
            except (RuntimeError, TypeError):
                _mixed_addmm["ok"] = False
        acc.add_(dx.t() @ h)  # (V, D) temporary in the input dtype
        return
    acc.addmm_(dx.t().to(acc.dtype), h.to(acc.dtype))  # CPU: (n, V) fp32 temporary


def run_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_idx: torch.Tensor,
    labels: torch.Tensor,
    opts: LossOptions,
    chunk_rows: int,
    use_triton: bool,
    coef: torch.Tensor | None,
    need: tuple[bool, bool, bool],
):
    """hidden (N, D); row_idx (n,) the rows of hidden that are non-ignored tokens, labels (n,)
    theirs. Only one chunk of rows is gathered at a time.

    coef (n,) per-token upstream coefficient, or None for the loss alone. need = (dh, dW, db).
    Returns token_loss (n,), stats (n, 3), dh (N, D; zero at other rows), dW and db (fp32).
    """
    n, d = row_idx.shape[0], hidden.shape[1]
    v = weight.shape[0]
    acc_dtype = _acc_dtype(hidden)
    dev = hidden.device
    token_loss = torch.empty(n, dtype=acc_dtype, device=dev)
    stats = torch.empty(n, 3, dtype=acc_dtype, device=dev)
    grads = coef is not None
    dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev) if grads and need[0] else None
    dw = torch.zeros(v, d, dtype=acc_dtype, device=dev) if grads and need[1] else None
    db = torch.zeros(v, dtype=acc_dtype, device=dev) if grads and need[2] else None
    if use_triton:
        from .kernels.rows import dft_rows

    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        idx_c, y_c = row_idx[start:stop], labels[start:stop]
        h_c = hidden.index_select(0, idx_c)
        c_c = coef[start:stop] if grads else None
        x = torch.addmm(bias, h_c, weight.t()) if bias is not None else h_c @ weight.t()
        if use_triton:
            loss_c, stats_c = dft_rows(x, y_c, c_c, opts)
        else:
            x = x.to(acc_dtype)  # no copy for fp32/fp64 inputs
            loss_c, stats_c = rows_loss_and_grad(x, y_c, c_c, opts)
        token_loss[start:stop] = loss_c
        stats[start:stop] = stats_c
        if not grads:
            continue
        dx = x.to(hidden.dtype)
        if dh is not None:
            dh.index_copy_(0, idx_c, dx @ weight)
        if dw is not None:
            _accumulate_outer(dw, dx, h_c)
        if db is not None:
            db += dx.sum(0, dtype=acc_dtype)
        del x, dx
    return token_loss, stats, dh, dw, db


class ChunkedDFTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, opts: LossOptions, chunk_rows, use_triton):
        valid_idx, y_v = select_valid(labels, opts)
        num_valid = valid_idx.numel()
        need = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        grads_now = any(need) and opts.reduction != "none"
        coef = None
        if grads_now:
            coef = torch.full(
                (num_valid,),
                mean_scale(opts, num_valid),
                dtype=_acc_dtype(hidden),
                device=hidden.device,
            )
        token_loss, stats, dh, dw, db = run_chunks(
            hidden, weight, bias, valid_idx, y_v, opts, chunk_rows, use_triton, coef, need
        )

        loss = reduce_token_loss(token_loss, valid_idx, hidden.shape[0], opts)
        stat_sums = stats.sum(0).float()
        num_valid_t = torch.tensor(num_valid, device=hidden.device)

        ctx.opts, ctx.chunk_rows, ctx.use_triton, ctx.need = opts, chunk_rows, use_triton, need
        ctx.weight_dtype = weight.dtype
        if grads_now:
            ctx.precomputed = (dh, dw, db)
        elif any(need):
            ctx.precomputed = None
            ctx.save_for_backward(valid_idx, hidden, weight, bias, y_v)
        ctx.mark_non_differentiable(stat_sums, num_valid_t)
        return loss, stat_sums, num_valid_t

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_num):
        opts, need = ctx.opts, ctx.need
        weight_dtype = ctx.weight_dtype
        if opts.reduction == "none":
            valid_idx, hidden, weight, bias, y_v = ctx.saved_tensors
            coef = grad_loss.index_select(0, valid_idx).to(_acc_dtype(hidden))
            _, _, dh, dw, db = run_chunks(
                hidden,
                weight,
                bias,
                valid_idx,
                y_v,
                opts,
                ctx.chunk_rows,
                ctx.use_triton,
                coef,
                need,
            )
        else:
            if ctx.precomputed is None:
                raise RuntimeError(
                    "fused_dft: backward through the same graph twice is not supported with "
                    "reduction='mean'/'sum' (gradients are computed in the forward pass and "
                    "consumed); use reduction='none' or recompute the loss"
                )
            dh, dw, db = ctx.precomputed
            ctx.precomputed = None
            # gradients were computed for an upstream gradient of 1; scale in place otherwise
            if not bool(grad_loss == 1):
                for g in (dh, dw, db):
                    if g is not None:
                        g.mul_(grad_loss.to(g.dtype))
        dw = dw.to(weight_dtype) if dw is not None else None
        db = db.to(weight_dtype) if db is not None else None
        return dh, dw, db, None, None, None, None


def chunked_loss(hidden, weight, labels, bias, opts, chunk_size, use_triton):
    """hidden (N, D), labels (N,). Returns (loss, stat sums (3,), number of valid tokens)."""
    rows = chunk_size or default_chunk_rows(weight.shape[0], hidden.device)
    rows = max(1, min(rows, hidden.shape[0]))  # a chunk never exceeds the tokens there are
    return ChunkedDFTFunction.apply(hidden, weight, bias, labels, opts, rows, use_triton)
