"""Shared helpers of the Hugging Face patch tests (tests/hf) and the TRL tests.

Every model is a tiny one built from a config (no downloads). The oracle is the stock model's own
logits: DFT (or CE) computed from them in fp32 torch, and, for CE, the stock forward's loss itself.
Inputs are ragged on purpose: batch 3, odd length 11, right padding with -100 labels, a masked
prompt, so shifting, ignoring and the mean over valid tokens are all exercised.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

V = 301  # odd vocabulary, not a multiple of any tile size
COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=V,
    initializer_range=0.2,  # logits of order 1, so DFT's p-weights differ across tokens
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(output_router_logits=True, router_aux_loss_coef=0.3)  # a coefficient large enough to see

# One config per family: the five, plus the other logit transforms (Cohere's logit_scale,
# Granite's logits_scaling) and a second MoE family with shared experts. Gemma 2's softcap is small
# (2.0) so that tanh is far from linear on these logits, and it ties its embeddings.
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "gemma2": lambda: transformers.Gemma2Config(
        **COMMON, head_dim=8, query_pre_attn_scalar=8, sliding_window=6, final_logit_softcapping=2.0
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2, **MOE
    ),
    "cohere": lambda: transformers.CohereConfig(**COMMON, logit_scale=0.5),
    "granite": lambda: transformers.GraniteConfig(**COMMON, logits_scaling=4.0),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        **MOE,
    ),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe")
RTOL, ATOL = 1e-4, 1e-5  # fp32 loss
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6  # fp32 gradients (entries of order 1e-3 .. 1e-1)


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().train()


def ragged_batch(seed: int = 1, batch: int = 3, length: int = 11):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, V, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, -4:] = 0  # right padding
    attention_mask[2, -1:] = 0
    input_ids[attention_mask == 0] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :3] = -100  # a prompt that is not trained on
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def shifted(labels: torch.Tensor, fill=-100) -> torch.Tensor:
    return F.pad(labels, (0, 1), value=fill)[..., 1:]


def loss_from_logits(logits, shift_labels, loss_type="dft", num_items=None):
    """The oracle: DFT / CE from full logits, mean over valid tokens or sum / num_items."""
    z = logits.float().reshape(-1, logits.shape[-1])
    y = shift_labels.reshape(-1)
    valid = y != -100
    logp = z[valid].log_softmax(-1).gather(-1, y[valid, None]).squeeze(-1)
    per_token = -logp if loss_type == "ce" else -logp.detach().exp() * logp
    return per_token.sum() / (valid.sum() if num_items is None else num_items)


def stock_loss(model, inputs, labels, loss_type="dft", shift_labels=None, num_items=None):
    """What the patched model should return, from the stock model's logits (+ its router loss)."""
    out = model(**inputs)
    y = shifted(labels) if shift_labels is None else shift_labels
    loss = loss_from_logits(out.logits, y, loss_type, num_items)
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + model.config.router_aux_loss_coef * out.aux_loss
    return loss, out.logits


def assert_grads_equal(patched, stock, min_checked=10):
    stock_params = dict(stock.named_parameters())
    checked = 0
    for name, p in patched.named_parameters():
        q = stock_params[name]
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), f"{name}: gradient where the stock has none"
            continue
        assert p.grad is not None, f"{name}: no gradient, stock has one"
        torch.testing.assert_close(p.grad, q.grad, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)
        checked += 1
    assert checked >= min_checked


def tiny_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, V)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
