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
    names = [
        line.split()[0] for line in out.splitlines() if " at most " in line and "(floor" in line
    ]
    # in order of value: kernel correctness, the headline row, then the rest
    assert names == ["setup", "kernel_tests", "headline", "check", "tests", "bench", "sweep"]
    assert "pip install -q --no-index --no-deps" in out and "liger_kernel-0.6.0" in out
    assert "check --device cuda" in out
    for path, cap in gpu_check.KERNEL_TEST_FILES:  # each kernel file alone, verbose, timed
        assert f"-m pytest -v --tb=short -p no:cacheprovider {path}   (at most {cap} s)" in out
        assert f"--ignore={path}" in out  # and not again in the rest of the suite
    headline = "--tokens 16384 --hidden 4096 --vocab 128256 --ignore-frac 0.0"
    assert f"{headline} --providers chunked,fused,bound,liger " in out
    assert f"{headline} --providers naive,torch,cce " in out
    assert out.count("--tokens 16384 --hidden 4096 --vocab 128256") == 3
    assert out.count("--tokens 8192 --hidden 4096") == 2  # 0% and 30% ignored
    assert "--providers naive,chunked,fused,liger,torch,cce,bound" in out
    assert "measured / expected" in out
    assert "--sweep-worker" in out and "vocab_splits=32" in out
    assert f"budget {gpu_check.DEADLINE_S} s" in out


def test_budget_fits_eight_minutes():
    """One deadline bounds the run; the steps' floors fit in it, so every step keeps some time
    whatever the earlier ones take (caps may add to more: time an early step leaves goes on)."""
    assert gpu_check.DEADLINE_S < MINUTES_8
    assert sum(s.floor_s for s in gpu_check.STEPS) <= gpu_check.DEADLINE_S / 2
    assert all(s.floor_s <= s.cap_s <= gpu_check.DEADLINE_S for s in gpu_check.STEPS)
    kernel_tests = next(s for s in gpu_check.STEPS if s.name == "kernel_tests")
    assert all(cap <= kernel_tests.cap_s for _, cap in gpu_check.KERNEL_TEST_FILES)


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
    assert "expected_s" not in result["runs"][0]["records"][0]  # no GPU: measured only
    (run,) = result["runs"]
    records = {r["provider"]: r for r in run["records"]}
    assert records["naive"]["status"] == "ok" and records["bound"]["status"] == "ok"
    assert records["naive"]["bound_ratio"] > 0 and records["bound"]["bound_ratio"] == 1.0
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    # no time left: every provider is skipped, and says why
    spent = gpu_check.step_bench(
        {**ctx, "model_gpu": None}, 0, log,
        bench_runs=((64, 32, 500, 0.3),), providers=("naive",), device="cpu",
    )  # fmt: skip
    assert spent["runs"][0]["records"][0]["reason"] == "gpu-check time budget spent"
    bench = {run["shape"]: run for run in result["runs"]}
    summary = gpu_check.summary_markdown(
        {"date": "today", "seconds": 1.0, "steps": {"bench": {**result, "seconds": 1.0}},
         "bench": bench}
    )  # fmt: skip
    assert "| x bound |" in summary and "3-GEMM bound" in summary
    assert "no expected-time model for this GPU (measured only)" in summary
    json.dumps(result)  # what gpu_check.json holds


def test_a_failing_kernel_test_and_a_step_out_of_time_are_named_and_saved(tmp_path, monkeypatch):
    """No GPU: the subprocess runner is replaced by a script. tests/test_loss.py reports a
    failure, tests/test_loss_family.py is stopped at its limit, the headline bench row runs
    stand-in providers, and the check step takes the rest of the deadline. The failure is named
    as it happens, each file's result is on disk before the next starts, measured / expected is
    printed for the H100, and the summary says what did not run."""
    import fused_dft.tools.bench.plot as plot
    import fused_dft.tools.bench.runner as runner
    from fused_dft.tools.bench import expected

    now = [0.0]
    clock = gpu_check.Clock(gpu_check.DEADLINE_S, now=lambda: now[0])
    out = tmp_path / "o"
    out.mkdir()
    log = gpu_check.Log(out / "gpu_check.log")
    results = gpu_check.Results(out, gpu_check.STEPS)
    seen_on_disk = {}

    def fake_streamed(cmd, env, timeout_s, log, on_line=None):
        text = " ".join(cmd)
        code, lines = 0, []
        if "-m pytest" in text:
            path = cmd[-1] if not cmd[-1].startswith("-") else "tests"
            seen_on_disk[path] = json.loads((out / "gpu_check.json").read_text())
            lines = [f"{path}::test_ok PASSED  [ 50%]"]
            if path == "tests/test_loss.py":
                code = 1
                bad = f"{path}::test_bad[bf16]"
                lines += [f"{bad} FAILED  [100%]", f"FAILED {bad} - AssertionError: 0.3 > 0.01"]
            if path == "tests/test_loss_family.py":
                code = None  # stopped at its limit
        elif "check" in cmd:
            seen_on_disk["check"] = (out / "gpu_check.md").read_text()
            now[0] += 10_000  # runs past the deadline: nothing after it has time
            code = None
        for line in lines:
            log(line)
            if on_line:
                on_line(line + "\n")
        return code, "\n".join(lines)

    def fake_run_one(config, problem, key):
        record = {"provider": key, "label": key, "problem": problem.as_dict()}
        if key == "liger":
            return {**record, "status": "skipped", "reason": "liger_kernel is not installed"}
        seconds = {"chunked": 0.080, "fused": 0.120, "bound": 0.060}[key]
        return {**record, "status": "ok", "time_s": seconds, "peak_mem_bytes": 2**30,
                "errors": {"loss": 0.0}}  # fmt: skip

    def fake_setup(ctx, limit, log, results):
        ctx["model_gpu"] = gpu_check.model_gpu("NVIDIA H100 80GB HBM3", log)
        return {"status": "ok", "detail": "stand-in", "expected_model": ctx["model_gpu"].name}

    monkeypatch.setattr(gpu_check, "run_streamed", fake_streamed)
    monkeypatch.setattr(runner, "run_one", fake_run_one)
    monkeypatch.setattr(plot, "plot", lambda *a, **k: None)
    ctx = {"out": out, "env": {}, "xdist": False, "gpu_line": "stand-in"}
    functions = {**gpu_check.STEP_FUNCTIONS, "setup": fake_setup}
    bad = gpu_check.run_steps(ctx, gpu_check.STEPS, log, clock, results, functions)

    assert bad == ["kernel_tests", "check", "tests", "bench", "sweep"]
    logged = (out / "gpu_check.log").read_text()
    # named as it happens, once (the short summary line at the end is not counted again)
    assert logged.count("!! FAILED tests/test_loss.py::test_bad[bf16]") == 1
    files = results.step("kernel_tests")["files"]
    assert files["tests/test_loss.py"]["failed"] == ["tests/test_loss.py::test_bad[bf16]"]
    assert files["tests/test_loss_family.py"]["status"] == "timed out"
    assert (
        "last test finished: tests/test_loss_family.py::test_ok"
        in (files["tests/test_loss_family.py"]["detail"])
    )
    assert [f["status"] for f in files.values()].count("ok") == len(files) - 2
    # written as it went: test_loss.py's failure was on disk before test_selection.py started
    before = seen_on_disk["tests/test_selection.py"]["steps"]["kernel_tests"]["files"]
    assert before["tests/test_loss.py"]["failed"] == ["tests/test_loss.py::test_bad[bf16]"]
    # and the headline row before the check step began
    assert "### bench 16384x4096x128256, 0% ignored" in seen_on_disk["check"]
    assert "| check | running |" in seen_on_disk["check"]
    assert "tests" not in seen_on_disk  # the rest of the suite never started

    headline = results.data["bench"]["16384x4096x128256, 0% ignored"]["records"]
    records = {r["provider"]: r for r in headline}
    assert list(records) == list(gpu_check.HEADLINE_PROVIDERS)
    h100 = expected.GPUS["h100"]
    shape = expected.Shape(16384, 4096, 128256)
    fused_expected = expected.expected("fused", shape, h100).seconds
    assert records["fused"]["vs_expected"] == pytest.approx(0.120 / fused_expected)
    assert "expected_s" not in records["liger"]  # the model has no Liger

    summary = (out / "gpu_check.md").read_text()
    assert "| fused |" in summary and f"{0.120 / fused_expected:.2f}x" in summary
    assert "expected (H100 SXM)" in summary
    tail = summary.split("### did not run")[1]
    assert "kernel tests tests/test_loss_family.py: timed out" in tail
    assert "step check: timed out" in tail
    for step in ("tests", "bench", "sweep"):
        assert f"step {step}: skipped (time budget spent)" in tail
    assert "liger: liger_kernel is not installed" in tail
    assert json.loads((out / "gpu_check.json").read_text())["steps"]["sweep"]["status"] == "skipped"


# pytest -v progress lines, plain and with pytest-xdist; the end summary and other lines are not
LOSS, CONFIGS = "tests/test_loss.py", "tests/kernels/test_configs.py"


@pytest.mark.parametrize(
    "line, seen",
    [
        (f"{LOSS}::test_a[bf16-37] PASSED   [  3%]", (f"{LOSS}::test_a[bf16-37]", "PASSED")),
        (f"{LOSS}::test_b FAILED            [ 10%]", (f"{LOSS}::test_b", "FAILED")),
        (f"[gw3] [ 10%] ERROR {CONFIGS}::test_c", (f"{CONFIGS}::test_c", "ERROR")),
        (f"FAILED {LOSS}::test_b - AssertionError: 0.3", None),
        ("collected 179 items", None),
        ("E   assert 0.3 <= 0.01", None),
    ],
)
def test_pytest_progress_lines_give_the_test_and_its_outcome(line, seen):
    assert gpu_check.outcome_of(line) == seen
