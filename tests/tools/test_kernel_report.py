"""`fused-dft kernels`: every kernel compiled for sm_90 / sm_80 on this CPU-only machine.

At the configs used without autotuning (each D/V bucket's default): no register spills, shared
memory within the arch's per-block limit, and tl.dot on tensor cores (wgmma) for bf16/fp16 on sm_90.
Skipped where the triton wheel has no ptxas. Bad input is named before anything compiles.
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
# 3 kernels x 3 dtypes x 2 archs at the default configs: 26 compiles, ~25 s on 2 cores uncached
DTYPES = ("bf16", "fp16", "fp32")


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
        + ["--dtype", ",".join(DTYPES), "--arch", "sm_90,sm_80", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fused_bwd" in proc.stdout and "sm_80" in proc.stdout  # the table
    return json.loads(path.read_text())


def where(row: dict) -> str:
    return f"{row['kernel']} {row['dtype']} {row['arch']} {row['config']}"


def test_json_has_one_row_per_compile_with_exactly_the_keys(rows):
    expected = {
        (kernel, dtype, arch, config)
        for kernel, spec in specs.SPECS.items()
        for dtype in DTYPES
        for config in spec.defaults(dtype)
        for arch in ("sm_90", "sm_80")
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
    limits = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
    over = [
        f"{where(r)}: {r['shared_bytes']} B" for r in rows if r["shared_bytes"] > limits[r["arch"]]
    ]
    assert not over, over


def test_dots_run_on_tensor_cores_for_16_bit_inputs_on_sm_90(rows):
    for r in rows:
        if not specs.SPECS[r["kernel"]].has_dot:
            assert r["tensor_cores"] is None, where(r)
        elif r["dtype"] in ("bf16", "fp16") and r["arch"] == "sm_90":
            assert r["tensor_cores"] is True, where(r)
        elif r["dtype"] == "fp32":  # IEEE fp32 (torch's default) has no tensor-core path
            assert r["tensor_cores"] is False, where(r)


# -- the registry --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(specs.SPECS))
def test_every_spec_gives_every_kernel_argument(name):
    spec = specs.SPECS[name]
    for dtype in specs.DTYPES:
        assert spec.configs(dtype), (name, dtype)
        assert set(spec.defaults(dtype)) <= set(spec.configs(dtype))
        for config in spec.configs(dtype):
            specs.check_spec(spec, dtype, config)


def test_a_spec_behind_its_kernel_is_named():
    spec = specs.SPECS["fused_fwd"]
    types = {k: v for k, v in spec.arg_types.items() if k != "split_cols"}
    stale = dataclasses.replace(spec, arg_types={**types, "tiles_per_split": "i32"})
    config = spec.defaults("bf16")[0]
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
        (["--arch", "sm_100"], "--arch 'sm_100': cannot compile for it here; choose from sm_90"),
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
    assert report.parse_archs("90,sm80,sm_90a,SM_80") == ["sm_90", "sm_80"]
    assert report.parse_archs(None) == ["sm_90", "sm_80"]
