"""Every impl against the float64 reference: loss, gradients of every input, statistics."""

from __future__ import annotations

import pytest
import torch

import fused_dft
from fused_dft.backends import chunked

from .helpers import (
    IMPL_CASES,
    assert_close,
    assert_within_torch_error,
    make_inputs,
    replace_backend_forwards,
    run,
    truth,
    use_impl,
)

# 37 tokens x 40 features x 129 vocab: none a power of two or a multiple of any tile size, so every
# kernel loop ends on a partial tile; small enough that the interpreter takes well under a second.
N, D, V = 37, 40, 129

# transforms a family applies between lm_head and the loss: none; bias with a scale (Cohere-like;
# Granite divides, i.e. a scale < 1); bias with a softcap (Gemma 2) that bites (|z| > cap)
TRANSFORMS = {
    "plain": dict(bias=False, opts={}),
    "bias_scale": dict(bias=True, opts={"logit_scale": 0.625}),
    "bias_softcap": dict(bias=True, opts={"softcap": 2.5, "logit_scale": 1.5}),
}


def check_against_truth(case, monkeypatch, hidden, weight, labels, bias, **opts):
    impl = use_impl(case, monkeypatch)
    loss, grads, stats, upstream = run(impl, hidden, weight, labels, bias, **opts)
    loss_t, grads_t, stats_t, _ = truth(hidden, weight, labels, bias, upstream, **opts)
    assert loss.dtype == torch.float32
    assert_close(loss, loss_t, "loss", rtol=1e-5, atol_frac=1e-6)
    for name, g, g_t in zip(("dh", "dW", "db"), grads, grads_t):
        assert g.dtype == hidden.dtype
        assert_close(g, g_t, name)
    assert int(stats.num_tokens) == int(stats_t.num_tokens)
    assert_close(stats.ce, stats_t.ce, "stats.ce", rtol=1e-5)
    assert_close(stats.entropy, stats_t.entropy, "stats.entropy", rtol=1e-4)
    assert_close(stats.accuracy, stats_t.accuracy, "stats.accuracy", rtol=0)
    return loss, grads


@pytest.mark.parametrize("case", IMPL_CASES)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss_type", ["dft", "ce"])
def test_matches_reference(case, transform, reduction, loss_type, monkeypatch):
    spec = TRANSFORMS[transform]
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=spec["bias"], scale=2.0)
    check_against_truth(
        case, monkeypatch, hidden, weight, labels, bias,
        loss_type=loss_type, reduction=reduction, chunk_size=8, **spec["opts"],
    )  # fmt: skip


# a 3-d leading shape (batch 3 x 11 positions) with a non-default ignore_index
@pytest.mark.parametrize("case", IMPL_CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_leading_shape_and_ignore_index(case, reduction, monkeypatch):
    hidden, weight, labels, bias = make_inputs(0, D, V, lead=(3, 11), ignore_index=-1, bias=True)
    loss, _ = check_against_truth(
        case, monkeypatch, hidden, weight, labels, bias, ignore_index=-1, reduction=reduction
    )
    if reduction == "none":
        assert loss.shape == (3, 11)
        assert bool((loss[labels == -1] == 0).all())


# an ignore_index inside [0, V): tokens with that label are skipped like -100 ones
def test_ignore_index_inside_vocab(monkeypatch):
    hidden, weight, labels, _ = make_inputs(N, D, V, ignore_frac=0.0)
    labels[::4] = 5
    check_against_truth(
        "fused_small_tiles", monkeypatch, hidden, weight, labels, None, ignore_index=5
    )
    loss, *_ = run("auto", hidden, weight, labels, ignore_index=5, reduction="none")
    assert bool((loss[labels == 5] == 0).all())


# chunk sizes around the token count: one token per chunk, ragged last chunk, one chunk for all
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_chunk_sizes(chunk_size, monkeypatch):
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True)
    for case in ("auto", "chunked"):
        check_against_truth(case, monkeypatch, hidden, weight, labels, bias, chunk_size=chunk_size)


@pytest.mark.parametrize("case", IMPL_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_not_nan(case, reduction, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True)
    labels.fill_(-100)
    loss, grads, stats, _ = run(impl, hidden, weight, labels, bias, reduction=reduction)
    assert bool((loss == 0).all()), loss
    for g in grads:
        assert bool((g == 0).all())
    assert int(stats.num_tokens) == 0
    assert float(stats.ce) == 0.0 and float(stats.accuracy) == 0.0


# |z| in the thousands: a naive exp overflows; the online log-sum-exp must not
@pytest.mark.parametrize("case", IMPL_CASES)
@pytest.mark.parametrize("loss_type", ["dft", "ce"])
def test_extreme_logits(case, loss_type, monkeypatch):
    hidden, weight, labels, _ = make_inputs(N, D, V, scale=400.0)
    z = hidden.double() @ weight.double().t()
    assert float(z.abs().max()) > 1000
    loss, _ = check_against_truth(
        case, monkeypatch, hidden, weight, labels, None, loss_type=loss_type, reduction="sum"
    )
    assert bool(torch.isfinite(loss).all())


@pytest.mark.parametrize("case", IMPL_CASES)
def test_nan_in_hidden_propagates(case, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, _ = make_inputs(N, D, V, ignore_frac=0.0)
    hidden[3, 7] = float("nan")
    loss = fused_dft.fused_linear_dft_loss(hidden, weight, labels, impl=impl)
    assert torch.isnan(loss), f"{impl}: a NaN hidden state gave loss {loss}"
    hidden[3, 7] = float("inf")
    loss = fused_dft.fused_linear_dft_loss(hidden, weight, labels, impl=impl)
    assert not torch.isfinite(loss), f"{impl}: an inf hidden state gave loss {loss}"


@pytest.mark.parametrize("case", IMPL_CASES)
def test_frozen_weight_and_frozen_hidden(case, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True)
    _, grads_t, _, upstream = truth(hidden, weight, labels, bias)
    # frozen weight and bias (the LoRA case): only dh
    h = hidden.clone().requires_grad_(True)
    loss = fused_dft.fused_linear_dft_loss(h, weight, labels, bias, impl=impl)
    (dh,) = torch.autograd.grad(loss, [h], upstream.float())
    assert_close(dh, grads_t[0], "dh (frozen weight)")
    # frozen hidden: only dW
    w = weight.clone().requires_grad_(True)
    loss = fused_dft.fused_linear_dft_loss(hidden, w, labels, bias, impl=impl)
    (dw,) = torch.autograd.grad(loss, [w], upstream.float())
    assert_close(dw, grads_t[1], "dW (frozen hidden)")


def test_frozen_weight_skips_weight_gradient_matmul(monkeypatch):
    def forbidden(*args):
        raise AssertionError("the weight-gradient matmul ran for a frozen weight")

    monkeypatch.setattr(chunked, "_accumulate_outer", forbidden)
    hidden, weight, labels, _ = make_inputs(N, D, V)
    h = hidden.clone().requires_grad_(True)
    for reduction in ("mean", "none"):
        loss = fused_dft.fused_linear_dft_loss(h, weight, labels, reduction=reduction)
        loss.sum().backward()
    assert h.grad is not None


@pytest.fixture
def matmul_rows(monkeypatch):
    """Records the row count of every `a @ b` (the chunked path's logits matmul)."""
    seen = []
    real_matmul = torch.Tensor.__matmul__

    def counting_matmul(a, b):
        seen.append(a.shape[0])
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", counting_matmul)
    return seen


def test_ignored_tokens_cost_no_matmul_rows(matmul_rows):
    """The logits matmul sees only non-ignored tokens."""
    hidden, weight, labels, _ = make_inputs(N, D, V, ignore_frac=0.5)
    fused_dft.fused_linear_dft_loss(hidden, weight, labels, chunk_size=1000)
    assert matmul_rows == [int((labels != -100).sum())]


# "none": each token's upstream gradient is honoured; a scalar upstream != 1 for mean/sum
@pytest.mark.parametrize("case", IMPL_CASES)
def test_upstream_gradients(case, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, _ = make_inputs(N, D, V)
    for reduction, upstream in (
        ("none", torch.randn(N, dtype=torch.float64) * 3),
        ("mean", torch.tensor(-2.5, dtype=torch.float64)),
        ("sum", torch.tensor(0.0, dtype=torch.float64)),
    ):
        _, grads, _, _ = run(impl, hidden, weight, labels, None, upstream, reduction=reduction)
        _, grads_t, _, _ = truth(hidden, weight, labels, None, upstream, reduction=reduction)
        for name, g, g_t in zip(("dh", "dW"), grads, grads_t):
            assert_close(g, g_t, f"{name} ({reduction})")


@pytest.mark.parametrize("case", IMPL_CASES)
def test_non_contiguous_inputs(case, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True)
    # hidden: every other row of a wider tensor, transposed storage; weight: a transposed view
    hidden_nc = torch.randn(D, 2 * N, device=hidden.device).t()[::2]
    hidden_nc.copy_(hidden)
    weight_nc = weight.t().contiguous().t()
    labels_nc = torch.stack([labels, labels], 1)[:, 0]
    bias_nc = torch.stack([bias, bias], 1)[:, 1]
    assert not (hidden_nc.is_contiguous() or weight_nc.is_contiguous())
    assert not (labels_nc.is_contiguous() or bias_nc.is_contiguous())
    loss, grads, _, upstream = run(impl, hidden_nc, weight_nc, labels_nc, bias_nc)
    loss_t, grads_t, _, _ = truth(hidden, weight, labels, bias, upstream)
    assert_close(loss, loss_t, "loss", rtol=1e-5)
    for name, g, g_t in zip(("dh", "dW", "db"), grads, grads_t):
        assert_close(g, g_t, name)


# low precision: an impl passes if its error against float64 is no worse than torch's own error
# in that dtype (the reference computed in bf16/fp16, i.e. what a model's lm_head + loss does),
# element by element, plus a margin (Cut Cross-Entropy's rule; helpers.assert_within_torch_error)
@pytest.mark.parametrize("case", IMPL_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", ["dft", "ce"])
def test_low_precision_within_torch_error(case, dtype, loss_type, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, bias = make_inputs(N, D, V, dtype=dtype, bias=True, scale=2.0)
    opts = dict(loss_type=loss_type, reduction="sum", softcap=4.0)
    loss, grads, _, upstream = run(impl, hidden, weight, labels, bias, **opts)
    loss_ref, grads_ref, _, _ = run("reference", hidden, weight, labels, bias, upstream, **opts)
    loss_t, grads_t, _, _ = truth(hidden, weight, labels, bias, upstream, **opts)
    assert loss.dtype == torch.float32
    assert_within_torch_error(loss, loss_ref, loss_t, "loss", dtype)
    for name, g, g_ref, g_t in zip(("dh", "dW", "db"), grads, grads_ref, grads_t):
        assert g.dtype == dtype
        assert_within_torch_error(g, g_ref, g_t, name, dtype)


def test_module_matches_function():
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True)
    module = fused_dft.FusedLinearDFTLoss(loss_type="ce", reduction="sum", softcap=3.0)
    expected = fused_dft.fused_linear_dft_loss(
        hidden, weight, labels, bias, loss_type="ce", reduction="sum", softcap=3.0
    )
    assert torch.equal(module(hidden, weight, labels, bias), expected)
    assert "softcap=3.0" in repr(module)
    with pytest.raises(TypeError, match="unknown options.*'smoothing'"):
        fused_dft.FusedLinearDFTLoss(smoothing=0.1)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_dft.FusedLinearDFTLoss(reduction="avg")


def test_dft_is_ce_weighted_by_detached_probability():
    """loss_dft = sum_t sg(p_t) * ce_t, and its gradient is p_t times CE's, token by token."""
    hidden, weight, labels, _ = make_inputs(N, D, V, ignore_frac=0.0, dtype=torch.float64)
    ce = fused_dft.fused_linear_dft_loss(hidden, weight, labels, loss_type="ce", reduction="none")
    dft = fused_dft.fused_linear_dft_loss(hidden, weight, labels, reduction="none")
    assert_close(dft, torch.exp(-ce) * ce, "dft vs exp(-ce) * ce", rtol=1e-12)
    assert bool((dft < ce).all())


def test_backward_twice_is_a_clear_error():
    hidden, weight, labels, _ = make_inputs(N, D, V)
    w = weight.clone().requires_grad_(True)
    loss = fused_dft.fused_linear_dft_loss(hidden, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        loss.backward()


def test_reference_gradcheck_float64():
    """CE is an ordinary function of its inputs, so finite differences check its gradient."""
    hidden, weight, labels, bias = make_inputs(7, 5, 11, dtype=torch.float64, bias=True)
    for opts in ({}, {"softcap": 1.5, "logit_scale": 2.0}):
        for reduction in ("mean", "none"):

            def f(h, w, b, opts=opts, reduction=reduction):
                return fused_dft.fused_linear_dft_loss(
                    h, w, labels, b, impl="reference", loss_type="ce", reduction=reduction, **opts
                )

            inputs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
            assert torch.autograd.gradcheck(f, inputs)


def test_reference_dft_gradient_is_probability_weighted_ce_gradient():
    """DFT's stop-gradient makes finite differences inapplicable; its gradient must equal CE's
    with each token's upstream gradient multiplied by p_t = exp(-ce_t)."""
    hidden, weight, labels, bias = make_inputs(7, 5, 11, dtype=torch.float64, bias=True)
    inputs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    opts = dict(impl="reference", reduction="none", softcap=1.5)
    upstream = torch.randn(7, dtype=torch.float64, device=hidden.device)
    dft = fused_dft.fused_linear_dft_loss(*inputs[:2], labels, inputs[2], **opts)
    grads_dft = torch.autograd.grad(dft, inputs, upstream)
    ce = fused_dft.fused_linear_dft_loss(*inputs[:2], labels, inputs[2], loss_type="ce", **opts)
    grads_ce = torch.autograd.grad(ce, inputs, upstream * torch.exp(-ce.detach()))
    for name, g_dft, g_ce in zip(("dh", "dW", "db"), grads_dft, grads_ce):
        assert_close(g_dft, g_ce, name, rtol=1e-10)


def test_chunk_size_from_environment(monkeypatch, matmul_rows):
    hidden, weight, labels, _ = make_inputs(N, D, V, ignore_frac=0.0)
    monkeypatch.setenv("FUSED_DFT_CHUNK_SIZE", "10")
    fused_dft.fused_linear_dft_loss(hidden, weight, labels)
    assert matmul_rows == [10, 10, 10, 7]
    monkeypatch.setenv("FUSED_DFT_CHUNK_SIZE", "ten")
    with pytest.raises(ValueError, match="FUSED_DFT_CHUNK_SIZE must be a positive integer"):
        fused_dft.fused_linear_dft_loss(hidden, weight, labels)


def test_autocast_casts_like_the_lm_head_would():
    """fp32 master weights under bf16 autocast: computed in bf16, gradients back in fp32."""
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True)
    w = weight.clone().requires_grad_(True)
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        loss = fused_dft.fused_linear_dft_loss(hidden, w, labels, bias)
    loss.backward()
    assert w.grad.dtype == torch.float32
    w_bf16 = weight.bfloat16().requires_grad_(True)
    expected = fused_dft.fused_linear_dft_loss(hidden.bfloat16(), w_bf16, labels, bias.bfloat16())
    expected.backward()
    assert torch.equal(loss, expected)
    assert torch.equal(w.grad, w_bf16.grad.float())


# The chunked path computes dW in the forward pass; backward must hand that very buffer to
# autograd (no copy: at 128k x 4k an fp32 dW is 2 GB), and allocate nothing of dW's size (autograd
# would, for instance, zero-fill gradients of the op's other outputs unless told not to).
def test_backward_of_precomputed_gradients_allocates_no_weight_sized_buffer(monkeypatch):
    from torch.profiler import ProfilerActivity, profile

    seen = {}

    def spy(real):
        def forward(*args, **kwargs):
            out = real(*args, **kwargs)
            seen["dw"] = out.grads[1].data_ptr()
            return out

        return forward

    replace_backend_forwards(monkeypatch, spy)
    hidden, weight, labels, _ = make_inputs(N, D, V)
    w = weight.clone().requires_grad_(True)
    loss = fused_dft.fused_linear_dft_loss(hidden, w, labels, impl="chunked")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    big = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage >= V * D * 4]
    assert not big, f"weight-sized allocations in backward: {big}"
    assert w.grad.data_ptr() == seen["dw"]


# labels of every narrower integer dtype, V = 200: int8 cannot hold V (200 wraps to -56 in int8
# compares) and uint8 reads ignore_index -100 as 156, so label 156 would alias it; each must give
# exactly what int64 labels give, on every public impl (labels are widened before any path; the
# small-tile cases add nothing for them but ~45 s) and with both row selections
LABEL_WIDTH_V = 200


@pytest.mark.parametrize("case", ["reference", "auto", "chunked", "fused"])
@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int8, torch.int16, torch.int32], ids=lambda d: str(d)[6:]
)
def test_labels_of_any_integer_width(case, dtype, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, _ = make_inputs(N, D, LABEL_WIDTH_V)
    labels = torch.randint(0, 127 if dtype == torch.int8 else LABEL_WIDTH_V, (N,))
    labels[:3] = 3
    if dtype == torch.uint8:  # no uint8 is -100: nothing is ignored, and 156 is a real label
        labels[3:7] = 156
    else:
        labels[-4:] = -100
    for validate in ("sync", "device"):
        opts = dict(validate=validate, reduction="none")
        loss, grads, stats, up = run(impl, hidden, weight, labels.to(dtype), **opts)
        loss_64, grads_64, stats_64, _ = run(impl, hidden, weight, labels, upstream=up, **opts)
        assert int(stats.num_tokens) == int(stats_64.num_tokens) == int((labels != -100).sum())
        assert_close(loss, loss_64, f"{dtype} loss", rtol=1e-6, atol_frac=1e-7)
        for name, g, g_64 in zip(("dh", "dW"), grads, grads_64):
            assert_close(g, g_64, f"{dtype} {name}", rtol=1e-6, atol_frac=1e-7)


# the check is the same on every path, so the public impls at their default tiles: precomputed
# gradients (chunked / auto, mean and sum) and the recomputing backward (fused, and "none")
@pytest.mark.parametrize("impl", ["auto", "chunked", "fused"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_order_gradients_are_a_clear_error(impl, reduction):
    hidden, weight, labels, _ = make_inputs(N, D, V)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = fused_dft.fused_linear_dft_loss(h, w, labels, impl=impl, reduction=reduction)
    with pytest.raises(RuntimeError, match=r"create_graph=True.*not supported.*impl='reference'"):
        torch.autograd.grad(loss.sum(), (h, w), create_graph=True)


def _float64_dft(hidden, weight, bias, labels):
    """DFT written here in float64 torch (mean over the non-ignored tokens), for autograd."""
    logp = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias), dim=-1)
    valid = labels != -100
    logp_y = logp.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)[valid]
    return (-logp_y.detach().exp() * logp_y).sum() / valid.sum()


def test_reference_supports_second_order_gradients():
    """A gradient penalty |d loss / d hidden|^2, differentiated w.r.t. the weight and the bias:
    impl="reference" in fp32 against the same penalty on DFT written here in float64."""
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True, scale=2.0)

    def penalty_grads(h, w, b, loss_fn):
        h, w, b = (t.clone().requires_grad_(True) for t in (h, w, b))
        (dh,) = torch.autograd.grad(loss_fn(h, w, b), h, create_graph=True)
        return torch.autograd.grad(dh.square().sum(), (w, b))

    got = penalty_grads(
        hidden, weight, bias,
        lambda h, w, b: fused_dft.fused_linear_dft_loss(h, w, labels, b, impl="reference"),
    )  # fmt: skip
    want = penalty_grads(
        hidden.double(), weight.double(), bias.double(),
        lambda h, w, b: _float64_dft(h, w, b, labels),
    )  # fmt: skip
    for name, g, g_t in zip(("d penalty / dW", "d penalty / db"), got, want):
        assert float(g_t.abs().max()) > 0
        assert_close(g, g_t, name, rtol=1e-4, atol_frac=1e-5)


# a bias of -inf masks part of the vocabulary (labels stay outside it): the first 40% makes the
# first vocabulary tile of every row all -inf (the Triton row kernel's first tile with small tiles,
# the first split's first tile in the fused kernel), a middle block the first tile of the second
# split (fused_small_tiles: 3 splits of 64 columns over V = 129); eaft reads the entropy (0 * -inf)
MINUS_INF_BLOCKS = {"first_40_percent": (0, 52), "middle_block": (64, 100)}


@pytest.mark.parametrize("case", IMPL_CASES)
@pytest.mark.parametrize("block", list(MINUS_INF_BLOCKS))
@pytest.mark.parametrize("loss_type", ["dft", "eaft"])
def test_minus_inf_logits_stay_finite(case, block, loss_type, monkeypatch):
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True)
    lo, hi = MINUS_INF_BLOCKS[block]
    bias[lo:hi] = float("-inf")
    labels[(labels >= lo) & (labels < hi)] = V - 1
    loss, grads = check_against_truth(
        case, monkeypatch, hidden, weight, labels, bias, loss_type=loss_type, reduction="none"
    )
    assert bool(torch.isfinite(loss).all())
    for name, g in zip(("dh", "dW", "db"), grads):
        assert bool(torch.isfinite(g).all()), f"{name} is not finite"


# NaN and inf hidden states at ignored rows, with both row selections (sync: the ignored rows are
# dropped; device: every row reaches the backend, the ignored ones masked)
@pytest.mark.parametrize("case", ["reference", *IMPL_CASES])
@pytest.mark.parametrize("validate", ["sync", "device"])
def test_nonfinite_hidden_at_ignored_rows_touches_nothing(case, validate, monkeypatch):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, bias = make_inputs(N, D, V, bias=True)
    ignored = (labels == -100).nonzero().squeeze(1)
    assert ignored.numel() >= 2
    poisoned, clean = hidden.clone(), hidden.clone()
    poisoned[ignored[0]] = float("nan")
    poisoned[ignored[1], 3] = float("inf")
    clean[ignored] = 0.0
    opts = dict(validate=validate, reduction="none")
    loss, grads, _, up = run(impl, poisoned, weight, labels, bias, **opts)
    loss_t, grads_t, _, _ = truth(clean, weight, labels, bias, up, **opts)
    assert_close(loss, loss_t, "loss", rtol=1e-5, atol_frac=1e-6)
    assert bool((grads[0][ignored] == 0).all()), "dh at ignored rows is not 0"
    for name, g, g_t in zip(("dh", "dW", "db"), grads, grads_t):
        assert_close(g, g_t, name)
