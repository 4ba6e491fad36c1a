"""`python -m fused_dft bench|check|kernels|families`: the same as the `fused-dft` command."""

from .tools.cli import main

raise SystemExit(main())
