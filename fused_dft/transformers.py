"""Compatibility module: the Hugging Face patch now lives in fused_dft.hf (see its docstring).

`fused_dft.transformers.patch_model`, `unpatch_model`, `is_patched` and the other public names of
fused_dft.hf keep working from here. The module also keeps the four names that a model patched
and pickled (pickle / torch.save) by fused_dft 0.1.0 references by this module's path, so that
such a pickle still loads, patched: `_new_patched` (rebuilds the patched class), the lm_head's
`_capture_pre_hook`, `PatchState` and `LogitTransform` (tests/hf/test_pickle_compat.py).
New code imports from fused_dft.hf.
"""

from .hf import (
    LOSS_OPTIONS,
    STAT_NAMES,
    STATE_ATTR,
    TOKEN_COLUMNS,
    is_patched,
    patch_model,
    unpatch_model,
)
from .hf.call import _capture_pre_hook
from .hf.lifecycle import _new_patched
from .hf.model import LogitTransform
from .hf.state import PatchState

__all__ = [
    "LOSS_OPTIONS",
    "LogitTransform",
    "PatchState",
    "STATE_ATTR",
    "STAT_NAMES",
    "TOKEN_COLUMNS",
    "_capture_pre_hook",
    "_new_patched",
    "is_patched",
    "patch_model",
    "unpatch_model",
]
