"""verl's SFT trainer with a DFT-family loss on fused per-token log-probs (no logits).

    python -m fused_dft.integrations.verl fused_dft.loss_type=dft <verl's SFT overrides>
        # instead of: python -m verl.trainer.sft_trainer <verl's SFT overrides>

From Python, `run_sft(config, loss_type="dft")` in place of verl.trainer.sft_trainer.run_sft, or
`SFTTrainer(config, loss_type="dft")` in place of verl's SFTTrainer. `fused_dft.*` keys on the
command line are the adapter's (`loss_type`: "dft" or "ce", `impl`); the rest compose verl's own
`sft_trainer_engine` config unchanged.

How (verl 0.9.1, its FSDP engine): the trainer sets `model.use_fused_kernels=True` with
`model.fused_kernel_options.impl_backend="fused_dft"`, a backend verl does not know, so verl
leaves the model class's forward alone but its engine calls the model with `temperature` (and
`shift_labels` for packed rows) and reads `output.log_probs` / `output.entropy`. The model the
engine builds is patched (this instance, before FSDP wraps it) with
verl_logprobs.fused_logprob_forward: decoder, then fused_linear_logprobs on the last hidden
state and lm_head's weight. verl's SFT loss function (`sft_loss`: -sum of log p over the loss
mask / the global batch's valid tokens * dp_size) is replaced by the same reduction of the
family's per-token term (ce: verl's own; dft: -sg(p) log p).

Refused before the model is built, naming the setting (verl_logprobs.check_settings): a verl
version it was not tested with, an engine other than fsdp / fsdp2, Ulysses sequence parallelism,
LoRA, Liger, TiledMLP, a pad_mode other than no_padding.
"""

from __future__ import annotations

import sys
from functools import partial
from importlib import metadata

try:
    import verl  # noqa: F401
    from omegaconf import OmegaConf, open_dict
    from verl.trainer.sft_trainer import SFTTrainer as _VerlSFTTrainer
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fused_dft.integrations.verl needs verl: pip install 'fused-dft[verl]' "
        "(verl==0.9.1, the version it was tested with)"
    ) from exc

import torch

from fused_dft.arguments import check_impl
from fused_dft.integrations import verl_logprobs as vl

__all__ = ["SFTTrainer", "main", "run_sft"]

# verl config keys check_settings reads
_SETTINGS = (
    "engine.strategy", "engine.ulysses_sequence_parallel_size", "model.lora_rank",
    "model.lora_adapter_path", "model.use_liger", "model.tiled_mlp.enabled", "data.pad_mode",
)  # fmt: skip


class SFTTrainer(_VerlSFTTrainer):
    """verl's SFTTrainer, its loss on fused_linear_logprobs; loss_type "dft" or "ce"."""

    def __init__(self, config, loss_type: str = "dft", impl: str = "auto") -> None:
        vl.check_version(metadata.version("verl"))
        self.fused_dft_loss_type = vl.check_loss_type(loss_type)
        check_impl(impl, None)
        self.fused_dft_impl = impl
        vl.check_settings({key: OmegaConf.select(config, key) for key in _SETTINGS})
        super().__init__(config)

    def _build_config(self) -> None:
        with open_dict(self.config):
            self.config.model.use_fused_kernels = True
            self.config.model.fused_kernel_options = {"impl_backend": vl.BACKEND}
        super()._build_config()

    def _build_engine(self) -> None:
        super()._build_engine()
        self.loss_fn = partial(vl.family_sft_loss, loss_type=self.fused_dft_loss_type)
        self.training_client.set_loss_fn(loss_fn=self.loss_fn)
        build_module, impl = self.engine._build_module, self.fused_dft_impl

        def build_patched_module():
            return vl.patch_logprob_forward(build_module(), impl=impl)

        # this engine instance only: the model it builds is patched before FSDP wraps it
        self.engine._build_module = build_patched_module


def run_sft(config, loss_type: str = "dft", impl: str = "auto") -> None:
    """verl.trainer.sft_trainer.run_sft through the adapter's trainer; a process group the caller
    created is used (and left alone), else verl's own is created and destroyed."""
    from verl.utils.distributed import destroy_global_process_group, initialize_global_process_group

    owned = not torch.distributed.is_initialized()
    if owned:
        initialize_global_process_group()
    SFTTrainer(config, loss_type=loss_type, impl=impl).fit()
    if owned:
        destroy_global_process_group()


def main(argv: list[str] | None = None) -> None:
    """`python -m fused_dft.integrations.verl [fused_dft.loss_type=dft] [fused_dft.impl=auto]
    <overrides of verl's sft_trainer_engine config>`."""
    from hydra import compose, initialize_config_module
    from verl.utils.device import auto_set_device

    argv = sys.argv[1:] if argv is None else argv
    ours = dict(a.split("=", 1) for a in argv if a.startswith("fused_dft."))
    unknown = set(ours) - {"fused_dft.loss_type", "fused_dft.impl"}
    if unknown:
        raise ValueError(f"fused_dft.integrations.verl: unknown key(s) {sorted(unknown)}; "
                         "known: fused_dft.loss_type, fused_dft.impl")  # fmt: skip
    with initialize_config_module("verl.trainer.config", version_base=None):
        config = compose("sft_trainer_engine", [a for a in argv if not a.startswith("fused_dft.")])
    auto_set_device(config)
    run_sft(config, ours.get("fused_dft.loss_type", "dft"), ours.get("fused_dft.impl", "auto"))


if __name__ == "__main__":
    main()
