"""The axolotl plugin's own logic, without axolotl: the raw YAML dict -> patch_model's options
(Liger's DFT and axolotl's EAFT mapped, their keys turned off), the refusals, the version check,
the ImportError when axolotl is missing, and the mapped options against float64 oracles of the
losses axolotl itself computes (Liger's token-scaled cross-entropy; axolotl's eaft_loss).

Stand-ins: the raw config is the dict axolotl's `prepare_plugins` hands to `register` (the YAML
as loaded). The run against axolotl itself (losses and grad norms over 3 steps of its SFT) is
`make test-integrations` (tests/integrations/run_trainers.py); the last test runs the plugin's
`register` when axolotl is importable.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

import fused_dft
from fused_dft.integrations import axolotl_flags as flags

from ..helpers import assert_close, make_inputs

LIGER_DFT = {"liger_fused_linear_cross_entropy": True, "liger_use_token_scaling": True}
EAFT = {"loss_type": "eaft", "eaft_topk": 20, "eaft_normalizer": 1.0}

# ragged, as in test_loss.py: 37 tokens x 40 features x 129 vocab, no dimension a tile multiple
N, D, V = 37, 40, 129


@pytest.mark.parametrize(
    "cfg, options",
    [
        ({}, {"loss_type": "ce"}),
        ({"fused_dft_loss_type": "dft"}, {"loss_type": "dft"}),
        ({"fused_dft_loss_type": "ce"}, {"loss_type": "ce"}),
        (LIGER_DFT, {"loss_type": "dft"}),  # Liger's DFT
        ({**LIGER_DFT, "fused_dft_loss_type": "dft"}, {"loss_type": "dft"}),
        ({"liger_fused_linear_cross_entropy": True}, {"loss_type": "ce"}),  # Liger's fused CE
        ({"liger_fused_linear_cross_entropy": True, "liger_rms_norm": True}, {"loss_type": "ce"}),
        # axolotl's eaft_loss: top eaft_k (20) logits, H_k ** eaft_alpha (1.0), no normalizer
        ({"use_eaft": True}, {**EAFT, "eaft_alpha": 1.0}),
        ({"use_eaft": True, "eaft_alpha": None, "eaft_k": None}, {**EAFT, "eaft_alpha": 1.0}),
        (
            {"use_eaft": True, "eaft_alpha": 0.5, "eaft_k": 7},
            {**EAFT, "eaft_alpha": 0.5, "eaft_topk": 7},
        ),
        # axolotl's EAFT replaces Liger's fused CE (its compute_loss_func takes the labels)
        ({"use_eaft": True, "liger_fused_linear_cross_entropy": True}, {**EAFT, "eaft_alpha": 1.0}),
        ({"use_eaft": False, "eaft_alpha": 0.5}, {"loss_type": "ce"}),
        # the plugin's own keys: any member that needs only the labels, with its parameters
        (
            {"fused_dft_loss_type": "power", "fused_dft_params": {"power_q": 0.5}},
            {"loss_type": "power", "power_q": 0.5},
        ),
        (
            {"fused_dft_loss_type": "eaft", "fused_dft_params": {"eaft_alpha": 2.0}},
            {"loss_type": "eaft", "eaft_alpha": 2.0},
        ),
    ],
)
def test_config_maps_to_the_fused_loss_and_turns_its_own_loss_off(cfg, options):
    cfg = dict(cfg)
    before = set(cfg)
    assert flags.checked_options(cfg) == options
    assert cfg["fused_dft_loss_type"] == options["loss_type"]
    assert cfg["fused_dft_params"] == {k: v for k, v in options.items() if k != "loss_type"}
    # neither Liger's fused linear cross-entropy nor axolotl's EAFT is installed; keys that were
    # absent stay absent (Liger's exist only with its plugin) and Liger's other kernels stay
    for key in ("liger_fused_linear_cross_entropy", "liger_use_token_scaling", "use_eaft"):
        assert cfg.get(key) is (False if key in before else None), key
    assert cfg.get("liger_rms_norm") in (None, True)


@pytest.mark.parametrize(
    "cfg, setting",
    [
        ({"liger_cross_entropy": True}, "liger_cross_entropy: True"),
        ({"cut_cross_entropy": True}, "cut_cross_entropy: True"),
        ({"chunked_cross_entropy": True}, "chunked_cross_entropy: True"),
        ({"flash_attn_cross_entropy": True}, "flash_attn_cross_entropy: True"),
        ({"unsloth_cross_entropy_loss": True}, "unsloth_cross_entropy_loss: True"),
        ({"rl": "dpo"}, "rl: 'dpo'"),
        ({"reward_model": True}, "reward_model: True"),
        ({"orpo_alpha": 0.1}, "orpo_alpha: 0.1"),
        ({"label_smoothing_factor": 0.1}, "label_smoothing_factor: 0.1"),
        (
            {"plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"]},
            "plugin axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin",
        ),
        ({"fused_dft_loss_type": "psft"}, "fused_dft_loss_type: 'psft'"),
        ({"fused_dft_loss_type": "asft"}, "fused_dft_loss_type: 'asft'"),
        ({"fused_dft_params": [0.5]}, r"fused_dft_params: \[0.5\]"),
        ({**LIGER_DFT, "fused_dft_loss_type": "ce"}, "fused_dft_loss_type: 'ce' with Liger's DFT"),
        (
            {"liger_fused_linear_cross_entropy": True, "fused_dft_loss_type": "dft"},
            "fused_dft_loss_type: 'dft' with Liger's cross-entropy",
        ),
        (
            {"use_eaft": True, "fused_dft_loss_type": "dft"},
            "fused_dft_loss_type: 'dft' with use_eaft",
        ),
        ({**LIGER_DFT, "use_eaft": True}, "use_eaft: true with liger_use_token_scaling: true"),
        ({"liger_use_token_scaling": True}, "liger_use_token_scaling: true without liger_fused"),
        (
            {"use_eaft": True, "fused_dft_params": {"eaft_alpha": 2.0}},
            "fused_dft_params with use_eaft: true",
        ),
    ],
)
def test_combinations_it_cannot_honour_are_refused_by_name(cfg, setting):
    with pytest.raises(ValueError, match=f"axolotl: {setting}.* is refused"):
        flags.checked_options(dict(cfg))


@pytest.mark.parametrize(
    "cfg, message",
    [
        # fused_dft's own checks, run at register (before the model loads)
        ({"fused_dft_loss_type": "power", "fused_dft_params": {"power_q": -1.0}}, "power_q"),
        ({"fused_dft_loss_type": "dft", "fused_dft_params": {"power_q": 0.5}}, "power_q"),
        ({"fused_dft_loss_type": "ce", "fused_dft_params": {"temperature": 2}}, "temperature"),
        ({"use_eaft": True, "eaft_alpha": -0.5}, "eaft_alpha"),
        ({"use_eaft": True, "eaft_k": 2.5}, "eaft_topk"),
    ],
)
def test_bad_family_parameters_are_refused_before_the_model_loads(cfg, message):
    with pytest.raises((ValueError, TypeError), match=message):
        flags.checked_options(dict(cfg))


@pytest.mark.parametrize(
    "cfg, expected",
    [
        ({"use_eaft": True}, True),  # a compute_loss_func: sum / num_items_in_batch
        ({"use_eaft": False}, False),
        (LIGER_DFT, False),  # model losses: micro-batch means / gradient_accumulation_steps
        ({"fused_dft_loss_type": "eaft"}, False),
        ({}, False),
    ],
)
def test_the_normalization_follows_axolotls_own_loss(cfg, expected):
    assert flags.over_num_items(dict(cfg)) is expected


@pytest.mark.parametrize("version", ["0.18.0", "0.20.0", "0.19.0.dev0"])
def test_a_version_it_was_not_tested_with_is_refused(version):
    with pytest.raises(RuntimeError, match=f"axolotl {version} is not a version"):
        flags.check_version(version)
    flags.check_version("0.19.0")


def _cross_entropy64(hidden, weight, labels):
    """float64 logits' per-token cross-entropy on the valid tokens, and those logits."""
    valid = labels != -100
    z = hidden.double()[valid] @ weight.double().t()
    return F.cross_entropy(z, labels[valid], reduction="none"), z


def liger_dft64(hidden, weight, labels):
    """Liger's fused linear cross-entropy with use_token_scaling: each token's cross-entropy
    times its detached target probability p = exp(-ce), averaged over the valid tokens."""
    ce, _ = _cross_entropy64(hidden, weight, labels)
    return (ce * torch.exp(-ce).detach()).mean()


def axolotl_eaft64(hidden, weight, labels, alpha=1.0, k=20):
    """axolotl 0.19.0's eaft_loss (monkeypatch/loss/eaft.py) in float64: the softmax of the top
    min(k, V) logits, its entropy H_k (with axolotl's log(p + 1e-10)), detached weight H_k ** alpha
    on each token's cross-entropy, averaged over the valid tokens."""
    ce, z = _cross_entropy64(hidden, weight, labels)
    with torch.no_grad():
        top = torch.softmax(torch.topk(z, k=min(k, z.shape[-1]), dim=-1).values, dim=-1)
        weights = (-(top * torch.log(top + 1e-10)).sum(-1)) ** alpha
    return (ce * weights).mean()


# the loss axolotl computes for a config, and the options the plugin maps it to; k = 7 is not a
# tile size, 20 is axolotl's default
ORACLE_CASES = {
    "liger_dft": (LIGER_DFT, liger_dft64),
    "eaft_default": ({"use_eaft": True}, axolotl_eaft64),
    "eaft_alpha_k": (
        {"use_eaft": True, "eaft_alpha": 0.7, "eaft_k": 7},
        lambda h, w, y: axolotl_eaft64(h, w, y, alpha=0.7, k=7),
    ),
}


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_mapped_options_give_axolotls_own_loss_and_gradients(case):
    cfg, oracle = ORACLE_CASES[case]
    torch.manual_seed(19)
    hidden, weight, labels, _ = make_inputs(N, D, V, device="cpu")
    options = flags.checked_options(dict(cfg))
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = fused_dft.fused_linear_dft_loss(h, w, labels, **options)
    dh, dw = torch.autograd.grad(loss, (h, w))
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    expected = oracle(h64, w64, labels)
    dh64, dw64 = torch.autograd.grad(expected, (h64, w64))
    assert_close(loss, expected, f"{case} loss", rtol=1e-5)
    assert_close(dh, dh64, f"{case} d hidden")
    assert_close(dw, dw64, f"{case} d weight")


def test_import_without_axolotl_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "axolotl", None)
    monkeypatch.setitem(sys.modules, "axolotl.integrations", None)
    monkeypatch.setitem(sys.modules, "axolotl.integrations.base", None)
    monkeypatch.delitem(sys.modules, "fused_dft.integrations.axolotl", raising=False)
    with pytest.raises(ImportError, match=r"fused-dft\[axolotl\]"):
        importlib.import_module("fused_dft.integrations.axolotl")


def test_plugin_register_maps_and_refuses_with_axolotl():
    pytest.importorskip("axolotl.integrations.base")
    from fused_dft.integrations.axolotl import FusedDFTPlugin

    cfg = {**LIGER_DFT, "plugins": ["fused_dft.integrations.axolotl.FusedDFTPlugin"]}
    plugin = FusedDFTPlugin()
    plugin.register(cfg)
    assert cfg["fused_dft_loss_type"] == "dft" and cfg["liger_use_token_scaling"] is False
    assert not plugin.over_num_items
    cfg = {"use_eaft": True, "eaft_alpha": 0.5}
    plugin.register(cfg)
    assert plugin.over_num_items and cfg["use_eaft"] is False
    with pytest.raises(ValueError, match="cut_cross_entropy: True is refused"):
        FusedDFTPlugin().register({"cut_cross_entropy": True})
