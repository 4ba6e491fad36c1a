"""The one interface every backend implements, and the types that cross it.

A backend computes, for the selected tokens (selection.Rows) of one device or one rank's
vocabulary shard (VocabShard), the per-token loss and what backward needs:

    forward(hidden (N, D), weight (V_r, D), bias, rows, opts, need, shard, chunk_size) -> Forward
        token_loss (n,), logp (n,), stat sums (4,) over the tokens, and either
        saved = Saved(lse (n,), coefs (3, n) = (a, b, u)[, ref_lse]) when backward recomputes, or
        grads = (dh, dW, db) for an upstream gradient of 1         when computed now
                (only where `grads_in_forward` and reduction is "mean" / "sum");
    backward(hidden, weight, bias, rows, saved, upstream (n,), opts, need, shard, chunk_size)
        -> (dh (N, D) zero at rows not selected, dW, db), each None where need says so; dW / db in
        the accumulation dtype or the parameter's (the driver casts). coefs may carry a fourth
        row c, the entropy's gradient (dz -= c softmax log_softmax; fused_linear_logprobs).

need = (dh, dW, db) flags; upstream is each selected row's d(loss)/d(token loss) (the mean scale
times grad_output, or grad_output per token for reduction="none"). The coefficients (a, b, u)
and lse come from coefficients.py and partials.py: a backend never knows which loss_type runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import partials as P
from ..options import LossOptions


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class VocabShard(NamedTuple):
    """This rank's slice of a vocab-parallel LM head (None on one device).

    offset: first vocab id of the shard; vocab: the full V; merge: partials (5, n) of the shard
    -> partials of the whole vocabulary (a collective across the ranks, parallel.py); gather:
    any per-token figures (r, n) of the shard -> (P, r, n) of every shard in rank order (one
    all-gather), for what is not the five partials (eaft's top-k values, asft's reference
    partials)."""

    offset: int
    vocab: int
    merge: Callable[[torch.Tensor], torch.Tensor]
    gather: Callable[[torch.Tensor], torch.Tensor]


def reference_lse(ref_part: torch.Tensor, shard: VocabShard | None):
    """(lse_q, cross) per token from asft's reference partials (3, n) of this rank's vocabulary:
    on a vocab-parallel head the ranks' partials are merged first (one all-gather of 3 values a
    token; partials.merge_reference), so lse_q and cross = sum_j q_j (log q_j - z_j) are the whole
    vocabulary's (every backend's kq is taken against its own shard's z, which merges exactly)."""
    if shard is not None:
        ref_part = P.merge_reference(shard.gather(ref_part).transpose(0, 1), dim=1)
    return P.finalize_reference(ref_part)


class Reference(NamedTuple):
    """A reference model's last hidden states (N, D_r) and LM head (V, D_r), bias (V,) or None
    (asft): its logits are recomputed chunk by chunk beside the policy's, never differentiated."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


class Saved(NamedTuple):
    """What backward needs when gradients are not computed in the forward pass: per selected row,
    lse and the coefficients (a, b, u) before the upstream gradient; with a reference (asft)
    coefs are (a, b, u, 0, r) and ref_lse is the reference's lse_q (q = exp(zq - lse_q))."""

    lse: torch.Tensor
    coefs: torch.Tensor
    ref_lse: torch.Tensor | None = None


class Forward(NamedTuple):
    """A backend's forward result for the n selected rows (see the module docstring)."""

    token_loss: torch.Tensor
    logp: torch.Tensor
    sums: torch.Tensor
    saved: Saved | None
    grads: tuple | None
    entropy: torch.Tensor | None = None  # (n,) per token when opts.needs_entropy (0 at non-tokens)


@dataclass(frozen=True)
class Backend:
    """A registered backend (backends/__init__.py): its name and its two functions."""

    name: str
    forward: Callable[..., Forward]
    backward: Callable[..., tuple]
    grads_in_forward: bool = False  # computes the gradients in forward for "mean" / "sum"

    def precomputes(self, opts: LossOptions, need) -> bool:
        """Whether forward returns the gradients (then backward only scales them)."""
        return self.grads_in_forward and opts.reduction != "none" and any(need)


def local_labels(labels: torch.Tensor, shard: VocabShard | None) -> torch.Tensor:
    """Global label ids -> ids within this shard's vocabulary (out of range where not held)."""
    return labels - shard.offset if shard is not None else labels


def full_vocab(weight: torch.Tensor, shard: VocabShard | None) -> int:
    """The whole V (eaft's log V, label smoothing's 1 / V), whatever this rank holds."""
    return shard.vocab if shard is not None else weight.shape[0]
