"""The patched loss against the stock Hugging Face models it patches: loss and every gradient.

Every family's DFT loss and gradients against DFT computed from the stock model's logits (see
helpers.py for the models, inputs and oracle), CE mode against the stock loss, the MoE router
loss, num_items_in_batch, shift_labels, a biased or tied lm_head, bf16 autocast, and the loss
family's options and token columns through the patch.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fused_dft  # noqa: E402
from fused_dft.hf import STAT_NAMES  # noqa: E402

from .helpers import (  # noqa: E402
    ATOL,
    FAMILIES,
    RTOL,
    V,
    assert_grads_equal,
    loss_from_logits,
    ragged_batch,
    shifted,
    stock_loss,
    tiny_model,
)


# Every family, DFT: the loss and every parameter gradient (embeddings, attention, MLP or experts,
# router, norms, lm_head) equal those of DFT computed from the stock model's logits.
@pytest.mark.parametrize("family", list(FAMILIES))
def test_dft_loss_and_every_gradient_match_stock_logits(family):
    stock = tiny_model(family)
    patched = fused_dft.patch_model(copy.deepcopy(stock))
    inputs, labels = ragged_batch()

    expected, logits = stock_loss(stock, inputs, labels)
    expected.backward()
    out = patched(**inputs, labels=labels)
    out.loss.backward()

    assert out.logits is None
    torch.testing.assert_close(out.loss, expected, rtol=RTOL, atol=ATOL)
    assert_grads_equal(patched, stock)
    # the batch figures of the fused pass, from the same logits
    y = shifted(labels)
    valid = y != -100
    z = logits.detach()[valid].float()
    torch.testing.assert_close(
        out.ce_loss, loss_from_logits(logits.detach(), y, "ce"), rtol=RTOL, atol=ATOL
    )
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(out.entropy, entropy, rtol=RTOL, atol=ATOL)
    accuracy = (z.argmax(-1) == y[valid]).float().mean()
    torch.testing.assert_close(out.token_accuracy, accuracy)
    assert int(out.num_tokens) == int(valid.sum())
    assert all(name in out for name in STAT_NAMES)  # keys too, when there are no logits
    assert out.ce_loss.grad_fn is None and out.loss.grad_fn is not None


# CE mode is the stock loss itself (the stock forward's, including MoE router loss).
@pytest.mark.parametrize("family", list(FAMILIES))
def test_ce_mode_equals_stock_loss(family):
    stock = tiny_model(family)
    patched = fused_dft.patch_model(copy.deepcopy(stock), loss_type="ce")
    inputs, labels = ragged_batch(seed=2)
    expected = stock(**inputs, labels=labels).loss
    got = patched(**inputs, labels=labels).loss
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


# Mixtral with router logits: the loss is DFT + coef * the stock forward's router loss, and the
# MoE output fields are the stock ones.
def test_moe_router_loss_added_as_stock():
    stock = tiny_model("mixtral")
    patched = fused_dft.patch_model(copy.deepcopy(stock))
    inputs, labels = ragged_batch(seed=3)
    stock_out = stock(**inputs)
    out = patched(**inputs, labels=labels)
    dft = loss_from_logits(stock_out.logits, shifted(labels))
    coef = stock.config.router_aux_loss_coef
    assert stock_out.aux_loss > 0.1 and coef * stock_out.aux_loss > 0.1 * dft  # the term matters
    torch.testing.assert_close(out.aux_loss, stock_out.aux_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.loss, dft + coef * stock_out.aux_loss, rtol=RTOL, atol=ATOL)
    assert isinstance(out, transformers.modeling_outputs.MoeCausalLMOutputWithPast)
    assert len(out.router_logits) == stock.config.num_hidden_layers
    # without router logits there is no router loss, as in the stock forward
    out = patched(**inputs, labels=labels, output_router_logits=False)
    assert out.aux_loss is None
    torch.testing.assert_close(out.loss, dft, rtol=RTOL, atol=ATOL)


# num_items_in_batch (gradient accumulation): sum over valid tokens / num_items, as the stock loss;
# as a tensor (Trainer) and as an int.
@pytest.mark.parametrize("num_items", [torch.tensor(37), 23])
def test_num_items_in_batch(num_items):
    stock = tiny_model("qwen2")
    dft = fused_dft.patch_model(copy.deepcopy(stock))
    ce = fused_dft.patch_model(copy.deepcopy(stock), loss_type="ce")
    inputs, labels = ragged_batch(seed=4)
    expected_ce = stock(**inputs, labels=labels, num_items_in_batch=num_items).loss
    got_ce = ce(**inputs, labels=labels, num_items_in_batch=num_items).loss
    torch.testing.assert_close(got_ce, expected_ce, rtol=RTOL, atol=ATOL)
    expected, _ = stock_loss(stock, inputs, labels, num_items=num_items)
    got = dft(**inputs, labels=labels, num_items_in_batch=num_items)
    torch.testing.assert_close(got.loss, expected, rtol=RTOL, atol=ATOL)
    mean = dft(**inputs, labels=labels).loss
    n_valid = int(got.num_tokens)
    torch.testing.assert_close(got.loss * int(num_items), mean * n_valid, rtol=RTOL, atol=ATOL)


# shift_labels given (as under context parallelism): used as they are, not shifted again.
def test_shift_labels_used_unshifted():
    stock = tiny_model("llama")
    dft = fused_dft.patch_model(copy.deepcopy(stock))
    ce = fused_dft.patch_model(copy.deepcopy(stock), loss_type="ce")
    inputs, labels = ragged_batch(seed=5)
    g = torch.Generator().manual_seed(6)
    shift_labels = torch.randint(0, V, labels.shape, generator=g)
    shift_labels[torch.rand(labels.shape, generator=g) < 0.3] = -100
    expected_ce = stock(**inputs, labels=labels, shift_labels=shift_labels).loss
    got_ce = ce(**inputs, labels=labels, shift_labels=shift_labels).loss
    torch.testing.assert_close(got_ce, expected_ce, rtol=RTOL, atol=ATOL)
    expected, _ = stock_loss(stock, inputs, labels, shift_labels=shift_labels)
    got = dft(**inputs, labels=labels, shift_labels=shift_labels).loss
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(got, stock_loss(stock, inputs, labels)[0])


# An lm_head with a bias (not in stock configs: set on the instance); its gradient included.
def test_lm_head_bias():
    stock = tiny_model("llama")
    torch.manual_seed(7)
    stock.lm_head = torch.nn.Linear(32, V, bias=True)
    patched = fused_dft.patch_model(copy.deepcopy(stock))
    inputs, labels = ragged_batch(seed=8)
    expected, _ = stock_loss(stock, inputs, labels)
    expected.backward()
    out = patched(**inputs, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected, rtol=RTOL, atol=ATOL)
    assert patched.lm_head.bias.grad is not None
    assert_grads_equal(patched, stock)


def test_tied_embeddings_share_one_gradient():
    model = fused_dft.patch_model(tiny_model("gemma2"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inputs, labels = ragged_batch()
    model(**inputs, labels=labels).loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


# Mixed precision: under CPU bf16 autocast the loss is computed in bf16 (as lm_head would run)
# and lands close to the stock loss under the same autocast.
def test_autocast_bf16():
    stock = tiny_model("llama")
    patched = fused_dft.patch_model(copy.deepcopy(stock), loss_type="ce")
    inputs, labels = ragged_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = stock(**inputs, labels=labels).loss
        got = patched(**inputs, labels=labels)
    got.loss.backward()
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, expected, rtol=2e-2, atol=2e-2)
    assert patched.lm_head.weight.grad.dtype == torch.float32


# The loss family through the patch: options at patch time, token_weights / old_logprobs as batch
# columns aligned with labels (shifted with them), token_logprobs back aligned with labels.
def family_expected(model, inputs, labels, **options):
    """The fused loss of the stock model's last hidden states (reference impl), shifted labels."""
    hidden = model.model(**inputs).last_hidden_state
    columns = {k: shifted(v, fill=0.0) for k, v in options.pop("columns", {}).items()}
    return fused_dft.fused_linear_dft_loss(
        hidden, model.lm_head.weight, shifted(labels), impl="reference", **columns, **options
    )


def test_family_options_and_token_columns_through_the_patch():
    stock = tiny_model("llama")
    inputs, labels = ragged_batch()
    weights = torch.rand(labels.shape)
    options = dict(loss_type="power", power_q=0.5, z_loss=1e-3)
    model = fused_dft.patch_model(copy.deepcopy(stock), **options)
    assert "token_weights" in inspect.signature(model.forward).parameters
    out = model(**inputs, labels=labels, token_weights=weights)
    expected = family_expected(stock, inputs, labels, columns={"token_weights": weights}, **options)
    torch.testing.assert_close(out.loss, expected, rtol=RTOL, atol=ATOL)
    # psft: token_logprobs come back aligned with labels; fed back as old_logprobs at the same
    # parameters every ratio is 1, so the loss is -1 per token
    model = fused_dft.patch_model(copy.deepcopy(stock), loss_type="psft", clip_eps=0.1)
    first = model(**inputs, labels=labels, old_logprobs=torch.zeros(labels.shape))
    assert first.token_logprobs.shape == labels.shape
    assert bool((first.token_logprobs[:, 0] == 0).all())
    again = model(**inputs, labels=labels, old_logprobs=first.token_logprobs)
    torch.testing.assert_close(again.loss, torch.tensor(-1.0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="power_q is a parameter of loss_type 'power'"):
        fused_dft.patch_model(copy.deepcopy(stock), power_q=2.0)
    with pytest.raises(ValueError, match="loss_type='psft' requires old_logprobs"):
        model(**inputs, labels=labels)
