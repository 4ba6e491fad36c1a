"""The fused path: forward and backward around the Triton kernels (kernels/fused_*.py).

Forward (2*N*D*V FLOPs): the kernel reduces each non-ignored token's logits to its partials
(partials.py) without storing any logits, reading the rows of hidden in place through an index;
then the loss and the gradient coefficients (a, b, u) in torch (weights.py). It keeps, per
non-ignored token, lse and (a, b, u) (16 bytes). A member that reads a top-k entropy (eaft_topk)
adds a forward-only pass over logits chunks (chunked.topk_entropy_pass: one more 2*N*D*V GEMM and
one chunk of logits in memory); the weight is gradient-stopped, so backward is unchanged.
Backward (6*N*D*V FLOPs): for each chunk of at most TOKEN_CHUNK tokens and each chunk of vocab
columns that fits the dz scratch (dz_scratch_bytes: larger on CUDA where memory allows), the dz
kernel recomputes the logits and writes their gradient (coefficients times the upstream
gradient, so any per-token upstream gradient, reduction="none", is exact), then cuBLAS GEMMs
with fp32 accumulation:
    dW[cols] = dz^T h_rows   (written once, in the weight's dtype, when one token chunk covers
                              every token; else accumulated in an fp32 dW over token chunks)
    dh_rows += dz W[cols]    (an fp32 accumulator of token-chunk x D)
    db[cols] += sum_rows dz
asft (a Reference): the forward kernel also streams the reference's partials (a second GEMM over
D_ref in the same pass: KL(q || p) per token, partials.finalize_reference) and Saved keeps lse_q;
the dz kernel recomputes the reference's tile and subtracts r q. No N x V tensor, no gradient to
the reference; 2*N*(D + D_ref)*V forward FLOPs, 2*N*(3D + D_ref)*V backward.
No atomics: the gradients are bitwise reproducible. Memory beyond the gradients: the dz scratch,
the fp32 dh accumulator of one token chunk and a gathered copy of its hidden rows.
"""

from __future__ import annotations

import torch

from .. import partials as P
from ..coefficients import token_terms
from ..family import member
from ..options import LossOptions
from ..selection import Rows, mask_terms, stat_sums, token_entropy, token_logprobs
from .base import (
    Backend,
    Forward,
    Reference,
    Saved,
    VocabShard,
    full_vocab,
    local_labels,
    reference_lse,
)
from .chunked import topk_entropy_pass
from .matmul import addmm_fp32_


def fused_forward(hidden, weight, bias, rows: Rows, opts: LossOptions, need,
                  shard: VocabShard | None = None, chunk_size=None,
                  config=None, ref: Reference | None = None) -> Forward:  # fmt: skip
    """Saved (lse, coefs (3, n)) when a gradient is needed. shard: weight is this rank's slice
    of a vocab-parallel head; chunk_size: tokens per logits chunk of the top-k entropy pass
    (eaft_topk), else unused (the kernel reads every token in place). ref (asft): the
    reference's partials from the same kernel; Saved (lse, coefs (5, n), lse_q)."""
    from ..kernels.fused_fwd import fused_partials

    labels = local_labels(rows.labels, shard)
    part = fused_partials(hidden, weight, bias, rows.idx, labels, rows.num_valid, opts, config,
                          ref=ref)  # fmt: skip
    lse_q = None
    if ref is not None:  # the reference's partials, merged across the ranks (vocab-parallel)
        part, ref_part = part
        lse_q, cross = reference_lse(ref_part, shard)
    if shard is not None:
        part = shard.merge(part)
    stats = P.finalize(part)
    if ref is not None:  # KL(q || p) = sum_j q_j (log q_j - z_j) + lse
        stats = stats._replace(kl=cross + stats.lse)
    topk = member(opts.loss_type).topk_of(opts.params)
    if topk:  # eaft_topk: a forward-only pass over logits chunks (one more 2 N D V GEMM)
        topk_h = topk_entropy_pass(hidden, weight, bias, rows, topk, opts, chunk_size, shard)
        stats = stats._replace(topk_entropy=topk_h)
    terms = token_terms(stats, opts, full_vocab(weight, shard), rows.token_weights,
                        rows.old_logprobs)  # fmt: skip
    terms = mask_terms(terms, rows)
    saved = Saved(stats.lse, terms.scaled(1), lse_q) if any(need) else None
    entropy = token_entropy(stats, rows) if opts.needs_entropy else None
    logp = token_logprobs(stats, rows)
    return Forward(terms.loss, logp, stat_sums(stats, rows), saved, None, entropy)


# bytes of the logit-gradient scratch (token chunk x vocab chunk) and the most tokens per chunk
# (the fp32 dh accumulator is TOKEN_CHUNK x D x 4 bytes)
DZ_SCRATCH_BYTES = 256 * 2**20
TOKEN_CHUNK = 16384
_COLUMN_MULTIPLE = 128  # vocab chunks a multiple of the GEMM tile
# CUDA: the scratch grows up to DZ_SCRATCH_MAX_BYTES where 1/_DZ_FREE_SHARE of the free memory
# holds it. Why: the fp32 dh accumulator (token chunk x D x 4 B) is read and written by the dh
# GEMM once per vocab chunk. At 16384 x 4096 x 128256 in bf16 it is 256 MiB, so 512 MiB a pass:
# a 256 MiB scratch holds 8192 columns, 16 vocab chunks, 8.6 GB (~2.9 ms at 3.35 TB/s x 0.9,
# H100 SXM); 1 GiB holds 32768, 4 chunks, 2.1 GB (~0.7 ms); each dh GEMM also gets a 4x longer K.
# At 8192 x 4096 x 151936: 10 chunks (2.7 GB) -> 3 (0.8 GB). The cost is 768 MiB more peak memory
# in the backward, still under chunked's 2.1 GB logits buffer.
DZ_SCRATCH_MAX_BYTES = 2**30
_DZ_FREE_SHARE = 4


def dz_scratch_bytes(device: torch.device) -> int:
    """The dz scratch's bytes: DZ_SCRATCH_BYTES, on CUDA up to DZ_SCRATCH_MAX_BYTES within
    1/_DZ_FREE_SHARE of the free memory (torch.cuda.mem_get_info)."""
    if device.type != "cuda" or DZ_SCRATCH_MAX_BYTES <= DZ_SCRATCH_BYTES:
        return DZ_SCRATCH_BYTES
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return max(DZ_SCRATCH_BYTES, min(DZ_SCRATCH_MAX_BYTES, free_bytes // _DZ_FREE_SHARE))


def fused_backward(hidden, weight, bias, rows: Rows, saved: Saved, upstream, opts: LossOptions,
                   need, shard: VocabShard | None = None, chunk_size=None,
                   config=None, ref: Reference | None = None):  # fmt: skip
    """dh (N, D) in hidden's dtype (zero at rows not selected), dW and db in the weight's dtype,
    each None when not needed. saved: per selected row lse (n,) and (a, b, u) (3, n) (with ref:
    (a, b, u, 0, r) (5, n) and lse_q); upstream (n,): each row's upstream gradient. shard: as in
    fused_forward (dh is then this shard's term). ref (asft): the dz kernel's - r q term."""
    from ..kernels import configs
    from ..kernels.fused_bwd import fused_dz

    lse = saved.lse.float()
    coefs = (saved.coefs * upstream).float().contiguous()
    n, (v, d) = rows.n, weight.shape
    dev = hidden.device
    labels = local_labels(rows.labels, shard)
    dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev) if need[0] else None
    db = torch.zeros(v, dtype=torch.float32, device=dev) if need[2] else None
    token_chunk = max(1, min(n, TOKEN_CHUNK))
    one_pass = token_chunk == n  # every weight row's gradient is written once, in its dtype
    dw = None
    if need[1]:
        dw = (
            torch.zeros(v, d, dtype=weight.dtype if one_pass else torch.float32, device=dev)
            if n == 0 or not one_pass
            else torch.empty(v, d, dtype=weight.dtype, device=dev)
        )
    if n > 0 and any(need):
        cols = dz_scratch_bytes(dev) // (token_chunk * hidden.element_size())
        cols = min(v, max(_COLUMN_MULTIPLE, cols // _COLUMN_MULTIPLE * _COLUMN_MULTIPLE))
        scratch = torch.empty(token_chunk, cols, dtype=hidden.dtype, device=dev)
        plan = configs.plan(hidden.dtype, dev, d, v, config, reference=ref is not None)
        ref_lse = saved.ref_lse.float().contiguous() if ref is not None else None
        db_part = None
        if db is not None:  # per token block column sums, for the smallest candidate block
            blocks = -(-token_chunk // plan.min_block_n)
            db_part = torch.empty(blocks, cols, dtype=torch.float32, device=dev)
        for t0 in range(0, n, token_chunk):
            t1 = min(t0 + token_chunk, n)
            idx = rows.idx[t0:t1]
            h_c = None
            if dw is not None:  # rows that are not tokens zeroed: nothing non-finite reaches dW
                h_c = hidden.index_select(0, idx)
                if rows.valid is not None:
                    h_c.masked_fill_(~rows.valid[t0:t1, None], 0)
            dh_c = torch.zeros(t1 - t0, d, dtype=torch.float32, device=dev) if need[0] else None
            for v0 in range(0, v, cols):
                v1 = min(v0 + cols, v)
                dz = scratch[: t1 - t0, : v1 - v0]
                if db_part is not None:
                    db_part.zero_()
                fused_dz(hidden, weight, bias, idx, labels[t0:t1], rows.num_valid, t0,
                       lse[t0:t1], coefs[:, t0:t1], v0, dz, opts, plan, db_part,
                       ref, ref_lse[t0:t1] if ref is not None else None)  # fmt: skip
                if dw is not None:
                    if one_pass:
                        torch.mm(dz.t(), h_c, out=dw[v0:v1])
                    else:
                        addmm_fp32_(dw[v0:v1], dz.t(), h_c)
                if dh_c is not None:
                    addmm_fp32_(dh_c, dz, weight[v0:v1])
                if db is not None:
                    db[v0:v1] += db_part[:, : v1 - v0].sum(0)
            if dh is not None:
                dh.index_copy_(0, idx, dh_c.to(dh.dtype))
    dw = dw.to(weight.dtype) if dw is not None else None
    db = db.to(bias.dtype) if db is not None else None
    return dh, dw, db


FUSED = Backend(name="fused", forward=fused_forward, backward=fused_backward)
