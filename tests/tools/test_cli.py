"""The command line: `fused-dft bench` in smoke mode writes results that parse and make sense,
`fused-dft check` reports PASS for working impls and FAIL for a broken one, bad options are
named in the error. The bench's own timings are not tested here (bench/ is for that)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_dft
from fused_dft.runtime import interpreter_enabled
from fused_dft.tools import cli
from fused_dft.tools.bench.launch import run_worker
from fused_dft.tools.bench.providers import PROVIDERS

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "fused_dft", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of the whole bench (every provider, each in its own process)."""
    out = tmp_path_factory.mktemp("bench")
    proc = run_cli("bench", "--smoke", "--device", "cpu", "--output", str(out))
    return proc, out


def test_bench_smoke_exits_zero_and_names_device_shapes_and_outputs(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "device cpu" in proc.stdout
    assert "N=64, D=32, V=500" in proc.stdout
    for name in ("bench.json", "bench.md", "bench.png"):
        assert str(out / name) in proc.stdout
    assert "bench" in proc.stderr  # the progress bar goes to stderr


def test_bench_json_has_every_provider_with_times_errors_or_reasons(smoke):
    _, out = smoke
    data = json.loads((out / "bench.json").read_text())
    records = {r["provider"]: r for r in data["results"]}
    # nothing silently dropped: every provider is there, run or skipped
    assert set(records) == set(PROVIDERS)
    assert data["meta"]["machine"]["torch"] == torch.__version__
    for key in ("naive", "auto", "chunked", "reference"):
        r = records[key]
        assert r["status"] == "ok", r
        assert 0 < r["time_s"] < 10 and math.isfinite(r["time_s"])
        assert len(r["times_s"]) == 1
        assert r["peak_mem_bytes"] >= 0
        assert r["check_tokens"] == 64  # smoke mode checks every token
        assert r["max_error"] < 1e-4 and r["error_ok"], r["errors"]
        assert r["mem_ratio"] is not None and r["time_ratio"] is not None
    assert records["naive"]["time_ratio"] == 1.0
    assert records["auto"]["runs_as"] == "chunked_torch"
    # rows multiplied: naive every row; fused_dft (exact selection on the CPU) and the bound the
    # non-ignored ones, counted here from the same inputs
    from fused_dft.tools.bench.problem import IGNORE_INDEX, Problem, make_inputs

    problem = Problem(**records["naive"]["problem"])
    tokens = int((make_inputs(problem, requires_grad=False)[2] != IGNORE_INDEX).sum())
    assert 0 < tokens < problem.tokens
    assert records["naive"]["rows_multiplied"] == problem.tokens
    for key in ("auto", "chunked", "bound"):
        assert records[key]["rows_multiplied"] == tokens, (key, records[key])
    # libraries that need CUDA are skipped with the reason on this CPU run
    for key in ("liger", "cce"):
        assert records[key]["status"] == "skipped"
        assert records[key]["reason"]
    fused = records["fused"]
    if interpreter_enabled():
        assert fused["status"] == "ok" and fused["error_ok"], fused
    else:
        assert fused["status"] == "skipped" and "interpreter" in fused["reason"]
    for r in records.values():
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert isinstance(r["reason"], str) and len(r["reason"]) > 10


def test_bench_markdown_table_has_a_row_per_provider(smoke):
    _, out = smoke
    text = (out / "bench.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| provider |")
    assert len(table) == 1 + len(PROVIDERS)
    assert any("naive" in line and "1.00x" in line for line in table)
    assert any("skipped:" in line for line in table)
    assert "fused-dft bench --smoke" in text  # the command that produced it


def test_bench_bound_row_and_x_bound_column(smoke):
    """The 3-GEMM bound runs on the CPU too: a time floor with no error, each time divided by it."""
    proc, out = smoke
    records = {r["provider"]: r for r in json.loads((out / "bench.json").read_text())["results"]}
    bound = records["bound"]
    assert bound["status"] == "ok" and bound["errors"] == {} and bound["max_error"] is None
    assert bound["error_ok"] and bound["bound_ratio"] == 1.0
    for r in records.values():
        if r["status"] == "ok":
            assert r["bound_ratio"] == pytest.approx(r["time_s"] / bound["time_s"])
    lines = (out / "bench.md").read_text().splitlines()
    assert "| time | vs naive | x bound | peak mem |" in next(x for x in lines if "| provider" in x)
    assert "x bound" in proc.stdout.split("provider", 1)[1].splitlines()[0]


def test_three_gemms_gradients_have_the_inputs_shapes():
    from fused_dft.tools.bench.providers import ThreeGemms

    hidden = torch.randn(5, 3, requires_grad=True)
    weight = torch.randn(7, 3, requires_grad=True)
    ThreeGemms.apply(hidden, weight).backward()
    logits = hidden.detach() @ weight.detach().T
    assert torch.allclose(hidden.grad, logits @ weight.detach())
    assert torch.allclose(weight.grad, logits.T @ hidden.detach())


def test_bench_png_is_an_image(smoke):
    import matplotlib.image

    _, out = smoke
    path = out / "bench.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 600


def test_bench_vocab_sweep_in_process(tmp_path, capsys):
    code = cli.main(
        [
            "bench",
            "--smoke",
            "--device",
            "cpu",
            "--vocab",
            "300,700",
            "--providers",
            "naive,auto",
            "--output",
            str(tmp_path),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["sweep"] == "vocab"
    seen = {(r["provider"], r["problem"]["vocab"]) for r in data["results"]}
    assert seen == {("naive", 300), ("naive", 700), ("auto", 300), ("auto", 700)}
    assert all(r["status"] == "ok" for r in data["results"])
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "| vocab | provider |" in (tmp_path / "bench.md").read_text()


def test_naive_peak_memory_holds_the_logits():
    # N*V = 512*16000 fp32 logits = 31 MiB, held (with their gradient) by the naive loss: a
    # working peak measurement cannot report less than one copy
    request = {
        "provider": "naive",
        "problem": {"tokens": 512, "hidden": 16, "vocab": 16000, "ignore_frac": 0.0},
        "repeats": 1,
        "warmup": 1,
        "check_tokens": 16,
    }
    r = run_worker(request, timeout_s=120)
    assert r["status"] == "ok", r
    assert r["peak_mem_bytes"] >= 512 * 16000 * 4, r


def test_worker_failure_is_reported_not_raised():
    request = {
        "provider": "no-such-provider",
        "problem": {"tokens": 4, "hidden": 4, "vocab": 4},
        "repeats": 1,
        "warmup": 0,
        "check_tokens": 0,
    }
    r = run_worker(request, timeout_s=120)
    assert r["status"] == "failed"
    assert "no-such-provider" in r["reason"]


@pytest.mark.parametrize(
    "args, option",
    [
        (["--preset", "llama9"], "--preset"),
        (["--dtype", "fp8"], "--dtype"),
        (["--device", "tpu"], "--device"),
        (["--tokens", "12,x"], "--tokens"),
        (["--tokens", "0"], "--tokens"),
        (["--tokens", "8,16", "--vocab", "100,200"], "--tokens and --vocab"),
        (["--ignore-frac", "1.5"], "--ignore-frac"),
        (["--providers", "naive,unsloth"], "--providers"),
        (["--nproc", "0"], "--nproc"),
        (["--loss-type", "eaft", "--param", "eaft_topk=x"], "--param"),
        (["--loss-type", "eaft", "--param", "eaft_topk=-2"], "--param"),
        (["--param", "eaft_topk=2"], "--param"),
        (["--loss-type", "logprobs", "--param", "eaft_topk=2"], "--param"),
    ],
)
def test_bench_bad_option_is_named(args, option, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {option}" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_cuda_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--device", "cuda"])
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available" in err


def test_presets_set_hidden_and_vocab(monkeypatch, tmp_path):
    seen = {}

    def fake_run_bench(config, progress=True):
        seen["problems"] = config.problems
        return []

    monkeypatch.setattr("fused_dft.tools.bench.runner.run_bench", fake_run_bench)
    monkeypatch.setattr("fused_dft.tools.bench.plot.plot", lambda *a, **k: None)
    cli.main(["bench", "--preset", "gemma2-2b", "--tokens", "2048", "--output", str(tmp_path)])
    (problem,) = seen["problems"]
    assert (problem.tokens, problem.hidden, problem.vocab) == (2048, 2304, 256000)


# -- fused-dft --version --------------------------------------------------------------------------


def test_version_prints_the_package_version():
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"fused-dft {fused_dft.__version__}"


def test_version_in_process(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fused-dft {fused_dft.__version__}"


# -- fused-dft check ---------------------------------------------------------------------------

TINY = ["--tokens", "37", "--hidden", "40", "--vocab", "129"]  # ragged: no block-size multiple


def test_check_passes_every_impl_on_cpu():
    proc = run_cli("check", "--device", "cpu", *TINY)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for impl in ("reference", "auto", "chunked"):
        for case in ("dft", "ce", "dft+bias+scale+softcap"):
            assert any(
                line.split()[:2] == ["PASS", impl] and f" {case} " in line for line in lines
            ), (impl, case, proc.stdout)
    fused = [line for line in lines if line.split()[1:2] == ["fused"]]
    assert len(fused) == 3
    expected = "PASS" if interpreter_enabled() else "SKIP"
    assert all(line.startswith(expected) for line in fused), fused
    assert " 0 failed" in lines[-1]


def test_check_reports_a_wrong_impl_as_fail(monkeypatch, capsys):
    real = fused_dft.fused_linear_dft_loss

    def off_by_one_percent(*args, impl="auto", **kwargs):
        loss = real(*args, impl=impl, **kwargs)
        return loss * 1.01 if impl == "chunked" else loss

    monkeypatch.setattr(fused_dft, "fused_linear_dft_loss", off_by_one_percent)
    code = cli.main(["check", "--device", "cpu", *TINY])
    out = capsys.readouterr().out
    assert code == 1
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert fails and all(line.split()[1] == "chunked" for line in fails), out
    assert any(line.startswith("PASS  reference") for line in out.splitlines())


# `fused-dft bench --e2e --smoke`: a tiny config-built Llama, stock and patched, each in its own
# process; the JSON has both with times, tokens/s and memory, and the patched loss is DFT-sized.
def test_bench_e2e_smoke(tmp_path):
    pytest.importorskip("transformers")
    proc = run_cli("bench", "--e2e", "--smoke", "--device", "cpu", "--output", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "e2e.json").read_text())
    records = {r["provider"]: r for r in data["results"]}
    assert set(records) == {"naive", "patched"}
    for r in records.values():
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["time_s"] > 0
        assert r["total_peak_bytes"] >= r["peak_mem_bytes"] >= 0
    assert records["patched"]["loss"] < records["naive"]["loss"] / 5  # DFT vs the stock CE
    assert (tmp_path / "e2e.png").stat().st_size > 0 and "tokens/s" in proc.stdout


# every member of the family runs through the bench; libraries without it are skipped with why
def test_bench_loss_type_family_member(tmp_path):
    from fused_dft.tools.cli import main

    code = main(["bench", "--smoke", "--loss-type", "psft", "--providers", "naive,auto,torch",
                 "--output", str(tmp_path)])  # fmt: skip
    assert code == 0
    records = json.loads((tmp_path / "bench.json").read_text())["results"]
    by = {r["provider"]: r for r in records}
    assert by["auto"]["status"] == "ok" and by["auto"]["error_ok"]
    assert by["naive"]["status"] == "ok"
    assert by["torch"]["status"] == "skipped" and "psft" in by["torch"]["reason"]


# asft (its reference: the starting model) and eaft's top-k (--param) through the bench, each
# against the float64 reference, the fused kernels included
@pytest.mark.parametrize(
    "args", [["--loss-type", "asft"], ["--loss-type", "eaft", "--param", "eaft_topk=20"]]
)
def test_bench_new_members_and_params(args, tmp_path):
    from fused_dft.tools.cli import main

    code = main(["bench", "--smoke", *args, "--providers", "naive,auto,fused",
                 "--output", str(tmp_path)])  # fmt: skip
    assert code == 0
    by = {r["provider"]: r for r in json.loads((tmp_path / "bench.json").read_text())["results"]}
    assert by["auto"]["status"] == "ok" and by["auto"]["error_ok"]
    assert by["naive"]["status"] == "ok"
    assert by["fused"]["status"] == "ok" and by["fused"]["error_ok"]


# the log-prob op through the bench: fused_linear_logprobs (auto, reference) and the naive
# log_softmax + gather + entropy on the same objective, each against the float64 naive op
def test_bench_logprobs_mode(tmp_path):
    from fused_dft.tools.cli import main

    providers = "naive,auto,reference,torch,vocab_parallel"
    code = main(["bench", "--smoke", "--loss-type", "logprobs", "--providers", providers,
                 "--output", str(tmp_path)])  # fmt: skip
    assert code == 0
    by = {r["provider"]: r for r in json.loads((tmp_path / "bench.json").read_text())["results"]}
    for key in ("naive", "auto", "reference"):
        assert by[key]["status"] == "ok" and by[key]["error_ok"], by[key]
        assert by[key]["max_error"] < 1e-4, by[key]["errors"]
        assert abs(by[key]["loss"] - by["naive"]["loss"]) <= 1e-5 * abs(by["naive"]["loss"])
    assert by["auto"]["runs_as"] == "chunked_torch"
    assert by["torch"]["status"] == "skipped" and "logprobs" in by["torch"]["reason"]
    assert by["vocab_parallel"]["status"] == "skipped"
