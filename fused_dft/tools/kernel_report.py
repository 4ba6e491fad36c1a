"""`fused-dft kernels`: GPU resource facts of every kernel, read on a machine without a GPU.

Each (kernel, dtype, arch, config) of tools/kernel_specs.py is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` by the ptxas that ships in the
triton wheel, in worker processes with Triton's interpreter off (an interpreted kernel cannot be
compiled). Per compile:
    shared_bytes  shared memory the launch asks for (Triton's metadata.shared)
    registers     registers per thread (cuobjdump --dump-resource-usage: REG)
    spill_bytes   stack frame + local memory per thread (STACK + LOCAL), where ptxas puts spilled
                  registers: the kernels make no calls and hold no local arrays
    tile          block_n x block_v x block_d of the fused kernels' logits tile ("128x(2x128)x64":
                  v_halves=2, two 128-wide halves per program step); num_warps,
                  num_stages: the launch's warps and pipeline depth
    ctas_per_sm   programs one SM holds at once, from registers and shared memory alone: registers
                  allocated per warp in units of 256, against the arch's 65536 per SM; shared
                  memory plus the 1 KB the runtime reserves per block, against its shared memory
                  per SM (228 KB on sm_90 / sm_100, 164 KB on sm_80, 100 KB on sm_86 / 89 / 120)
    flop_per_byte FLOPs of a logits tile per operand byte loaded from L2:
                  2*BN*BV*BD / ((BN + BV) * BD * elem_bytes) = 2*BN*BV / ((BN + BV) * elem_bytes)
                  (128 x 128 in bf16: 64; 128 x 256 or 128 x (2x128): 85); at 600+ TFLOP/s, 64
                  needs ~9 TB/s of L2
    tensor_cores  whether the dots became the arch's tensor-core instruction (PTX wgmma.mma_async on
                  sm_90, tcgen05.mma on sm_100, mma.sync on sm_80 / sm_86 / sm_89 / sm_120; a dot
                  that fell back to mma.sync on sm_90 counts as False); None without tl.dot
Archs (ARCHS): every one the triton 3.9 wheel's ptxas (12.9, and ptxas-blackwell for sm_100 /
sm_120) compiles; sm_75 (T4) and older are not offered (no bf16 tensor cores).
    atomics       atomic instructions in the PTX (atom.* and red.*), counted statically
This gives no speed, but it shows spills, shared-memory overflow and missing tensor cores before a
GPU is ever lent.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .kernel_specs import DEFAULT_DTYPES, DTYPES, SPECS, CompileSpec, check_spec

KEYS = (
    "kernel",
    "dtype",
    "arch",
    "config",
    "tile",
    "num_warps",
    "num_stages",
    "shared_bytes",
    "registers",
    "spill_bytes",
    "tensor_cores",
    "atomics",
    "ctas_per_sm",
    "flop_per_byte",
)
RESULT_PREFIX = "FUSED_DFT_KERNEL_REPORT "


@dataclass(frozen=True)
class Arch:
    name: str
    capability: int
    shared_limit: int  # largest dynamic shared memory one block may opt into, bytes
    tensor_core_ptx: str  # the tensor-core instruction a dot should become
    shared_per_sm: int  # shared memory of one SM, bytes (what resident blocks share)
    regs_per_sm: int = 65536


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("sm_80", 80, 163 * 1024, r"\bmma\.sync", 164 * 1024),  # A100, A800
        Arch("sm_86", 86, 99 * 1024, r"\bmma\.sync", 100 * 1024),  # A10, A40, RTX 3090, A6000
        Arch("sm_89", 89, 99 * 1024, r"\bmma\.sync", 100 * 1024),  # L4, L40S, RTX 4090
        Arch("sm_90", 90, 227 * 1024, r"\bwgmma\.mma_async", 228 * 1024),  # H100, H200, GH200
        Arch("sm_100", 100, 227 * 1024, r"\btcgen05\.mma", 228 * 1024),  # B200, GB200
        Arch("sm_120", 120, 99 * 1024, r"\bmma\.sync", 100 * 1024),  # RTX 50xx, RTX PRO 6000
    )
}
DEFAULT_ARCHS = ("sm_90", "sm_80")


# -- what to compile: every check happens here, before any compile ------------------------------


def _split(text: str | None) -> list[str]:
    return list(dict.fromkeys(x.strip() for x in (text or "").split(",") if x.strip()))


def _choose(option: str, what: str, text: str | None, choices, default) -> list[str]:
    names = _split(text) or list(default)
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise ValueError(f"{option} {unknown}: unknown {what}; choose from {', '.join(choices)}")
    return names


def parse_kernels(text: str | None) -> list[str]:
    return _choose("--kernel", "kernel", text, SPECS, SPECS)


def parse_dtypes(text: str | None) -> list[str]:
    return _choose("--dtype", "dtype", text, DTYPES, DEFAULT_DTYPES)


def parse_archs(text: str | None) -> list[str]:
    archs = []
    for raw in _split(text) or list(DEFAULT_ARCHS):
        digits = raw.lower().removeprefix("sm").lstrip("_").removesuffix("a")
        name = f"sm_{digits}"
        if name not in ARCHS:
            raise ValueError(
                f"--arch {raw!r}: cannot compile for it here; choose from {', '.join(ARCHS)}"
            )
        archs.append(name)
    return list(dict.fromkeys(archs))


def configs_for(spec: CompileSpec, dtype: str, choice: str, arch: str = "sm_90") -> list[str]:
    """choice: 'all' (every config shipped for the arch), 'default' (those used without
    autotuning: one per D/V bucket), or config text."""
    shipped = spec.configs(dtype, arch)
    if choice == "all":
        return shipped
    if choice == "default":
        return spec.defaults(dtype, arch)
    try:
        spec.parse_config(choice)
    except ValueError as exc:
        raise ValueError(
            f"--config for kernel {spec.name!r}: {exc}. Also accepted: 'all', 'default'; "
            f"{spec.name}'s shipped configs: {'; '.join(shipped)}"
        ) from None
    return [choice]


def plan_jobs(
    kernels: list[str], dtypes: list[str], archs: list[str], choice: str = "all"
) -> list[dict]:
    """Every (kernel, dtype, arch, config) to compile; raises ValueError on a bad config or a
    spec that no longer matches its kernel."""
    jobs = []
    for kernel in kernels:
        spec = SPECS[kernel]
        for dtype in dtypes:
            for arch in archs:
                for config in configs_for(spec, dtype, choice, arch):
                    check_spec(spec, dtype, config)
                    jobs.append({"kernel": kernel, "dtype": dtype, "arch": arch, "config": config})
    return jobs


def missing_tools() -> str | None:
    """None when the triton here can compile for NVIDIA GPUs; otherwise why not."""
    try:
        from triton import knobs

        knobs.nvidia.ptxas.path  # noqa: B018  (raises when there is none)
        knobs.nvidia.cuobjdump.path  # noqa: B018
    except ImportError:
        return "triton is not installed"
    except (RuntimeError, AttributeError) as exc:
        return f"the triton wheel here has no usable ptxas/cuobjdump ({exc})"
    return None


# -- compiling, in worker processes ---------------------------------------------------------------


def compile_jobs(jobs: list[dict], workers: int = 2, progress=None) -> list[dict]:
    """Compile every job in `workers` processes; rows in job order. A failed compile gives a row
    with an "error" entry. progress(done, total, row) is called as rows arrive."""
    if not jobs:
        return []
    workers = max(1, min(workers, len(jobs)))
    shares = [jobs[i::workers] for i in range(workers)]
    results: queue.Queue = queue.Queue()
    procs = [_start_worker(share, results) for share in shares]
    rows: dict[int, dict] = {}
    while len(rows) < len(jobs):
        item = results.get()
        if isinstance(item, Exception):
            raise item
        index = jobs.index({k: item[k] for k in ("kernel", "dtype", "arch", "config")})
        rows[index] = item
        if progress is not None:
            progress(len(rows), len(jobs), item)
    for proc in procs:
        proc.wait()
    return [rows[i] for i in range(len(jobs))]


def worker_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["TRITON_INTERPRET"] = "0"  # an interpreted kernel has no compiler pipeline
    return env


def _start_worker(share: list[dict], results: queue.Queue) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fused_dft.tools.kernel_report", "--worker"]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(),
    )
    proc.stdin.write(json.dumps(share))
    proc.stdin.close()

    def read() -> None:
        seen = 0
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                results.put(json.loads(line[len(RESULT_PREFIX) :]))
                seen += 1
        err = proc.stderr.read()
        if proc.wait() != 0 or seen < len(share):
            tail = " ".join(err.strip().splitlines()[-3:])
            results.put(RuntimeError(f"kernel report worker exited with {proc.returncode}: {tail}"))

    threading.Thread(target=read, daemon=True).start()
    return proc


def _worker_main() -> int:
    for job in json.loads(sys.stdin.read()):
        try:
            row = {**job, **compile_one(job)}
        except Exception as exc:  # reported per job; the others still compile
            row = {**job, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        print(RESULT_PREFIX + json.dumps(row), flush=True)
    return 0


def compile_kernel(job: dict):
    """triton.compile of one job (kernel, dtype, arch, config) in this process (the interpreter
    must be off): the CompiledKernel, whose asm holds "ttir", "ttgir", "ptx" and "cubin"."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = SPECS[job["kernel"]]
    arch = ARCHS[job["arch"]]
    fn = _jit_function(spec)
    pointee = DTYPES[job["dtype"]][0]
    meta, options = spec.parse_config(job["config"])
    constants = {**spec.flags(job["dtype"]), **meta}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        kind = spec.arg_types.get(name)
        if kind is None or kind == "1":
            signature[name] = "constexpr"
            constexprs[(i,)] = constants[name] if kind is None else 1
            continue
        kind, _, multiple = kind.partition(":")
        signature[name] = kind.replace("*T", "*" + pointee)
        if kind.startswith("*") or multiple == "16":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch.capability, 32), options=options)


def compile_one(job: dict) -> dict:
    """Compile one job in this process (the interpreter must be off) and read its resources."""
    import triton

    spec = SPECS[job["kernel"]]
    arch = ARCHS[job["arch"]]
    pointee = DTYPES[job["dtype"]][0]
    meta, options = spec.parse_config(job["config"])
    compiled = compile_kernel(job)
    usage = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    instr = None
    if spec.has_dot:
        instr = next((name for name, text in _DOT_PTX if text in ptx), "none")
    shared = int(compiled.metadata.shared)
    warps = int(compiled.metadata.num_warps)
    tile = [meta.get(k) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")]
    halves = meta.get("V_HALVES", 1)
    elem_bytes = 2 if pointee in ("bf16", "fp16") else 4
    return {
        "tile": tile_label(*tile, halves) if all(tile) else None,
        "num_warps": warps,
        "num_stages": options.get("num_stages"),
        "ctas_per_sm": ctas_per_sm(usage["REG"], warps, shared, arch),
        "flop_per_byte": (
            flop_per_byte(tile[0], tile[1] * halves, elem_bytes) if all(tile) else None
        ),
        "shared_bytes": shared,
        "registers": usage["REG"],
        "spill_bytes": usage["STACK"] + usage["LOCAL"],
        "tensor_cores": None if instr is None else bool(re.search(arch.tensor_core_ptx, ptx)),
        "atomics": len(re.findall(r"^\s*(?:@!?%\w+\s+)?(?:atom|red)\.", ptx, re.MULTILINE)),
        "dot_instruction": instr,
        "triton": triton.__version__,
    }


def ctas_per_sm(registers: int, num_warps: int, shared_bytes: int, arch: Arch) -> int:
    """Blocks one SM holds at once by registers and shared memory (not by the block limit):
    registers are allocated per warp in units of 256, each block's shared memory comes with
    1 KB the runtime reserves. 255 registers x 8 warps fill sm_90's 65536: 1."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_registers = arch.regs_per_sm // (regs_per_warp * num_warps)
    by_shared = arch.shared_per_sm // (shared_bytes + 1024)
    return min(by_registers, by_shared)


def tile_label(block_n: int, block_v: int, block_d: int, v_halves: int = 1) -> str:
    """'128x128x64'; a tile computed as two vocabulary halves: '128x(2x128)x64'."""
    cols = str(block_v) if v_halves == 1 else f"({v_halves}x{block_v})"
    return f"{block_n}x{cols}x{block_d}"


def flop_per_byte(block_n: int, block_v: int, elem_bytes: int) -> float:
    """2*BN*BV*BD FLOPs per (BN + BV)*BD operand elements loaded: BD cancels."""
    return 2 * block_n * block_v / ((block_n + block_v) * elem_bytes)


# the tensor-core instruction a dot became, as the table names it
_DOT_PTX = (("wgmma", "wgmma.mma_async"), ("tcgen05", "tcgen05.mma"), ("mma", "mma.sync"))


def _jit_function(spec: CompileSpec):
    import importlib

    from triton.runtime.jit import JITFunction

    obj = getattr(importlib.import_module(spec.module), spec.function)
    while not isinstance(obj, JITFunction):
        obj = obj.fn  # autotune / heuristics wrappers
    return obj


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's one kernel, from cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if "REG" not in found:
        raise RuntimeError(f"cuobjdump gave no resource usage: {out.strip()[:200]}")
    return {k: int(found.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}


# -- reading the results ------------------------------------------------------------------------


def problems(row: dict) -> list[str]:
    """What a GPU would suffer from: spills, too much shared memory, dots off the tensor cores."""
    if "error" in row:
        return [f"compile failed: {row['error']}"]
    out = []
    if row["spill_bytes"]:
        out.append(f"spills {row['spill_bytes']} B/thread")
    limit = ARCHS[row["arch"]].shared_limit
    if row["shared_bytes"] > limit:
        out.append(f"shared {row['shared_bytes']} B > the {limit // 1024} KB limit")
    if row["tensor_cores"] is False and row["dtype"] != "fp32":
        out.append(f"dot on {row['dot_instruction']}, not tensor cores")
    return out


def json_rows(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in KEYS} for r in rows if "error" not in r]


def table(rows: list[dict]) -> str:
    header = ["kernel", "dtype", "arch", "config", "tile", "w/s", "shared", "regs", "spill"]
    header += ["CTAs/SM", "tensor cores", "FLOP/B", "atomics", "problems"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["kernel"], r["dtype"], r["arch"], r["config"], *["-"] * 9, r["error"]])
            continue
        tc = {None: "-", True: r["dot_instruction"], False: f"no ({r['dot_instruction']})"}
        body.append(
            [
                r["kernel"],
                r["dtype"],
                r["arch"],
                r["config"],
                r["tile"] or "-",
                f"{r['num_warps']}/{r['num_stages'] or '-'}",
                f"{r['shared_bytes'] / 1024:.0f} KB",
                str(r["registers"]),
                f"{r['spill_bytes']} B",
                str(r["ctas_per_sm"]),
                tc[r["tensor_cores"]],
                "-" if r["flop_per_byte"] is None else f"{r['flop_per_byte']:.0f}",
                str(r["atomics"]),
                "; ".join(problems(r)),
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    widths[-1] = 0
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join(
        [fmt(header), fmt(["-" * w for w in widths[:-1]] + ["--------"])] + [fmt(b) for b in body]
    )


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    raise SystemExit(_worker_main())
