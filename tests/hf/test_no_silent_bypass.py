"""No silent bypass: a patched model called in training mode, with gradients, without labels
(what a trainer does when it takes the labels out to compute its own loss: LLaMA-Factory's
use_dft_loss, ms-swift's --enable_dft_loss, HF Trainer's compute_loss_func) warns once, naming
what to use instead; inference (eval mode, no_grad, generate) does not."""

from __future__ import annotations

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
