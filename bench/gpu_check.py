"""`make gpu-check`: the one command a session with a GPU runs to measure fused_dft there.

    python3 bench/gpu_check.py [--dry-run] [--out DIR] [--steps kernel_tests,headline,...]

Needs torch, triton, pytest, matplotlib and tqdm (the GPU machines have them) and installs nothing
from the network: the checkout goes on PYTHONPATH; wheels in .whl/ (Liger-Kernel, Cut
Cross-Entropy: bench/README.md says how to bring them) are installed with --no-index into a temp
folder. The steps run in order of value, each with a time budget inside one global deadline
(8 minutes on one H100), so a run cut short still answers the first questions:
    setup         versions, GPU, the wheels
    kernel_tests  the kernel test files on CUDA (KERNEL_TEST_FILES), one pytest process each, -v,
                  each stopped at its own time limit; failures are named as they happen
    headline      fused-dft bench at bf16 16384x4096x128256: chunked, fused, the 3-GEMM bound,
                  Liger (skipped with its reason when its wheel is not there)
    check         fused-dft check --device cuda
    tests         the rest of the test suite on CUDA, -v (pytest-xdist when installed)
    bench         the rest: naive, torch and Cut Cross-Entropy at the headline shape, then 30% of
                  labels ignored and 8192x4096x151936 with every provider
    sweep         the fused configs at the headline shape, through the config override
A step or test file that runs out of time is stopped and the next one starts. Every bench row
is printed as measured / expected (tools/bench/expected.py, for the GPU found) when the model
knows that GPU. Results go to $OUT when set, else ./gpu_check_results, rewritten after every test
file, bench provider and step (a run cut off by the lease still leaves them): gpu_check.md (the
summary; it ends with what did not run), gpu_check.json, gpu_check.log (everything printed) and
bench.png (the headline shape).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEADLINE_S = 470  # of the 8 minutes: the rest writes the summary
SWEEP_PREFIX = "GPU_CHECK_SWEEP "


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    cap_s: float  # the most it may take (the deadline stops it earlier when time runs short)
    floor_s: float  # kept back for it while earlier steps run
    what: str


# in order of value: what a run cut short by the lease has answered first
STEPS = (
    Step("setup", 20, 5, "versions, GPU, wheels from .whl/ (pip --no-index --no-deps --target)"),
    Step("kernel_tests", 200, 60, "the kernel test files on CUDA, one pytest -v each, timed"),
    Step("headline", 180, 60, "bench bf16 16384x4096x128256: chunked, fused, bound, Liger"),
    Step("check", 40, 15, "fused-dft check --device cuda (FUSED_DFT_AUTOTUNE=0: correctness)"),
    Step("tests", 120, 15, "the rest of the test suite on CUDA, -v (-n 8 with pytest-xdist)"),
    Step("bench", 230, 15, "the rest of the bench: 2 shapes x {0%, 30%} ignored, 7 providers"),
    Step("sweep", 40, 10, "fused configs at the headline shape via the config override"),
)

# (path, seconds it may take): the files that run the Triton kernels, most telling first. On a
# GPU each compiles its kernel specializations on first use; a file that hangs or compiles too
# long is stopped at its limit and the next one starts.
KERNEL_TEST_FILES = (
    ("tests/kernels", 40),
    ("tests/test_loss.py", 150),
    ("tests/test_loss_family.py", 100),
    ("tests/test_selection.py", 40),
    ("tests/test_precomputed_scale.py", 40),
    ("tests/backends", 30),
)

# (tokens, hidden, vocab, ignored fraction), in the order they run: the headline shape first
BENCH_RUNS = ((16384, 4096, 128256, 0.0), (16384, 4096, 128256, 0.3))
BENCH_RUNS += ((8192, 4096, 151936, 0.0), (8192, 4096, 151936, 0.3))
BENCH_PROVIDERS = ("naive", "chunked", "fused", "liger", "torch", "cce", "bound")
HEADLINE_PROVIDERS = ("chunked", "fused", "bound", "liger")
# seconds one provider may take: its worker starts, primes, times 1 + 3 runs and checks its error;
# fused also compiles and autotunes its kernels on its first run
PROVIDER_CAP_S = {"fused": 100, "liger": 45, "cce": 45}
PROVIDER_CAP_DEFAULT_S = 35


def bench_plan(step: str) -> list[tuple[tuple, tuple[str, ...]]]:
    """(run, providers) in order: the headline step's one row, or everything after it."""
    if step == "headline":
        return [(BENCH_RUNS[0], HEADLINE_PROVIDERS)]
    rest = tuple(p for p in BENCH_PROVIDERS if p not in HEADLINE_PROVIDERS)
    return [(BENCH_RUNS[0], rest)] + [(run, BENCH_PROVIDERS) for run in BENCH_RUNS[1:]]


def sweep_configs() -> list[str]:
    """The shipped bf16 candidates for sm_90 (vocab splits from the SM count), and the headline
    shape's default with fixed 8 and 32 vocab splits and with groups of 4 and 16 token blocks."""
    import torch

    from fused_dft.kernels import configs

    n, d, v, _ = BENCH_RUNS[0]
    default = configs.config_set(torch.bfloat16, d, v)[0]
    shipped = [c.spec for c in configs.shipped_configs("16bit")]
    variants = [dict(vocab_splits=8), dict(vocab_splits=32), dict(group_n=4), dict(group_n=16)]
    return shipped + [dataclasses.replace(default, **change).spec for change in variants]


# -- time ----------------------------------------------------------------------------------------


class Clock:
    """One deadline for the whole run; each step gets at most its cap, and never the time kept
    back for the steps after it."""

    def __init__(self, deadline_s: float = DEADLINE_S, now=time.monotonic) -> None:
        self.now = now
        self.start = now()
        self.deadline = self.start + deadline_s

    def elapsed(self) -> float:
        return self.now() - self.start

    def allow(self, cap_s: float, reserve_s: float = 0.0) -> float:
        return max(0.0, min(cap_s, self.deadline - self.now() - reserve_s))


def reserve_after(name: str, steps: tuple[Step, ...]) -> float:
    names = [s.name for s in steps]
    return sum(s.floor_s for s in steps[names.index(name) + 1 :])


# -- output --------------------------------------------------------------------------------------


class Log:
    """Prints and appends to gpu_check.log."""

    def __init__(self, path: Path | None) -> None:
        self.file = open(path, "a", buffering=1) if path else None

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        if self.file:
            self.file.write(text + "\n")


def run_streamed(
    cmd: list[str], env: dict, timeout_s: float, log: Log, on_line=None
) -> tuple[int | None, str]:
    """Run cmd, echoing its output as it comes (and passing each line to on_line); stop its
    whole process group at timeout_s. Returns (exit code or None when stopped, the output)."""
    log(f"$ {shlex.join(cmd)}   (at most {timeout_s:.0f} s)")
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    out, end = [], time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log(f"(stopped after {timeout_s:.0f} s: its time budget)")
            return None, "".join(out)
        if line is None:
            return proc.wait(), "".join(out)
        out.append(line)
        log(line.rstrip("\n"))
        if on_line is not None:
            on_line(line)


class Results:
    """Everything measured so far; save() rewrites gpu_check.json and gpu_check.md, so whatever
    stops this run (the lease, a crash) leaves the results up to the last test file, bench
    provider or step."""

    def __init__(self, out: Path | None, steps: tuple[Step, ...]) -> None:
        self.out = out
        self.data = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "seconds": 0.0,
            "steps": {s.name: {"status": "not run", "seconds": 0.0} for s in steps},
            "bench": {},  # shape -> {"shape", "records", "expected"}
        }

    def step(self, name: str) -> dict:
        return self.data["steps"][name]

    def save(self, seconds: float | None = None) -> None:
        if seconds is not None:
            self.data["seconds"] = seconds
        if self.out is None:
            return
        for name, text in (
            ("gpu_check.json", json.dumps(self.data, indent=1, default=str) + "\n"),
            ("gpu_check.md", summary_markdown(self.data)),
        ):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.out / name)


# -- the steps -----------------------------------------------------------------------------------


def child_env(site: str | None) -> dict:
    """This checkout (and the installed wheels) on PYTHONPATH; kernels compiled, not interpreted."""
    env = dict(os.environ)
    paths = [str(ROOT)] + ([site] if site else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.pop("TRITON_INTERPRET", None)
    env.pop("FUSED_DFT_TEST_DEVICE", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wheel_command(wheels: list[str], site: str) -> list[str]:
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    return pip + ["--no-cache-dir", "--upgrade", "--target", site, *wheels]


PYTEST = ["-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider"]


def kernel_test_command(path: str) -> list[str]:
    return [sys.executable, *PYTEST, path]


def tests_command(xdist: bool) -> list[str]:
    """The suite without the kernel test files (the kernel_tests step ran them)."""
    cmd = [sys.executable, *PYTEST, "tests"]
    cmd += [f"--ignore={path}" for path, _ in KERNEL_TEST_FILES]
    return cmd + (["-n", "8", "--dist", "loadfile"] if xdist else [])


def check_command() -> list[str]:
    return [sys.executable, "-m", "fused_dft", "check", "--device", "cuda"]


def bench_command(n: int, d: int, v: int, ignore: float, providers=BENCH_PROVIDERS) -> list[str]:
    """What a bench row runs, as one command (the script runs it provider by provider, so
    that each gets its own time limit)."""
    cmd = [sys.executable, "-m", "fused_dft", "bench", "--device", "cuda", "--dtype", "bfloat16"]
    cmd += ["--tokens", str(n), "--hidden", str(d), "--vocab", str(v), "--ignore-frac", str(ignore)]
    return cmd + ["--providers", ",".join(providers), "--repeats", "3", "--warmup", "1"]


def sweep_command(request: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--sweep-worker", json.dumps(request)]


_OUTCOMES = ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")


def outcome_of(line: str) -> tuple[str, str] | None:
    """(node id, outcome) of one `pytest -v` progress line, with or without pytest-xdist:
    'tests/a.py::t[x] FAILED  [ 5%]' or '[gw1] [ 5%] FAILED tests/a.py::t[x]'. None for others
    (the short summary at the end, 'FAILED tests/a.py::t - msg', gives a failure seen already)."""
    words = line.split()
    node = next((w for w in words if "::" in w), None)
    outcome = next((w for w in words if w in _OUTCOMES), None)
    if node is None or outcome is None or " - " in line:
        return None
    return node, outcome


def run_pytest(cmd: list[str], env: dict, timeout_s: float, log: Log) -> dict:
    """One pytest process: its outcome counts, its failures named on their own line as they
    happen ('!! FAILED <node>'), the last test seen when it was stopped."""
    counts: dict[str, int] = {}
    failed: list[str] = []
    last: list[str] = []

    def on_line(line: str) -> None:
        seen = outcome_of(line)
        if seen is None:
            return
        node, outcome = seen
        counts[outcome] = counts.get(outcome, 0) + 1
        last[:] = [node]
        if outcome in ("FAILED", "ERROR") and node not in failed:
            failed.append(node)
            log(f"!! {outcome} {node}")

    code, out = run_streamed(cmd, env, timeout_s, log, on_line)
    if code is None:
        status = "timed out"
    elif code == 0 or (code == 5 and not failed):  # 5: nothing collected
        status = "ok"
    else:
        status = f"failed (exit {code})"
    tail = [x for x in out.strip().splitlines() if x.strip()][-1:] or [""]
    result = {"status": status, "counts": counts, "failed": failed, "detail": tail[0][:200]}
    if code is None:
        result["detail"] = f"stopped after {timeout_s:.0f} s; last test finished: "
        result["detail"] += last[0] if last else "none"
    return result


def step_kernel_tests(ctx: dict, limit_s: float, log: Log, results: Results) -> dict:
    """Each kernel test file in its own pytest process, at most its own limit; the results are
    saved after each file."""
    clock = Clock(limit_s)
    files = {path: {"status": "not run"} for path, _ in KERNEL_TEST_FILES}
    step = results.step("kernel_tests")
    step["files"] = files
    for path, cap in KERNEL_TEST_FILES:
        limit = clock.allow(cap)
        if limit < 5:
            files[path] = {"status": "skipped", "detail": "kernel_tests time budget spent"}
            log(f"-- {path}: skipped, time budget spent")
            continue
        log(f"\n-- {path} (at most {limit:.0f} s)")
        started = time.monotonic()
        files[path] = run_pytest(kernel_test_command(path), ctx["env"], limit, log)
        files[path]["seconds"] = time.monotonic() - started
        results.save()
    bad = [p for p, r in files.items() if r["status"] != "ok"]
    failed = sum(len(r.get("failed", ())) for r in files.values())
    passed = sum(r.get("counts", {}).get("PASSED", 0) for r in files.values())
    status = "ok" if not bad else ("failed" if failed else "incomplete")
    detail = f"{passed} passed, {failed} failed; files not ok: {', '.join(bad) or 'none'}"
    return {"status": status, "detail": detail, "files": files}


def step_tests(ctx: dict, limit_s: float, log: Log, results: Results) -> dict:
    return run_pytest(tests_command(ctx["xdist"]), ctx["env"], limit_s, log)


def step_setup(ctx: dict, timeout_s: float, log: Log, results: Results) -> dict:
    import torch

    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    props = torch.cuda.get_device_properties(0)
    gpu = {
        "name": props.name,
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
    }
    log(f"GPU: {gpu['name']}, {gpu['sms']} SMs, {gpu['memory_gib']} GiB; {versions}")
    ctx["gpu_line"] = f"{gpu['name']}; torch {versions['torch']}"
    ctx["model_gpu"] = model_gpu(gpu["name"], log)
    status, detail = "ok", "no .whl folder: Liger / CCE run only if already importable"
    if ctx["wheels"]:
        install = wheel_command(ctx["wheels"], ctx["site"])
        code, _ = run_streamed(install, os.environ, timeout_s, log)
        status = "ok" if code == 0 else "failed"
        detail = f"{len(ctx['wheels'])} wheels into {ctx['site']}: exit {code}"
    probe = "import importlib.util as u; print([m for m in ('liger_kernel', 'cut_cross_entropy') "
    probe += "if u.find_spec(m)])"
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=ctx["env"]
    ).stdout.strip()
    log(f"importable libraries to compare with: {found}")
    model = ctx["model_gpu"].name if ctx["model_gpu"] else None
    return {"status": status, "detail": detail, "versions": versions, "gpu": gpu, "libs": found,
            "expected_model": model}  # fmt: skip


def step_command(cmd: list[str], env: dict, timeout_s: float, log: Log) -> dict:
    code, out = run_streamed(cmd, env, timeout_s, log)
    tail = [x for x in out.strip().splitlines() if x.strip()][-1:] or [""]
    status = "timed out" if code is None else ("ok" if code == 0 else f"failed (exit {code})")
    return {"status": status, "detail": tail[0][:200]}


def step_check(ctx: dict, limit_s: float, log: Log, results: Results) -> dict:
    env = dict(ctx["env"], FUSED_DFT_AUTOTUNE="0")
    return step_command(check_command(), env, limit_s, log)


# -- measured / expected ------------------------------------------------------------------------


def model_gpu(name: str, log: Log | None = None):
    """The expected-time model's GPU (tools/bench/expected.py) for torch's device name, or None
    (said in the log): then the bench rows are measured only."""
    from fused_dft.tools.bench import expected

    gpu = expected.gpu_for_device(name)
    if log is not None:
        if gpu is None:
            known = ", ".join(g.name for g in expected.GPUS.values())
            log(f"expected times: no model for {name!r} (tools/bench/expected.py knows {known}); "
                "the bench prints measured times only")  # fmt: skip
        else:
            log(f"expected times: {name!r} -> the model's {gpu.name} "
                f"({gpu.tflops:g} TFLOP/s, {gpu.hbm_tbs:g} TB/s)")  # fmt: skip
    return gpu


def add_expected(records: list[dict], run: tuple, gpu) -> None:
    """expected_s and measured / expected on each record the model covers (naive, chunked,
    fused, bound), when the GPU is known."""
    if gpu is None:
        return
    from fused_dft.tools.bench import expected

    n, d, v, ignore = run
    shape = expected.Shape(n, d, v, ignore_frac=ignore)
    for r in records:
        if r["provider"] not in expected.PROVIDERS:
            continue
        r["expected_s"] = expected.expected(r["provider"], shape, gpu).seconds
        if r["status"] == "ok" and r.get("time_s"):
            r["vs_expected"] = r["time_s"] / r["expected_s"]


def expected_table(records: list[dict], gpu_name: str | None, markdown: bool = False) -> str:
    """provider | measured | expected | measured / expected; measured only for an unknown GPU."""
    from fused_dft.tools.bench import report

    if gpu_name is None:
        return "measured / expected: no expected-time model for this GPU (measured only)"
    rows = [["provider", "measured", f"expected ({gpu_name})", "measured / expected"]]
    for r in records:
        if "expected_s" not in r:
            continue
        measured = report.fmt_time(r.get("time_s")) if r["status"] == "ok" else r["status"]
        ratio = f"{r['vs_expected']:.2f}x" if "vs_expected" in r else "-"
        rows.append([r["provider"], measured, report.fmt_time(r["expected_s"]), ratio])
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# -- bench ---------------------------------------------------------------------------------------


def shape_name(run: tuple) -> str:
    n, d, v, ignore = run
    return f"{n}x{d}x{v}, {ignore:.0%} ignored"


def step_bench(
    ctx: dict,
    limit_s: float,
    log: Log,
    results: Results | None = None,
    bench_runs=BENCH_RUNS,
    providers=BENCH_PROVIDERS,
    device: str = "cuda",
    plan: list | None = None,
) -> dict:
    """Each (run, providers) of `plan` (default: every run of bench_runs with `providers`),
    provider by provider, each in its own process at most its cap. Rows of a shape seen by an
    earlier step join that shape's table; results are saved after each provider."""
    from fused_dft.tools.bench import plot, report
    from fused_dft.tools.bench.problem import Problem
    from fused_dft.tools.bench.runner import BenchConfig, add_ratios, run_one

    plan = plan if plan is not None else [(run, tuple(providers)) for run in bench_runs]
    results = results if results is not None else Results(None, ())
    tables = results.data["bench"]
    clock = Clock(limit_s)  # this step's own deadline
    done, total = 0, sum(len(p) for _, p in plan)
    for i, (run, keys) in enumerate(plan):
        n, d, v, ignore = run
        problem = Problem(n, d, v, dtype="bfloat16", device=device, ignore_frac=ignore)
        config = BenchConfig(problems=[problem], providers=list(keys), repeats=3)
        shape = shape_name(run)
        table = tables.setdefault(shape, {"shape": shape, "records": []})
        log(f"\n[bench {i + 1}/{len(plan)}] {shape}; as one command: "
            f"{shlex.join(bench_command(n, d, v, ignore, keys)[1:])}")  # fmt: skip
        for key in keys:
            later = 15 * (len(plan) - i - 1)  # keep ~15 s for each later bench row
            limit = clock.allow(PROVIDER_CAP_S.get(key, PROVIDER_CAP_DEFAULT_S), later)
            if limit < 5:
                r = {"provider": key, "label": key, "problem": problem.as_dict()}
                record = {**r, "status": "skipped", "reason": "gpu-check time budget spent"}
                log(f"  {key:<8} skipped: time budget spent")
            else:
                started = time.monotonic()
                record = run_one(dataclasses.replace(config, timeout_s=limit), problem, key)
                took = time.monotonic() - started
                what = report.fmt_time(record.get("time_s")) if record["status"] == "ok" else ""
                log(f"  {key:<8} {record['status']} {what} {record.get('reason', '')} "
                    f"({took:.0f} s)")  # fmt: skip
                done += record["status"] == "ok"
            table["records"] = [x for x in table["records"] if x["provider"] != key] + [record]
            add_ratios(table["records"], problem)
            add_expected(table["records"], run, ctx.get("model_gpu"))
            results.save()
        log(report.terminal_table(table["records"]))
        model = ctx.get("model_gpu")
        log(expected_table(table["records"], model.name if model else None))
        table["expected_model"] = model.name if model else None
        if run == BENCH_RUNS[0] or i == 0:
            title = f"fused-dft gpu-check: {shape}, bf16"
            plot.plot(table["records"], ctx["out"] / "bench.png", title, ctx["gpu_line"], None)
    return {"status": "ok", "detail": f"{done} of {total} provider runs measured",
            "runs": [tables[shape_name(run)] for run, _ in plan]}  # fmt: skip


def step_headline(ctx: dict, limit_s: float, log: Log, results: Results) -> dict:
    return step_bench(ctx, limit_s, log, results, plan=bench_plan("headline"))


def step_bench_rest(ctx: dict, limit_s: float, log: Log, results: Results) -> dict:
    return step_bench(ctx, limit_s, log, results, plan=bench_plan("bench"))


def step_sweep(ctx: dict, timeout_s: float, log: Log, results: Results) -> dict:
    n, d, v, _ = BENCH_RUNS[0]
    request = {"shape": [n, d, v], "configs": sweep_configs(), "repeats": 2}
    code, out = run_streamed(sweep_command(request), ctx["env"], timeout_s, log)
    found = [x[len(SWEEP_PREFIX) :] for x in out.splitlines() if x.startswith(SWEEP_PREFIX)]
    rows = [json.loads(x) for x in found]
    status = "ok" if code == 0 else ("timed out" if code is None else f"failed (exit {code})")
    detail = f"{len(rows)} of {len(request['configs'])} configs"
    return {"status": status, "detail": detail, "rows": rows}


def sweep_worker(request: dict) -> int:
    """In a fresh process: time forward + backward of impl="fused" at each config."""
    import statistics

    import torch

    from fused_dft import fused_linear_dft_loss
    from fused_dft.kernels.configs import use_fused_config
    from fused_dft.tools.bench.problem import Problem, make_inputs

    n, d, v = request["shape"]
    hidden, weight, labels = make_inputs(Problem(n, d, v, dtype="bfloat16", device="cuda"))

    def step() -> float:
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        start = time.perf_counter()
        fused_linear_dft_loss(hidden, weight, labels, impl="fused").backward()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    for spec in request["configs"]:
        row = {"config": spec}
        try:
            with use_fused_config(spec):
                row["first_s"] = step()  # compiles
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                row["time_s"] = statistics.median(step() for _ in range(request["repeats"]))
                row["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base
        except Exception as exc:  # one config failing (e.g. out of resources) is a result too
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(SWEEP_PREFIX + json.dumps(row), flush=True)
    return 0


STEP_FUNCTIONS = {
    "setup": step_setup,
    "kernel_tests": step_kernel_tests,
    "headline": step_headline,
    "check": step_check,
    "tests": step_tests,
    "bench": step_bench_rest,
    "sweep": step_sweep,
}


# -- plan, summary ------------------------------------------------------------------------------


def plan_lines(ctx: dict, steps: tuple[Step, ...]) -> list[str]:
    n, d, v, _ = BENCH_RUNS[0]
    commands = {
        "setup": [shlex.join(wheel_command(ctx["wheels"], ctx["site"]))] if ctx["wheels"] else [],
        "kernel_tests": [
            f"{shlex.join(kernel_test_command(path))}   (at most {cap} s)"
            for path, cap in KERNEL_TEST_FILES
        ],  # fmt: skip
        "headline": [shlex.join(bench_command(*run, keys)) for run, keys in bench_plan("headline")],
        "check": ["FUSED_DFT_AUTOTUNE=0 " + shlex.join(check_command())],
        "tests": [shlex.join(tests_command(ctx["xdist"]))],
        "bench": [shlex.join(bench_command(*run, keys)) for run, keys in bench_plan("bench")],
        "sweep": [shlex.join(sweep_command({"shape": [n, d, v], "configs": sweep_configs()}))],
    }
    lines = [
        f"gpu-check plan: {len(steps)} steps in order of value, budget {DEADLINE_S} s "
        f"(each step stops at its cap, and earlier ones leave later ones their floor)",
        f"output folder: {ctx['out']} (gpu_check.md, gpu_check.json, gpu_check.log, bench.png; "
        "rewritten as results come)",
        f"PYTHONPATH: {ctx['env']['PYTHONPATH']}",
        f"wheels: {', '.join(Path(w).name for w in ctx['wheels']) or 'none (no .whl folder)'}",
    ]
    for s in steps:
        lines.append(f"  {s.name:<12} at most {s.cap_s:>4.0f} s (floor {s.floor_s:.0f})  {s.what}")
        lines += [f"           $ {c}" for c in commands[s.name]]
    lines.append(
        "  bench: per provider at most "
        + ", ".join(f"{k} {v} s" for k, v in PROVIDER_CAP_S.items())
        + f", others {PROVIDER_CAP_DEFAULT_S} s; measured / expected per provider "
        "(tools/bench/expected.py, for the GPU found)"
    )
    return lines


def not_run(results: dict) -> list[str]:
    """What did not run or did not finish: steps, kernel test files, bench providers."""
    out = []
    for name, r in results["steps"].items():
        if r["status"] in ("not run", "skipped", "running", "timed out"):
            out.append(f"step {name}: {r['status']}" + (f" ({r['detail']})" if r.get("detail")
                                                        else ""))  # fmt: skip
        for path, f in r.get("files", {}).items():
            if f["status"] in ("not run", "skipped", "timed out"):
                out.append(f"kernel tests {path}: {f['status']}"
                           + (f" ({f['detail']})" if f.get("detail") else ""))  # fmt: skip
    for table in results["bench"].values():
        for rec in table["records"]:
            if rec["status"] == "skipped":
                out.append(f"bench {table['shape']} {rec['provider']}: {rec.get('reason', '')}")
    return out


def summary_markdown(results: dict) -> str:
    from fused_dft.tools.bench import report

    lines = ["# fused-dft gpu-check", ""]
    setup = results["steps"].get("setup", {})
    if setup.get("gpu"):
        lines.append(f"- GPU: {setup['gpu']}; {setup['versions']}; libraries: {setup['libs']}")
        model = setup.get("expected_model")
        said = f"the model's {model}" if model else "no model for this GPU: measured only"
        lines.append(f"- expected times: {said}")
    lines += [f"- date: {results['date']}; total {results['seconds']:.0f} s", ""]
    lines += ["| step | status | seconds | detail |", "|---|---|---|---|"]
    for name, r in results["steps"].items():
        detail = str(r.get("detail", "")).replace("|", "/")
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.0f} | {detail} |")
    files = results["steps"].get("kernel_tests", {}).get("files", {})
    if files:
        lines += ["", "### kernel tests", "", "| file | status | passed | failed | seconds |"]
        lines.append("|---|---|---|---|---|")
        for path, f in files.items():
            failed = ", ".join(f.get("failed", ())) or ""
            passed = f.get("counts", {}).get("PASSED", "")
            lines.append(f"| {path} | {f['status']} | {passed} | {failed} | "
                         f"{f.get('seconds', 0):.0f} |")  # fmt: skip
    failed_rest = results["steps"].get("tests", {}).get("failed", [])
    if failed_rest:
        lines += ["", "### the rest of the tests: failures", ""]
        lines += [f"- {node}" for node in failed_rest]
    for table in results["bench"].values():
        records = table["records"]
        head = report.header(records)
        lines += ["", f"### bench {table['shape']}, bf16", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + "|".join("---" for _ in head) + "|")
        lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |"
                  for r in report.rows(records)]  # fmt: skip
        lines += ["", expected_table(records, table.get("expected_model"), markdown=True)]
    sweep = results["steps"].get("sweep", {}).get("rows", [])
    if sweep:
        lines += ["", "### fused config sweep (headline shape, 0% ignored)", ""]
        lines += ["| config | first run | time | peak mem |", "|---|---|---|---|"]
        for r in sweep:
            if "error" in r:
                lines.append(f"| {r['config']} | {r['error']} | | |")
            else:
                lines.append(
                    f"| {r['config']} | {report.fmt_time(r['first_s'])} | "
                    f"{report.fmt_time(r['time_s'])} | {report.fmt_bytes(r['peak_mem_bytes'])} |"
                )
    missing = not_run(results)
    lines += ["", "### did not run", ""]
    lines += [f"- {x}" for x in missing] if missing else ["- nothing: every step ran to its end"]
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------------


def run_steps(ctx: dict, steps: tuple[Step, ...], log: Log, clock: Clock, results: Results,
              functions=None) -> list[str]:  # fmt: skip
    """Every step in order within the clock's deadline, the results saved as they come.
    Returns the names of the steps not ok."""
    functions = functions or STEP_FUNCTIONS
    for step in steps:
        limit = clock.allow(step.cap_s, reserve_after(step.name, steps))
        log(f"\n== {step.name} (at most {limit:.0f} s; {clock.elapsed():.0f} s elapsed) ==")
        started = time.monotonic()
        if limit < 1:
            result = {"status": "skipped", "detail": "time budget spent"}
        else:
            results.step(step.name).update(status="running")
            results.save(clock.elapsed())
            try:
                result = functions[step.name](ctx, limit, log, results)
            except Exception as exc:  # one step crashing leaves the others their time
                result = {"status": "failed", "detail": f"{type(exc).__name__}: {exc}"[:300]}
                log(f"!! step {step.name} raised {result['detail']}")
        result["seconds"] = time.monotonic() - started
        results.data["steps"][step.name] = result
        results.save(clock.elapsed())
    return [n for n, r in results.data["steps"].items() if r["status"] != "ok"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.split("\n\n")[0].strip("`")
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    parser.add_argument("--out", help="results folder (default $OUT, else ./gpu_check_results)")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of wheels to add")
    names = [s.name for s in STEPS]
    parser.add_argument("--steps", default=",".join(names), help=f"subset of {','.join(names)}")
    parser.add_argument("--sweep-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sweep_worker:
        return sweep_worker(json.loads(args.sweep_worker))

    chosen = {x.strip() for x in args.steps.split(",") if x.strip()}
    unknown = sorted(chosen - set(names))
    if unknown:
        parser.error(f"--steps {unknown}: unknown step; choose from {', '.join(names)}")
    steps = tuple(s for s in STEPS if s.name in chosen or s.name == "setup")  # setup always

    out = Path(args.out or os.environ.get("OUT") or "gpu_check_results")
    wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl")))
    site = os.path.join(tempfile.gettempdir(), "fused_dft_gpu_check_site") if wheels else None
    try:
        import xdist  # noqa: F401

        xdist_ok = True
    except ImportError:
        xdist_ok = False
    ctx = {"out": out, "wheels": wheels, "site": site, "env": child_env(site), "xdist": xdist_ok}

    if args.dry_run:
        print("\n".join(plan_lines(ctx, steps)))
        return 0
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(
            f"gpu-check needs a CUDA GPU: torch {torch.__version__} ({build}) sees none. "
            "Run it on a machine with one; --dry-run prints the plan anywhere.",
            file=sys.stderr,
        )
        return 2

    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    clock = Clock()
    for line in plan_lines(ctx, steps):
        log(line)
    # this process's environment is the children's (the bench workers inherit it)
    os.environ.clear()
    os.environ.update(ctx["env"])
    results = Results(out, steps)
    bad = run_steps(ctx, steps, log, clock, results)
    log("\n" + summary_markdown(results.data))
    log(f"gpu-check done in {clock.elapsed():.0f} s; steps not ok: {bad or 'none'}; files in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
