"""The ms-swift plugin's own logic, without ms-swift: its arguments -> patch_model's options, the
refusals, the version check, and the ImportError when ms-swift is missing.

Stand-ins: `vars()` of ms-swift 4.6.0's SftArguments is a plain dict with the same keys. The run
against ms-swift itself (losses and grad norms over 3 steps of `swift sft`) is
`make test-integrations` (tests/integrations/run_trainers.py).
"""

from __future__ import annotations

import importlib
import sys

import pytest

from fused_dft.integrations import ms_swift_flags as flags


def sft_args(**overrides):
    """ms-swift 4.6.0's defaults for the fields the plugin reads (SftArguments has no rlhf_type)."""
    return {
        "enable_dft_loss": False, "task_type": "causal_lm", "loss_scale": "default",
        "loss_type": None, "sequence_parallel_size": 1, "enable_channel_loss": False,
        "use_liger_kernel": False, "label_smoothing_factor": 0.0, "tuner_backend": "peft",
        "tuner_type": flags.TUNER, **overrides,
    }  # fmt: skip


@pytest.mark.parametrize(
    "overrides, loss_type", [({}, "ce"), ({"enable_dft_loss": True}, "dft")]
)  # fmt: skip
def test_flags_map_to_the_fused_loss(overrides, loss_type):
    assert flags.loss_options(sft_args(**overrides), binary_loss_scale=True) == {
        "loss_type": loss_type
    }


@pytest.mark.parametrize(
    "overrides, setting",
    [
        ({"rlhf_type": "dpo"}, "rlhf_type='dpo'"),
        ({"task_type": "seq_cls"}, "task_type='seq_cls'"),
        ({"loss_type": "infonce"}, "loss_type='infonce'"),
        ({"sequence_parallel_size": 2}, "sequence_parallel_size > 1"),
        ({"enable_channel_loss": True}, "enable_channel_loss"),
        ({"use_liger_kernel": True}, "use_liger_kernel"),
        ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
        ({"tuner_backend": "unsloth"}, "tuner_backend='unsloth'"),
    ],
)
def test_settings_it_cannot_honour_are_refused_by_name(overrides, setting):
    with pytest.raises(ValueError, match=f"ms_swift: {setting}.* is refused"):
        flags.loss_options(sft_args(enable_dft_loss=True, **overrides), binary_loss_scale=True)


def test_weighted_loss_scale_is_refused():
    # ms-swift pops the labels of a batch carrying loss_scale: they would never reach the model
    with pytest.raises(ValueError, match="loss_scale='default\\+ignore_empty_think'"):
        flags.loss_options(
            sft_args(enable_dft_loss=True, loss_scale="default+ignore_empty_think"),
            binary_loss_scale=False,
        )


@pytest.mark.parametrize("version", ["4.5.0", "4.7.0", "3.12.0"])
def test_a_version_it_was_not_tested_with_is_refused(version):
    with pytest.raises(RuntimeError, match=f"ms-swift {version} is not a version"):
        flags.check_version(version)
    flags.check_version("4.6.0")


def test_import_without_ms_swift_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "swift", None)
    monkeypatch.delitem(sys.modules, "fused_dft.integrations.ms_swift", raising=False)
    with pytest.raises(ImportError, match=r"fused-dft\[ms-swift\]"):
        importlib.import_module("fused_dft.integrations.ms_swift")
