"""Each token's loss and its logit-gradient coefficients (a, b, u): what every backend applies.

Every member of the family (family.py) is a gradient-stopped per-token weight w on cross-entropy,
so with softmax_j = exp(z_j - lse) the gradient of a token's loss with respect to its logits is

    d loss_t / d z_j = a * softmax_j - b * [j == y] - u      (- c * softmax_j * (z_j - lse))

and every backend applies exactly that (then the softcap / logit_scale chain rule). A member
gives (loss_t, w), so a = w, b = w, u = 0. Then, for any member:
    label_smoothing eps_ls (ce only): loss += eps_ls * (-log p_uniform - (-log p)) i.e.
        loss = (1 - eps_ls) (-log p) + eps_ls (lse - sum_j z_j / V); b = 1 - eps_ls, u = eps_ls / V
    a reference (asft, r = alpha): a = w + r and dz -= r * q, q the reference's softmax
    z_loss c_z: loss += c_z lse^2; a += 2 c_z lse
    token_weights tau: loss, a, b, u all times tau.
Ignored tokens are not passed here (or have every term zeroed by the caller).
The bracketed fourth term is the entropy's gradient, used only by fused_linear_logprobs (per-token
log p_y and H with gradients; logprob_coefficients): the backward passes apply it when the
coefficients have a fourth row c.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .family import member
from .options import LossOptions
from .partials import TokenStats


class TokenTerms(NamedTuple):
    """Per-token loss and gradient coefficients (dz = a * softmax - b * onehot(y) - u, and
    - r * q with a reference model's softmax q)."""

    loss: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    u: torch.Tensor
    r: torch.Tensor | None = None

    def scaled(self, coef: torch.Tensor) -> torch.Tensor:
        """(3, n) coefficients times the upstream per-token factor (mean scale / grad_output);
        (5, n) = (a, b, u, 0, r) with a reference (row 3 is the entropy's c, unused here)."""
        rows = [self.a, self.b, self.u]
        if self.r is not None:
            rows += [torch.zeros_like(self.r), self.r]
        return torch.stack(rows) * coef


def token_terms(
    stats: TokenStats,
    opts: LossOptions,
    vocab: int,
    token_weights: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
) -> TokenTerms:
    """Loss and gradient coefficients of each token, all gradient-stopped (no autograd graph).

    stats: per-token figures over the whole vocabulary (partials.finalize); vocab: the full V
    (eaft's log V, label smoothing's 1 / V); token_weights / old_logprobs: per token, or None.
    """
    with torch.no_grad():
        out = member(opts.loss_type).coefficients(stats, opts.params, vocab, old_logprobs)
        loss, w = out[:2]
        r = out[2] if len(out) > 2 else None  # a reference's coefficient: dz += r (softmax - q)
        a, b = (w + r, w) if r is not None else (w, w)
        u = torch.zeros_like(w)
        if opts.label_smoothing > 0:  # ce only (validated)
            eps = opts.label_smoothing
            loss = (1 - eps) * loss + eps * (stats.lse - stats.sum_z / vocab)
            b = torch.full_like(w, 1 - eps)
            u = torch.full_like(w, eps / vocab)
        if opts.z_loss > 0:
            loss = loss + opts.z_loss * stats.lse.square()
            a = a + 2 * opts.z_loss * stats.lse
        if token_weights is not None:
            tw = token_weights.to(loss.dtype)
            loss, a, b, u = loss * tw, a * tw, b * tw, u * tw
            r = r * tw if r is not None else None
        return TokenTerms(loss, a, b, u, r)


def logprob_coefficients(
    entropy: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None
) -> torch.Tensor:
    """The logit-gradient coefficients of g_l * log p_y + g_H * H for each token
    (fused_linear_logprobs' backward), with l = z - lse the log-softmax:
        d log p_y / dz = onehot(y) - softmax,    dH / dz = -softmax * (l + H)
    so dz = a softmax - b onehot - u - c softmax l with
        a = -g_l - g_H H,  b = -g_l,  u = 0,  c = g_H.
    Returns (4, n) = (a, b, u, c), or (3, n) without the entropy (grad_entropy None)."""
    with torch.no_grad():
        b = -grad_logp
        if grad_entropy is None:
            return torch.stack([b, b, torch.zeros_like(b)])
        a = b - grad_entropy * entropy
        return torch.stack([a, b, torch.zeros_like(b), grad_entropy])
