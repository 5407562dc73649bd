"""The console scripts `wan-generate` and `wan-benchmark` (setup.py's entry points).

The tools import torch, triton and the models at their top: seconds of work. Ctrl-C during those
imports ends as Ctrl-C later does (wan_triton.exits.run_main): one line, exit code 130, no
traceback. This module and `import wan_triton` import nothing heavy, so the guard is in place
before the imports start.
"""
from __future__ import annotations

import importlib
import os
import sys

EXIT_INTERRUPTED = 130  # = wan_triton.exits.EXIT_INTERRUPTED (exits imports torch: not imported before the guard)


def _run(prog: str, module: str) -> int:
    try:
        # numpy before torch: torch's C start-up imports numpy itself and drops any error of that
        # import, a Ctrl-C included (the run then went on, or died later on a half-imported numpy)
        importlib.import_module("numpy")
        return importlib.import_module(module).main()
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", 0) or 0) == 0:  # under torchrun rank 0 says it, as run_main does
            print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def generate() -> int:
    """wan-generate (wan_triton.generate.main)."""
    return _run("wan-generate", "wan_triton.generate")


def benchmark() -> int:
    """wan-benchmark (wan_triton.benchmark.main)."""
    return _run("wan-benchmark", "wan_triton.benchmark")
