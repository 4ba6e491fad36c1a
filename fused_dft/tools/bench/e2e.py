"""`fused-dft bench --e2e`: full training steps of a causal LM, stock forward vs patch_model.

The model is a config-built Llama whose LM head dominates (by default hidden 1024, 2 layers,
tied embeddings, the vocabulary swept): one step is forward with labels (the stock loss is
transformers' cross-entropy over the full logits; the patched one is fused DFT), backward, AdamW
step, zero_grad. Each (vocabulary, provider) runs in its own worker process (launch.run_worker):
one warm-up step (it also creates the optimizer state), then `repeats` timed steps; the median
gives tokens/s. Peak memory is the peak during the timed steps above what the process holds
between steps (weights and AdamW state), as measure.PeakMemory reads it (CPU: VmHWM after
clear_refs; CUDA: the caching allocator); the total peak (weights and optimizer state included)
is reported beside it. Needs only torch and transformers (no TRL, no datasets).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .launch import run_worker
from .measure import PeakMemory, _sync

PROVIDERS = {
    "naive": "stock forward (full logits, CE)",
    "patched": "fused_dft.patch_model (DFT)",
}
# with --e2e-compile: the patched model under torch.compile (fullgraph), its compile in the warm-up
COMPILED = {"compiled": "fused_dft.patch_model + torch.compile (DFT)"}


@dataclass(frozen=True)
class E2EProblem:
    vocab: int
    hidden: int = 1024
    layers: int = 2
    seq: int = 2048
    batch: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    def as_dict(self) -> dict:
        return asdict(self)


def build_model(problem: E2EProblem):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=problem.vocab,
        hidden_size=problem.hidden,
        intermediate_size=4 * problem.hidden,
        num_hidden_layers=problem.layers,
        num_attention_heads=max(1, problem.hidden // 64),
        num_key_value_heads=max(1, problem.hidden // 128),
        max_position_embeddings=problem.seq,
        tie_word_embeddings=True,  # as Llama 3.2 and Gemma 3 at these vocabularies
    )
    torch.manual_seed(problem.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(device=problem.device, dtype=getattr(torch, problem.dtype)).train()


def measure_e2e(provider: str, problem: dict, repeats: int = 3, warmup: int = 1) -> dict:
    """Time and memory of training steps of `provider` ("naive" or "patched") in this process."""
    problem = E2EProblem(**problem)
    device = torch.device(problem.device)
    model = build_model(problem)
    forward = model
    if provider in ("patched", "compiled"):
        import fused_dft

        fused_dft.patch_model(model)
        if provider == "compiled":
            forward = torch.compile(model, fullgraph=True)
    elif provider != "naive":
        raise ValueError(f"e2e provider {provider!r}: choose from {list(PROVIDERS | COMPILED)}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(problem.seed + 1)
    input_ids = torch.randint(0, problem.vocab, (problem.batch, problem.seq), generator=g)
    input_ids = input_ids.to(device)

    def step() -> tuple[float, float]:
        _sync(device)
        start = time.perf_counter()
        loss = forward(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start, float(loss.detach())

    for _ in range(warmup):
        step()
    gc.collect()
    memory = PeakMemory(device)  # the base: weights, optimizer state, inputs
    memory.reset_peak()
    runs = [step() for _ in range(repeats)]
    peak = memory.peak_above_base()
    times = [t for t, _ in runs]
    median = statistics.median(times)
    return {
        "status": "ok",
        "time_s": median,
        "times_s": times,
        "tokens_per_s": problem.tokens / median,
        "peak_mem_bytes": peak,
        "total_peak_bytes": peak + memory.base,
        "between_steps_bytes": memory.base,
        "memory_method": memory.method,
        "loss": runs[-1][1],
    }


def run(problems: list[E2EProblem], repeats: int, warmup: int, timeout_s, progress=None,
        compiled: bool = False):  # fmt: skip
    """One record per (problem, provider), each measured in a worker process; compiled adds the
    patched model under torch.compile."""
    providers = PROVIDERS | (COMPILED if compiled else {})
    records = []
    for problem in problems:
        group = []
        for key, label in providers.items():
            request = {"e2e": True, "provider": key, "problem": problem.as_dict(),
                       "repeats": repeats, "warmup": warmup}  # fmt: skip
            record = {"provider": key, "label": label, "problem": problem.as_dict()}
            record.update(run_worker(request, timeout_s))
            group.append(record)
            if progress is not None:
                progress(record)
        stock = group[0]
        for r in group:
            if r["status"] == "ok" and stock["status"] == "ok":
                r["time_ratio"] = r["time_s"] / stock["time_s"]
                r["mem_ratio"] = r["peak_mem_bytes"] / max(stock["peak_mem_bytes"], 1)
        records += group
    return records


def progress_line(r: dict) -> str:
    from .report import fmt_bytes, fmt_time

    if r["status"] != "ok":
        return f"{r['status']}: {r.get('reason', '')}"
    held = fmt_bytes(r["between_steps_bytes"])
    speed = f"{r['tokens_per_s']:.0f} tokens/s"
    peak = fmt_bytes(r["peak_mem_bytes"])
    return f"step {fmt_time(r['time_s'])}, {speed}, peak {peak} above {held}"


COLUMNS = ("vocab", "provider", "step time", "tokens/s", "vs stock", "peak mem", "vs stock",
           "total peak", "note")  # fmt: skip


def rows(records: list[dict]) -> list[list[str]]:
    from .report import fmt_bytes, fmt_ratio, fmt_time

    out = []
    for r in records:
        ok = r["status"] == "ok"
        speed = r.get("time_ratio")
        out.append([
            str(r["problem"]["vocab"]),
            r["label"],
            fmt_time(r.get("time_s")) if ok else "-",
            f"{r['tokens_per_s']:.0f}" if ok else "-",
            fmt_ratio(None if speed is None else 1 / speed) if ok else "-",
            fmt_bytes(r.get("peak_mem_bytes")) if ok else "-",
            fmt_ratio(r.get("mem_ratio")) if ok else "-",
            fmt_bytes(r.get("total_peak_bytes")) if ok else "-",
            "" if ok else f"{r['status']}: {r.get('reason', '')}",
        ])  # fmt: skip
    return out


def terminal_table(records: list[dict]) -> str:
    body = rows(records)
    widths = [max(len(x) for x in col) for col in zip(COLUMNS, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in body])


def markdown(records: list[dict], meta: dict) -> str:
    from .report import machine_line

    lines = [
        "# fused-dft bench --e2e",
        "",
        f"- command: `{meta['command']}`",
        f"- model: {meta['description']}",
        f"- machine: {machine_line(meta['machine'])}",
        "- step: forward with labels, backward, AdamW step, zero_grad; median of the timed steps;"
        " tokens/s vs stock is the speed-up; peak mem is above the weights and AdamW state held "
        "between steps, total peak includes them",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows(records)]
    return "\n".join(lines) + "\n"
