"""ms-swift's `swift sft` through the fused loss: an external plugin and a tuner.

    swift sft --model ... --enable_dft_loss true \
        --external_plugins "$(python -m fused_dft.integrations.ms_swift)" --tuner_type fused_dft

`python -m fused_dft.integrations.ms_swift` prints this file's path. ms-swift imports it by path
(`--external_plugins`), which registers the tuner `fused_dft` in its `tuners_map`; with
`--tuner_type fused_dft` that tuner's `prepare_model` patches the model (fused_dft.patch_model;
full fine-tuning, every parameter trained) and turns `enable_dft_loss` off, so ms-swift's
trainer passes the labels to the patched model and uses its loss (`--enable_dft_loss true` ->
loss_type "dft", else "ce"); the logits are never built in training. ms-swift's own DFT is the
per-token -sg(p) log p summed over the valid tokens and divided by `num_items_in_batch`: the
patched model's mean, which ms-swift rescales by the micro-batch's valid tokens over
`num_items_in_batch`, is the same loss.

Refused when the model is prepared, before the trainer is built (ms_swift_flags.loss_options):
an ms-swift version it was not tested with, `swift rlhf`, a non-causal task, a `--loss_scale`
with weights other than 0/1 (ms-swift takes the labels out of such batches), a custom
`--loss_type`, sequence parallelism, channel loss, Liger, label smoothing, unsloth; resuming
from a checkpoint through the tuner (pass the checkpoint as `--model` instead).

Only absolute imports: ms-swift loads this file by path under a name of its own.
"""

from __future__ import annotations

import os
from importlib import metadata

try:
    import swift  # noqa: F401
    from swift.tuner_plugin import Tuner, tuners_map
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fused_dft.integrations.ms_swift needs ms-swift: pip install 'fused-dft[ms-swift]' "
        "(ms-swift==4.6.0, the version it was tested with)"
    ) from exc

from fused_dft.hf import patch_model
from fused_dft.integrations.ms_swift_flags import TUNER, check_version, loss_options

__all__ = ["FusedDFTTuner"]


class FusedDFTTuner(Tuner):
    """`--tuner_type fused_dft`: full fine-tuning of the model patched with the fused loss."""

    @staticmethod
    def prepare_model(args, model):
        from swift.loss_scale import get_loss_scale

        check_version(metadata.version("ms-swift"))
        binary = args.is_binary_loss_scale
        if binary is None:
            binary = get_loss_scale(args.loss_scale).is_binary_loss_scale
        options = loss_options(vars(args), binary_loss_scale=binary)
        # ms-swift's trainer takes the labels out of the batch while enable_dft_loss is on
        args.enable_dft_loss = False
        args.training_args.enable_dft_loss = False
        model.requires_grad_(True)
        return patch_model(model, **options)

    @staticmethod
    def save_pretrained(model, save_directory, state_dict=None, safe_serialization=True, **kwargs):
        # the stock class name is written: the checkpoint loads unpatched
        model.save_pretrained(
            save_directory, state_dict=state_dict, safe_serialization=safe_serialization
        )

    @staticmethod
    def from_pretrained(model, model_id, **kwargs):
        raise ValueError(
            "fused_dft.integrations.ms_swift: resuming through --tuner_type fused_dft is "
            f"refused; pass the checkpoint {model_id!r} as --model instead"
        )


tuners_map[TUNER] = FusedDFTTuner

if __name__ == "__main__":
    print(os.path.abspath(__file__))
