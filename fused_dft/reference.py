"""The plain-torch definition of the loss: materializes all logits. The oracle of the tests.

Logits are computed with F.linear in the input dtype (as a model's lm_head does) and upcast to
fp32 (float64 inputs stay float64); everything after that is in that precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, D), weight (V, D), labels (N,), bias (V,) or None.

    Returns (loss reduced per opts.reduction, stat sums fp32 (3,), number of valid tokens).
    Differentiable through torch autograd.
    """
    logits = F.linear(hidden, weight, bias)
    if logits.dtype != torch.float64:
        logits = logits.float()
    z = transform_logits(logits, opts)
    valid = labels != opts.ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(z, dim=-1)
    logp_y = logp.gather(-1, safe_labels[:, None]).squeeze(-1)
    if opts.is_dft:
        token_loss = -logp_y.detach().exp() * logp_y
    else:
        token_loss = -logp_y
    zero = torch.zeros((), dtype=token_loss.dtype, device=token_loss.device)
    token_loss = torch.where(valid, token_loss, zero)
    num_valid = valid.sum()

    if not opts.return_stats:
        stat_sums = torch.zeros(3, dtype=torch.float32, device=z.device)
    else:
        stat_sums = _stat_sums(z, logp, logp_y, safe_labels, valid)
    if opts.reduction == "none":
        loss = token_loss
    elif opts.reduction == "sum":
        loss = token_loss.sum()
    else:
        loss = token_loss.sum() / num_valid.clamp(min=1)
    return loss, stat_sums, num_valid


@torch.no_grad()
def _stat_sums(z, logp, logp_y, safe_labels, valid):
    """fp32 (3,): sums over valid tokens of -log p_y, entropy, and label logit == row max."""
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # clamp keeps 0 * log 0 = 0 for underflowed probabilities while NaN still propagates
    entropy = -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)
    z_y = z.gather(-1, safe_labels[:, None]).squeeze(-1)
    correct = (z_y >= z.max(-1).values).to(logp.dtype)
    per_token = torch.stack([-logp_y.detach(), entropy, correct], dim=-1)
    return torch.where(valid[:, None], per_token, zero).sum(0).float()
