"""One measurement in a fresh worker process (worker.py): start it, read its result line.

The lowest piece of the bench's process plumbing: runner.py (the loss providers, one process or
one per rank) and e2e.py (training steps) start workers through it, and worker.py prints its
result with RESULT_PREFIX from here. It imports nothing of the bench, so no module that it serves
is imported back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

RESULT_PREFIX = "FUSED_DFT_BENCH_RESULT "


def worker_command(request: dict) -> list[str]:
    return [sys.executable, "-m", "fused_dft.tools.bench.worker", json.dumps(request)]


def worker_env() -> dict[str, str]:
    """This environment, with the directory holding this fused_dft first on PYTHONPATH.

    glibc serves allocations above a threshold that grows to 32 MB from the heap and keeps them
    when freed, so the resident size would hide a later peak made of reused blocks. A fixed
    1 MiB mmap threshold makes the resident size follow the live tensors (same for every
    provider; unless the caller set MALLOC_MMAP_THRESHOLD_ already).
    """
    root = str(Path(__file__).resolve().parents[3])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))
    return env


def run_worker(request: dict, timeout_s: float | None) -> dict:
    cmd = worker_command(request)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env=worker_env()
        )
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout_s:g} s (--timeout)"}
    return worker_result(proc.returncode, proc.stdout, proc.stderr)


def worker_result(returncode: int, stdout: str, stderr: str) -> dict:
    """The result line a worker printed, or why there is none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    if returncode == -signal.SIGKILL:
        reason = "killed by SIGKILL (out of memory?)"
    else:
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:]
        reason = f"worker exited with code {returncode}: {' '.join(tail) or 'no output'}"
    return {"status": "failed", "reason": reason}
