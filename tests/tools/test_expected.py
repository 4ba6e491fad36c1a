"""The expected-time model (tools/bench/expected.py): its arithmetic by hand, and
`fused-dft bench --expected` printing a table without running any provider."""

from __future__ import annotations

import math

import pytest

from fused_dft.tools import cli
from fused_dft.tools.bench import expected as model

H100 = model.GPUS["h100"]
# the headline shape, with 30% of the labels ignored (masked prompts)
HEADLINE = model.Shape(16384, 4096, 128256, ignore_frac=0.3)


def test_a_phase_takes_the_slower_of_compute_and_memory():
    gemm = model.Phase("g", flops=1e15, bytes=1e9, kind="gemm")
    # 1e15 / (989.4e12 * 0.8) = 1.2634 s against 1e9 / (3.35e12 * 0.9) = 0.33 ms
    assert gemm.seconds(H100) == pytest.approx(1e15 / (989.4e12 * 0.8))
    copy = model.Phase("c", flops=0, bytes=3.015e12, kind="memory")
    assert copy.seconds(H100) == pytest.approx(1.0)  # 3.015e12 / (3.35e12 * 0.9)
    fused = model.Phase("f", flops=1e15, bytes=0, kind="fused")
    assert fused.seconds(H100) == pytest.approx(1e15 / (989.4e12 * 0.6))


def test_bound_is_six_tdv_over_the_gemm_rate_of_the_non_ignored_rows():
    t, d, v = HEADLINE.rows, 4096, 128256
    assert t == 11469  # round(16384 * 0.7)
    e = model.expected("bound", HEADLINE, H100)
    assert e.flops == 6 * t * d * v
    # each GEMM is compute bound here: 2 T D V / (0.8 * 989.4e12) each, three of them
    assert e.seconds == pytest.approx(6 * t * d * v / (0.8 * 989.4e12))
    assert 0.045 < e.seconds < 0.047


def test_naive_multiplies_every_row_and_moves_42_bytes_per_logit():
    n, d, v = 16384, 4096, 128256
    e = model.expected("naive", HEADLINE, H100)
    assert e.flops == 6 * n * d * v  # the ignored rows too
    operands = 3 * (n * d + v * d) * 2  # each GEMM reads its two operands once (bf16)
    assert e.bytes == 42 * n * v + operands


def test_chunked_counts_its_fp32_dw_passes_per_chunk():
    t, d, v = HEADLINE.rows, 4096, 128256
    one = model.chunked_phases(HEADLINE, chunk_rows=t)
    two = model.chunked_phases(HEADLINE, chunk_rows=math.ceil(t / 2))
    dw_bytes = {p.name: p.bytes for p in two}["dW += dz^T h (fp32 C)"]
    assert dw_bytes - {p.name: p.bytes for p in one}["dW += dz^T h (fp32 C)"] == 8 * v * d
    assert model.default_chunk_rows(v) == 8320  # backends/chunked.py's 1G-element cap
    assert sum(p.flops for p in one) == 6 * t * d * v


def test_fused_does_eight_tdv_and_counts_dh_passes_per_vocab_chunk():
    t, d, v = HEADLINE.rows, 4096, 128256
    phases = {p.name: p for p in model.fused_phases(HEADLINE)}
    assert sum(p.flops for p in phases.values()) == 8 * t * d * v
    cols = 2**30 // (t * 2) // 128 * 128  # the CUDA dz scratch's (1 GiB) columns: 46720
    chunks = math.ceil(v / cols)
    assert chunks == 3
    dh = phases["dh += dz W (fp32 C)"]
    assert dh.bytes == (t * v + v * d + t * d) * 2 + chunks * 8 * t * d
    # the CPU's fixed 256 MiB scratch: 11648 columns, 12 passes over the fp32 dh
    small = {p.name: p for p in model.fused_phases(HEADLINE, scratch_bytes=256 * 2**20)}
    assert small["dh += dz W (fp32 C)"].bytes == dh.bytes + (12 - 3) * 8 * t * d


def test_trimming_scales_the_trimmed_paths_and_not_naive():
    full = model.Shape(16384, 4096, 128256)
    for provider in ("chunked", "fused", "bound"):
        assert (
            model.expected(provider, HEADLINE, H100).seconds
            < 0.8 * model.expected(provider, full, H100).seconds
        )
    assert model.expected("naive", HEADLINE, H100) == model.expected("naive", full, H100)


def test_gpu_table_has_sources_and_unknown_gpu_is_named():
    assert set(model.GPUS) == {"h100", "h200", "a100", "l40s", "4090", "b200"}
    for gpu in model.GPUS.values():
        assert gpu.tflops > 100 and gpu.hbm_tbs > 0.5, gpu
        assert "datasheet" in gpu.source or "whitepaper" in gpu.source, gpu
    with pytest.raises(ValueError, match=r"--gpu \['v100'\]: unknown GPU; choose from h100"):
        model.parse_gpus("h100,v100")


def test_bench_expected_prints_the_table_and_runs_nothing(monkeypatch, capsys):
    from fused_dft.tools.bench import runner

    def forbidden(*args, **kwargs):
        raise AssertionError("--expected ran a provider")

    monkeypatch.setattr(runner, "run_bench", forbidden)
    assert cli.main(["bench", "--expected", "--gpu", "h100,a100"]) == 0
    out = capsys.readouterr().out
    assert "EXPECTED" in out and "N=16384 D=4096 V=128256" in out and "V=151936" in out
    for name in ("naive", "chunked", "fused", "bound", "H100 SXM", "A100 SXM 80GB"):
        assert name in out
    assert "L40S" not in out.split("peaks")[0]


# torch's names of the table's GPUs, and of parts with other peaks that must not borrow them
@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA GeForce RTX 4090", "4090"),
        ("NVIDIA B200", "b200"),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA A100-SXM4-40GB", None),
        ("NVIDIA A100 80GB PCIe", None),
        ("NVIDIA GeForce RTX 4090 D", None),
        ("Tesla T4", None),
    ],
)
def test_torch_device_names_map_to_the_gpu_table_or_to_none(name, key):
    gpu = model.gpu_for_device(name)
    assert (gpu.key if gpu else None) == key
