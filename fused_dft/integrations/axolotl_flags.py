"""axolotl's config -> patch_model's options; no axolotl import (unit-tested alone).

`fused_dft.integrations.axolotl.FusedDFTPlugin.register` calls `map_config` on the raw YAML
dict, before axolotl validates it and before any plugin loads the model. The mapping:

    liger_fused_linear_cross_entropy + liger_use_token_scaling   -> loss_type "dft" (Liger's DFT)
    liger_fused_linear_cross_entropy alone                        -> loss_type "ce"
    use_eaft (eaft_alpha, eaft_k)  -> loss_type "eaft", eaft_topk=eaft_k, eaft_normalizer=1,
                                      eaft_alpha: axolotl's eaft_loss, w = H_k ** alpha
    fused_dft_loss_type (+ fused_dft_params)  -> that loss directly
    none of them                                                   -> loss_type "ce"

and turns the Liger loss keys and `use_eaft` off, so neither Liger's forward nor axolotl's
`compute_loss_func` (which takes the labels out of the batch) is installed.
"""

from __future__ import annotations

from typing import Any

from ..arguments import check_loss_options
from .versions import check_tested_version

CALLER = "fused_dft.integrations.axolotl"

# the axolotl releases the plugin was run against (docs/integrations.md)
TESTED_VERSIONS = ("0.19.0",)

# this plugin's config keys (FusedDFTArgs): the loss and its family parameters
LOSS_KEY = "fused_dft_loss_type"
PARAMS_KEY = "fused_dft_params"
# the loss types that need nothing beyond the labels (psft needs old_logprobs, asft a reference
# model; axolotl's trainer passes neither)
LOSS_TYPES = ("dft", "ce", "eaft", "power")

# axolotl's eaft_loss (monkeypatch/loss/eaft.py): topk(k=eaft_k, default 20) of the logits,
# entropy H_k of their softmax, weight H_k ** eaft_alpha (default 1.0) with no normalizer
EAFT_K = 20
EAFT_ALPHA = 1.0
EAFT_NORMALIZER = 1.0

# axolotl's own loss keys, turned off once mapped (their loss would replace the fused one)
TURNED_OFF = ("liger_use_token_scaling", "liger_fused_linear_cross_entropy", "use_eaft")

# config keys that compute the loss another way: the patch would be bypassed or bypass them
REFUSED_KEYS = {
    "liger_cross_entropy": "Liger's cross-entropy on the logits",
    "cut_cross_entropy": "Cut Cross-Entropy replaces the model's forward",
    "chunked_cross_entropy": "axolotl's chunked cross-entropy replaces the loss",
    "flash_attn_cross_entropy": "flash-attn's cross-entropy replaces the loss",
    "unsloth_cross_entropy_loss": "unsloth's cross-entropy replaces the loss",
    "rl": "the RL trainers (DPO, GRPO, ...) compute their own losses from the logits",
    "reward_model": "a reward model has no LM-head loss",
    "process_reward_model": "a process reward model has no LM-head loss",
    "orpo_alpha": "ORPO computes its loss from the logits",
    "label_smoothing_factor": "HF Trainer's label smoother takes the labels out of the batch",
}
# plugins that replace the model's forward or its loss
REFUSED_PLUGINS = ("cut_cross_entropy", "integrations.kd.")


def check_version(version: str) -> None:
    check_tested_version(
        caller=CALLER,
        trainer="axolotl",
        package="axolotl",
        version=version,
        tested=TESTED_VERSIONS,
        kind="plugin",
        may_differ="its config keys or Liger's patch",
    )


def _refuse(setting: str, why: str) -> ValueError:
    return ValueError(f"{CALLER}: {setting} is refused: {why}")


def _asked_by_axolotl(cfg: dict[str, Any]) -> tuple[str | None, dict[str, Any], str]:
    """The loss axolotl's own keys ask for: (loss_type or None, its parameters, the keys)."""
    liger_dft = bool(cfg.get("liger_use_token_scaling"))
    if liger_dft and not cfg.get("liger_fused_linear_cross_entropy"):
        raise _refuse(
            "liger_use_token_scaling: true without liger_fused_linear_cross_entropy",
            "Liger's DFT needs its fused linear cross-entropy (axolotl refuses it too)",
        )
    if cfg.get("use_eaft"):
        if liger_dft:
            raise _refuse(
                "use_eaft: true with liger_use_token_scaling: true",
                "they ask for different losses (EAFT and DFT); set one",
            )
        alpha = cfg.get("eaft_alpha")
        k = cfg.get("eaft_k")
        params = {
            "eaft_alpha": EAFT_ALPHA if alpha is None else alpha,
            "eaft_topk": EAFT_K if k is None else k,
            "eaft_normalizer": EAFT_NORMALIZER,
        }
        return "eaft", params, "use_eaft: true"
    if liger_dft:
        return "dft", {}, "Liger's DFT (liger_use_token_scaling: true)"
    if cfg.get("liger_fused_linear_cross_entropy"):
        return "ce", {}, "Liger's cross-entropy (liger_fused_linear_cross_entropy: true)"
    return None, {}, ""


def map_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Map axolotl's loss keys onto the fused loss in `cfg` (in place: the Liger loss keys and
    `use_eaft` turned off, LOSS_KEY and PARAMS_KEY set) and return patch_model's options, or a
    ValueError naming the setting it cannot honour. The values of the family parameters are
    checked by the caller (fused_dft.arguments.check_loss_options), before the model loads."""
    for key, why in REFUSED_KEYS.items():
        if cfg.get(key):
            raise _refuse(f"{key}: {cfg[key]!r}", f"{why}; fused_dft computes the loss")
    for name in cfg.get("plugins") or ():
        if any(part in name for part in REFUSED_PLUGINS):
            raise _refuse(f"plugin {name}", "it replaces the model's forward or its loss")
    asked = cfg.get(LOSS_KEY)
    if asked is not None and asked not in LOSS_TYPES:
        raise _refuse(
            f"{LOSS_KEY}: {asked!r}",
            f"supported: {', '.join(LOSS_TYPES)} (psft needs old log-probs and asft a reference "
            "model, which axolotl's trainer does not pass)",
        )
    given = cfg.get(PARAMS_KEY) or {}
    if not isinstance(given, dict):
        raise _refuse(f"{PARAMS_KEY}: {given!r}", "expected a mapping of parameter -> value")
    theirs, their_params, keys = _asked_by_axolotl(cfg)
    if theirs is not None and asked is not None and asked != theirs:
        raise _refuse(f"{LOSS_KEY}: {asked!r} with {keys}", "they ask for different losses")
    if theirs is not None and given and their_params:
        raise _refuse(f"{PARAMS_KEY} with {keys}", f"{keys} sets the parameters; set one")
    loss_type = asked or theirs or "ce"
    params = {**their_params, **given}
    for key in TURNED_OFF:
        if key in cfg:  # a key set only where present: Liger's exist only with its plugin
            cfg[key] = False
    cfg[LOSS_KEY] = loss_type
    cfg[PARAMS_KEY] = params
    return {"loss_type": loss_type, **params}


def over_num_items(cfg: dict[str, Any]) -> bool:
    """Whether the loss axolotl computes for the raw `cfg` divides each micro-batch's sum by the
    valid tokens of the whole accumulated batch (HF Trainer's `num_items_in_batch`).

    axolotl's `use_eaft` does (a `compute_loss_func` gets `num_items_in_batch`; Trainer then does
    not divide by gradient_accumulation_steps). Its model losses (cross-entropy, Liger's) do not:
    axolotl's trainer sets `model_accepts_loss_kwargs = False` for a model whose inner forward
    takes no `num_items_in_batch` (Qwen2, Llama, ...), so each micro-batch's mean is divided by
    gradient_accumulation_steps. The plugin keeps each as axolotl computes it: for EAFT it sets
    `model_accepts_loss_kwargs` back to True, so the patched model gets `num_items_in_batch`."""
    return bool(cfg.get("use_eaft"))


def checked_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """map_config, then fused_dft's own checks of the options (an unknown or out-of-range family
    parameter named), as the plugin's `register` runs them, before the model loads."""
    options = map_config(cfg)
    check_loss_options(caller=CALLER, **options)
    return options
