"""The LLaMA-Factory adapter's own logic, without LLaMA-Factory: its flags -> patch_model's options,
the refusals, the version check, and the ImportError when LLaMA-Factory is missing.

Stand-ins: `vars()` of LLaMA-Factory 0.9.5's FinetuningArguments / ModelArguments are plain
dicts with the same keys. The run against LLaMA-Factory itself (losses and grad norms over 3 steps
of its own SFT) is `make test-integrations` (tests/integrations/run_trainers.py).
"""

from __future__ import annotations

import importlib
import sys

import pytest

from fused_dft.family import REGISTRY
from fused_dft.integrations import llamafactory_flags as flags


def finetuning(**overrides):
    """LLaMA-Factory 0.9.5's defaults for the fields the adapter reads."""
    return {
        "stage": "sft", "use_dft_loss": False, "use_eaft_loss": False, "eaft_alpha": 1.0,
        "use_asft_loss": False, "asft_alpha": 0.1, "ref_model": None, "finetuning_type": "full",
        "use_mca": False,
        "use_hyper_parallel": False, **overrides,
    }  # fmt: skip


MODEL = {"enable_liger_kernel": False, "use_unsloth": False, "use_kt": False}


@pytest.mark.parametrize(
    "overrides, options",
    [
        ({}, {"loss_type": "ce"}),
        ({"use_dft_loss": True}, {"loss_type": "dft"}),
        # exactly _eaft_cross_entropy: top 20 logits, entropy / 3, its eaft_alpha
        ({"use_eaft_loss": True}, {"loss_type": "eaft", "eaft_topk": 20, "eaft_alpha": 1.0}),
        (
            {"use_eaft_loss": True, "eaft_alpha": 0.5},
            {"loss_type": "eaft", "eaft_topk": 20, "eaft_alpha": 0.5},
        ),
        # asft_alpha is read only with use_asft_loss
        ({"use_dft_loss": True, "asft_alpha": 0.3}, {"loss_type": "dft"}),
        # exactly _asft_cross_entropy: DFT + asft_alpha * KL(ref || policy); the adapter adds
        # the reference model LLaMA-Factory builds (create_ref_model) at load time
        ({"use_asft_loss": True}, {"loss_type": "asft", "asft_alpha": 0.1}),
        ({"use_asft_loss": True, "asft_alpha": 0.3}, {"loss_type": "asft", "asft_alpha": 0.3}),
        (
            {"use_asft_loss": True, "finetuning_type": "lora", "ref_model": "/models/base"},
            {"loss_type": "asft", "asft_alpha": 0.1},
        ),
    ],
)
def test_flags_map_to_the_fused_loss(overrides, options):
    assert flags.loss_options(finetuning(**overrides), MODEL) == options


def test_eaft_normalizer_is_llamafactorys_three():
    # LLaMA-Factory divides the top-20 entropy by 3.0; the adapter passes no eaft_normalizer, so
    # the family's default for a top-k must be that
    (param,) = [p for p in REGISTRY["eaft"].params if p.name == "eaft_normalizer"]
    assert param.default({"eaft_topk": flags.EAFT_TOPK}) == 3.0


@pytest.mark.parametrize(
    "setting, where",
    [
        ("use_mca", "finetuning"),
        ("use_hyper_parallel", "finetuning"),
        ("enable_liger_kernel", "model"),
        ("use_unsloth", "model"),
        ("use_kt", "model"),
    ],
)
def test_settings_it_cannot_honour_are_refused_by_name(setting, where):
    ft, model = finetuning(), dict(MODEL)
    (ft if where == "finetuning" else model)[setting] = True
    with pytest.raises(ValueError, match=f"{setting}=true is refused"):
        flags.loss_options(ft, model)


def test_asft_with_lora_and_no_reference_is_refused():
    # LLaMA-Factory's create_ref_model returns None for LoRA without ref_model
    with pytest.raises(ValueError, match="finetuning_type=lora needs ref_model"):
        flags.loss_options(finetuning(use_asft_loss=True, finetuning_type="lora"), MODEL)


@pytest.mark.parametrize(
    "both",
    [
        ("use_dft_loss", "use_eaft_loss"),
        ("use_dft_loss", "use_asft_loss"),
        ("use_eaft_loss", "use_asft_loss"),
    ],
)
def test_two_loss_flags_are_refused(both):
    # LLaMA-Factory itself would take the first for its loss function (with use_asft_loss also
    # handing it the reference logits in place of num_items_in_batch)
    with pytest.raises(ValueError, match=" and ".join(both)):
        flags.loss_options(finetuning(**dict.fromkeys(both, True)), MODEL)


@pytest.mark.parametrize("stage", ["pt", "rm", "dpo", "kto", "ppo"])
def test_stages_other_than_sft_are_refused(stage):
    with pytest.raises(ValueError, match=f"stage='{stage}'"):
        flags.loss_options(finetuning(stage=stage, use_dft_loss=True), MODEL)


@pytest.mark.parametrize("version", ["0.9.4", "0.9.6", "1.0.0", "0.9.5.dev0"])
def test_a_version_it_was_not_tested_with_is_refused(version):
    with pytest.raises(RuntimeError, match=f"LLaMA-Factory {version} is not a version"):
        flags.check_version(version)
    flags.check_version("0.9.5")


def test_import_without_llamafactory_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llamafactory", None)  # import llamafactory -> ImportError
    monkeypatch.delitem(sys.modules, "fused_dft.integrations.llamafactory", raising=False)
    with pytest.raises(ImportError, match=r"fused-dft\[llamafactory\]"):
        importlib.import_module("fused_dft.integrations.llamafactory")
