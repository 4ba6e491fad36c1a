"""What a patch stores: PatchState on the model, the slot on its lm_head, and the option tables.

Shared by the patched call, verify and the patch lifecycle; imports nothing of theirs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..family import param_names
from .model import LogitTransform

STATE_ATTR = "_fused_dft_patch"
# On the lm_head: the patch's slot, a list holding the FusedCall of the forward in progress (empty
# between calls), which the lm_head's permanent pre-hook (_capture_pre_hook) reads. The slot and
# the hook follow the lm_head: a patched call finds it with get_output_embeddings() and moves them
# from the head that carries them (PatchState.head) to a head replaced after patching
# (resize_token_embeddings, set_output_embeddings).
SLOT_ATTR = "_fused_dft_slot"
# Batch figures of the fused pass attached to the output (detached; means over the valid tokens).
# The output also carries `lm_loss`: the fused loss before any router loss (with its gradient; it
# is `loss` for dense models), for trainers that weight the router loss themselves.
STAT_NAMES = ("ce_loss", "entropy", "token_accuracy", "num_tokens")
# Options of patch_model that go to fused_linear_dft_loss unchanged, with their defaults, besides
# the loss family's own parameters (family.param_names(), each defaulting to its member's
# default); the logit transforms come from the config instead.
LOSS_OPTIONS: dict[str, Any] = {
    "chunk_size": None,
    "ignore_index": -100,
    "z_loss": 0.0,
    "label_smoothing": 0.0,
    "validate": None,
}
# The options besides the family's parameters that define the loss itself (verify checks against
# the stock cross-entropy without them)
LOSS_SHAPING_OPTIONS = ("z_loss", "label_smoothing")


def loss_option_names() -> tuple[str, ...]:
    """Every loss option patch_model takes: LOSS_OPTIONS and the family's parameters."""
    return (*LOSS_OPTIONS, *param_names())


def plain_ce_options(options: dict) -> dict:
    """`options` without what shapes the loss (the family's parameters, z-loss, smoothing)."""
    kept = {k: v for k, v in options.items() if k not in param_names()}
    return {**kept, **{k: LOSS_OPTIONS[k] for k in LOSS_SHAPING_OPTIONS}}


# Per-token batch columns the patched forward takes as keywords, aligned with `labels` and shifted
# with them (HF Trainer / TRL datasets can carry them): they go to the loss, not to the decoder.
TOKEN_COLUMNS = ("token_weights", "old_logprobs")


@dataclasses.dataclass(frozen=True)
class PatchState:
    """Per-instance patch settings, stored on the model as `_fused_dft_patch`."""

    base_class: type
    loss_type: str
    impl: str
    loss_options: dict
    eval_logits: bool
    transform: LogitTransform
    is_moe: bool
    positional: tuple[str, ...]
    accepts_kwargs: frozenset[str] | None  # the forward's keyword names; None: it takes **kwargs
    slot: list = dataclasses.field(default_factory=list, compare=False)  # see SLOT_ATTR
    hook_id: int | None = None  # the lm_head pre-hook's key in its _forward_pre_hooks
    # The module that carries the slot and the pre-hook: the lm_head when it was last hooked (a
    # replaced head is released at the next patched call with labels, or by unpatch_model).
    # None in a state pickled by fused_dft 0.1.0 (the class default): the head that carries the
    # slot.
    head: nn.Module | None = dataclasses.field(default=None, compare=False, repr=False)
    # asft's reference model (ref_model.RefModel: held, not a submodule); None for other members
    ref_model: Any = dataclasses.field(default=None, compare=False, repr=False)
