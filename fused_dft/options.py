"""Options shared by every implementation, and the statistics they return.

Non-tensor options travel together in one frozen dataclass (built and checked by
arguments.make_options): the vocab-parallel autograd Function takes it as one argument, and the
custom ops (ops.py) take it encoded as one string (encode_options / decode_options).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from dataclasses import dataclass

import torch

from .family import member


@dataclass(frozen=True)
class LossOptions:
    """What every impl computes, given z = W h (+ b).

    z <- logit_scale * z; if softcap: z <- softcap * tanh(z / softcap)
    lse = logsumexp(z); log p = z_y - lse; H = lse - sum softmax(z) z
    loss_t = w_t * (-log p) with a gradient-stopped per-token weight w_t (the loss_type's record
    in family.py, with its parameters in family_params), plus z_loss * lse^2, times
    token_weights[t]; ignored tokens contribute nothing. Built and checked by
    arguments.make_options.
    """

    loss_type: str = "dft"
    ignore_index: int = -100
    reduction: str = "mean"
    logit_scale: float = 1.0
    softcap: float | None = None
    return_stats: bool = False
    return_logprobs: bool = False
    family_params: tuple[tuple[str, float], ...] = ()  # (name, value) of the loss_type's params
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    validate: str = "sync"  # arguments.py: "sync", "device" or "off"

    @property
    def params(self) -> dict[str, float]:
        """The loss_type's parameters by name."""
        return dict(self.family_params)

    @property
    def needs_entropy(self) -> bool:
        """Whether the per-token entropy must be computed (for the weight or for the stats)."""
        return self.return_stats or member(self.loss_type).reads_entropy(self.params)

    @property
    def needs_logit_sum(self) -> bool:
        """Whether sum_j z_j is needed (label smoothing's uniform term)."""
        return self.label_smoothing > 0


def encode_options(opts: LossOptions) -> str:
    """LossOptions as one string (a torch custom op's non-tensor argument)."""
    return repr(dataclasses.astuple(opts))


@functools.lru_cache(maxsize=256)
def decode_options(text: str) -> LossOptions:
    return LossOptions(*ast.literal_eval(text))


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
