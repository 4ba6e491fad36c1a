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

import functools
import os

import torch

from .. import partials as P
from ..coefficients import token_terms
from ..family import member
from ..options import LossOptions
from ..selection import (
    Rows,
    chunk_of,
    mask_terms,
    mean_scale,
    stat_sums,
    token_entropy,
    token_logprobs,
)
from .base import (
    Backend,
    Forward,
    Reference,
    Saved,
    VocabShard,
    acc_dtype,
    full_vocab,
    local_labels,
    reference_lse,
)
from .matmul import addmm_fp32_
from .rows_torch import (
    reference_partials_,
    rows_grad_,
    rows_grad_from_logits_,
    rows_partials_,
    rows_topk_values,
    transform_,
)

# Elements of one chunk's logits buffer: 32M (128 MB in fp32) on the CPU; on CUDA at most 1G,
# and at most a share of the free memory. Why 1G on CUDA: every chunk reads and writes the fp32
# dW once (addmm into it), 2 * 4 * V * D bytes: at V x D = 128256 x 4096 that is 4.2 GB, 1.25 ms
# at 3.35 TB/s (H100 SXM), per chunk. At N = 16384 a 256M cap gave 2048-row chunks, 8 passes
# (33.6 GB, ~10 ms); 1G gives 8320-row chunks, 2 passes (8.4 GB, ~2.5 ms), for a logits buffer of
# 8320 x 128256 x 2 B = 2.1 GB in bf16 (counted at 4 B an element below: 4.3 GB), still under
# half of naive's 12.6 GB (bf16 logits + their fp32 copy), and only where a quarter of the free
# memory holds it.
_CHUNK_ELEMENTS = {"cpu": 32 * 2**20, "cuda": 1024 * 2**20}
_MIN_CHUNK_ROWS = 16
# CUDA: rows a multiple of the GEMM tile; logits counted at 4 bytes an element (fp32 logits, or
# 16-bit ones and a temporary) may take 1/_CUDA_FREE_SHARE of the free memory
_CUDA_ROW_MULTIPLE = 128
_CUDA_FREE_SHARE = 4


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


def _accumulate_outer(acc: torch.Tensor, dx: torch.Tensor, h: torch.Tensor) -> None:
    """acc (fp32) += dx^T h with fp32 accumulation (the weight gradient of a chunk)."""
    addmm_fp32_(acc, dx.t(), h)


def _logits(h_c, weight, bias):
    return torch.addmm(bias, h_c, weight.t()) if bias is not None else h_c @ weight.t()


def _gather_hidden(hidden, rows_c: Rows):
    """The chunk's rows of hidden; rows that are not tokens (static selection) are zeroed, so a
    non-finite value there cannot reach a logit or a weight gradient."""
    h_c = hidden.index_select(0, rows_c.idx)
    if rows_c.valid is not None:
        h_c.masked_fill_(~rows_c.valid[:, None], 0)
    return h_c


def _apply_dx(dx, h_c, idx_c, weight, dh, dw, db):
    """dh[rows] = dx W; dW += dx^T h_c; db += sum_rows dx (the ones not None)."""
    if dh is not None:
        dh.index_copy_(0, idx_c, dx @ weight)
    if dw is not None:
        _accumulate_outer(dw, dx, h_c)
    if db is not None:
        db += dx.sum(0, dtype=db.dtype)


def new_grads(hidden, weight, need):
    """Zeroed dh (hidden's dtype), dW and db (fp32 / fp64), None where not needed."""
    acc, dev = acc_dtype(hidden), hidden.device
    return (
        torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev) if need[0] else None,
        torch.zeros(weight.shape, dtype=acc, device=dev) if need[1] else None,
        torch.zeros(weight.shape[0], dtype=acc, device=dev) if need[2] else None,
    )


def _reference_logits(ref: Reference, rows_c: Rows) -> torch.Tensor:
    """xr (n, V_r) of a chunk: the reference model's raw logits, in its dtype (no gradient)."""
    return _logits(_gather_hidden(ref.hidden, rows_c), ref.weight, ref.bias)


def _reference_zq(ref: Reference, rows_c: Rows, acc, opts: LossOptions, z):
    """A chunk's reference logits and partials (torch row ops): (zq (n, V_r) transformed, in the
    logits' buffer; reference partials (3, n) of this shard, partials.py; kq against the policy's
    transformed z)."""
    xr = _reference_logits(ref, rows_c).to(acc)
    return xr, reference_partials_(xr, z, opts)


def _topk_entropy(x, k: int, opts: LossOptions, shard: VocabShard | None) -> torch.Tensor:
    """(n,) the entropy of each row's k largest logits renormalized among themselves, from raw
    logits x (n, V_r) (not modified). Vocab-parallel: every rank's top k gathered (k values per
    token per rank, one all-gather) and the top k of those P k values taken again: the top k of
    the whole row, largest first as on one device, so the entropy is the same bit for bit."""
    values = rows_topk_values(x, k, opts)  # (n, k), largest first
    if shard is not None:
        every = shard.gather(values.t())  # (P, k, n)
        values = every.permute(2, 0, 1).reshape(values.shape[0], -1).topk(k, dim=1).values
    return P.topk_entropy(values)


def chunked_forward(hidden, weight, bias, rows: Rows, opts: LossOptions, need,
                    shard: VocabShard | None, chunk_size: int | None,
                    use_triton: bool, ref: Reference | None = None) -> Forward:  # fmt: skip
    """hidden (N, D); rows: the selected tokens (only one chunk of them is gathered at a time).

    need = (dh, dW, db). With reduction "mean"/"sum" and a gradient needed, the gradients are
    computed now (for an upstream gradient of 1); with "none", Saved is returned instead.
    ref (asft): the reference's chunk of logits beside the policy's gives KL(q || p) per token
    and the gradient term - r q (the Triton row kernels and the torch row ops alike); Saved then
    also keeps each token's lse_q.
    """
    n = rows.n
    acc = acc_dtype(hidden)
    dev = hidden.device
    vocab = full_vocab(weight, shard)
    chunk_rows = chunk_rows_for(chunk_size, weight, hidden)
    grads_now = any(need) and opts.reduction != "none"
    keep = any(need) and not grads_now
    token_loss = torch.empty(n, dtype=acc, device=dev)
    logp = torch.empty(n, dtype=acc, device=dev)
    sums = torch.zeros(4, dtype=torch.float32, device=dev)
    entropy = torch.empty(n, dtype=acc, device=dev) if opts.needs_entropy else None
    saved = None
    if keep:
        saved = Saved(
            torch.empty(n, dtype=acc, device=dev),
            torch.empty(3 if ref is None else 5, n, dtype=acc, device=dev),
            torch.empty(n, dtype=acc, device=dev) if ref is not None else None,
        )
    grads = new_grads(hidden, weight, need) if grads_now else None
    grad_scale = mean_scale(opts, rows, acc)
    topk = member(opts.loss_type).topk_of(opts.params)
    if use_triton:
        from ..kernels import rows as rows_triton

    for start in range(0, n, chunk_rows):
        # the previous chunk's buffers freed before this one allocates its own (a reference's
        # q kept until then made asft's peak a third logits chunk: 134 MB at V = 128256)
        x = q = xr = dtanh = None
        stop = min(start + chunk_rows, n)
        rows_c = chunk_of(rows, start, stop)
        y_c = local_labels(rows_c.labels, shard)
        h_c = _gather_hidden(hidden, rows_c)
        x = _logits(h_c, weight, bias)
        # 0. a top-k entropy (eaft_topk) from the raw logits, before anything overwrites them
        topk_h = _topk_entropy(x, topk, opts, shard) if topk else None
        # 1. partials of this shard's vocabulary, merged across shards, per-token figures
        if use_triton and ref is not None:  # the reference's partials streamed beside z's
            xr = _reference_logits(ref, rows_c)
            part, ref_part = rows_triton.rows_partials(x, y_c, opts, ref_logits=xr)
            lse_q, cross = reference_lse(ref_part.to(acc), shard)
        elif use_triton:
            part = rows_triton.rows_partials(x, y_c, opts)
        else:
            x = x.to(acc)  # no copy for fp32/fp64 inputs
            dtanh = transform_(x, opts, keep_dtanh=grads_now)
            if ref is not None:  # the reference partials while x holds z (kq needs z)
                q, ref_part = _reference_zq(ref, rows_c, acc, opts, x)
            part = rows_partials_(x, y_c, opts)  # x now holds exp(z - m_local)
            m_local = part[P.M].clone()
        if ref is not None and not use_triton:  # q = the reference's softmax in place of zq
            lse_q, cross = reference_lse(ref_part, shard)
            q = q.sub_(lse_q[:, None]).exp_()
        if shard is not None:
            part = shard.merge(part)
        stats = P.finalize(part.to(acc))._replace(topk_entropy=topk_h)
        if ref is not None:  # KL(q || p) = sum_j q_j (log q_j - z_j) + lse
            stats = stats._replace(kl=cross + stats.lse)
        terms = mask_terms(token_terms(stats, opts, vocab, rows_c.token_weights,
                                       rows_c.old_logprobs), rows_c)  # fmt: skip
        token_loss[start:stop] = terms.loss
        logp[start:stop] = token_logprobs(stats, rows_c)
        sums += stat_sums(stats, rows_c)
        if entropy is not None:
            entropy[start:stop] = token_entropy(stats, rows_c)
        if keep:
            saved.lse[start:stop] = stats.lse
            saved.coefs[:, start:stop] = terms.scaled(1)
            if ref is not None:
                saved.ref_lse[start:stop] = lse_q
        if not grads_now:
            continue
        # 2. dx in place of the logits, then the gradient matmuls
        coefs = terms.scaled(grad_scale)
        if use_triton:
            ref_args = {} if ref is None else {"ref_logits": xr, "ref_lse": lse_q}
            rows_triton.rows_grad_(x, y_c, stats.lse, coefs, opts, **ref_args)
        else:
            softmax_scale = torch.exp(m_local - stats.lse)
            rows_grad_(x, y_c, softmax_scale, coefs, dtanh, opts, q if ref is not None else None)
        _apply_dx(x.to(hidden.dtype), h_c, rows_c.idx, weight, *grads)
    return Forward(token_loss, logp, sums, saved, grads, entropy)


def chunked_backward(hidden, weight, bias, rows: Rows, saved: Saved, upstream, opts, need,
                     shard: VocabShard | None, chunk_size: int | None,
                     use_triton: bool, ref: Reference | None = None):  # fmt: skip
    """The gradients from Saved: upstream (n,) is each selected row's upstream gradient
    (already times the mean scale). Recomputes each chunk's logits (and the reference's, ref);
    returns dh, dW, db (fp32) or None."""
    chunk_rows = chunk_rows_for(chunk_size, weight, hidden)
    grads = new_grads(hidden, weight, need)
    coefs_all = saved.coefs * upstream.to(saved.coefs.dtype)
    if use_triton:
        from ..kernels import rows as rows_triton
    for start in range(0, rows.n, chunk_rows):
        stop = min(start + chunk_rows, rows.n)
        rows_c = chunk_of(rows, start, stop)
        y_c = local_labels(rows_c.labels, shard)
        h_c = _gather_hidden(hidden, rows_c)
        x = _logits(h_c, weight, bias)
        lse, coefs = saved.lse[start:stop], coefs_all[:, start:stop]
        if use_triton:
            ref_args = {}
            if ref is not None:  # q = exp(zq - lse_q) from the reference's recomputed chunk
                ref_args = {"ref_logits": _reference_logits(ref, rows_c),
                            "ref_lse": saved.ref_lse[start:stop]}  # fmt: skip
            rows_triton.rows_grad_(x, y_c, lse, coefs, opts, **ref_args)
        else:
            acc = acc_dtype(hidden)
            q = None
            if ref is not None:  # q = exp(zq - lse_q), lse_q (merged across ranks) from forward
                q = _reference_logits(ref, rows_c).to(acc)
                transform_(q, opts, keep_dtanh=False)
                q = q.sub_(saved.ref_lse[start:stop, None]).exp_()
            x = rows_grad_from_logits_(x.to(acc), y_c, lse, coefs, opts, q)
        _apply_dx(x.to(hidden.dtype), h_c, rows_c.idx, weight, *grads)
        del x
    return grads


def topk_entropy_pass(hidden, weight, bias, rows: Rows, k: int, opts: LossOptions,
                      chunk_size: int | None = None,
                      shard: VocabShard | None = None) -> torch.Tensor:  # fmt: skip
    """(n,) the top-k entropy of each selected row (_topk_entropy), one chunk of logits at a
    time: a forward-only pass (one more 2 N D V GEMM) for a backend that keeps no logits."""
    out = torch.empty(rows.n, dtype=acc_dtype(hidden), device=hidden.device)
    chunk_rows = chunk_rows_for(chunk_size, weight, hidden)
    for start in range(0, rows.n, chunk_rows):
        rows_c = chunk_of(rows, start, min(start + chunk_rows, rows.n))
        x = _logits(_gather_hidden(hidden, rows_c), weight, bias)
        out[start : start + rows_c.n] = _topk_entropy(x, k, opts, shard)
    return out


def chunk_rows_for(chunk_size: int | None, weight: torch.Tensor, hidden: torch.Tensor) -> int:
    """Tokens per chunk: chunk_size, else default_chunk_rows; never more than the tokens."""
    rows = chunk_size or default_chunk_rows(weight.shape[0], hidden.device)
    return max(1, min(rows, hidden.shape[0]))


def _backend(name: str, use_triton: bool) -> Backend:
    return Backend(
        name=name,
        forward=functools.partial(chunked_forward, use_triton=use_triton),
        backward=functools.partial(chunked_backward, use_triton=use_triton),
        grads_in_forward=True,
    )


CHUNKED = _backend("chunked", use_triton=True)  # Triton row kernels (CUDA, or the interpreter)
CHUNKED_TORCH = _backend("chunked_torch", use_triton=False)  # torch row ops
