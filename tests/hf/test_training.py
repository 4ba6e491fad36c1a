"""Training a patched model with HF Trainer and PEFT LoRA (a few steps, tiny data).

TRL's SFTTrainer: tests/integrations/test_trl.py. Tiny models and ragged inputs from helpers.py.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fused_dft  # noqa: E402
from fused_dft.hf import is_patched  # noqa: E402

from .helpers import (  # noqa: E402
    ATOL,
    RTOL,
    V,
    assert_grads_equal,
    ragged_batch,
    stock_loss,
    tiny_model,
)


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
