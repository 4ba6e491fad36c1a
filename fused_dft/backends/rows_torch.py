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

_ENTROPY_ROWS = 16  # rows of the exp buffer when the entropy is needed


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
    values = x.topk(kept, dim=1, largest=opts.logit_scale > 0).values
    values = values.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    transform_(values, opts, keep_dtanh=False)
    if kept < k:
        pad = values.new_full((values.shape[0], k - kept), float("-inf"))
        values = torch.cat([values, pad], dim=1)
    return values


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
        buffer = torch.empty((min(_ENTROPY_ROWS, x.shape[0]), x.shape[1]), dtype=x.dtype,
                             device=x.device)  # fmt: skip
        for r in range(0, x.shape[0], _ENTROPY_ROWS):
            block = x[r : r + _ENTROPY_ROWS]
            e = torch.exp(block, out=buffer[: block.shape[0]])
            # a -inf logit (a masked vocabulary entry) has e = 0: clamped, its term is 0 * finite
            # instead of 0 * -inf = nan (nan from the data stays nan)
            block.clamp_(min=torch.finfo(x.dtype).min)
            t[r : r + _ENTROPY_ROWS] = (e.unsqueeze(1) @ block.unsqueeze(2)).view(-1)
            block.copy_(e)
    else:
        x.exp_()
    s = x.sum(1)
    return torch.stack([m, s, t, z_y, sum_z])


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
    with ref_q (n, V) a reference's softmax (dz -= r q). Writes dx into e, returns it."""
    a, b, u = coefs[:3].to(e.dtype).unbind(0)
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
    if coefs.shape[0] == 4:
        a, b, u, c = coefs.to(x.dtype).unbind(0)
        p = torch.exp(x)
        x.mul_(-c[:, None]).add_(a[:, None]).mul_(p)  # (a - c l) p
        coefs = torch.stack([torch.ones_like(a), b, u])
    else:
        x.exp_()
    return rows_grad_(x, labels, torch.ones_like(lse), coefs, dtanh, opts, ref_q)


def reference_partials_(xr: torch.Tensor, z: torch.Tensor | None, opts: LossOptions):
    """xr (n, V) a reference model's raw logits (fp32/fp64), overwritten with zq = transform(xr)
    (the same logit_scale / softcap as the policy's); z (n, V) the policy's transformed logits.
    Returns the reference partials (3, n) of partials.py: mq = max zq, sq = sum exp(zq - mq),
    kq = sum exp(zq - mq) (zq - z) (0 without z), in row blocks (one block-sized temporary)."""
    transform_(xr, opts, keep_dtanh=False)
    mq = xr.amax(1)
    sq, kq = torch.empty_like(mq), torch.zeros_like(mq)
    for r in range(0, xr.shape[0], _ENTROPY_ROWS):
        zq = xr[r : r + _ENTROPY_ROWS]
        e = torch.exp(zq - mq[r : r + _ENTROPY_ROWS, None])
        sq[r : r + _ENTROPY_ROWS] = e.sum(1)
        if z is not None:
            kq[r : r + _ENTROPY_ROWS] = (e * (zq - z[r : r + _ENTROPY_ROWS])).sum(1)
    return torch.stack([mq, sq, kq])
