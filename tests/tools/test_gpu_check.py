"""bench/gpu_check.py (`make gpu-check`): what can be checked without a GPU. The plan (--dry-run),
the clear exit without CUDA, the time budget, the streamed steps, and the bench orchestration on
a tiny CPU problem. Its GPU measurements themselves need a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
MINUTES_8 = 480


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = load_script()


def run_script(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


def test_dry_run_prints_the_plan_commands_and_budget(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "liger_kernel-0.6.0-py3-none-any.whl").write_bytes(b"")
    proc = run_script(
        "--dry-run", "--wheels", str(wheels), "--out", str(tmp_path / "o"), tmp_path=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    for step in ("setup", "tests", "check", "bench", "sweep"):
        assert f"  {step} " in out
    assert "pip install -q --no-index --no-deps" in out and "liger_kernel-0.6.0" in out
    assert "-m pytest" in out and "check --device cuda" in out
    for shape in ("--tokens 16384 --hidden 4096 --vocab 128256", "--tokens 8192 --hidden 4096"):
        assert out.count(shape) == 2  # 0% and 30% ignored
    assert "--providers naive,chunked,fused,liger,torch,cce,bound" in out
    assert "--sweep-worker" in out and "vocab_splits=32" in out
    assert f"budget {gpu_check.DEADLINE_S} s" in out


def test_budget_fits_eight_minutes():
    assert gpu_check.DEADLINE_S < MINUTES_8
    assert sum(s.cap_s for s in gpu_check.STEPS) <= MINUTES_8
    assert all(s.floor_s <= s.cap_s for s in gpu_check.STEPS)


def test_clock_gives_each_step_its_cap_but_keeps_the_later_steps_share():
    now = [0.0]
    clock = gpu_check.Clock(100, now=lambda: now[0])
    assert clock.allow(30) == 30
    assert clock.allow(30, reserve_s=80) == 20
    now[0] = 95.0
    assert clock.allow(30) == 5 and clock.allow(30, reserve_s=10) == 0
    steps = gpu_check.STEPS
    assert gpu_check.reserve_after("bench", steps) == next(
        s.floor_s for s in steps if s.name == "sweep"
    )
    assert gpu_check.reserve_after("sweep", steps) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_it_exits_with_a_clear_message(tmp_path):
    proc = run_script("--out", str(tmp_path / "o"), tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "gpu-check needs a CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_step_is_named(tmp_path):
    proc = run_script("--dry-run", "--steps", "tests,bogus", tmp_path=tmp_path)
    assert proc.returncode == 2 and "--steps ['bogus']: unknown step" in proc.stderr


def test_streamed_step_stops_at_its_budget(tmp_path):
    log = gpu_check.Log(tmp_path / "log")
    code, out = gpu_check.run_streamed(
        [sys.executable, "-c", "import time; print('first', flush=True); time.sleep(30)"],
        {}, timeout_s=3, log=log,
    )  # fmt: skip
    assert code is None and out == "first\n"
    code, out = gpu_check.run_streamed([sys.executable, "-c", "print('done')"], {}, 30, log)
    assert code == 0 and out == "done\n"
    assert "first" in (tmp_path / "log").read_text()


def test_bench_orchestration_on_a_tiny_cpu_problem(tmp_path):
    """The bench step as on a GPU, on a tiny CPU problem: records, x bound, a skipped provider
    once the budget is spent, the plot and the summary."""
    log = gpu_check.Log(tmp_path / "log")
    ctx = {"out": tmp_path, "gpu_line": "cpu"}
    result = gpu_check.step_bench(
        ctx, 600, log,
        bench_runs=((64, 32, 500, 0.3),), providers=("naive", "bound"), device="cpu",
    )  # fmt: skip
    (run,) = result["runs"]
    records = {r["provider"]: r for r in run["records"]}
    assert records["naive"]["status"] == "ok" and records["bound"]["status"] == "ok"
    assert records["naive"]["bound_ratio"] > 0 and records["bound"]["bound_ratio"] == 1.0
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    # no time left: every provider is skipped, and says why
    spent = gpu_check.step_bench(
        ctx, 0, log,
        bench_runs=((64, 32, 500, 0.3),), providers=("naive",), device="cpu",
    )  # fmt: skip
    assert spent["runs"][0]["records"][0]["reason"] == "gpu-check time budget spent"
    summary = gpu_check.summary_markdown(
        {"date": "today", "seconds": 1.0, "steps": {"bench": {**result, "seconds": 1.0}}}
    )
    assert "| x bound |" in summary and "3-GEMM bound" in summary
    json.dumps(result)  # what gpu_check.json holds
