"""LLaMA-Factory's loss flags -> patch_model's options; no LLaMA-Factory import (unit-tested alone).

`fused_dft.integrations.llamafactory` calls these with `vars()` of LLaMA-Factory's
FinetuningArguments and ModelArguments, before anything is loaded.
"""

from __future__ import annotations

from typing import Any

from .versions import check_tested_version

# the LLaMA-Factory releases the adapter was run against (docs/integrations.md): another one may
# have moved the flags or the loss functions it replaces
TESTED_VERSIONS = ("0.9.5",)

# LLaMA-Factory's top-k for use_eaft_loss (_eaft_cross_entropy: torch.topk(k=20), entropy / 3.0);
# eaft_topk=20 gives fused_dft's normalizer 3 by default
EAFT_TOPK = 20

# LLaMA-Factory's loss flags, in the order its trainer reads them
LOSS_FLAGS = ("use_dft_loss", "use_eaft_loss", "use_asft_loss")

# settings that replace the model's forward, its loss or its trainer: the patch would be bypassed
# or would bypass them. name -> why
REFUSED_SETTINGS = {
    "enable_liger_kernel": "Liger replaces the model's forward and loss; use one or the other",
    "use_unsloth": "unsloth replaces the model's forward",
    "use_kt": "KTransformers replaces the model and its trainer",
    "use_mca": "mcore_adapter (Megatron) has its own trainer and loss",
    "use_hyper_parallel": "the hyper_parallel trainer has its own loss",
}


def check_version(version: str) -> None:
    check_tested_version(
        caller="fused_dft.integrations.llamafactory",
        trainer="LLaMA-Factory",
        package="llamafactory",
        version=version,
        tested=TESTED_VERSIONS,
        kind="adapter",
        may_differ="its loss flags or the functions it replaces",
    )


def loss_options(finetuning: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """patch_model's keyword arguments for LLaMA-Factory's arguments, or a ValueError naming the
    setting the fused loss cannot honour."""
    settings = {**model, **finetuning}
    for name, why in REFUSED_SETTINGS.items():
        if settings.get(name):
            raise ValueError(f"fused_dft.integrations.llamafactory: {name}=true is refused: {why}")
    stage = finetuning.get("stage", "sft")
    if stage != "sft":
        raise ValueError(
            f"fused_dft.integrations.llamafactory: stage={stage!r} is refused: only stage 'sft' "
            "trains through the fused loss (use llamafactory-cli for the other stages)"
        )
    flags = [f for f in LOSS_FLAGS if finetuning.get(f)]
    if len(flags) > 1:
        # LLaMA-Factory would silently take the first for its loss function (and with
        # use_asft_loss hand that function the reference logits as num_items_in_batch)
        raise ValueError(
            f"fused_dft.integrations.llamafactory: {' and '.join(flags)} are all true; set one"
        )
    if "use_dft_loss" in flags:
        return {"loss_type": "dft"}
    if "use_eaft_loss" in flags:
        alpha = finetuning.get("eaft_alpha", 1.0)
        return {"loss_type": "eaft", "eaft_topk": EAFT_TOPK, "eaft_alpha": float(alpha)}
    if "use_asft_loss" in flags:
        if finetuning.get("finetuning_type") == "lora" and not finetuning.get("ref_model"):
            raise ValueError(
                "fused_dft.integrations.llamafactory: use_asft_loss=true with "
                "finetuning_type=lora needs ref_model: LLaMA-Factory 0.9.5 builds no reference "
                "model for LoRA (create_ref_model returns None), so there is nothing to anchor to"
            )
        return {"loss_type": "asft", "asft_alpha": float(finetuning.get("asft_alpha", 0.1))}
    return {"loss_type": "ce"}
