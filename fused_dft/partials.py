"""Per-token statistics of one vocabulary range, and how the ranges' statistics merge.

Every backend reduces a token's logits z (after logit_scale / softcap) over a range of the
vocabulary (a vocab tile of a kernel, a vocab split, a rank's shard) to five numbers:

    m = max_j z_j                          s = sum_j exp(z_j - m)
    t = sum_j exp(z_j - m) (z_j - m)       z_y = z at the label (0 if the label is not in range)
    sum_z = sum_j z_j                      (only needed for label smoothing; 0 otherwise)

Two ranges merge exactly (the online log-sum-exp): with M = max(m1, m2), a_k = exp(m_k - M),
    s = a1 s1 + a2 s2,   t = a1 (t1 + (m1 - M) s1) + a2 (t2 + (m2 - M) s2),
    z_y = z_y1 + z_y2,   sum_z = sum_z1 + sum_z2.
Keeping t relative to the running max avoids the cancellation of sum e z - m sum e at |z| >> 1.
From the whole vocabulary:
    lse = m + log s,  log p_y = z_y - lse,  entropy H = lse - E[z] = log s - t / s,
    correct = (z_y >= m) (the label logit is the maximum; ties count as correct).
One figure is not a merge of partials: the entropy of the k largest logits renormalized among
themselves (eaft's top-k form), which the backends compute from the k values of a row (topk_entropy)
and add to TokenStats; it is gradient-stopped, so only the forward pass needs it. Ranges merge it
through their values: the top k of a row is the top k of the ranges' top k's.

asft's KL(q || p) = sum_j q_j (log q_j - log p_j), q = softmax(zq) the reference model's, has
three partials of its own over a range (the Triton kernels stream them beside the policy's, with
the policy's z of the same tile):
    mq = max_j zq_j      sq = sum_j exp(zq_j - mq)      kq = sum_j exp(zq_j - mq) (zq_j - z_j)
Two ranges merge like the online log-sum-exp: with M = max(mq1, mq2), a_k = exp(mq_k - M),
    sq = a1 sq1 + a2 sq2,   kq = a1 kq1 + a2 kq2        (zq - z does not depend on the max).
From the whole vocabulary: lse_q = mq + log sq and
    cross = sum_j q_j (log q_j - z_j) = kq / sq - lse_q,   KL(q || p) = cross + lse.
The torch row ops compute the same three partials by row blocks (rows_torch.reference_partials_).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# row order of a partials tensor (5, ...)
M, S, T, ZY, SUMZ = range(5)
NUM_PARTIALS = 5
# row order of a reference partials tensor (3, ...) (asft)
MQ, SQ, KQ = range(3)
NUM_REF_PARTIALS = 3


class TokenStats(NamedTuple):
    """Per-token figures over the whole vocabulary (fp32 or fp64), from finalize()."""

    lse: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    correct: torch.Tensor
    sum_z: torch.Tensor
    topk_entropy: torch.Tensor | None = None  # entropy of the top-k logits, when a member asks
    kl: torch.Tensor | None = None  # KL(reference || policy), when a member has a reference


def topk_entropy(values: torch.Tensor) -> torch.Tensor:
    """values (n, k): the k largest logits of each row -> (n,) the entropy of their softmax,
    H_k = -sum_i q_i log q_i with log q_i = v_i - logsumexp(v), computed in values' dtype."""
    log_q = values - values.logsumexp(-1, keepdim=True)
    return -(log_q.exp() * log_q).sum(-1)


def merge(part: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """part (5, ..., k, ...) partials of k disjoint ranges along `dim` -> (5, ...) merged."""
    m_k, s_k, t_k, zy_k, sumz_k = part.unbind(0)
    dim = dim - 1 if dim > 0 else dim  # dims of the unbound planes
    m = m_k.amax(dim, keepdim=True)
    # a range whose max is -inf has s = t = 0; shift it by 0 so exp(-inf - -inf) never appears
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    shift = m_k - m_safe
    a_k = torch.exp(shift)
    s = (a_k * s_k).sum(dim)
    t = (a_k * (t_k + torch.where(s_k > 0, shift, torch.zeros_like(shift)) * s_k)).sum(dim)
    return torch.stack([m.squeeze(dim), s, t, zy_k.sum(dim), sumz_k.sum(dim)])


def finalize(part: torch.Tensor) -> TokenStats:
    """part (5, n) over the whole vocabulary -> TokenStats of the n tokens."""
    m, s, t, z_y, sum_z = part.unbind(0)
    log_s = s.log()
    lse = m + log_s
    return TokenStats(
        lse=lse,
        logp=z_y - lse,
        entropy=log_s - t / s,
        correct=(z_y >= m).to(part.dtype),
        sum_z=sum_z,
    )


def merge_reference(part: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """part (3, ..., k, ...) reference partials (mq, sq, kq) of k disjoint ranges along `dim` ->
    (3, ...) merged: sq and kq rescaled by exp(mq_k - M), M the largest mq."""
    mq_k, sq_k, kq_k = part.unbind(0)
    dim = dim - 1 if dim > 0 else dim
    mq = mq_k.amax(dim, keepdim=True)
    # a range with no finite reference logit has sq = kq = 0: never exp(-inf - -inf)
    a_k = torch.exp(mq_k - torch.where(torch.isfinite(mq), mq, torch.zeros_like(mq)))
    return torch.stack([mq.squeeze(dim), (a_k * sq_k).sum(dim), (a_k * kq_k).sum(dim)])


def finalize_reference(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """part (3, n) over the whole vocabulary -> (lse_q, cross) of the n tokens:
    lse_q = mq + log sq (the reference's log-sum-exp, which the backward's q = exp(zq - lse_q)
    needs) and cross = sum_j q_j (log q_j - z_j) = kq / sq - lse_q (KL(q || p) = cross + lse)."""
    mq, sq, kq = part.unbind(0)
    lse_q = mq + sq.log()
    return lse_q, kq / sq - lse_q
