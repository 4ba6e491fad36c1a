"""Triton kernels and their launchers, one kernel family per file.

Importing this package imports triton and decorates the kernels; TRITON_INTERPRET=1 must be set
before that to run them on the CPU.
"""
