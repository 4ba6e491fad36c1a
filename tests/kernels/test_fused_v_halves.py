"""The fused kernels with v_halves=2 (a block_n x 2*block_v logits tile per program step, computed
as two block_v-wide halves that share each h load) against the float64 reference.

The sm_90 candidates 128 x (2x128) run through the same kernel bodies as the 128 x 128 ones, with
V_HALVES=2; here the tiles are shrunk (16 x (2x16) x 16) so that the small ragged shapes span
several wide tiles, the forward several vocab splits and the backward several token and vocab
chunks, under the interpreter.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fused_dft
from fused_dft.backends import fused
from fused_dft.kernels import configs
from fused_dft.kernels.configs import FusedConfig

from ..helpers import (
    SMALL_FUSED,
    assert_close,
    assert_within_torch_error,
    make_inputs,
    run,
    truth,
)

HALVES = dataclasses.replace(SMALL_FUSED, v_halves=2)  # 16 x (2x16) x 16, 3 vocab splits

# 37 tokens x 40 features, none a multiple of a tile. V = 129 = 4 * 32 + 1: the last wide tile's
# high half lies wholly past V (and its low half holds one column); V = 145 = 4 * 32 + 17: the
# high half is partly past V. The backward's vocab chunks are 128 columns (the scratch minimum),
# so V = 129 also ends on a one-column chunk.
SHAPES = [(37, 40, 129), (37, 40, 145)]

# none; bias and a scale; bias and a softcap that bites: the epilogue's transform per half
TRANSFORMS = {
    "plain": dict(bias=False, opts={}),
    "bias_scale": dict(bias=True, opts={"logit_scale": 0.625}),
    "bias_softcap": dict(bias=True, opts={"softcap": 2.5, "logit_scale": 1.5}),
}


def use_halves(monkeypatch, config: FusedConfig = HALVES) -> None:
    """Every fused launch uses `config`; the backward runs several token and vocab chunks."""
    monkeypatch.setenv(configs.ENV_CONFIG, config.spec)
    monkeypatch.setattr(fused, "TOKEN_CHUNK", 16)
    monkeypatch.setattr(fused, "DZ_SCRATCH_BYTES", 16 * 4 * 48)
    monkeypatch.setattr(fused, "DZ_SCRATCH_MAX_BYTES", 16 * 4 * 48)


def spy_halves(monkeypatch) -> list[int]:
    """The V_HALVES each fused launch passes (so a test fails if the config did not reach the
    kernels)."""
    seen = []
    launch = configs.LaunchPlan.launch

    def spying(self, kernel, grid, *args, **kwargs):
        seen.extend(c.v_halves for c in self.candidates)
        return launch(self, kernel, grid, *args, **kwargs)

    monkeypatch.setattr(configs.LaunchPlan, "launch", spying)
    return seen


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"V{s[2]}")
@pytest.mark.parametrize("transform", list(TRANSFORMS))
# dft: the probability-weighted loss (entropy partial in the forward); ce with label smoothing:
# the logit-sum partial and the uniform term of the gradient
@pytest.mark.parametrize("loss", ["dft", "ce_smoothed"])
def test_v_halves_matches_reference(shape, transform, loss, monkeypatch):
    use_halves(monkeypatch)
    seen = spy_halves(monkeypatch)
    spec = TRANSFORMS[transform]
    hidden, weight, labels, bias = make_inputs(*shape, bias=spec["bias"], scale=2.0)
    opts = dict(spec["opts"], reduction="none")
    if loss == "dft":
        opts["loss_type"] = "dft"
    else:
        opts.update(loss_type="ce", label_smoothing=0.1)
    got, grads, stats, upstream = run("fused", hidden, weight, labels, bias, **opts)
    want, grads_t, stats_t, _ = truth(hidden, weight, labels, bias, upstream, **opts)
    assert seen and set(seen) == {2}, seen
    assert_close(got, want, "loss", rtol=1e-5, atol_frac=1e-6)
    for name, g, g_t in zip(("dh", "dW", "db"), grads, grads_t):
        assert_close(g, g_t, name)
    assert_close(stats.entropy, stats_t.entropy, "stats.entropy", rtol=1e-4)
    assert_close(stats.accuracy, stats_t.accuracy, "stats.accuracy", rtol=0)


# the entropy's gradient (the dz kernel's HAS_ENTROPY_GRAD term) per half
def test_v_halves_logprobs_and_entropy_gradients(monkeypatch):
    use_halves(monkeypatch)
    hidden, weight, labels, bias = make_inputs(37, 40, 145, bias=True, scale=2.0)
    g_logp = torch.randn(37, dtype=torch.float64)
    g_ent = torch.randn(37, dtype=torch.float64)

    def grads(impl, h, w, b):
        h, w, b = (t.detach().clone().requires_grad_(True) for t in (h, w, b))
        logp, entropy = fused_dft.fused_linear_logprobs(h, w, labels, b, impl=impl)
        inputs = (h, w, b)
        got = torch.autograd.grad(
            (logp * g_logp.to(logp)).sum() + (entropy * g_ent.to(entropy)).sum(), inputs
        )
        return logp.detach(), entropy.detach(), got

    logp, ent, got = grads("fused", hidden, weight, bias)
    logp_t, ent_t, want = grads("reference", hidden.double(), weight.double(), bias.double())
    valid = labels != -100
    assert_close(logp[valid], logp_t[valid], "logp", rtol=1e-5, atol_frac=1e-6)
    assert_close(ent[valid], ent_t[valid], "entropy", rtol=1e-4)
    for name, g, g_t in zip(("dh", "dW", "db"), got, want):
        assert_close(g, g_t, name)


# bf16 inputs (upcast after loading under the interpreter, native bf16 dots on a GPU): no worse
# than plain torch in bf16 against float64, plus the suite's margin
def test_v_halves_bf16_within_torch_error(monkeypatch):
    use_halves(monkeypatch)
    dtype = torch.bfloat16
    hidden, weight, labels, _ = make_inputs(37, 40, 145, dtype=dtype, scale=2.0)
    got, grads, _, upstream = run("fused", hidden, weight, labels, reduction="none")
    torch_res, torch_grads, _, _ = run(
        "reference", hidden, weight, labels, upstream=upstream, reduction="none"
    )
    want, grads_t, _, _ = truth(hidden, weight, labels, None, upstream, reduction="none")
    assert_within_torch_error(got, torch_res, want, "loss", dtype)
    for name, g, r, t in zip(("dh", "dW"), grads, torch_grads, grads_t):
        assert_within_torch_error(g, r, t, name, dtype)


def test_v_halves_config_checks_and_tile_width():
    with pytest.raises(ValueError, match=r"FusedConfig.v_halves=3: choose from \(1, 2\)"):
        FusedConfig(v_halves=3)
    with pytest.raises(ValueError, match="FusedConfig.v_halves must be an int"):
        FusedConfig(v_halves=2.0)
    wide = FusedConfig(128, 128, 64, v_halves=2)
    assert wide.tile_v == 256 and wide.meta["V_HALVES"] == 2
    assert FusedConfig.parse(wide.spec) == wide
    # the forward's vocab splits are multiples of every candidate's program-step width
    plan = configs.LaunchPlan((FusedConfig(128, 128, 64), wide))
    assert plan.max_block_v == 256


# sm_90's 16-bit and tf32 candidates end with the two-halves tiles, after the 128 x 128 ones
# (which stay, and stay first: the default without autotuning); no other arch gets them
def test_sm90_offers_the_two_halves_candidates_last():
    for cls in ("16bit", "tf32"):
        for key, cands in configs.CONFIG_SETS.items():
            if key[0] != cls:
                continue
            assert cands[0].v_halves == 1 and cands[0].block_n == cands[0].block_v == 128
            wide = [c for c in cands if c.v_halves == 2]
            assert wide and cands[-len(wide) :] == tuple(wide), key
            assert all(c.block_n == c.block_v == 128 for c in wide)
    fp32 = [c for k, cs in configs.CONFIG_SETS.items() if k[0] == "fp32" for c in cs]
    assert all(c.v_halves == 1 for c in fp32)
    assert all(c.v_halves == 1 for cs in configs.SMALL_SETS.values() for c in cs)
