"""No silent bypass: a patched model called in training mode, with gradients, without labels
(what a trainer does when it takes the labels out to compute its own loss: LLaMA-Factory's
use_dft_loss, ms-swift's --enable_dft_loss, HF Trainer's compute_loss_func) warns once, naming
what to use instead; inference (eval mode, no_grad, generate) does not. LLaMA-Factory's own
use_asft_loss, which keeps the labels but reads the logits, half-applies the fused loss (drops
the KL term): warned once too."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

import fused_dft

from .helpers import ragged_batch, tiny_model


def test_training_without_labels_warns_once_per_model():
    model = fused_dft.patch_model(tiny_model("llama"), loss_type="ce")
    inputs, _ = ragged_batch()
    with pytest.warns(UserWarning, match=r"without labels.*use_dft_loss.*enable_dft_loss") as got:
        out = model(**inputs)
    assert out.logits is not None  # the stock forward ran
    message = str(got[0].message)
    assert "LlamaForCausalLM" in message and "patch_model(model, loss_type=...)" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**inputs)  # once per model
    other = fused_dft.patch_model(tiny_model("llama"), loss_type="ce")
    with pytest.warns(UserWarning, match="without labels"):
        other(**inputs)


def test_inference_without_labels_does_not_warn():
    model = fused_dft.patch_model(tiny_model("llama"), loss_type="ce")
    inputs, _ = ragged_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(**inputs)  # training mode, no gradients (e.g. a rollout)
        model.eval()
        model(**inputs)
        model.generate(inputs["input_ids"][:1, :4], max_new_tokens=2, do_sample=False)


def test_hf_trainer_compute_loss_func_warns(tmp_path):
    """HF Trainer with a compute_loss_func takes the labels out of the batch: warned."""
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    model = fused_dft.patch_model(tiny_model("llama"), loss_type="ce")
    inputs, labels = ragged_batch()
    rows = [
        {"input_ids": i.tolist(), "attention_mask": m.tolist(), "labels": y.tolist()}
        for i, m, y in zip(inputs["input_ids"], inputs["attention_mask"], labels)
    ]

    def loss_func(outputs, labels, num_items_in_batch=None):
        return outputs.logits.float().mean()

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=3, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
        compute_loss_func=loss_func,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="without labels.*compute_loss_func"):
        trainer.train()


class _StandInTrainer:
    """LLaMA-Factory 0.9.5's CustomSeq2SeqTrainer.compute_loss with use_asft_loss, reduced to what
    reaches the model: its reference model, then the model called with the labels, then
    asft_loss_func, which returns outputs.loss when the output has no logits."""

    def __init__(self, ref, use_asft_loss=True):
        self.ref_model = ref
        self.finetuning_args = types.SimpleNamespace(use_asft_loss=use_asft_loss)

    def compute_loss(self, model, inputs, *args, **kwargs):
        with torch.no_grad():
            ref_logits = self.ref_model(input_ids=inputs["input_ids"]).logits
        outputs = model(**inputs)
        if outputs.get("logits") is None:
            return outputs.get("loss")
        return outputs.logits.float().mean() + 0 * ref_logits.sum()


@pytest.fixture
def llamafactory_trainer(monkeypatch):
    module = types.ModuleType("llamafactory.train.sft.trainer")
    module.CustomSeq2SeqTrainer = _StandInTrainer
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return _StandInTrainer


# LLaMA-Factory's own ASFT with a patched (non-asft) model: the KL term would be dropped
# silently; the patched forward warns once, naming the adapter. With use_asft_loss off, with
# the patch's own asft, or outside that trainer, it does not.
def test_llamafactory_asft_half_applied_warns_once(llamafactory_trainer):
    model = fused_dft.patch_model(tiny_model("llama"), loss_type="dft")
    inputs, labels = ragged_batch()
    trainer = llamafactory_trainer(tiny_model("llama", seed=3).eval())
    with pytest.warns(UserWarning, match=r"use_asft_loss.*KL term.*dropped") as got:
        loss = trainer.compute_loss(model, {**inputs, "labels": labels})
    assert "fused_dft.integrations.llamafactory" in str(got[0].message)
    assert "loss_type='dft'" in str(got[0].message) and loss is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.compute_loss(model, {**inputs, "labels": labels})  # once per model
        other = fused_dft.patch_model(tiny_model("llama"), loss_type="dft")
        llamafactory_trainer(trainer.ref_model, use_asft_loss=False).compute_loss(
            other, {**inputs, "labels": labels}
        )
        other(**inputs, labels=labels)  # not called by that trainer
        anchored = fused_dft.patch_model(
            tiny_model("llama"), loss_type="asft", ref_model=trainer.ref_model
        )
        trainer.compute_loss(anchored, {**inputs, "labels": labels})
