"""fused_dft.integrations.trl.SFTTrainer against TRL's own SFTTrainer, same model, data and seed.

The oracle is TRL itself, in fp32 (its chunked LM head, its loss_type "dft" / "nll"): several
optimizer steps with gradient accumulation 2, then the logged losses and metrics and every
parameter must agree to fp32 round-off. Cases: plain language modelling, prompt-completion
(completion-only loss) padding-free, packing, a MoE model with its router loss (scaled by the
accumulation steps, as TRL does), LoRA. The optimizer is SGD: AdamW divides each gradient by its
own running norm, which blows the round-off of a near-zero gradient up to a full step.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

import fused_dft  # noqa: E402
from fused_dft.integrations.trl import SFTTrainer  # noqa: E402

from ..hf.helpers import V, tiny_model, tiny_tokenizer  # noqa: E402

LOSS_RTOL = 1e-5  # logged losses (means of fp32 sums over ~100 tokens)
PARAM_ATOL = 1e-6  # parameters after 3 SGD steps at lr 0.5 (updates of order 1e-2)


def text_rows(n=24, seed=20, prompt_completion=False):
    """Sentences with a learnable rule (each token is the previous one + 3), ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(3, V - 3, (1,), generator=g))
        length = int(torch.randint(5, 13, (1,), generator=g))
        words = [f"t{3 + (start + 3 * i) % (V - 3)}" for i in range(length)]
        if prompt_completion:
            cut = len(words) // 2
            rows.append(
                {"prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:])}
            )
        else:
            rows.append({"text": " ".join(words)})
    return datasets.Dataset.from_list(rows)


def train(trainer_cls, model, dataset, tmp_path, name, **config):
    # fp32: TRL 1.16 defaults to bf16 autocast, where the two agree only to bf16 noise
    args = trl.SFTConfig(
        output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, optim="sgd", learning_rate=0.5, logging_steps=1,
        report_to=[],
        use_cpu=True, save_strategy="no", seed=0, data_seed=0, bf16=False,
        **{"max_length": 32, **config},
    )  # fmt: skip
    trainer = trainer_cls(
        model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer()
    )
    trainer.train()
    return trainer


def assert_same_training(
    ours, theirs, keys=("loss", "entropy", "mean_token_accuracy", "num_tokens")
):
    ours_logs = [h for h in ours.state.log_history if "loss" in h]
    theirs_logs = [h for h in theirs.state.log_history if "loss" in h]
    assert len(ours_logs) == len(theirs_logs) == 3
    for step, (a, b) in enumerate(zip(ours_logs, theirs_logs)):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=LOSS_RTOL, abs=1e-7), (step, key, a, b)
    theirs_params = dict(theirs.model.named_parameters())
    moved = 0
    for name, p in ours.model.named_parameters():
        q = theirs_params[name]
        torch.testing.assert_close(p, q, rtol=0, atol=PARAM_ATOL, msg=name)
        moved += p.requires_grad
    assert moved > 0


CASES = {
    "dft": dict(family="qwen2", data={}, config=dict(loss_type="dft")),
    "nll": dict(family="qwen2", data={}, config=dict(loss_type="nll")),
    "dft_completion_only_padding_free": dict(
        family="llama",
        data=dict(prompt_completion=True),
        config=dict(loss_type="dft", padding_free=True, max_length=None),
    ),
    "dft_packing": dict(family="llama", data={}, config=dict(loss_type="dft", packing=True)),
    "dft_moe_router_loss": dict(family="mixtral", data={}, config=dict(loss_type="dft")),
}


# Each case: TRL's SFTTrainer and ours from the same initial weights; 3 steps x 2 micro-batches.
@pytest.mark.parametrize("case", list(CASES))
def test_matches_trl_over_accumulated_steps(case, tmp_path):
    spec = CASES[case]
    model = tiny_model(spec["family"])
    data = text_rows(**spec["data"])
    theirs = train(trl.SFTTrainer, copy.deepcopy(model), data, tmp_path, "trl", **spec["config"])
    ours = train(SFTTrainer, model, data, tmp_path, "ours", **spec["config"])
    assert fused_dft.is_patched(ours.model)
    assert_same_training(ours, theirs)
    logs = [h for h in ours.state.log_history if "loss" in h]
    if spec["config"]["loss_type"] == "dft":  # CE next to DFT, from the same pass
        assert all(h["loss"] < h["ce_loss"] / 5 for h in logs)
    if case == "dft_moe_router_loss":
        assert ours.aux_loss_enabled and all("aux_loss" in h for h in logs)
        keys = [h["aux_loss"] for h in theirs.state.log_history if "loss" in h]
        assert [h["aux_loss"] for h in logs] == pytest.approx(keys, rel=LOSS_RTOL)


# LoRA: the same adapters (made before the trainers, so both start from the same A and B).
def test_matches_trl_with_lora(tmp_path):
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(tiny_model("mistral"), lora)
    data = text_rows(seed=21)
    theirs = train(trl.SFTTrainer, copy.deepcopy(model), data, tmp_path, "trl", loss_type="dft")
    ours = train(SFTTrainer, model, data, tmp_path, "ours", loss_type="dft")
    assert fused_dft.is_patched(ours.model)
    assert ours.model.get_base_model().lm_head.weight.grad is None
    assert_same_training(ours, theirs)


# A whole accumulation window without a trained token (num_items_in_batch == 0, e.g. prompts
# truncated before their completion): TRL clamps the divisor to 1, so the loss is a finite 0 and
# the gradients zero; an AdamW step then leaves every parameter finite and equal to TRL's.
@pytest.mark.parametrize("loss_type", ["dft", "nll"])
def test_window_without_trained_tokens_matches_trl(loss_type, tmp_path):
    model = tiny_model("llama")
    data = text_rows(n=4, seed=23)
    trainers = []
    for cls in (SFTTrainer, trl.SFTTrainer):
        config = trl.SFTConfig(
            output_dir=str(tmp_path / cls.__module__), report_to=[], use_cpu=True, bf16=False,
            loss_type=loss_type,
        )  # fmt: skip
        trainers.append(
            cls(model=copy.deepcopy(model), args=config, train_dataset=data,
                processing_class=tiny_tokenizer())
        )  # fmt: skip
    inputs = trainers[0].data_collator([trainers[0].train_dataset[i] for i in range(4)])
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    losses, grads = [], []
    for trainer in trainers:
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=torch.tensor(0))
        loss.backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in trainer.model.named_parameters()})
        torch.optim.AdamW(trainer.model.parameters(), lr=0.1).step()
    ours, theirs = losses
    assert float(theirs.detach()) == 0.0 and float(ours.detach()) == 0.0
    assert fused_dft.is_patched(trainers[0].model)
    for name, g in grads[1].items():
        mine = grads[0][name]
        assert g is None or not g.any(), name
        assert mine is None or (torch.isfinite(mine).all() and not mine.any()), name
    for p, q in zip(trainers[0].model.parameters(), trainers[1].model.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# Eval: the loss and TRL's metrics, logged with the eval_ prefix (ce_loss too).
def test_evaluate_logs_fused_figures(tmp_path):
    data = text_rows(seed=22)
    args = dict(loss_type="dft", per_device_eval_batch_size=8)
    trainer = SFTTrainer(
        model=tiny_model("qwen2"),
        args=trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **args),
        train_dataset=data, eval_dataset=data, processing_class=tiny_tokenizer(),
    )  # fmt: skip
    reference = trl.SFTTrainer(
        model=tiny_model("qwen2"),
        args=trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **args),
        train_dataset=data, eval_dataset=data, processing_class=tiny_tokenizer(),
    )  # fmt: skip
    ours, theirs = trainer.evaluate(), reference.evaluate()
    for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
        assert ours[key] == pytest.approx(theirs[key], rel=LOSS_RTOL), key
    assert ours["eval_ce_loss"] > 5 * ours["eval_loss"]


# Bad input: named before training starts.
def test_bad_input(tmp_path):
    data = text_rows(n=4)
    common = dict(train_dataset=data, processing_class=tiny_tokenizer())
    config = trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, loss_type="dft")
    with pytest.raises(TypeError, match=r"unknown options \['softcap'\].*'impl'"):
        SFTTrainer(
            model=tiny_model("qwen2"), args=config, fused_dft_options={"softcap": 2}, **common
        )
    with pytest.raises(ValueError, match="impl"):
        SFTTrainer(
            model=tiny_model("qwen2"), args=config, fused_dft_options={"impl": "x"}, **common
        )
    # an unknown TRL loss type: our warning, then TRL's own error, at construction
    bad = trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, loss_type="kl")
    with (
        pytest.warns(UserWarning, match="no fused equivalent"),
        pytest.raises(ValueError, match="kl"),
    ):
        SFTTrainer(model=tiny_model("qwen2"), args=bad, **common)
    # a family the patch cannot reproduce is refused when the trainer is built
    model = transformers_bart()
    with pytest.raises(ValueError, match="BartForCausalLM"):
        SFTTrainer(model=model, args=config, **common)


def transformers_bart():
    import transformers

    config = transformers.BartConfig(
        vocab_size=V, d_model=32, decoder_layers=1, encoder_layers=1, decoder_attention_heads=2,
        encoder_attention_heads=2, decoder_ffn_dim=32, encoder_ffn_dim=32, is_decoder=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    return transformers.BartForCausalLM(config)


# Label smoothing with "nll" needs the full logits: TRL's own loss, with a warning.
def test_falls_back_to_trl_with_a_warning(tmp_path):
    config = trl.SFTConfig(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, label_smoothing_factor=0.1
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = SFTTrainer(
            model=tiny_model("qwen2"), args=config, train_dataset=text_rows(n=4),
            processing_class=tiny_tokenizer(),
        )  # fmt: skip
    assert any("label_smoothing_factor=0.1 needs the full logits" in str(w.message) for w in caught)
    assert not fused_dft.is_patched(trainer.model)


class ASFTFromLogits(trl.SFTTrainer):
    """The oracle for the drop-in's ASFT (TRL has none): TRL's trainer with a compute_loss written
    here from full logits of the policy and the reference on the same batch, reduced as TRL reduces
    DFT: per valid token -sg(p_y) log p_y + alpha * sum_v q_v (log q_v - log p_v), summed, divided
    by num_items_in_batch (clamped to 1)."""

    ref_model = None
    alpha = 0.1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {k: v for k, v in inputs.items() if k != "labels"}
        logits = model(**batch, use_cache=False).logits.float()
        with torch.no_grad():
            ref_logits = self.ref_model(**batch, use_cache=False).logits.float()
        labels = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[..., 1:]
        valid = labels != -100
        logp, log_q = logits.log_softmax(-1), ref_logits.log_softmax(-1)
        logp_y = logp[valid].gather(-1, labels[valid][:, None]).squeeze(-1)
        kl = (log_q.exp() * (log_q - logp)).sum(-1)[valid]
        total = (-logp_y.detach().exp() * logp_y + self.alpha * kl).sum()
        return total / torch.as_tensor(num_items_in_batch).clamp(min=1)


# ASFT through the drop-in: ref_model= with SFTConfig(loss_type="dft"), asft_alpha in
# fused_dft_options; losses and parameters after 3 accumulated steps equal the oracle's; the
# reference (another seed, so the KL is large from step 1) ends unchanged and without gradients.
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_asft_with_ref_model_matches_full_logits(family, tmp_path):
    model, ref = tiny_model(family), tiny_model(family, seed=5)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    data = text_rows(seed=24)
    ASFTFromLogits.ref_model, ASFTFromLogits.alpha = copy.deepcopy(ref).eval(), 0.4
    theirs = train(ASFTFromLogits, copy.deepcopy(model), data, tmp_path, "oracle", loss_type="dft")

    def ours_cls(**kwargs):
        return SFTTrainer(ref_model=ref, fused_dft_options={"asft_alpha": 0.4}, **kwargs)

    ours = train(ours_cls, model, data, tmp_path, "ours", loss_type="dft")
    assert fused_dft.is_patched(ours.model)
    assert ours.model._fused_dft_patch.loss_type == "asft"
    assert_same_training(ours, theirs, keys=("loss",))
    logs = [h for h in ours.state.log_history if "loss" in h]
    assert all("ce_loss" in h for h in logs)  # CE logged beside it, from the same pass
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in ref.parameters())


def test_ref_model_needs_the_dft_loss(tmp_path):
    data = text_rows(n=4)
    common = dict(train_dataset=data, processing_class=tiny_tokenizer())
    nll = trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, loss_type="nll")
    with pytest.raises(ValueError, match="ref_model is used by ASFT.*loss_type='nll'"):
        SFTTrainer(model=tiny_model("qwen2"), args=nll, ref_model=tiny_model("qwen2", 5), **common)
    dft = trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, loss_type="dft")
    with pytest.raises(ValueError, match="ref_model's lm_head has a vocabulary"):
        other = tiny_model("qwen2", 5)
        other.resize_token_embeddings(V + 3)
        SFTTrainer(model=tiny_model("qwen2"), args=dft, ref_model=other, **common)
    # asft_alpha without a reference model: the option belongs to asft, not dft
    with pytest.raises(ValueError, match="asft_alpha"):
        SFTTrainer(model=tiny_model("qwen2"), args=dft, fused_dft_options={"asft_alpha": 0.2},
                   **common)  # fmt: skip
