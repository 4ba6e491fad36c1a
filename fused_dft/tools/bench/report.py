"""What a bench run produced, for people (terminal table, Markdown) and programs (JSON)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform

import torch


def machine_info(device: str) -> dict:
    """The machine, date and versions a result belongs to."""
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    for dist in ("torch", "triton", "liger-kernel", "cut-cross-entropy"):
        info[dist] = _version(dist)
    import fused_dft  # the code that ran, not the installed distribution's metadata

    info["fused_dft"] = fused_dft.__version__
    info["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "")
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} cores)"
    versions = ", ".join(
        f"{k} {info[k]}" for k in ("torch", "triton", "fused_dft", "liger-kernel") if info.get(k)
    )
    return f"{where}; {versions}; {info['date']}"


# -- formatting ---------------------------------------------------------------------------------


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def fmt_error(e: float | None) -> str:
    return "-" if e is None else ("inf" if math.isinf(e) else f"{e:.1e}")


COLUMNS = ("provider", "runs as", "time", "vs naive", "peak mem", "vs naive", "max err", "note")
BOUND_COLUMN = "x bound"  # after the time columns, when the 3-GEMM bound ran


def has_bound(records: list[dict]) -> bool:
    return any(r.get("bound_ratio") is not None for r in records)


def header(records: list[dict], sweep: str | None = None) -> list[str]:
    cols = list(COLUMNS)
    if has_bound(records):
        cols.insert(4, BOUND_COLUMN)
    return ([sweep] if sweep else []) + cols


def rows(records: list[dict], sweep: str | None = None) -> list[list[str]]:
    """Table rows; with a sweep, the swept size leads each row."""
    out = []
    for r in records:
        ok = r["status"] == "ok"
        if not ok:
            note = f"{r['status']}: {r['reason']}"
        elif not r.get("error_ok", True):
            note = f"ERROR above tolerance {r['tolerance']:.0e}"
        elif r["provider"] == "bound":
            note = "time floor: logits, dh, dW matmuls only (not a loss)"
        else:
            note = r.get("error_failure", "")
        if "vs_one_process" in r:
            vs = r["vs_one_process"]
            note = (
                f"vs one process (auto): time {fmt_ratio(vs['time'])}, peak mem per rank "
                f"{fmt_ratio(vs['peak_mem_per_rank'])} {note}"
            ).strip()
        row = [
            r["label"],
            r.get("runs_as", ""),
            fmt_time(r.get("time_s")) if ok else "-",
            fmt_ratio(r.get("time_ratio")) if ok else "-",
            fmt_bytes(r.get("peak_mem_bytes")) if ok else "-",
            fmt_ratio(r.get("mem_ratio")) if ok else "-",
            fmt_error(r.get("max_error")) if ok else "-",
            note,
        ]
        if has_bound(records):
            row.insert(4, fmt_ratio(r.get("bound_ratio")) if ok else "-")
        if sweep:
            row.insert(0, str(r["problem"][sweep]))
        out.append(row)
    return out


def terminal_table(records: list[dict], sweep: str | None = None) -> str:
    head = header(records, sweep)
    body = rows(records, sweep)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    widths[-1] = 0  # the note runs on
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join(
        [line(head), line(["-" * w for w in widths[:-1]] + ["----"])] + [line(r) for r in body]
    )


def markdown(records: list[dict], meta: dict, sweep: str | None = None) -> str:
    info = meta["machine"]
    head = header(records, sweep)
    lines = [
        "# fused-dft bench",
        "",
        f"- command: `{meta['command']}`",
        f"- problem: {meta['description']}",
        f"- machine: {machine_line(info)}",
        f"- error: max over loss, dh, dW of max|x - ref| / max|ref| against the float64 "
        f"reference, on {meta['check_tokens']}",
        "- time: forward + backward; peak mem: above the inputs, gradients included",
    ]
    if has_bound(records):
        lines.append(
            "- x bound: time over the 3-GEMM bound's (logits = h W^T, dh = g W, dW = g^T h: "
            "6*N*D*V FLOPs through torch's matmul)"
        )
    lines += [
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    lines += [
        "| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows(records, sweep)
    ]
    return "\n".join(lines) + "\n"


def to_json(records: list[dict], meta: dict) -> str:
    """Strict JSON: infinities and NaNs become null."""
    return json.dumps(_finite({"meta": meta, "results": records}), indent=2) + "\n"


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
