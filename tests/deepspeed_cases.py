"""What the ranks of test_deepspeed.py run: `torchrun --standalone --nproc-per-node 2 -m
tests.deepspeed_cases OUT_DIR [CASE ...]`, DeepSpeed on the CPU (DS_ACCELERATOR=cpu, gloo).

Each case trains a tiny config-built Qwen2 for 3 steps with HF Trainer (or TRL's SFTTrainer) under
a DeepSpeed config, stock and patched, same seed and data, and compares the logged losses, grad
norms and the final parameters (gathered). Each rank writes {case: None or its traceback} to
OUT_DIR/rank{R}.json.

Shims of the tests, not of the package:
  - accelerate on a CPU-only machine reports one process for DeepSpeed (TrainingArguments makes
    its PartialState without a backend): a PartialState(backend="gloo") is configured first and
    TrainingArguments told to use it (accelerator_config={"use_configured_state": True});
  - DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op at its first
    init_distributed (about 95 s on a fresh machine): replaced by None, so gloo does the
    collectives, as it does for every other op here.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

V = 301
STEPS = 3
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-6

# case -> (stage, how, tied, extra): how is "init" (the config given before the model is built,
# so transformers builds it under deepspeed.zero.Init) or "before" (the model built first)
CASES = {
    "zero3-init-untied": dict(stage=3, how="init", tied=False),
    "zero3-init-tied": dict(stage=3, how="init", tied=True),
    "zero3-before-untied": dict(stage=3, how="before", tied=False),
    "zero3-before-tied": dict(stage=3, how="before", tied=True),
    "zero3-init-gradient-checkpointing": dict(stage=3, how="init", tied=False, ckpt=True),
    "zero3-init-tied-gradient-checkpointing": dict(stage=3, how="init", tied=True, ckpt=True),
    "zero2-untied": dict(stage=2, how="before", tied=False),
    "zero2-tied": dict(stage=2, how="init", tied=True),
    "zero3-trl-dropin": dict(stage=3, how="init", tied=False, trl=True),
    "zero3-dft-untied-no-external-gather": dict(stage=3, how="init", tied=False, dft=True),
    # DeepSpeed keeps a parameter it will use again soon gathered (stage3_max_reuse_distance):
    # the tied weight, the embedding's, would be; 0 shows that the loss holds nothing itself
    "zero3-dft-tied-no-external-gather": dict(
        stage=3,
        how="init",
        tied=True,
        dft=True,
        zero={"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0},
    ),
}


def _ds_config(stage: int, **zero_options) -> dict:
    zero = {"stage": stage, **zero_options}
    if stage == 3:
        # a tiny head is never partitioned otherwise (persisted below 1e5 elements)
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
    }


def _config(tied: bool):
    import transformers

    return transformers.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=V, initializer_range=0.2, tie_word_embeddings=tied,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def _build(tied: bool, ckpt: bool = False):
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        _config(tied), attn_implementation="eager"
    )
    model = model.float()
    if ckpt:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def _rows():
    """Fixed-length rows (default_data_collator), a masked prompt and a padded tail."""
    import datasets

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(16):
        ids = torch.randint(3, V, (12,), generator=g)
        labels = ids.clone()
        labels[:3] = -100
        labels[12 - i % 4 :] = -100
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return datasets.Dataset.from_list(out)


def _common_args(stage: int, **zero_options) -> dict:
    return dict(
        max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", logging_steps=1,
        report_to=[], save_strategy="no", seed=0, data_seed=0, bf16=False,
        deepspeed=_ds_config(stage, **zero_options), ddp_backend="gloo", disable_tqdm=True,
        accelerator_config={"use_configured_state": True},
    )  # fmt: skip


def _forget_ds_config() -> None:
    """A fresh start for the next trainer: no zero.Init from an earlier case's config, and a new
    Accelerator allowed (accelerate refuses a second one with a DeepSpeed plugin)."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state()  # one Accelerator per trainer; the process group stays
    gc.collect()


def _train_hf(spec: dict, patch, out: Path, name: str):
    import transformers

    _forget_ds_config()
    model = None
    if spec["how"] == "before":
        model = _build(spec["tied"], spec.get("ckpt", False))
    kwargs = _common_args(spec["stage"], **spec.get("zero", {}))
    args = transformers.TrainingArguments(output_dir=str(out / name), **kwargs)
    if model is None:
        model = _build(spec["tied"], spec.get("ckpt", False))
    if spec["stage"] == 3:
        assert (model.lm_head.weight.numel() == 0) == (spec["how"] == "init"), "zero.Init?"
    if patch is not None:
        patch(model)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_rows())
    trainer.train()
    return trainer


def _train_trl(fused: bool, out: Path, name: str):
    import trl

    from tests.hf.helpers import tiny_tokenizer
    from tests.integrations.test_trl import text_rows

    _forget_ds_config()
    kwargs = _common_args(3)
    args = trl.SFTConfig(output_dir=str(out / name), max_length=32, loss_type="nll", **kwargs)
    model = _build(tied=False)
    assert model.lm_head.weight.numel() == 0, "the model is not built under zero.Init"
    cls = trl.SFTTrainer
    if fused:
        from fused_dft.integrations.trl import SFTTrainer as cls
    trainer = cls(
        model=model, args=args, train_dataset=text_rows(), processing_class=tiny_tokenizer()
    )
    trainer.train()
    return trainer


def _params(trainer) -> dict:
    import deepspeed

    model = trainer.model
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(
        params, enabled=any(hasattr(p, "ds_id") for p in params)
    ):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(ours, theirs, keys=("loss", "grad_norm")) -> None:
    a_logs = [h for h in ours.state.log_history if "loss" in h]
    b_logs = [h for h in theirs.state.log_history if "loss" in h]
    assert len(a_logs) == len(b_logs) == STEPS, (a_logs, b_logs)
    for step, (a, b) in enumerate(zip(a_logs, b_logs)):
        for key in keys:
            assert math.isclose(a[key], b[key], rel_tol=LOSS_RTOL, abs_tol=1e-7), (step, key, a, b)
    a_params, b_params = _params(ours), _params(theirs)
    moved = 0
    for name, p in a_params.items():
        torch.testing.assert_close(p, b_params[name], rtol=0, atol=PARAM_ATOL, msg=name)
        moved += 1
    assert moved > 10


class _Spy:
    """Counts the fused loss's explicit gathers and records, during the patched forward, whether
    the head weight was ever gathered outside the loss (status after the forward, external
    parameters registered by DeepSpeed's getter)."""

    def __init__(self):
        from fused_dft.hf import zero

        self.zero, self.calls, self.statuses = zero, 0, []
        self.original = zero.gathered_head_loss

        def spy(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        zero.gathered_head_loss = spy
        import fused_dft.hf.call as call

        call.gathered_head_loss = spy

    def close(self):
        import fused_dft.hf.call as call

        self.zero.gathered_head_loss = self.original
        call.gathered_head_loss = self.original


def run_case(case: str, out: Path) -> None:
    import fused_dft

    spec = CASES[case]
    if spec.get("trl"):
        theirs = _train_trl(False, out, "stock")
        ours = _train_trl(True, out, "fused")
        _assert_same(ours, theirs, keys=("loss", "grad_norm", "mean_token_accuracy"))
        return
    if spec.get("dft"):
        spy = _Spy()
        seen = {}

        def patch(model):
            fused_dft.patch_model(model, loss_type="dft")

            def after_forward(module, args, kwargs, output):
                from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

                w = dict.get(module.lm_head._parameters, "weight")  # not DeepSpeed's getter
                seen.setdefault("status", set()).add(w.ds_status == ZeroParamStatus.NOT_AVAILABLE)
                external = [
                    m for m in module.modules() if id(w) in getattr(m, "_external_params", {})
                ]
                seen.setdefault("external", set()).add(bool(external))

            model.register_forward_hook(after_forward, with_kwargs=True)

        try:
            trainer = _train_hf(spec, patch, out, "dft")
        finally:
            spy.close()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
        assert losses[0] != losses[-1], losses
        assert spy.calls >= STEPS * 2, f"the fused ZeRO-3 loss ran {spy.calls} times"
        assert seen["status"] == {True}, "the head weight stayed gathered after the forward"
        assert seen["external"] == {False}, "DeepSpeed registered the head as external"
        params = _params(trainer)
        assert all(torch.isfinite(p).all() for p in params.values())
        return
    fused_calls = []

    def patch(model):
        fused_dft.patch_model(model, loss_type="ce")
        # a fused output carries the batch figures; the stock one does not
        model.register_forward_hook(lambda m, a, out: fused_calls.append("ce_loss" in out))

    theirs = _train_hf(spec, None, out, "stock")
    ours = _train_hf(spec, patch, out, "fused")
    assert fused_calls and all(fused_calls), fused_calls
    _assert_same(ours, theirs)


def main(out_dir: str, cases: list[str]) -> None:
    import deepspeed.comm.torch as ds_torch
    from accelerate import PartialState

    ds_torch.build_shm_op = lambda: None  # see the module doc
    torch.set_num_threads(1)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]
    assert state.num_processes == 2, state
    out = Path(out_dir)
    results = {}
    try:
        for case in cases or list(CASES):
            try:
                run_case(case, out / case)
                results[case] = None
            except AssertionError:
                results[case] = traceback.format_exc()
            except Exception:
                results[case] = traceback.format_exc()
                break  # the ranks may now disagree on the collectives still to come
    finally:
        Path(out, f"rank{state.process_index}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
