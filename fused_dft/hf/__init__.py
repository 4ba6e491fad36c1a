"""Hugging Face transformers: train a causal LM with the fused loss, no logits built.

`patch_model(model, ...)` patches one model instance (or a PEFT model's base model),
`unpatch_model` undoes it, `is_patched` tells; recipes and limits in docs/transformers.md.
The modules, each building only on those listed before it:
  zero.py       DeepSpeed ZeRO-3: a partitioned lm_head read by its full shape, gathered by the
                loss itself for its forward and backward, and for verify
  model.py      what is read from the model: the causal LM, its lm_head, its config's logit
                transform, its forward's parameter names
  state.py      what a patch stores (PatchState, the lm_head's slot) and the option tables
  heads.py      a distributed lm_head: FSDP2 unit, tensor (vocab) parallel
  ref_model.py  asft's reference model: checked, held beside the model (not a submodule), run
                under no_grad on each batch, its lm_head input recorded
  call.py       the patched call: the family's own forward, lm_head input recorded, loss fused
  verify.py     verify=True: the patched path checked against the stock forward at patch time
  lifecycle.py  patch_model / unpatch_model / is_patched and the per-class patched subclass
"""

from .lifecycle import is_patched, patch_model, unpatch_model
from .state import LOSS_OPTIONS, STAT_NAMES, STATE_ATTR, TOKEN_COLUMNS

__all__ = [
    "LOSS_OPTIONS",
    "STATE_ATTR",
    "STAT_NAMES",
    "TOKEN_COLUMNS",
    "is_patched",
    "patch_model",
    "unpatch_model",
]
