"""`make gpu-check`: the one command a session with a GPU runs to measure fused_dft there.

    python3 bench/gpu_check.py [--dry-run] [--out DIR] [--steps tests,check,bench,sweep]

Needs torch, triton, pytest, matplotlib and tqdm (the GPU machines have them) and installs nothing
from the network: the checkout goes on PYTHONPATH; wheels in .whl/ (Liger-Kernel, Cut
Cross-Entropy: bench/README.md says how to bring them) are installed with --no-index into a temp
folder. Steps, each with a time budget inside one global deadline (8 minutes on one H100):
    setup   versions, GPU, the wheels
    tests   the test suite on CUDA, kernels compiled (pytest-xdist when installed)
    check   fused-dft check --device cuda
    bench   fused-dft bench --device cuda --dtype bfloat16 at 16384x4096x128256 and
            8192x4096x151936, 0% and 30% of labels ignored: naive, chunked, fused, Liger, torch,
            Cut Cross-Entropy, and the 3-GEMM bound (each provider in its own process, as the CLI)
    sweep   the fused configs at the first shape, through the config override
A step that runs out of time is stopped and the next one starts; the summary comes last. Results
go to $OUT when set, else ./gpu_check_results: gpu_check.md (the summary), gpu_check.json,
gpu_check.log (everything printed) and bench.png (the first shape).
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
    cap_s: float  # the most it may take
    floor_s: float  # kept back for it while earlier steps run
    what: str


STEPS = (
    Step("setup", 20, 5, "versions, GPU, wheels from .whl/ (pip --no-index --no-deps --target)"),
    Step("tests", 150, 60, "pytest on CUDA, kernels compiled (-n 8 with pytest-xdist)"),
    Step("check", 40, 20, "fused-dft check --device cuda (FUSED_DFT_AUTOTUNE=0: correctness)"),
    Step("bench", 230, 120, "fused-dft bench, bf16, 2 shapes x {0%, 30%} ignored, 7 providers"),
    Step("sweep", 40, 20, "fused configs at the first shape via the config override"),
)

# (tokens, hidden, vocab, ignored fraction), in the order they run: the headline shape first
BENCH_RUNS = ((16384, 4096, 128256, 0.0), (16384, 4096, 128256, 0.3))
BENCH_RUNS += ((8192, 4096, 151936, 0.0), (8192, 4096, 151936, 0.3))
BENCH_PROVIDERS = ("naive", "chunked", "fused", "liger", "torch", "cce", "bound")
# seconds one provider may take: its worker starts, primes, times 1 + 3 runs and checks its error;
# fused also compiles and autotunes its kernels on its first run
PROVIDER_CAP_S = {"fused": 80, "liger": 45, "cce": 45}
PROVIDER_CAP_DEFAULT_S = 35


def sweep_configs() -> list[str]:
    """The shipped bf16 candidates (vocab splits from the SM count), and the first shape's
    default with fixed 8 and 32 vocab splits and with groups of 4 and 16 token blocks."""
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


def run_streamed(cmd: list[str], env: dict, timeout_s: float, log: Log) -> tuple[int | None, str]:
    """Run cmd, echoing its output as it comes; stop its whole process group at timeout_s.
    Returns (exit code or None when stopped, the output)."""
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


def tests_command(xdist: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"]
    return cmd + (["-n", "8", "--dist", "loadfile"] if xdist else [])


def check_command() -> list[str]:
    return [sys.executable, "-m", "fused_dft", "check", "--device", "cuda"]


def bench_command(n: int, d: int, v: int, ignore: float) -> list[str]:
    """What the bench step runs, as one command (the script runs it provider by provider, so
    that each gets its own time limit)."""
    cmd = [sys.executable, "-m", "fused_dft", "bench", "--device", "cuda", "--dtype", "bfloat16"]
    cmd += ["--tokens", str(n), "--hidden", str(d), "--vocab", str(v), "--ignore-frac", str(ignore)]
    return cmd + ["--providers", ",".join(BENCH_PROVIDERS), "--repeats", "3", "--warmup", "1"]


def sweep_command(request: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--sweep-worker", json.dumps(request)]


def step_setup(ctx: dict, timeout_s: float, log: Log) -> dict:
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
    return {"status": status, "detail": detail, "versions": versions, "gpu": gpu, "libs": found}


def step_command(cmd: list[str], env: dict, timeout_s: float, log: Log) -> dict:
    code, out = run_streamed(cmd, env, timeout_s, log)
    tail = [x for x in out.strip().splitlines() if x.strip()][-1:] or [""]
    status = "timed out" if code is None else ("ok" if code == 0 else f"failed (exit {code})")
    return {"status": status, "detail": tail[0][:200]}


def step_bench(
    ctx: dict,
    limit_s: float,
    log: Log,
    bench_runs=BENCH_RUNS,
    providers=BENCH_PROVIDERS,
    device: str = "cuda",
) -> dict:
    from fused_dft.tools.bench import plot, report
    from fused_dft.tools.bench.problem import Problem
    from fused_dft.tools.bench.runner import BenchConfig, add_ratios, run_one

    clock = Clock(limit_s)  # this step's own deadline
    runs, problems_left = [], list(bench_runs)
    for i, (n, d, v, ignore) in enumerate(bench_runs):
        problems_left.pop(0)
        problem = Problem(n, d, v, dtype="bfloat16", device=device, ignore_frac=ignore)
        config = BenchConfig(problems=[problem], providers=list(providers), repeats=3)
        shape = f"{n}x{d}x{v}, {ignore:.0%} ignored"
        log(f"\n[bench {i + 1}/{len(bench_runs)}] {shape}; as one command: "
            f"{shlex.join(bench_command(n, d, v, ignore)[1:])}")  # fmt: skip
        records = []
        for key in providers:
            # keep ~15 s for each later bench run
            later = 15 * len(problems_left)
            limit = clock.allow(PROVIDER_CAP_S.get(key, PROVIDER_CAP_DEFAULT_S), later)
            if limit < 5:
                r = {"provider": key, "label": key, "problem": problem.as_dict()}
                records.append({**r, "status": "skipped", "reason": "gpu-check time budget spent"})
                log(f"  {key:<8} skipped: time budget spent")
                continue
            started = time.monotonic()
            record = run_one(dataclasses.replace(config, timeout_s=limit), problem, key)
            records.append(record)
            took = time.monotonic() - started
            what = report.fmt_time(record.get("time_s")) if record["status"] == "ok" else ""
            log(f"  {key:<8} {record['status']} {what} {record.get('reason', '')} ({took:.0f} s)")
        add_ratios(records, problem)
        log(report.terminal_table(records))
        runs.append({"shape": shape, "records": records})
        if i == 0:
            title = f"fused-dft gpu-check: {shape}, bf16"
            plot.plot(records, ctx["out"] / "bench.png", title, ctx["gpu_line"], None)
    ok = sum(r["status"] == "ok" for run in runs for r in run["records"])
    total = len(bench_runs) * len(providers)
    return {"status": "ok", "detail": f"{ok} of {total} provider runs measured", "runs": runs}


def step_sweep(ctx: dict, timeout_s: float, log: Log) -> dict:
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


# -- plan, summary ------------------------------------------------------------------------------


def plan_lines(ctx: dict, steps: tuple[Step, ...]) -> list[str]:
    n, d, v, _ = BENCH_RUNS[0]
    commands = {
        "setup": [shlex.join(wheel_command(ctx["wheels"], ctx["site"]))] if ctx["wheels"] else [],
        "tests": [shlex.join(tests_command(ctx["xdist"]))],
        "check": ["FUSED_DFT_AUTOTUNE=0 " + shlex.join(check_command())],
        "bench": [shlex.join(bench_command(*run)) for run in BENCH_RUNS],
        "sweep": [shlex.join(sweep_command({"shape": [n, d, v], "configs": sweep_configs()}))],
    }
    lines = [
        f"gpu-check plan: {len(steps)} steps, budget {DEADLINE_S} s "
        f"(caps add to {sum(s.cap_s for s in steps):.0f} s; each step stops at its cap)",
        f"output folder: {ctx['out']} (gpu_check.md, gpu_check.json, gpu_check.log, bench.png)",
        f"PYTHONPATH: {ctx['env']['PYTHONPATH']}",
        f"wheels: {', '.join(Path(w).name for w in ctx['wheels']) or 'none (no .whl folder)'}",
    ]
    for s in steps:
        lines.append(f"  {s.name:<6} at most {s.cap_s:>4.0f} s  {s.what}")
        lines += [f"           $ {c}" for c in commands[s.name]]
    lines.append(
        "  bench: per provider at most "
        + ", ".join(f"{k} {v} s" for k, v in PROVIDER_CAP_S.items())
        + f", others {PROVIDER_CAP_DEFAULT_S} s"
    )
    return lines


def summary_markdown(results: dict) -> str:
    from fused_dft.tools.bench import report

    lines = ["# fused-dft gpu-check", ""]
    setup = results["steps"].get("setup", {})
    if setup.get("gpu"):
        lines.append(f"- GPU: {setup['gpu']}; {setup['versions']}; libraries: {setup['libs']}")
    lines += [f"- date: {results['date']}; total {results['seconds']:.0f} s", ""]
    lines += ["| step | status | seconds | detail |", "|---|---|---|---|"]
    for name, r in results["steps"].items():
        lines.append(f"| {name} | {r['status']} | {r['seconds']:.0f} | {r.get('detail', '')} |")
    for run in results["steps"].get("bench", {}).get("runs", []):
        head = report.header(run["records"])
        lines += ["", f"### bench {run['shape']}, bf16", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + "|".join("---" for _ in head) + "|")
        lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |"
                  for r in report.rows(run["records"])]  # fmt: skip
    sweep = results["steps"].get("sweep", {}).get("rows", [])
    if sweep:
        lines += ["", "### fused config sweep (first shape, 0% ignored)", ""]
        lines += ["| config | first run | time | peak mem |", "|---|---|---|---|"]
        for r in sweep:
            if "error" in r:
                lines.append(f"| {r['config']} | {r['error']} | | |")
            else:
                lines.append(
                    f"| {r['config']} | {report.fmt_time(r['first_s'])} | "
                    f"{report.fmt_time(r['time_s'])} | {report.fmt_bytes(r['peak_mem_bytes'])} |"
                )
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------------


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
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "steps": {}}
    for step in steps:
        limit = clock.allow(step.cap_s, reserve_after(step.name, steps))
        log(f"\n== {step.name} (at most {limit:.0f} s; {clock.elapsed():.0f} s elapsed) ==")
        started = time.monotonic()
        if limit < 1:
            result = {"status": "skipped", "detail": "time budget spent"}
        elif step.name == "setup":
            result = step_setup(ctx, limit, log)
            ctx["gpu_line"] = f"{result['gpu']['name']}; torch {result['versions']['torch']}"
        elif step.name == "tests":
            result = step_command(tests_command(ctx["xdist"]), ctx["env"], limit, log)
        elif step.name == "check":
            env = dict(ctx["env"], FUSED_DFT_AUTOTUNE="0")
            result = step_command(check_command(), env, limit, log)
        elif step.name == "bench":
            result = step_bench(ctx, limit, log)
        else:
            result = step_sweep(ctx, limit, log)
        result["seconds"] = time.monotonic() - started
        results["steps"][step.name] = result
    results["seconds"] = clock.elapsed()
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    text = summary_markdown(results)
    (out / "gpu_check.md").write_text(text)
    log("\n" + text)
    bad = [n for n, r in results["steps"].items() if r["status"] != "ok"]
    log(f"gpu-check done in {clock.elapsed():.0f} s; steps not ok: {bad or 'none'}; files in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
