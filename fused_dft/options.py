"""Options shared by every implementation, and the statistics they return.

Non-tensor options travel together in one frozen dataclass so that an autograd Function gets a
single hashable argument instead of a long tuple.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The token-reweighted SFT family (weights.py has the formulas).
LOSS_TYPES = ("dft", "ce", "power", "eaft", "psft")
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "reference", "chunked", "fused")

# Each loss_type's own parameters and their defaults; a parameter given for a loss_type that does
# not use it is an error. psft also requires the tensor `old_logprobs`.
FAMILY_PARAMS: dict[str, dict[str, float]] = {
    "ce": {},
    "dft": {},
    "power": {"power_q": 1.0},
    "eaft": {"eaft_alpha": 1.0},
    "psft": {"clip_eps": 0.2},
}
ALL_FAMILY_PARAMS = ("power_q", "eaft_alpha", "clip_eps")


@dataclass(frozen=True)
class LossOptions:
    """What every impl computes, given z = W h (+ b).

    z <- logit_scale * z; if softcap: z <- softcap * tanh(z / softcap)
    lse = logsumexp(z); log p = z_y - lse; H = lse - sum softmax(z) z
    loss_t = w_t * (-log p) with a gradient-stopped per-token weight w_t (weights.py), plus
    z_loss * lse^2, times token_weights[t]; ignored tokens contribute nothing.
    """

    loss_type: str = "dft"
    ignore_index: int = -100
    reduction: str = "mean"
    logit_scale: float = 1.0
    softcap: float | None = None
    return_stats: bool = False
    return_logprobs: bool = False
    power_q: float = 1.0
    eaft_alpha: float = 1.0
    clip_eps: float = 0.2
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    validate: str = "sync"  # validate.py: "sync", "device" or "off"

    @property
    def is_dft(self) -> bool:
        return self.loss_type == "dft"

    @property
    def needs_entropy(self) -> bool:
        """Whether the per-token entropy must be computed (for the weight or for the stats)."""
        return self.return_stats or self.loss_type == "eaft"

    @property
    def needs_logit_sum(self) -> bool:
        """Whether sum_j z_j is needed (label smoothing's uniform term)."""
        return self.label_smoothing > 0


@dataclass(frozen=True)
class LossStats:
    """Detached batch figures over the non-ignored tokens, computed in the same pass as the loss.

    ce: mean plain cross-entropy -log p_y; entropy: mean predictive entropy of softmax(z);
    accuracy: fraction of tokens whose label logit is the row maximum (ties count as correct);
    lse: mean log-sum-exp of the (transformed) logits, what z-loss users watch;
    num_tokens: number of non-ignored tokens. Means are 0 when num_tokens is 0.
    """

    ce: torch.Tensor
    entropy: torch.Tensor
    accuracy: torch.Tensor
    lse: torch.Tensor
    num_tokens: torch.Tensor

    @staticmethod
    def from_sums(sums: torch.Tensor, num_tokens: torch.Tensor) -> LossStats:
        """sums: fp32 (4,) = [sum of -log p_y, of entropy, number correct, sum of lse] over the
        valid tokens."""
        sums = sums.detach().float()
        denom = num_tokens.clamp(min=1).to(sums.dtype)
        means = sums / denom
        return LossStats(
            ce=means[0], entropy=means[1], accuracy=means[2], lse=means[3], num_tokens=num_tokens
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "ce": float(self.ce),
            "entropy": float(self.entropy),
            "accuracy": float(self.accuracy),
            "lse": float(self.lse),
            "num_tokens": int(self.num_tokens),
        }
