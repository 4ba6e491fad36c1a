"""asft on the Triton kernels: the chunked path's row kernels and the fused forward / dz kernels
against a float64 oracle written here from the formulas (closed-form gradients, no autograd):

    z = transform(h W^T + b),  zq = transform(h_ref W_ref^T + b_ref)   (the same logit_scale /
    softcap), p = softmax(z), q = softmax(zq), p_y = p at the label,
    loss_t = -p_y log p_y + alpha sum_v q_v (log q_v - log p_v)   (times the token weight),
    d loss_t / dz = p_y (p - onehot(y)) + alpha (p - q),
then the chain rule of the transform, dh = dx W, dW = dx^T h, db = sum dx; the reference gets
no gradient. D_ref != D on purpose (the reference head is another model's)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fused_dft
from fused_dft import partials as P
from fused_dft.backends import BACKENDS
from fused_dft.backends import fused as fused_backend
from fused_dft.kernels import fused_fwd, rows

from ..helpers import assert_close, use_impl

# ragged: no dimension a tile multiple; D_ref != D; the small-tile cases span several tiles,
# vocab splits and backward token / vocab chunks
N, D, D_REF, V = 29, 24, 40, 97
IGNORE = -1
ALPHA = 0.3
KERNEL_CASES = ["chunked", "chunked_small_tiles", "fused", "fused_small_tiles"]
# (policy bias, reference bias, logit_scale, softcap)
VARIANTS = {"bias_softcap": (True, True, 1.25, 3.0), "plain": (False, False, 1.0, None)}


def asft_inputs(bias: bool, ref_bias: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(18)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64) * 2
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    # a reference near the policy in its logits, through another head of width D_ref
    ref_hidden = torch.randn(N, D_REF, generator=g, dtype=torch.float64) * 2
    ref_weight = torch.randn(V, D_REF, generator=g, dtype=torch.float64) / D_REF**0.5
    rb = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if ref_bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = IGNORE
    tw = torch.rand(N, generator=g, dtype=torch.float64) * 2
    tw[::6] = 0.0
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return (cast(hidden), cast(weight), labels, cast(b),
            dict(ref_hidden=cast(ref_hidden), ref_weight=cast(ref_weight), ref_bias=cast(rb),
                 token_weights=cast(tw)))  # fmt: skip


def oracle(hidden, weight, labels, bias, upstream, ref_hidden, ref_weight, ref_bias,
           token_weights, reduction, logit_scale, softcap):  # fmt: skip
    """float64 loss and (dh, dW[, db]) from the formulas in the module docstring."""

    def transform(h, w, b):
        x = h.double() @ w.double().t() + (b.double() if b is not None else 0.0)
        x = x * logit_scale
        if softcap is None:
            return x, torch.ones_like(x)
        th = torch.tanh(x / softcap)
        return softcap * th, 1 - th**2

    z, dtanh = transform(hidden, weight, bias)
    zq, _ = transform(ref_hidden, ref_weight, ref_bias)
    log_p = z - torch.logsumexp(z, 1, keepdim=True)
    log_q = zq - torch.logsumexp(zq, 1, keepdim=True)
    p, q = log_p.exp(), log_q.exp()
    valid = labels != IGNORE
    y = torch.where(valid, labels, 0)
    logp_y = log_p.gather(1, y[:, None]).squeeze(1)
    p_y = logp_y.exp()
    kl = (q * (log_q - log_p)).sum(1)
    tw = torch.where(valid, token_weights.double(), 0.0)
    loss_t = (-p_y * logp_y + ALPHA * kl) * tw
    dloss_dz = p_y[:, None] * (p - F.one_hot(y, V).double()) + ALPHA * (p - q)
    count = max(int(valid.sum()), 1)
    if reduction == "none":
        total, c = loss_t, upstream.double()
    elif reduction == "sum":
        total, c = loss_t.sum(), upstream.double().expand(N)
    else:
        total, c = loss_t.sum() / count, upstream.double().expand(N) / count
    dx = (c * tw)[:, None] * dloss_dz * dtanh * logit_scale
    grads = [dx @ weight.double(), dx.t() @ hidden.double()]
    return total, grads + ([dx.sum(0)] if bias is not None else [])


def run(impl, hidden, weight, labels, bias, upstream, reduction, logit_scale, softcap, extra):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)
              if t is not None]  # fmt: skip
    h, w = leaves[:2]
    b = leaves[2] if bias is not None else None
    loss = fused_dft.fused_linear_dft_loss(
        h, w, labels, b, loss_type="asft", asft_alpha=ALPHA, impl=impl, chunk_size=8,
        ignore_index=IGNORE, reduction=reduction, logit_scale=logit_scale, softcap=softcap,
        **extra,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))
    return loss.detach(), list(grads)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_asft_kernels_match_oracle(case, reduction, variant, monkeypatch):
    impl = use_impl(case, monkeypatch)
    has_bias, has_ref_bias, scale, softcap = VARIANTS[variant]
    hidden, weight, labels, bias, extra = asft_inputs(has_bias, has_ref_bias)
    upstream = torch.randn(N if reduction == "none" else (), dtype=torch.float64)
    loss, grads = run(impl, hidden, weight, labels, bias, upstream, reduction, scale, softcap,
                      extra)  # fmt: skip
    loss_t, grads_t = oracle(hidden, weight, labels, bias, upstream, **extra,
                             reduction=reduction, logit_scale=scale, softcap=softcap)  # fmt: skip
    assert_close(loss, loss_t, "loss", rtol=1e-5, atol_frac=1e-6)
    for name, g, g_t in zip(("dh", "dW", "db"), grads, grads_t):
        assert_close(g, g_t, name)
    # the reference inputs were only read: no gradient, no graph
    assert all(t is None or (t.grad is None and not t.requires_grad) for t in extra.values())


# validate="device" (CUDA's default): every row goes to the kernels, the ignored ones after the
# tokens, masked by the device-side count (the fused kernels skip them, the chunked path zeroes
# their hidden rows); their loss and gradient must stay 0
@pytest.mark.parametrize("case", ["chunked_small_tiles", "fused_small_tiles"])
def test_asft_kernels_with_device_side_selection(case, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, bias, extra = asft_inputs(True, True)
    extra = dict(extra, validate="device")
    upstream = torch.randn(N, dtype=torch.float64)
    loss, grads = run(impl, hidden, weight, labels, bias, upstream, "none", 1.25, 3.0, extra)
    del extra["validate"]
    loss_t, grads_t = oracle(hidden, weight, labels, bias, upstream, **extra, reduction="none",
                             logit_scale=1.25, softcap=3.0)  # fmt: skip
    assert_close(loss, loss_t, "loss", rtol=1e-5, atol_frac=1e-6)
    for name, g, g_t in zip(("dh", "dW", "db"), grads, grads_t):
        assert_close(g, g_t, name)


# the KL term matters in these inputs (else the tests above would not see a wrong q): the
# oracle's gradient without it differs by more than the tolerance
def test_inputs_make_the_reference_term_visible():
    hidden, weight, labels, bias, extra = asft_inputs(True, True)
    one = torch.tensor(1.0, dtype=torch.float64)
    _, (dh, *_) = oracle(hidden, weight, labels, bias, one, **extra, reduction="sum",
                         logit_scale=1.0, softcap=None)  # fmt: skip
    far = dict(extra, ref_hidden=extra["ref_hidden"] * 0.5)
    _, (dh_far, *_) = oracle(hidden, weight, labels, bias, one, **far, reduction="sum",
                             logit_scale=1.0, softcap=None)  # fmt: skip
    assert float((dh - dh_far).abs().max()) > 1e-2 * float(dh.abs().max())


# impl="chunked" runs the Triton row kernels with the reference chunk (not the torch row ops),
# impl="fused" the fused kernels' HAS_REF variant: both launchers see the reference
@pytest.mark.parametrize("case", ["chunked", "fused"])
def test_asft_runs_the_triton_kernels_with_the_reference(case, monkeypatch):
    impl = use_impl(case, monkeypatch)
    seen = []
    if case == "chunked":
        real = rows.rows_partials, rows.rows_grad_

        def partials(x, y, opts, block_v=None, ref_logits=None):
            seen.append(("partials", ref_logits is not None))
            return real[0](x, y, opts, block_v, ref_logits)

        def grad(x, y, lse, coefs, opts, block_v=None, ref_logits=None, ref_lse=None):
            seen.append(("grad", ref_logits is not None))
            return real[1](x, y, lse, coefs, opts, block_v, ref_logits, ref_lse)

        monkeypatch.setattr(rows, "rows_partials", partials)
        monkeypatch.setattr(rows, "rows_grad_", grad)
    else:
        real_fwd = fused_fwd.fused_partials

        def partials(*args, ref=None, **kw):
            seen.append(("partials", ref is not None))
            return real_fwd(*args, ref=ref, **kw)

        monkeypatch.setattr(fused_fwd, "fused_partials", partials)
    hidden, weight, labels, bias, extra = asft_inputs(True, False)
    one = torch.tensor(1.0, dtype=torch.float64)
    run(impl, hidden, weight, labels, bias, one, "mean", 1.0, None, extra)
    assert seen and all(with_ref for _, with_ref in seen), seen
    if case == "chunked":
        assert {kind for kind, _ in seen} == {"partials", "grad"}


# the reference partials merge exactly in any grouping: split a row's vocabulary into ranges,
# reduce each from the formulas, merge, and compare with the whole row in float64
def test_reference_partials_merge_exactly():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 50, generator=g, dtype=torch.float64) * 4
    zq = torch.randn(6, 50, generator=g, dtype=torch.float64) * 4
    zq[0, :20] = float("-inf")  # a range with no finite reference logit
    cuts = [0, 20, 23, 41, 50]
    ranges = []
    for a, b in zip(cuts, cuts[1:]):
        mq = zq[:, a:b].amax(1)
        e = torch.exp(zq[:, a:b] - torch.where(torch.isfinite(mq), mq, 0)[:, None])
        kq = torch.where(e > 0, e * (zq[:, a:b] - z[:, a:b]), 0.0).sum(1)
        ranges.append(torch.stack([mq, e.sum(1), kq]))
    part = P.merge_reference(torch.stack(ranges, 1), dim=1)
    lse_q, cross = P.finalize_reference(part)
    log_q = torch.log_softmax(zq, 1)
    kl_t = (log_q.exp() * (log_q - torch.log_softmax(z, 1))).nan_to_num().sum(1)
    assert_close(lse_q, torch.logsumexp(zq, 1), "lse_q", rtol=1e-12)
    assert_close(cross + torch.logsumexp(z, 1), kl_t, "KL", rtol=1e-10, atol_frac=1e-12)


# bf16: the kernels' error no worse than twice plain torch's own in bf16 (the reference impl in
# bf16) plus a margin, against the float64 oracle
@pytest.mark.parametrize("case", ["chunked", "fused"])
def test_asft_bf16_within_torch_error(case, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, bias, extra = asft_inputs(True, True, dtype=torch.bfloat16)
    one = torch.tensor(1.0, dtype=torch.float64)
    args = (labels, bias, one, "sum", 1.25, 3.0, extra)
    loss, grads = run(impl, hidden, weight, *args)
    loss_ref, grads_ref = run("reference", hidden, weight, *args)
    loss_t, grads_t = oracle(hidden, weight, labels, bias, one, **extra, reduction="sum",
                             logit_scale=1.25, softcap=3.0)  # fmt: skip
    margin = 2**-8
    err = float((loss.double() - loss_t).abs())
    err_torch = float((loss_ref.double() - loss_t).abs())
    assert err <= 2 * err_torch + margin * float(loss_t.abs()), (err, err_torch)
    for name, g, g_ref, g_t in zip(("dh", "dW", "db"), grads, grads_ref, grads_t):
        err = float((g.double() - g_t).abs().max())
        err_torch = float((g_ref.double() - g_t).abs().max())
        assert err <= 2 * err_torch + margin * float(g_t.abs().max()), (name, err, err_torch)


# the fused backward keeps no N x V tensor: its Saved holds lse_q per token beside lse
def test_fused_saved_holds_lse_q_per_token(monkeypatch):
    saved = []
    real = fused_backend.fused_backward

    def spy(hidden, weight, bias, rows_, s, *args, **kw):
        saved.append(s)
        return real(hidden, weight, bias, rows_, s, *args, **kw)

    monkeypatch.setitem(BACKENDS, "fused", dataclasses.replace(BACKENDS["fused"], backward=spy))
    hidden, weight, labels, bias, extra = asft_inputs(False, True)
    upstream = torch.randn(N, dtype=torch.float64)
    run("fused", hidden, weight, labels, bias, upstream, "none", 1.0, None, extra)
    (s,) = saved
    n = int((labels != IGNORE).sum())
    assert s.lse.shape == s.ref_lse.shape == (n,) and s.coefs.shape == (5, n)
    zq = extra["ref_hidden"].double() @ extra["ref_weight"].double().t() + extra["ref_bias"]
    assert_close(s.ref_lse, torch.logsumexp(zq, 1)[labels != IGNORE], "lse_q", rtol=1e-5)
