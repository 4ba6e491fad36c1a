"""driver.scale_precomputed: the upstream scale folded into the cast to the parameters' dtypes
gives bit for bit what the former scale pass then cast pass gave, for an upstream of 1 or not."""

from __future__ import annotations

import pytest
import torch

from fused_dft.driver import scale_precomputed


def two_passes(g: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The former way: g *= upstream (in g's fp32), then a cast pass."""
    factor = grad_loss.double() if grad_loss.dtype == torch.float64 else grad_loss.float()
    return (g.clone().mul_(factor)).to(dtype)


# a ragged dW-like shape; upstreams: 1 (the common case), an inexact scale, a negative one, and
# a bf16 upstream (scaled in fp32, not rounded to bf16 first)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "upstream", [(1.0, torch.float32), (0.37, torch.float32), (-2.5, torch.float32),
                 (0.3, torch.bfloat16)],
)  # fmt: skip
def test_scale_folded_into_the_cast_is_bitwise_the_two_passes(dtype, upstream):
    gen = torch.Generator().manual_seed(0)
    dw = torch.randn(129, 40, generator=gen) * 3
    db = torch.randn(129, generator=gen)
    dh = torch.randn(37, 40, generator=gen).to(dtype)
    grad_loss = torch.tensor(upstream[0], dtype=upstream[1])
    expected = (two_passes(dh, grad_loss, dtype), two_passes(dw, grad_loss, dtype),
                two_passes(db, grad_loss, dtype))  # fmt: skip
    got = scale_precomputed([dh.clone(), dw.clone(), db.clone()], grad_loss, (dtype,) * 3)
    for name, g, e in zip(("dh", "dW", "db"), got, expected):
        assert g.dtype == dtype, name
        assert torch.equal(g, e), f"{name}: max diff {(g.float() - e.float()).abs().max()}"


def test_not_needed_gradients_stay_none_and_fp64_scales_in_fp64():
    dw = torch.randn(5, 3, dtype=torch.float64)
    grad_loss = torch.tensor(1 / 3, dtype=torch.float64)
    dh, got, db = scale_precomputed([None, dw.clone(), torch.ones(5)], grad_loss,
                                    (None, torch.float64, None))  # fmt: skip
    assert dh is None and db is None
    assert torch.equal(got, dw * grad_loss)
