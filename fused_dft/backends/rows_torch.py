"""Row statistics and logit gradients of a logits chunk in torch ops (the chunked CPU backend).

Two steps over a chunk of raw logits x (n, V) in fp32/fp64, both in place on x so a chunk costs
one (n, V) buffer (two with softcap, which keeps 1 - tanh^2 for the chain rule):

  rows_partials_: z = transform(x); the partials of partials.py (m, s, t, z_y, sum_z) per row;
                  x is left holding e = exp(z - m).
  rows_grad_:     from e (or from raw logits with rows_grad_from_logits_), given the row's global
                  lse and coefficients (a, b, u) of weights.py:
                      dz = a * exp(z - lse) - b * onehot(y) - u
                      dx = dz * (1 - tanh^2 if softcap) * logit_scale    written into x;
                  rows_grad_from_logits_ also takes c, the entropy's gradient:
                      dz -= c * exp(l) * l,  l = z - lse  (dH/dz = -p (l + H), -p H in a).
Labels outside [0, V) (a vocab shard that does not hold the label) give z_y = 0 and no one-hot.
"""

from __future__ import annotations

import torch

from ..options import LossOptions

# Elements of the row-block buffer of the passes that need exp(.) beside the logits (the entropy,
# the reference partials, the entropy's gradient): 4M (16 MB in fp32), at least 16 rows. Why not
# 16 rows always: each block costs a few torch calls, and a call on a loaded CPU waits for its
# threads (~5-20 ms measured at load 8 on 2 cores): at 1024 x 32000 the 16-row blocks of the
# entropy took 46 x 4 calls, ~4 s, against 0.05 s for one exp pass over the whole chunk. 4M
# elements is an eighth of the CPU logits chunk (chunked._CHUNK_ELEMENTS): 9 blocks at V = 128256.
_BLOCK_ELEMENTS = 4 * 2**20
_MIN_BLOCK_ROWS = 16
# eaft's top k: columns per block of the blocked selection (rows_topk_values)
_TOPK_BLOCK = 256


def block_rows(vocab: int) -> int:
    """Rows of a row block: _BLOCK_ELEMENTS elements, at least _MIN_BLOCK_ROWS rows."""
    return max(_MIN_BLOCK_ROWS, _BLOCK_ELEMENTS // max(vocab, 1))


def transform_(x: torch.Tensor, opts: LossOptions, keep_dtanh: bool) -> torch.Tensor | None:
    """x <- softcap * tanh(logit_scale * x / softcap) in place; returns 1 - tanh^2 if asked."""
    if opts.logit_scale != 1.0:
        x.mul_(opts.logit_scale)
    dtanh = None
    if opts.softcap is not None:
        x.div_(opts.softcap).tanh_()
        if keep_dtanh:
            dtanh = 1.0 - x * x
        x.mul_(opts.softcap)
    return dtanh


def rows_topk_values(x: torch.Tensor, k: int, opts: LossOptions) -> torch.Tensor:
    """x (n, V) raw logits (not modified) -> (n, k) each row's k largest transformed logits,
    largest first (fp32, fp64 for fp64 x). The transform is monotone (increasing for
    logit_scale > 0), so the top k of x are the top k of z: only they are transformed. A row
    narrower than k (a vocab shard) is padded with -inf, which a merge's top k never picks."""
    kept = min(k, x.shape[1])
    largest = opts.logit_scale > 0
    values = _topk_blocked(x, kept) if largest else x.topk(kept, dim=1, largest=False).values
    values = values.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    transform_(values, opts, keep_dtanh=False)
    if kept < k:
        pad = values.new_full((values.shape[0], k - kept), float("-inf"))
        values = torch.cat([values, pad], dim=1)
    return values


def _topk_blocked(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values of each row of x (n, V), largest first: torch.topk over the k blocks
    of _TOPK_BLOCK columns with the largest maxima (and the tail columns) instead of over the
    whole row. Exact: an element outside those blocks is <= the maxima of the k chosen blocks
    (k elements of them), so the k largest of the candidates are the k largest of the row (as
    values; ties alike). Cost: one max pass over x (a strided reduction) and a top k over
    n x k B elements: ~130 ms at 261 x 128256 (k = 20, CPU, load 10 on 2 cores) against
    ~190-250 ms for torch.topk over the row."""
    n, v = x.shape
    blocks = v // _TOPK_BLOCK
    if blocks <= k:  # too few blocks to gain anything
        return x.topk(k, dim=1).values
    body = x[:, : blocks * _TOPK_BLOCK].view(n, blocks, _TOPK_BLOCK)
    chosen = body.amax(2).topk(k, dim=1).indices  # (n, k) blocks
    candidates = body.gather(1, chosen[:, :, None].expand(n, k, _TOPK_BLOCK)).view(n, -1)
    if blocks * _TOPK_BLOCK < v:  # the tail columns, a partial block, are always candidates
        candidates = torch.cat([candidates, x[:, blocks * _TOPK_BLOCK :]], dim=1)
    return candidates.topk(k, dim=1).values


def _in_range(labels: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of labels inside [0, vocab), those labels with the others replaced by 0)."""
    inside = (labels >= 0) & (labels < vocab)
    return inside, torch.where(inside, labels, torch.zeros_like(labels))


def rows_partials_(x: torch.Tensor, labels: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    """x (n, V) transformed logits, overwritten with exp(z - m). Returns partials (5, n)."""
    inside, safe = _in_range(labels, x.shape[1])
    z_y = torch.where(inside, x.gather(1, safe[:, None]).squeeze(1), torch.zeros_like(x[:, 0]))
    sum_z = x.sum(1) if opts.needs_logit_sum else torch.zeros_like(z_y)
    m = x.amax(1)
    x.sub_(m[:, None])
    t = torch.zeros_like(m)
    if opts.needs_entropy:
        # one exp per element, as without the entropy: e = exp(z - m) of a block of rows into a
        # small buffer, t = sum e (z - m) as a batched dot (no product temporary), then e over x
        rows = block_rows(x.shape[1])
        buffer = torch.empty((min(rows, x.shape[0]), x.shape[1]), dtype=x.dtype,
                             device=x.device)  # fmt: skip
        for r in range(0, x.shape[0], rows):
            block = x[r : r + rows]
            e = torch.exp(block, out=buffer[: block.shape[0]])
            # a -inf logit (a masked vocabulary entry) has e = 0: clamped, its term is 0 * finite
            # instead of 0 * -inf = nan (nan from the data stays nan)
            block.clamp_(min=torch.finfo(x.dtype).min)
            t[r : r + rows] = _row_dot(e, block)
            block.copy_(e)
    else:
        x.exp_()
    s = x.sum(1)
    return torch.stack([m, s, t, z_y, sum_z])


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) sum_j a_ij b_ij of two (n, V) tensors as a batched dot: no (n, V) product."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def rows_grad_(
    e: torch.Tensor,
    labels: torch.Tensor,
    softmax_scale: torch.Tensor,
    coefs: torch.Tensor,
    dtanh: torch.Tensor | None,
    opts: LossOptions,
    ref_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """e (n, V) = exp(z - c_row) for any per-row shift c_row, with softmax = e * softmax_scale
    (softmax_scale = exp(c_row - lse)); coefs (3, n) = (a, b, u), or (5, n) = (a, b, u, -, r)
    with ref_q (n, V) a reference's softmax (dz -= r q). softmax_scale None: e already holds
    a * softmax (a unused). Writes dx into e, returns it."""
    a, b, u = coefs[:3].to(e.dtype).unbind(0)
    if softmax_scale is not None:
        e.mul_((a * softmax_scale.to(e.dtype))[:, None])
    inside, safe = _in_range(labels, e.shape[1])
    e.scatter_add_(1, safe[:, None], torch.where(inside, -b, torch.zeros_like(b))[:, None])
    if opts.label_smoothing > 0:
        e.sub_(u[:, None])
    if ref_q is not None:
        e.addcmul_(ref_q, coefs[4].to(e.dtype)[:, None], value=-1)
    if dtanh is not None:
        e.mul_(dtanh)
    if opts.logit_scale != 1.0:
        e.mul_(opts.logit_scale)
    return e


def rows_grad_from_logits_(
    x: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    coefs: torch.Tensor,
    opts: LossOptions,
    ref_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (n, V) raw logits (fp32/fp64), overwritten with dx given each row's lse and coefs:
    (a, b, u), or (a, b, u, c) with the entropy-gradient term - c * softmax * log_softmax
    (fused_linear_logprobs), which costs one more (n, V) buffer; (a, b, u, 0, r) with ref_q."""
    dtanh = transform_(x, opts, keep_dtanh=True)
    x.sub_(lse.to(x.dtype)[:, None])  # log softmax
    if coefs.shape[0] == 4:  # (a - c l) p by row blocks: p = exp(l) in a block buffer
        a, _, _, c = coefs.to(x.dtype).unbind(0)
        rows = block_rows(x.shape[1])
        buffer = torch.empty((min(rows, x.shape[0]), x.shape[1]), dtype=x.dtype, device=x.device)
        for r in range(0, x.shape[0], rows):
            block = x[r : r + rows]
            p = torch.exp(block, out=buffer[: block.shape[0]])
            # block <- a + (-c) l in one pass, then times p: x holds a p - c p l
            torch.addcmul(a[r : r + rows, None], block, c[r : r + rows, None], value=-1, out=block)
            block.mul_(p)
        return rows_grad_(x, labels, None, coefs[:3], dtanh, opts, ref_q)  # a applied above
    x.exp_()
    return rows_grad_(x, labels, torch.ones_like(lse), coefs, dtanh, opts, ref_q)


def reference_partials_(xr: torch.Tensor, z: torch.Tensor, opts: LossOptions):
    """xr (n, V) a reference model's raw logits (fp32/fp64), overwritten with zq = transform(xr)
    (the same logit_scale / softcap as the policy's); z (n, V) the policy's transformed logits.
    Returns the reference partials (3, n) of partials.py: mq = max zq, sq = sum exp(zq - mq),
    kq = sum exp(zq - mq) (zq - z). By row blocks: e = exp(zq - mq) into a
    block buffer, then sq = sum e and kq = e . zq - e . z as batched dots (no product buffer)."""
    transform_(xr, opts, keep_dtanh=False)
    mq = xr.amax(1)
    sq, kq = torch.empty_like(mq), torch.empty_like(mq)
    rows = block_rows(xr.shape[1])
    buffer = torch.empty((min(rows, xr.shape[0]), xr.shape[1]), dtype=xr.dtype, device=xr.device)
    for r in range(0, xr.shape[0], rows):
        zq = xr[r : r + rows]
        e = torch.sub(zq, mq[r : r + rows, None], out=buffer[: zq.shape[0]]).exp_()
        sq[r : r + rows] = e.sum(1)
        kq[r : r + rows] = _row_dot(e, zq) - _row_dot(e, z[r : r + rows])
    return torch.stack([mq, sq, kq])
