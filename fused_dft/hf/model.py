"""What patch_model reads from a Hugging Face model: the causal LM to patch (the model itself or a
PEFT model's base model), its lm_head, its text config, the logit transform the family applies
after the lm_head (read from the config), and the parameter names of its stock forward.

Nothing here patches anything; the other modules of fused_dft.hf build on it.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys

import torch
from torch import nn

from .zero import full_shape, raw_params


@dataclasses.dataclass(frozen=True)
class LogitTransform:
    """What a family does to lm_head's output before its loss, in the stock order.

    z <- z * multiply (Cohere's logit_scale); z <- z / divide (Granite's logits_scaling);
    z <- softcap * tanh(z / softcap) (Gemma 2/3's final_logit_softcapping).
    """

    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None

    @property
    def kernel_scale(self) -> float:
        scale = 1.0 if self.multiply is None else float(self.multiply)
        return scale if self.divide is None else scale / float(self.divide)

    def kernel_view(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the kernel uses: fp32, logit_scale then softcap (see LossOptions)."""
        z = logits.float() if logits.dtype != torch.float64 else logits
        if self.kernel_scale != 1.0:
            z = z * self.kernel_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


def _causal_lm(model: nn.Module, check: bool = True) -> nn.Module:
    """The module to patch: the model itself, or the base model of a PEFT model."""
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        model = model.get_base_model()
    if check and not (
        isinstance(model, nn.Module)
        and hasattr(model, "config")
        and callable(getattr(model, "get_output_embeddings", None))
        and isinstance(inspect.getattr_static(type(model), "loss_function", None), property)
    ):
        raise TypeError(
            f"patch_model needs a Hugging Face causal LM (a PreTrainedModel with an lm_head), "
            f"got {type(model).__name__}"
        )
    return model


def _lm_head(model) -> nn.Linear:
    """The output projection; the fused loss computes F.linear(hidden, lm_head.weight, bias)."""
    name = type(model).__name__
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(
            f"patch_model: {name} has no lm_head (get_output_embeddings() returns None); it needs "
            "a causal LM with an output projection, such as LlamaForCausalLM"
        )
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        raise TypeError(
            f"patch_model: the lm_head of {name} is a {kind}, which computes more than "
            "F.linear(hidden, weight, bias), so the fused loss cannot reproduce it. A PEFT adapter "
            "(LoRA) or modules_to_save on lm_head, or a quantized head, are not supported: keep "
            "lm_head out of target_modules."
        )
    # a DeepSpeed ZeRO-3 weight is read by its full shape (ds_shape): its data may be (0,)
    weight = raw_params(head)[0]  # not head.weight: see zero.raw_params
    if not isinstance(weight, torch.Tensor) or len(full_shape(weight)) != 2:
        raise TypeError(f"patch_model: the lm_head weight of {name} is not a 2-D tensor")
    return head


def _text_config(model):
    config = model.config
    get_text_config = getattr(config, "get_text_config", None)
    if not callable(get_text_config):
        return config
    try:
        return get_text_config(decoder=True)
    except (TypeError, ValueError):
        return config


# Config numbers a family may apply to its logits after lm_head. verify=True finds which ones the
# family applies, and how (multiply or divide), by matching the stock logits; without it the
# usual reading is used: logit_scale multiplies (Cohere), logits_scaling divides (Granite).
SCALE_NAMES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")
SOFTCAP_NAME = "final_logit_softcapping"


def _config_number(config, name: str) -> float | None:
    value = getattr(config, name, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"patch_model: config.{name} must be a number, got {value!r}")
    return float(value)


def _read_transform(config) -> LogitTransform:
    return LogitTransform(
        multiply=_config_number(config, "logit_scale"),
        divide=_config_number(config, "logits_scaling"),
        softcap=_config_number(config, SOFTCAP_NAME),
    )


def _candidate_transforms(config) -> list[LogitTransform]:
    """The usual reading first, then each config number alone, multiplying or dividing, with and
    without the softcap, then no transform at all."""
    softcap = _config_number(config, SOFTCAP_NAME)
    numbers = [v for v in (_config_number(config, n) for n in SCALE_NAMES) if v not in (None, 0)]
    candidates = [_read_transform(config)]
    for cap in dict.fromkeys((softcap, None)):
        candidates += [LogitTransform(multiply=v, softcap=cap) for v in numbers]
        candidates += [LogitTransform(divide=v, softcap=cap) for v in numbers]
        candidates.append(LogitTransform(softcap=cap))
    return list(dict.fromkeys(candidates))


def _positional_names(forward) -> tuple[str, ...]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = list(inspect.signature(forward).parameters.values())[1:]  # drop self
    return tuple(p.name for p in params if p.kind in kinds)


def _keyword_names(forward) -> frozenset[str] | None:
    params = list(inspect.signature(forward).parameters.values())[1:]
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind != inspect.Parameter.VAR_POSITIONAL)
