"""LLaMA-Factory's SFT through the fused loss: one command in place of `llamafactory-cli train`.

    llamafactory-cli train config.yaml                          # LLaMA-Factory's own loss
    python -m fused_dft.integrations.llamafactory train config.yaml   # the same run, fused

(under torchrun: `torchrun --nproc-per-node N -m fused_dft.integrations.llamafactory train
config.yaml`; from Python: `from fused_dft.integrations.llamafactory import run_exp` in place of
`llamafactory.train.tuner.run_exp`). The YAML is unchanged: its loss flags are read here and
mapped to a fused loss (`LOSS_FLAGS`),

    use_dft_loss: true                 -> loss_type="dft"
    use_eaft_loss: true (eaft_alpha)   -> loss_type="eaft", eaft_topk=20, eaft_alpha (exact)
    use_asft_loss: true (asft_alpha,   -> loss_type="asft", asft_alpha, ref_model= the reference
      ref_model)                          LLaMA-Factory builds (create_ref_model) (exact)
    none of them                       -> loss_type="ce" (the model's own cross-entropy)

LLaMA-Factory computes those losses itself from the logits, taking the labels out of the batch
(Trainer's `compute_loss_func`); here the flag is turned off before its trainer is built and the
model is patched (fused_dft.patch_model) when `run_sft` loads it, so Trainer calls the patched
model with the labels and `num_items_in_batch`: the loss is LLaMA-Factory's (sum over the valid
tokens divided by `num_items_in_batch`), and no logits are built in training.
ASFT: the reference model is built as LLaMA-Factory builds it (`create_ref_model`: `ref_model`
or a second copy of the starting model) and handed to patch_model, which runs it under no_grad
on each batch (no reference logits either); LLaMA-Factory's ASFT is a per-micro-batch mean (DFT
mean + asft_alpha * the KL mean over the micro-batch's valid tokens, not divided by the
accumulation steps), so its trainer's compute_loss is kept to that: the patched model is called
with the labels and without `num_items_in_batch`, and its loss returned (_FusedASFTTrainer).

What it cannot honour is refused before anything is loaded, naming the setting: a LLaMA-Factory
version it was not tested with (`TESTED_VERSIONS`), a stage other than "sft", and the settings
that replace the model's forward or its trainer (`REFUSED_SETTINGS`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from importlib import metadata
from typing import Any

try:
    import llamafactory  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fused_dft.integrations.llamafactory needs LLaMA-Factory: "
        "pip install 'fused-dft[llamafactory]' (llamafactory==0.9.5, the version it was "
        "tested with)"
    ) from exc

from ..hf import patch_model
from .llamafactory_flags import LOSS_FLAGS, check_version, loss_options

__all__ = ["run_exp", "main"]


def run_exp(args: dict[str, Any] | list[str] | None = None, callbacks: list | None = None) -> None:
    """`llamafactory.train.tuner.run_exp` with the model patched at load (module doc)."""
    from llamafactory.hparams import get_train_args, read_args
    from llamafactory.train import tuner

    check_version(metadata.version("llamafactory"))
    args = read_args(args)
    if not ("-h" in args or "--help" in args):
        # the settings checked before any data or model is loaded
        model_args, _, _, finetuning_args, _ = get_train_args(args)
        loss_options(vars(finetuning_args), vars(model_args))
    with _patch_at_load():
        tuner.run_exp(args, callbacks)


@contextlib.contextmanager
def _patch_at_load() -> Iterator[None]:
    """Within the run, `run_sft`'s load_model patches the model and turns the loss flag off;
    with ASFT its trainer is _FusedASFTTrainer."""
    from llamafactory.train.sft import workflow
    from llamafactory.train.trainer_utils import create_ref_model

    stock, stock_trainer = workflow.load_model, workflow.CustomSeq2SeqTrainer

    def load_model(tokenizer, model_args, finetuning_args, is_trainable=False, *args, **kwargs):
        options = loss_options(vars(finetuning_args), vars(model_args))
        model = stock(tokenizer, model_args, finetuning_args, is_trainable, *args, **kwargs)
        if not is_trainable:
            return model
        if options["loss_type"] == "asft":
            # LLaMA-Factory's own reference: ref_model, or the starting model loaded again
            options["ref_model"] = create_ref_model(model_args, finetuning_args)
            workflow.CustomSeq2SeqTrainer = _asft_trainer(stock_trainer)
        # LLaMA-Factory's trainer would install its own compute_loss_func and pop the labels
        # (ASFT: run its reference model for full logits and read the output's logits)
        for flag in LOSS_FLAGS:
            setattr(finetuning_args, flag, False)
        return patch_model(model, **options)

    workflow.load_model = load_model
    try:
        yield
    finally:
        workflow.load_model, workflow.CustomSeq2SeqTrainer = stock, stock_trainer


def _asft_trainer(stock_trainer: type) -> type:
    """LLaMA-Factory's CustomSeq2SeqTrainer whose loss is the patched model's ASFT loss, reduced
    as LLaMA-Factory's compute_loss with use_asft_loss reduces it: the model called on the batch
    with its labels and without num_items_in_batch (a mean over this micro-batch's valid tokens),
    its loss returned as it is (not divided by the accumulation steps, not multiplied by the
    number of processes). The reference model runs inside the patched forward."""

    class _FusedASFTTrainer(stock_trainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            # set, as LLaMA-Factory sets its asft_loss_func: Trainer.training_step then does not
            # divide the loss by the accumulation steps
            self.compute_loss_func = _patched_loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            loss = self.compute_loss_func(outputs, inputs["labels"])
            return (loss, outputs) if return_outputs else loss

    _FusedASFTTrainer.__name__ = _FusedASFTTrainer.__qualname__ = stock_trainer.__name__
    return _FusedASFTTrainer


def _patched_loss(outputs, labels, num_items_in_batch=None):
    """The patched model's fused ASFT loss (its reference model ran inside its forward)."""
    return outputs["loss"]


def main(argv: list[str] | None = None) -> None:
    """`python -m fused_dft.integrations.llamafactory train config.yaml [key=value ...]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "train":
        raise SystemExit(
            "usage: python -m fused_dft.integrations.llamafactory train config.yaml [key=value ...]"
            " (the arguments of `llamafactory-cli train`)"
        )
    sys.argv = [sys.argv[0], *argv[1:]]  # LLaMA-Factory's read_args reads the YAML from argv
    run_exp()


if __name__ == "__main__":
    main()
