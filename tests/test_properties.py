"""Property-based tests (hypothesis, fixed seed): random problems on every impl against a float64
oracle written here, and random bad inputs that must raise a clear error before any compute.

The oracle is independent of fused_dft's reference and of test_loss_family's closed form: each
member written from log_softmax in float64 with its stop-gradients (.detach()), differentiated by
torch autograd. derandomize=True: the same examples on every run (a failure reproduces), about a
minute in all on 2 CPU cores with Triton's interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_dft

from .helpers import assert_close, assert_within_torch_error, replace_backend_forwards, use_impl

IGNORE = -100
# the public impls and the Triton kernels with small tiles (several tiles, splits and chunks at
# these sizes); "fused" takes no float64
IMPLS = ["reference", "auto", "chunked", "fused", "chunked_small_tiles", "fused_small_tiles"]
MEMBERS = ("ce", "dft", "power", "eaft", "psft")


def oracle(hidden, weight, bias, labels, opts, upstream):
    """(loss, [dh, dW(, db)], log p_y) of plain torch: the logits in the inputs' dtype (as an
    lm_head computes them), everything after in float64 for float64 inputs, else fp32 (so with
    bf16 inputs this is torch's own bf16 error, and with float64 ones the truth)."""
    leaves = [
        t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias) if t is not None
    ]
    h, w, b = leaves[0], leaves[1], leaves[2] if bias is not None else None
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    z = F.linear(h, w, b).to(acc) * opts.get("logit_scale", 1.0)
    if opts.get("softcap") is not None:
        z = opts["softcap"] * torch.tanh(z / opts["softcap"])
    valid = labels != IGNORE
    logp = torch.log_softmax(z, dim=-1)
    logp_y = logp.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    loss = _member_loss(opts, logp_y, logp, valid)
    if opts.get("label_smoothing", 0.0) > 0:
        eps = opts["label_smoothing"]
        loss = (1 - eps) * loss + eps * (-logp.mean(-1))
    loss = loss + opts.get("z_loss", 0.0) * torch.logsumexp(z, -1).square()
    if opts.get("token_weights") is not None:
        loss = loss * opts["token_weights"].to(acc)
    loss = torch.where(valid, loss, 0.0)
    reduction = opts.get("reduction", "mean")
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / valid.sum().clamp(min=1)
    grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return loss.detach(), grads, torch.where(valid, logp_y.detach(), 0.0)


def _member_loss(opts, logp_y, logp, valid):
    kind = opts.get("loss_type", "dft")
    p = logp_y.exp()
    if kind == "ce":
        return -logp_y
    if kind == "dft":
        return -p.detach() * logp_y
    if kind == "power":
        q = opts["power_q"]
        return (1 - p**q) / q
    if kind == "eaft":
        vocab = logp.shape[-1]
        entropy = (-(logp.exp() * logp).sum(-1)).clamp(min=0)
        weight = (entropy / (math.log(vocab) if vocab > 1 else 1.0)) ** opts["eaft_alpha"]
        return -weight.detach() * logp_y
    eps = opts["clip_eps"]
    old = torch.where(valid, opts["old_logprobs"].to(logp_y.dtype), 0.0)
    r = torch.exp(logp_y - old)
    return -torch.minimum(r, r.clamp(1 - eps, 1 + eps))


@st.composite
def problems(draw):
    """A random valid call: shapes, dtype, impl, member and options, ignore fraction 0-100%."""
    n, d, v = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.integers(1, 70))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    impls = [i for i in IMPLS if not (dtype == torch.float64 and i.startswith("fused"))]
    impl = draw(st.sampled_from(impls))
    kind = draw(st.sampled_from(MEMBERS))
    opts = {"loss_type": kind, "reduction": draw(st.sampled_from(["mean", "sum", "none"]))}
    opts["validate"] = draw(st.sampled_from(["sync", "device"]))
    if kind == "power":
        opts["power_q"] = draw(st.floats(0.25, 3.0))
    if kind == "eaft":
        opts["eaft_alpha"] = draw(st.floats(0.0, 2.0))
    if kind == "psft":
        opts["clip_eps"] = draw(st.floats(0.05, 0.5))
    if kind == "ce" and draw(st.booleans()):
        opts["label_smoothing"] = draw(st.floats(0.0, 0.5))
    if draw(st.booleans()):
        opts["z_loss"] = draw(st.floats(0.0, 0.1))
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(1.0, 10.0))
    opts["logit_scale"] = draw(st.sampled_from([1.0, 0.5, 1.7, -0.8]))
    extras = dict(
        bias=draw(st.booleans()),
        token_weights=draw(st.booleans()),
        ignore_frac=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
        chunk_size=draw(st.sampled_from([None, 1, 5])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return n, d, v, dtype, impl, opts, extras


def _inputs(n, d, v, dtype, opts, extras):
    gen = torch.Generator().manual_seed(extras["seed"])
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64) * 1.5
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) / d**0.5
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5 if extras["bias"] else None
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < extras["ignore_frac"]] = IGNORE
    if extras["token_weights"]:
        opts["token_weights"] = (torch.rand(n, generator=gen, dtype=torch.float64) * 2).to(dtype)
    if opts["loss_type"] == "psft":
        # around the current log-probs, so that ratios fall on both sides of the clip range, and
        # none within 1% of an edge (where fp32 and float64 may take different sides)
        logp = torch.log_softmax(F.linear(hidden, weight, bias) * opts["logit_scale"], -1)
        logp_y = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
        old = logp_y + 0.4 * torch.randn(n, generator=gen, dtype=torch.float64)
        eps = opts["clip_eps"]
        for edge in (math.log1p(eps), math.log1p(-eps)):
            near = ((logp_y - old) - edge).abs() < 0.01
            old = torch.where(near, old + 0.05, old)
        opts["old_logprobs"] = old.to(dtype)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), labels


@settings(derandomize=True, max_examples=120, deadline=None)
@given(problems())
def test_every_impl_matches_a_float64_oracle(problem):
    n, d, v, dtype, case, opts, extras = problem
    hidden, weight, bias, labels = _inputs(n, d, v, dtype, opts, extras)
    upstream = torch.randn(n if opts["reduction"] == "none" else (), dtype=torch.float64)
    with pytest.MonkeyPatch.context() as monkeypatch:
        impl = use_impl(case, monkeypatch)
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias) if t is not None]
        loss, logprobs = fused_dft.fused_linear_dft_loss(
            leaves[0], leaves[1], labels, leaves[2] if bias is not None else None, impl=impl,
            chunk_size=extras["chunk_size"], return_logprobs=True, **opts,
        )  # fmt: skip
        grads = torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))
    wide = lambda t: None if t is None else t.double()  # noqa: E731
    truth = oracle(wide(hidden), wide(weight), wide(bias), labels, opts, upstream)
    where = f"{case} {dtype} N={n} D={d} V={v} {opts.get('loss_type')}"
    names = ["loss", "logprobs", "dh", "dW", "db"]
    got = [loss, logprobs, *grads]
    want = [truth[0], truth[2], *truth[1]]
    if dtype == torch.bfloat16:
        own = oracle(hidden, weight, bias, labels, opts, upstream)  # torch's own bf16 error
        for name, a, r, t in zip(names, got, [own[0], own[2], *own[1]], want):
            assert_within_torch_error(a, r, t, f"{where} {name}", dtype)
        return
    rtol, atol_frac = (1e-9, 1e-10) if dtype == torch.float64 else (2e-4, 2e-5)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(g.dtype == dtype for g in grads)
    for name, a, t in zip(names, got, want):
        assert_close(a, t, f"{where} {name}", rtol=rtol, atol_frac=atol_frac)


# -- bad input: one corruption of a valid call, each naming its argument ------------------------

# (what is corrupted, the error type, a pattern naming the argument); the corruption itself is
# drawn below with random shapes and values
BAD = {
    "hidden_int": (TypeError, "hidden must be"),
    "weight_dtype": (TypeError, "weight dtype"),
    "weight_width": (ValueError, r"weight must have shape \(V, D\)"),
    "weight_empty": (ValueError, "weight must have at least one row"),
    "feature_free": (ValueError, "hidden and weight must have at least one feature"),
    "bias_shape": (ValueError, r"bias must have shape \(V,\)"),
    "labels_float": (TypeError, "labels must be an integer tensor"),
    "labels_uint64": (TypeError, "labels must be an integer tensor"),
    "labels_shape": (ValueError, "labels must have hidden's leading shape"),
    "label_too_large": (ValueError, r"labels must be in \[0, "),
    "label_negative": (ValueError, r"labels must be in \[0, "),
    "token_weights_shape": (ValueError, "token_weights must be shaped like labels"),
    "token_weights_nan": (ValueError, "token_weights must be finite at non-ignored"),
    "old_logprobs_missing": (ValueError, "requires old_logprobs"),
    "old_logprobs_unused": (ValueError, "old_logprobs is only used"),
    "reduction": (ValueError, "reduction must be one of"),
    "loss_type": (ValueError, "loss_type must be one of"),
    "logit_scale": (ValueError, "logit_scale must be"),
    "softcap": (ValueError, "softcap must be None or a positive"),
    "z_loss": (ValueError, "z_loss must be"),
    "label_smoothing": (ValueError, "label_smoothing"),
    "power_q": (ValueError, "power_q must be"),
    "eaft_alpha": (ValueError, "eaft_alpha must be"),
    "clip_eps": (ValueError, "clip_eps must be"),
    "chunk_size": (ValueError, "chunk_size must be None or a positive int"),
    "impl": (ValueError, "impl must be one of"),
    "ignore_index": (TypeError, "ignore_index must be an int"),
    "validate": (ValueError, "validate must be None or one of"),
    "fused_float64": (TypeError, "impl='fused' supports"),
    "unknown_option": (TypeError, "unknown option"),
}


@st.composite
def bad_calls(draw, what: str):
    n, d, v = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 30))
    k = draw(st.integers(0, n - 1))  # the position a bad per-token value goes to
    kwargs = dict(
        hidden=torch.randn(n, d), weight=torch.randn(v, d), labels=torch.randint(0, v, (n,)),
        bias=None, impl=draw(st.sampled_from(["auto", "reference", "chunked", "fused"])),
    )  # fmt: skip
    if what == "hidden_int":
        kwargs["hidden"] = kwargs["hidden"].long()
    elif what == "weight_dtype":
        kwargs["weight"] = kwargs["weight"].to(draw(st.sampled_from([torch.float64, torch.half])))
    elif what == "weight_width":
        kwargs["weight"] = torch.randn(v, d + draw(st.integers(1, 5)))
    elif what == "weight_empty":
        kwargs["weight"] = torch.randn(0, d)
    elif what == "feature_free":
        kwargs["hidden"], kwargs["weight"] = torch.randn(n, 0), torch.randn(v, 0)
    elif what == "bias_shape":
        kwargs["bias"] = torch.randn(v + draw(st.integers(1, 4)))
    elif what == "labels_float":
        kwargs["labels"] = kwargs["labels"].float()
    elif what == "labels_uint64":
        kwargs["labels"] = kwargs["labels"].to(torch.uint64)
    elif what == "labels_shape":
        kwargs["labels"] = torch.randint(0, v, (n + draw(st.integers(1, 3)),))
    elif what in ("label_too_large", "label_negative"):
        bad = (
            v + draw(st.integers(0, 1000))
            if what == "label_too_large"
            else -draw(st.integers(1, 99))
        )
        kwargs["labels"][k] = bad
        kwargs["validate"] = "sync"
    elif what == "token_weights_shape":
        kwargs["token_weights"] = torch.ones(n + draw(st.integers(1, 3)))
    elif what == "token_weights_nan":
        kwargs["token_weights"] = torch.ones(n)
        kwargs["token_weights"][k] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        kwargs["validate"] = "sync"
    elif what == "old_logprobs_missing":
        kwargs["loss_type"] = "psft"
    elif what == "old_logprobs_unused":
        kwargs["loss_type"] = draw(st.sampled_from(["ce", "dft", "power", "eaft"]))
        kwargs["old_logprobs"] = -torch.rand(n)
    elif what == "reduction":
        kwargs["reduction"] = draw(st.sampled_from(["avg", "Mean", "", "batchmean"]))
    elif what == "loss_type":
        kwargs["loss_type"] = draw(st.sampled_from(["sft", "DFT", "nll", ""]))
    elif what == "logit_scale":
        kwargs["logit_scale"] = draw(st.sampled_from([0.0, math.nan, math.inf, -math.inf]))
    elif what == "softcap":
        kwargs["softcap"] = draw(st.one_of(st.floats(-10.0, 0.0), st.just(math.inf)))
    elif what == "z_loss":
        kwargs["z_loss"] = draw(st.one_of(st.floats(-1.0, -1e-6), st.just(math.nan)))
    elif what == "label_smoothing":
        if draw(st.booleans()):
            kwargs["label_smoothing"] = draw(st.floats(0.01, 0.9))  # with a member other than ce
        else:
            kwargs["loss_type"] = "ce"
            kwargs["label_smoothing"] = draw(st.one_of(st.floats(1.0, 5.0), st.floats(-1, -0.01)))
    elif what == "power_q":
        kwargs.update(loss_type="power", power_q=draw(st.floats(-5.0, 0.0)))
    elif what == "eaft_alpha":
        kwargs.update(loss_type="eaft", eaft_alpha=draw(st.floats(-5.0, -1e-3)))
    elif what == "clip_eps":
        kwargs.update(loss_type="psft", clip_eps=draw(st.floats(-1.0, 0.0)))
        kwargs["old_logprobs"] = -torch.rand(n)
    elif what == "chunk_size":
        kwargs["chunk_size"] = draw(st.sampled_from([0, -1, 2.5, True]))
    elif what == "impl":
        kwargs["impl"] = draw(st.sampled_from(["cuda", "triton", "Fused", ""]))
    elif what == "ignore_index":
        kwargs["ignore_index"] = draw(st.sampled_from([-100.0, "none", None]))
    elif what == "validate":
        kwargs["validate"] = draw(st.sampled_from(["strict", "on", "Sync"]))
    elif what == "fused_float64":
        kwargs.update(impl="fused", hidden=kwargs["hidden"].double())
        kwargs["weight"] = kwargs["weight"].double()
    else:  # unknown_option
        kwargs[draw(st.sampled_from(["powerq", "alpha", "eps", "temperature"]))] = 1.0
    return kwargs


# every kind of bad input, each with a few random shapes, values and impls
@pytest.mark.parametrize("what", sorted(BAD))
@settings(derandomize=True, max_examples=6, deadline=None)
@given(data=st.data())
def test_bad_input_raises_naming_the_argument_before_any_compute(what, data):
    kwargs = data.draw(bad_calls(what))
    error, pattern = BAD[what]

    def forbidden(*args, **kw):
        raise AssertionError("computation started before the argument error")

    with pytest.MonkeyPatch.context() as monkeypatch:
        replace_backend_forwards(monkeypatch, lambda forward: forbidden)
        monkeypatch.setattr(torch.nn.functional, "linear", forbidden)  # the reference's logits
        args = [kwargs.pop(k) for k in ("hidden", "weight", "labels", "bias")]
        with pytest.raises(error, match=pattern):
            fused_dft.fused_linear_dft_loss(*args, **kwargs)
