"""Token selection and reduction shared by the autograd Functions of the chunked and fused paths."""

from __future__ import annotations

import torch

from .options import LossOptions


def select_valid(labels: torch.Tensor, opts: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices of non-ignored tokens, their labels); the only tokens any matmul sees."""
    valid_idx = (labels != opts.ignore_index).nonzero().squeeze(1)
    return valid_idx, labels.index_select(0, valid_idx)


def mean_scale(opts: LossOptions, num_valid: int) -> float:
    """d(reduced loss) / d(token loss): 1 / num_valid for "mean" (0 tokens: 1), else 1."""
    return 1.0 / max(num_valid, 1) if opts.reduction == "mean" else 1.0


def reduce_token_loss(
    token_loss: torch.Tensor, valid_idx: torch.Tensor, num_rows: int, opts: LossOptions
) -> torch.Tensor:
    """token_loss (n,) of the non-ignored tokens -> the loss for opts.reduction; "none" is
    shaped (num_rows,) with 0 at ignored rows, "mean" is 0 when there are no tokens."""
    if opts.reduction == "none":
        return token_loss.new_zeros(num_rows).index_copy_(0, valid_idx, token_loss)
    return token_loss.sum() * mean_scale(opts, token_loss.shape[0])
