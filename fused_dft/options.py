"""Options shared by every implementation, and the statistics they return.

Non-tensor options travel together in one frozen dataclass so that an autograd Function gets a
single hashable argument instead of a long tuple.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("dft", "ce")
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "reference", "chunked", "fused")


@dataclass(frozen=True)
class LossOptions:
    """What every impl computes, given z = W h (+ b).

    z <- logit_scale * z; if softcap: z <- softcap * tanh(z / softcap)
    lse = logsumexp(z); log p = z_y - lse
    loss_t = -log p (ce) or -sg(p) * log p (dft); ignored tokens contribute nothing.
    """

    loss_type: str = "dft"
    ignore_index: int = -100
    reduction: str = "mean"
    logit_scale: float = 1.0
    softcap: float | None = None
    return_stats: bool = False

    @property
    def is_dft(self) -> bool:
        return self.loss_type == "dft"


@dataclass(frozen=True)
class LossStats:
    """Detached batch figures over the non-ignored tokens, computed in the same pass as the loss.

    ce: mean plain cross-entropy -log p_y; entropy: mean predictive entropy of softmax(z);
    accuracy: fraction of tokens whose label logit is the row maximum (ties count as correct);
    num_tokens: number of non-ignored tokens. Means are 0 when num_tokens is 0.
    """

    ce: torch.Tensor
    entropy: torch.Tensor
    accuracy: torch.Tensor
    num_tokens: torch.Tensor

    @staticmethod
    def from_sums(sums: torch.Tensor, num_tokens: torch.Tensor) -> LossStats:
        """sums: fp32 (3,) = [sum of -log p_y, sum of entropy, number correct] over valid tokens."""
        sums = sums.detach().float()
        denom = num_tokens.clamp(min=1).to(sums.dtype)
        means = sums / denom
        return LossStats(ce=means[0], entropy=means[1], accuracy=means[2], num_tokens=num_tokens)

    def as_dict(self) -> dict[str, float]:
        return {
            "ce": float(self.ce),
            "entropy": float(self.entropy),
            "accuracy": float(self.accuracy),
            "num_tokens": int(self.num_tokens),
        }
