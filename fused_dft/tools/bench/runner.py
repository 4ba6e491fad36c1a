"""`fused-dft bench`: every shape x provider, each provider in its own worker process.

A fresh process per provider gives each its own peak-memory window (on the CPU the peak
resident size belongs to the whole process) and keeps one provider's caches, compiled kernels
or crash away from the next. Providers that cannot run are recorded as skipped with the reason.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace

from .launch import run_worker, worker_command, worker_env, worker_result
from .problem import Problem, canonical_dtype, tolerance
from .providers import PROVIDERS, resolved_impl


@dataclass
class BenchConfig:
    problems: list[Problem]  # one per shape; more than one when a size is swept
    providers: list[str]
    repeats: int = 3
    warmup: int = 1
    check_tokens: int = 256
    timeout_s: float | None = None
    sweep: str | None = None  # "tokens", "hidden" or "vocab" when one is swept
    extra: dict = field(default_factory=dict)


def run_bench(config: BenchConfig, progress: bool = True) -> list[dict]:
    """One record per (problem, provider), in order; ratios to naive filled in per problem."""
    from tqdm import tqdm

    jobs = [(p, key) for p in config.problems for key in config.providers]
    records = []
    bar = tqdm(jobs, desc="bench", unit="run", file=sys.stderr, disable=not progress)
    for problem, key in bar:
        shape = f"{problem.tokens}x{problem.hidden}x{problem.vocab}"
        bar.set_postfix_str(f"{key} @ {shape}")
        records.append(run_one(config, problem, key))
    bar.close()
    for problem in config.problems:
        add_ratios([r for r in records if r["problem"] == problem.as_dict()], problem)
    return records


def run_one(config: BenchConfig, problem: Problem, key: str) -> dict:
    provider = PROVIDERS[key]
    record = {"provider": key, "label": provider.label, "problem": problem.as_dict()}
    if key in ("auto", "chunked", "fused", "reference"):
        record["runs_as"] = resolved_impl(key, problem)
    if provider.distributed:
        record["runs_as"] = f"{resolved_impl('auto', problem)} x {problem.nproc} ranks"
    reason = provider.unavailable(problem)
    if reason is not None:
        return {**record, "status": "skipped", "reason": reason}
    request = {
        "provider": key,
        "problem": problem.as_dict(),
        "repeats": config.repeats,
        "warmup": config.warmup,
        "check_tokens": config.check_tokens,
    }
    if provider.distributed:
        return {**record, **run_ranks(request, problem.nproc, config.timeout_s)}
    return {**record, **run_worker(request, config.timeout_s)}


def run_ranks(request: dict, nproc: int, timeout_s: float | None) -> dict:
    """A distributed provider: one worker per rank, joined through a file store. The record has
    the slowest rank's median time, the largest rank's peak memory and error, and per-rank
    figures under "ranks"."""
    from .distributed import rank_env

    cmd = worker_command(request)
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**worker_env(), **rank_env(rank, nproc, f"{tmp}/store")},
            )
            for rank in range(nproc)
        ]
        results = []
        try:
            for proc in procs:
                out, err = proc.communicate(timeout=timeout_s)
                results.append(worker_result(proc.returncode, out, err))
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"timed out after {timeout_s:g} s (--timeout)"}
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    failed = [(rank, r) for rank, r in enumerate(results) if r["status"] != "ok"]
    if failed:
        rank, r = failed[0]
        return {"status": "failed", "reason": f"rank {rank}: {r['reason']}"}
    slowest = max(results, key=lambda r: r["time_s"])
    return {
        **slowest,
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in results),
        "inputs_bytes": max(r["inputs_bytes"] for r in results),
        "errors": {k: max(r["errors"][k] for r in results) for k in slowest["errors"]},
        "ranks": results,
    }


def add_ratios(records: list[dict], problem: Problem) -> None:
    """time/memory ratios to naive, time ratio to the 3-GEMM bound when it ran, and whether each
    error is within tolerance."""
    naive = next((r for r in records if r["provider"] == "naive" and r["status"] == "ok"), None)
    bound = next((r for r in records if r["provider"] == "bound" and r["status"] == "ok"), None)
    naive_error = max(naive["errors"].values()) if naive else None
    tol = tolerance(problem.dtype, problem.device, naive_error)
    for r in records:
        if r["status"] != "ok":
            continue
        r["max_error"] = max(r["errors"].values()) if r["errors"] else None
        r["tolerance"] = tol
        r["error_ok"] = r["max_error"] is None or bool(r["max_error"] <= tol)
        if naive is not None:
            r["time_ratio"] = _ratio(r["time_s"], naive["time_s"])
            r["mem_ratio"] = _ratio(r["peak_mem_bytes"], naive["peak_mem_bytes"])
        if bound is not None:
            r["bound_ratio"] = _ratio(r["time_s"], bound["time_s"])
    # the vocab-parallel provider against one process running the same impl on the same work
    one = next((r for r in records if r["provider"] == "auto" and r["status"] == "ok"), None)
    for r in records:
        if one is not None and r["status"] == "ok" and r["provider"] == "vocab_parallel":
            r["vs_one_process"] = {
                "time": _ratio(r["time_s"], one["time_s"]),
                "peak_mem_per_rank": _ratio(r["peak_mem_bytes"], one["peak_mem_bytes"]),
            }


def _ratio(x: float, base: float) -> float | None:
    return x / base if base and math.isfinite(base) else None


def describe_problems(config: BenchConfig) -> str:
    p = config.problems[0]
    sizes = {
        name: sorted({getattr(q, name) for q in config.problems})
        for name in ("tokens", "hidden", "vocab")
    }
    shape = ", ".join(
        f"{'N D V'.split()[i]}={','.join(map(str, sizes[name]))}"
        for i, name in enumerate(("tokens", "hidden", "vocab"))
    )
    return (
        f"device {p.device}, {canonical_dtype(p.dtype)}, loss {p.loss_type}, {shape}, "
        f"{p.ignore_frac:.0%} of labels ignored, median of {config.repeats} "
        f"(+{config.warmup} warm-up)"
    )


def with_sizes(base: Problem, tokens: list[int], hidden: list[int], vocab: list[int]):
    """The problems of a run: the product of the given sizes (at most one list is longer)."""
    return [
        replace(base, tokens=n, hidden=d, vocab=v) for n in tokens for d in hidden for v in vocab
    ]
