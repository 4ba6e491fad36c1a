"""Benchmark and self-check machinery behind `fused-dft bench` and `fused-dft check`.

problem.py      shapes, presets, seeded inputs, the float64 reference and error measures
providers.py    the losses compared (naive, fused_dft impls, Liger, torch, vocab-parallel, Cut
                Cross-Entropy) and the 3-GEMM bound
distributed.py  the vocab-parallel provider (`--nproc P`): one worker process per rank
measure.py      time and peak memory of one provider, in the current process
launch.py       start a worker process and read its result line (runner.py and e2e.py use it)
worker.py       `python -m fused_dft.tools.bench.worker`: measure one provider (or one e2e
                training run) in a fresh process
runner.py       the bench: every shape x provider, each in its own worker process
e2e.py          `fused-dft bench --e2e`: training steps of a config-built Llama, stock vs patched
report.py       machine description, terminal table, Markdown and JSON
plot.py         the PNG (time and peak memory per provider, or over a sweep)
check.py        `fused-dft check`: every impl against the float64 reference on a small problem
"""
