"""verl's per-token log-prob contract and its SFT loss, family form; no verl import (unit-tested
alone).

verl's FSDP engine with `model.use_fused_kernels` calls the model with `temperature` (and, with
packed sequences, `shift_labels`) and reads `output.log_probs` and `output.entropy` per token
instead of the logits. `fused_logprob_forward` is such a forward: the decoder, then
fused_linear_logprobs on its last hidden state and the LM head's weight (no N x V logits).
`sft_loss` is verl's SFT loss (workers/utils/losses.py `sft_loss`) with the per-token term
taken from the family:

    ce:   l_t = -log p_t                 (verl's own SFT loss)
    dft:  l_t = -sg(p_t) * log p_t       (DFT, arXiv 2508.05629; p_t = exp(log p_t))
    loss = sum_t mask_t * l_t / batch_num_tokens * dp_size

batch_num_tokens: the valid tokens of the whole global batch (all micro-batches, all data-parallel
ranks), so the micro-batch losses, summed by gradient accumulation and averaged by the
data-parallel all-reduce, give the global token mean. `fused_dft.integrations.verl` wires both
into verl's SFT trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fused_dft.arguments import check_impl
from fused_dft.hf.heads import _as_lm_head_forward
from fused_dft.logprobs import fused_linear_logprobs

from .versions import check_tested_version

# the verl releases the adapter was run against (docs/integrations.md)
TESTED_VERSIONS = ("0.9.1",)

# the per-token SFT terms built on log p_y alone (l_t above)
LOSS_TYPES = ("ce", "dft")

# the value the adapter gives verl's `model.fused_kernel_options.impl_backend`: not one of verl's
# own backends ("torch", "triton", "liger"), so verl leaves the model class's forward alone
BACKEND = "fused_dft"


def check_version(version: str) -> None:
    check_tested_version(
        caller="fused_dft.integrations.verl",
        trainer="verl",
        package="verl",
        version=version,
        tested=TESTED_VERSIONS,
        kind="adapter",
        may_differ="its engine's log-prob path",
    )


def check_loss_type(loss_type: str) -> str:
    if loss_type not in LOSS_TYPES:
        raise ValueError(
            f"fused_dft.integrations.verl: loss_type must be one of {LOSS_TYPES} (a per-token "
            f"term of log p_y alone), got {loss_type!r}"
        )
    return loss_type


def check_settings(settings: dict[str, Any]) -> None:
    """A ValueError naming the first verl SFT setting the adapter cannot honour. settings: the
    resolved values of the keys below, read from verl's SFT config (dotted names)."""

    def refuse(setting: str, why: str) -> ValueError:
        return ValueError(f"fused_dft.integrations.verl: {setting} is refused: {why}")

    strategy = settings.get("engine.strategy")
    if strategy not in ("fsdp", "fsdp2"):
        raise refuse(f"engine.strategy={strategy!r}", "only verl's FSDP engine (fsdp, fsdp2)")
    if (settings.get("engine.ulysses_sequence_parallel_size") or 1) > 1:
        raise refuse("engine.ulysses_sequence_parallel_size > 1", "not tested")
    if settings.get("model.lora_rank") or settings.get("model.lora_adapter_path"):
        raise refuse("model.lora_rank / model.lora_adapter_path", "LoRA was not tested")
    if settings.get("model.use_liger"):
        raise refuse("model.use_liger", "Liger replaces parts of the model's forward")
    if settings.get("model.tiled_mlp.enabled"):
        raise refuse("model.tiled_mlp.enabled", "not tested")
    pad_mode = settings.get("data.pad_mode", "no_padding")
    if pad_mode != "no_padding":
        raise refuse(f"data.pad_mode={pad_mode!r}", "verl's engine needs no_padding")


def token_losses(log_prob: torch.Tensor, loss_type: str) -> torch.Tensor:
    """l_t of the module docstring, per token, from log p_y."""
    if loss_type == "ce":
        return -log_prob
    if loss_type == "dft":
        return -log_prob.detach().exp() * log_prob
    raise ValueError(check_loss_type(loss_type))


def sft_loss(
    log_prob: torch.Tensor,
    loss_mask: torch.Tensor,
    batch_num_tokens: int,
    dp_size: int,
    loss_type: str,
) -> torch.Tensor:
    """sum_t mask_t * l_t / batch_num_tokens * dp_size over flat, aligned (log_prob, loss_mask);
    masked tokens contribute nothing (also not a NaN or inf log-prob there)."""
    mask = loss_mask.bool()
    # masked first, so neither the value nor the gradient (0 * d l_t) can be NaN there
    per_token = torch.where(mask, token_losses(torch.where(mask, log_prob, 0.0), loss_type), 0.0)
    return per_token.sum() / batch_num_tokens * dp_size


def family_sft_loss(model_output, data, dp_group=None, config=None, *, loss_type: str):
    """verl's loss-function signature (workers/utils/losses.py sft_loss; its engine passes
    model_output, data, dp_group) with the family's per-token term, for verl's no_padding
    batches: model_output["log_probs"] and data["loss_mask"] are nested (jagged) per sequence,
    packed back to back; the mask is rolled left by one token over the packed row, so the
    log-prob of token t (label: token t + 1) counts when token t + 1 is in the loss mask."""
    log_prob = model_output["log_probs"].values()
    loss_mask = torch.roll(data["loss_mask"].values(), shifts=-1, dims=0)
    loss = sft_loss(log_prob, loss_mask, data["batch_num_tokens"], data["dp_size"], loss_type)
    return loss, {}


@dataclass
class LogprobOutput:
    """What verl's engine reads from a fused-kernel forward (its CausalLMOutputForPPO fields)."""

    log_probs: torch.Tensor
    entropy: torch.Tensor
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None

    def __getitem__(self, key: str):
        return getattr(self, key)


def head_logprobs(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_y, H) per token of softmax(lm_head(hidden) / temperature), without the logits.

    The head's weight (and bias) are read inside a forward of the head, so an lm_head that is
    its own FSDP2 unit is unsharded for it (and for its backward) as for lm_head(hidden).
    """
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)

    def run(h: torch.Tensor, y: torch.Tensor):
        return fused_linear_logprobs(
            h, head.weight, y, getattr(head, "bias", None), logit_scale=1.0 / temperature,
            softcap=softcap, impl=impl,
        )  # fmt: skip

    return _as_lm_head_forward(head, run, hidden, labels)


def fused_logprob_forward(
    self,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values=None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    use_cache: bool | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
    temperature: float = 1.0,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> LogprobOutput:
    """A causal LM's forward as verl's fused-kernel path calls it (bound to the model instance).

    The label of token t is token t + 1: `shift_labels` when given (verl's packed sequences,
    already rolled over the whole packed row), else labels or input_ids rolled left by one
    (the last token's label wraps around; verl's loss mask drops it).
    """
    # passed only when set (transformers >= 5.2x deprecates past_key_values for `cache`)
    optional = {"past_key_values": past_key_values, "output_attentions": output_attentions,
                "output_hidden_states": output_hidden_states}  # fmt: skip
    out = self.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        inputs_embeds=inputs_embeds, use_cache=use_cache,
        **{k: v for k, v in optional.items() if v is not None}, **kwargs,
    )  # fmt: skip
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None or input_ids is not None:
        rolled = torch.roll(labels if labels is not None else input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("fused_logprob_forward needs input_ids, labels or shift_labels")
    log_probs, entropy = head_logprobs(self, out[0], rolled, temperature, self._fused_dft_impl)
    return LogprobOutput(
        log_probs=log_probs, entropy=entropy, past_key_values=getattr(out, "past_key_values", None),
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )  # fmt: skip


def patch_logprob_forward(model: torch.nn.Module, impl: str = "auto") -> torch.nn.Module:
    """Bind fused_logprob_forward to this model instance (not its class); returns the model."""
    check_impl(impl, None)
    if getattr(model, "get_decoder", None) is None or model.get_output_embeddings() is None:
        raise TypeError(
            f"fused_dft.integrations.verl: {type(model).__name__} is not a causal LM with a "
            "decoder (get_decoder) and an lm_head (get_output_embeddings)"
        )
    model._fused_dft_impl = impl
    model.forward = fused_logprob_forward.__get__(model)
    return model


def unpatch_logprob_forward(model: torch.nn.Module) -> torch.nn.Module:
    """Undo patch_logprob_forward: the class's forward again."""
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_fused_dft_impl", None)
    return model
