"""asft's reference model under the patch: checked at patch time, held beside the policy, run on
each batch the policy computes its loss on.

loss_type="asft" adds alpha * KL(q || p) per token, q the reference model's softmax (family.py).
`patch_model(model, loss_type="asft", ref_model=ref)` feeds the loss the reference's inputs:
  - at patch time (check_ref_model): ref is a causal LM over the same vocabulary with the same
    logit transform as the policy (the loss applies the policy's to both), not the policy itself,
    not ZeRO-3-partitioned and not sharded (DTensor parameters); it is frozen there
    (requires_grad_(False)) and put in eval mode (no dropout);
  - held by a RefModel, not as a submodule: the policy's state_dict, parameters() (so the
    optimizer), .to() and FSDP / DeepSpeed wrapping never see it. copy.deepcopy of the policy
    shares it (it is frozen); pickling the policy (torch.save(model)) leaves it out, and the
    unpickled model asks for it again at its first loss;
  - per call with labels (reference_inputs): the reference's own forward runs under no_grad on the
    policy's inputs (input_ids / inputs_embeds, attention_mask, position_ids and every other
    keyword of the call that reaches the decoder; no labels, cache off), with a pre-hook on its
    lm_head that records the hidden states the head receives and hands it an empty slice, so its
    logits are never built, as for the policy (call.py). Those hidden states (B, T, D_ref) sit at
    the policy's positions: the loss shifts the labels, and the reference rows with them.
Device and dtype: the reference is moved (its own .to(), once) to the batch's device when all its
parameters sit on one other device (Trainer moves the policy, never the reference); one dispatched
with a device_map is left where it is. Its dtype is its own: its hidden states and head weight are
cast to the loss's compute dtype (the policy head's, or autocast's) per call, which copies the
(V, D_ref) weight once per call when the two dtypes differ.
"""

from __future__ import annotations

import torch
from torch import nn

from ..parallel import is_dtensor
from .model import _causal_lm, _keyword_names, _lm_head, _read_transform, _text_config
from .state import TOKEN_COLUMNS
from .zero import full_shape, is_partitioned, raw_params

# keywords of the policy's call that do not go to the reference's forward: the loss's own
# (labels and what goes with them), the output's shape, the cache
NOT_FOR_REFERENCE = frozenset(
    {
        "labels", "shift_labels", "num_items_in_batch", "skip_logits", "return_token_logprobs",
        "return_dict", "logits_to_keep", "use_cache", "past_key_values", "cache_position",
        "output_attentions", "output_hidden_states", "output_router_logits", *TOKEN_COLUMNS,
    }
)  # fmt: skip


class RefModel:
    """Holds the reference model beside the policy without making it a submodule (module doc)."""

    def __init__(self, module: nn.Module) -> None:
        self.module: nn.Module | None = module

    def __deepcopy__(self, memo) -> RefModel:
        return self  # a copy of the policy shares the frozen reference

    def __getstate__(self) -> dict:
        return {"module": None}  # torch.save(policy) does not save a second model inside it

    def __setstate__(self, state: dict) -> None:
        self.module = state.get("module")


def check_ref_model(policy: nn.Module, ref_model) -> RefModel:
    """ref_model checked against the policy (the causal LM patch_model patches), frozen and put
    in eval mode; ValueError / TypeError naming ref_model otherwise, before anything is patched."""
    if not isinstance(ref_model, nn.Module):
        raise TypeError(
            f"patch_model: ref_model must be a Hugging Face causal LM (an nn.Module such as "
            f"LlamaForCausalLM), got {type(ref_model).__name__}"
        )
    try:
        ref = _causal_lm(ref_model)
        ref_head = _lm_head(ref)
    except TypeError as exc:
        raise TypeError(f"patch_model: ref_model is not usable as asft's reference: {exc}") from exc
    if ref is policy or ref_model is policy:
        raise ValueError(
            "patch_model: ref_model is the model being patched; asft's reference must be a "
            "separate, frozen model (copy.deepcopy(model) before training for a frozen copy of "
            "the starting model)"
        )
    policy_vocab = full_shape(raw_params(_lm_head(policy))[0])[0]
    ref_vocab = full_shape(raw_params(ref_head)[0])[0]
    if ref_vocab != policy_vocab:
        raise ValueError(
            f"patch_model: ref_model's lm_head has a vocabulary of {ref_vocab}, the model's has "
            f"{policy_vocab}; asft's KL compares the two distributions token by token, so they "
            "need the same vocabulary"
        )
    partitioned = next((n for n, p in ref.named_parameters() if is_partitioned(p)), None)
    if partitioned is not None:
        raise ValueError(
            f"patch_model: ref_model is partitioned by DeepSpeed ZeRO-3 ({partitioned}); the "
            "patch runs the reference itself and does not gather it. Build the reference outside "
            "zero.Init (before TrainingArguments / SFTConfig with a ZeRO-3 config, or under "
            "transformers.integrations.deepspeed's deepspeed_config() unset); ZeRO-1/2 are fine"
        )
    sharded = next((n for n, p in ref.named_parameters() if is_dtensor(p)), None)
    if sharded is not None:
        raise ValueError(
            f"patch_model: ref_model has DTensor parameters ({sharded}: sharded by FSDP2 or "
            "tensor parallelism); asft's reference must be a plain (whole) model on each rank"
        )
    policy_transform = _read_transform(_text_config(policy))
    ref_transform = _read_transform(_text_config(ref))
    if ref_transform != policy_transform:
        raise ValueError(
            f"patch_model: ref_model's config transforms its logits as {ref_transform}, the "
            f"model's as {policy_transform}; the loss applies the model's to both, so the "
            "reference must be of the same family (softcap, logit scale)"
        )
    ref.requires_grad_(False)
    ref.eval()
    return RefModel(ref)


def reference_inputs(holder: RefModel, call_kwargs: dict, policy_name: str):
    """The reference model's (hidden (..., D_ref), lm_head weight, bias) on the policy's inputs,
    without gradients and without its logits (module doc)."""
    ref = holder.module
    if ref is None:
        raise RuntimeError(
            f"fused_dft: this {policy_name} was unpickled without its asft reference model "
            "(pickling leaves it out); patch it again with patch_model(model, loss_type='asft', "
            "ref_model=...)"
        )
    if ref.training:
        ref.eval()
    kwargs = _reference_kwargs(ref, call_kwargs)
    _follow_batch_device(ref, kwargs)
    head = _lm_head(ref)
    captured = []

    def capture(module, args):
        captured.append(args[0])
        return (args[0][..., :0, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(capture, prepend=True)
    try:
        with torch.no_grad():
            ref(**kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"fused_dft: ref_model ({type(ref).__qualname__}) called its lm_head "
            f"{len(captured)} time(s) in one forward; asft's reference needs exactly one call"
        )
    weight, bias = raw_params(head)
    return captured[0], weight.detach(), None if bias is None else bias.detach()


def _reference_kwargs(ref: nn.Module, call_kwargs: dict) -> dict:
    """The policy call's keywords that shape the hidden states, for the reference's forward."""
    kwargs = {k: v for k, v in call_kwargs.items() if k not in NOT_FOR_REFERENCE}
    accepted = _keyword_names(type(ref).forward)
    if accepted is not None:  # a forward without **kwargs: only what it takes
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    if accepted is None or "use_cache" in accepted:
        kwargs["use_cache"] = False
    if accepted is None or "return_dict" in accepted:
        kwargs["return_dict"] = True
    return kwargs


def _follow_batch_device(ref: nn.Module, kwargs: dict) -> None:
    """Move the reference to the batch's device once, unless it is dispatched by a device_map."""
    batch = kwargs.get("input_ids")
    if batch is None:
        batch = kwargs.get("inputs_embeds")
    if not torch.is_tensor(batch) or getattr(ref, "hf_device_map", None):
        return
    devices = {p.device for p in ref.parameters()}
    if len(devices) == 1 and batch.device not in devices:
        ref.to(batch.device)
