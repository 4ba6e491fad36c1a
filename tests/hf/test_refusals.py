"""What patch_model refuses: verify=True against the stock forward, and the model's structure.

Tiny models and ragged inputs from helpers.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fused_dft  # noqa: E402

from .helpers import (  # noqa: E402
    ATOL,
    COMMON,
    RTOL,
    assert_grads_equal,
    ragged_batch,
    stock_loss,
    tiny_model,
)


# A config attribute the family does not apply (Llama ignores logit_scale): verify finds, from
# the stock logits, that no transform applies, and the fused loss uses none; verify=False trusts
# the config's usual reading instead (here a wrong one, the user's call).
def test_verify_finds_the_transform_the_family_applies():
    config = transformers.LlamaConfig(**COMMON, logit_scale=0.5)
    model = transformers.AutoModelForCausalLM.from_config(config)
    stock = copy.deepcopy(model)
    fused_dft.patch_model(model)
    state = model.__dict__[fused_dft.hf.STATE_ATTR]
    assert state.transform.kernel_scale == 1.0
    inputs, labels = ragged_batch()
    expected, _ = stock_loss(stock, inputs, labels)
    torch.testing.assert_close(model(**inputs, labels=labels).loss, expected, rtol=RTOL, atol=ATOL)
    unchecked = fused_dft.patch_model(copy.deepcopy(stock), verify=False)
    assert unchecked.__dict__[fused_dft.hf.STATE_ATTR].transform.kernel_scale == 0.5


class DoubledLogits(transformers.LlamaForCausalLM):
    """A family the patch does not know: it rescales its logits after lm_head."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_verify_refuses_unknown_family():
    model = DoubledLogits(transformers.LlamaConfig(**COMMON))
    with pytest.raises(ValueError, match="DoubledLogits"):
        fused_dft.patch_model(model)
    assert type(model) is DoubledLogits


def test_structure_errors():
    with pytest.raises(TypeError, match="has no lm_head"):
        fused_dft.patch_model(transformers.LlamaModel(transformers.LlamaConfig(**COMMON)))
    with pytest.raises(TypeError, match="causal LM"):
        fused_dft.patch_model(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match="softcap"):
        fused_dft.patch_model(tiny_model("llama"), softcap=3.0)
    with pytest.raises(ValueError, match="loss_type"):
        fused_dft.patch_model(tiny_model("llama"), loss_type="kl")
    # asft needs its reference model (tests/hf/test_asft.py has the other reference refusals)
    with pytest.raises(ValueError, match="loss_type='asft' needs ref_model="):
        fused_dft.patch_model(tiny_model("llama"), loss_type="asft")


# TRL's SFTTrainer puts its own forward on the instance; patching after that would be hidden.
def test_refuses_a_shadowed_forward():
    model = tiny_model("llama")
    model.forward = model.forward
    with pytest.raises(RuntimeError, match="before handing it to a trainer"):
        fused_dft.patch_model(model)


# A model on the meta device (built under torch.device("meta"), as transformers' tests and FSDP2
# recipes do): verify=True says what to do; verify=False patches it, and once materialized
# (to_empty, then the weights and buffers loaded) it trains as the stock model, and a second
# patch_model verifies it.
def test_meta_device_model():
    stock = tiny_model("llama")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            stock.config, attn_implementation="eager"
        )
    with pytest.raises(ValueError, match=r"meta device .*to_empty.*verify=False") as info:
        fused_dft.patch_model(model)
    assert "lm_head.weight" in str(info.value) or "embed_tokens" in str(info.value)
    assert type(model) is transformers.LlamaForCausalLM and not fused_dft.is_patched(model)

    fused_dft.patch_model(model, verify=False)
    model.to_empty(device="cpu")
    model.load_state_dict(stock.state_dict())
    for buffer, value in zip(model.buffers(), stock.buffers()):
        buffer.copy_(value)  # rotary inv_freq: not in the state dict
    model.train()
    inputs, labels = ragged_batch()
    expected, _ = stock_loss(stock, inputs, labels)
    out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, expected, rtol=RTOL, atol=ATOL)
    expected.backward()
    out.loss.backward()
    assert_grads_equal(model, stock)
    fused_dft.patch_model(model)  # verify=True on the materialized model
    assert fused_dft.is_patched(model)
