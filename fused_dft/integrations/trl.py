"""TRL's SFTTrainer through the fused loss: `from fused_dft.integrations.trl import SFTTrainer`.

A subclass of `trl.SFTTrainer` with the same arguments. With `SFTConfig(loss_type="dft")` or
`"nll"` the model is patched (fused_dft.patch_model) when the trainer is built, in place of the
chunked LM head TRL installs, and `compute_loss` keeps TRL's semantics:
  - the loss is the sum over the valid tokens of this micro-batch divided by
    `num_items_in_batch` (the valid tokens of the whole accumulated batch, clamped to 1 as TRL
    does: 0 for a window with none) when Trainer passes it, else their mean (0 for a micro-batch
    with none); times the number of processes with
    `average_tokens_across_devices`;
  - MoE: `router_aux_loss_coef` (TRL's, from SFTConfig or the config) times the router loss of
    the family's own forward, divided by the accumulation steps when `num_items_in_batch` is
    passed;
  - the labels are the collator's (completion-only, assistant-only, packing and padding-free
    batches arrive as labels with -100 and position_ids, as TRL makes them);
  - TRL's metrics, `mean_token_accuracy`, `entropy`, `num_tokens` (and `aux_loss`), come from the
    same fused pass; with DFT the mean cross-entropy is logged too, as `ce_loss`.
ASFT (DFT anchored to a frozen reference model by asft_alpha * KL(reference || policy) per token):
`SFTTrainer(..., ref_model=ref)` with `SFTConfig(loss_type="dft")` trains loss_type="asft"
(`fused_dft_options={"asft_alpha": ...}`, default 0.1); the patched model runs the reference under
no_grad on each batch (see fused_dft.hf.ref_model: held beside the model, not prepared by
accelerate, moved to the batch's device at its first call). Both terms are reduced as TRL reduces
DFT (summed over the valid tokens, divided by `num_items_in_batch`). TRL has no ASFT of its own.
Other loss types, a `compute_loss_func`, or label smoothing with "nll" need the full logits: the
trainer then warns and is TRL's own. An SFTConfig loss type TRL does not know fails in TRL's own
check, before training starts.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from typing import Any

import torch

try:
    import trl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fused_dft.integrations.trl needs TRL: pip install 'fused-dft[trl]'") from exc

from ..arguments import check_impl
from ..hf import is_patched, patch_model
from ..hf.state import loss_option_names

# TRL's loss_type -> fused_dft's loss_type: the losses the fused kernels compute. A new pair is
# one entry here.
LOSS_TYPES = {"dft": "dft", "nll": "ce"}


# Options of the fused loss this trainer accepts (fused_dft_options=...): patch_model's, except
# ignore_index, which TRL's collators fix to -100.
def trainer_options() -> tuple[str, ...]:
    return ("impl",) + tuple(name for name in loss_option_names() if name != "ignore_index")


class SFTTrainer(trl.SFTTrainer):
    """`trl.SFTTrainer` whose "dft" and "nll" losses run through fused_dft (see the module doc).

    fused_dft_options: {"impl": ..., "chunk_size": ...} for the fused loss (see
    fused_linear_dft_loss); checked before anything is built.
    ref_model: a frozen reference model: with SFTConfig(loss_type="dft") the loss is ASFT
    (module doc); refused with any other loss.
    """

    def __init__(self, *args: Any, fused_dft_options: dict | None = None,
                 ref_model: torch.nn.Module | None = None, **kwargs: Any) -> None:  # fmt: skip
        bound = inspect.signature(trl.SFTTrainer.__init__).bind(None, *args, **kwargs)
        config = bound.arguments.get("args")
        loss_type = getattr(config, "loss_type", "nll") if config is not None else "nll"
        options = _check_options(fused_dft_options)
        self._fused_loss_type = _fused_loss_type(
            loss_type,
            compute_loss_func=bound.arguments.get("compute_loss_func"),
            label_smoothing=getattr(config, "label_smoothing_factor", 0.0) or 0.0,
        )
        if ref_model is not None:
            self._fused_loss_type = _anchored(loss_type, self._fused_loss_type)
            options["ref_model"] = ref_model
        super().__init__(*args, **kwargs)
        if self._fused_loss_type is None:
            return
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and getattr(parallelism, "sp_enabled", False):
            raise ValueError(
                "fused_dft.integrations.trl.SFTTrainer: sequence parallelism is not supported "
                "(its loss is reduced by Trainer across ranks); use trl.SFTTrainer"
            )
        _drop_trl_lm_head(self.model)
        patch_model(self.model, loss_type=self._fused_loss_type, eval_logits=False, **options)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._fused_loss_type is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        extra = {}
        if num_items_in_batch is not None:
            # TRL divides by num_items_in_batch clamped to 1: an accumulation window without a
            # trained token gives a finite 0 (and zero gradients), not 0 / 0
            extra["num_items_in_batch"] = torch.as_tensor(num_items_in_batch).clamp(min=1)
        outputs = model(**inputs, skip_logits=True, **extra)

        # 1. the loss, as TRL reduces it
        loss = outputs["lm_loss"]
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        aux_loss = outputs.get("aux_loss")
        if self.aux_loss_enabled and aux_loss is not None:
            # a per-micro-batch mean: averaged over the accumulation steps, as TRL does
            steps = 1 if num_items_in_batch is None else self.current_gradient_accumulation_steps
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device) / steps

        # 2. TRL's metrics, from the same pass (token-weighted across processes)
        self._log_figures(mode, inputs, outputs)

        if return_outputs:
            # the logits for compute_metrics, as TRL gets them: one more forward, without labels
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss

    def _log_figures(self, mode: str, inputs: dict, outputs) -> None:
        gather = self.accelerator.gather_for_metrics
        count = outputs["num_tokens"].float()
        num_valid = gather(count).sum()

        def token_mean(value: torch.Tensor) -> float:
            total = gather(value.detach().float() * count).sum()
            return (total / num_valid).item() if num_valid > 0 else 0.0

        metrics = self._metrics[mode]
        metrics["entropy"].append(token_mean(outputs["entropy"]))
        metrics["mean_token_accuracy"].append(token_mean(outputs["token_accuracy"]))
        if self._fused_loss_type != "ce":
            metrics["ce_loss"].append(token_mean(outputs["ce_loss"]))
        if mode == "train":
            if "attention_mask" in inputs:
                tokens = gather(inputs["attention_mask"].sum()).sum().item()
            elif "position_ids" in inputs:
                local = torch.tensor(inputs["position_ids"].size(1), device=count.device)
                tokens = gather(local).sum().item()
            else:
                raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled and outputs.get("aux_loss") is not None:
            metrics["aux_loss"].append(gather(outputs["aux_loss"].detach()).mean().item())


def _check_options(options: dict | None) -> dict:
    options = dict(options or {})
    unknown = set(options) - set(trainer_options())
    if unknown:
        raise TypeError(
            f"SFTTrainer(fused_dft_options=...): unknown options {sorted(unknown)}; supported: "
            f"{list(trainer_options())} (ignore_index is TRL's -100)"
        )
    check_impl(options.get("impl", "auto"), options.get("chunk_size"))
    return options


def _fused_loss_type(loss_type: str, compute_loss_func, label_smoothing: float) -> str | None:
    """fused_dft's loss type for TRL's, or None (with a warning) where TRL's own loss must run."""
    fused = LOSS_TYPES.get(loss_type)
    if fused is None:
        reason = f"SFTConfig(loss_type={loss_type!r}) has no fused equivalent"
    elif compute_loss_func is not None:
        reason = "a compute_loss_func needs the full logits"
    elif label_smoothing > 0 and loss_type == "nll":
        reason = f"label_smoothing_factor={label_smoothing} needs the full logits"
    else:
        return fused
    warnings.warn(
        f"fused_dft SFTTrainer: {reason} (fused: loss_type {' or '.join(map(repr, LOSS_TYPES))}); "
        "training with TRL's own loss",
        UserWarning,
        stacklevel=3,
    )
    return None


def _anchored(trl_loss_type: str, fused: str | None) -> str:
    """The fused loss type with a reference model: "asft" (DFT + alpha KL) for TRL's "dft"."""
    if fused != "dft":
        raise ValueError(
            f"fused_dft SFTTrainer: ref_model is used by ASFT, which anchors DFT: it needs "
            f"SFTConfig(loss_type='dft') and the fused loss, got loss_type={trl_loss_type!r}"
            + ("" if fused is not None else " with TRL's own loss (see the warning above)")
        )
    return "asft"


def _drop_trl_lm_head(model) -> None:
    """Remove the forward TRL's add_fused_lm_head set on the instance: the patch replaces it."""
    peft = sys.modules.get("peft")
    target = model.get_base_model() if peft and isinstance(model, peft.PeftModel) else model
    forward = target.__dict__.get("forward")
    if forward is None or is_patched(target):
        return
    # functools.wraps gave TRL's forward the stock name: recognise it by its code
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    trl_dir = os.path.dirname(trl.__file__)
    if code is None or not code.co_filename.startswith(trl_dir):
        name = getattr(forward, "__qualname__", type(forward).__name__)
        raise RuntimeError(
            f"fused_dft SFTTrainer: the model's forward was replaced on the instance by {name!r}, "
            "not by TRL's fused LM head; cannot patch it"
        )
    del target.__dict__["forward"]
