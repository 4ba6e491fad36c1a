"""The lm_head replaced after patch_model: the patch follows get_output_embeddings().

resize_token_embeddings (an untied head is replaced by a larger one; a tied one keeps its module)
and set_output_embeddings after patching: the loss, the eval logits and every gradient equal the
stock model's with the same weights; the pre-hook and the slot move to the new head, and
unpatch_model leaves neither on the old head or the new one. Tiny models and ragged inputs from
helpers.py; the batch uses some of the added token ids, so the new vocabulary rows are trained.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fused_dft  # noqa: E402
from fused_dft.hf.call import _capture_pre_hook  # noqa: E402
from fused_dft.hf.state import SLOT_ATTR  # noqa: E402

from .helpers import (  # noqa: E402
    ATOL,
    COMMON,
    RTOL,
    V,
    assert_grads_equal,
    ragged_batch,
    stock_loss,
)

V_NEW = V + 18  # ragged again: 319 rows


def llama(tied: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**COMMON, tie_word_embeddings=tied)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def batch_with_new_tokens():
    inputs, labels = ragged_batch()
    inputs["input_ids"][:, 5] = V + 7  # ids only the resized vocabulary has, as labels too
    inputs["input_ids"][0, 8] = V_NEW - 1
    labels = inputs["input_ids"].masked_fill(labels == -100, -100)
    return inputs, labels


def fused_hooks(head: torch.nn.Module) -> list:
    """The patch's traces on a module: its pre-hooks that are fused_dft's, and its slot."""
    hooks = [h for h in head._forward_pre_hooks.values() if h is _capture_pre_hook]
    return hooks + ([SLOT_ATTR] if SLOT_ATTR in head.__dict__ else [])


def assert_matches_stock(patched, stock, inputs, labels, train: bool):
    """The patched forward's loss (and eval logits) and gradients equal the stock model's."""
    patched.train(train)
    stock.train(train)
    expected, logits = stock_loss(stock, inputs, labels)
    out = patched(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, expected, rtol=RTOL, atol=ATOL)
    if train:
        assert out.logits is None
    else:
        torch.testing.assert_close(out.logits, logits, rtol=1e-6, atol=1e-6)
    expected.backward()
    out.loss.backward()
    assert_grads_equal(patched, stock)


def resize(model, tied: bool):
    torch.manual_seed(3)  # the added rows are drawn at random: the same ones for both models
    model.resize_token_embeddings(V_NEW, mean_resizing=False)
    assert model.lm_head.weight.shape[0] == V_NEW
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


# Untied, resize_token_embeddings builds a new lm_head module (the failing case of issue 16);
# tied, it keeps the module and resizes the shared weight. Both modes: training builds no
# logits (the hook hands the head an empty slice), eval returns the stock logits.
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resize_token_embeddings_after_patching(tied, train):
    stock = llama(tied)
    patched = fused_dft.patch_model(copy.deepcopy(stock))
    old_head = patched.lm_head
    resize(stock, tied)
    resize(patched, tied)
    assert (patched.lm_head is old_head) == tied
    inputs, labels = batch_with_new_tokens()
    assert_matches_stock(patched, stock, inputs, labels, train)
    assert len(fused_hooks(patched.lm_head)) == 2  # one pre-hook and the slot, on the new head
    if not tied:
        assert fused_hooks(old_head) == []  # moved off the old head at the first call

    fused_dft.unpatch_model(patched)
    assert fused_hooks(patched.lm_head) == [] and fused_hooks(old_head) == []
    assert type(patched) is transformers.LlamaForCausalLM


# set_output_embeddings with a new Linear (here with a bias the old head did not have), in both
# modes; the same Linear's copy on the stock model.
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_set_output_embeddings_after_patching(train):
    stock = llama(tied=False)
    patched = fused_dft.patch_model(copy.deepcopy(stock))
    old_head = patched.lm_head
    torch.manual_seed(4)
    new_head = torch.nn.Linear(COMMON["hidden_size"], V, bias=True)
    stock.set_output_embeddings(copy.deepcopy(new_head))
    patched.set_output_embeddings(new_head)
    inputs, labels = ragged_batch()
    assert_matches_stock(patched, stock, inputs, labels, train)
    assert new_head.bias.grad is not None and fused_hooks(old_head) == []
    fused_dft.unpatch_model(patched)
    assert fused_hooks(new_head) == [] and fused_hooks(old_head) == []


# Replaced and then unpatched, copied or pickled before any patched call: the hook is still on
# the old head, which the state names, so unpatch_model cleans it and a copy follows its own
# new head.
def test_unpatch_and_copies_before_the_first_call_with_the_new_head():
    stock = llama(tied=False)
    inputs, labels = ragged_batch()
    patched = fused_dft.patch_model(copy.deepcopy(stock))
    old_head = patched.lm_head
    torch.manual_seed(4)
    new_head = torch.nn.Linear(COMMON["hidden_size"], V, bias=False)
    patched.set_output_embeddings(new_head)
    stock.set_output_embeddings(copy.deepcopy(new_head))
    expected, _ = stock_loss(stock, inputs, labels)
    for clone in (copy.deepcopy(patched), pickle.loads(pickle.dumps(patched))):
        torch.testing.assert_close(
            clone(**inputs, labels=labels).loss, expected, rtol=RTOL, atol=ATOL
        )
        assert fused_hooks(clone.lm_head) and fused_hooks(old_head)  # the original untouched
        fused_dft.unpatch_model(clone)
        assert not any(fused_hooks(m) for m in clone.modules())

    assert len(fused_hooks(old_head)) == 2 and fused_hooks(new_head) == []
    fused_dft.unpatch_model(patched)
    assert fused_hooks(old_head) == [] and fused_hooks(new_head) == []
    torch.testing.assert_close(
        patched(**inputs, labels=labels).loss, stock(**inputs, labels=labels).loss
    )


# A new lm_head that computes more than F.linear is refused at the call, naming it.
def test_replaced_head_that_is_not_a_linear_is_refused():
    patched = fused_dft.patch_model(llama(tied=False))
    patched.set_output_embeddings(torch.nn.Sequential(patched.lm_head))
    inputs, labels = ragged_batch()
    with pytest.raises(TypeError, match="lm_head of LlamaForCausalLM is a torch.nn"):
        patched(**inputs, labels=labels)
