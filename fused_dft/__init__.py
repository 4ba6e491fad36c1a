"""fused_dft: fused linear Dynamic Fine-Tuning (and cross-entropy) loss without full logits."""

from .logprobs import fused_linear_logprobs
from .loss import FusedLinearDFTLoss, fused_linear_dft_loss
from .options import LossOptions, LossStats

__version__ = "0.2.0"


def patch_model(model, **kwargs):
    """Patch a Hugging Face causal LM instance to train with the fused loss."""
    from .hf import patch_model as _patch

    return _patch(model, **kwargs)


def unpatch_model(model):
    """Undo patch_model on that instance."""
    from .hf import unpatch_model as _unpatch

    return _unpatch(model)


def is_patched(model) -> bool:
    """Whether patch_model is in effect on that instance (or on a PEFT model's base model)."""
    from .hf import is_patched as _is_patched

    return _is_patched(model)


_SUBMODULES = ("hf", "transformers", "integrations", "tools")


def __getattr__(name: str):
    # `fused_dft.hf.is_patched` (and the compatibility `fused_dft.transformers.is_patched`) work
    # after a bare `import fused_dft`, without importing transformers (or TRL) at `import
    # fused_dft` time
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FusedLinearDFTLoss",
    "LossOptions",
    "LossStats",
    "__version__",
    "fused_linear_dft_loss",
    "fused_linear_logprobs",
    "is_patched",
    "patch_model",
    "unpatch_model",
]
