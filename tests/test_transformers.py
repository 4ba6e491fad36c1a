"""patch_model against the stock Hugging Face models it patches.

Every model is a tiny one built from a config (no downloads). The oracle is the stock model's own
logits: DFT (or CE) computed from them in fp32 torch, and, for CE, the stock forward's loss itself.
Inputs are ragged on purpose: batch 3, odd length 11, right padding with -100 labels, a masked
prompt, so shifting, ignoring and the mean over valid tokens are all exercised.
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import fused_dft  # noqa: E402
from fused_dft.transformers import STAT_NAMES, is_patched  # noqa: E402

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


# ---------------------------------------------------------------------------------------------
# Loss and gradients against the stock model


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


# ---------------------------------------------------------------------------------------------
# Stock behaviour kept: no labels, eval, generate, unpatch, introspection, copies


def test_without_labels_runs_stock_forward():
    stock = tiny_model("gemma2")
    patched = fused_dft.patch_model(copy.deepcopy(stock))
    inputs, _ = ragged_batch()
    a, b = stock(**inputs), patched(**inputs)
    assert b.loss is None and not hasattr(b, "ce_loss")
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    # the stock model run the same way: a GEMM over one position may round differently from a
    # slice of the GEMM over all positions (it does on AMD EPYC), so compare like with like
    a, b = stock(**inputs, logits_to_keep=1), patched(**inputs, logits_to_keep=1)
    assert b.logits.shape[1] == 1
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)


# Eval with labels: the loss is still the fused DFT; logits are returned as the stock forward
# returns them (for compute_metrics), with the figures as attributes only (not keys, which
# Trainer.prediction_step would gather as predictions). skip_logits and eval_logits=False turn
# the logits off; return_dict=False gives the tuple.
def test_eval_with_labels_returns_logits_and_fused_loss():
    stock = tiny_model("cohere").eval()
    patched = fused_dft.patch_model(copy.deepcopy(stock)).eval()
    inputs, labels = ragged_batch()
    with torch.no_grad():
        expected, logits = stock_loss(stock, inputs, labels)
        out = patched(**inputs, labels=labels)
        torch.testing.assert_close(out.loss, expected, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(out.logits, logits, rtol=1e-6, atol=1e-6)
        assert set(out.keys()) == set(stock(**inputs, labels=labels).keys())  # loss, logits, cache
        assert float(out.ce_loss) > 5 * float(out.loss)
        assert patched(**inputs, labels=labels, skip_logits=True).logits is None
        loss, logits_tuple = patched(**inputs, labels=labels, return_dict=False, use_cache=False)
        torch.testing.assert_close(loss, expected, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(logits_tuple, logits, rtol=1e-6, atol=1e-6)
        lean = fused_dft.patch_model(copy.deepcopy(stock), eval_logits=False)
        assert lean(**inputs, labels=labels).logits is None


# return_dict=False gives the stock tuple, with the logits slot kept (None) where no logits are
# built, so every other field keeps its stock index: (loss, logits, cache) for Llama, (loss,
# aux_loss, logits, cache, router_logits) for Mixtral.
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_return_dict_false_keeps_the_stock_order(family):
    stock = tiny_model(family)
    patched = fused_dft.patch_model(copy.deepcopy(stock))
    inputs, labels = ragged_batch()
    expected = stock(**inputs, labels=labels, return_dict=False)
    got = patched(**inputs, labels=labels, return_dict=False)
    slot = 2 if family in MOE_FAMILIES else 1
    assert len(got) == len(expected) and got[slot] is None
    assert expected[slot].shape == (*labels.shape, V)
    assert [type(x) for i, x in enumerate(got) if i != slot] == [
        type(x) for i, x in enumerate(expected) if i != slot
    ]
    dft = loss_from_logits(expected[slot], shifted(labels))
    if family in MOE_FAMILIES:
        torch.testing.assert_close(got[1], expected[1], rtol=RTOL, atol=ATOL)
        dft = dft + stock.config.router_aux_loss_coef * expected[1]
    torch.testing.assert_close(got[0], dft, rtol=RTOL, atol=ATOL)


# `fused_dft.transformers.is_patched` after a bare `import fused_dft`, in a fresh process.
def test_submodule_reachable_from_a_bare_import():
    code = (
        "import sys, fused_dft; assert 'transformers' not in sys.modules; "
        "print(fused_dft.transformers.is_patched.__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "is_patched", proc.stderr


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
def test_generate_identical_and_unpatch_restores(family):
    model = tiny_model(family).eval()
    prompt = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(9))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    if family in MOE_FAMILIES:  # transformers 5.17's Mixtral cannot generate with router logits on
        kwargs["output_router_logits"] = False
    before = model.generate(prompt, **kwargs)
    inputs, labels = ragged_batch()
    stock_out = model(**inputs, labels=labels)
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    stock_class = type(model)

    fused_dft.patch_model(model)
    assert is_patched(model) and model.__class__.__name__ == stock_class.__name__
    torch.testing.assert_close(model.generate(prompt, **kwargs), before, rtol=0, atol=0)

    assert fused_dft.unpatch_model(model) is model
    assert type(model) is stock_class and not is_patched(model)
    assert "_fused_dft_patch" not in vars(model) and "forward" not in vars(model)
    assert model.forward.__func__ is stock_class.forward
    torch.testing.assert_close(model.generate(prompt, **kwargs), before, rtol=0, atol=0)
    out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, stock_out.loss, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, stock_out.logits, rtol=0, atol=0)
    assert all(torch.equal(v, state_dict[k]) for k, v in model.state_dict().items())
    assert fused_dft.unpatch_model(model) is model  # idempotent


def test_patch_is_per_instance_and_repatch_replaces_options():
    a, b = tiny_model("llama"), tiny_model("llama")
    fused_dft.patch_model(a)
    assert not is_patched(b) and type(b) is transformers.LlamaForCausalLM
    inputs, labels = ragged_batch()
    assert b(**inputs, labels=labels).logits is not None
    fused_dft.patch_model(a, loss_type="ce")
    torch.testing.assert_close(
        a(**inputs, labels=labels).loss, b(**inputs, labels=labels).loss, rtol=RTOL, atol=ATOL
    )


# Trainer decides from the forward signature what to pass: labels and num_items_in_batch.
def test_signature_seen_by_trainer(tmp_path):
    model = fused_dft.patch_model(tiny_model("llama"))
    params = inspect.signature(model.forward).parameters
    assert "labels" in params and any(p.kind == p.VAR_KEYWORD for p in params.values())
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args)
    assert trainer.model_accepts_loss_kwargs
    assert trainer.label_names == ["labels"]
    # positional arguments bind as in the stock signature
    inputs, labels = ragged_batch()
    out = model(inputs["input_ids"], inputs["attention_mask"], labels=labels)
    torch.testing.assert_close(out.loss, model(**inputs, labels=labels).loss)


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


# (Llama: in this transformers, MoE models hold output-capturing hooks that even the stock model
# cannot pickle.)
def test_torch_compile():
    model = fused_dft.patch_model(tiny_model("llama"))
    inputs, labels = ragged_batch()
    expected = model(**inputs, labels=labels).loss
    compiled = torch.compile(model, backend="eager")  # Dynamo tracing, no code generation
    out = compiled(**inputs, labels=labels)
    out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected, rtol=RTOL, atol=ATOL)


def test_deepcopy_and_pickle_keep_the_patch():
    model = fused_dft.patch_model(tiny_model("llama"))
    inputs, labels = ragged_batch()
    expected = model(**inputs, labels=labels).loss
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    copies.append(torch.load(buffer, weights_only=False))
    for clone in copies:
        assert is_patched(clone) and type(clone) is type(model)
        out = clone(**inputs, labels=labels)
        assert out.logits is None
        torch.testing.assert_close(out.loss, expected, rtol=0, atol=0)
        fused_dft.unpatch_model(clone)
        assert type(clone) is transformers.LlamaForCausalLM


# save_pretrained while patched writes the stock class name; the checkpoint loads unpatched.
def test_save_pretrained_while_patched(tmp_path):
    model = fused_dft.patch_model(tiny_model("gemma2"))
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.architectures == ["Gemma2ForCausalLM"]
    assert type(loaded) is transformers.Gemma2ForCausalLM and not is_patched(loaded)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], p, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Refusals


# A config attribute the family does not apply (Llama ignores logit_scale): verify finds, from
# the stock logits, that no transform applies, and the fused loss uses none; verify=False trusts
# the config's usual reading instead (here a wrong one, the user's call).
def test_verify_finds_the_transform_the_family_applies():
    config = transformers.LlamaConfig(**COMMON, logit_scale=0.5)
    model = transformers.AutoModelForCausalLM.from_config(config)
    stock = copy.deepcopy(model)
    fused_dft.patch_model(model)
    state = model.__dict__[fused_dft.transformers.STATE_ATTR]
    assert state.transform.kernel_scale == 1.0
    inputs, labels = ragged_batch()
    expected, _ = stock_loss(stock, inputs, labels)
    torch.testing.assert_close(model(**inputs, labels=labels).loss, expected, rtol=RTOL, atol=ATOL)
    unchecked = fused_dft.patch_model(copy.deepcopy(stock), verify=False)
    assert unchecked.__dict__[fused_dft.transformers.STATE_ATTR].transform.kernel_scale == 0.5


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


# TRL's SFTTrainer puts its own forward on the instance; patching after that would be hidden.
def test_refuses_a_shadowed_forward():
    model = tiny_model("llama")
    model.forward = model.forward
    with pytest.raises(RuntimeError, match="before handing it to a trainer"):
        fused_dft.patch_model(model)


# ---------------------------------------------------------------------------------------------
# Training with HF Trainer, TRL's SFTTrainer and PEFT LoRA (a few steps, tiny data)


def training_rows(n=16, seed=10):
    """Sequences with a learnable rule (each token is the previous one + 3, mod the vocab)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, V - 3, (n,), generator=g).tolist()
    lengths = torch.randint(6, 14, (n,), generator=g).tolist()
    sequences = [
        [1] + [3 + (s + 3 * i) % (V - 3) for i in range(k)] for s, k in zip(starts, lengths)
    ]
    return [{"input_ids": ids} for ids in sequences]


def padded(rows):
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        mask[i, : len(row["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


def figures(model, rows):
    """(DFT loss, CE) of `model` over `rows`, in eval mode."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        inputs, labels = padded(rows)
        out = model(**inputs, labels=labels, skip_logits=True)
    model.train(was_training)
    return float(out.loss), float(out.ce_loss)


def collate(rows):
    inputs, labels = padded(rows)
    return {**inputs, "labels": labels}


class DFTTrainer(transformers.Trainer):
    """The recipe of docs/transformers.md: HF Trainer, logging the CE next to the DFT loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        if model.training and "ce_loss" in outputs:
            self.__dict__.setdefault("ce_losses", []).append(float(outputs["ce_loss"]))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        ce_losses = self.__dict__.pop("ce_losses", None)
        if ce_losses and "loss" in logs:
            logs["ce_loss"] = sum(ce_losses) / len(ce_losses)
        super().log(logs, *args, **kwargs)


# HF Trainer with gradient accumulation (num_items_in_batch), the dataset columns it keeps chosen
# from the forward signature, then evaluate() with a compute_metrics that needs the logits.
# Learning shows in CE; DFT's own value may rise at first (-p log p grows with p while p < 1/e).
def test_hf_trainer_trains_patched_model(tmp_path):
    datasets = pytest.importorskip("datasets")
    model = fused_dft.patch_model(tiny_model("llama"))
    rows = training_rows()
    seen = []
    forward = model.forward

    @functools.wraps(forward)
    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append((kwargs.get("num_items_in_batch"), out.logits is None))
        return out

    def accuracy(prediction):
        logits, labels = prediction
        predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
        return {"accuracy": float((predicted == target)[target != -100].mean())}

    before = figures(model, rows)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", per_device_eval_batch_size=8,
    )  # fmt: skip
    trainer = DFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
        eval_dataset=datasets.Dataset.from_list(rows[:8]), data_collator=collate,
        compute_metrics=accuracy,
    )  # fmt: skip
    model.forward = spy  # after Trainer's introspection, as accelerate's wrapper would be
    trainer.train()
    metrics = trainer.evaluate()
    del model.forward
    after = figures(model, rows)

    assert after[1] < before[1] - 0.3, (before, after)
    # 8 steps x 2 micro-batches, each with num_items_in_batch and without logits; then one eval
    # batch, with logits (compute_metrics used them)
    assert [no_logits for _, no_logits in seen] == [True] * 16 + [False]
    assert all(n is not None for n, _ in seen)
    assert "eval_accuracy" in metrics and metrics["eval_loss"] < 1.0  # a DFT-sized loss
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 8 and all(h["loss"] < h["ce_loss"] / 5 for h in logs)


def tiny_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, V)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


# PEFT LoRA: patch_model goes through to the base model; the frozen lm_head gets no gradient, the
# loss equals the stock DFT of the LoRA model, and a few steps lower the CE.
def test_peft_lora():
    peft = pytest.importorskip("peft")
    base = tiny_model("mistral")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, lora)
    for name, p in model.named_parameters():  # B = 0 at init would hide the adapters in the check
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    stock = copy.deepcopy(model)
    assert fused_dft.patch_model(model) is model
    assert is_patched(model) and is_patched(model.get_base_model())

    inputs, labels = ragged_batch()
    expected, _ = stock_loss(stock, inputs, labels)
    expected.backward()
    out = model(**inputs, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected, rtol=RTOL, atol=ATOL)
    assert model.get_base_model().lm_head.weight.grad is None
    assert_grads_equal(model, stock, min_checked=8)  # the LoRA A and B matrices

    rows = training_rows(seed=12)
    before = figures(model, rows)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    batch_inputs, batch_labels = padded(rows)
    for _ in range(8):
        optimizer.zero_grad()
        model(**batch_inputs, labels=batch_labels).loss.backward()
        optimizer.step()
    after = figures(model, rows)
    assert after[1] < before[1] - 0.3, (before, after)

    fused_dft.unpatch_model(model)
    assert type(model.get_base_model()) is transformers.MistralForCausalLM


def test_refuses_lora_on_lm_head():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    )
    message = r"is a peft\.tuners\.lora\.layer\.Linear.*keep lm_head out of target_modules"
    with pytest.raises(TypeError, match=message):
        fused_dft.patch_model(model)
