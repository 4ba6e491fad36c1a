"""Shared test helpers: the float64 oracle and comparisons that say where and by how much."""

from __future__ import annotations

import pytest
import torch

import fused_dft
from fused_dft.backends import BACKENDS, fused
from fused_dft.kernels import configs, rows

from .device import DEVICE

# impl cases: the public impls, plus the Triton kernels with tiles small enough that the test
# shapes span several tiles along every axis (loops, masks, split-merging and the backward's
# token chunks are exercised)
IMPL_CASES = ["auto", "chunked", "chunked_small_tiles", "fused", "fused_small_tiles"]
SMALL_FUSED = configs.FusedConfig(
    block_n=16, block_v=32, block_d=16, num_warps=4, num_stages=1, group_n=2, vocab_splits=3
)


def use_impl(case: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Configure tile sizes for `case` and return the public impl name to pass."""
    if case == "chunked_small_tiles":
        monkeypatch.setattr(rows, "DEFAULT_BLOCK_V", 32)
        return "chunked"
    if case == "fused_small_tiles":
        monkeypatch.setenv(configs.ENV_CONFIG, SMALL_FUSED.spec)
        # backward over several token chunks (fp32 dW accumulated) and several vocab chunks
        monkeypatch.setattr(fused, "TOKEN_CHUNK", 16)
        monkeypatch.setattr(fused, "DZ_SCRATCH_BYTES", 16 * 4 * 48)
        monkeypatch.setattr(fused, "DZ_SCRATCH_MAX_BYTES", 16 * 4 * 48)  # not grown on CUDA
        return "fused"
    return case


def replace_backend_forwards(monkeypatch: pytest.MonkeyPatch, wrap) -> None:
    """Every registered backend's forward replaced by wrap(its forward) for this test."""
    import dataclasses

    for name, backend in list(BACKENDS.items()):
        monkeypatch.setitem(
            BACKENDS, name, dataclasses.replace(backend, forward=wrap(backend.forward))
        )


def make_inputs(n, d, v, dtype=torch.float32, bias=False, ignore_frac=0.3, ignore_index=-100,
                lead=None, scale=1.0, device=DEVICE):  # fmt: skip
    """Drawn on the CPU from the test's seed (the same values on every device), then moved."""
    shape = lead if lead is not None else (n,)
    hidden = torch.randn(*shape, d, dtype=torch.float64) * scale
    weight = torch.randn(v, d, dtype=torch.float64) / d**0.5
    b = torch.randn(v, dtype=torch.float64) * 0.5 if bias else None
    labels = torch.randint(0, v, shape)
    labels[torch.rand(shape) < ignore_frac] = ignore_index
    return (
        hidden.to(device, dtype),
        weight.to(device, dtype),
        labels.to(device),
        b.to(device, dtype) if b is not None else None,
    )


def run(impl, hidden, weight, labels, bias=None, upstream=None, **opts):
    """Loss, gradients (w.r.t. the inputs that require grad) and stats of one call."""
    leaves = []
    for t in (hidden, weight, bias):
        if t is not None and t.is_floating_point():
            t = t.detach().clone().requires_grad_(True)
        leaves.append(t)
    h, w, b = leaves
    loss, stats = fused_dft.fused_linear_dft_loss(
        h, w, labels, b, impl=impl, return_stats=True, **opts
    )
    if upstream is None:
        upstream = torch.randn(loss.shape, dtype=torch.float64)
    inputs = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad(loss, inputs, upstream.to(loss.device, loss.dtype))
    return loss.detach(), list(grads), stats, upstream


def truth(hidden, weight, labels, bias=None, upstream=None, **opts):
    """The float64 reference on the same values."""
    return run(
        "reference",
        hidden.double(),
        weight.double(),
        labels,
        bias.double() if bias is not None else None,
        upstream,
        **opts,
    )


def assert_close(actual, expected, name, rtol=1e-4, atol_frac=1e-5):
    """|a - e| <= rtol |e| + atol_frac * max|e| elementwise; reports the first mismatch."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    atol = atol_frac * float(expected.abs().max()) if expected.numel() else 0.0
    atol = max(atol, 1e-12)
    bad = ~((actual - expected).abs() <= rtol * expected.abs() + atol)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ; first at {idx}: "
            f"got {float(actual[idx])!r}, expected {float(expected[idx])!r} "
            f"(atol {atol:.3g}, rtol {rtol:g})"
        )


# The low-precision margin, relative to the tensor's largest |truth|: 4 units in the last place of
# the largest element (Cut Cross-Entropy's tests allow 1e-2 for bf16 and 1e-3 for fp16 on values of
# order 1). On the CPU the worst excess over torch's own error was ~2^-7.2 (bf16) and ~2^-11 (fp16).
LOW_PRECISION_MARGIN = {torch.bfloat16: 2**-6, torch.float16: 2**-9}


def assert_within_torch_error(actual, torch_result, truth_value, name, dtype):
    """Cut Cross-Entropy's rule for low-precision results, element by element:
        |actual - truth| <= |torch_result - truth| + margin * max|truth|
    with torch_result plain torch in the same dtype (the reference impl) and truth float64: no
    worse than torch's own rounding, plus a margin. Reports the worst element."""
    a, r, t = (x.detach().double() for x in (actual, torch_result, truth_value))
    assert a.shape == t.shape == r.shape, f"{name}: shapes {a.shape}, {r.shape}, {t.shape}"
    if t.numel() == 0:
        return
    allowed = (r - t).abs() + LOW_PRECISION_MARGIN[dtype] * float(t.abs().max())
    excess = (a - t).abs() - allowed
    worst = int(excess.flatten().argmax())
    if not bool(excess.flatten()[worst] <= 0):  # NaN fails too
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), t.shape))
        raise AssertionError(
            f"{name} ({dtype}): {int((~(excess <= 0)).sum())} of {t.numel()} elements are worse "
            f"than torch's own error + margin; worst at {idx}: got {float(a[idx])!r}, torch "
            f"{float(r[idx])!r}, float64 {float(t[idx])!r}, allowed error {float(allowed[idx]):.3g}"
        )


def max_err(actual, expected) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max())
