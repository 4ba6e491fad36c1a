"""Pointer offsets in the compiled kernels: no product of two runtime ints computed in int32.

Every kernel is compiled for sm_90 on this CPU-only machine (in a subprocess with Triton's
interpreter off, through tools/kernel_report.compile_kernel) and its TTIR is read: for every
`tt.addptr`, the values its offset is computed from are followed back through the SSA graph, and
an `arith.muli` in int32 whose two operands are both runtime values (a program id, an argument, a
load, a loop variable, or anything computed from one) fails the test. Such a product (a program id
times N, splits times N) can pass 2^31 and wrap silently on a GPU; a product with a compile-time
constant (pid * BLOCK_N) stays below the bound of the runtime value it scales. Skipped where the
triton wheel has no ptxas (nothing can be compiled for a GPU here).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from fused_dft.tools import kernel_report as report
from fused_dft.tools import kernel_specs as specs

NO_TOOLS = report.missing_tools()

# compiles the four kernels at their first default config (bf16, sm_90): ~5 s on 2 cores uncached
_COMPILE = """
import json, sys
from fused_dft.tools import kernel_report as kr
from fused_dft.tools.kernel_specs import SPECS
out = {}
for name, spec in SPECS.items():
    config = spec.defaults("bf16", "sm_90")[0]
    job = {"kernel": name, "dtype": "bf16", "arch": "sm_90", "config": config}
    out[name] = kr.compile_kernel(job).asm["ttir"]
print("TTIR " + json.dumps(out))
"""

# ops whose result is a runtime value whatever their operands
_RUNTIME_OPS = ("tt.get_program_id", "tt.get_num_programs", "tt.load", "scf.for", "scf.while",
                "scf.if", "tt.atomic_rmw", "tt.atomic_cas")  # fmt: skip
_DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)? = (\"?[\w.]+\"?)(.*)$")
_VALUE = re.compile(r"%[\w.]+")


def _definitions(ttir: str) -> dict[str, tuple[str, list[str], str]]:
    """SSA name -> (op, operand names, the text after the operands: types)."""
    defs = {}
    for line in ttir.splitlines():
        match = _DEF.match(line.split(" loc(")[0])
        if match:
            name, op, rest = match.groups()
            operands_text, _, types = rest.partition(" : ")
            defs[name] = (op.strip('"'), _VALUE.findall(operands_text), types)
    return defs


def _is_runtime(name: str, defs, memo: dict) -> bool:
    """A value not known at compile time: an argument, a block argument (loop variables), a
    program id, a load, or computed from one of those."""
    if name not in memo:
        memo[name] = True  # cycles only pass through loops, which are runtime
        if name in defs:
            op, operands, _ = defs[name]
            memo[name] = op in _RUNTIME_OPS or any(_is_runtime(o, defs, memo) for o in operands)
    return memo[name]


def i32_runtime_products_in_offsets(ttir: str) -> list[str]:
    """The int32 muli of two runtime values that some addptr's offset is computed from."""
    defs, memo, found = _definitions(ttir), {}, []
    offsets = [ops[1] for op, ops, _ in defs.values() if op == "tt.addptr" and len(ops) == 2]
    seen, stack = set(), list(offsets)
    while stack:
        name = stack.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        op, operands, types = defs[name]
        stack.extend(operands)
        int32 = re.search(r"\bi32\b|xi32>", types) is not None
        if op == "arith.muli" and int32 and all(_is_runtime(o, defs, memo) for o in operands):
            found.append(f"{name} = arith.muli {', '.join(operands)} : {types.strip()}")
    return sorted(found)


@pytest.fixture(scope="module")
def ttir() -> dict[str, str]:
    if NO_TOOLS:
        pytest.skip(f"cannot compile for NVIDIA GPUs here: {NO_TOOLS}")
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE],
        capture_output=True,
        text=True,
        env=report.worker_env(),  # the interpreter off: an interpreted kernel cannot compile
        timeout=300,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("TTIR ")]
    assert proc.returncode == 0 and lines, f"compiling the kernels failed:\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("TTIR ") :])


@pytest.mark.parametrize("kernel", list(specs.SPECS))
def test_no_int32_product_of_runtime_values_feeds_a_pointer(ttir, kernel):
    offenders = i32_runtime_products_in_offsets(ttir[kernel])
    assert not offenders, (
        f"{kernel}: pointer offsets computed from int32 products of runtime values (they wrap "
        f"past 2^31; cast one factor with .to(tl.int64)): {offenders}"
    )


# the checker itself, on the pattern fused_fwd.py had (`part_ptr + split * N + rows`, the product
# in int32, widened only when added to the int64 rows) and on its fixed form
_BAD = """
    %c64_i32 = arith.constant 64 : i32 loc(#loc0)
    %0 = tt.get_program_id x : i32 loc(#loc1)
    %1 = arith.muli %0, %N : i32 loc(#loc2)
    %2 = arith.muli %0, %c64_i32 : i32 loc(#loc3)
    %3 = arith.extsi %1 : i32 to i64 loc(#loc4)
    %4 = tt.addptr %part_ptr, %3 : !tt.ptr<f32>, i64 loc(#loc5)
    %5 = tt.addptr %part_ptr, %2 : !tt.ptr<f32>, i32 loc(#loc6)
"""
_GOOD = """
    %0 = tt.get_program_id x : i32 loc(#loc1)
    %1 = arith.extsi %0 : i32 to i64 loc(#loc2)
    %2 = arith.extsi %N : i32 to i64 loc(#loc3)
    %3 = arith.muli %1, %2 : i64 loc(#loc4)
    %4 = tt.addptr %part_ptr, %3 : !tt.ptr<f32>, i64 loc(#loc5)
"""


def test_checker_finds_an_int32_product_widened_too_late():
    assert i32_runtime_products_in_offsets(_BAD) == ["%1 = arith.muli %0, %N : i32"]
    assert i32_runtime_products_in_offsets(_GOOD) == []
