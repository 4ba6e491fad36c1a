"""The path of one call, shared by the custom ops (ops.py, one device) and the vocab-parallel
Function (parallel.py, one rank's shard): check values, select rows, run a backend, reduce.

    forward:  check_values (validate="sync")   arguments.py: bad labels raise before any compute
              select_rows                      selection.py: the tokens the matmuls see
              backend.forward                  backends/: partials -> (loss, a, b, u) per token
              reduce_token_loss                mean / sum / none back over the N rows
    backward: upstream per row = grad_output x mean scale (or per token for "none")
              backend.backward                 dz = a softmax - b onehot - u, then dh, dW, db
              gradients in the parameters' dtypes
A backend that computed the gradients in its forward pass (chunked, "mean" / "sum") is not run
again: backward scales what it returned while casting it to the parameters' dtypes
(scale_precomputed), one pass.
fused_linear_logprobs takes the same steps (logprobs_forward / logprobs_backward) with per-token
outputs log p_y and H: forward keeps lse and H, backward turns the two upstream gradients into
(a, b, u, c) (coefficients.logprob_coefficients) and runs the backend's backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .arguments import check_label_range, check_values
from .backends import BACKENDS
from .backends.base import Reference, Saved, VocabShard, acc_dtype, full_vocab
from .coefficients import logprob_coefficients
from .options import LossOptions
from .selection import (
    Rows,
    gather_rows,
    mean_scale,
    reduce_token_loss,
    scatter_rows,
    select_rows,
)

BACKWARD_TWICE = (
    "fused_dft: backward through the same graph twice is not supported with "
    "reduction='mean'/'sum' (gradients are computed in the forward pass and consumed); use "
    "reduction='none' or recompute the loss"
)

DOUBLE_BACKWARD = (
    "fused_dft: second-order gradients (torch.autograd.grad(..., create_graph=True), a double "
    "backward such as a gradient penalty) are not supported by impl='auto', 'chunked' or 'fused': "
    "their backward is not differentiable; use impl='reference', which supports them"
)


def check_first_order() -> None:
    """Raise DOUBLE_BACKWARD in a backward that autograd would differentiate again: grad mode is
    on inside backward exactly when create_graph=True (the engine sets it so). Under
    torch.compile's tracing of the backward the check is left to the compiled graph."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(DOUBLE_BACKWARD)


class PathForward(NamedTuple):
    """loss (reduced), stat sums (4,), num_valid, log p_y (N,) in the caller's row order; and for
    backward the selected rows with the backend's Saved or its precomputed gradients."""

    loss: torch.Tensor
    sums: torch.Tensor
    num_valid: torch.Tensor
    logprobs: torch.Tensor
    rows: Rows
    saved: Saved | None
    grads: tuple | None


def path_forward(hidden, weight, bias, labels, token_weights, old_logprobs, opts: LossOptions,
                 impl: str, chunk_size: int | None, need,
                 shard: VocabShard | None = None,
                 ref: Reference | None = None) -> PathForward:  # fmt: skip
    """hidden (N, D), labels (N,) global ids; need = (dh, dW, db); impl: a name in BACKENDS;
    ref: the reference model's hidden states and head (asft; every backend, no vocab shard).
    With validate="sync" the value checks run first, before any compute."""
    vocab = shard.vocab if shard is not None else weight.shape[0]
    if opts.validate == "sync":
        check_values(labels, vocab, opts, token_weights, old_logprobs)
    rows = select_rows(labels, opts, token_weights, old_logprobs, acc_dtype(hidden), vocab)
    out = BACKENDS[impl].forward(hidden, weight, bias, rows, opts, need, shard, chunk_size,
                                 **_with_ref(ref))  # fmt: skip
    n_rows = hidden.shape[0]
    loss = reduce_token_loss(out.token_loss, rows, n_rows, opts)
    logprobs = scatter_rows(out.logp, rows, n_rows)
    return PathForward(loss, out.sums, rows.num_valid, logprobs, rows, out.saved, out.grads)


def path_backward(hidden, weight, bias, rows: Rows, saved: Saved, grad_loss, opts: LossOptions,
                  impl: str, chunk_size: int | None, need,
                  shard: VocabShard | None = None,
                  ref: Reference | None = None):  # fmt: skip
    """(dh (N, D), dW, db) from Saved (per selected row) and the upstream gradient of the loss,
    in the parameters' dtypes; None where not needed."""
    acc = acc_dtype(hidden)
    if opts.reduction == "none":
        upstream = grad_loss.to(acc).index_select(0, rows.idx)
    else:
        upstream = (grad_loss.to(acc) * mean_scale(opts, rows, acc)).expand(rows.n)
    grads = BACKENDS[impl].backward(
        hidden, weight, bias, rows, saved, upstream, opts, need, shard, chunk_size,
        **_with_ref(ref),
    )  # fmt: skip
    return cast_grads(grads, weight, bias)


def _with_ref(ref: Reference | None) -> dict:
    """The backend's ref keyword, only when there is one (backends without it never see it)."""
    return {} if ref is None else {"ref": ref}


def cast_grads(grads, weight, bias):
    """(dh, dW, db) with dW / db in the weight's / bias's dtype (they accumulate in fp32)."""
    dh, dw, db = grads
    dw = dw.to(weight.dtype) if dw is not None else None
    db = db.to(bias.dtype) if db is not None else None
    return dh, dw, db


def scale_precomputed(grads, grad_loss, dtypes):
    """Precomputed gradients (for an upstream gradient of 1) times the upstream scalar, each
    returned in its dtype in `dtypes` (dh's, the weight's, the bias's; None: not needed).

    The product is in fp32 (a bf16 dh is rounded once, not scaled by a bf16-rounded factor).
    Where the dtype differs from the accumulator's (a bf16 weight's fp32 dW) the scale rides on
    the cast: torch.mul(g, factor, out=<bf16>) reads the fp32 dW once and writes the bf16 dW once,
    4 + 2 bytes an element. A scale pass then a cast pass moved 4 + 4 + 4 + 2: at V x D =
    128256 x 4096, 7.4 GB (2.2 ms at 3.35 TB/s) became 3.2 GB (0.94 ms), and an upstream of 1
    costs nothing beyond the cast every path needs (on CUDA, checking for 1 would be a sync).
    Same dtype (fp32 weights, dh): in place, skipped on the CPU when the upstream is 1 (a free
    check there). Out of place where torch.compile traces the backward."""
    factor = grad_loss.double() if grad_loss.dtype == torch.float64 else grad_loss.float()
    compiling = torch.compiler.is_compiling()
    is_one = not compiling and grad_loss.device.type == "cpu" and bool(grad_loss == 1)
    out = []
    for g, dtype in zip(grads, dtypes):
        if g is None or dtype is None:
            out.append(None)
        elif compiling:
            out.append((g * factor).to(dtype))
        elif g.dtype != dtype:
            out.append(g.to(dtype) if is_one else torch.mul(g, factor, out=_empty_as(g, dtype)))
        else:
            out.append(g if is_one else g.mul_(factor))
    return tuple(out)


def _empty_as(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(g.shape, dtype=dtype, device=g.device)


def logprobs_forward(hidden, weight, bias, labels, opts: LossOptions, impl: str,
                     chunk_size: int | None, shard: VocabShard | None = None):  # fmt: skip
    """hidden (N, D), labels (N,) global ids; opts: reduction "none", return_stats when the
    entropy is wanted; shard: this rank's vocabulary shard (parallel.py) or None. Returns
    (log p_y, entropy or an empty tensor, lse), each (N,) in the accumulation dtype and 0 at
    ignored rows, over the whole vocabulary."""
    vocab = full_vocab(weight, shard)
    if opts.validate == "sync":
        check_label_range(labels, vocab, opts.ignore_index)
    acc, n_rows = acc_dtype(hidden), hidden.shape[0]
    rows = select_rows(labels, opts, None, None, acc, vocab)
    out = BACKENDS[impl].forward(hidden, weight, bias, rows, opts, (True, False, False), shard,
                                 chunk_size)  # fmt: skip
    logp = out.logp
    if rows.bad is not None:  # validate="device": a bad label's log-prob is NaN
        logp = torch.where(rows.bad, torch.full_like(logp, float("nan")), logp)
    entropy = out.entropy if out.entropy is not None else hidden.new_empty((0,), dtype=acc)
    if entropy.numel():
        entropy = scatter_rows(entropy, rows, n_rows)
    lse = scatter_rows(out.saved.lse.to(acc), rows, n_rows)
    return scatter_rows(logp, rows, n_rows), entropy, lse


def logprobs_backward(hidden, weight, bias, labels, entropy, lse, grad_logp, grad_entropy,
                      opts: LossOptions, impl: str, chunk_size: int | None, need,
                      shard: VocabShard | None = None):  # fmt: skip
    """(dh, dW, db) of sum_t (g_l[t] log p_y[t] + g_H[t] H[t]) from the forward's lse and H
    (N,); grad_entropy None when the entropy was not returned or got no gradient. shard: as in
    logprobs_forward (dh is then this shard's term)."""
    acc = acc_dtype(hidden)
    rows = select_rows(labels, opts, None, None, acc, full_vocab(weight, shard))

    def pick(t):
        t = gather_rows(t.to(acc), rows)
        return t if rows.valid is None else torch.where(rows.valid, t, torch.zeros_like(t))

    coefs = logprob_coefficients(
        pick(entropy) if grad_entropy is not None else None,
        pick(grad_logp),
        pick(grad_entropy) if grad_entropy is not None else None,
    )
    saved = Saved(gather_rows(lse, rows), coefs)
    upstream = torch.ones(rows.n, dtype=acc, device=hidden.device)
    grads = BACKENDS[impl].backward(
        hidden, weight, bias, rows, saved, upstream, opts, need, shard, chunk_size
    )
    return cast_grads(grads, weight, bias)
