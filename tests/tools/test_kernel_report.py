"""`fused-dft kernels`: every kernel compiled for every GPU arch users have (sm_80, sm_86, sm_89,
sm_90, sm_100, sm_120) on this CPU-only machine.

At the configs each arch uses without autotuning (each D/V bucket's default): no register spills,
shared memory within the arch's per-block limit, and tl.dot on the arch's tensor cores for
bf16/fp16. Skipped where the triton wheel has no ptxas. Bad input is named before anything
compiles. Every candidate of every arch (not only the defaults) is the CLI sweep in
bench/README.md ("Every GPU users have").
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fused_dft.tools import cli
from fused_dft.tools import kernel_report as report
from fused_dft.tools import kernel_specs as specs

ROOT = Path(__file__).resolve().parents[2]
NO_TOOLS = report.missing_tools()
# 4 kernels x 3 dtypes x 6 archs at the default configs: 72 compiles, ~9 s on 2 cores with
# Triton's cache warm, a few minutes cold
DTYPES = ("bf16", "fp16", "fp32")
ARCHS = tuple(report.ARCHS)


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    """One run of the command, as a user runs it, its JSON read back."""
    if NO_TOOLS:
        pytest.skip(f"cannot compile for NVIDIA GPUs here: {NO_TOOLS}")
    path = tmp_path_factory.mktemp("kernels") / "kernels.json"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fused_dft", "kernels", "--config", "default"]
        + ["--dtype", ",".join(DTYPES), "--arch", ",".join(ARCHS), "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fused_bwd" in proc.stdout and "sm_120" in proc.stdout  # the table
    return json.loads(path.read_text())


def where(row: dict) -> str:
    return f"{row['kernel']} {row['dtype']} {row['arch']} {row['config']}"


def test_json_has_one_row_per_compile_with_exactly_the_keys(rows):
    expected = {
        (kernel, dtype, arch, config)
        for kernel, spec in specs.SPECS.items()
        for dtype in DTYPES
        for arch in ARCHS
        for config in spec.defaults(dtype, arch)
    }
    assert {(r["kernel"], r["dtype"], r["arch"], r["config"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for r in rows:
        assert tuple(r) == report.KEYS, r
        for key in ("shared_bytes", "registers", "spill_bytes", "atomics"):
            assert isinstance(r[key], int) and r[key] >= 0, (where(r), key, r[key])
        assert 16 <= r["registers"] <= 255, where(r)


def test_default_configs_do_not_spill(rows):
    spilling = [f"{where(r)}: {r['spill_bytes']} B" for r in rows if r["spill_bytes"]]
    assert not spilling, spilling


def test_default_configs_fit_shared_memory(rows):
    kb = 1024  # the per-block limits of the CUDA programming guide's compute-capability table
    limits = {"sm_80": 163 * kb, "sm_86": 99 * kb, "sm_89": 99 * kb, "sm_90": 227 * kb,
              "sm_100": 227 * kb, "sm_120": 99 * kb}  # fmt: skip
    assert set(limits) == set(ARCHS)
    over = [
        f"{where(r)}: {r['shared_bytes']} B" for r in rows if r["shared_bytes"] > limits[r["arch"]]
    ]
    assert not over, over


def test_dots_run_on_tensor_cores_for_16_bit_inputs_on_every_arch(rows):
    for r in rows:
        if not specs.SPECS[r["kernel"]].has_dot:
            assert r["tensor_cores"] is None, where(r)
        elif r["dtype"] in ("bf16", "fp16"):
            assert r["tensor_cores"] is True, where(r)
        elif r["dtype"] == "fp32":  # IEEE fp32 (torch's default) has no tensor-core path
            assert r["tensor_cores"] is False, where(r)


# -- the registry --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(specs.SPECS))
def test_every_spec_gives_every_kernel_argument(name):
    spec = specs.SPECS[name]
    for dtype in specs.DTYPES:
        for arch in ARCHS:
            assert spec.configs(dtype, arch), (name, dtype, arch)
            assert set(spec.defaults(dtype, arch)) <= set(spec.configs(dtype, arch))
            for config in spec.configs(dtype, arch):
                specs.check_spec(spec, dtype, config)


def test_a_spec_behind_its_kernel_is_named():
    spec = specs.SPECS["fused_fwd"]
    types = {k: v for k, v in spec.arg_types.items() if k != "split_cols"}
    stale = dataclasses.replace(spec, arg_types={**types, "tiles_per_split": "i32"})
    config = spec.defaults("bf16", "sm_90")[0]
    with pytest.raises(ValueError) as exc:
        specs.check_spec(stale, "bf16", config)
    message = str(exc.value)
    assert "'fused_fwd'" in message
    assert "['split_cols']" in message and "['tiles_per_split']" in message


# -- bad input: named, before any compile -------------------------------------------------------


@pytest.fixture
def no_compile(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a compile started before the argument error")

    monkeypatch.setattr(report, "compile_jobs", forbidden)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kernel", "fused_fwd,softmax"], "--kernel ['softmax']: unknown kernel; choose from "),
        (["--dtype", "fp8"], "--dtype ['fp8']: unknown dtype; choose from bf16, fp16, fp32"),
        (["--arch", "sm_75"], "--arch 'sm_75': cannot compile for it here; choose from sm_80"),
        (["--arch", "7.5"], "--arch '7.5'"),
        (
            ["--kernel", "fused_bwd", "--config", "block_n=48"],
            "FusedConfig.block_n=48: must be a power of two in [16, 256]",
        ),
        (
            ["--kernel", "fused_fwd", "--config", "block_m=64"],
            "unknown field 'block_m'; choose from ['block_n', 'block_v'",
        ),
        (["--kernel", "rows", "--config", "num_warps=3"], "num_warps=3: choose from (1, 2, 4"),
        (["--config", "block_n=64"], "kernel 'rows': rows config 'block_n=64': unknown field"),
        (["--jobs", "0"], "--jobs 0: must be a positive integer"),
    ],
)
def test_bad_input_is_named_before_compiling(args, message, no_compile, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["kernels", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_arch_spellings():
    assert report.parse_archs("90,sm80,sm_90a,SM_80,sm_100a,120") == [
        "sm_90", "sm_80", "sm_100", "sm_120"
    ]  # fmt: skip
    assert report.parse_archs(None) == ["sm_90", "sm_80"]
    assert set(report.ARCHS) == {"sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"}


# the configs a GPU launch picks follow its arch: Hopper's 128 x 128 candidates, smaller tiles on
# the archs where the forward's 128 x 128 spills (a stand-in for the device's capability)
def test_launches_pick_the_candidates_of_their_arch(monkeypatch):
    import torch

    from fused_dft.kernels import configs

    monkeypatch.delenv(configs.ENV_CONFIG, raising=False)
    monkeypatch.setattr(configs, "_ARCHS", {0: "sm_89"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda0 = torch.device("cuda", 0)
    small = configs.plan(torch.bfloat16, cuda0, 4096, 128256).candidates
    assert small == configs.SMALL_SETS["16bit"] and max(c.block_n * c.block_v for c in small) == (
        64 * 128
    )
    monkeypatch.setattr(configs, "_ARCHS", {0: "sm_90"})
    hopper = configs.plan(torch.bfloat16, cuda0, 4096, 128256).candidates
    assert hopper == configs.config_set(torch.bfloat16, 4096, 128256, "sm_90")
    assert hopper[0].block_n == hopper[0].block_v == 128


def test_ctas_per_sm_from_registers_and_shared_memory():
    hopper = report.ARCHS["sm_90"]
    # the shipped 128x128x64 forward: 255 registers x 8 warps fill the 65536 registers
    assert report.ctas_per_sm(255, 8, 96 * 1024, hopper) == 1
    # 174 registers round up to 5632 per warp: 45056 of 65536, still one block
    assert report.ctas_per_sm(174, 8, 96 * 1024, hopper) == 1
    # 128 registers x 8 warps: two by registers; 72 KB (+1 KB reserved) x 3 fit 228 KB
    assert report.ctas_per_sm(128, 8, 72 * 1024, hopper) == 2
    assert report.ctas_per_sm(64, 4, 72 * 1024, hopper) == 3  # shared memory limits it
    assert report.ctas_per_sm(64, 4, 72 * 1024, report.ARCHS["sm_89"]) == 1  # 100 KB per SM


# sm_90's two-halves candidates (v_halves=2: a 128 x 256 tile per program step as two 128 x 128
# halves), 16-bit and tf32, forward and dz kernel: compiled for sm_90 with no spills, wgmma, 1 CTA
# per SM, 85 FLOP/B in bf16 (43 in tf32), the tile labelled as two halves. 8 compiles, ~1 min cold
def test_sm90_two_halves_candidates_compile_without_spills():
    if NO_TOOLS:
        pytest.skip(f"cannot compile for NVIDIA GPUs here: {NO_TOOLS}")
    from fused_dft.kernels import configs

    jobs = []
    for dtype in ("bf16", "tf32"):
        wide = [c for c in configs.shipped_configs(specs.DTYPES[dtype][1]) if c.v_halves == 2]
        assert len(wide) == 2, wide
        for kernel in ("fused_fwd", "fused_bwd"):
            jobs += [
                {"kernel": kernel, "dtype": dtype, "arch": "sm_90", "config": specs._fused_label(c)}
                for c in wide
            ]
    rows = report.compile_jobs(jobs)
    for row in rows:
        assert not report.problems(row), (where(row), report.problems(row))
        assert row["tensor_cores"] and row["dot_instruction"] == "wgmma", where(row)
        assert row["tile"] in ("128x(2x128)x64", "128x(2x128)x32"), where(row)
        flop_per_byte = 85.33 if row["dtype"] == "bf16" else 42.67
        assert row["flop_per_byte"] == pytest.approx(flop_per_byte, abs=0.01), where(row)
        assert row["ctas_per_sm"] == 1 and row["shared_bytes"] <= 144 * 1024, where(row)


def test_tile_label_of_two_halves():
    assert report.tile_label(128, 128, 64) == "128x128x64"
    assert report.tile_label(128, 128, 64, 2) == "128x(2x128)x64"


def test_flop_per_byte_of_a_logits_tile():
    assert report.flop_per_byte(128, 128, 2) == 64  # the figure for 128 x 128 in bf16
    assert report.flop_per_byte(128, 256, 2) == report.flop_per_byte(256, 128, 2) == 2 * 32768 / 768
    assert report.flop_per_byte(64, 128, 2) == pytest.approx(42.67, abs=0.01)
    assert report.flop_per_byte(128, 128, 4) == 32  # fp32 operands: twice the bytes
