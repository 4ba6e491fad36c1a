"""Per-row loss, statistics and logit gradient in torch ops: the chunked path's CPU backend.

Given a chunk of raw logits x (n, V) in fp32/fp64, for each row:
    z = transform(x)                      (logit_scale, then softcap)
    m = max(z); e = exp(z - m); s = sum(e); lse = m + log(s)
    log p_y = z_y - lse;  p_y = exp(log p_y)
    loss = -log p_y (ce)  or  -p_y * log p_y (dft)
    entropy = lse - sum(softmax(z) * z) = log(s) - sum(e * (z - m)) / s
and, when coef is given, the gradient of coef * loss w.r.t. the raw logits, written into x:
    dz = coef * w * (softmax(z) - onehot(y)),  w = p_y (dft) or 1 (ce)
    dx = dz * (1 - tanh^2) * logit_scale     (the softcap and scale chain rule)
Every step works in place on x so a chunk costs one (n, V) buffer (two with softcap).
"""

from __future__ import annotations

import torch

from .options import LossOptions

_ENTROPY_ROWS = 64  # rows per temporary when summing e * (z - m) for the entropy


def rows_loss_and_grad(
    x: torch.Tensor,
    labels: torch.Tensor,
    coef: torch.Tensor | None,
    opts: LossOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, V) float, overwritten; labels (n,) in [0, V); coef (n,) or None.

    Returns (token_loss (n,), per-row stats (n, 3) = [-log p_y, entropy, correct]); the entropy
    (one more pass over x) is computed only when opts.return_stats is set, else it is 0.
    """
    # 1. logit transforms; keep 1 - tanh^2 for the softcap chain rule
    if opts.logit_scale != 1.0:
        x.mul_(opts.logit_scale)
    dtanh = None
    if opts.softcap is not None:
        x.div_(opts.softcap).tanh_()
        if coef is not None:
            dtanh = 1.0 - x * x
        x.mul_(opts.softcap)
    # 2. target logit, row max (also gives accuracy: ties count as correct)
    z_y = x.gather(1, labels[:, None]).squeeze(1)
    m = x.amax(1)
    correct = (z_y >= m).to(x.dtype)
    # 3. shift, then sum e * (z - m) in row blocks for the entropy, then exponentiate in place
    x.sub_(m[:, None])
    e_dot_t = None
    if opts.return_stats:
        e_dot_t = torch.empty_like(m)
        for r in range(0, x.shape[0], _ENTROPY_ROWS):
            t = x[r : r + _ENTROPY_ROWS]
            e_dot_t[r : r + _ENTROPY_ROWS] = (t.exp() * t).sum(1)
    x.exp_()
    s = x.sum(1)
    log_s = s.log()
    lse = m + log_s
    logp_y = z_y - lse
    p_y = logp_y.exp()
    token_loss = -p_y * logp_y if opts.is_dft else -logp_y
    entropy = log_s - e_dot_t / s if e_dot_t is not None else torch.zeros_like(s)
    stats = torch.stack([-logp_y, entropy, correct], dim=1)

    # 4. gradient w.r.t. the raw logits, in place
    if coef is not None:
        w = coef.to(x.dtype) * p_y if opts.is_dft else coef.to(x.dtype)
        x.mul_((w / s)[:, None])
        x.scatter_add_(1, labels[:, None], -w[:, None])
        if dtanh is not None:
            x.mul_(dtanh)
        if opts.logit_scale != 1.0:
            x.mul_(opts.logit_scale)
    return token_loss, stats
