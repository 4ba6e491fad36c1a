"""Token selection and reduction shared by the chunked and fused paths."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .options import LossOptions


class Rows(NamedTuple):
    """The tokens the matmuls see: rows of hidden that are non-ignored tokens, and theirs."""

    idx: torch.Tensor  # (n,) int64 rows of the flattened hidden
    labels: torch.Tensor  # (n,) int64 in [0, V)
    token_weights: torch.Tensor | None  # (n,) fp32 / fp64, or None
    old_logprobs: torch.Tensor | None  # (n,) fp32 / fp64, or None
    num_valid: torch.Tensor  # () int64 on the device: n

    @property
    def n(self) -> int:
        return self.idx.shape[0]


def select_rows(
    labels: torch.Tensor,
    opts: LossOptions,
    token_weights: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    acc_dtype: torch.dtype,
) -> Rows:
    """labels (N,); token_weights / old_logprobs (N,) or None. Ignored tokens are dropped here,
    before any matmul."""
    valid = labels != opts.ignore_index
    idx = valid.nonzero().squeeze(1)

    def pick(t):
        return None if t is None else t.reshape(-1).index_select(0, idx).to(acc_dtype)

    return Rows(
        idx=idx,
        labels=labels.index_select(0, idx),
        token_weights=pick(token_weights),
        old_logprobs=pick(old_logprobs),
        num_valid=valid.sum(),
    )


def mean_scale(opts: LossOptions, rows: Rows, dtype: torch.dtype) -> torch.Tensor:
    """d(reduced loss) / d(token loss) as a device scalar: 1 / num_valid for "mean" (1 when
    there are no tokens), else 1."""
    one = torch.ones((), dtype=dtype, device=rows.idx.device)
    if opts.reduction != "mean":
        return one
    return one / rows.num_valid.clamp(min=1).to(dtype)


def reduce_token_loss(
    token_loss: torch.Tensor, rows: Rows, num_rows: int, opts: LossOptions
) -> torch.Tensor:
    """token_loss (n,) of the selected tokens -> the loss for opts.reduction; "none" is shaped
    (num_rows,) with 0 at ignored rows, "mean" is 0 when there are no tokens."""
    if opts.reduction == "none":
        return scatter_rows(token_loss, rows, num_rows)
    return token_loss.sum() * mean_scale(opts, rows, token_loss.dtype)


def scatter_rows(values: torch.Tensor, rows: Rows, num_rows: int) -> torch.Tensor:
    """values (n,) of the selected tokens -> (num_rows,) with 0 at the other rows."""
    return values.new_zeros(num_rows).index_copy_(0, rows.idx, values)
