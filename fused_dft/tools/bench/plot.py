"""The bench picture: time and peak memory per provider (bars), or over a swept size (lines)."""

from __future__ import annotations

from pathlib import Path

NAIVE_COLOR = "#c0392b"
FUSED_DFT_COLOR = "#2471a3"
OTHER_COLOR = "#7f8c8d"


def _color(key: str) -> str:
    if key == "naive":
        return NAIVE_COLOR
    if key in ("auto", "chunked", "fused", "reference", "vocab_parallel"):
        return FUSED_DFT_COLOR
    return OTHER_COLOR


def _time_unit(records: list[dict]) -> tuple[float, str]:
    slowest = max((r["time_s"] for r in records if r["status"] == "ok"), default=0)
    return (1.0, "s") if slowest >= 1 else (1e-3, "ms")


def _mem_unit(records: list[dict]) -> tuple[float, str]:
    peak = max((r["peak_mem_bytes"] for r in records if r["status"] == "ok"), default=0)
    return (2**30, "GiB") if peak >= 2**30 else (2**20, "MiB")


def plot(records: list[dict], path: Path, title: str, subtitle: str, sweep: str | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if sweep:
        fig = _sweep_figure(plt, records, sweep)
    else:
        fig = _bar_figure(plt, records)
    fig.suptitle(f"{title}\n{subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bar_figure(plt, records: list[dict]):
    from matplotlib.patches import Patch

    scale, unit = _mem_unit(records)
    tscale, tunit = _time_unit(records)
    n = len(records)
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.6 + 0.55 * n))
    panels = (
        (
            f"forward + backward time ({tunit}), lower is better",
            "time_s",
            tscale,
            "time_ratio",
            tunit,
        ),
        (
            f"peak memory above inputs ({unit}), lower is better",
            "peak_mem_bytes",
            scale,
            "mem_ratio",
            unit,
        ),
    )
    labels = [r["label"] + (f"\n[{r['runs_as']}]" if r.get("runs_as") else "") for r in records]
    for ax, (name, field, div, ratio_field, suffix) in zip(axes, panels, strict=True):
        ok = [r for r in records if r["status"] == "ok"]
        top = max((r[field] / div for r in ok), default=1.0) or 1.0
        for i, r in enumerate(records):
            if r["status"] != "ok":
                ax.text(
                    0,
                    i,
                    f"  {r['status']} (reason in the table)",
                    va="center",
                    fontsize=8,
                    color="gray",
                )
                continue
            value = r[field] / div
            ax.barh(
                i,
                value,
                color=_color(r["provider"]),
                edgecolor="black" if r["provider"] == "naive" else "none",
            )
            ratio = r.get(ratio_field)
            text = f" {value:.3g} {suffix}" + (f" ({ratio:.2f}x)" if ratio is not None else "")
            ax.text(value, i, text, va="center", fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        ax.set_ylim(n - 0.4, -0.6)
        ax.set_xlim(0, top * 1.45)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[1].set_yticklabels([])
    legend = [
        Patch(color=NAIVE_COLOR, label="naive (logits materialized)"),
        Patch(color=FUSED_DFT_COLOR, label="fused_dft"),
        Patch(color=OTHER_COLOR, label="other libraries"),
    ]
    axes[1].legend(handles=legend, fontsize=8, loc="lower right")
    return fig


def _sweep_figure(plt, records: list[dict], sweep: str):
    scale, unit = _mem_unit(records)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    keys = list(dict.fromkeys(r["provider"] for r in records))
    for ax, field, div, name in (
        (axes[0], "time_s", 1.0, "forward + backward time (s)"),
        (axes[1], "peak_mem_bytes", scale, f"peak memory above inputs ({unit})"),
    ):
        for key in keys:
            points = [
                (r["problem"][sweep], r[field] / div)
                for r in records
                if r["provider"] == key and r["status"] == "ok"
            ]
            if not points:
                continue
            label = next(r["label"] for r in records if r["provider"] == key)
            naive = key == "naive"
            ax.plot(
                *zip(*sorted(points), strict=True),
                marker="o",
                label=label,
                linewidth=2.5 if naive else 1.5,
                linestyle="--" if naive else "-",
                color=NAIVE_COLOR if naive else None,
            )
        xs = [r["problem"][sweep] for r in records]
        if max(xs) >= 8 * min(xs):
            ax.set_xscale("log")
        ax.set_xlabel(sweep)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    skipped = sorted({r["label"] for r in records if r["status"] != "ok"})
    axes[0].legend(fontsize=8)
    if skipped:
        axes[1].text(
            0.01,
            0.99,
            "not run: " + ", ".join(skipped),
            transform=axes[1].transAxes,
            va="top",
            fontsize=7,
            color="gray",
        )
    return fig
