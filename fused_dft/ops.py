"""The chunked and fused paths as torch.library custom ops, so torch.compile traces through them.

    fused_dft::linear_loss_fwd(hidden (N, D), weight (V, D), bias, labels (N,), token_weights,
                               old_logprobs, options, impl, chunk_size, need)
        -> loss, stat sums (4,), num_valid (), logprobs (N,),        what the caller sees
           dh, dW, db,                                                gradients computed now
           lse (N,), coefs (3, N)                                     or what backward needs
    fused_dft::linear_loss_bwd(grad_loss, hidden, weight, bias, labels, lse, coefs, options, impl,
                               chunk_size, need) -> dh, dW, db

Every output's shape depends only on N, D, V and the (static) arguments, never on the labels'
values, so the fake implementations need no data and a change of N or of the number of ignored
tokens recompiles nothing (with dynamic shapes). Which tensors are real depends on the path:
    chunked, reduction "mean"/"sum": the gradients for an upstream gradient of 1 are computed in
        the forward op (dh, dW, db); backward scales them (6*N*D*V FLOPs in all).
    chunked "none", and fused: per token lse and (a, b, u) (zero at ignored rows); the backward op
        recomputes the logits and applies the upstream gradient (8*N*D*V FLOPs).
    fused_dft::linear_logprobs_fwd(hidden, weight, bias, labels, options, impl, chunk_size)
        -> log p_y (N,), entropy (N,) (or empty), lse (N,)               fused_linear_logprobs
    fused_dft::linear_logprobs_bwd(grad_logp, grad_entropy, hidden, weight, bias, labels,
                                   entropy, lse, options, impl, chunk_size, need) -> dh, dW, db
Unused outputs are empty (0,) tensors. Non-tensor options travel as one string (LossOptions).
Inside the ops the work is opaque to dynamo: with validate="sync" they may read values on the host
(the label check, nonzero) without a graph break; with "device" / "off" they never do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import BACKENDS
from .backends.base import Reference, Saved, acc_dtype
from .driver import (
    BACKWARD_TWICE,
    check_first_order,
    logprobs_backward,
    logprobs_forward,
    path_backward,
    path_forward,
    scale_precomputed,
)
from .options import LossOptions, decode_options, encode_options
from .selection import gather_rows, scatter_rows, select_rows


def _precomputed(opts: LossOptions, impl: str, need) -> bool:
    """Whether the forward op computes the gradients (chunked, mean/sum, a gradient needed)."""
    return BACKENDS[impl].precomputes(opts, need)


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


@torch.library.custom_op("fused_dft::linear_loss_fwd", mutates_args=())
def linear_loss_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    token_weights: Tensor | None,
    old_logprobs: Tensor | None,
    options: str,
    impl: str,
    chunk_size: int,
    need: list[bool],
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    opts = decode_options(options)
    acc, n_rows = acc_dtype(hidden), hidden.shape[0]
    loss, sums, num_valid, logprobs, rows, saved, grads = path_forward(
        hidden, weight, bias, labels, token_weights, old_logprobs, opts, impl, chunk_size or None,
        need, ref=_reference(ref_hidden, ref_weight, ref_bias),
    )  # fmt: skip
    dh, dw, db = grads if grads is not None else (None, None, None)
    lse = coefs = None
    if saved is not None:  # back to the original row order, zero at ignored rows
        lse = scatter_rows(saved.lse.to(acc), rows, n_rows)
        if saved.ref_lse is not None:  # asft: (2, N) = lse, the reference's lse_q
            lse = torch.stack([lse, scatter_rows(saved.ref_lse.to(acc), rows, n_rows)])
        coefs = torch.stack([scatter_rows(c.to(acc), rows, n_rows) for c in saved.coefs])
    return (
        loss, sums, num_valid, logprobs,
        dh if dh is not None else _empty(hidden),
        dw if dw is not None else _empty(hidden, acc),
        db if db is not None else _empty(hidden, acc),
        lse if lse is not None else _empty(hidden, acc),
        coefs if coefs is not None else _empty(hidden, acc),
    )  # fmt: skip


@linear_loss_fwd.register_fake
def _(hidden, weight, bias, labels, token_weights, old_logprobs, options, impl, chunk_size, need,
      ref_hidden=None, ref_weight=None, ref_bias=None):  # fmt: skip
    opts = decode_options(options)
    n_rows, acc = hidden.shape[0], acc_dtype(hidden)
    now = _precomputed(opts, impl, need)
    keep = any(need) and not now
    n_coefs = 3 if ref_hidden is None else 5
    lse_shape = (n_rows,) if ref_hidden is None else (2, n_rows)  # asft: and lse_q
    return (
        hidden.new_empty((n_rows,) if opts.reduction == "none" else (), dtype=acc),
        hidden.new_empty((4,), dtype=torch.float32),
        hidden.new_empty((), dtype=torch.int64),
        hidden.new_empty((n_rows,), dtype=acc),
        hidden.new_empty(hidden.shape) if now and need[0] else _empty(hidden),
        hidden.new_empty(weight.shape, dtype=acc) if now and need[1] else _empty(hidden, acc),
        hidden.new_empty((weight.shape[0],), dtype=acc) if now and need[2] else _empty(hidden, acc),
        hidden.new_empty(lse_shape, dtype=acc) if keep else _empty(hidden, acc),
        hidden.new_empty((n_coefs, n_rows), dtype=acc) if keep else _empty(hidden, acc),
    )


@torch.library.custom_op("fused_dft::linear_loss_bwd", mutates_args=())
def linear_loss_bwd(
    grad_loss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    coefs: Tensor,
    options: str,
    impl: str,
    chunk_size: int,
    need: list[bool],
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    opts = decode_options(options)
    rows = select_rows(labels, opts, None, None, acc_dtype(hidden), weight.shape[0])
    lse, coefs = gather_rows(lse, rows), gather_rows(coefs, rows)
    # lse (n,), or (2, n) = lse and a reference's lse_q (asft)
    saved = Saved(lse, coefs) if lse.dim() == 1 else Saved(lse[0], coefs, lse[1])
    dh, dw, db = path_backward(
        hidden, weight, bias, rows, saved, grad_loss, opts, impl, chunk_size or None, need,
        ref=_reference(ref_hidden, ref_weight, ref_bias),
    )  # fmt: skip
    return (
        dh if dh is not None else _empty(hidden),
        dw if dw is not None else _empty(weight),
        db if db is not None else _empty(weight),
    )


@linear_loss_bwd.register_fake
def _(grad_loss, hidden, weight, bias, labels, lse, coefs, options, impl, chunk_size, need,
      ref_hidden=None, ref_weight=None, ref_bias=None):  # fmt: skip
    return (
        hidden.new_empty(hidden.shape) if need[0] else _empty(hidden),
        weight.new_empty(weight.shape) if need[1] else _empty(weight),
        weight.new_empty((weight.shape[0],)) if need[2] else _empty(weight),
    )


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, _, _, options, impl, chunk_size, need, *ref = inputs
    _, _, _, _, dh, dw, db, lse, coefs = output
    ctx.options, ctx.impl, ctx.chunk_size, ctx.need = options, impl, chunk_size, tuple(need)
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.consumed = False
    # only the loss is differentiable; without this, autograd would hand backward zero-filled
    # gradients shaped like every other output (an fp32 dW-sized buffer among them)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    # the op's extra outputs are data for backward, not part of the graph: saved detached
    if _precomputed(decode_options(options), impl, need):
        ctx.save_for_backward(dh.detach(), dw.detach(), db.detach())
    else:
        ref = [t.detach() if t is not None else None for t in (ref or (None, None, None))]
        ctx.save_for_backward(hidden, weight, bias, labels, lse.detach(), coefs.detach(), *ref)


def _backward(ctx, grad_loss, *_grads_of_other_outputs):
    check_first_order()  # create_graph=True: one clear error, not a gradient without a graph
    need = ctx.need
    if _precomputed(decode_options(ctx.options), ctx.impl, need):
        if ctx.consumed:
            raise RuntimeError(BACKWARD_TWICE)
        ctx.consumed = True
        dh, dw, db = ctx.saved_tensors
        dtypes = (dh.dtype, ctx.weight_dtype, ctx.bias_dtype)
        dh, dw, db = scale_precomputed(
            [g if flag else None for g, flag in zip((dh, dw, db), need)], grad_loss, dtypes
        )
    else:
        hidden, weight, bias, labels, lse, coefs, *ref = ctx.saved_tensors
        dh, dw, db = linear_loss_bwd(
            grad_loss, hidden, weight, bias, labels, lse, coefs,
            ctx.options, ctx.impl, ctx.chunk_size, list(need), *ref,
        )  # fmt: skip
        dh, dw, db = (g if flag else None for g, flag in zip((dh, dw, db), need))
    return dh, dw, db, None, None, None, None, None, None, None, None, None, None


linear_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


def _reference(ref_hidden, ref_weight, ref_bias) -> Reference | None:
    return None if ref_hidden is None else Reference(ref_hidden, ref_weight, ref_bias)


def linear_loss(hidden, weight, bias, labels, token_weights, old_logprobs, opts: LossOptions,
                impl: str, chunk_size: int | None,
                ref: Reference | None = None):  # fmt: skip
    """hidden (N, D), labels (N,); ref: asft's reference model (hidden (N, D_r), head).
    Returns (loss, stat sums (4,), num_valid, logprobs (N,))."""
    grad = torch.is_grad_enabled()
    need = [
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    ]
    out = linear_loss_fwd(
        hidden, weight, bias, labels, token_weights, old_logprobs,
        encode_options(opts), impl, chunk_size or 0, need, *(ref or ()),
    )  # fmt: skip
    loss, sums, num_valid, logprobs = out[:4]
    return loss, sums.detach(), num_valid.detach(), logprobs.detach()


@torch.library.custom_op("fused_dft::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    options: str,
    impl: str,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    opts = decode_options(options)
    return logprobs_forward(hidden, weight, bias, labels, opts, impl, chunk_size or None)


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, options, impl, chunk_size):
    n_rows, acc = hidden.shape[0], acc_dtype(hidden)
    per_token = hidden.new_empty((n_rows,), dtype=acc)
    entropy = hidden.new_empty((n_rows,), dtype=acc)
    if not decode_options(options).return_stats:
        entropy = _empty(hidden, acc)
    return per_token, entropy, hidden.new_empty((n_rows,), dtype=acc)


@torch.library.custom_op("fused_dft::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    entropy: Tensor,
    lse: Tensor,
    options: str,
    impl: str,
    chunk_size: int,
    need: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    dh, dw, db = logprobs_backward(
        hidden, weight, bias, labels, entropy, lse, grad_logp, grad_entropy,
        decode_options(options), impl, chunk_size or None, need,
    )  # fmt: skip
    return (
        dh if dh is not None else _empty(hidden),
        dw if dw is not None else _empty(weight),
        db if db is not None else _empty(weight),
    )


@linear_logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, entropy, lse, options, impl,
      chunk_size, need):  # fmt: skip
    return (
        hidden.new_empty(hidden.shape) if need[0] else _empty(hidden),
        weight.new_empty(weight.shape) if need[1] else _empty(weight),
        weight.new_empty((weight.shape[0],)) if need[2] else _empty(weight),
    )


def _setup_logprobs(ctx, inputs, output):
    hidden, weight, bias, labels, options, impl, chunk_size = inputs
    _, entropy, lse = output
    ctx.options, ctx.impl, ctx.chunk_size = options, impl, chunk_size
    ctx.need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(hidden, weight, bias, labels, entropy.detach(), lse.detach())


def _backward_logprobs(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, entropy, lse = ctx.saved_tensors
    if grad_logp is None and grad_entropy is None:
        return None, None, None, None, None, None, None
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if entropy.numel() == 0:
        grad_entropy = None
    dh, dw, db = linear_logprobs_bwd(
        grad_logp, grad_entropy, hidden, weight, bias, labels, entropy, lse,
        ctx.options, ctx.impl, ctx.chunk_size, list(ctx.need),
    )  # fmt: skip
    dh, dw, db = (g if flag else None for g, flag in zip((dh, dw, db), ctx.need))
    return dh, dw, db, None, None, None, None


linear_logprobs_fwd.register_autograd(_backward_logprobs, setup_context=_setup_logprobs)


def linear_logprobs(hidden, weight, bias, labels, opts: LossOptions, impl: str,
                    chunk_size: int | None):  # fmt: skip
    """hidden (N, D), labels (N,). Returns (log p_y (N,), entropy (N,) or empty), differentiable
    through both."""
    logp, entropy, _ = linear_logprobs_fwd(
        hidden, weight, bias, labels, encode_options(opts), impl, chunk_size or 0
    )
    return logp, entropy
