"""The chunked path: one chunk of tokens at a time, logits from a torch matmul.

For each chunk of non-ignored tokens (rows of hidden h_c):
    x = h_c W^T (+ b)                      (n, V) logits: the only large temporary
    partials of x (partials.py)            Triton row kernel on CUDA, torch ops on the CPU
    [vocab parallel: partials merged across the ranks' shards]
    lse, log p, entropy -> loss and coefficients (a, b, u) of each token (weights.py)
    dx = c * (a softmax - b onehot - u), chain rule of softcap / scale, written into x in place
    dh_c = dx W;  dW += dx^T h_c (fp32);  db += sum_rows(dx) (fp32)
With reduction "mean"/"sum" the gradients are computed in the forward pass (6*N*D*V matmul FLOPs in
all) with c = the mean scale, and backward only scales them by the upstream scalar. With reduction
"none" the upstream gradient differs per token, which a precomputed dW cannot honour, so the
forward keeps each token's lse and (a, b, u) and backward recomputes each chunk's logits and
applies c = the token's upstream gradient (8*N*D*V FLOPs).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from . import partials as P
from .options import LossOptions
from .reduction import Rows, mean_scale, reduce_token_loss, scatter_rows, select_rows
from .rows_torch import rows_grad_, rows_grad_from_logits_, rows_partials_, transform_
from .weights import token_terms

# Elements of one chunk's logits buffer: 32M (128 MB in fp32) on the CPU, 256M on CUDA.
_CHUNK_ELEMENTS = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}
_MIN_CHUNK_ROWS = 16


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def default_chunk_rows(vocab: int, device: torch.device) -> int:
    """Tokens per chunk: FUSED_DFT_CHUNK_SIZE if set, else a logits buffer of about
    _CHUNK_ELEMENTS elements for this device type."""
    env = os.environ.get("FUSED_DFT_CHUNK_SIZE")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"FUSED_DFT_CHUNK_SIZE must be a positive integer, got {env!r}")
        return int(env)
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cpu"])
    return max(_MIN_CHUNK_ROWS, budget // max(vocab, 1))


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


class Shard(NamedTuple):
    """This rank's slice of a vocab-parallel LM head (None on one device).

    offset: first vocab id of the shard; vocab: the full V; merge: partials (5, n) of the shard
    -> partials of the whole vocabulary (a collective across the ranks)."""

    offset: int
    vocab: int
    merge: object


class Saved(NamedTuple):
    """What reduction="none" keeps for backward, per selected token: lse and (a, b, u)."""

    lse: torch.Tensor
    coefs: torch.Tensor


def _logits(h_c, weight, bias):
    return torch.addmm(bias, h_c, weight.t()) if bias is not None else h_c @ weight.t()


def _apply_dx(dx, h_c, idx_c, weight, dh, dw, db):
    """dh[rows] = dx W; dW += dx^T h_c; db += sum_rows dx (the ones not None)."""
    if dh is not None:
        dh.index_copy_(0, idx_c, dx @ weight)
    if dw is not None:
        _accumulate_outer(dw, dx, h_c)
    if db is not None:
        db += dx.sum(0, dtype=db.dtype)


def _new_grads(hidden, weight, need):
    acc, dev = acc_dtype(hidden), hidden.device
    return (
        torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev) if need[0] else None,
        torch.zeros(weight.shape, dtype=acc, device=dev) if need[1] else None,
        torch.zeros(weight.shape[0], dtype=acc, device=dev) if need[2] else None,
    )


def forward_chunks(hidden, weight, bias, rows: Rows, opts: LossOptions, chunk_rows: int,
                   use_triton: bool, grad_scale, need, shard: Shard | None = None):  # fmt: skip
    """hidden (N, D); rows: the selected tokens (only one chunk of them is gathered at a time).

    grad_scale: None (loss only), or the device scalar c of "mean"/"sum" (gradients now).
    Returns token_loss (n,), logp (n,), stat sums (4,), Saved (for reduction "none" with
    gradients needed, else None), and dh (N, D; zero at other rows), dW, db (fp32) or None.
    """
    n = rows.n
    acc = acc_dtype(hidden)
    vocab = shard.vocab if shard is not None else weight.shape[0]
    labels = rows.labels - shard.offset if shard is not None else rows.labels
    token_loss = torch.empty(n, dtype=acc, device=hidden.device)
    logp = torch.empty(n, dtype=acc, device=hidden.device)
    sums = torch.zeros(4, dtype=torch.float32, device=hidden.device)
    grads_now = grad_scale is not None
    keep = not grads_now and any(need)
    saved = Saved(torch.empty_like(logp), torch.empty(3, n, dtype=acc, device=hidden.device))
    dh, dw, db = _new_grads(hidden, weight, need) if grads_now else (None, None, None)
    if use_triton:
        from .kernels import rows as rows_triton

    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        idx_c, y_c = rows.idx[start:stop], labels[start:stop]
        h_c = hidden.index_select(0, idx_c)
        x = _logits(h_c, weight, bias)
        # 1. partials of this shard's vocabulary, merged across shards, per-token figures
        if use_triton:
            part = rows_triton.rows_partials(x, y_c, opts)
        else:
            x = x.to(acc)  # no copy for fp32/fp64 inputs
            dtanh = transform_(x, opts, keep_dtanh=grads_now)
            part = rows_partials_(x, y_c, opts)  # x now holds exp(z - m_local)
            m_local = part[P.M].clone()
        if shard is not None:
            part = shard.merge(part)
        stats = P.finalize(part.to(acc))
        terms = token_terms(
            stats, opts, vocab,
            None if rows.token_weights is None else rows.token_weights[start:stop],
            None if rows.old_logprobs is None else rows.old_logprobs[start:stop],
        )  # fmt: skip
        token_loss[start:stop] = terms.loss
        logp[start:stop] = stats.logp
        sums += P.stat_sums(stats)
        if keep:
            saved.lse[start:stop] = stats.lse
            saved.coefs[:, start:stop] = terms.scaled(1)
        if not grads_now:
            continue
        # 2. dx in place of the logits, then the gradient matmuls
        coefs = terms.scaled(grad_scale)
        if use_triton:
            rows_triton.rows_grad_(x, y_c, stats.lse, coefs, opts)
        else:
            rows_grad_(x, y_c, torch.exp(m_local - stats.lse), coefs, dtanh, opts)
        _apply_dx(x.to(hidden.dtype), h_c, idx_c, weight, dh, dw, db)
        del x
    return token_loss, logp, sums, (saved if keep else None), (dh, dw, db)


def backward_chunks(hidden, weight, bias, rows: Rows, saved: Saved, grad_tokens, opts,
                    chunk_rows: int, use_triton: bool, need, shard: Shard | None = None):  # noqa: E501  # fmt: skip
    """reduction "none": grad_tokens (n,) upstream gradient of each selected token. Recomputes
    each chunk's logits and returns dh, dW, db (fp32) or None."""
    dh, dw, db = _new_grads(hidden, weight, need)
    labels = rows.labels - shard.offset if shard is not None else rows.labels
    coefs_all = saved.coefs * grad_tokens.to(saved.coefs.dtype)
    if use_triton:
        from .kernels import rows as rows_triton
    for start in range(0, rows.n, chunk_rows):
        stop = min(start + chunk_rows, rows.n)
        idx_c, y_c = rows.idx[start:stop], labels[start:stop]
        h_c = hidden.index_select(0, idx_c)
        x = _logits(h_c, weight, bias)
        lse, coefs = saved.lse[start:stop], coefs_all[:, start:stop]
        if use_triton:
            rows_triton.rows_grad_(x, y_c, lse, coefs, opts)
        else:
            x = rows_grad_from_logits_(x.to(acc_dtype(hidden)), y_c, lse, coefs, opts)
        _apply_dx(x.to(hidden.dtype), h_c, idx_c, weight, dh, dw, db)
        del x
    return dh, dw, db


def scale_precomputed(grads, grad_loss):
    """Precomputed gradients (for an upstream gradient of 1) times the upstream scalar, in place,
    the product in fp32 (a bf16 dh is rounded once, not scaled by a bf16-rounded factor)."""
    if grad_loss.device.type == "cpu" and bool(grad_loss == 1):
        return grads  # the common case; a free check on the CPU
    factor = grad_loss.float() if grad_loss.dtype != torch.float64 else grad_loss
    for g in grads:
        if g is not None:
            g.mul_(factor)
    return grads


class ChunkedDFTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weights, old_logprobs, opts: LossOptions,
                chunk_rows, use_triton, shard=None):  # fmt: skip
        acc = acc_dtype(hidden)
        rows = select_rows(labels, opts, token_weights, old_logprobs, acc)
        need = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        grads_now = any(need) and opts.reduction != "none"
        grad_scale = mean_scale(opts, rows, acc) if grads_now else None
        token_loss, logp, sums, saved, grads = forward_chunks(
            hidden, weight, bias, rows, opts, chunk_rows, use_triton, grad_scale, need, shard
        )
        loss = reduce_token_loss(token_loss, rows, hidden.shape[0], opts)
        logprobs = scatter_rows(logp, rows, hidden.shape[0])

        ctx.opts, ctx.chunk_rows, ctx.use_triton, ctx.need = opts, chunk_rows, use_triton, need
        ctx.shard = shard
        ctx.weight_dtype = weight.dtype
        ctx.rows = rows
        ctx.precomputed = grads if grads_now else None
        ctx.saved = saved
        if saved is not None:
            ctx.save_for_backward(hidden, weight, bias)
        ctx.mark_non_differentiable(sums, rows.num_valid, logprobs)
        return loss, sums, rows.num_valid, logprobs

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums, _grad_num, _grad_logprobs):
        opts, need, rows = ctx.opts, ctx.need, ctx.rows
        if opts.reduction == "none":
            hidden, weight, bias = ctx.saved_tensors
            grad_tokens = grad_loss.index_select(0, rows.idx)
            dh, dw, db = backward_chunks(
                hidden, weight, bias, rows, ctx.saved, grad_tokens, opts,
                ctx.chunk_rows, ctx.use_triton, need, ctx.shard,
            )  # fmt: skip
        else:
            if ctx.precomputed is None:
                raise RuntimeError(
                    "fused_dft: backward through the same graph twice is not supported with "
                    "reduction='mean'/'sum' (gradients are computed in the forward pass and "
                    "consumed); use reduction='none' or recompute the loss"
                )
            dh, dw, db = scale_precomputed(ctx.precomputed, grad_loss)
            ctx.precomputed = None
        dw = dw.to(ctx.weight_dtype) if dw is not None else None
        db = db.to(ctx.weight_dtype) if db is not None else None
        return dh, dw, db, None, None, None, None, None, None, None


def chunked_loss(hidden, weight, labels, bias, opts, chunk_size, use_triton,
                 token_weights=None, old_logprobs=None, shard=None):  # fmt: skip
    """hidden (N, D), labels (N,). Returns (loss, stat sums (4,), number of valid tokens,
    per-token log p_y (N,)). shard: this rank's slice of a vocab-parallel weight (parallel.py)."""
    rows = chunk_size or default_chunk_rows(weight.shape[0], hidden.device)
    rows = max(1, min(rows, hidden.shape[0]))  # a chunk never exceeds the tokens there are
    return ChunkedDFTFunction.apply(
        hidden, weight, bias, labels, token_weights, old_logprobs, opts, rows, use_triton, shard
    )
