"""axolotl through the fused loss: `plugins: [fused_dft.integrations.axolotl.FusedDFTPlugin]`.

    plugins:
      - axolotl.integrations.liger.LigerPlugin        # optional: its other kernels stay
      - fused_dft.integrations.axolotl.FusedDFTPlugin
    liger_fused_linear_cross_entropy: true
    liger_use_token_scaling: true                     # Liger's DFT -> fused_dft's "dft"
    # or axolotl's EAFT:  use_eaft: true (eaft_alpha, eaft_k) -> "eaft", exact
    # or directly:        fused_dft_loss_type: power
    #                     fused_dft_params: {power_q: 0.5}

`register` (axolotl's first hook, on the raw config, before validation and before any plugin
patches the model) maps axolotl's loss keys to a fused loss (axolotl_flags.map_config), turns
them off (so neither Liger's forward nor axolotl's EAFT `compute_loss_func`, which takes the
labels out of the batch, is installed) and checks the options (fused_dft's own argument checks);
`post_model_load` patches the loaded model (fused_dft.patch_model, through a PeftModel with
LoRA). axolotl's trainer then calls the patched model with the labels: the logits are never
built in training. `post_trainer_create` keeps axolotl's normalization: its EAFT divides by the
valid tokens of the whole accumulated batch, its model losses average each micro-batch
(axolotl_flags.over_num_items).

Refused in `register`, naming the key: an axolotl version it was not tested with, a loss type
or parameters it cannot honour, contradicting keys, and keys or plugins that compute the loss
another way (axolotl_flags.REFUSED_KEYS, REFUSED_PLUGINS).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

try:
    from axolotl.integrations.base import BasePlugin
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fused_dft.integrations.axolotl needs axolotl: pip install 'fused-dft[axolotl]' "
        "(axolotl==0.19.0, the version it was tested with)"
    ) from exc

from pydantic import BaseModel

from ..hf import patch_model
from .axolotl_flags import LOSS_KEY, PARAMS_KEY, check_version, checked_options, over_num_items

__all__ = ["FusedDFTArgs", "FusedDFTPlugin"]


class FusedDFTArgs(BaseModel):
    """The plugin's config keys (set by `register` from axolotl's loss keys when absent)."""

    fused_dft_loss_type: str | None = None
    fused_dft_params: dict[str, Any] | None = None


class FusedDFTPlugin(BasePlugin):
    """Patches the loaded model with fused_dft; axolotl's DFT / EAFT keys become its loss."""

    def get_input_args(self) -> str:
        return "fused_dft.integrations.axolotl.FusedDFTArgs"

    over_num_items = False

    def register(self, cfg: dict) -> None:
        check_version(metadata.version("axolotl"))
        self.over_num_items = over_num_items(cfg)  # read before use_eaft is turned off
        checked_options(cfg)

    def post_model_load(self, cfg, model) -> None:
        patch_model(model, loss_type=cfg[LOSS_KEY] or "ce", **(cfg[PARAMS_KEY] or {}))

    def post_trainer_create(self, cfg, trainer) -> None:
        # the normalization axolotl's own loss has (axolotl_flags.over_num_items): with it, HF
        # Trainer counts num_items_in_batch over the accumulated batch and passes it to the
        # patched model (sum / num_items_in_batch), and does not divide by the accumulation steps
        if self.over_num_items:
            trainer.model_accepts_loss_kwargs = True
