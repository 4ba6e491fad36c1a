"""The plain-torch definition of the loss: materializes all logits. The oracle of the tests.

Logits are computed with F.linear in the input dtype (as a model's lm_head does) and upcast to
fp32 (float64 inputs stay float64); everything after that is in that precision, and every
gradient comes from torch autograd through the definitions below and each loss_type's own
`definition` in family.py (sg = .detach()).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .arguments import checked_labels
from .family import member
from .options import LossOptions


def transform_logits(z: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    """z <- logit_scale * z, then z <- softcap * tanh(z / softcap) when softcap is set."""
    if opts.logit_scale != 1.0:
        z = z * opts.logit_scale
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    return z


def reference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LossOptions,
    token_weights: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, D), weight (V, D), labels (N,), bias (V,) or None; token_weights and
    old_logprobs (N,) or None; ref: (hidden (N, D_r), weight (V, D_r), bias) of asft's reference
    model, whose log-softmax (no gradient) the member's definition reads.

    Returns (loss reduced per opts.reduction, stat sums fp32 (4,), number of valid tokens,
    per-token log p_y (N,), 0 at ignored tokens). Differentiable through torch autograd.
    """
    vocab = weight.shape[0]
    if opts.validate == "sync":
        labels = checked_labels(labels, token_weights, old_logprobs, vocab, opts.ignore_index)
    valid = labels != opts.ignore_index
    # ignored rows never touch the math: their hidden is replaced by 0 (not multiplied by 0), so
    # a NaN / inf there reaches no logit and gets an exact 0 gradient, as in the other impls
    hidden = torch.where(valid[:, None], hidden, hidden.new_zeros(()))
    logits = F.linear(hidden, weight, bias)
    if logits.dtype != torch.float64:
        logits = logits.float()
    z = transform_logits(logits, opts)
    # a label outside [0, V) (validate="device" / "off") is never read: its logit counts as 0
    bad = valid & ((labels < 0) | (labels >= vocab))
    safe_labels = torch.where(valid & ~bad, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(z, dim=-1)
    logp_y = logp.gather(-1, safe_labels[:, None]).squeeze(-1)
    logp_y = torch.where(bad, -torch.logsumexp(z, dim=-1), logp_y)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # per-token inputs at ignored positions may hold any filler; keep it out of every gradient
    if old_logprobs is not None:
        old_logprobs = torch.where(valid, old_logprobs.to(logp.dtype), zero)
    if token_weights is not None:
        token_weights = torch.where(valid, token_weights.to(logp.dtype), zero)
    extra = {}
    if ref is not None:
        with torch.no_grad():
            ref_logits = F.linear(*ref)
            ref_logits = ref_logits if ref_logits.dtype == torch.float64 else ref_logits.float()
            extra["ref_logp"] = torch.log_softmax(transform_logits(ref_logits, opts), dim=-1)
    token_loss = member(opts.loss_type).definition(logp_y, logp, opts.params, old_logprobs,
                                                   **extra)  # fmt: skip
    lse = torch.logsumexp(z, dim=-1)
    if opts.label_smoothing > 0:
        uniform_nll = -logp.mean(-1)  # -(1/V) sum_j log p_j
        token_loss = (1 - opts.label_smoothing) * token_loss + opts.label_smoothing * uniform_nll
    if opts.z_loss > 0:
        token_loss = token_loss + opts.z_loss * lse.square()
    if token_weights is not None:
        token_loss = token_loss * token_weights
    if opts.validate == "device":  # a bad label makes its token's loss and gradient NaN
        poison = torch.where(bad, float("nan"), 1.0).to(token_loss.dtype)
        token_loss = token_loss * poison
    token_loss = torch.where(valid, token_loss, zero)
    num_valid = valid.sum()

    if opts.return_stats:
        stat_sums = _stat_sums(z, logp, logp_y, lse, safe_labels, valid)
    else:  # no extra logits-sized temporaries when not asked
        stat_sums = torch.zeros(4, dtype=torch.float32, device=z.device)
    if opts.reduction == "none":
        loss = token_loss
    elif opts.reduction == "sum":
        loss = token_loss.sum()
    else:
        loss = token_loss.sum() / num_valid.clamp(min=1)
    logprobs = torch.where(valid, logp_y.detach(), zero)
    return loss, stat_sums, num_valid, logprobs


@torch.no_grad()
def _stat_sums(z, logp, logp_y, lse, safe_labels, valid):
    """fp32 (4,): sums over valid tokens of -log p_y, entropy, label logit == row max, lse."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # clamp keeps 0 * log 0 = 0 for underflowed probabilities while NaN still propagates
    entropy = -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)
    z_y = z.gather(-1, safe_labels[:, None]).squeeze(-1)
    correct = (z_y >= z.max(-1).values).to(logp.dtype)
    per_token = torch.stack([-logp_y.detach(), entropy, correct, lse], dim=-1)
    return torch.where(valid[:, None], per_token, zero).sum(0).float()


def reference_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    opts: LossOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_linear_logprobs on materialized logits: (log p_y (N,), entropy (N,) or empty), 0 at
    ignored tokens, differentiable through both by autograd (opts.return_stats: the entropy)."""
    vocab = weight.shape[0]
    if opts.validate == "sync":
        labels = checked_labels(labels, None, None, vocab, opts.ignore_index)
    logits = F.linear(hidden, weight, bias)
    if logits.dtype != torch.float64:
        logits = logits.float()
    logp = torch.log_softmax(transform_logits(logits, opts), dim=-1)
    valid = labels != opts.ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    safe = torch.where(valid & ~bad, labels, torch.zeros_like(labels))
    logp_y = logp.gather(-1, safe[:, None]).squeeze(-1)
    if opts.validate == "device":
        logp_y = torch.where(bad, float("nan"), logp_y)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp_y = torch.where(valid, logp_y, zero)
    if not opts.return_stats:
        return logp_y, logp.new_empty((0,))
    entropy = -(logp.exp() * logp).sum(-1)
    return logp_y, torch.where(valid, entropy, zero)
