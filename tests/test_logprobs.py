"""fused_linear_logprobs: per-token log p_y and entropy with gradients through both, every impl
against float64 autograd of the naive log_softmax + gather + entropy on the full logits, with
random upstream gradients on both outputs and ignored tokens (0, and no gradient from them)."""

from __future__ import annotations

import pytest
import torch

import fused_dft

from .helpers import IMPL_CASES, assert_close, assert_within_torch_error, make_inputs, use_impl

# ragged, as in test_loss.py: no dimension a tile multiple; chunk_size 8 spans several chunks
N, D, V = 37, 40, 129
IGNORE = -1
TRANSFORMS = {"plain": {}, "scale_softcap": {"logit_scale": 1.25, "softcap": 3.0}}


def naive(hidden, weight, labels, bias, logit_scale=1.0, softcap=None):
    """float64 log p_y and H from the full logits (autograd differentiates both)."""
    z = (hidden @ weight.t() + bias) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, -1)
    valid = labels != IGNORE
    logp_y = logp.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, logp_y, 0.0), torch.where(valid, entropy, 0.0)


def run(fn, hidden, weight, labels, bias, g_logp, g_entropy, dtype=None, **kw):
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
    logp, entropy = fn(h, w, labels, b, **kw)
    total = (logp * g_logp.to(logp.dtype)).sum() + (entropy * g_entropy.to(logp.dtype)).sum()
    return logp.detach(), entropy.detach(), torch.autograd.grad(total, [h, w, b])


@pytest.mark.parametrize("case", ["reference", *IMPL_CASES])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_logprobs_and_entropy_match_float64_autograd(case, transform, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True, scale=2.0, ignore_index=IGNORE)
    g_logp, g_entropy = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    opts = TRANSFORMS[transform]
    want = run(naive, *(t.double() for t in (hidden, weight)), labels, bias.double(), g_logp,
               g_entropy, **opts)  # fmt: skip
    got = run(fused_dft.fused_linear_logprobs, hidden, weight, labels, bias, g_logp, g_entropy,
              impl=impl, chunk_size=8, ignore_index=IGNORE, **opts)  # fmt: skip
    assert_close(got[0], want[0], "log p_y", rtol=1e-5, atol_frac=1e-6)
    assert_close(got[1], want[1], "entropy", rtol=1e-5, atol_frac=1e-6)
    for name, g, g_t in zip(("dh", "dW", "db"), got[2], want[2]):
        assert_close(g, g_t, name)
    ignored = labels == IGNORE
    assert bool((got[0][ignored] == 0).all()) and bool((got[1][ignored] == 0).all())


# one output only: the other's upstream gradient is absent (None in autograd), and the entropy
# need not be computed at all (return_entropy=False)
@pytest.mark.parametrize("case", ["chunked", "fused"])
def test_gradient_through_one_output(case, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True, ignore_index=IGNORE)
    h64, w64, b64 = (t.double().requires_grad_(True) for t in (hidden, weight, bias))
    logp_t, entropy_t = naive(h64, w64, labels, b64)
    for which in ("logp", "entropy", "logp_only"):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        kw = dict(impl=impl, ignore_index=IGNORE, chunk_size=8)
        if which == "logp_only":
            out, want = (
                fused_dft.fused_linear_logprobs(h, w, labels, b, return_entropy=False, **kw),
                logp_t,
            )
        else:
            logp, entropy = fused_dft.fused_linear_logprobs(h, w, labels, b, **kw)
            out, want = (logp, logp_t) if which == "logp" else (entropy, entropy_t)
        grads = torch.autograd.grad(out.sum(), [h, w, b])
        grads_t = torch.autograd.grad(want.sum(), [h64, w64, b64], retain_graph=True)
        for name, g, g_t in zip(("dh", "dW", "db"), grads, grads_t):
            assert_close(g, g_t, f"{which} {name}")


def test_shapes_and_static_selection():
    """Leading shape kept; validate="off" (all rows, tokens first) gives the same values."""
    hidden, weight, labels, _ = make_inputs(0, D, V, lead=(3, 11), ignore_index=IGNORE)
    a = fused_dft.fused_linear_logprobs(hidden, weight, labels, ignore_index=IGNORE)
    b = fused_dft.fused_linear_logprobs(hidden, weight, labels, ignore_index=IGNORE,
                                        validate="off")  # fmt: skip
    assert a[0].shape == a[1].shape == (3, 11)
    for x, y, name in zip(a, b, ("log p_y", "entropy")):
        assert_close(x, y, name, rtol=1e-6)


@pytest.mark.parametrize("case", ["chunked", "fused"])
def test_bf16_within_torch_error(case, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, bias = make_inputs(N, D, V, dtype=torch.bfloat16, bias=True,
                                               ignore_index=IGNORE)  # fmt: skip
    g_logp, g_entropy = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    f = fused_dft.fused_linear_logprobs
    common = dict(ignore_index=IGNORE, chunk_size=8)
    got = run(f, hidden, weight, labels, bias, g_logp, g_entropy, impl=impl, **common)
    ref = run(f, hidden, weight, labels, bias, g_logp, g_entropy, impl="reference", **common)
    want = run(naive, *(t.double() for t in (hidden, weight)), labels, bias.double(), g_logp,
               g_entropy)  # fmt: skip
    for name, a, r, t in zip(("log p_y", "entropy", "dh", "dW", "db"), (*got[:2], *got[2]),
                             (*ref[:2], *ref[2]), (*want[:2], *want[2])):  # fmt: skip
        assert_within_torch_error(a, r, t, name, torch.bfloat16)


def test_bad_input_before_compute():
    hidden, weight, labels, _ = make_inputs(N, D, V)
    with pytest.raises(ValueError, match="labels must be in"):
        fused_dft.fused_linear_logprobs(hidden, weight, labels + V)
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        fused_dft.fused_linear_logprobs(hidden, weight, labels, return_entropy=1)
    with pytest.raises(ValueError, match="impl must be one of"):
        fused_dft.fused_linear_logprobs(hidden, weight, labels, impl="naive")
