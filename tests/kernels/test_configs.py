"""Fused kernel configs: validation, the override, which config(s) a launch gets, the TF32 read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_dft
from fused_dft.kernels import configs
from fused_dft.kernels.configs import FusedConfig

from ..device import DEVICE
from ..helpers import assert_close, assert_within_torch_error, make_inputs, run, truth

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")  # only a name here: nothing is allocated on it


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(block_n=48), "FusedConfig.block_n=48: must be a power of two in [16, 256]"),
        (dict(block_d=8), "FusedConfig.block_d=8: must be a power of two in [16, 256]"),
        (dict(block_v=512), "FusedConfig.block_v=512: must be a power of two in [16, 256]"),
        (dict(num_warps=3), "FusedConfig.num_warps=3: choose from (1, 2, 4, 8, 16, 32)"),
        (dict(num_stages=0), "FusedConfig.num_stages=0: must be in [1, 8]"),
        (dict(vocab_splits=0), "FusedConfig.vocab_splits=0: must be in [1, 1024]"),
        (dict(block_n=64.0), "FusedConfig.block_n must be an int, got 64.0"),
        (dict(num_warps=True), "FusedConfig.num_warps must be an int, got True"),
    ],
)
def test_invalid_config_is_named(fields, message):
    with pytest.raises(ValueError) as exc:
        FusedConfig(**fields)
    assert message in str(exc.value)


def test_parse_fills_unnamed_fields_from_the_base():
    base = FusedConfig(32, 64, 16, num_warps=4, num_stages=2, vocab_splits=3)
    config = FusedConfig.parse(" block_n=128, num_stages=3 ", base)
    assert config == FusedConfig(128, 64, 16, num_warps=4, num_stages=3, vocab_splits=3)
    assert FusedConfig.parse(config.spec) == config


@pytest.mark.parametrize(
    "text, message",
    [
        ("block_m=64", "unknown field 'block_m'; choose from ['block_n', 'block_v', 'block_d'"),
        ("block_n", "unknown field 'block_n'"),
        ("block_n=big", "block_n='big' is not an integer"),
        ("", "expected fields like 'block_n=64,block_v=128'"),
        ("block_v=100", "FusedConfig.block_v=100: must be a power of two"),
    ],
)
def test_bad_config_text_is_named(text, message):
    with pytest.raises(ValueError) as exc:
        FusedConfig.parse(text)
    assert message in str(exc.value)


def test_every_shipped_candidate_is_valid_and_buckets_share_vocab_splits():
    for key, candidates in configs.CONFIG_SETS.items():
        assert candidates, key
        assert len({c.vocab_splits for c in candidates}) == 1, key
        assert len(set(candidates)) == len(candidates), key
    assert set(configs.DTYPE_CLASSES) == {k[0] for k in configs.CONFIG_SETS}


def test_buckets():
    assert configs.config_set(torch.bfloat16, 4096, 128256) == configs._16BIT_LONG_D
    assert configs.config_set(torch.float16, 1024, 32000) == configs._16BIT_SHORT_D
    assert configs.config_set(torch.float32, 4096, 128256) == configs._FP32  # TF32 off here


# -- which config(s) a launch gets ----------------------------------------------------------------


def test_cuda_autotunes_over_the_buckets_candidates(monkeypatch):
    monkeypatch.delenv(configs.ENV_CONFIG, raising=False)
    plan = configs.plan(torch.bfloat16, CUDA, 4096, 128256)
    assert plan.candidates == configs._16BIT_LONG_D and len(plan.candidates) > 1
    monkeypatch.setenv(configs.ENV_AUTOTUNE, "0")
    assert configs.plan(torch.bfloat16, CUDA, 4096, 128256).candidates == plan.candidates[:1]
    monkeypatch.setenv(configs.ENV_AUTOTUNE, "yes")
    with pytest.raises(ValueError, match="FUSED_DFT_AUTOTUNE must be 0 or 1, got 'yes'"):
        configs.plan(torch.bfloat16, CUDA, 4096, 128256)


def test_the_interpreter_gets_one_fixed_config(monkeypatch):
    monkeypatch.delenv(configs.ENV_CONFIG, raising=False)
    plan = configs.plan(torch.bfloat16, torch.device("cpu"), 4096, 128256)
    assert plan.candidates == (configs.INTERPRETER_CONFIG,)


def test_overrides_python_before_environment_before_shipped(monkeypatch):
    monkeypatch.setenv(configs.ENV_CONFIG, "block_n=32,vocab_splits=3")
    default = configs.config_set(torch.bfloat16, 4096, 128256)[0]
    (env,) = configs.plan(torch.bfloat16, CUDA, 4096, 128256).candidates
    assert env == FusedConfig.parse("block_n=32,vocab_splits=3", default)
    with configs.use_fused_config("block_v=32"):
        (py,) = configs.plan(torch.bfloat16, CUDA, 4096, 128256).candidates
        assert py.block_v == 32 and py.block_n == default.block_n
        explicit = FusedConfig(16, 16, 16)
        assert configs.plan(torch.bfloat16, CUDA, 40, 129, explicit).candidates == (explicit,)
    monkeypatch.setenv(configs.ENV_CONFIG, "block_n=24")
    with pytest.raises(ValueError, match="FUSED_DFT_FUSED_CONFIG: FusedConfig.block_n=24"):
        configs.plan(torch.bfloat16, CUDA, 4096, 128256)
    with pytest.raises(ValueError, match="unknown field 'warps'"):
        with configs.use_fused_config("warps=4"):
            pass


class FakeKernel:
    """Records what a launch passes (a stand-in for a @triton.jit function)."""

    arg_names = ["D", "V", "n_bucket", "HAS_BIAS"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def test_fixed_launch_passes_the_tiles_and_options():
    kernel = FakeKernel()
    config = FusedConfig(32, 64, 16, num_warps=4, num_stages=3)
    plan = configs.LaunchPlan((config,))
    plan.launch(kernel, lambda meta: (meta["BLOCK_N"], 7), 1, 2, key=("D",), FLAG=True)
    ((grid, args, kwargs),) = kernel.calls
    assert grid == (32, 7) and args == (1, 2)
    expected = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=16, GROUP_N=8, V_HALVES=1)
    expected.update(num_warps=4, num_stages=3)
    assert kwargs == dict(FLAG=True, **expected)


def test_autotuned_launch_builds_one_autotuner_per_kernel_and_set(monkeypatch):
    import triton

    made = []

    def fake_autotune(configs, key, reset_to_zero=None, **kw):
        made.append((configs, key, reset_to_zero))
        return lambda kernel: kernel

    monkeypatch.setattr(triton, "autotune", fake_autotune)
    monkeypatch.setattr(configs, "_autotuners", {})
    kernel = FakeKernel()
    plan = configs.LaunchPlan(configs._16BIT_LONG_D)
    for _ in range(2):
        plan.launch(kernel, "grid", 1, key=("D", "V", "n_bucket"), reset_to_zero=("dw_ptr",),
                    HAS_BIAS=False)  # fmt: skip
    ((tconfigs, key, reset),) = made  # built once, reused
    assert key == ["D", "V", "n_bucket", "HAS_BIAS"] and reset == ["dw_ptr"]
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in tconfigs] == [
        (c.meta, c.num_warps, c.num_stages) for c in configs._16BIT_LONG_D
    ]
    assert kernel.calls == [("grid", (1,), {"HAS_BIAS": False})] * 2


# -- autotune keys: the kernels' own argument names ----------------------------------------------


def _kernels():
    from fused_dft.kernels import fused_bwd, fused_fwd

    return {
        "fused_fwd": (fused_fwd._fused_partials_kernel, configs.FWD_KEY),
        "fused_dz": (fused_bwd._fused_dz_kernel, configs.DZ_KEY),
    }


@pytest.mark.parametrize("name", ["fused_fwd", "fused_dz"])
def test_every_autotune_key_is_an_argument_of_its_kernel(name):
    from fused_dft.kernels.fused_fwd import kernel_flags
    from fused_dft.options import LossOptions

    kernel, key = _kernels()[name]
    flags = kernel_flags(torch.empty(2, 2), None, LossOptions())
    names = kernel.arg_names
    for k in (*key, *flags, "NEED_ENTROPY" if name == "fused_fwd" else "COMPUTE_DB"):
        assert k in names, f"{name}: autotune key {k!r} is not an argument ({names})"
    assert "n_bucket" in key
    configs.check_key(kernel, (*key, *sorted(flags)))


def test_a_key_that_is_not_an_argument_is_refused_by_name():
    kernel, _ = _kernels()["fused_dz"]
    # the dz kernel has V_chunk, not V: Triton would drop "V" silently
    with pytest.raises(ValueError, match=r"\['V'\] are not its arguments"):
        configs.check_key(kernel, ("D", "V"))
    with pytest.raises(ValueError, match="not its arguments"):
        configs.LaunchPlan(configs._16BIT_LONG_D).launch(kernel, "grid", key=("D", "V"))


# what the autotuned launchers pass: records each launch's key instead of timing on a GPU
@pytest.mark.parametrize("name", ["fused_fwd", "fused_dz"])
def test_the_launchers_key_on_real_arguments_and_the_batch_n_bucket(name, monkeypatch):
    keys, buckets = [], []

    class Recorder:
        """Stands in for triton.autotune's wrapper: runs the first candidate, records the key."""

        def __init__(self, kernel, candidates, key, reset_to_zero):
            configs.check_key(kernel, key)
            keys.append(key)
            self.kernel, self.config = kernel, candidates[0]

        def __getitem__(self, grid):
            def run(*args, **flags):
                buckets.append(args[self.kernel.arg_names.index("n_bucket")])
                c = self.config
                self.kernel[grid(c.meta)](*args, **flags, **c.meta, num_warps=c.num_warps,
                                          num_stages=c.num_stages)  # fmt: skip

            return run

    monkeypatch.setattr(configs, "_autotuner", Recorder)
    small = (FusedConfig(16, 16, 16, num_warps=4, num_stages=1),
             FusedConfig(32, 16, 16, num_warps=4, num_stages=1))  # fmt: skip
    monkeypatch.setattr(configs, "plan", lambda *a, **k: configs.LaunchPlan(small))
    hidden, weight, labels, _ = make_inputs(37, 40, 129)
    h = hidden.clone().requires_grad_(name == "fused_dz")
    loss = fused_dft.fused_linear_dft_loss(h, weight, labels, impl="fused")
    if name == "fused_dz":
        loss.backward()
    kernel, key = _kernels()[name]
    assert any(k[: len(key)] == key for k in keys), keys
    assert set(buckets) == {configs.n_bucket(37)} == {128}


@pytest.mark.parametrize(
    "n, bucket", [(1, 128), (128, 128), (129, 256), (5000, 8192), (16384, 16384), (10**6, 65536)]
)
def test_n_bucket_is_a_power_of_two_in_range(n, bucket):
    assert configs.n_bucket(n) == bucket


# many small vocabulary splits with a ragged last one: every split owns >= 1 column, partials merge
def test_fused_with_many_vocab_splits_matches_reference(monkeypatch):
    hidden, weight, labels, bias = make_inputs(37, 40, 129, bias=True)
    config = FusedConfig(16, 16, 16, num_warps=4, num_stages=1, vocab_splits=7)
    h = hidden.clone().requires_grad_(True)
    with configs.use_fused_config(config):
        loss = fused_dft.fused_linear_dft_loss(h, weight, labels, bias, impl="fused")
    loss.backward()
    loss_t, (dh_t, *_), _, _ = truth(hidden, weight, labels, bias, torch.tensor(1.0))
    assert_close(loss, loss_t, "loss", rtol=1e-5)
    assert_close(h.grad, dh_t, "dh")


# autotuning times every candidate on the real arguments: the atomically accumulated gradients
# must be zeroed before the launch that counts, on the first (tuning) call and on a cached one
@pytest.mark.skipif(DEVICE.type != "cuda", reason="triton.autotune runs on CUDA only")
def test_autotuned_fused_matches_torch_within_its_error(monkeypatch):
    monkeypatch.setenv(configs.ENV_AUTOTUNE, "1")
    monkeypatch.delenv(configs.ENV_CONFIG, raising=False)
    monkeypatch.setattr(configs, "_autotuners", {})
    hidden, weight, labels, bias = make_inputs(300, 256, 1000, dtype=torch.bfloat16, bias=True)
    for _ in range(2):
        loss, grads, _, upstream = run("fused", hidden, weight, labels, bias)
        loss_ref, grads_ref, _, _ = run("reference", hidden, weight, labels, bias, upstream)
        loss_t, grads_t, _, _ = truth(hidden, weight, labels, bias, upstream)
        assert_within_torch_error(loss, loss_ref, loss_t, "loss", torch.bfloat16)
        for name, g, g_ref, g_t in zip(("dh", "dW", "db"), grads, grads_ref, grads_t):
            assert_within_torch_error(g, g_ref, g_t, name, torch.bfloat16)
    assert len(configs._autotuners) == 2  # forward and backward, each tuned once


# -- TF32: torch >= 2.9 raises on the legacy flag once the new API was used --------------------

TF32_SCRIPT = """
import torch
from fused_dft.kernels.fused_fwd import fp32_ieee
x = torch.zeros(1)
matmul = torch.backends.cuda.matmul
{setup}
print(fp32_ieee(x), fp32_ieee(x.half()))
"""


@pytest.mark.parametrize(
    "setup, expected",
    [
        ("", "True False"),
        ("matmul.allow_tf32 = True", "False False"),
        (
            "torch.set_float32_matmul_precision('high'); matmul.fp32_precision = 'ieee'",
            "True False",
        ),
        ("matmul.allow_tf32 = False; matmul.fp32_precision = 'tf32'", "False False"),
        ("torch.backends.fp32_precision = 'tf32'", "False False"),
    ],
)
def test_fp32_ieee_reads_the_new_api_first_and_never_raises(setup, expected):
    if "fp32_precision" in setup and not hasattr(torch.backends, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no fp32_precision API")
    # a fresh process: the mixed-API state would leak into every later test here
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", TF32_SCRIPT.format(setup=setup)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == expected, proc.stdout
