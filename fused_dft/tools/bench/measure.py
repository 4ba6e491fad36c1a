"""Time, peak memory and error of one provider on one problem, in the current process.

Time: forward + backward (loss.backward()) of the whole problem, `warmup` runs excluded, the
median of `repeats` runs; CUDA is synchronised before reading the clock. The process's CPU time
of each run is recorded too (cpu_times_s in the JSON).
Peak memory above the inputs: the provider first runs once on a tiny problem, so one-time
costs (lazy imports, library initialisation) are not charged to it. Then, on CUDA, from the
caching allocator (max_memory_allocated after reset_peak_memory_stats, minus memory_allocated
once the inputs exist); on the CPU from the kernel (VmHWM after writing 5 to
/proc/self/clear_refs, minus VmRSS once the inputs exist), so one provider per process. The
peak window opens after the warm-up runs. Gradients (dh, dW) are part of the peak, as in training.
Error: loss, dh and dW of the provider against the float64 reference on the first
`check_tokens` tokens (0 = all), computed after the timed runs so it cannot inflate the peak.
"""

from __future__ import annotations

import gc
import math
import resource
import statistics
import sys
import time
from dataclasses import replace

import torch

from . import logprobs
from .problem import Problem, family_inputs, make_inputs, reference_float64, rel_error
from .providers import PROVIDERS


class PeakMemory:
    """Peak bytes above the level at construction; reset_peak() starts a new window."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "cuda allocator" if device.type == "cuda" else "VmHWM after clear_refs"
        if device.type != "cuda" and not _can_reset_rss():
            self.method = "ru_maxrss (not resettable here: includes creating the inputs)"
        self.base = self._current()

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_bytes("VmRSS") or _ru_maxrss()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_above_base(self) -> int:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            peak = _proc_status_bytes("VmHWM")
        else:
            peak = _ru_maxrss()
        return max(0, peak - self.base)


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _can_reset_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def _ru_maxrss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    key: str, problem: Problem, repeats: int = 3, warmup: int = 1, check_tokens: int = 256
) -> dict:
    """Measure provider `key` on `problem`: a JSON-ready dict (see module docstring)."""
    provider = PROVIDERS[key]
    inputs = provider.make_inputs or make_inputs
    loss_fn = provider.build(problem)
    prime(loss_fn, problem, inputs)
    hidden, weight, labels = inputs(problem)
    device = hidden.device
    _sync(device)
    gc.collect()
    memory = PeakMemory(device)

    def step() -> tuple[float, float, float]:
        hidden.grad = None
        weight.grad = None
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        _sync(device)
        return time.perf_counter() - start, float(loss.detach()), time.process_time() - start_cpu

    for _ in range(warmup):
        step()
    hidden.grad = None
    weight.grad = None
    gc.collect()
    memory.reset_peak()
    runs = [step() for _ in range(repeats)]
    peak = memory.peak_above_base()
    times = [t for t, _, _ in runs]
    result = {
        "status": "ok",
        "time_s": statistics.median(times),
        "times_s": times,
        # CPU seconds of this process (all its threads) per run: on a CPU shared with other
        # jobs, less inflated by their load than the wall-clock time (not shown in the table)
        "cpu_times_s": [c for _, _, c in runs],
        "peak_mem_bytes": peak,
        "inputs_bytes": memory.base,
        "memory_method": memory.method,
        "loss": runs[-1][1],
        # token rows its matmuls multiply (fused_dft drops ignored rows where it may read the host)
        "rows_multiplied": provider.matmul_rows(labels),
    }
    hidden.grad = None
    weight.grad = None
    if not PROVIDERS[key].is_loss:
        result["errors"] = {}  # a time floor, not a loss: nothing to compare
        return result
    try:
        errors = provider.errors or errors_on_prefix
        result.update(errors(loss_fn, hidden, weight, labels, problem, check_tokens))
    except Exception as exc:  # the timing stands; say why the error could not be measured
        result["errors"] = {"loss": math.inf, "dh": math.inf, "dW": math.inf}
        result["error_failure"] = f"{type(exc).__name__}: {exc}"
    return result


def prime(loss_fn, problem: Problem, inputs=make_inputs) -> None:
    """One forward + backward on a tiny problem of the same kind: imports and initialisation."""
    tiny = replace(
        problem, tokens=16, hidden=min(problem.hidden, 64), vocab=min(problem.vocab, 256)
    )
    hidden, weight, labels = inputs(tiny)
    loss_fn(hidden, weight, labels).backward()
    del hidden, weight, labels
    gc.collect()


def errors_on_prefix(loss_fn, hidden, weight, labels, problem: Problem, check_tokens: int) -> dict:
    """Loss/dh/dW errors of loss_fn on the first k tokens against the float64 reference."""
    k = problem.tokens if check_tokens <= 0 else min(check_tokens, problem.tokens)
    h = hidden.detach()[:k].clone().requires_grad_(True)
    w = weight.detach().requires_grad_(True)
    y = labels[:k]
    loss = loss_fn(h, w, y)
    loss.backward()
    if problem.loss_type == logprobs.LOSS_TYPE:  # the naive op's objective in float64
        ref_loss, ref_dh, ref_dw, _ = logprobs.reference_float64(h, w, y)
    else:
        ref_loss, ref_dh, ref_dw, _ = reference_float64(
            h, w, y, problem.loss_type, **family_inputs(problem, y, h.double(), w.double())
        )
    errors = {
        "loss": rel_error(loss, ref_loss),
        "dh": rel_error(h.grad, ref_dh),
        "dW": rel_error(w.grad, ref_dw),
    }
    return {"errors": errors, "check_tokens": k}
