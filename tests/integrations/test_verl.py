"""The verl adapter's own logic, without verl: the SFT loss (ce, dft) built on
fused_linear_logprobs against a float64 oracle from the full logits, the log-prob forward verl's
fused-kernel path calls, the refusals, the version check, and the ImportError when verl is missing.

The oracle is verl's SFT loss (verl 0.9.1 workers/utils/losses.py `sft_loss` on
`logprobs_from_logits`) written here from its formula, with DFT's per-token term: full logits /
temperature, log_softmax, gather of the label, then sum over the loss mask of
-log p (ce) or -sg(p) log p (dft), divided by the global batch's valid tokens, times dp_size.
The run against verl itself (3 steps of its SFT trainer) is `make test-integrations`
(tests/integrations/run_trainers.py).
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import fused_dft
from fused_dft.integrations import verl_logprobs as vl

from ..helpers import IMPL_CASES, assert_close, use_impl

# ragged: no dimension a tile multiple; chunk sizes in the impls span several chunks
N, D, V = 53, 24, 131


def oracle_sft_loss(hidden, weight, labels, mask, temperature, batch_num_tokens, dp_size, kind):
    """float64, from the full logits; returns (loss, dL/dhidden, dL/dweight)."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    logp = torch.log_softmax(h @ w.t() / temperature, dim=-1)
    logp_y = logp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    per_token = -logp_y if kind == "ce" else -torch.exp(logp_y).detach() * logp_y
    loss = (per_token * mask.double()).sum() / batch_num_tokens * dp_size
    return (loss, *torch.autograd.grad(loss, [h, w]))


def ragged_batch(seed: int):
    """Three packed sequences of ragged lengths; a loss mask with prompt tokens and padding out,
    some labels out of range for the oracle's gather (-100, as an ignored position would carry)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g) * 1.5
    weight = torch.randn(V, D, generator=g) / D**0.5
    labels = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.35
    mask[[0, 17, 40]] = False  # the first token of each sequence: a prompt token
    labels[~mask & (torch.rand(N, generator=g) < 0.5)] = -100
    return hidden, weight, labels, mask


# every impl (the float32 paths against float64); temperature != 1 checks the 1/T scale; dp_size 2
# with a larger global token count: one rank's share of a data-parallel batch
@pytest.mark.parametrize("case", ["reference", *IMPL_CASES])
@pytest.mark.parametrize("kind", vl.LOSS_TYPES)
@pytest.mark.parametrize("temperature, dp_size, extra_tokens", [(1.0, 1, 0), (0.7, 2, 29)])
def test_sft_loss_on_fused_logprobs_equals_float64_oracle(
    case, kind, temperature, dp_size, extra_tokens, monkeypatch
):
    impl = use_impl(case, monkeypatch)
    hidden, weight, labels, mask = ragged_batch(seed=len(case) + 7 * dp_size)
    batch_num_tokens = int(mask.sum()) + extra_tokens
    want, want_dh, want_dw = oracle_sft_loss(
        hidden, weight, labels, mask, temperature, batch_num_tokens, dp_size, kind
    )
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    log_prob = fused_dft.fused_linear_logprobs(
        h, w, labels, logit_scale=1.0 / temperature, impl=impl, return_entropy=False
    )
    got = vl.sft_loss(log_prob, mask, batch_num_tokens, dp_size, kind)
    got_dh, got_dw = torch.autograd.grad(got, [h, w])
    assert_close(got, want, f"{kind} loss", rtol=1e-5)
    assert_close(got_dh, want_dh, f"{kind} dL/dhidden", rtol=1e-4)
    assert_close(got_dw, want_dw, f"{kind} dL/dweight", rtol=1e-4)
    # the masked tokens carry no gradient: rows of hidden that only masked tokens read
    assert bool((got_dh[~mask] == 0).all())


def test_verl_loss_function_aligns_the_mask_with_each_sequences_labels():
    # verl's no_padding batch: ragged sequences as jagged nested tensors, packed back to back;
    # each starts with a prompt token (out of the loss mask), as verl's SFT data does
    g = torch.Generator().manual_seed(5)
    lengths = [7, 3, 12, 5]
    logps = [-torch.rand(n, generator=g, dtype=torch.float64) * 4 for n in lengths]
    masks = [(torch.rand(n, generator=g) > 0.3).long() for n in lengths]
    for m in masks:
        m[0] = 0
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    nested = lambda flat: torch.nested.nested_tensor_from_jagged(flat, offsets)  # noqa: E731
    data = {"loss_mask": nested(torch.cat(masks)), "batch_num_tokens": 40, "dp_size": 2}
    for kind in vl.LOSS_TYPES:
        flat = torch.cat(logps).requires_grad_(True)  # as verl builds them from packed rows
        loss, metrics = vl.family_sft_loss({"log_probs": nested(flat)}, data, loss_type=kind)
        # oracle, per sequence: position t predicts token t + 1, counted if that token is in
        # the loss mask; the last position predicts nothing
        want = 0.0
        for lp, m in zip(logps, masks):
            for t in range(len(lp) - 1):
                if m[t + 1]:
                    p = float(torch.exp(lp[t]))
                    want += -float(lp[t]) * (1.0 if kind == "ce" else p)
        want = want / 40 * 2
        got = float(loss.detach())
        assert metrics == {} and abs(got - want) <= 1e-12 * max(1.0, abs(want)), (
            kind, got, want)  # fmt: skip
        (grad,) = torch.autograd.grad(loss, flat)
        want_grad = []
        for lp, m in zip(logps, masks):
            counted = torch.cat([m[1:], m.new_zeros(1)]).bool()
            slope = torch.ones_like(lp) if kind == "ce" else torch.exp(lp)  # -d l_t / d log p_t
            want_grad.append(torch.where(counted, -slope * 2 / 40, 0.0))
        assert_close(grad, torch.cat(want_grad), f"{kind} grad")


def test_masked_tokens_never_reach_the_loss():
    # a NaN or -inf log-prob under the mask (e.g. an unwritten position) must not leak
    log_prob = torch.tensor([-1.0, float("nan"), -2.0, float("-inf")], requires_grad=True)
    mask = torch.tensor([1, 0, 1, 0])
    for kind in vl.LOSS_TYPES:
        loss = vl.sft_loss(log_prob, mask, batch_num_tokens=4, dp_size=1, loss_type=kind)
        (grad,) = torch.autograd.grad(loss, log_prob)
        assert torch.isfinite(loss) and bool(torch.isfinite(grad).all())
        assert grad[1] == 0 and grad[3] == 0


def tiny_qwen2(tie: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(config).float()


# tied and untied heads; packed rows with shift_labels (verl's remove-padding path) and padded
# rows rolled by the forward itself
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_forward_returns_the_stock_models_logprobs_and_entropy(tie, packed):
    model = tiny_qwen2(tie)
    stock = type(model).forward
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    temperature = 0.8
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double() / temperature
    logp = torch.log_softmax(logits, -1)
    rolled = torch.roll(ids, shifts=-1, dims=-1)
    if packed:
        rolled = torch.randint(0, 97, ids.shape, generator=g)  # whatever labels verl passes
    want_logp = logp.gather(-1, rolled[..., None]).squeeze(-1)
    want_entropy = -(logp.exp() * logp).sum(-1)

    vl.patch_logprob_forward(model)
    kwargs = {"shift_labels": rolled} if packed else {}
    out = model(input_ids=ids, temperature=temperature, return_dict=True, use_cache=False,
                **kwargs)  # fmt: skip
    assert_close(out.log_probs, want_logp, "log p_y", rtol=1e-5)
    assert_close(out["entropy"], want_entropy, "entropy", rtol=1e-5)
    # gradients flow to the head and the decoder
    out.log_probs.sum().backward()
    assert model.lm_head.weight.grad is not None and model.model.norm.weight.grad is not None

    vl.unpatch_logprob_forward(model)
    assert type(model).forward is stock and "forward" not in model.__dict__
    assert model(input_ids=ids).logits.shape == (2, 11, 97)


def test_forward_refuses_a_model_without_decoder_or_head():
    with pytest.raises(TypeError, match="not a causal LM"):
        vl.patch_logprob_forward(torch.nn.Linear(3, 4))


def test_an_unknown_impl_is_refused_when_patching():
    model = tiny_qwen2(tie=False)
    with pytest.raises(ValueError, match="impl must be one of"):
        vl.patch_logprob_forward(model, impl="naive")
    assert "forward" not in model.__dict__


def test_bad_temperature_is_refused_before_compute():
    model = tiny_qwen2(tie=False)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        vl.head_logprobs(model, torch.randn(1, 3, 32), torch.zeros(1, 3, dtype=torch.long), 0.0)


@pytest.mark.parametrize(
    "overrides, setting",
    [
        ({"engine.strategy": "megatron"}, "engine.strategy='megatron'"),
        ({"engine.ulysses_sequence_parallel_size": 2}, "engine.ulysses_sequence_parallel_size > 1"),
        ({"model.lora_rank": 8}, "model.lora_rank"),
        ({"model.use_liger": True}, "model.use_liger"),
        ({"model.tiled_mlp.enabled": True}, "model.tiled_mlp.enabled"),
        ({"data.pad_mode": "right"}, "data.pad_mode='right'"),
    ],
)
def test_settings_it_cannot_honour_are_refused_by_name(overrides, setting):
    base = {
        "engine.strategy": "fsdp2", "engine.ulysses_sequence_parallel_size": 1,
        "model.lora_rank": 0, "model.use_liger": False, "data.pad_mode": "no_padding",
    }  # fmt: skip
    vl.check_settings(base)
    with pytest.raises(ValueError, match=f"verl: {setting}.* is refused"):
        vl.check_settings({**base, **overrides})


@pytest.mark.parametrize("loss_type", ["eaft", "asft", "DFT", None])
def test_loss_types_without_a_log_prob_form_are_refused(loss_type):
    with pytest.raises(ValueError, match="loss_type must be one of"):
        vl.check_loss_type(loss_type)
    assert vl.check_loss_type("dft") == "dft"


@pytest.mark.parametrize("version", ["0.9.0", "0.10.0", "0.8.0"])
def test_a_version_it_was_not_tested_with_is_refused(version):
    with pytest.raises(RuntimeError, match=f"verl {version} is not a version"):
        vl.check_version(version)
    vl.check_version("0.9.1")


def test_import_without_verl_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", None)
    monkeypatch.delitem(sys.modules, "fused_dft.integrations.verl", raising=False)
    with pytest.raises(ImportError, match=r"fused-dft\[verl\]"):
        importlib.import_module("fused_dft.integrations.verl")
