"""LLaMA-Factory's loss flags -> patch_model's options; no LLaMA-Factory import (unit-tested alone).

`fused_dft.integrations.llamafactory` calls these with `vars()` of LLaMA-Factory's
FinetuningArguments and ModelArguments, before anything is loaded.
"""

from __future__ import annotations

from typing import Any

# the LLaMA-Factory releases the adapter was run against (docs/integrations.md): another one may
# have moved the flags or the loss functions it replaces
TESTED_VERSIONS = ("0.9.5",)

# LLaMA-Factory's top-k for use_eaft_loss (_eaft_cross_entropy: torch.topk(k=20), entropy / 3.0);
# eaft_topk=20 gives fused_dft's normalizer 3 by default
EAFT_TOPK = 20

# settings that replace the model's forward, its loss or its trainer: the patch would be bypassed
# or would bypass them. name -> why
REFUSED_SETTINGS = {
    "use_asft_loss": (
        "the fused ASFT needs the reference model's hidden states, which patch_model does not "
        "feed yet (use llamafactory-cli for ASFT, or fused_linear_dft_loss(loss_type='asft', "
        "ref_hidden=..., ref_weight=...) in your own loop)"
    ),
    "enable_liger_kernel": "Liger replaces the model's forward and loss; use one or the other",
    "use_unsloth": "unsloth replaces the model's forward",
    "use_kt": "KTransformers replaces the model and its trainer",
    "use_mca": "mcore_adapter (Megatron) has its own trainer and loss",
    "use_hyper_parallel": "the hyper_parallel trainer has its own loss",
}


def check_version(version: str) -> None:
    if version not in TESTED_VERSIONS:
        raise RuntimeError(
            f"fused_dft.integrations.llamafactory: LLaMA-Factory {version} is not a version this "
            f"adapter was tested with ({', '.join(TESTED_VERSIONS)}); its loss flags or the "
            "functions it replaces may differ. Install llamafactory==" + TESTED_VERSIONS[-1]
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
    dft, eaft = bool(finetuning.get("use_dft_loss")), bool(finetuning.get("use_eaft_loss"))
    if dft and eaft:
        # LLaMA-Factory would silently take use_dft_loss
        raise ValueError(
            "fused_dft.integrations.llamafactory: use_dft_loss and use_eaft_loss are both true; "
            "set one"
        )
    if dft:
        return {"loss_type": "dft"}
    if eaft:
        alpha = finetuning.get("eaft_alpha", 1.0)
        return {"loss_type": "eaft", "eaft_topk": EAFT_TOPK, "eaft_alpha": float(alpha)}
    return {"loss_type": "ce"}
