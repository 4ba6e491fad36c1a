"""The tooling beside the runtime: the command line and what it runs.

cli.py             `fused-dft bench|check|kernels|families` (also `python -m fused_dft ...`)
bench/             the benchmark and self-check behind `fused-dft bench` and `fused-dft check`
hf_families.py     `fused-dft families`: patch_model on every causal-LM family of transformers
kernel_report.py   `fused-dft kernels`: GPU resources of every Triton kernel, compiled here
kernel_specs.py    how kernel_report.py compiles each kernel (arguments, flags, configs)

Nothing in the runtime (the loss, the kernels, the Hugging Face patch) imports from here.
"""
