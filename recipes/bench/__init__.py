"""The benchmarks behind docs/benchmarks.md: each module runs from the repository root as a module
(``python -m recipes.bench.step``) and writes its section with ``recipes.bench.report.write_section``."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` in a fresh process, from the repository root, its output captured (the
    benchmarks measure each configuration in a process of its own)."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT)
