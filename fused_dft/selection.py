"""Which tokens the backends see (Rows), and the reduction of their losses back to the caller's.

How rows are selected is decided here (exact_selection), apart from how label values are checked
(validate=, arguments.py):
  exact  the non-ignored rows, found with nonzero(): one host read of their count. Every selected
         row is a token, so ignored tokens cost no matmul at all. Used with validate="sync"
         (whose value check reads the host anyway) and on CUDA whatever validate is, unless a host
         read must not happen now (host_read_forbidden: the current stream is being captured into
         a CUDA graph, or torch.cuda.set_sync_debug_mode asks to hear of syncs).
  static all N rows, the non-ignored ones moved to the front by a stable sort on the device;
         num_valid stays on the device. No host read and shapes that depend only on N (CUDA graph
         capture). Rows past num_valid are masked out of every result; kernels that read
         num_valid skip them, torch matmuls still multiply them. Used under capture, and on the
         CPU with validate="device" / "off" (chosen there only to run the sync-free path).
Cost of exact on CUDA: one device-to-host sync per call (microseconds; the launch queue drains
once). What it saves: the matmuls of the ignored rows, 6 * N_ignored * D * V FLOPs; at 16384 x
4096 x 128256 with 30% ignored, 6 * 4915 * 4096 * 128256 = 1.55e13 FLOPs, expected ~22 ms per
step at 700 TFLOP/s (an H100's bf16 GEMM rate; bench/README.md).
Under torch.compile the read happens inside the custom op (ops.py), so it breaks no graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .coefficients import TokenTerms
from .options import LossOptions
from .partials import TokenStats


class Rows(NamedTuple):
    """The tokens the matmuls see: rows of hidden, in the order they are processed."""

    idx: torch.Tensor  # (n,) int64 rows of the flattened hidden
    labels: torch.Tensor  # (n,) int64; -1 where there is no label to read (masked or bad rows)
    valid: torch.Tensor | None  # (n,) bool, or None when every selected row is a token
    bad: torch.Tensor | None  # (n,) bool: out-of-range labels under validate="device", or None
    token_weights: torch.Tensor | None  # (n,) in the accumulation dtype, or None
    old_logprobs: torch.Tensor | None  # (n,) in the accumulation dtype, or None
    num_valid: torch.Tensor  # () int64 on the device: the number of non-ignored tokens

    @property
    def n(self) -> int:
        return self.idx.shape[0]


def host_read_forbidden(device: torch.device) -> bool:
    """Whether reading one value on the host must not happen now on this CUDA device: the current
    stream is being captured into a CUDA graph (a sync would fail the capture), or the user asked
    torch.cuda.set_sync_debug_mode to warn about or refuse syncs."""
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        capturing = torch.cuda.is_current_stream_capturing()
    return capturing or torch.cuda.get_sync_debug_mode() != 0


def host_read_allowed(device: torch.device) -> bool:
    """Whether the selection may read its count on the host: on CUDA unless host_read_forbidden;
    elsewhere no (validate="device" / "off" on the CPU run the static path they were chosen for)."""
    return device.type == "cuda" and not host_read_forbidden(device)


def exact_selection(opts: LossOptions, device: torch.device) -> bool:
    """True: select the non-ignored rows exactly (one host read); False: the static selection.
    validate="sync" reads the host anyway; otherwise host_read_allowed decides."""
    return opts.validate == "sync" or host_read_allowed(device)


def select_rows(
    labels: torch.Tensor,
    opts: LossOptions,
    token_weights: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    acc_dtype: torch.dtype,
    vocab: int,
) -> Rows:
    """labels (N,); token_weights / old_logprobs (N,) or None.

    exact_selection: the non-ignored rows only (one host read on CUDA); else all rows,
    non-ignored first. A label outside [0, vocab) becomes -1 (never read); with
    validate="device" its token's loss and gradient become NaN, with "off" it is treated as
    absent (either selection).
    """
    valid = labels != opts.ignore_index
    if exact_selection(opts, labels.device):
        idx = valid.nonzero().squeeze(1)
        row_valid = None
    else:
        idx = torch.sort((~valid).to(torch.uint8), stable=True).indices
        row_valid = valid.index_select(0, idx)
    y = labels.index_select(0, idx)
    outside = (y < 0) | (y >= vocab)
    if row_valid is not None:
        outside = outside & row_valid
    bad = outside if opts.validate == "device" else None
    drop = outside if row_valid is None else outside | ~row_valid
    y = torch.where(drop, torch.full_like(y, -1), y)

    def pick(t):
        return None if t is None else t.reshape(-1).index_select(0, idx).to(acc_dtype)

    return Rows(
        idx=idx,
        labels=y,
        valid=row_valid,
        bad=bad,
        token_weights=pick(token_weights),
        old_logprobs=pick(old_logprobs),
        num_valid=valid.sum(),
    )


def chunk_of(rows: Rows, start: int, stop: int) -> Rows:
    """The rows [start, stop) of a selection (num_valid is the whole selection's)."""

    def cut(t):
        return None if t is None else t[start:stop]

    return Rows(
        idx=rows.idx[start:stop],
        labels=rows.labels[start:stop],
        valid=cut(rows.valid),
        bad=cut(rows.bad),
        token_weights=cut(rows.token_weights),
        old_logprobs=cut(rows.old_logprobs),
        num_valid=rows.num_valid,
    )


def mask_terms(terms: TokenTerms, rows: Rows) -> TokenTerms:
    """Zero every term of the rows that are not tokens; NaN for bad labels (validate="device")."""
    if rows.valid is not None:
        terms = TokenTerms(*(None if t is None else torch.where(rows.valid, t, torch.zeros_like(t))
                             for t in terms))  # fmt: skip
    if rows.bad is not None:
        terms = TokenTerms(*(None if t is None else
                             torch.where(rows.bad, torch.full_like(t, float("nan")), t)
                             for t in terms))  # fmt: skip
    return terms


def stat_sums(stats: TokenStats, rows: Rows) -> torch.Tensor:
    """fp32 (4,): sums over the tokens of -log p_y, entropy, correct, lse (LossStats)."""
    per_token = torch.stack([-stats.logp, stats.entropy, stats.correct, stats.lse])
    if rows.valid is not None:
        per_token = torch.where(rows.valid, per_token, torch.zeros_like(per_token))
    return per_token.sum(1).float()


def token_logprobs(stats: TokenStats, rows: Rows) -> torch.Tensor:
    """log p_y of the selected rows, 0 where a row is not a token."""
    if rows.valid is None:
        return stats.logp
    return torch.where(rows.valid, stats.logp, torch.zeros_like(stats.logp))


def token_entropy(stats: TokenStats, rows: Rows) -> torch.Tensor:
    """The entropy of the selected rows, 0 where a row is not a token."""
    if rows.valid is None:
        return stats.entropy
    return torch.where(rows.valid, stats.entropy, torch.zeros_like(stats.entropy))


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
    """token_loss (n,) of the selected rows (0 at non-tokens) -> the loss for opts.reduction;
    "none" is shaped (num_rows,) with 0 at ignored rows, "mean" is 0 when there are no tokens."""
    if opts.reduction == "none":
        return scatter_rows(token_loss, rows, num_rows)
    return token_loss.sum() * mean_scale(opts, rows, token_loss.dtype)


def scatter_rows(values: torch.Tensor, rows: Rows, num_rows: int) -> torch.Tensor:
    """values (n,) of the selected rows -> (num_rows,) in the original row order, 0 elsewhere."""
    return values.new_zeros(num_rows).index_copy_(0, rows.idx, values)


def gather_rows(values: torch.Tensor, rows: Rows) -> torch.Tensor:
    """(..., num_rows) in the original row order -> (..., n) of the selected rows."""
    return values.index_select(-1, rows.idx)
