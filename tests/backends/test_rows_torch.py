"""The torch row ops of the chunked CPU path that work by blocks: eaft's blocked top-k selection
and the row-block passes (entropy partial, asft's reference partials, the entropy's gradient),
each against float64 formulas written here, with blocks small enough that a chunk spans several."""

from __future__ import annotations

import pytest
import torch

from fused_dft.backends import rows_torch
from fused_dft.options import LossOptions

from ..helpers import assert_close

# 25 blocks of 256 columns and a 77-column tail: k up to 24 takes the blocked selection
N, V = 13, 256 * 25 + 77


@pytest.fixture
def small_blocks(monkeypatch):
    """Row blocks of 5 rows, so the 13 rows below span three (the last one short)."""
    monkeypatch.setattr(rows_torch, "_MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(rows_torch, "_BLOCK_ELEMENTS", 5 * V)


# k = 1, 20 (LLaMA-Factory's), 24 (one block fewer than the 25 whole blocks)
@pytest.mark.parametrize("k", [1, 20, 24])
def test_blocked_topk_equals_torch_topk(k):
    torch.manual_seed(k)
    x = (torch.randn(N, V) * 4).round() / 4  # many ties
    x[0, :256] = 10.0  # one block holding more than k of the top values, all tied
    x[1, -77:] += 20.0  # the top values in the tail
    x[2, ::3] = float("-inf")  # masked vocabulary entries
    x[3] = 0.0  # every value tied
    x[4:8] = torch.randn(4, V)  # distinct values: the top k spread over k different blocks
    got = rows_torch._topk_blocked(x, k)
    want = x.topk(k, dim=1).values
    assert torch.equal(got, want), (got - want).abs().max()


def test_topk_values_pad_a_shard_narrower_than_k():
    x = torch.randn(4, 7, dtype=torch.float64)
    values = rows_torch.rows_topk_values(x, 10, LossOptions())
    assert torch.equal(values[:, :7], x.sort(1, descending=True).values)
    assert bool(torch.isneginf(values[:, 7:]).all())


def test_reference_partials_by_blocks(small_blocks):
    torch.manual_seed(0)
    z = torch.randn(N, V, dtype=torch.float64) * 3
    xr = torch.randn(N, V, dtype=torch.float64) * 3
    zq = xr.clone()
    part = rows_torch.reference_partials_(xr, z, LossOptions())
    mq = zq.amax(1)
    e = torch.exp(zq - mq[:, None])
    assert torch.equal(xr, zq)  # left holding zq (no transform here)
    assert_close(part[0], mq, "mq", rtol=1e-13)
    assert_close(part[1], e.sum(1), "sq", rtol=1e-13)
    assert_close(part[2], (e * (zq - z)).sum(1), "kq", rtol=1e-11, atol_frac=1e-12)


def test_entropy_gradient_term_by_blocks(small_blocks):
    """dz = (a - c l) p - b onehot with l = z - lse, p = exp(l), written over the logits (u is
    applied with label smoothing only, which fused_linear_logprobs never has)."""
    torch.manual_seed(1)
    x = torch.randn(N, V, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (N,))
    lse = torch.logsumexp(x, 1)
    coefs = torch.randn(4, N, dtype=torch.float64)
    coefs[2] = 0.0
    a, b, _, c = coefs
    log_p = x - lse[:, None]
    p = log_p.exp()
    want = (a[:, None] - c[:, None] * log_p) * p
    want[torch.arange(N), labels] -= b
    got = rows_torch.rows_grad_from_logits_(x.clone(), labels, lse, coefs, LossOptions())
    assert_close(got, want, "dz", rtol=1e-11, atol_frac=1e-12)
