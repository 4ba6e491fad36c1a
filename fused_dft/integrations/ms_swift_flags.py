"""ms-swift's SFT arguments -> patch_model's options; no ms-swift import (unit-tested alone).

`fused_dft.integrations.ms_swift` calls these with `vars()` of ms-swift's SftArguments when its
tuner prepares the model, before the trainer is built.
"""

from __future__ import annotations

from typing import Any

from .versions import check_tested_version

# the ms-swift releases the plugin was run against (docs/integrations.md)
TESTED_VERSIONS = ("4.6.0",)

# the name the plugin registers in ms-swift's tuners_map: `--tuner_type fused_dft`
TUNER = "fused_dft"


def check_version(version: str) -> None:
    check_tested_version(
        caller="fused_dft.integrations.ms_swift",
        trainer="ms-swift",
        package="ms-swift",
        version=version,
        tested=TESTED_VERSIONS,
        kind="plugin",
        may_differ="its trainer's loss path",
    )


def loss_options(args: dict[str, Any], binary_loss_scale: bool) -> dict[str, Any]:
    """patch_model's keyword arguments for ms-swift's SftArguments, or a ValueError naming the
    setting the fused loss cannot honour. binary_loss_scale: whether `--loss_scale` gives 0/1
    weights only (then ms-swift's batches carry no loss_scale column)."""

    def refuse(setting: str, why: str) -> ValueError:
        return ValueError(f"fused_dft.integrations.ms_swift: {setting} is refused: {why}")

    if args.get("rlhf_type"):
        raise refuse(f"rlhf_type={args['rlhf_type']!r}", "only `swift sft` trains through it")
    if args.get("task_type", "causal_lm") != "causal_lm":
        raise refuse(f"task_type={args['task_type']!r}", "only causal_lm has an LM-head loss")
    if not binary_loss_scale:
        # ms-swift takes the labels out of a batch that carries loss_scale, so the patched model
        # would never see them: the weights cannot reach the fused loss as token_weights
        raise refuse(
            f"loss_scale={args.get('loss_scale')!r} (weights other than 0/1)",
            "ms-swift computes a weighted loss from the logits itself; use a 0/1 loss_scale",
        )
    if args.get("loss_type"):
        raise refuse(f"loss_type={args['loss_type']!r}", "a custom loss needs the full logits")
    if (args.get("sequence_parallel_size") or 1) > 1:
        raise refuse("sequence_parallel_size > 1", "ms-swift gathers its own per-token loss")
    if args.get("enable_channel_loss"):
        raise refuse("enable_channel_loss", "the per-channel losses need ms-swift's per-token loss")
    if args.get("use_liger_kernel"):
        raise refuse("use_liger_kernel", "Liger replaces the model's forward and loss")
    if (args.get("label_smoothing_factor") or 0) > 0:
        raise refuse("label_smoothing_factor", "ms-swift's label smoother needs the logits")
    if args.get("tuner_backend") == "unsloth":
        raise refuse("tuner_backend='unsloth'", "unsloth replaces the model's forward")
    return {"loss_type": "dft" if args.get("enable_dft_loss") else "ce"}
