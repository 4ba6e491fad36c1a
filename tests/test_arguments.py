"""Bad input: a clear error naming the argument, raised before any kernel or matmul runs."""

from __future__ import annotations

import pytest
import torch

import fused_dft

from .helpers import replace_backend_forwards

N, D, V = 6, 8, 10


@pytest.fixture(autouse=True)
def no_compute(monkeypatch):
    """Any computation reached during these tests is a failure: errors must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("computation started before the argument error")

    replace_backend_forwards(monkeypatch, lambda forward: forbidden)
    monkeypatch.setattr(torch.nn.functional, "linear", forbidden)  # the reference's logits


def args(**over):
    base = dict(
        hidden=torch.randn(N, D),
        weight=torch.randn(V, D),
        labels=torch.randint(0, V, (N,)),
        bias=None,
    )
    base.update(over)
    return base


def call(impl="auto", **over):
    a = args(**{k: v for k, v in over.items() if k in ("hidden", "weight", "labels", "bias")})
    opts = {k: v for k, v in over.items() if k not in a}
    return fused_dft.fused_linear_dft_loss(
        a["hidden"], a["weight"], a["labels"], a["bias"], impl=impl, **opts
    )


@pytest.mark.parametrize(
    "over, error, pattern",
    [
        (dict(hidden=torch.randn(N, D).long()), TypeError, "hidden must be float16, bfloat16"),
        (dict(weight=torch.randn(V, D).double()), TypeError, "weight dtype torch.float64 must"),
        (dict(bias=torch.randn(V).half()), TypeError, "bias dtype torch.float16 must match"),
        (dict(labels=torch.zeros(N)), TypeError, "labels must be an integer tensor"),
        (dict(labels=torch.zeros(N, dtype=torch.bool)), TypeError, "labels must be an integer"),
        (dict(hidden=[[1.0]]), TypeError, "hidden must be a torch.Tensor"),
        (dict(weight=torch.randn(V * D)), ValueError, r"weight must have shape \(V, D\)"),
        (dict(weight=torch.randn(V, D + 1)), ValueError, "D = hidden.shape\\[-1\\] = 8"),
        (dict(weight=torch.randn(0, D)), ValueError, "weight must have at least one row"),
        # D = 0: no feature to multiply (torch would fail in a reshape deep inside)
        (
            dict(hidden=torch.randn(N, 0), weight=torch.randn(V, 0)),
            ValueError,
            r"hidden and weight must have at least one feature .*hidden \(6, 0\)",
        ),
        # uint64 labels from 2^63 on have no int64 form: refused, naming the dtypes taken
        (
            dict(labels=torch.zeros(N, dtype=torch.uint64)),
            TypeError,
            "labels must be an integer tensor of a dtype in .*'uint8'.*got torch.uint64",
        ),
        # narrow labels are checked as the integers they hold (int8: V = 10, 127 out of range)
        (
            dict(labels=torch.tensor([0, 1, 127, 2, 3, 4], dtype=torch.int8)),
            ValueError,
            r"\[0, 10\).*\[2\] = 127",
        ),
        (dict(labels=torch.zeros(N + 1, dtype=torch.long)), ValueError, "labels must have"),
        (dict(labels=torch.zeros(2, 3, dtype=torch.long)), ValueError, "leading shape \\(6,\\)"),
        (dict(bias=torch.randn(V + 1)), ValueError, r"bias must have shape \(V,\) = \(10,\)"),
        (dict(labels=torch.tensor([0, 1, 2, 10, 3, 4])), ValueError, r"\[0, 10\).*\[3\] = 10"),
        (dict(labels=torch.tensor([0, -5, 2, 1, 3, 4])), ValueError, r"\[1\] = -5"),
        (dict(labels=torch.tensor([0, -100, 2, 1, 3, 4]), ignore_index=-1), ValueError, "-100"),
        (dict(hidden=torch.randn(N, D, device="meta")), ValueError, "all tensors must be on one"),
        (dict(loss_type="sft"), ValueError, "loss_type must be one of"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(ignore_index=-1.0), TypeError, "ignore_index must be an int"),
        (dict(logit_scale=float("nan")), ValueError, "logit_scale must be a finite number"),
        (dict(logit_scale=0.0), ValueError, "logit_scale must be non-zero"),
        (dict(softcap=0.0), ValueError, "softcap must be None or a positive"),
        (dict(softcap=-3.0), ValueError, "softcap must be None or a positive"),
        (dict(chunk_size=0), ValueError, "chunk_size must be None or a positive int"),
        # the family's parameters
        (dict(loss_type="power", power_q=0.0), ValueError, "power_q must be > 0"),
        (dict(loss_type="power", power_q=-1), ValueError, "power_q must be > 0"),
        (dict(loss_type="power", power_q=float("inf")), ValueError, "power_q must be a finite"),
        (dict(loss_type="eaft", eaft_alpha=-0.5), ValueError, "eaft_alpha must be >= 0"),
        # eaft's top-k: k in [1, V] (0: the full entropy), an int; the normalizer positive
        (dict(loss_type="eaft", eaft_topk=V + 1), ValueError, "eaft_topk must be .*<= V = 10"),
        (dict(loss_type="eaft", eaft_topk=-1), ValueError, "eaft_topk must be >= 0"),
        (dict(loss_type="eaft", eaft_topk=2.0), ValueError, "eaft_topk must be an int"),
        (dict(loss_type="eaft", eaft_normalizer=0.0), ValueError, "eaft_normalizer must be > 0"),
        (dict(eaft_topk=5), ValueError, "eaft_topk is a parameter of loss_type 'eaft'"),
        # asft's reference model
        (dict(loss_type="asft", asft_alpha=-0.1), ValueError, "asft_alpha must be >= 0"),
        (dict(loss_type="asft"), ValueError, "loss_type='asft' requires ref_hidden and ref_w"),
        (dict(ref_hidden=torch.randn(N, D)), ValueError, "ref_hidden is only used by loss_ty"),
        (
            dict(loss_type="asft", ref_hidden=torch.randn(N + 1, D), ref_weight=torch.randn(V, D)),
            ValueError,
            r"ref_hidden must have hidden's leading shape \(6,\)",
        ),
        (
            dict(loss_type="asft", ref_hidden=torch.randn(N, 4), ref_weight=torch.randn(V + 1, 4)),
            ValueError,
            r"ref_weight must have shape \(V, D_ref\) = \(10, 4\)",
        ),
        (
            dict(
                loss_type="asft",
                ref_hidden=torch.randn(N, D),
                ref_weight=torch.randn(V, D),
                ref_bias=torch.randn(V + 2),
            ),  # fmt: skip
            ValueError,
            r"ref_bias must have shape \(V,\) = \(10,\)",
        ),
        (
            dict(
                loss_type="asft",
                ref_hidden=torch.randn(N, D).double(),
                ref_weight=torch.randn(V, D),
            ),  # fmt: skip
            TypeError,
            "ref_hidden dtype torch.float64 must match hidden dtype",
        ),
        (
            dict(
                loss_type="asft",
                ref_hidden=torch.randn(N, D),
                ref_weight=torch.randn(V, D).requires_grad_(),
            ),  # fmt: skip
            ValueError,
            "ref_weight requires grad",
        ),
        (
            dict(loss_type="psft", clip_eps=0.0, old_logprobs=-torch.rand(N)),
            ValueError,
            "clip_eps must be > 0",
        ),
        (dict(z_loss=-1e-4), ValueError, "z_loss must be >= 0"),
        (dict(z_loss=float("nan")), ValueError, "z_loss must be a finite number"),
        (
            dict(loss_type="ce", label_smoothing=1.0),
            ValueError,
            r"label_smoothing must be in \[0, 1\)",
        ),
        (dict(loss_type="ce", label_smoothing=-0.1), ValueError, "label_smoothing must be in"),
        (
            dict(label_smoothing=0.1),
            ValueError,
            "label_smoothing is only defined for loss_type='ce'",
        ),
        (
            dict(power_q=2.0),
            ValueError,
            "power_q is a parameter of loss_type 'power', not of 'dft'",
        ),
        (
            dict(loss_type="eaft", clip_eps=0.1),
            ValueError,
            "clip_eps is a parameter of loss_type 'psft'",
        ),
        (dict(loss_type="psft"), ValueError, "loss_type='psft' requires old_logprobs"),
        (
            dict(old_logprobs=-torch.rand(N)),
            ValueError,
            "old_logprobs is only used by loss_type='psft'",
        ),
        # per-token tensors
        (
            dict(token_weights=torch.ones(N + 1)),
            ValueError,
            r"token_weights must be shaped like labels \(6,\)",
        ),
        (
            dict(token_weights=torch.ones(N, dtype=torch.long)),
            TypeError,
            "token_weights must be a floating",
        ),
        (
            dict(token_weights=torch.ones(N, device="meta")),
            ValueError,
            "token_weights must be on labels' device",
        ),
        (
            dict(token_weights=torch.ones(N).requires_grad_()),
            ValueError,
            "token_weights requires grad",
        ),
        (
            dict(token_weights=torch.tensor([1.0, 1, float("nan"), 1, 1, 1])),
            ValueError,
            r"token_weights must be finite at non-ignored tokens; .*view\(-1\)\[2\] = nan",
        ),
        (dict(token_weights=[1.0] * N), TypeError, "token_weights must be a torch.Tensor or None"),
        (
            dict(loss_type="psft", old_logprobs=torch.zeros(2, 3)),
            ValueError,
            "old_logprobs must be shaped like labels",
        ),
        (
            dict(loss_type="psft", old_logprobs=torch.tensor([0.0, -1, -1, float("-inf"), -1, -1])),
            ValueError,
            r"old_logprobs must be finite at non-ignored tokens; .*view\(-1\)\[3\] = -inf",
        ),
        (dict(return_logprobs=1), TypeError, "return_logprobs must be a bool"),
    ],
)
def test_bad_input(over, error, pattern):
    with pytest.raises(error, match=pattern):
        call(**over)


def test_filler_at_ignored_tokens_is_allowed(monkeypatch):
    """A NaN token weight or old log-prob at an ignored position is not an error (and the
    computation starts: the no_compute fixture makes it raise its own AssertionError)."""
    labels = torch.tensor([0, -100, 2, 1, 3, 4])
    weights = torch.tensor([1.0, float("nan"), 1, 1, 1, 1])
    with pytest.raises(AssertionError, match="computation started"):
        call(labels=labels, token_weights=weights)
    with pytest.raises(AssertionError, match="computation started"):
        call(labels=labels, loss_type="psft", old_logprobs=-weights.abs())


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        call(impl="cuda")


def test_fused_without_triton_says_what_would_make_it_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='fused' cannot run here.*TRITON_INTERPRET=1"):
        call(impl="fused")


def test_fused_float64_is_a_type_error():
    with pytest.raises(TypeError, match="impl='fused' supports float16, bfloat16 and float32"):
        call(
            impl="fused",
            hidden=torch.randn(N, D, dtype=torch.float64),
            weight=torch.randn(V, D, dtype=torch.float64),
        )


# asft runs on every impl (fused included) but not yet with a vocab-parallel weight: refused
# before any compute, naming the layout
def test_asft_reference_inputs_pass_on_every_impl():
    # a reference of another width (D_ref = 3) passes the checks on the chunked and fused impls;
    # with a vocab-parallel weight, impl="fused" is refused by parallel.vocab_parallel_loss
    # (tests/distributed_cases.py: bad-asft-fused-vocab-parallel)
    from fused_dft.arguments import check_reference_inputs, make_options

    opts = make_options(loss_type="asft")
    hidden, weight = torch.randn(N, D), torch.randn(V, D)
    for impl in ("chunked", "fused", "reference"):
        check_reference_inputs(opts, impl, hidden, weight, torch.randn(N, 3), torch.randn(V, 3),
                               None)  # fmt: skip
    with pytest.raises(ValueError, match="ref_weight must have shape"):
        check_reference_inputs(opts, "fused", hidden, weight, torch.randn(N, 3),
                               torch.randn(V, D), None)  # fmt: skip
