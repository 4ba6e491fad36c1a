"""`fused-dft bench --loss-type logprobs`: the per-token log-prob op, not a loss of the family.

What RL-style trainers do with per-token log p_y and the entropy H: a policy-gradient loss with
per-token advantages A_t and an entropy bonus beta,
    L = -(1 / n) sum_t valid_t (A_t log p_y(t) + beta H(t)),   n = the valid tokens,
with A_t = cos(0.7 t) (deterministic and the same for any prefix of the tokens, so the error
check on the first tokens is this objective too) and beta = 0.01. The providers:
  naive                   log_softmax of the fp32 logits, gather, -(exp(l) l).sum (verl's
                          logprobs_from_logits + entropy_from_logits, TRL's selective_log_softmax)
  auto / chunked / fused  fused_dft.fused_linear_logprobs with that impl
  reference               fused_linear_logprobs(impl="reference") (materializes the logits)
The float64 truth is the naive op's autograd in float64.
Work: the naive op does 3 GEMMs (2 N D V FLOPs each, every row); fused_linear_logprobs returns
per-token outputs whose upstream gradients are unknown in the forward pass, so its backward
recomputes the logits: 4 GEMMs over the valid rows (8 N D V), against the chunked DFT loss's 3
(it computes the gradients in its forward pass): a floor of 4 / 3 of the loss's time.
"""

from __future__ import annotations

import torch

from .problem import IGNORE_INDEX, LOGPROBS

LOSS_TYPE = LOGPROBS
ENTROPY_BONUS = 0.01


def objective(logp: torch.Tensor, entropy: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L of the module docstring from per-token log p_y and H (0 at ignored tokens)."""
    valid = labels != IGNORE_INDEX
    steps = torch.arange(labels.shape[0], device=labels.device, dtype=torch.float64)
    advantage = torch.cos(0.7 * steps).to(logp.dtype)
    total = torch.where(valid, advantage * logp + ENTROPY_BONUS * entropy, torch.zeros_like(logp))
    return -total.sum() / valid.sum().clamp(min=1)


def naive_logprobs(hidden, weight, labels):
    """(log p_y, H) from the full logits, in the input dtype's GEMM then fp32 (fp64 for fp64)."""
    logits = hidden @ weight.T
    if logits.dtype != torch.float64:
        logits = logits.float()
    log_soft = torch.log_softmax(logits, -1)
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = log_soft.gather(1, safe[:, None]).squeeze(1)
    entropy = -(log_soft.exp() * log_soft).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)


def naive(problem):
    return lambda hidden, weight, labels: objective(*naive_logprobs(hidden, weight, labels), labels)


def fused(impl: str):
    def build(problem):
        from fused_dft import fused_linear_logprobs

        def loss_fn(hidden, weight, labels):
            logp, entropy = fused_linear_logprobs(
                hidden, weight, labels, ignore_index=IGNORE_INDEX, impl=impl
            )
            return objective(logp, entropy, labels)

        return loss_fn

    return build


def reference_float64(hidden, weight, labels):
    """(L, dh, dW, None) in float64 from the naive op."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    loss = objective(*naive_logprobs(h, w, labels), labels)
    loss.backward()
    return loss.detach(), h.grad, w.grad, None
