"""The patch keeps the stock behaviour: no labels, eval, generate, unpatch, introspection, copies.

Tiny models and ragged inputs from helpers.py.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fused_dft  # noqa: E402
from fused_dft.hf import is_patched  # noqa: E402

from .helpers import (  # noqa: E402
    ATOL,
    MOE_FAMILIES,
    RTOL,
    V,
    loss_from_logits,
    ragged_batch,
    shifted,
    stock_loss,
    tiny_model,
)


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


def test_torch_compile():
    model = fused_dft.patch_model(tiny_model("llama"))
    inputs, labels = ragged_batch()
    expected = model(**inputs, labels=labels).loss
    compiled = torch.compile(model, backend="eager")  # Dynamo tracing, no code generation
    out = compiled(**inputs, labels=labels)
    out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss, expected, rtol=RTOL, atol=ATOL)


# (Llama: in this transformers, MoE models hold output-capturing hooks that even the stock model
# cannot pickle.)
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
