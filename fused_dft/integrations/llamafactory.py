"""LLaMA-Factory's SFT through the fused loss: one command in place of `llamafactory-cli train`.

    llamafactory-cli train config.yaml                          # LLaMA-Factory's own loss
    python -m fused_dft.integrations.llamafactory train config.yaml   # the same run, fused

(under torchrun: `torchrun --nproc-per-node N -m fused_dft.integrations.llamafactory train
config.yaml`; from Python: `from fused_dft.integrations.llamafactory import run_exp` in place of
`llamafactory.train.tuner.run_exp`). The YAML is unchanged: its loss flags are read here and
mapped to a fused loss (`LOSS_FLAGS`),

    use_dft_loss: true                 -> loss_type="dft"
    use_eaft_loss: true (eaft_alpha)   -> loss_type="eaft", eaft_topk=20, eaft_alpha (exact)
    neither                            -> loss_type="ce" (the model's own cross-entropy)
    use_asft_loss: true                -> refused: the fused ASFT needs the reference model's
                                          hidden states, which patch_model does not feed yet

LLaMA-Factory computes those losses itself from the logits, taking the labels out of the batch
(Trainer's `compute_loss_func`); here the flag is turned off before its trainer is built and the
model is patched (fused_dft.patch_model) when `run_sft` loads it, so Trainer calls the patched
model with the labels and `num_items_in_batch`: the loss is LLaMA-Factory's (sum over the valid
tokens divided by `num_items_in_batch`), and no logits are built in training.

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
from .llamafactory_flags import check_version, loss_options

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
    """Within the run, `run_sft`'s load_model patches the model and turns the loss flag off."""
    from llamafactory.train.sft import workflow

    stock = workflow.load_model

    def load_model(tokenizer, model_args, finetuning_args, is_trainable=False, *args, **kwargs):
        options = loss_options(vars(finetuning_args), vars(model_args))
        model = stock(tokenizer, model_args, finetuning_args, is_trainable, *args, **kwargs)
        if not is_trainable:
            return model
        # LLaMA-Factory's trainer would install its own compute_loss_func and pop the labels
        finetuning_args.use_dft_loss = False
        finetuning_args.use_eaft_loss = False
        return patch_model(model, **options)

    workflow.load_model = load_model
    try:
        yield
    finally:
        workflow.load_model = stock


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
